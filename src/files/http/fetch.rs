//! One request to an HTTP source: conditional on what the last applied body carried
//! (`If-None-Match` / `If-Modified-Since`), with the bearer token read afresh, bounded in
//! time and size. A 304 is [`Fetched::NotModified`]: nothing to do.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED};

use super::{Source, SourceConfig, SourceError, Token};

/// What a body was served with, to ask next time whether it changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    /// The `ETag`.
    pub etag: Option<String>,
    /// The `Last-Modified` date.
    pub last_modified: Option<String>,
}

/// What a request brought.
#[derive(Debug)]
pub enum Fetched {
    /// The body did not change since the one last applied (a 304).
    NotModified,
    /// A body, with its validators (to keep once it is applied).
    Body {
        /// The bytes.
        bytes: Vec<u8>,
        /// The validators it came with.
        validators: Validators,
    },
}

/// Fetches one source.
pub struct Fetcher {
    source: Source,
    client: reqwest::Client,
    timeout: Duration,
    max_bytes: u64,
    token: Option<Token>,
    last: Validators,
}

impl Fetcher {
    /// A fetcher for `config`: the process's HTTP client, or one trusting only the CA file's
    /// certificates.
    ///
    /// # Errors
    /// [`SourceError::Setup`] when the CA file cannot be read or the TLS stack set up.
    pub fn new(config: &SourceConfig) -> Result<Self, SourceError> {
        let client = match &config.ca_file {
            None => crate::connectors::http::client(),
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    SourceError::Setup(format!("reading the CA file {}: {e}", path.display()))
                })?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    SourceError::Setup(format!(
                        "the CA file {}: no PEM certificates ({e})",
                        path.display()
                    ))
                })?;
                if certs.is_empty() {
                    return Err(SourceError::Setup(format!(
                        "the CA file {}: no PEM certificates",
                        path.display()
                    )));
                }
                crate::connectors::http::client_trusting(certs)
            }
        }
        .map_err(|e| SourceError::Setup(e.to_string()))?;
        Ok(Self {
            source: config.source.clone(),
            client,
            timeout: config.timeout,
            max_bytes: config.max_bytes,
            token: config.token.clone(),
            last: Validators::default(),
        })
    }

    /// The source.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Remembers the validators of the body just applied: the next request asks whether it
    /// changed. (A body that was not applied is asked for again whole.)
    pub fn applied(&mut self, validators: Validators) {
        self.last = validators;
    }

    /// One request.
    ///
    /// # Errors
    /// The token cannot be read, the request fails or times out, the status is neither 200
    /// nor 304, or the body is over the size bound.
    pub async fn fetch(&self) -> Result<Fetched, SourceError> {
        let name = self.source.name();
        let failed = |e: reqwest::Error| SourceError::Fetch {
            source_name: name.to_owned(),
            // Without the URL: its query may hold a secret.
            reason: describe(&e.without_url()),
        };
        let mut request = self
            .client
            .get(self.source.url().clone())
            .timeout(self.timeout);
        if let Some(token) = &self.token {
            request = request.bearer_auth(read_token(token)?);
        }
        if let Some(etag) = &self.last.etag {
            request = request.header(IF_NONE_MATCH, etag);
        }
        if let Some(date) = &self.last.last_modified {
            request = request.header(IF_MODIFIED_SINCE, date);
        }
        let mut response = request.send().await.map_err(failed)?;
        match response.status() {
            StatusCode::NOT_MODIFIED if self.last != Validators::default() => {
                return Ok(Fetched::NotModified);
            }
            StatusCode::OK => {}
            status => {
                return Err(SourceError::Status {
                    source_name: name.to_owned(),
                    status: status.as_u16(),
                });
            }
        }
        let too_large = || SourceError::TooLarge {
            source_name: name.to_owned(),
            limit: self.max_bytes,
        };
        if response
            .content_length()
            .is_some_and(|n| n > self.max_bytes)
        {
            return Err(too_large());
        }
        let header = |h| {
            response
                .headers()
                .get(h)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let validators = Validators {
            etag: header(ETAG),
            last_modified: header(LAST_MODIFIED),
        };
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if (bytes.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Fetched::Body { bytes, validators })
    }
}

/// The token, read now.
fn read_token(token: &Token) -> Result<String, SourceError> {
    let value = match token {
        Token::File(path) => std::fs::read_to_string(path).map_err(|e| {
            SourceError::Setup(format!("reading the token file {}: {e}", path.display()))
        })?,
        Token::Env(var) => std::env::var(var).map_err(|_| {
            SourceError::Setup(format!(
                "the token variable {var} is not set (or not UTF-8)"
            ))
        })?,
    };
    let value = value.trim();
    if value.is_empty() {
        let from = match token {
            Token::File(path) => format!("the token file {}", path.display()),
            Token::Env(var) => format!("the token variable {var}"),
        };
        return Err(SourceError::Setup(format!("{from} is empty")));
    }
    Ok(value.to_owned())
}

/// An error with its causes (a TLS refusal is only said in the cause).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
