//! TLS on the service's own ports (gRPC and HTTP): a certificate chain and key, and optionally
//! a client CA for mutual TLS (a client without a certificate signed by it is refused at the
//! handshake). Plaintext remains when no certificate is configured.
//!
//! Rotation without a restart: before each handshake the files are checked (one `stat` each,
//! on a blocking thread, never on the async runtime); when one changed (modification time,
//! size or inode: a rewrite or a symlink swap, as Kubernetes does it), the configuration is
//! rebuilt from the files and the next handshake uses it. A set of files that does not load
//! (a half-written rotation, a key that does not match its certificate) keeps the previous
//! configuration serving, is logged once, and is tried again when the files change again.
//!
//! Handshakes run concurrently (at most [`MAX_HANDSHAKES`] at once, each within
//! [`HANDSHAKE_TIMEOUT`]) beside the accept loop, so a slow or silent client never holds up
//! others; established connections are handed to the server through [`TlsIncoming`], which is
//! both a `tonic` incoming stream and an `axum` listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Handshakes in progress at once on one port; further connections wait to be accepted.
pub const MAX_HANDSHAKES: usize = 256;

/// How long a client has to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Refused and timed-out handshakes are logged (with the peer and rustls's reason: an unknown
/// CA, no client certificate) at this many lines a second at most: anyone can cause them.
static REFUSALS: crate::telemetry::throttle::Throttle =
    crate::telemetry::throttle::Throttle::new(5);

/// Established connections waiting for the server to take them.
const BACKLOG: usize = 64;

/// ALPN protocol of HTTP/2 (the gRPC port).
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN protocol of HTTP/1.1 (the HTTP port).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Certificate material that cannot be loaded. Messages name the option and the file, never
/// what the file holds.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or holds nothing usable.
    #[error("{option} {path}: {reason}")]
    File {
        /// The option that named the file (`--grpc-tls-cert`, ...).
        option: String,
        /// The file.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The files load but do not make a configuration (a key that does not match its
    /// certificate, say).
    #[error("{0}")]
    Config(String),
}

/// The files of one port's TLS, and the option names to report them by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The option prefix, `--grpc-tls` or `--http-tls`.
    pub option: &'static str,
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) client certificates must be signed by; mutual TLS when set.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    fn error(&self, which: &str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
        TlsError::File {
            option: format!("{}-{which}", self.option),
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    /// Reads the files and builds the configuration (blocking I/O).
    fn build(&self, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(self.certs("client-ca", path)?);
                if added == 0 {
                    return Err(self.error("client-ca", path, "no usable CA certificate"));
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| self.error("client-ca", path, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let chain = self.certs("cert", &self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| {
            self.error(
                "key",
                &self.key,
                reason_of(&e, "no private key in the file"),
            )
        })?;
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            TlsError::Config(format!(
                "{}-cert {} with {}-key {}: {e}",
                self.option,
                self.cert.display(),
                self.option,
                self.key.display()
            ))
        })?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    fn certs(&self, which: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.error(which, path, reason_of(&e, "not PEM")))?;
        if certs.is_empty() {
            return Err(self.error(which, path, "no certificate in the file"));
        }
        Ok(certs)
    }

    /// What identifies the files' current contents: modification time, size and inode of
    /// each (following symlinks); `None` for a file that cannot be read.
    fn stamp(&self) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        self.paths()
            .map(|path| {
                std::fs::metadata(path)
                    .ok()
                    .map(|m| (m.modified().ok(), m.len(), m.ino()))
            })
            .collect()
    }
}

/// A PEM error's reason, in words that never quote the file (a key file's lines are
/// secret); a missing section reads as `missing`.
fn reason_of(error: &rustls::pki_types::pem::Error, missing: &str) -> String {
    use rustls::pki_types::pem::Error;
    match error {
        Error::NoItemsFound => missing.to_owned(),
        Error::Io(e) => e.to_string(),
        Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_owned(),
        Error::IllegalSectionStart { .. } => "a malformed PEM BEGIN line".to_owned(),
        Error::Base64Decode(_) => "a PEM section is not valid base64".to_owned(),
        _ => "not a usable PEM file".to_owned(),
    }
}

type Stamp = Vec<Option<(Option<SystemTime>, u64, u64)>>;

/// One port's server configuration, rebuilt when its files change.
pub struct ServerTls {
    files: TlsFiles,
    alpn: Vec<&'static [u8]>,
    state: Mutex<Loaded>,
}

