//! What an HTTP source's body holds, as the documents of a [`Scan`]: one YAML text (a single
//! datasource or a multi-document bundle), or a `.tar.gz` / `.zip` archive of a folder laid
//! out like a watched one (every `*.yaml` / `*.yml`, hidden entries skipped), told apart by
//! their first bytes. Nothing is written to disk.
//!
//! An archive's documents are named `<source>!/<path in the archive>`, and pruning is scoped
//! to the source: the datasources it synced, under its name. An archive is refused whole,
//! with the entry named, when an entry's path leaves it (`..`, an absolute path, a
//! backslash) or is a link, when it has more than [`MAX_ENTRIES`] entries, or when it unpacks
//! to more than [`MAX_UNPACKED_BYTES`] (a zip bomb): the bounds are checked as it unpacks,
//! not taken from its headers. A document over the file size bound, or not UTF-8, is a
//! problem of that document, as in a folder.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::{Component, Path, PathBuf};

use super::SourceError;
use crate::files::Problem;
use crate::files::scan::{self, MAX_FILE_BYTES, Scan, Source};

/// Most entries (files, folders, anything) an archive may hold.
pub const MAX_ENTRIES: usize = 10_000;

/// Most bytes an archive may unpack to, all entries together.
pub const MAX_UNPACKED_BYTES: u64 = 64 * 1024 * 1024;

/// The documents of `body`, fetched from the source named `name`.
///
/// # Errors
/// [`SourceError::Bundle`] when the body is an archive that cannot be read or is refused.
pub fn scan(name: &str, body: Vec<u8>) -> Result<Scan, SourceError> {
    let refused = |reason: String| SourceError::Bundle {
        source_name: name.to_owned(),
        reason,
    };
    let body = if body.starts_with(&[0x1f, 0x8b]) {
        Err(tar_gz(&body).map_err(refused)?)
    } else if body.starts_with(b"PK\x03\x04") || body.starts_with(b"PK\x05\x06") {
        Err(zip(body).map_err(refused)?)
    } else {
        Ok(body)
    };
    let mut scan = Scan {
        sources: Vec::new(),
        folders: vec![entries_root(name)],
        files: vec![name.to_owned()],
    };
    // A text, or an archive's files.
    match body {
        Ok(body) => {
            let shown = PathBuf::from(name);
            let text = String::from_utf8(body)
                .map_err(|_| Problem::new(&shown, 0, None, "the document is not UTF-8 text"));
            scan.sources.push(Source {
                shown,
                file: name.to_owned(),
                text,
            });
        }
        Err(entries) => {
            for (path, bytes) in entries {
                let file = format!("{}/{path}", entries_root(name));
                let shown = PathBuf::from(&file);
                let text = match bytes {
                    Err(size) => Err(Problem::new(
                        &shown,
                        0,
                        None,
                        format!(
                            "the file is {size} bytes; datasource files are at most \
                             {MAX_FILE_BYTES} bytes (split it)"
                        ),
                    )),
                    Ok(bytes) => String::from_utf8(bytes)
                        .map_err(|_| Problem::new(&shown, 0, None, "the file is not UTF-8 text")),
                };
                scan.sources.push(Source { shown, file, text });
            }
        }
    }
    Ok(scan)
}

/// Where the files of an archive served at `name` are recorded: `name!/path/in/archive`.
pub fn entries_root(name: &str) -> String {
    format!("{name}!")
}

/// An archive's datasource files by path: their bytes, or their size when over the file
/// bound.
type Entries = BTreeMap<String, Result<Vec<u8>, u64>>;

/// What is kept of archive entries as they are unpacked, with the bounds.
#[derive(Default)]
struct Unpacking {
    entries: usize,
    unpacked: u64,
    files: Entries,
}

impl Unpacking {
    /// Counts an entry at `raw` (its name in the archive); its path when it is a datasource
    /// file to read, `None` when it is skipped (a folder, a hidden or other file).
    fn entry(&mut self, raw: &str, is_dir: bool, is_link: bool) -> Result<Option<String>, String> {
        self.entries += 1;
        if self.entries > MAX_ENTRIES {
            return Err(format!(
                "the archive has more than {MAX_ENTRIES} entries; refused"
            ));
        }
        let path = inside(raw)?;
        if is_link {
            return Err(format!(
                "entry {path}: a link; refused (archives hold files and folders only)"
            ));
        }
        let hidden = path.split('/').any(|c| c.starts_with('.'));
        if is_dir || hidden || !scan::is_datasource_file(Path::new(&path)) {
            return Ok(None);
        }
        if self.files.contains_key(&path) {
            return Err(format!("entry {path}: in the archive twice"));
        }
        Ok(Some(path))
    }

