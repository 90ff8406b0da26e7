//! `dsreg export DIR`: every live datasource's published version as a datasource file,
//! `DIR/<org>/<project>/<name>.yaml`, in the format import reads, so importing the result
//! changes nothing. Datasources never published are skipped (there is nothing to export).
//! Files are written whole (a temporary file renamed into place), so a watcher never reads
//! half of one; existing files with other contents are left alone unless forced.

use std::path::{Path, PathBuf};

use deadpool_postgres::Pool;
use uuid::Uuid;

use super::Error;
use super::format::{self, Exported, Key};
use crate::db::repository::datasources::{self, ListFilter};
use crate::db::repository::{secrets, versions};
use crate::domain::DatasourceStatus;

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// The folder.
    pub dir: PathBuf,
    /// Only this organisation.
    pub org: Option<String>,
    /// Only this project.
    pub project: Option<String>,
    /// Overwrite files that differ.
    pub force: bool,
}

/// What an export did.
#[derive(Debug, Clone, Default)]
pub struct ExportReport {
    /// Files written.
    pub written: Vec<PathBuf>,
    /// Files that already said the same.
    pub unchanged: Vec<PathBuf>,
    /// Datasources with no published version, not exported.
    pub unpublished: Vec<Key>,
}

/// Datasources read per query.
const PAGE: i64 = 1_000;

/// Writes the published configs of the datasources `options` selects.
///
/// # Errors
/// [`Error::WouldOverwrite`] (nothing written), [`Error::Io`], [`Error::Db`].
pub async fn export(pool: &Pool, options: &ExportOptions) -> Result<ExportReport, Error> {
    let client = pool.get().await.map_err(crate::db::Error::from)?;
    let mut report = ExportReport::default();
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    let mut filter = ListFilter {
        org: options.org.clone(),
        project: options.project.clone(),
        limit: PAGE,
        ..ListFilter::default()
    };
    loop {
        let page = datasources::list(&client, &filter).await?;
        let live: Vec<_> = page
            .iter()
            .filter(|d| d.status != DatasourceStatus::Archived)
            .collect();
        let ids: Vec<Uuid> = live.iter().map(|d| d.id).collect();
        let heads = versions::heads(&**client, &ids).await?;
        let names = secrets::names(&**client, &ids).await?;
        for ds in live {
            let key = Key {
                org: ds.org.clone(),
                project: ds.project.clone(),
                name: ds.name.clone(),
            };
            let Some(published) = heads.get(&ds.id).and_then(|h| h.published.as_ref()) else {
                report.unpublished.push(key);
                continue;
            };
            let text = format::write(&Exported {
                key: &key,
                kind: &ds.kind,
                status: ds.status,
                owner: &ds.owner,
                tags: &ds.tags,
                description: &ds.description,
                config: &published.config,
                secrets: names.get(&ds.id).map_or(&[], Vec::as_slice),
            });
            let path = options
                .dir
                .join(&key.org)
                .join(&key.project)
                .join(format!("{}.yaml", key.name));
            files.push((path, text));
        }
        match page.last() {
            Some(last) if page.len() as i64 == PAGE => {
                filter.after = Some((last.name.clone(), last.id));
            }
            _ => break,
        }
    }
    drop(client);
    let force = options.force;
    tokio::task::spawn_blocking(move || write_all(files, force, report))
        .await
        .map_err(|e| Error::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(format!("the file writer stopped: {e}")),
        })?
}

/// Writes `files`, unless one that exists differs and `force` is off.
fn write_all(
    files: Vec<(PathBuf, String)>,
    force: bool,
    mut report: ExportReport,
) -> Result<ExportReport, Error> {
    let mut differing = Vec::new();
    let mut to_write = Vec::new();
    for (path, text) in files {
        match std::fs::read(&path) {
            Ok(existing) if existing == text.as_bytes() => report.unchanged.push(path),
            Ok(_) => {
                differing.push(path.clone());
                to_write.push((path, text));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => to_write.push((path, text)),
            Err(e) => return Err(Error::Io { path, source: e }),
        }
    }
    if !differing.is_empty() && !force {
        return Err(Error::WouldOverwrite(differing));
    }
    for (path, text) in to_write {
        write_whole(&path, &text)?;
        report.written.push(path);
    }
    Ok(report)
}

/// Writes `text` to a temporary file beside `path`, then renames it into place.
fn write_whole(path: &Path, text: &str) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.{}.tmp", Uuid::new_v4().simple()));
    std::fs::write(&temporary, text).map_err(Error::io(&temporary))?;
    std::fs::rename(&temporary, path).map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        Error::Io {
            path: path.to_owned(),
            source: e,
        }
    })
}