struct Loaded {
    /// The files as they were when `config` was built.
    stamp: Stamp,
    config: Arc<ServerConfig>,
    /// The files as they were when they last failed to load (not retried until they change).
    failed: Option<Stamp>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads `files` for a port speaking `alpn` (blocking I/O).
    ///
    /// # Errors
    /// A file cannot be read or the files do not make a configuration.
    pub fn load(files: TlsFiles, alpn: &[&'static [u8]]) -> Result<Arc<Self>, TlsError> {
        let stamp = files.stamp();
        let config = Arc::new(files.build(alpn)?);
        Ok(Arc::new(Self {
            files,
            alpn: alpn.to_vec(),
            state: Mutex::new(Loaded {
                stamp,
                config,
                failed: None,
            }),
        }))
    }

    /// The files.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration for the next handshake: rebuilt first when the files changed since
    /// it was built (blocking I/O: a `stat` of each file, and reading them when one changed).
    pub fn refresh(&self) -> Arc<ServerConfig> {
        let stamp = self.files.stamp();
        {
            let state = self.lock();
            if state.stamp == stamp || state.failed.as_ref() == Some(&stamp) {
                return state.config.clone();
            }
        }
        let built = self.files.build(&self.alpn);
        let mut state = self.lock();
        match built {
            Ok(config) => {
                tracing::info!(
                    cert = %self.files.cert.display(),
                    option = self.files.option,
                    "TLS certificate files changed: new connections use them"
                );
                state.config = Arc::new(config);
                state.stamp = stamp;
                state.failed = None;
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    option = self.files.option,
                    "TLS certificate files changed but do not load; still serving the previous certificate"
                );
                state.failed = Some(stamp);
            }
        }
        state.config.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        // A panic while holding the lock leaves a whole `Loaded` behind (every field is
        // assigned in one step), so the state stays usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Established TLS connections of one port, in the order their handshakes finish.
pub struct TlsIncoming {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: Option<SocketAddr>,
}

impl TlsIncoming {
    /// Accepts on `listener` until `shutdown` is cancelled (or this is dropped), handshaking
    /// with `tls`'s current configuration. `port` names the port in logs.
    pub fn start(
        listener: TcpListener,
        tls: Arc<ServerTls>,
        shutdown: CancellationToken,
        port: &'static str,
    ) -> Self {
        let local = listener.local_addr().ok();
        let (tx, rx) = mpsc::channel(BACKLOG);
        tokio::spawn(accept_loop(listener, tls, tx, shutdown, port));
        Self {
            connections: rx,
            local,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    shutdown: CancellationToken,
    port: &'static str,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let slot = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: the next accept may work once some close.
                tracing::warn!(port, error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (tls, tx) = (tls.clone(), tx.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
            let refreshing = tls.clone();
            let Ok(config) = tokio::task::spawn_blocking(move || refreshing.refresh()).await else {
                return;
            };
            let handshake =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(config).accept(tcp));
            match handshake.await {
                Ok(Ok(stream)) => {
                    let _ = tx.send((stream, peer)).await;
                }
                Ok(Err(e)) => {
                    if let Some(held_back) = REFUSALS.admit() {
                        tracing::info!(port, peer = %peer, error = %e, held_back, "TLS handshake refused");
                    }
                }
                Err(_) => {
                    if let Some(held_back) = REFUSALS.admit() {
                        tracing::info!(port, peer = %peer, held_back, "TLS handshake timed out");
                    }
                }
            }
        });
    }
}

impl futures_util::Stream for TlsIncoming {
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connections
            .poll_recv(cx)
            .map(|next| next.map(|(stream, _)| Ok(stream)))
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept loop ended (shutdown): nothing more comes; the server is stopping.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.local.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the listener has no address",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever a certificate or key file holds (PEM-framed or not), loading it fails with
        /// the option and the path and never a line of the file.
        #[test]
        fn unusable_files_are_refused_without_quoting_them(
            body in "[A-Za-z0-9+/=]{12,64}",
            framing in 0usize..4,
            which in 0usize..2,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let files = TlsFiles {
                option: "--http-tls",
                cert: dir.path().join("tls.crt"),
                key: dir.path().join("tls.key"),
                client_ca: None,
            };
            let text = match framing {
                0 => body.clone(),
                1 => format!("-----BEGIN PRIVATE KEY-----\n{body}\n"),
                2 => format!("-----BEGIN PRIVATE KEY-----\n{body}!\n-----END PRIVATE KEY-----\n"),
                _ => format!("-----BEGIN {body}\n"),
            };
            let (bad, other) = if which == 0 { (&files.cert, &files.key) } else { (&files.key, &files.cert) };
            std::fs::write(bad, &text).unwrap();
            std::fs::write(other, format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")).unwrap();
            let error = ServerTls::load(files.clone(), &[ALPN_HTTP1]).unwrap_err().to_string();
            prop_assert!(error.contains("--http-tls-"), "{}", error);
            prop_assert!(!error.contains(&body), "{}", error);
        }
    }

    #[test]
    fn missing_and_empty_files_name_the_option_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            option: "--grpc-tls",
            cert: dir.path().join("absent.crt"),
            key: dir.path().join("absent.key"),
            client_ca: None,
        };
        let error = ServerTls::load(files.clone(), &[ALPN_H2])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--grpc-tls-cert") && error.contains("absent.crt"),
            "{error}"
        );
        std::fs::write(&files.cert, "not a certificate\n").unwrap();
        let error = ServerTls::load(files, &[ALPN_H2]).unwrap_err().to_string();
        assert!(error.contains("no certificate in the file"), "{error}");
    }
}