    /// Reads the file `path` from `reader`, counting what it unpacks to (all of it: a file
    /// over the file bound is unpacked to its end, counted, and kept as a problem).
    fn read(&mut self, path: String, mut reader: impl Read) -> Result<(), String> {
        let room = MAX_UNPACKED_BYTES - self.unpacked;
        // One byte past each bound tells "at the bound" from "over it".
        let mut bytes = Vec::new();
        (&mut reader)
            .take(room.min(MAX_FILE_BYTES) + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("entry {path}: {e}"))?;
        let read = bytes.len() as u64;
        if read > room {
            return Err(bomb());
        }
        self.unpacked += read;
        let kept = if read > MAX_FILE_BYTES {
            let before = self.unpacked;
            self.skip(reader)?;
            Err(self.unpacked - before + read)
        } else {
            Ok(bytes)
        };
        self.files.insert(path, kept);
        Ok(())
    }

    /// Counts what a skipped entry unpacks to (a tar stream is unpacked through it anyway).
    fn skip(&mut self, reader: impl Read) -> Result<(), String> {
        let room = MAX_UNPACKED_BYTES - self.unpacked;
        let skipped = std::io::copy(&mut reader.take(room + 1), &mut std::io::sink())
            .map_err(|e| format!("reading the archive: {e}"))?;
        if skipped > room {
            return Err(bomb());
        }
        self.unpacked += skipped;
        Ok(())
    }
}

fn bomb() -> String {
    format!(
        "the archive unpacks to more than {MAX_UNPACKED_BYTES} bytes; refused (a zip bomb, or a \
         bundle to split)"
    )
}

/// `raw` as a path inside the archive (`a/b.yaml`, no `.` components), or why it leaves it.
fn inside(raw: &str) -> Result<String, String> {
    let shown: String = raw.chars().take(200).collect();
    if raw.contains('\\') || raw.contains('\0') {
        return Err(format!(
            "entry {shown:?}: a backslash or NUL in the path; refused"
        ));
    }
    let mut parts = Vec::new();
    for component in Path::new(raw).components() {
        match component {
            Component::Normal(part) => match part.to_str() {
                Some(part) => parts.push(part),
                None => return Err(format!("entry {shown:?}: the path is not UTF-8")),
            },
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "entry {shown:?}: the path leaves the archive (..); refused"
                ));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "entry {shown:?}: an absolute path; refused (archives hold relative paths)"
                ));
            }
        }
    }
    if parts.is_empty() {
        return Err(format!("entry {shown:?}: an empty path"));
    }
    Ok(parts.join("/"))
}

fn tar_gz(body: &[u8]) -> Result<Entries, String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(body));
    let mut unpacking = Unpacking::default();
    let entries = archive
        .entries()
        .map_err(|e| format!("not a readable .tar.gz: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("not a readable .tar.gz: {e}"))?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            unpacking.skip(entry)?;
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let raw = String::from_utf8(raw).map_err(|_| "an entry's path is not UTF-8".to_owned())?;
        let is_link = kind.is_symlink() || kind.is_hard_link();
        if !(kind.is_file() || kind.is_dir() || is_link) {
            return Err(format!(
                "entry {raw:?}: neither a file nor a folder; refused"
            ));
        }
        match unpacking.entry(&raw, kind.is_dir(), is_link)? {
            Some(path) => unpacking.read(path, entry)?,
            None => unpacking.skip(entry)?,
        }
    }
    Ok(unpacking.files)
}

