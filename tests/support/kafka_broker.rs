//! A Kafka-protocol broker of a test's own: `tansu` on a free port, with in-memory storage
//! ([`KafkaBroker::start`]) or its SQLite storage in a folder the test keeps
//! ([`KafkaBroker::start_in`]: SCRAM users and partitions added through the storage), stopped
//! (SIGKILL, then reaped) when dropped. The binary is found through `DSREG_TEST_KAFKA_BROKER`,
//! by default where `.ci/kafka-broker` installs it (`target/tools/tansu/bin/tansu`); a missing
//! binary fails the test naming that script. Beside the broker: the client helpers the tests
//! and the Kafka bench share (topics, producing).
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
//! and the SASL ones:
//!
//! - **PLAIN** can never succeed: tansu 0.6 builds its SASL library (`rsasl`) with the
//!   `scram-sha-2` and `oauthbearer` features only (the workspace `Cargo.toml`), so a PLAIN
//!   handshake ends in `NoSharedMechanism` and the connection is closed.
//! - **SCRAM-SHA-256/512** look the user's stored credential up in the storage engine. The
//!   in-memory engine (`memory://`, the `dynostore` feature) keeps none (its
//!   `upsert_user_scram_credential` does nothing), so against [`KafkaBroker::start`] and
//!   [`KafkaBroker::start_authenticating`] every login is refused. The SQLite engine
//!   (`sqlite://`, the `libsql` feature) keeps them: [`KafkaBroker::create_scram_user`] stores
//!   one through `tansu user create` (an `AlterUserScramCredentials` request, which tansu takes
//!   only while it requires no login, since the request comes before any), and a broker
//!   started again in the same folder with `--authentication` accepts it.
//! - The PostgreSQL engine (`postgres://`, the `postgres` feature) keeps them too, but cannot
//!   serve these tests: tansu creates none of its tables (they live in its repository's
//!   `etc/initdb.d`, in no published crate), and its `ListOffsets` for the latest offset
//!   (`list_latest_offset_committed.sql`, what librdkafka sends for a high watermark) has a
//!   subquery in `FROM` without an alias, which PostgreSQL before 16 refuses ("subquery in
//!   FROM must have an alias"); the machine's PostgreSQL is 15.
//!
//! PLAIN logins are therefore served by a front of the tests' own:
//! [`KafkaBroker::start_plain_login`] starts tansu without `--authentication` on a port of its
//! own, advertising the front's, and the front (on the port clients know) reads each
//! connection's requests until it has logged in, decoding them and encoding its answers with
//! the `kafka-protocol` crate. It answers `SaslHandshake` (offering `PLAIN` only) and
//! `SaslAuthenticate` itself, checking the user and password it was started with: a right login
//! joins the connection to tansu byte for byte, as the TLS terminator does; a wrong one gets
//! `SASL_AUTHENTICATION_FAILED` ("Authentication failed: invalid username or password") and the
//! connection is closed. `ApiVersions` (what librdkafka sends first) goes to tansu, whose answer
//! lists the SASL requests (`SaslHandshake` 0–1, `SaslAuthenticate` 0–2, the versions the crate
//! serves too, of which librdkafka sends 1 and 1; the front caps them at the crate's should
//! they differ); any other request before a login closes the connection, as a broker requiring
//! a login does. A client that sends no login, a wrong user or a wrong password reads nothing.
//!
//! # Partitions
//!
//! tansu 0.6 answers no `CreatePartitions` (it is not among the broker's routes,
//! `tansu-broker/src/service/storage.rs`). Its SQL engines answer Metadata, Produce, Fetch and
//! ListOffsets from their tables each time (a topic's `partitions` count, a `topition` and a
//! `watermark` row per partition), so [`add_partition`] grows a topic of a broker started with
//! [`KafkaBroker::start_in`] by writing those rows while it runs, as its topic creation does.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::ToBytes;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// The file a broker started with [`KafkaBroker::start_in`] keeps its data in, in its folder.
const DATA_FILE: &str = "tansu.db";

