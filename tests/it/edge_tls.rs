//! The service's own ports over TLS, with a CA and certificates generated here by the `openssl`
//! CLI (the helpers of `pgtls`): gRPC with and without mutual TLS, a certificate rotated on
//! disk and served to the next connection, the HTTP port (readiness and a webhook delivery),
//! and the `dsreg` binary as a client over `https://`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::connectors::webhook::sign;
use dsreg::domain::WorkerStatus;
use serde_json::json;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::cli::{dsreg, run};
use crate::helpers::{TestApp, TestDb, test_settings, wait_for};
use crate::pgtls::{ca, leaf};

const MASTER_KEYS: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const WEBHOOK_KEY: &str = "whsec-edge-tls";
const SERVER_EXT: &str = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n";
const CLIENT_EXT: &str = "extendedKeyUsage=clientAuth\n";

/// CAs `ca` (the server's), `other-ca` (nobody's) and `client-ca`; certificates `server` (by
/// `ca`), `server2` (by `other-ca`, for rotation), `client` (by `client-ca`) and `stranger` (a
/// client certificate by `other-ca`).
fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in ["ca", "other-ca", "client-ca"] {
        ca(d, name);
    }
    leaf(d, "ca", "server", "localhost", SERVER_EXT);
    leaf(d, "other-ca", "server2", "localhost", SERVER_EXT);
    leaf(d, "client-ca", "client", "operator", CLIENT_EXT);
    leaf(d, "other-ca", "stranger", "operator", CLIENT_EXT);
    dir
}

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// An error and its sources, for messages.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// `GetInfo` over a fresh TLS connection trusting `ca`, presenting `identity` (cert, key):
/// the answering instance's id, or why the call failed.
async fn info(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<String, String> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| chain(&e))?;
    call_info(channel).await
}

async fn call_info(channel: tonic::transport::Channel) -> Result<String, String> {
    pb::registry_client::RegistryClient::new(channel)
        .get_info(pb::GetInfoRequest {})
        .await
        .map(|r| r.into_inner().instance_id)
        .map_err(|status| format!("{status:?}"))
}

fn grpc_tls(settings: &mut dsreg::config::Settings, dir: &Path, client_ca: bool) {
    settings.grpc_tls_cert = Some(file(dir, "server.crt"));
    settings.grpc_tls_key = Some(file(dir, "server.key"));
    settings.grpc_tls_client_ca = client_ca.then(|| file(dir, "client-ca.crt"));
}

#[tokio::test]
async fn grpc_over_tls_serves_clients_trusting_its_ca_and_no_one_else() {
    let pki = pki();
    let d = pki.path();
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    grpc_tls(&mut settings, d, false);
    let app = TestApp::spawn_with(settings, |_| {}).await;

    // Clients that connect and never finish a handshake do not hold up the next one.
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(tokio::net::TcpStream::connect(app.grpc_addr).await.unwrap());
    }
    let id = info(app.grpc_addr, &file(d, "ca.crt"), None).await.unwrap();
    assert!(!id.is_empty());
    drop(silent);

    let refused = info(app.grpc_addr, &file(d, "other-ca.crt"), None)
        .await
        .unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");

    // A plaintext client gets no gRPC answer from a TLS port.
    let plain = Endpoint::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .timeout(Duration::from_secs(20))
        .connect_lazy();
    assert!(call_info(plain).await.is_err());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_of_its_client_ca() {
    let pki = pki();
    let d = pki.path();
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    grpc_tls(&mut settings, d, true);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let ca = file(d, "ca.crt");

    let (cert, key) = (file(d, "client.crt"), file(d, "client.key"));
    info(app.grpc_addr, &ca, Some((&cert, &key)))
        .await
        .expect("a client with a certificate of the client CA");
    let without = info(app.grpc_addr, &ca, None).await;
    assert!(without.is_err(), "no client certificate: {without:?}");
    let (cert, key) = (file(d, "stranger.crt"), file(d, "stranger.key"));
    let other = info(app.grpc_addr, &ca, Some((&cert, &key))).await;
    assert!(other.is_err(), "a certificate of another CA: {other:?}");

    // The refusal is the handshake's: a bare TLS client without a certificate gets the
    // server's alert, before any HTTP/2.
    let refusal = bare_handshake(app.grpc_addr, &ca).await;
    assert!(refusal.to_lowercase().contains("certificate"), "{refusal}");

    // The client CA file is re-read when it changes, like the certificate: the stranger's CA
    // replaces it.
    replace(&file(d, "other-ca.crt"), &file(d, "client-ca.crt"));
    wait_for(
        "the rotated client CA admits its clients",
        Duration::from_secs(60),
        || async { info(app.grpc_addr, &ca, Some((&cert, &key))).await.ok() },
    )
    .await;
    let (cert, key) = (file(d, "client.crt"), file(d, "client.key"));
    let old = info(app.grpc_addr, &ca, Some((&cert, &key))).await;
    assert!(old.is_err(), "a client of the replaced CA: {old:?}");
    app.stop().await.unwrap();
}

