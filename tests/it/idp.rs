//! Token keys from an identity provider: a local HTTPS server of the test's own (a CA and a
//! certificate made here with the `openssl` CLI) serves an OpenID Connect discovery document
//! and a JWKS, counts what it is asked, and can fail or go away; the registry verifies real
//! ES256 tokens against what it fetched.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsreg::api::grpc::auth::UNAUTHENTICATED_MESSAGE;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;

use crate::abuse::{channel, ec_jwk, fixture, get_info};
use crate::helpers::{TestApp, TestDb, test_settings, wait_for};

/// What the identity provider serves and what it was asked.
#[derive(Default)]
struct IdpState {
    keys: Mutex<Vec<Value>>,
    /// The `Cache-Control` max-age of the JWKS, in seconds.
    max_age: AtomicU64,
    /// Answer 503 to everything (an outage behind a load balancer).
    failing: AtomicBool,
    /// The discovery document's `issuer`, when not the server's own URL.
    claimed_issuer: Mutex<Option<String>>,
    discovery_requests: AtomicUsize,
    jwks_requests: AtomicUsize,
    /// Connections whose TLS handshake failed.
    handshake_failures: AtomicUsize,
}

struct Idp {
    /// `https://127.0.0.1:PORT`: the issuer.
    base: String,
    state: Arc<IdpState>,
    server: tokio::task::JoinHandle<()>,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl Idp {
    async fn start(keys: Vec<Value>, max_age: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        crate::pgtls::ca(dir.path(), "idp-ca");
        crate::pgtls::leaf(
            dir.path(),
            "idp-ca",
            "idp",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.path().join("idp.crt"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.path().join("idp.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("https://{}", listener.local_addr().unwrap());
        let state = Arc::new(IdpState::default());
        *state.keys.lock().unwrap() = keys;
        state.max_age.store(max_age, Ordering::Relaxed);
        let server = {
            let (state, base) = (state.clone(), base.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, state, base) = (acceptor.clone(), state.clone(), base.clone());
                    tokio::spawn(async move {
                        match acceptor.accept(tcp).await {
                            Ok(tls) => answer(tls, &state, &base).await,
                            Err(_) => {
                                state.handshake_failures.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            })
        };
        Self {
            base,
            state,
            server,
            ca: dir.path().join("idp-ca.crt"),
            _dir: dir,
        }
    }

    fn set_keys(&self, keys: Vec<Value>) {
        *self.state.keys.lock().unwrap() = keys;
    }

    fn jwks_requests(&self) -> usize {
        self.state.jwks_requests.load(Ordering::Relaxed)
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Reads one HTTP/1.1 request head and answers it, closing the connection.
async fn answer(
    mut tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    state: &IdpState,
    base: &str,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let (status, body, cache) = if state.failing.load(Ordering::Relaxed) {
        if path == "/keys" {
            state.jwks_requests.fetch_add(1, Ordering::Relaxed);
        }
        ("503 Service Unavailable", json!({"error": "down"}), None)
    } else if path == "/.well-known/openid-configuration" {
        state.discovery_requests.fetch_add(1, Ordering::Relaxed);
        let issuer = state.claimed_issuer.lock().unwrap().clone();
        let issuer = issuer.as_deref().unwrap_or(base);
        let document = json!({ "issuer": issuer, "jwks_uri": format!("{base}/keys") });
        ("200 OK", document, None)
    } else if path == "/keys" {
        state.jwks_requests.fetch_add(1, Ordering::Relaxed);
        let keys = state.keys.lock().unwrap().clone();
        let max_age = state.max_age.load(Ordering::Relaxed);
        ("200 OK", json!({ "keys": keys }), Some(max_age))
    } else {
        ("404 Not Found", json!({}), None)
    };
    let body = body.to_string();
    let cache = cache
        .map(|age| format!("Cache-Control: public, max-age={age}\r\n"))
        .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{cache}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.write_all(response.as_bytes()).await;
    let _ = tls.shutdown().await;
}

/// An ES256 token of the fixture key `private_pem`, naming `kid`, issued by `issuer`.
fn token(private_pem: &str, kid: &str, issuer: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "sub": "alice", "iss": issuer, "aud": "dsreg", "org": "acme",
        "roles": ["datasource:viewer"], "iat": now, "exp": now + 600,
    });
    dsreg::api::grpc::auth::install_jwt_crypto();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(fixture(private_pem)).unwrap())
        .unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

enum Source {
    /// `--auth-oidc-issuer`: discovery first.
    Issuer,
    /// `--auth-jwks-url` with `--auth-issuer`.
    JwksUrl,
}

/// A registry taking its keys from `idp`; `trust_ca`: with `--auth-jwks-ca-file`, else the
/// system's roots.
async fn serve(db: &TestDb, idp: &Idp, source: Source, trust_ca: bool) -> TestApp {
    let mut settings = test_settings(&db.url);
    let auth = &mut settings.auth;
    auth.insecure_no_auth = false;
    match source {
        Source::Issuer => auth.auth_oidc_issuer = Some(idp.base.clone()),
        Source::JwksUrl => {
            auth.auth_jwks_url = Some(format!("{}/keys", idp.base));
            auth.auth_issuer = Some(idp.base.clone());
        }
    }
    auth.auth_jwks_ca_file = trust_ca.then(|| idp.ca.clone());
    auth.auth_algorithms = vec![jsonwebtoken::Algorithm::ES256];
    auth.auth_audience = Some("dsreg".into());
    TestApp::spawn_with(settings, |_| {}).await
}

const WAIT: Duration = Duration::from_secs(60);

/// Waits until `token` is accepted.
async fn accepted(ch: &Channel, token: &str, what: &str) {
    wait_for(what, WAIT, || async { get_info(ch, token).await.ok() }).await;
}

/// Asserts that `token` is refused with the one UNAUTHENTICATED answer.
async fn assert_refused(ch: &Channel, token: &str) {
    let refused = get_info(ch, token).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(refused.message(), UNAUTHENTICATED_MESSAGE);
}

#[tokio::test]
async fn keys_rotated_at_the_issuer_are_followed_without_a_restart() {
    let db = TestDb::new().await;
    let idp = Idp::start(vec![ec_jwk("ec-public.pem", "k1")], 1).await;
    let app = serve(&db, &idp, Source::Issuer, true).await;
    let ch = channel(&app).await;
    let k1 = token("ec-private.pem", "k1", &idp.base);
    let k2 = token("ec2-private.pem", "k2", &idp.base);
    accepted(&ch, &k1, "k1 to verify").await;
    assert!(idp.state.discovery_requests.load(Ordering::Relaxed) >= 1);

    // The issuer adds k2 and starts signing with it.
    idp.set_keys(vec![
        ec_jwk("ec-public.pem", "k1"),
        ec_jwk("ec2-public.pem", "k2"),
    ]);
    accepted(&ch, &k2, "k2 to verify after its rotation in").await;

    // Then retires k1: once the keys' max-age has passed, k1 is refused.
    idp.set_keys(vec![ec_jwk("ec2-public.pem", "k2")]);
    let refused = wait_for("k1 to stop verifying", WAIT, || async {
        get_info(&ch, &k1).await.err()
    })
    .await;
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert_eq!(refused.message(), UNAUTHENTICATED_MESSAGE);
    get_info(&ch, &k2).await.unwrap();
}

#[tokio::test]
async fn a_thousand_unknown_kids_cost_a_handful_of_fetches() {
    let db = TestDb::new().await;
    let idp = Idp::start(vec![ec_jwk("ec-public.pem", "k1")], 3600).await;
    let app = serve(&db, &idp, Source::Issuer, true).await;
    let ch = channel(&app).await;
    let k1 = token("ec-private.pem", "k1", &idp.base);
    accepted(&ch, &k1, "k1 to verify").await;
    let before = idp.jwks_requests();

    let tokens: Vec<String> = (0..1000)
        .map(|_| {
            let kid = format!("{:032x}", rand::random::<u128>());
            token("ec-private.pem", &kid, &idp.base)
        })
        .collect();
    for batch in tokens.chunks(100) {
        let refusals = futures_util::future::join_all(batch.iter().map(|t| get_info(&ch, t))).await;
        for refused in refusals {
            let refused = refused.unwrap_err();
            assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
            assert_eq!(refused.message(), UNAUTHENTICATED_MESSAGE);
        }
    }
    let fetches = idp.jwks_requests() - before;
    assert!(
        fetches <= 3,
        "1,000 unknown kids caused {fetches} JWKS fetches"
    );
    get_info(&ch, &k1).await.unwrap();
}

#[tokio::test]
async fn during_an_outage_cached_keys_work_and_unknown_kids_are_refused() {
    let db = TestDb::new().await;
    let idp = Idp::start(vec![ec_jwk("ec-public.pem", "k1")], 1).await;
    let app = serve(&db, &idp, Source::JwksUrl, true).await;
    let ch = channel(&app).await;
    let k1 = token("ec-private.pem", "k1", &idp.base);
    let k2 = token("ec2-private.pem", "k2", &idp.base);
    accepted(&ch, &k1, "k1 to verify").await;
    assert_eq!(idp.state.discovery_requests.load(Ordering::Relaxed), 0);

    // The provider fails: two refreshes past the keys' max-age are answered 503.
    idp.state.failing.store(true, Ordering::Relaxed);
    let failing_from = idp.jwks_requests();
    wait_for("two failed refreshes", WAIT, || async {
        (idp.jwks_requests() >= failing_from + 2).then_some(())
    })
    .await;
    get_info(&ch, &k1).await.unwrap();
    assert_refused(&ch, &k2).await;

    // And goes away altogether.
    idp.server.abort();
    wait_for(
        "the provider's port to refuse connections",
        WAIT,
        || async {
            tokio::net::TcpStream::connect(idp.base.trim_start_matches("https://"))
                .await
                .err()
                .filter(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        },
    )
    .await;
    get_info(&ch, &k1).await.unwrap();
    assert_refused(&ch, &token("ec-private.pem", "k-new", &idp.base)).await;
}

#[tokio::test]
async fn a_provider_whose_certificate_is_not_trusted_gives_no_keys() {
    let db = TestDb::new().await;
    let idp = Idp::start(vec![ec_jwk("ec-public.pem", "k1")], 3600).await;
    // The system's roots do not know the test's CA.
    let app = serve(&db, &idp, Source::Issuer, false).await;
    let ch = channel(&app).await;
    wait_for("a refused handshake", WAIT, || async {
        (idp.state.handshake_failures.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    assert_refused(&ch, &token("ec-private.pem", "k1", &idp.base)).await;
    assert_eq!(idp.state.discovery_requests.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn the_binary_refuses_a_provider_url_that_is_not_https_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |args: &[&str], env: Option<(&str, &str)>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_dsreg"));
        command
            .env_remove("DATABASE_URL")
            .env("DSREG_DATA_DIR", dir.path())
            .args([
                "serve",
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
            ])
            .args(args)
            .kill_on_drop(true);
        if let Some((name, value)) = env {
            command.env(name, value);
        }
        async move {
            let output = tokio::time::timeout(WAIT, command.output())
                .await
                .expect("dsreg exits")
                .unwrap();
            assert!(!output.status.success());
            String::from_utf8_lossy(&output.stderr).into_owned()
        }
    };
    let flag = refused(
        &[
            "--auth-jwks-url",
            "http://127.0.0.1:9/keys",
            "--auth-issuer",
            "i",
            "--auth-audience",
            "dsreg",
        ],
        None,
    )
    .await;
    assert!(
        flag.contains("--auth-jwks-url") && flag.contains("must be an https:// URL"),
        "{flag}"
    );
    let env = refused(
        &["--auth-audience", "dsreg"],
        Some(("DSREG_AUTH_OIDC_ISSUER", "http://127.0.0.1:9")),
    )
    .await;
    assert!(
        env.contains("--auth-oidc-issuer") && env.contains("must be an https:// URL"),
        "{env}"
    );
}

#[tokio::test]
async fn a_discovery_document_naming_another_issuer_gives_no_keys() {
    let db = TestDb::new().await;
    let idp = Idp::start(vec![ec_jwk("ec-public.pem", "k1")], 3600).await;
    *idp.state.claimed_issuer.lock().unwrap() = Some("https://evil.example".to_owned());
    let app = serve(&db, &idp, Source::Issuer, true).await;
    let ch = channel(&app).await;
    wait_for("the discovery document to be read", WAIT, || async {
        (idp.state.discovery_requests.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    assert_refused(&ch, &token("ec-private.pem", "k1", &idp.base)).await;
    assert_eq!(
        idp.jwks_requests(),
        0,
        "keys fetched from an unverified document"
    );
}