/// Adds a partition to `topic` in the storage of the broker started in `dir` with
/// [`KafkaBroker::start_in`], while it runs, as tansu's own topic creation lays one out (its
/// `topition` row, an empty `watermark` row, and the topic's `partitions` count, which its
/// Metadata answer lists); returns its number. tansu 0.6 answers no `CreatePartitions`, so
/// this is the only way to grow a topic under it. Written with the `sqlite3` program (SQLite
/// lets a second process write the file; tansu's engine reads it afresh for every request).
pub fn add_partition(dir: &std::path::Path, topic: &str) -> i32 {
    assert!(
        topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
        "a topic name"
    );
    let sql = format!(
        "BEGIN IMMEDIATE;
         UPDATE topic SET partitions = partitions + 1, last_updated = current_timestamp
           WHERE name = '{topic}';
         INSERT INTO topition (topic, partition)
           SELECT id, partitions - 1 FROM topic WHERE name = '{topic}';
         INSERT INTO watermark (topition)
           SELECT tp.id FROM topition tp JOIN topic t ON tp.topic = t.id
           WHERE t.name = '{topic}' AND tp.partition = t.partitions - 1;
         SELECT partitions - 1 FROM topic WHERE name = '{topic}';
         COMMIT;"
    );
    let mut sqlite = std::process::Command::new("sqlite3");
    sqlite
        .args(["-bail", "-cmd", ".timeout 10000"])
        .arg(dir.join(DATA_FILE))
        .arg(sql);
    run(sqlite, "sqlite3 (Debian: the sqlite3 package)")
        .trim()
        .parse()
        .expect("the new partition's number")
}

/// Runs `command` to its end and answers what it printed.
///
/// # Panics
/// When it does not start or fails; the message names it (`what`) and gives its errors.
fn run(mut command: std::process::Command, what: &str) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

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

/// Where a broker keeps its data.
enum Storage {
    /// In memory (`memory://`, the `dynostore` feature): gone with the process.
    Memory,
    /// In a SQLite file in this folder (`sqlite://`, the `libsql` feature).
    File(PathBuf),
}

/// What stands between the clients and tansu.
enum Front {
    /// Nothing: clients connect to tansu's own port.
    Direct,
    /// A TLS terminator.
    Tls(Arc<rustls::ServerConfig>),
    /// A PLAIN login, required before any request but `ApiVersions`.
    PlainLogin(Arc<PlainLogin>),
}

/// The one user a [`Front::PlainLogin`] lets in.
struct PlainLogin {
    user: String,
    password: String,
}