fn zip(body: Vec<u8>) -> Result<Entries, String> {
    let mut archive =
        zip::ZipArchive::new(Cursor::new(body)).map_err(|e| format!("not a readable .zip: {e}"))?;
    if archive.len() > MAX_ENTRIES {
        return Err(format!(
            "the archive has {} entries, more than {MAX_ENTRIES}; refused",
            archive.len()
        ));
    }
    let mut unpacking = Unpacking::default();
    for i in 0..archive.len() {
        let file = archive
            .by_index(i)
            .map_err(|e| format!("not a readable .zip: {e}"))?;
        let raw = String::from_utf8(file.name_raw().to_vec())
            .map_err(|_| "an entry's path is not UTF-8".to_owned())?;
        // Declared sizes are only a first look: what is read is counted too.
        if file.size() > MAX_UNPACKED_BYTES.saturating_sub(unpacking.unpacked) {
            return Err(bomb());
        }
        match unpacking.entry(&raw, file.is_dir(), file.is_symlink())? {
            Some(path) => unpacking.read(path, file)?,
            None => unpacking.skip(file)?,
        }
    }
    Ok(unpacking.files)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const NAME: &str = "https://defs.example/shop.tar.gz";

    fn tar_gz_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::default(),
        ));
        for (path, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            // Written raw: `append_data` itself refuses `..`.
            header.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (path, data) in entries {
            writer.start_file(*path, options).unwrap();
            writer.write_all(data).unwrap();
        }
        writer.finish().unwrap().into_inner()
    }

    fn paths(scan: &Scan) -> Vec<String> {
        scan.sources.iter().map(|s| s.file.clone()).collect()
    }

    #[test]
    fn an_archive_gives_its_yaml_files_as_a_folder_does() {
        let big = vec![b'#'; MAX_FILE_BYTES as usize + 1];
        let entries: &[(&str, &[u8])] = &[
            ("./shop/orders.yaml", b"a: 1\n"),
            ("shop/carts.yml", b"b: 2\n"),
            ("shop/.hidden.yaml", b"no"),
            (".git/x.yaml", b"no"),
            ("README.md", b"no"),
            ("latin1.yaml", &[b'a', 0xe9]),
            ("big.yaml", &big),
        ];
        for body in [tar_gz_of(entries), zip_of(entries)] {
            let scan = scan(NAME, body).unwrap();
            assert_eq!(
                paths(&scan),
                [
                    format!("{NAME}!/big.yaml"),
                    format!("{NAME}!/latin1.yaml"),
                    format!("{NAME}!/shop/carts.yml"),
                    format!("{NAME}!/shop/orders.yaml"),
                ]
            );
            let problem = |i: usize| scan.sources[i].text.as_ref().unwrap_err().message.clone();
            assert!(problem(0).contains("at most"), "{}", problem(0));
            assert!(problem(1).contains("UTF-8"), "{}", problem(1));
            assert_eq!(scan.sources[3].text.as_deref().unwrap(), "a: 1\n");
            assert_eq!(scan.folders, [format!("{NAME}!")]);
        }
    }

    #[test]
    fn paths_leaving_the_archive_and_links_are_refused_naming_the_entry() {
        for bad in ["../escape.yaml", "shop/../../escape.yaml", "/etc/x.yaml"] {
            for body in [tar_gz_of(&[(bad, b"a: 1\n")]), zip_of(&[(bad, b"a: 1\n")])] {
                let e = scan(NAME, body).unwrap_err().to_string();
                assert!(e.contains(bad) && e.contains("refused"), "{bad}: {e}");
            }
        }
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::default(),
        ));
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        builder
            .append_link(&mut header, "shop/orders.yaml", "/etc/passwd")
            .unwrap();
        let body = builder.into_inner().unwrap().finish().unwrap();
        let e = scan(NAME, body).unwrap_err().to_string();
        assert!(e.contains("shop/orders.yaml: a link"), "{e}");
    }

    #[test]
    fn a_zip_bomb_is_refused_as_it_unpacks() {
        // 80 MiB of zeros deflate to a few dozen KiB.
        let zeros = vec![0u8; 80 * 1024 * 1024];
        for body in [
            zip_of(&[("bomb.txt", &zeros)]),
            tar_gz_of(&[("bomb.yaml", &zeros)]),
        ] {
            assert!(body.len() < 1024 * 1024, "{}", body.len());
            let e = scan(NAME, body).unwrap_err().to_string();
            assert!(e.contains("unpacks to more than"), "{e}");
        }
    }

    proptest::proptest! {
        /// Whatever a server sends, reading it answers (documents or a refusal), never
        /// panics; an archive's documents are all under the source.
        #[test]
        fn any_body_is_read_or_refused(
            magic in proptest::sample::select(vec![&b""[..], &[0x1f, 0x8b][..], &b"PK\x03\x04"[..]]),
            rest in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
        ) {
            let body = [magic, &rest[..]].concat();
            if let Ok(scan) = scan(NAME, body) {
                proptest::prop_assert!(scan.sources.iter().all(|s| s.file.starts_with(NAME)));
            }
        }

        /// Whatever an entry is called, a path kept is inside the archive: relative, without
        /// `..` or `.`, and named under the source.
        #[test]
        fn every_kept_path_is_inside_the_archive(
            parts in proptest::collection::vec("(\\.\\.|\\.|[a-z]{1,3}|/)", 1..6),
        ) {
            let raw = format!("{}.yaml", parts.concat());
            if let Ok(path) = inside(&raw) {
                proptest::prop_assert!(!path.starts_with('/'));
                proptest::prop_assert!(path.split('/').all(|c| !c.is_empty() && c != ".." && c != "."));
            }
        }
    }
}
