//! What an HTTP source's body holds, as the documents of a [`Scan`]: one YAML text (a single
//! datasource or a multi-document bundle), named by the source. Pruning is scoped to the
//! source: the datasources it synced, under its name.

use std::path::PathBuf;

use super::SourceError;
use crate::files::Problem;
use crate::files::scan::{Scan, Source};

/// The documents of `body`, fetched from the source named `name`.
///
/// # Errors
/// [`SourceError::Bundle`] when the body cannot be read as a bundle at all.
pub fn scan(name: &str, body: Vec<u8>) -> Result<Scan, SourceError> {
    let shown = PathBuf::from(name);
    let text = String::from_utf8(body)
        .map_err(|_| Problem::new(&shown, 0, None, "the document is not UTF-8 text"));
    Ok(Scan {
        sources: vec![Source {
            shown,
            file: name.to_owned(),
            text,
        }],
        folders: vec![entries_root(name)],
        files: vec![name.to_owned()],
    })
}

/// Where the files of an archive served at `name` are recorded: `name!/path/in/archive`.
pub fn entries_root(name: &str) -> String {
    format!("{name}!")
}
