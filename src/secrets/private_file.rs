//! Private files written whole: mode 0600 from creation, written to a synced temporary file
//! in the same folder, then renamed or linked into place, so a crash never leaves a
//! half-written key, secret or token under the real name and no other user ever reads one.

use std::fs::Permissions;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// What to do when a file already has the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Keep it: nothing is written (a concurrent first run keeps the first file).
    Keep,
    /// Replace it atomically.
    Replace,
}

/// Writes `bytes` to `path` (mode 0600) through a temporary file next to it; returns whether
/// the file was written (`false`: it existed and `existing` is [`Existing::Keep`]). The
/// folder must exist. A failure leaves no temporary file behind.
///
/// # Errors
/// The I/O error of creating, writing, syncing or placing the file.
pub fn write_private(path: &Path, bytes: &[u8], existing: Existing) -> io::Result<bool> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let prefix = format!(".{}.", name.to_string_lossy());
    // Removed when dropped: on every error below the temporary file goes with it.
    let mut file = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .permissions(Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    let placed = match existing {
        Existing::Replace => file.persist(path).map(|_| true),
        // Linked only if the name is free.
        Existing::Keep => match file.persist_noclobber(path) {
            Ok(_) => Ok(true),
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        },
    }
    .map_err(|e| e.error)?;
    // Makes the rename or link durable; best effort (some filesystems refuse to sync folders).
    if placed && let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_private_file_is_written_0600_and_no_temporary_file_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        assert!(write_private(&path, b"first\n", Existing::Keep).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"first\n");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(entries(dir.path()), ["key.json"]);
    }

    #[test]
    fn keep_leaves_an_existing_file_and_replace_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "old").unwrap();
        assert!(!write_private(&path, b"new", Existing::Keep).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(write_private(&path, b"new", Existing::Replace).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(entries(dir.path()), ["token"]);
    }

    #[test]
    fn a_failed_placement_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        // A folder under the name: neither a rename nor a link can put a file there.
        let path = dir.path().join("taken");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), "x").unwrap();
        assert!(write_private(&path, b"new", Existing::Replace).is_err());
        assert_eq!(entries(dir.path()), ["taken"]);
        let missing = dir.path().join("no-such-folder/key");
        assert!(write_private(&missing, b"new", Existing::Keep).is_err());
        assert_eq!(entries(dir.path()), ["taken"]);
    }
}
