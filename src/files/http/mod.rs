//! Datasource definitions from an HTTP source: `dsreg sync --from URL` and `serve --sync-url
//! URL`. The source is another way to find documents for the files pipeline: what it fetches
//! becomes a [`Scan`](super::scan::Scan) and goes through the same checks, plan, conflict
//! policies, pruning and apply as a folder (`Syncer::run_scan`).
//!
//! - [`fetch`]: the request (the process's HTTP client, or one trusting a CA file; a bearer
//!   token from a file or an environment variable; conditional on the last `ETag` /
//!   `Last-Modified`; a timeout; a size bound);
//! - [`bundle`]: what the body holds, as documents: one YAML document or several;
//! - [`poll`]: polling on an interval with jitter, retrying a failure with backoff;
//! - [`health`]: each source's state for `/metrics` and `/readyz`.
//!
//! A source is named by its URL without query or fragment (`https://host/path`): that name
//! is what the database records for its datasources (pruning is scoped to it) and its actor
//! (`http:https://host/path`). A URL with credentials in it is refused: a token goes in a
//! file or an environment variable, and the query, which may carry one, is never logged,
//! recorded or shown.

pub mod bundle;
pub mod fetch;
pub mod health;
pub mod poll;

use std::path::PathBuf;
use std::time::Duration;

pub use fetch::{Fetched, Fetcher, Validators};
pub use health::SourceHealth;
pub use poll::Poller;

use super::ConflictPolicy;

/// Where the bearer token comes from (read before each request, so a rotated token is used
/// at the next poll).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// A file holding the token (surrounding whitespace ignored).
    File(PathBuf),
    /// An environment variable holding the token.
    Env(String),
}

/// One HTTP source and how it is fetched and synced.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The URL as given (its query may hold a secret: never shown; see [`Source::name`]).
    pub source: Source,
    /// Time between polls (spread a fifth either way).
    pub poll_interval: Duration,
    /// The longest one request may take, connection and body included.
    pub timeout: Duration,
    /// The largest body accepted.
    pub max_bytes: u64,
    /// The bearer token, if the source wants one.
    pub token: Option<Token>,
    /// A PEM file of the CA certificates to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// What to do with conflicts.
    pub conflict: ConflictPolicy,
    /// Archive datasources this source synced that it no longer defines.
    pub prune: bool,
}

/// A checked source URL: http or https, no credentials, no fragment.
#[derive(Clone, PartialEq, Eq)]
pub struct Source {
    url: reqwest::Url,
    name: String,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The query may hold a secret: only the name is shown.
        f.debug_tuple("Source").field(&self.name).finish()
    }
}

impl Source {
    /// Checks `url`.
    ///
    /// # Errors
    /// [`SourceError::Url`] naming what is wrong (never echoing the URL, which may hold a
    /// secret).
    pub fn parse(url: &str) -> Result<Self, SourceError> {
        let url =
            reqwest::Url::parse(url).map_err(|e| SourceError::Url(format!("not a URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SourceError::Url(format!(
                "the scheme is {:?}; only http and https are fetched",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(SourceError::Url(
                "the URL has credentials in it; give a bearer token with --sync-token-file or \
                 --sync-token-env instead"
                    .into(),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(SourceError::Url("the URL has no host".into()));
        }
        let mut bare = url.clone();
        bare.set_query(None);
        bare.set_fragment(None);
        Ok(Self {
            name: bare.to_string(),
            url,
        })
    }

    /// The URL to request (with its query).
    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// The source's name: its URL without query or fragment, as recorded and shown.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Why an HTTP source could not be read. Messages name the source by its name, never the
/// query or the token.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The URL is not one that can be fetched.
    #[error("the sync URL: {0}")]
    Url(String),
    /// The request failed (connection, TLS, timeout, body).
    #[error("fetching {source_name}: {reason}")]
    Fetch {
        /// The source.
        source_name: String,
        /// What failed.
        reason: String,
    },
    /// The server answered with a status other than 200 or 304.
    #[error("fetching {source_name}: the server answered {status}")]
    Status {
        /// The source.
        source_name: String,
        /// The status.
        status: u16,
    },
    /// The body is over the size bound.
    #[error("fetching {source_name}: the body is over {limit} bytes (--sync-max-bytes)")]
    TooLarge {
        /// The source.
        source_name: String,
        /// The bound.
        limit: u64,
    },
    /// The bearer token or the CA file could not be read.
    #[error("{0}")]
    Setup(String),
    /// The body is not a bundle that can be read.
    #[error("{source_name}: {reason}")]
    Bundle {
        /// The source.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
}

impl SourceError {
    /// Whether the same request may succeed later with nothing changed here: the connection
    /// failed or timed out, or the server answered a status that says "later" (5xx, 408,
    /// 429). A refused URL, token or CA file, a body over the bound or a refused archive
    /// needs a change first (a poller still retries them, with backoff).
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Fetch { .. } => true,
            SourceError::Status { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            SourceError::Url(_)
            | SourceError::TooLarge { .. }
            | SourceError::Setup(_)
            | SourceError::Bundle { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_the_server_may_get_over_is_retryable_and_one_needing_a_change_is_not() {
        let status = |status| SourceError::Status {
            source_name: "https://a.example/x.yaml".into(),
            status,
        };
        assert!(status(503).is_retryable());
        assert!(status(429).is_retryable());
        assert!(!status(401).is_retryable());
        assert!(!status(404).is_retryable());
        let too_large = SourceError::TooLarge {
            source_name: "https://a.example/x.yaml".into(),
            limit: 1,
        };
        assert!(!too_large.is_retryable());
        assert!(crate::files::Error::Http(status(502)).is_retryable());
    }

    #[test]
    fn a_source_is_named_without_its_query_and_refused_with_credentials() {
        let s = Source::parse("https://config.example/teams/a.yaml?token=s3cret#frag").unwrap();
        assert_eq!(s.name(), "https://config.example/teams/a.yaml");
        assert!(s.url().as_str().contains("token=s3cret"));
        assert!(!format!("{s:?}").contains("s3cret"));

        for bad in [
            "https://user:s3cret@config.example/a.yaml",
            "https://s3cret@config.example/a.yaml",
        ] {
            let e = Source::parse(bad).unwrap_err().to_string();
            assert!(e.contains("credentials"), "{e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
        let e = Source::parse("file:///etc/passwd").unwrap_err().to_string();
        assert!(e.contains("http"), "{e}");
        assert!(Source::parse("not a url").is_err());
    }
}
