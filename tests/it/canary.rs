//! The canary: a secret with a unique value is put over gRPC into a registry running as the
//! real binary at the most verbose log level; its worker uses it against a source that refuses
//! it, fails and retries; the harness fetches a sample with it, is refused it for a config
//! nobody saved that points elsewhere (that server receives nothing), and sends a test
//! credential there instead; then every RPC's answer, every event, audit and state row and
//! every captured log line is searched for both values. The source must have received the
//! secret (so it really was used); nothing else may show either.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::api::grpc::pb::events_client::EventsClient;
use dsreg::api::grpc::pb::harness_client::HarnessClient;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use dsreg::api::grpc::pb::registry_client::RegistryClient;
use dsreg::api::grpc::pb::secrets_client::SecretsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{ServeProcess, TestDb, otlp, wait_for};

const MASTER_KEYS: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A source that answers every request 401 and keeps what it was sent.
async fn refusing_source() -> (String, Arc<Mutex<String>>) {
    answering_source("401 Unauthorized").await
}

/// A source that answers every request with `status` (`"503 Service Unavailable"`) and an
/// empty body, and keeps what it was sent.
pub(crate) async fn answering_source(status: &'static str) -> (String, Arc<Mutex<String>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let kept = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 8192];
                let n = socket.read(&mut buf).await.unwrap_or(0);
                kept.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
                let answer =
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    (format!("http://{addr}/items"), seen)
}