/// A TLS 1.3 handshake without a client certificate, then a read: the error it ends with.
async fn bare_handshake(addr: SocketAddr, ca: &Path) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let result = tokio::time::timeout(Duration::from_secs(30), async {
        let mut stream = connector.connect(name, tcp).await?;
        // TLS 1.3 finishes the client's side first; the server's verdict comes with the
        // first read.
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await?;
        let mut buf = [0u8; 64];
        stream.read(&mut buf).await
    })
    .await
    .expect("the server answers the handshake within 30 s");
    match result {
        Ok(n) => panic!("the server accepted a client without a certificate ({n} bytes read)"),
        Err(e) => chain(&e),
    }
}

#[tokio::test]
async fn a_call_refused_over_tls_is_audited_with_the_callers_address() {
    let pki = pki();
    let d = pki.path();
    let db = TestDb::new().await;
    let (mut settings, _secret) =
        crate::helpers::hs256_settings(&db, b"edge-tls-hs256-secret-of-32-bytes-at-least");
    grpc_tls(&mut settings, d, false);
    let app = TestApp::spawn_with(settings, |_| {}).await;

    let refused = info(app.grpc_addr, &file(d, "ca.crt"), None)
        .await
        .unwrap_err();
    assert!(refused.contains("Unauthenticated"), "{refused}");
    let peer: String = wait_for("the denial's audit row", Duration::from_secs(60), || async {
        db.client()
            .await
            .query_opt(
                "SELECT diff->>'peer' FROM audit_log WHERE outcome = 'denied' AND action = 'GetInfo'",
                &[],
            )
            .await
            .unwrap()
            .map(|row| row.get::<_, Option<String>>(0).unwrap_or_default())
    })
    .await;
    assert!(peer.starts_with("127.0.0.1:"), "peer {peer:?}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_the_next_connection_without_a_restart() {
    let pki = pki();
    let d = pki.path();
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("tls.crt"), live.path().join("tls.key"));
    std::fs::copy(file(d, "server.crt"), &cert).unwrap();
    std::fs::copy(file(d, "server.key"), &key).unwrap();
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    settings.grpc_tls_cert = Some(cert.clone());
    settings.grpc_tls_key = Some(key.clone());
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let (old_ca, new_ca) = (file(d, "ca.crt"), file(d, "other-ca.crt"));

    let before = Endpoint::from_shared(format!("https://{}", app.grpc_addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(&old_ca).unwrap())),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    call_info(before.clone()).await.unwrap();
    assert!(info(app.grpc_addr, &new_ca, None).await.is_err());

    // Replaced as orchestrators do: written beside, then renamed over.
    replace(&file(d, "server2.crt"), &cert);
    replace(&file(d, "server2.key"), &key);
    wait_for(
        "a new connection served the rotated certificate",
        Duration::from_secs(60),
        || async { info(app.grpc_addr, &new_ca, None).await.ok() },
    )
    .await;
    let old = info(app.grpc_addr, &old_ca, None).await;
    assert!(old.is_err(), "the old certificate is still served: {old:?}");
    call_info(before)
        .await
        .expect("a connection made before the rotation keeps working");

    // A rotation that does not load keeps the last good certificate serving.
    std::fs::write(
        live.path().join("half"),
        "-----BEGIN CERTIFICATE-----\ntruncated",
    )
    .unwrap();
    std::fs::rename(live.path().join("half"), &cert).unwrap();
    info(app.grpc_addr, &new_ca, None)
        .await
        .expect("the previous certificate still serves");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_that_does_not_match_its_certificate_refuses_to_start_naming_both_options() {
    let pki = pki();
    let d = pki.path();
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    settings.grpc_tls_cert = Some(file(d, "server.crt"));
    settings.grpc_tls_key = Some(file(d, "client.key"));
    let Err(error) = TestApp::try_spawn_with(settings, |_| {}).await else {
        panic!("a registry started with another certificate's key");
    };
    let error = format!("{error:#}");
    assert!(
        error.contains("--grpc-tls-cert") && error.contains("--grpc-tls-key"),
        "{error}"
    );
    let key = std::fs::read_to_string(file(d, "client.key")).unwrap();
    let body = key.lines().nth(1).unwrap();
    assert!(!error.contains(body), "{error}");
}

fn replace(from: &Path, to: &Path) {
    let staged = to.with_extension("new");
    std::fs::copy(from, &staged).unwrap();
    std::fs::rename(&staged, to).unwrap();
}

#[tokio::test]
async fn the_http_port_over_tls_answers_readiness_and_takes_webhooks() {
    let pki = pki();
    let d = pki.path();
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    settings.master_keys = Some(MASTER_KEYS.to_owned());
    settings.http_tls_cert = Some(file(d, "server.crt"));
    settings.http_tls_key = Some(file(d, "server.key"));
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let ds = db.datasource_of("hook", "webhook").await;
    crate::helpers::put_secret(&db, MASTER_KEYS, ds.id, "webhook_secret", WEBHOOK_KEY).await;
    let v = db.version(ds.id, json!({})).await;
    db.publish_sql(ds.id, v).await;
    db.wait_for_state(ds.id, "webhook RUNNING", |s| {
        s.worker_status == WorkerStatus::Running && s.running_version == Some(v)
    })
    .await;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let trusting = |ca: &str| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .tls_certs_only([
                reqwest::Certificate::from_pem(&std::fs::read(file(d, ca)).unwrap()).unwrap(),
            ])
            .build()
            .unwrap()
    };
    let base = format!("https://{}", app.http_addr);
    let client = trusting("ca.crt");

    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    assert_eq!(ready.text().await.unwrap(), "ready\n");

    let body = br#"[{"n": 1}, {"n": 2}]"#;
    let delivered = client
        .post(format!("{base}/ingest/{}", ds.id))
        .header("content-type", "application/json")
        .header("x-dsreg-signature", sign(WEBHOOK_KEY.as_bytes(), body))
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(delivered.status().as_u16(), 202);
    assert!(db.records(ds.id, v).await >= 2, "202 means committed");

    let untrusted = trusting("other-ca.crt")
        .get(format!("{base}/readyz"))
        .send()
        .await;
    let error = chain(&untrusted.expect_err("a client not trusting the CA is refused"));
    assert!(error.contains("certificate"), "{error}");
    let (status, _) = plaintext_get(app.http_addr).await;
    assert_ne!(status, Some(200), "a plaintext request gets no answer");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_http_port_with_a_client_ca_refuses_clients_without_its_certificate() {
    let pki = pki();
    let d = pki.path();
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    settings.http_tls_cert = Some(file(d, "server.crt"));
    settings.http_tls_key = Some(file(d, "server.key"));
    settings.http_tls_client_ca = Some(file(d, "client-ca.crt"));
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = |identity: Option<&str>| {
        let ca =
            reqwest::Certificate::from_pem(&std::fs::read(file(d, "ca.crt")).unwrap()).unwrap();
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .tls_certs_only([ca]);
        if let Some(name) = identity {
            let mut pem = std::fs::read(file(d, &format!("{name}.crt"))).unwrap();
            pem.extend(std::fs::read(file(d, &format!("{name}.key"))).unwrap());
            builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        builder.build().unwrap()
    };
    let url = format!("https://{}/readyz", app.http_addr);

    let ready = client(Some("client")).get(&url).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    for identity in [None, Some("stranger")] {
        let refused = client(identity).get(&url).send().await;
        assert!(refused.is_err(), "{identity:?}: {refused:?}");
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn dsreg_serve_takes_its_certificates_from_the_environment() {
    let pki = pki();
    let d = pki.path();
    let db = TestDb::new().await;
    let (cert, key) = (file(d, "server.crt"), file(d, "server.key"));
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let serve = crate::helpers::ServeProcess::start(
        &db.url,
        &[
            ("DSREG_GRPC_TLS_CERT", cert),
            ("DSREG_GRPC_TLS_KEY", key),
            ("DSREG_HTTP_TLS_CERT", cert),
            ("DSREG_HTTP_TLS_KEY", key),
        ],
    )
    .await;
    let ca = file(d, "ca.crt");

    let data = tempfile::tempdir().unwrap();
    let mut command = dsreg(data.path());
    let server = format!("https://{}", serve.grpc_addr);
    command.args(["info", "-o", "json", "--server", &server]);
    command.env("DSREG_CA_FILE", &ca);
    run(command, None).await.assert_success();

    let _ = rustls::crypto::ring::default_provider().install_default();
    let ready = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap()])
        .build()
        .unwrap()
        .get(format!("https://{}/readyz", serve.http_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let serving = serve
        .logs
        .lock()
        .unwrap()
        .iter()
        .find(|line| line.contains("dsreg serving"))
        .cloned()
        .unwrap();
    assert!(
        serving.contains(r#""grpc_tls":true"#) && serving.contains(r#""http_tls":true"#),
        "{serving}"
    );

    // A client that does not trust the certificate is refused, and the refusal is logged.
    let mut command = dsreg(data.path());
    command.args(["info", "--server", &server]);
    assert_eq!(run(command, None).await.status.code(), Some(1));
    wait_for(
        "the refusal's log line",
        Duration::from_secs(60),
        || async {
            serve
                .logs
                .lock()
                .unwrap()
                .iter()
                .any(|line| line.contains("TLS handshake refused") && line.contains("grpc"))
                .then_some(())
        },
    )
    .await;
    serve.stop().await;
}

/// A plaintext `GET /readyz` on a TLS port: the status line's code, if any answer parses.
async fn plaintext_get(addr: SocketAddr) -> (Option<u16>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: dsreg\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .expect("the port ends the plaintext connection within 30 s");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    (status, text)
}

#[tokio::test]
async fn the_cli_reaches_a_tls_registry_with_its_ca_and_with_a_client_certificate() {
    let pki = pki();
    let d = pki.path();
    let data = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    grpc_tls(&mut settings, d, false);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let server = format!("https://{}", app.grpc_addr);
    let ca = file(d, "ca.crt");
    let ca = ca.to_str().unwrap();

    let mut command = dsreg(data.path());
    command.args(["info", "-o", "json", "--server", &server, "--ca-file", ca]);
    let ran = run(command, None).await;
    ran.assert_success();
    let instance = ran.json_lines()[0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!instance.is_empty(), "{}", ran.stdout);

    // The system roots do not include the test's CA.
    let mut command = dsreg(data.path());
    command.args(["info", "--server", &server]);
    let ran = run(command, None).await;
    assert_eq!(ran.status.code(), Some(1), "{}", ran.stderr);
    assert!(
        ran.stderr.contains(&server) && ran.stderr.contains("certificate"),
        "{}",
        ran.stderr
    );
    app.stop().await.unwrap();

    let mut settings = test_settings(&db.url);
    grpc_tls(&mut settings, d, true);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let server = format!("https://{}", app.grpc_addr);
    let tls_env = |command: &mut tokio::process::Command| {
        command
            .env("DSREG_SERVER", &server)
            .env("DSREG_CA_FILE", ca)
            .env("DSREG_CLIENT_CERT", file(d, "client.crt"))
            .env("DSREG_CLIENT_KEY", file(d, "client.key"));
    };
    let mut command = dsreg(data.path());
    tls_env(&mut command);
    command.args(["info", "-o", "json"]);
    run(command, None).await.assert_success();

    let mut command = dsreg(data.path());
    command.args(["info", "--server", &server, "--ca-file", ca]);
    let ran = run(command, None).await;
    assert_eq!(ran.status.code(), Some(1), "without a client certificate");

    // TLS options with a plaintext server are refused, not ignored.
    let mut command = dsreg(data.path());
    tls_env(&mut command);
    command.args(["info", "--server", &format!("http://{}", app.grpc_addr)]);
    let ran = run(command, None).await;
    assert_eq!(ran.status.code(), Some(1));
    assert!(ran.stderr.contains("plaintext"), "{}", ran.stderr);
    app.stop().await.unwrap();
}
