//! A Kafka-protocol broker of a test's own: `tansu` with in-memory storage on a free port,
//! stopped (SIGKILL, then reaped) when dropped. The binary is found through
//! `DSREG_TEST_KAFKA_BROKER`, by default where `.ci/kafka-broker` installs it
//! (`target/tools/tansu/bin/tansu`); a missing binary fails the test naming that script.
//!
//! # TLS
//!
//! tansu 0.6 takes `--cert` and `--key` but does not serve TLS with them: its listener builds a
//! TLS acceptor and never uses it (`tansu-broker/src/broker.rs`, `let _acceptor = …`), so a
//! client speaking TLS to it gets no handshake. [`KafkaBroker::start_tls`] therefore puts a real
//! TLS terminator in front of it (rustls through `tokio-rustls`, with the certificate and key the
//! test made) that forwards the decrypted bytes to tansu's own port; tansu advertises the
//! terminator's address, so every connection a client makes after the bootstrap one (to the
//! broker the metadata names) goes through TLS too.
//!
//! # SASL
//!
//! With `--authentication` tansu requires a SASL login before any request but `ApiVersions`
//! and the SASL ones, and no login can succeed against this build:
//!
//! - **PLAIN** is not offered: tansu 0.6 builds its SASL library (`rsasl`) with the
//!   `scram-sha-2` and `oauthbearer` features only (the workspace `Cargo.toml`), so a PLAIN
//!   handshake ends in `NoSharedMechanism` and the connection is closed.
//! - **SCRAM-SHA-256/512** look the user's stored credential up in the storage engine; the
//!   in-memory engine (`memory://`, the `dynostore` feature) keeps none (its
//!   `upsert_user_scram_credential` does nothing, `user_scram_credential` answers none), so
//!   every SCRAM login is refused, whatever `AlterUserScramCredentials` was sent first.
//!
//! So only a refused login is tested ([`KafkaBroker::start_authenticating`]); a successful one
//! needs a broker with stored SCRAM users (tansu with a SQL storage engine, or Kafka).
//!
//! # Partitions
//!
//! tansu 0.6 answers no `CreatePartitions` (it is not among the broker's routes,
//! `tansu-broker/src/service/storage.rs`, and a topic's partition count is fixed at creation):
//! partitions added to a topic while a worker reads it cannot be tested against it.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The environment variable naming the broker binary.
pub const BROKER_ENV: &str = "DSREG_TEST_KAFKA_BROKER";

/// The broker binary: `DSREG_TEST_KAFKA_BROKER`, else `.ci/kafka-broker`'s install path.
///
/// # Panics
/// When the binary is not there: the message says how to get it.
pub fn broker_binary() -> PathBuf {
    let path = std::env::var_os(BROKER_ENV).map_or_else(
        || {
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
                PathBuf::from,
            );
            target.join("tools/tansu/bin/tansu")
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "no Kafka broker binary at {}: run `.ci/kafka-broker` (it installs tansu there) or set \
         {BROKER_ENV} to a tansu binary",
        path.display()
    );
    path
}

/// What stands between the clients and tansu.
enum Front {
    /// Nothing: clients connect to tansu's own port.
    Direct,
    /// A TLS terminator.
    Tls(Arc<rustls::ServerConfig>),
}

/// A running broker.
pub struct KafkaBroker {
    child: Option<std::process::Child>,
    /// The port clients connect to (the terminator's when there is one).
    port: u16,
    /// The TLS terminator's accept loop, when there is one.
    terminator: Option<tokio::task::JoinHandle<()>>,
    /// Where its output goes.
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl KafkaBroker {
    /// Starts a broker on a free port and waits (up to 60 s) until it accepts connections.
    pub async fn start() -> Self {
        let port = free_port();
        Self::start_on(port).await
    }

    /// Starts a broker that requires a SASL login (SCRAM), with no users: every login fails.
    pub async fn start_authenticating() -> Self {
        Self::launch(free_port(), true, Front::Direct).await
    }

    /// Starts a broker on `port` (to bring one back on the same address).
    pub async fn start_on(port: u16) -> Self {
        Self::launch(port, false, Front::Direct).await
    }

    /// Starts a broker that clients reach over TLS only: a terminator presenting `cert_pem`
    /// (a chain, leaf first) with `key_pem`, in front of tansu (see the module's doc).
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("the certificate is PEM");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("the key is PEM");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("the certificate and key go together");
        Self::launch(free_port(), false, Front::Tls(Arc::new(config))).await
    }

    async fn launch(port: u16, authentication: bool, front: Front) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("broker.log");
        let out = std::fs::File::create(&log).unwrap();
        // With a terminator in front, tansu listens on a port of its own and advertises the
        // terminator's: the metadata sends every client back through it.
        let (own_port, terminator) = match front {
            Front::Direct => (port, None),
            Front::Tls(config) => {
                let listener = TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("the terminator's port is free");
                let own_port = free_port();
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                (
                    own_port,
                    Some(tokio::spawn(terminate(listener, own_port, acceptor))),
                )
            }
        };
        let listener_url = format!("tcp://127.0.0.1:{own_port}");
        let advertised_url = format!("tcp://127.0.0.1:{port}");
        let mut command = std::process::Command::new(broker_binary());
        command.args([
            "broker",
            "--listener-url",
            &listener_url,
            "--advertised-listener-url",
            &advertised_url,
            "--storage-engine",
            "memory://tansu/",
        ]);
        if authentication {
            command.arg("--authentication");
        }
        let child = command
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .current_dir(dir.path())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("the broker starts");
        let broker = Self {
            child: Some(child),
            port,
            terminator,
            log,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", own_port)).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the broker did not listen on {own_port} within 60 s: {}",
                std::fs::read_to_string(&broker.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker
    }

    /// `127.0.0.1:<port>`: where clients connect (the terminator, when there is one).
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it (SIGKILL) and waits for it to exit; its port is free again after.
    pub fn stop(&mut self) {
        if let Some(terminator) = self.terminator.take() {
            terminator.abort();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it (SIGSTOP): connections stay open and nothing answers, as when a broker
    /// hangs or the network drops packets.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("the broker runs");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).expect("signal delivered");
    }

    /// What it logged.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts clients on `listener`, completes each one's TLS handshake with `acceptor` and
/// joins the decrypted stream to a connection of its own to tansu on `to`.
async fn terminate(listener: TcpListener, to: u16, acceptor: tokio_rustls::TlsAcceptor) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            // A client that fails the handshake (it does not trust the certificate) is
            // dropped, as by a TLS listener.
            let Ok(client) = acceptor.accept(client).await else {
                return;
            };
            let Ok(upstream) = TcpStream::connect(("127.0.0.1", to)).await else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            join(client, upstream).await;
        });
    }
}

/// Copies bytes both ways until either side closes.
async fn join<C: AsyncRead + AsyncWrite + Unpin>(client: C, upstream: TcpStream) {
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let (mut from_broker, mut to_broker) = upstream.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut from_client, &mut to_broker).await;
        let _ = to_broker.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut from_broker, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    tokio::join!(up, down);
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