#[tokio::test]
async fn a_secret_value_appears_in_no_answer_row_or_log() {
    let db = TestDb::new().await;
    let canary = format!("canary-{}", uuid::Uuid::new_v4().simple());
    let test_canary = format!("test-canary-{}", uuid::Uuid::new_v4().simple());
    let (source, received) = refusing_source().await;

    let (otlp_endpoint, spans) = otlp::receiver().await;
    let server = ServeProcess::start(
        &db.url,
        &[
            ("DSREG_MASTER_KEYS", MASTER_KEYS),
            ("DSREG_LOG", "trace"),
            ("DSREG_BACKOFF_BASE_MS", "20"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp_endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
    .await;
    let ch = server.channel().await;
    let mut ds = DatasourcesClient::new(ch.clone());
    let mut life = LifecycleClient::new(ch.clone());
    let mut answers = Vec::<String>::new();

    let created = ds
        .create_datasource(pb::CreateDatasourceRequest {
            org: "acme".into(),
            project: "ingest".into(),
            name: "api".into(),
            kind: "http_poll".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = created.id.clone();
    let put = SecretsClient::new(ch.clone())
        .put_secret(pb::PutSecretRequest {
            datasource_id: id.clone(),
            name: "api_token".into(),
            value: canary.clone().into_bytes(),
        })
        .await
        .unwrap()
        .into_inner();
    answers.push(format!("{put:?}"));
    let config = serde_json::json!({ "url": source, "interval_ms": 100, "bearer_secret": "api_token", "max_retries": 0 });
    let v = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: config.to_string(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    answers.push(format!("{v:?}"));
    answers.push(format!(
        "{:?}",
        ds.publish_version(pb::PublishVersionRequest {
            datasource_id: id.clone(),
            version: v.version
        })
        .await
        .unwrap()
    ));

    // The worker uses the secret, is refused, and fails.
    let failed = wait_for(
        "the worker failing with the refused secret",
        Duration::from_secs(30),
        || {
            let mut life = life.clone();
            let id = id.clone();
            async move {
                let s = life
                    .get_status(pb::GetStatusRequest { datasource_id: id })
                    .await
                    .ok()?
                    .into_inner();
                (!s.error_message.is_empty()).then_some(s)
            }
        },
    )
    .await;
    answers.push(format!("{failed:?}"));
    assert!(
        received.lock().unwrap().contains(&canary),
        "the source never saw the secret"
    );

    // The harness fetches a sample with it, and is refused too.
    let test = HarnessClient::new(ch.clone())
        .run_test(pb::RunTestRequest {
            datasource_id: id.clone(),
            version: v.version,
            fetch_sample: true,
            ..Default::default()
        })
        .await;
    answers.push(format!("{test:?}"));

    // The harness path with a config nobody saved: to another server, the stored secret is
    // refused and that server receives nothing; test credentials go there instead, and are
    // swept for like the stored secret.
    let (elsewhere, elsewhere_received) = refusing_source().await;
    let unsaved =
        serde_json::json!({ "url": elsewhere, "bearer_secret": "api_token", "max_retries": 0 });
    let refused = HarnessClient::new(ch.clone())
        .run_test(pb::RunTestRequest {
            datasource_id: id.clone(),
            config_json: unsaved.to_string(),
            fetch_sample: true,
            ..Default::default()
        })
        .await
        .expect_err("stored secrets follow saved destinations");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    answers.push(format!("{refused:?}"));
    assert!(
        elsewhere_received.lock().unwrap().is_empty(),
        "the unsaved destination received a request"
    );
    let with_test_secret = HarnessClient::new(ch.clone())
        .run_test(pb::RunTestRequest {
            datasource_id: id.clone(),
            config_json: unsaved.to_string(),
            fetch_sample: true,
            test_secrets: [("api_token".to_owned(), test_canary.clone())].into(),
            ..Default::default()
        })
        .await;
    answers.push(format!("{with_test_secret:?}"));
    let seen_elsewhere = elsewhere_received.lock().unwrap().clone();
    assert!(
        seen_elsewhere.contains(&test_canary),
        "the test credential was used"
    );
    assert!(
        !seen_elsewhere.contains(&canary),
        "the unsaved destination received the stored secret"
    );

    answers.push(format!(
        "{:?}",
        life.restart_worker(pb::LifecycleRequest {
            datasource_id: id.clone()
        })
        .await
    ));

    // Every read.
    answers.push(format!(
        "{:?}",
        ds.get_datasource(pb::GetDatasourceRequest { id: id.clone() })
            .await
            .unwrap()
    ));
    answers.push(format!(
        "{:?}",
        ds.list_datasources(pb::ListDatasourcesRequest::default())
            .await
            .unwrap()
    ));
    answers.push(format!(
        "{:?}",
        ds.list_versions(pb::ListVersionsRequest {
            datasource_id: id.clone()
        })
        .await
        .unwrap()
    ));
    answers.push(format!(
        "{:?}",
        life.get_datasource_metrics(pb::GetStatusRequest {
            datasource_id: id.clone()
        })
        .await
        .unwrap()
    ));
    answers.push(format!(
        "{:?}",
        SecretsClient::new(ch.clone())
            .list_secrets(pb::ListSecretsRequest {
                datasource_id: id.clone()
            })
            .await
            .unwrap()
    ));
    answers.push(format!(
        "{:?}",
        EventsClient::new(ch.clone())
            .list_events(pb::ListEventsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
    ));
    answers.push(format!(
        "{:?}",
        RegistryClient::new(ch.clone())
            .get_registry_metrics(pb::GetRegistryMetricsRequest {})
            .await
            .unwrap()
    ));
    let mut watch = life
        .watch_status(pb::GetStatusRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    answers.push(format!("{:?}", watch.message().await.unwrap()));

    // The Prometheus scrape.
    let (code, scrape) = crate::serve::http_get(&server.http_addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(scrape.contains("dsreg_datasource_errors_total"), "{scrape}");
    answers.push(scrape);

    // Every row of the tables a secret could leak into (the secrets table holds ciphertext).
    let client = db.client().await;
    for table in [
        "datasource_events",
        "audit_log",
        "datasource_state",
        "datasource_versions",
        "datasources",
        "datasource_dead_letters",
    ] {
        for row in client
            .query(&format!("SELECT t::text FROM {table} t"), &[])
            .await
            .unwrap()
        {
            answers.push(row.get(0));
        }
    }
    for row in client
        .query(
            "SELECT encode(ciphertext, 'escape'), fingerprint FROM datasource_secrets",
            &[],
        )
        .await
        .unwrap()
    {
        answers.push(row.get(0));
        answers.push(row.get(1));
    }

    let logs = server.logs.clone();
    // Stopping flushes every span still queued to the receiver.
    server.stop().await;
    let logs = logs.lock().unwrap().clone();
    let spans = spans.0.lock().unwrap().clone();
    assert!(
        spans.iter().any(|s| s.name == "dsreg.v1.Secrets/PutSecret")
            && spans.iter().any(|s| s.name == "harness.run"),
        "the spans of the calls were exported: {} spans",
        spans.len()
    );
    for span in &spans {
        let text = format!("{span:?}");
        assert!(!text.contains(&canary), "a span shows the secret: {text}");
        assert!(
            !text.contains(&test_canary),
            "a span shows the test credential: {text}"
        );
    }
    assert!(
        logs.len() > 50,
        "trace logging captured: {} lines",
        logs.len()
    );
    for (i, text) in answers.iter().enumerate() {
        assert!(
            !text.contains(&canary),
            "answer/row {i} shows the secret: {text}"
        );
        assert!(
            !text.contains(&test_canary),
            "answer/row {i} shows the test credential: {text}"
        );
    }
    for line in &logs {
        assert!(
            !line.contains(&canary),
            "a log line shows the secret: {line}"
        );
        assert!(
            !line.contains(&test_canary),
            "a log line shows the test credential: {line}"
        );
    }
}
