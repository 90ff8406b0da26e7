//! Finding and reading datasource files: the given files, and every `*.yaml` / `*.yml` under
//! the given folders (hidden entries and symlinked folders skipped), in path order. A file
//! over [`MAX_FILE_BYTES`] or not UTF-8 is a problem of that file, not a failure of the scan.

use std::path::{Path, PathBuf};

use super::{Error, Problem};

/// Largest datasource file read.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// One file found.
#[derive(Debug, Clone)]
pub struct Source {
    /// The path as the caller named it (a given folder joined with the file's place in it).
    pub shown: PathBuf,
    /// The absolute path, as the database records it.
    pub file: String,
    /// Its text, or why it cannot be used.
    pub text: Result<String, Problem>,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// The files, in absolute path order.
    pub sources: Vec<Source>,
    /// The given folders, absolute, without a trailing slash.
    pub folders: Vec<String>,
    /// The given files, absolute.
    pub files: Vec<String>,
}

/// Finds and reads the files of `paths`.
///
/// # Errors
/// [`Error::Io`] when a given path does not exist or a folder cannot be listed.
pub fn scan(paths: &[PathBuf]) -> Result<Scan, Error> {
    let mut scan = Scan::default();
    for given in paths {
        let canonical = std::fs::canonicalize(given).map_err(Error::io(given))?;
        let meta = std::fs::metadata(&canonical).map_err(Error::io(given))?;
        if meta.is_dir() {
            walk(&canonical, given, &mut scan.sources)?;
            scan.folders.push(absolute(&canonical));
        } else {
            scan.sources.push(read(given.clone(), &canonical));
            scan.files.push(absolute(&canonical));
        }
    }
    scan.sources.sort_by(|a, b| a.file.cmp(&b.file));
    scan.sources.dedup_by(|a, b| a.file == b.file);
    Ok(scan)
}

fn absolute(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Whether `path` names a datasource file a folder scan picks up.
pub fn is_datasource_file(path: &Path) -> bool {
    let visible = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| !n.starts_with('.'));
    visible
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml")
}

fn walk(dir: &Path, shown: &Path, out: &mut Vec<Source>) -> Result<(), Error> {
    let entries = std::fs::read_dir(dir).map_err(Error::io(shown))?;
    for entry in entries {
        let entry = entry.map_err(Error::io(shown))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let shown = shown.join(&name);
        let kind = entry.file_type().map_err(Error::io(&shown))?;
        if kind.is_dir() {
            walk(&path, &shown, out)?;
        } else if is_datasource_file(&path) && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            out.push(read(shown, &path));
        }
    }
    Ok(())
}

fn read(shown: PathBuf, path: &Path) -> Source {
    let problem = |message: String| Problem::new(&shown, 0, None, message);
    let text = match std::fs::metadata(path) {
        Ok(meta) if meta.len() > MAX_FILE_BYTES => Err(problem(format!(
            "the file is {} bytes; datasource files are at most {MAX_FILE_BYTES} bytes (split it)",
            meta.len()
        ))),
        Ok(_) => match std::fs::read(path) {
            // The size is checked again: the file may have grown since.
            Ok(bytes) if bytes.len() as u64 > MAX_FILE_BYTES => Err(problem(format!(
                "the file is over {MAX_FILE_BYTES} bytes; split it"
            ))),
            Ok(bytes) => String::from_utf8(bytes)
                .map_err(|_| problem("the file is not UTF-8 text".to_owned())),
            Err(e) => Err(problem(format!("cannot read the file: {e}"))),
        },
        Err(e) => Err(problem(format!("cannot read the file: {e}"))),
    };
    Source {
        file: absolute(path),
        shown,
        text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_give_their_yaml_files_in_order_and_problems_stay_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/.hidden")).unwrap();
        std::fs::write(root.join("b/two.yml"), "x: 2\n").unwrap();
        std::fs::write(root.join("a.yaml"), "x: 1\n").unwrap();
        std::fs::write(root.join("notes.txt"), "no").unwrap();
        std::fs::write(root.join(".swap.yaml"), "no").unwrap();
        std::fs::write(root.join("b/.hidden/three.yaml"), "no").unwrap();
        std::fs::write(
            root.join("big.yaml"),
            vec![b'#'; MAX_FILE_BYTES as usize + 1],
        )
        .unwrap();
        std::fs::write(root.join("latin1.yaml"), [b'a', 0xe9, b'\n']).unwrap();

        let scan = scan(&[root.to_owned()]).unwrap();

        let names: Vec<String> = scan
            .sources
            .iter()
            .map(|s| s.shown.strip_prefix(root).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a.yaml", "b/two.yml", "big.yaml", "latin1.yaml"]);
        assert_eq!(scan.sources[0].text.as_deref().unwrap(), "x: 1\n");
        assert!(
            scan.sources[2]
                .text
                .as_ref()
                .unwrap_err()
                .message
                .contains("at most")
        );
        assert!(
            scan.sources[3]
                .text
                .as_ref()
                .unwrap_err()
                .message
                .contains("UTF-8")
        );
        assert_eq!(scan.folders.len(), 1);
        assert!(scan.sources[0].file.starts_with('/'));

        let missing = super::scan(&[root.join("nope")]).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }
}
