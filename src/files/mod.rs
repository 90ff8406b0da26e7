//! Datasources kept in YAML files: `dsreg import`, `dsreg sync --watch` (and
//! `serve --sync-dir`), `dsreg export`. The database stays the one source of truth; files are
//! a way to write to it. A changed definition becomes a new published version through the
//! same repositories and checks as an API publish, and the outbox triggers reload the workers.
//!
//! - [`format`]: the file format, read into checked [`Definition`](format::Definition)s
//!   (every problem with its file and line) and written back by export;
//! - [`yaml`]: YAML as JSON with line numbers, and the writer;
//! - [`scan`]: finding and reading the files (size limit, UTF-8);
//! - [`plan`]: comparing files with the database (create / new version / unchanged / archive,
//!   conflicts);
//! - [`apply`]: writing a plan in one transaction, with audit rows, sync records and
//!   `sync_conflict` events;
//! - [`sync`]: one pass from files to database, for import and for the watcher;
//! - [`watch`]: the folder watcher (debounced, rescanning on an interval), stopped by its
//!   cancellation token;
//! - [`export`]: the published configs as files;
//! - [`http`]: an HTTP source of the same documents (`dsreg sync --from URL`,
//!   `serve --sync-url`), polled into the same pipeline.
//!
//! Owns the `datasource_file_sync` rows through its repository; secret values never pass
//! through here (files name secrets, values go in with `dsreg secret put`).

pub mod apply;
pub mod export;
pub mod format;
pub mod http;
pub mod plan;
pub mod scan;
pub mod sync;
pub mod watch;
pub mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};

pub use format::{Definition, Key};
pub use plan::{Action, Plan, Step};
pub use sync::{Mode, Options, Report, Syncer};
pub use watch::{WatchConfig, Watcher};

/// A problem in a datasource file (or with what it asks of the database), at a line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The file, as found.
    pub path: PathBuf,
    /// The 1-based line (0 when the whole file is at fault).
    pub line: usize,
    /// The datasource concerned (`org/project/name`), when known.
    pub datasource: Option<String>,
    /// What is wrong (starting with the field, when one is at fault).
    pub message: String,
}

impl Problem {
    /// A problem of `path` at `line`.
    pub fn new(
        path: &Path,
        line: usize,
        datasource: Option<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            path: path.to_owned(),
            line,
            datasource,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(ds) = &self.datasource {
            write!(f, ": {ds}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// What to do with a datasource changed both in its file and in the database since the
/// file's last sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConflictPolicy {
    /// The file is applied over the database's change.
    FileWins,
    /// The database's change stands; the file's change is not applied.
    DbWins,
    /// Nothing is applied (an import fails; a watcher skips that datasource).
    Fail,
}

impl ConflictPolicy {
    /// The policy as its flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::FileWins => "file-wins",
            ConflictPolicy::DbWins => "db-wins",
            ConflictPolicy::Fail => "fail",
        }
    }
}

/// Why a sync from files did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The files (or what they ask of the database) have problems; nothing was applied.
    #[error("{} problem(s); nothing was applied", .0.len())]
    Problems(Vec<Problem>),
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The folder cannot be watched.
    #[error("watching {}: {reason}", path.display())]
    Watch {
        /// The folder.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Export would overwrite files that differ; nothing was written.
    #[error("{} file(s) exist with other contents (first: {}); nothing was written; use --force to overwrite", .0.len(), .0.first().map(|p| p.display().to_string()).unwrap_or_default())]
    WouldOverwrite(Vec<PathBuf>),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] crate::db::Error),
    /// An HTTP source could not be fetched or read; nothing was applied.
    #[error(transparent)]
    Http(#[from] http::SourceError),
}

impl Error {
    /// Whether the same sync may succeed if retried (the database was unreachable or a
    /// concurrent writer won, an HTTP source did not answer or asked to come back later).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Db(e) => e.is_retryable(),
            Error::Http(e) => e.is_retryable(),
            _ => false,
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}
