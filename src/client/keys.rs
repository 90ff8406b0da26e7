//! `dsreg keys rotate|rewrap|status`: master key rotation. Unlike the client commands, these
//! work on the key file and the database directly (like `migrate`), with the same settings as
//! `serve`, so they run with no registry up.
//!
//! Rotation is three steps: `rotate` adds a key version and makes it active; every registry is
//! restarted so it loads it (registries read keys at start-up, and a row sealed under a version
//! a registry lacks does not open there); `rewrap` then re-seals the rows still on older
//! versions. `rewrap` stops after its current batch on Ctrl-C, and running it again resumes.

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use serde_json::json;

use super::output::{Output, Printer, note};
use super::progress::Progress;
use super::table::{Table, thousands, yes};
use crate::app;
use crate::config::Settings;
use crate::db;
use crate::secrets::keys::MASTER_KEYS_ENV;
use crate::secrets::{
    EnvKeyProvider, FileKeyProvider, KeyProvider, KeyStatus, RewrapReport, Secrets,
};

/// `dsreg keys …`.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// Add a new master key version to the key file and make it active (key files only).
    /// Then restart every registry and run `dsreg keys rewrap`.
    Rotate {
        #[command(flatten)]
        settings: Settings,
        /// Output: `table` for people, `json` for scripts.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Re-seal every secret not on the active key version under it, in batches, online.
    /// Ctrl-C stops after the current batch; running it again resumes.
    Rewrap {
        #[command(flatten)]
        settings: Settings,
        /// Secrets per transaction.
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        batch_size: u64,
        /// Output: `table` for people, `json` for scripts.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Secrets per key version, and which version is active.
    Status {
        #[command(flatten)]
        settings: Settings,
        /// Output: `table` for people, `json` for scripts (one document per version).
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

impl KeysArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// Invalid settings or keys, database failures; `rotate` with keys from the environment
    /// (after explaining how to rotate them); `rewrap` stopped early, or leaving secrets on
    /// older versions.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            KeysCommand::Rotate { settings, output } => {
                settings.check().map_err(anyhow::Error::msg)?;
                rotate(&settings, Printer::new(output))
            }
            KeysCommand::Rewrap {
                settings,
                batch_size,
                output,
            } => {
                settings.check().map_err(anyhow::Error::msg)?;
                let secrets = secrets(&settings).await?;
                let batch_size = usize::try_from(batch_size).unwrap_or(usize::MAX);
                let pool_wait = settings.pool_wait();
                let bounds = settings.connect_options();
                with_database(&settings, |url| async move {
                    let pool = db::pool_with(&url, &bounds, 2, pool_wait)?;
                    let result = rewrap(&secrets, &pool, batch_size, Printer::new(output)).await;
                    pool.close();
                    result
                })
                .await
            }
            KeysCommand::Status { settings, output } => {
                settings.check().map_err(anyhow::Error::msg)?;
                let secrets = secrets(&settings).await?;
                let bounds = settings.connect_options();
                with_database(&settings, |url| async move {
                    let client = db::connect_with(&url, &bounds).await?;
                    let statuses = secrets.status(&client).await.context(
                        "reading key versions (is the database migrated? `dsreg migrate`)",
                    )?;
                    print_status(&statuses, Printer::new(output))
                })
                .await
            }
        }
    }
}

async fn secrets(settings: &Settings) -> anyhow::Result<Arc<Secrets>> {
    app::secrets_service(settings).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "no master key configured: set {MASTER_KEYS_ENV} or --master-key-file \
             (DSREG_MASTER_KEY_FILE)"
        )
    })
}

/// Opens the database of `settings` (launching the embedded one if needed), runs `work` on
/// its URL, and closes it again.
pub(super) async fn with_database<F, Fut>(settings: &Settings, work: F) -> anyhow::Result<()>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let database = app::Database::open(settings).await?;
    let result = work(database.url.clone()).await;
    database.close().await;
    result
}

fn rotate(settings: &Settings, printer: Printer) -> anyhow::Result<()> {
    if let Some(keys) = &settings.master_keys {
        let provider = EnvKeyProvider::parse(keys, settings.active_key_version)?;
        let next = provider.versions().last().copied().unwrap_or(0) + 1;
        bail!(
            "{}",
            env_rotation_steps(next, settings.active_key_version.is_some())
        );
    }
    let path = match (&settings.master_key_file, &settings.database_url) {
        (Some(path), _) => path.clone(),
        (None, None) => settings.dev_key_file(),
        (None, Some(_)) => bail!(
            "no master key file to rotate: set --master-key-file (DSREG_MASTER_KEY_FILE), or \
             {MASTER_KEYS_ENV}"
        ),
    };
    let version = FileKeyProvider::add_version(&path)?;
    if printer.is_json() {
        return printer.json(&json!({
            "key_version": version,
            "active": true,
            "key_file": path.display().to_string(),
        }));
    }
    printer.text(&format!(
        "added key version {version} to {} and made it active\n\
         next: restart every registry so it loads the new key, then run `dsreg keys rewrap` \
         to re-seal existing secrets under it\n",
        path.display()
    ))
}

/// What to do instead of `rotate` when the keys come from `DSREG_MASTER_KEYS` (which a
/// command cannot change for the processes that read it). Names no key material.
pub fn env_rotation_steps(next: u32, explicit_active: bool) -> String {
    let activate = if explicit_active {
        format!(" and set DSREG_ACTIVE_KEY_VERSION={next}")
    } else {
        String::new()
    };
    format!(
        "the master keys come from {MASTER_KEYS_ENV}, which this command cannot change; \
         rotate them by hand:\n  \
         1. generate a key: openssl rand -base64 32\n  \
         2. append it as version {next}: {MASTER_KEYS_ENV}=\"<current value>,{next}:<new key>\"{activate}\n  \
         3. restart every registry with the new value\n  \
         4. run `dsreg keys rewrap` to re-seal existing secrets under version {next}"
    )
}

