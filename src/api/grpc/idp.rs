//! Fetching a JWKS document from an identity provider over HTTPS: from a URL given as such, or
//! from the `jwks_uri` of an OpenID Connect issuer's discovery document. What the document's
//! keys mean is [`super::auth`]'s business; this module answers its bytes and how long they
//! may be kept.
//!
//! Only `https://` is used (a redirect to plaintext is refused): keys fetched over plaintext
//! could be forged by anyone on the path. Answers are at most [`MAX_DOCUMENT_BYTES`].

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

/// The largest discovery document or JWKS accepted.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// The path of an OpenID Connect issuer's discovery document.
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Why a key set could not be fetched. Messages name the URL and what went wrong, never a
/// body.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request got no answer: DNS, connection, TLS (an untrusted certificate), timeout.
    #[error("{url}: {reason}")]
    Transport {
        /// What was asked.
        url: Url,
        /// The client's error and its causes.
        reason: String,
    },
    /// The server answered with a status other than 2xx.
    #[error("{url}: the server answered {status}")]
    Status {
        /// What was asked.
        url: Url,
        /// Its answer.
        status: reqwest::StatusCode,
    },
    /// A redirect led to a URL that is not `https://`.
    #[error("{url}: redirected to a URL that is not https")]
    Downgraded {
        /// What was asked.
        url: Url,
    },
    /// The answer is larger than [`MAX_DOCUMENT_BYTES`].
    #[error("{url}: the answer is larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge {
        /// What was asked.
        url: Url,
    },
    /// The discovery document does not parse, names another issuer or an unusable `jwks_uri`.
    #[error("{url}: {reason}")]
    Discovery {
        /// The document's URL.
        url: Url,
        /// What is wrong with it.
        reason: String,
    },
}

/// A fetched document.
#[derive(Debug)]
pub struct Fetched {
    /// The URL it came from.
    pub url: Url,
    /// Its bytes.
    pub body: Vec<u8>,
    /// Its `Cache-Control` lifetime ([`cache_lifetime`]), when it has one.
    pub max_age: Option<Duration>,
}

/// Where an identity provider serves its keys.
pub struct Provider {
    client: reqwest::Client,
    target: Target,
    /// The discovery document's `jwks_uri`, until a fetch from it fails.
    discovered: Mutex<Option<Url>>,
}

/// The URL given: the JWKS itself, or an issuer's discovery document.
enum Target {
    Jwks(Url),
    Discovery {
        document: Url,
        /// The `issuer` the document must name.
        issuer: String,
    },
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Jwks(url) | Target::Discovery { document: url, .. } => write!(f, "{url}"),
        }
    }
}

impl Provider {
    /// The JWKS at `url`, fetched with `client`.
    ///
    /// # Errors
    /// What is wrong with `url` ([`https_url`]).
    pub fn jwks_url(client: reqwest::Client, url: &str) -> Result<Self, String> {
        Ok(Self::new(client, Target::Jwks(https_url(url)?)))
    }

    /// The JWKS of the OpenID Connect `issuer`, fetched with `client`.
    ///
    /// # Errors
    /// What is wrong with `issuer` ([`discovery_url`]).
    pub fn oidc_issuer(client: reqwest::Client, issuer: &str) -> Result<Self, String> {
        let target = Target::Discovery {
            document: discovery_url(issuer)?,
            issuer: issuer.trim().to_owned(),
        };
        Ok(Self::new(client, target))
    }

    fn new(client: reqwest::Client, target: Target) -> Self {
        Self {
            client,
            target,
            discovered: Mutex::new(None),
        }
    }

    /// Fetches the JWKS document, after the discovery document for an issuer whose
    /// `jwks_uri` is not known yet (or whose last JWKS fetch failed: the provider may have
    /// moved its keys).
    ///
    /// # Errors
    /// [`FetchError`] saying which request failed and how.
    ///
    /// # Cancel safety
    /// Cancel safe: nothing is kept half-done.
    pub async fn fetch(&self) -> Result<Fetched, FetchError> {
        let url = self.keys_url().await?;
        let fetched = get(&self.client, &url).await;
        if fetched.is_err() {
            *self
                .discovered
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
        }
        fetched
    }

    /// The JWKS URL: the one given, or the issuer's `jwks_uri`.
    async fn keys_url(&self) -> Result<Url, FetchError> {
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let (document, issuer) = match &self.target {
            Target::Jwks(url) => return Ok(url.clone()),
            Target::Discovery { document, issuer } => (document, issuer),
        };
        // The slot holds a whole URL or nothing: a poisoned lock is still consistent.
        if let Some(url) = self
            .discovered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Ok(url);
        }
        let fetched = get(&self.client, document).await?;
        let invalid = |reason: String| FetchError::Discovery {
            url: document.clone(),
            reason,
        };
        let discovery: Discovery = serde_json::from_slice(&fetched.body).map_err(|e| {
            invalid(format!(
                "not an OpenID Connect discovery document with issuer and jwks_uri: {:?} error \
                 at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        if discovery.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
            return Err(invalid(format!(
                "names the issuer {:?}, not {issuer:?}",
                discovery.issuer
            )));
        }
        let url = https_url(&discovery.jwks_uri)
            .map_err(|reason| invalid(format!("its jwks_uri {reason}")))?;
        *self
            .discovered
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(url.clone());
        Ok(url)
    }
}

/// GETs `url`: a 2xx answer over HTTPS, at most [`MAX_DOCUMENT_BYTES`].
async fn get(client: &reqwest::Client, url: &Url) -> Result<Fetched, FetchError> {
    use reqwest::header::{ACCEPT, CACHE_CONTROL};
    let transport = |e: reqwest::Error| FetchError::Transport {
        url: url.clone(),
        reason: error_chain(&e.without_url()),
    };
    let mut response = client
        .get(url.clone())
        .timeout(super::auth::JWKS_READ_TIMEOUT)
        .header(ACCEPT, "application/json")
        .send()
        .await
        .map_err(transport)?;
    if response.url().scheme() != "https" {
        return Err(FetchError::Downgraded { url: url.clone() });
    }
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status {
            url: url.clone(),
            status,
        });
    }
    let max_age = response
        .headers()
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(cache_lifetime);
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(FetchError::TooLarge { url: url.clone() });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Fetched {
        url: url.clone(),
        body,
        max_age,
    })
}