/// A running broker.
pub struct KafkaBroker {
    child: Option<std::process::Child>,
    /// The port clients connect to (the front's when there is one).
    port: u16,
    /// The accept loop of the front (a TLS terminator or a PLAIN login), when there is one.
    front: Option<tokio::task::JoinHandle<()>>,
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
        Self::launch(free_port(), true, Front::Direct, Storage::Memory).await
    }

    /// Starts a broker on `port` (to bring one back on the same address).
    pub async fn start_on(port: u16) -> Self {
        Self::launch(port, false, Front::Direct, Storage::Memory).await
    }

    /// Starts a broker keeping its data in a file in `dir` (tansu's SQLite storage engine,
    /// `sqlite://`, the `libsql` feature), requiring a SASL login when `authentication` is set.
    /// A later broker started in the same folder finds the topics, messages and SCRAM users of
    /// the earlier one.
    pub async fn start_in(dir: &std::path::Path, authentication: bool) -> Self {
        Self::launch(
            free_port(),
            authentication,
            Front::Direct,
            Storage::File(dir.to_owned()),
        )
        .await
    }

    /// Stores a SCRAM credential for `user` with `password` (`mechanism`: `scram256` or
    /// `scram512`), through tansu's own `tansu user create` (an `AlterUserScramCredentials`
    /// request): only a broker that does not require a login takes it, since the request
    /// comes before any login, and only a SQL storage keeps it (see the module's doc).
    pub fn create_scram_user(&self, user: &str, password: &str, mechanism: &str) {
        let mut create = std::process::Command::new(broker_binary());
        create
            .args([
                "user",
                "create",
                "--broker",
                &format!("tcp://{}", self.address()),
                "--mechanism",
                mechanism,
                user,
                password,
            ])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        run(create, "tansu user create");
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
        Self::launch(
            free_port(),
            false,
            Front::Tls(Arc::new(config)),
            Storage::Memory,
        )
        .await
    }

    /// Starts a broker that lets a client in only after a SASL PLAIN login as `user` with
    /// `password`: a front of the test's own answers the SASL requests and joins a client that
    /// logged in to tansu (which requires no login), see the module's doc.
    pub async fn start_plain_login(user: &str, password: &str) -> Self {
        let login = PlainLogin {
            user: user.to_owned(),
            password: password.to_owned(),
        };
        Self::launch(
            free_port(),
            false,
            Front::PlainLogin(Arc::new(login)),
            Storage::Memory,
        )
        .await
    }

    async fn launch(port: u16, authentication: bool, front: Front, storage: Storage) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("broker.log");
        // The SQLite engine opens its file relative to the working folder.
        let (engine, cwd) = match storage {
            Storage::Memory => ("memory://tansu/".to_owned(), dir.path().to_owned()),
            Storage::File(data) => (format!("sqlite://{DATA_FILE}"), data),
        };
        let out = std::fs::File::create(&log).unwrap();
        // With a front, tansu listens on a port of its own and advertises the front's: the
        // metadata sends every client back through it.
        let (own_port, front) = match front {
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
            Front::PlainLogin(login) => {
                let listener = TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("the front's port is free");
                let own_port = free_port();
                (
                    own_port,
                    Some(tokio::spawn(require_plain_login(listener, own_port, login))),
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
            &engine,
        ]);
        if authentication {
            command.arg("--authentication");
        }
        let child = command
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .current_dir(&cwd)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("the broker starts");
        let broker = Self {
            child: Some(child),
            port,
            front,
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

    /// `127.0.0.1:<port>`: where clients connect (the front, when there is one).
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it (SIGKILL) and waits for it to exit; its port is free again after.
    pub fn stop(&mut self) {
        if let Some(front) = self.front.take() {
            front.abort();
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

/// Accepts clients on `listener` and serves each one's PLAIN login ([`log_in_plain`]) in front
/// of tansu on `to`.
async fn require_plain_login(listener: TcpListener, to: u16, login: Arc<PlainLogin>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let login = login.clone();
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            // A connection ends however the exchange ends: an error here is the client's (or
            // tansu's) closing, or a request the front does not take.
            let _ = log_in_plain(client, to, &login).await;
        });
    }
}

/// The one SASL mechanism a [`Front::PlainLogin`] offers.
const PLAIN: &str = "PLAIN";
/// Kafka's error code for a handshake naming a mechanism the broker does not offer.
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
/// Kafka's error code for a refused login.
const SASL_AUTHENTICATION_FAILED: i16 = 58;
/// The largest request the front reads before a login (the SASL ones and `ApiVersions` are a
/// few hundred bytes) and the largest `ApiVersions` answer it relays.
const MAX_FRAME: usize = 1 << 20;

/// Serves one client of a [`Front::PlainLogin`], reading its requests (each a 4-byte
/// big-endian size, then the request header and body) until it has logged in:
///
/// - `ApiVersions` goes to tansu, whose answer comes back with the `SaslHandshake` and
///   `SaslAuthenticate` versions capped at those the front decodes and encodes;
/// - `SaslHandshake` is answered here, offering `PLAIN` only; another mechanism gets
///   `UNSUPPORTED_SASL_MECHANISM` and the connection is closed, and so does a version 0
///   handshake (its login bytes come without a `SaslAuthenticate` frame, which the front does
///   not read);
/// - `SaslAuthenticate` after a handshake is answered here: PLAIN's bytes are
///   `authzid NUL user NUL password`; `user` and `password` right (and `authzid` empty or the
///   user) succeed and from then on the connection is joined to tansu byte for byte; anything
///   else gets `SASL_AUTHENTICATION_FAILED` and the connection is closed after the answer;
/// - any other request closes the connection, as a broker requiring a login does.
async fn log_in_plain(mut client: TcpStream, to: u16, login: &PlainLogin) -> anyhow::Result<()> {
    use kafka_protocol::messages::{
        ApiKey, RequestHeader, SaslAuthenticateRequest, SaslAuthenticateResponse,
        SaslHandshakeRequest, SaslHandshakeResponse,
    };
    use kafka_protocol::protocol::{Decodable as _, StrBytes};
    let mut upstream = TcpStream::connect(("127.0.0.1", to)).await?;
    let _ = upstream.set_nodelay(true);
    let mut handshaken = false;
    loop {
        let frame = read_frame(&mut client).await?;
        let mut request = frame.clone();
        anyhow::ensure!(request.len() >= 4, "a request shorter than its header");
        let key = i16::from_be_bytes([request[0], request[1]]);
        let version = i16::from_be_bytes([request[2], request[3]]);
        let Ok(api) = ApiKey::try_from(key) else {
            anyhow::bail!("request {key}: no such API");
        };
        let header = RequestHeader::decode(&mut request, api.request_header_version(version))?;
        match api {
            ApiKey::ApiVersions => {
                write_frame(&mut upstream, &frame).await?;
                let answer = read_frame(&mut upstream).await?;
                let answer = with_sasl_versions_served(answer, version)?;
                write_frame(&mut client, &answer).await?;
            }
            ApiKey::SaslHandshake => {
                let body = SaslHandshakeRequest::decode(&mut request, version)?;
                let offered = body.mechanism.as_str() == PLAIN;
                let error_code = if offered {
                    0
                } else {
                    UNSUPPORTED_SASL_MECHANISM
                };
                let response = SaslHandshakeResponse::default()
                    .with_error_code(error_code)
                    .with_mechanisms(vec![StrBytes::from_static_str(PLAIN)]);
                answer(&mut client, &header, api, &response).await?;
                anyhow::ensure!(offered, "mechanism {:?} refused", body.mechanism.as_str());
                anyhow::ensure!(version >= 1, "a version 0 handshake");
                handshaken = true;
            }
            ApiKey::SaslAuthenticate if handshaken => {
                let body = SaslAuthenticateRequest::decode(&mut request, version)?;
                let fields: Vec<&[u8]> = body.auth_bytes.split(|b| *b == 0).collect();
                let accepted = matches!(
                    fields.as_slice(),
                    [authzid, user, password]
                        if (authzid.is_empty() || authzid == user)
                            && *user == login.user.as_bytes()
                            && *password == login.password.as_bytes()
                );
                let response = if accepted {
                    SaslAuthenticateResponse::default()
                } else {
                    SaslAuthenticateResponse::default()
                        .with_error_code(SASL_AUTHENTICATION_FAILED)
                        .with_error_message(Some(StrBytes::from_static_str(
                            "Authentication failed: invalid username or password",
                        )))
                };
                answer(&mut client, &header, api, &response).await?;
                anyhow::ensure!(accepted, "the login refused");
                join(client, upstream).await;
                return Ok(());
            }
            _ => anyhow::bail!("{api:?} before a login"),
        }
    }
}

/// Tansu's `ApiVersions` answer `frame` (to a request of `version`) with the versions of
/// `SaslHandshake` and `SaslAuthenticate` capped at those [`log_in_plain`] serves; an answer
/// with an error (an `ApiVersions` version tansu does not serve, answered in version 0, which
/// the client retries lower) goes back as it is.
fn with_sasl_versions_served(frame: bytes::Bytes, version: i16) -> anyhow::Result<bytes::Bytes> {
    use kafka_protocol::messages::{
        ApiKey, ApiVersionsResponse, ResponseHeader, SaslAuthenticateResponse,
        SaslHandshakeResponse,
    };
    use kafka_protocol::protocol::{Decodable as _, Encodable as _, Message as _};
    let header_version = ApiKey::ApiVersions.response_header_version(version);
    let mut body = frame.clone();
    let header = ResponseHeader::decode(&mut body, header_version)?;
    anyhow::ensure!(
        body.len() >= 2,
        "an ApiVersions answer without its error code"
    );
    if body[..2] != [0, 0] {
        return Ok(frame);
    }
    let mut response = ApiVersionsResponse::decode(&mut body, version)?;
    for api in &mut response.api_keys {
        let served = if api.api_key == ApiKey::SaslHandshake as i16 {
            SaslHandshakeResponse::VERSIONS.max
        } else if api.api_key == ApiKey::SaslAuthenticate as i16 {
            SaslAuthenticateResponse::VERSIONS.max
        } else {
            continue;
        };
        api.max_version = api.max_version.min(served);
    }
    let mut out = bytes::BytesMut::new();
    header.encode(&mut out, header_version)?;
    response.encode(&mut out, version)?;
    Ok(out.freeze())
}

/// Sends `response` to the request of `header` (of `api`) to `client`.
async fn answer<R: kafka_protocol::protocol::Encodable>(
    client: &mut TcpStream,
    header: &kafka_protocol::messages::RequestHeader,
    api: kafka_protocol::messages::ApiKey,
    response: &R,
) -> anyhow::Result<()> {
    use kafka_protocol::protocol::Encodable as _;
    let version = header.request_api_version;
    let header_version = api.response_header_version(version);
    let mut out = bytes::BytesMut::new();
    kafka_protocol::messages::ResponseHeader::default()
        .with_correlation_id(header.correlation_id)
        .encode(&mut out, header_version)?;
    response.encode(&mut out, version)?;
    write_frame(client, &out).await
}

/// Reads one Kafka frame (a 4-byte big-endian size, then that many bytes) and answers its
/// bytes after the size.
async fn read_frame(from: &mut TcpStream) -> anyhow::Result<bytes::Bytes> {
    use tokio::io::AsyncReadExt as _;
    let size = usize::try_from(from.read_u32().await?)?;
    anyhow::ensure!(size <= MAX_FRAME, "a frame of {size} bytes");
    let mut frame = vec![0; size];
    from.read_exact(&mut frame).await?;
    Ok(frame.into())
}

/// Writes `frame` to `to` as one Kafka frame: its size (4 bytes, big-endian), then it.
async fn write_frame(to: &mut TcpStream, frame: &[u8]) -> anyhow::Result<()> {
    let size = u32::try_from(frame.len())?;
    let mut out = Vec::with_capacity(4 + frame.len());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(frame);
    to.write_all(&out).await?;
    Ok(())
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

/// A client configuration for `broker` in plain text, with no login.
pub fn plain(broker: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", broker);
    config
}

/// Creates `topic` with `partitions` at `broker`.
pub async fn create_topic(broker: &str, topic: &str, partitions: i32) {
    create_topic_with(plain(broker), topic, partitions).await;
}

/// Creates `topic` with `partitions` through a client made from `config`.
pub async fn create_topic_with(config: ClientConfig, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = config.create().expect("an admin client");
    let created = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics answered");
    for result in created {
        result.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
}

/// Queues `record` on `producer`, letting deliveries drain while its local queue is full.
pub fn send<K: ToBytes + ?Sized, P: ToBytes + ?Sized>(
    producer: &BaseProducer,
    mut record: BaseRecord<'_, K, P>,
) {
    loop {
        match producer.send(record) {
            Ok(()) => break,
            Err((_, back)) => {
                producer.poll(Duration::from_millis(5));
                record = back;
            }
        }
    }
    producer.poll(Duration::ZERO);
}

/// Produces `count` messages to `topic` through a producer made from `config`, batched as a
/// producer batches by default (many messages per record batch), the `i`th (from 0) with the
/// payload `payload(first + i)`, at `rate` messages a second when given; waits until every
/// one is acknowledged. Blocks: call it off the runtime.
pub fn produce_paced(
    config: &ClientConfig,
    topic: &str,
    first: u64,
    count: u64,
    rate: Option<f64>,
    payload: impl Fn(u64) -> String,
) {
    let producer: BaseProducer = config
        .clone()
        .set("linger.ms", "2")
        .create()
        .expect("a producer");
    let started = std::time::Instant::now();
    for i in 0..count {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(i as f64 / rate);
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let value = payload(first + i);
        send(
            &producer,
            BaseRecord::<(), String>::to(topic).payload(&value),
        );
    }
    producer
        .flush(Duration::from_secs(120))
        .expect("every message acknowledged");
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