async fn rewrap(
    secrets: &Secrets,
    pool: &deadpool_postgres::Pool,
    batch_size: usize,
    printer: Printer,
) -> anyhow::Result<()> {
    let stop = AtomicBool::new(false);
    let progress = RefCell::new(Progress::new("rewrap", "rows"));
    note(&format!(
        "re-sealing secrets under key version {}, {batch_size} per batch",
        secrets.keys().active_version()
    ));
    let run = secrets.rewrap(pool, batch_size, |done, total| {
        progress.borrow_mut().update(done, total);
        if stop.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    tokio::pin!(run);
    let mut interrupted = false;
    let report = loop {
        tokio::select! {
            report = &mut run => break report.context("rewrap (batches committed so far stay done)")?,
            signal = tokio::signal::ctrl_c() => {
                signal.context("watching for Ctrl-C")?;
                progress.borrow_mut().finish();
                if interrupted {
                    // Dropping the run rolls back its open batch only.
                    bail!("aborted; the open batch was rolled back; run `dsreg keys rewrap` again to resume");
                }
                interrupted = true;
                stop.store(true, Ordering::Relaxed);
                note("stopping after the current batch (Ctrl-C again to abort it)");
            }
        }
    };
    progress.borrow_mut().finish();
    print_report(&report, printer)?;
    if report.stopped {
        bail!(
            "stopped after {} of {} secrets; run `dsreg keys rewrap` again to resume",
            thousands(report.rewrapped + report.failed.len() as u64),
            thousands(report.total)
        );
    }
    if !report.failed.is_empty() {
        bail!(
            "{} secrets could not be opened and stay on their old key version (listed above)",
            report.failed.len()
        );
    }
    if report.remaining > 0 {
        bail!(
            "{} secrets are still on older key versions (written meanwhile, or locked by a \
             writer); run `dsreg keys rewrap` again",
            thousands(report.remaining)
        );
    }
    Ok(())
}

fn print_report(report: &RewrapReport, printer: Printer) -> anyhow::Result<()> {
    if printer.is_json() {
        return printer.json(&json!({
            "active_version": report.active_version,
            "total": report.total,
            "rewrapped": report.rewrapped,
            "failed": report.failed.iter().map(|f| json!({
                "datasource_id": f.datasource.to_string(),
                "name": f.name,
                "error": f.error.to_string(),
            })).collect::<Vec<_>>(),
            "stopped": report.stopped,
            "remaining": report.remaining,
            "elapsed_ms": u64::try_from(report.elapsed.as_millis()).unwrap_or(u64::MAX),
        }));
    }
    let mut text = if report.total == 0 {
        format!(
            "every secret is already on key version {}\n",
            report.active_version
        )
    } else {
        format!(
            "rewrapped {} of {} secrets to key version {} in {:.1} s; {} left on older versions\n",
            thousands(report.rewrapped),
            thousands(report.total),
            report.active_version,
            report.elapsed.as_secs_f64(),
            thousands(report.remaining)
        )
    };
    for failure in &report.failed {
        text.push_str(&format!(
            "  failed: {} {}: {}\n",
            failure.datasource, failure.name, failure.error
        ));
    }
    printer.text(&text)
}

fn print_status(statuses: &[KeyStatus], printer: Printer) -> anyhow::Result<()> {
    if printer.is_json() {
        for s in statuses {
            printer.json(&json!({
                "key_version": s.key_version,
                "secrets": s.secrets,
                "active": s.active,
                "loaded": s.loaded,
            }))?;
        }
    } else {
        printer.text(&status_table(statuses).render())?;
    }
    for s in statuses.iter().filter(|s| !s.loaded && s.secrets > 0) {
        note(&format!(
            "warning: {} secrets are sealed under key version {}, which is not loaded: they do \
             not open until that key is added back",
            thousands(u64::try_from(s.secrets).unwrap_or(0)),
            s.key_version
        ));
    }
    Ok(())
}

/// The `keys status` table.
pub fn status_table(statuses: &[KeyStatus]) -> Table {
    let mut table = Table::new(["VERSION", "SECRETS", "ACTIVE", "LOADED"]);
    for s in statuses {
        table.row([
            s.key_version.to_string(),
            thousands(u64::try_from(s.secrets).unwrap_or(0)),
            yes(s.active).to_owned(),
            yes(s.loaded).to_owned(),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_marks_the_active_and_loaded_versions() {
        let table = status_table(&[
            KeyStatus {
                key_version: 1,
                secrets: 12_000,
                active: false,
                loaded: true,
            },
            KeyStatus {
                key_version: 2,
                secrets: 3,
                active: true,
                loaded: true,
            },
        ]);
        assert_eq!(
            table.render(),
            "VERSION  SECRETS  ACTIVE  LOADED\n\
             1        12,000           yes\n\
             2        3        yes     yes\n"
        );
    }

    #[test]
    fn env_rotation_steps_name_the_next_version_and_no_key() {
        let steps = env_rotation_steps(3, false);
        assert!(steps.contains("3:<new key>"), "{steps}");
        assert!(steps.contains("DSREG_MASTER_KEYS"));
        assert!(!steps.contains("DSREG_ACTIVE_KEY_VERSION"));
        assert!(env_rotation_steps(3, true).contains("DSREG_ACTIVE_KEY_VERSION=3"));
    }
}