/// How long a `Cache-Control` value lets an answer be kept: its first `max-age`, or zero when
/// it says `no-cache` or `no-store`; `None` when it says neither.
pub fn cache_lifetime(value: &str) -> Option<Duration> {
    let mut max_age = None;
    for directive in value.split(',').map(str::trim) {
        let (name, argument) = directive
            .split_once('=')
            .map_or((directive, None), |(n, a)| (n.trim(), Some(a.trim())));
        if name.eq_ignore_ascii_case("no-cache") || name.eq_ignore_ascii_case("no-store") {
            return Some(Duration::ZERO);
        }
        if name.eq_ignore_ascii_case("max-age")
            && let Some(seconds) = argument.and_then(|a| a.trim_matches('"').parse::<u64>().ok())
        {
            max_age.get_or_insert(Duration::from_secs(seconds));
        }
    }
    max_age
}

/// An `https://` URL with a host and without credentials.
///
/// # Errors
/// What is wrong, to follow the value's name.
pub fn https_url(value: &str) -> Result<Url, String> {
    let url = Url::parse(value.trim()).map_err(|e| format!("is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err(
            "must be an https:// URL: keys fetched over plaintext could be forged".to_owned(),
        );
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".to_owned());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".to_owned());
    }
    Ok(url)
}

/// The discovery document of the OpenID Connect `issuer`.
///
/// # Errors
/// What is wrong with `issuer`, to follow its name.
pub fn discovery_url(issuer: &str) -> Result<Url, String> {
    let base = https_url(issuer)?;
    if base.query().is_some() || base.fragment().is_some() {
        return Err("an issuer has no query or fragment".to_owned());
    }
    https_url(&format!(
        "{}{DISCOVERY_PATH}",
        base.as_str().trim_end_matches('/')
    ))
}

/// An error and its causes, `: `-separated, each said once.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_with_a_host_and_no_credentials() {
        assert_eq!(
            discovery_url("https://idp.example/realms/x/")
                .unwrap()
                .as_str(),
            "https://idp.example/realms/x/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://idp.example").unwrap().as_str(),
            "https://idp.example/.well-known/openid-configuration"
        );
        for (value, needle) in [
            ("http://idp.example/keys", "must be an https:// URL"),
            ("https://u:p@idp.example/keys", "must not carry credentials"),
            ("idp.example", "is not a URL"),
        ] {
            let err = https_url(value).unwrap_err();
            assert!(err.contains(needle), "{value}: {err}");
            assert!(!err.contains("u:p"), "{err}");
        }
        let err = discovery_url("https://idp.example/?tenant=1").unwrap_err();
        assert!(err.contains("no query"), "{err}");
    }

    #[test]
    fn cache_control_gives_max_age_or_zero_for_no_cache() {
        let cases: [(&str, Option<u64>); 9] = [
            ("max-age=300", Some(300)),
            ("public, max-age=60, must-revalidate", Some(60)),
            ("Max-Age = \"15\"", Some(15)),
            ("max-age=10, max-age=20", Some(10)),
            ("no-cache", Some(0)),
            ("max-age=600, no-store", Some(0)),
            ("public", None),
            ("max-age=soon", None),
            ("", None),
        ];
        for (value, expected) in cases {
            assert_eq!(
                cache_lifetime(value),
                expected.map(Duration::from_secs),
                "{value:?}"
            );
        }
    }

    proptest::proptest! {
        /// Whatever other directives surround it, `max-age=N` gives N (unless an earlier
        /// max-age or a no-cache says otherwise); and no value makes the parser fail.
        #[test]
        fn max_age_is_found_among_any_directives(
            before in proptest::collection::vec("[a-z-]{1,12}(=[a-z0-9]{1,6})?", 0..4),
            after in proptest::collection::vec("[a-z-]{1,12}(=[a-z0-9]{1,6})?", 0..4),
            seconds in 0u64..10_000_000,
            junk in "\\PC{0,64}",
        ) {
            let _ = cache_lifetime(&junk);
            let name = |d: &String| d.split('=').next().unwrap_or_default().to_owned();
            let no_cache = before
                .iter()
                .chain(&after)
                .any(|d| ["no-cache", "no-store"].contains(&name(d).as_str()));
            let earlier_age = before.iter().any(|d| name(d) == "max-age" && d.contains('='));
            let value = before
                .iter()
                .cloned()
                .chain(std::iter::once(format!("max-age={seconds}")))
                .chain(after.iter().cloned())
                .collect::<Vec<_>>()
                .join(", ");
            let found = cache_lifetime(&value);
            if no_cache {
                proptest::prop_assert_eq!(found, Some(Duration::ZERO));
            } else if !earlier_age {
                proptest::prop_assert_eq!(found, Some(Duration::from_secs(seconds)));
            }
        }
    }
}
