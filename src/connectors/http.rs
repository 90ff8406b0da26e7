//! The process's one HTTP stack: a `reqwest::Client` (rustls with the ring provider, the
//! system's root certificates) built once and cloned by every HTTP caller — the `http_poll`
//! kind, the harness's sample fetch, the `http` sink and the Vault key provider. A clone
//! shares the connection pool and the TLS configuration; each caller puts its own timeout on
//! each request ([`reqwest::RequestBuilder::timeout`]).
//!
//! Building the client reads and parses the system's root store (file I/O and PEM decoding:
//! milliseconds of blocking work). [`prepare`] does it once at start-up on a blocking thread,
//! so no worker start pays for it on the runtime; [`client`] before [`prepare`] builds it
//! inline, once. A machine without usable root certificates still starts: every HTTP caller
//! then fails with the reason, and nothing else is affected.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::Error;

/// The longest a connection may take to open, whatever the request's own timeout (which
/// bounds the whole request, the connection included).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle connections the client keeps per host, for reuse. Beyond these, a connection is
/// closed once its request is done: thousands of pollers of one host starting together open as
/// many connections at once, and keeping them all would hold about 10 KiB each for nothing
/// (measured: 10,000 idle `http_poll` workers of one host, 280 → 378 MB resident once their
/// first requests went out together).
const IDLE_PER_HOST: usize = 32;

/// The client, or why it could not be built (a message: the error is not `Clone`).
static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();

/// How many clients this process has built.
static BUILT: AtomicUsize = AtomicUsize::new(0);

fn build() -> Result<reqwest::Client, String> {
    BUILT.fetch_add(1, Ordering::Relaxed);
    // Installing twice is refused and harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_max_idle_per_host(IDLE_PER_HOST)
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))
}

/// Builds the shared client on a blocking thread, if it is not built yet; a failure is logged
/// here and returned by every later [`client`] call.
pub async fn prepare() {
    let built = tokio::task::spawn_blocking(|| CLIENT.get_or_init(build).is_ok()).await;
    match built {
        Ok(true) => {}
        Ok(false) => {
            if let Some(Err(reason)) = CLIENT.get() {
                tracing::warn!(reason, "HTTP connectors and sinks will fail");
            }
        }
        Err(e) => tracing::warn!(error = %e, "building the HTTP client did not finish"),
    }
}

/// The shared client (a clone of it).
///
/// # Errors
/// [`Error::Source`] when the TLS stack could not be set up (no usable root certificates).
pub fn client() -> Result<reqwest::Client, Error> {
    match CLIENT.get_or_init(build) {
        Ok(client) => Ok(client.clone()),
        Err(reason) => Err(Error::Source(reason.clone())),
    }
}

/// A client like the shared one that trusts only the certificates `roots` (a private CA), not
/// the system's: for the rare caller configured with its own CA file. Not shared and not
/// counted among the process's clients: the caller keeps it.
///
/// # Errors
/// [`Error::Source`] when the TLS stack cannot be set up.
pub fn client_trusting(roots: Vec<reqwest::Certificate>) -> Result<reqwest::Client, Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_max_idle_per_host(IDLE_PER_HOST)
        .tls_certs_only(roots)
        .build()
        .map_err(|e| Error::Source(format!("building the HTTP client: {e}")))
}

/// How many HTTP clients this process has built: one once any HTTP caller ran, whatever the
/// number of callers and their timeouts.
pub fn clients_built() -> usize {
    BUILT.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_caller_gets_the_one_client() {
        for _ in 0..8 {
            client().expect("the client builds");
        }
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| client().expect("the client builds"));
            }
        });
        assert_eq!(clients_built(), 1);
    }
}
