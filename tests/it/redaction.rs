//! Credentials in a source URL stay hidden on every surface that shows the URL: a worker of
//! the real binary, logging at its most verbose, polls `http://user:<password>@…?token=<token>`
//! against a source that fails; the state row, `GetStatus`, `WatchStatus`, the
//! `worker_error` events, the `RunTest` error, every table and every log line are swept for
//! the password and the token. Each surface must still name the (redacted) URL, so the sweep
//! looks where the URL really is.

use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::api::grpc::pb::events_client::EventsClient;
use dsreg::api::grpc::pb::harness_client::HarnessClient;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;

use crate::canary::answering_source;
use crate::helpers::{ServeProcess, TestDb, wait_for};

#[tokio::test]
async fn a_password_and_token_in_a_source_url_show_on_no_surface() {
    let db = TestDb::new().await;
    let password = format!("pw{}", uuid::Uuid::new_v4().simple());
    let token = format!("tk{}", uuid::Uuid::new_v4().simple());
    // Unavailable: the poll retries, and its debug log names the reason.
    let (source, received) = answering_source("503 Service Unavailable").await;
    let url = format!(
        "{}?page=1&access_token={token}",
        source.replacen("http://", &format!("http://reader:{password}@"), 1)
    );
    let server = ServeProcess::start(
        &db.url,
        &[("DSREG_LOG", "trace"), ("DSREG_BACKOFF_BASE_MS", "20")],
    )
    .await;
    let ch = server.channel().await;
    let mut ds = DatasourcesClient::new(ch.clone());
    let mut life = LifecycleClient::new(ch.clone());
    let id = ds
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
    let config =
        serde_json::json!({ "url": url, "interval_ms": 100, "max_retries": 1, "retry_base_ms": 1 });
    let v = ds
        .create_version(pb::CreateVersionRequest {
            datasource_id: id.clone(),
            config_json: config.to_string(),
            comment: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    ds.publish_version(pb::PublishVersionRequest {
        datasource_id: id.clone(),
        version: v.version,
    })
    .await
    .unwrap();

    // Surfaces, each with what it shows.
    let mut surfaces = Vec::<(&str, String)>::new();
    let status = wait_for("the worker failing", Duration::from_secs(30), || {
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
    })
    .await;
    assert!(
        received
            .lock()
            .unwrap()
            .contains("GET /items?page=1&access_token="),
        "the source was polled with the URL's query"
    );
    surfaces.push(("GetStatus error_message", status.error_message.clone()));
    let mut watch = life
        .watch_status(pb::GetStatusRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // The worker restarts and fails again: the stream shows each failure as it happens.
    let failing = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let state = watch.message().await.unwrap().expect("the stream goes on");
            if !state.error_message.is_empty() {
                return state;
            }
        }
    })
    .await
    .expect("WatchStatus shows a failure");
    surfaces.push(("WatchStatus", format!("{failing:?}")));
    let test = HarnessClient::new(ch.clone())
        .run_test(pb::RunTestRequest {
            datasource_id: id.clone(),
            version: v.version,
            fetch_sample: true,
            ..Default::default()
        })
        .await
        .expect_err("the source refuses the sample fetch");
    surfaces.push(("RunTest error", test.message().to_owned()));
    let events = EventsClient::new(ch.clone())
        .list_events(pb::ListEventsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let worker_errors: Vec<String> = events
        .events
        .iter()
        .filter(|e| e.r#type == "worker_error")
        .map(|e| format!("{e:?}"))
        .collect();
    assert!(
        !worker_errors.is_empty(),
        "a worker_error event was written"
    );
    for e in worker_errors {
        surfaces.push(("worker_error event", e));
    }
    let client = db.client().await;
    let state = wait_for("the state row's error", Duration::from_secs(30), || {
        let client = &client;
        let id = id.clone();
        async move {
            client
                .query_one(
                    "SELECT error_message FROM datasource_state WHERE datasource_id = $1::text::uuid",
                    &[&id],
                )
                .await
                .ok()?
                .get::<_, Option<String>>(0)
        }
    })
    .await;
    surfaces.push(("datasource_state.error_message", state));

    // Each surface names the source, with its credentials masked.
    let shown = "http://***@127.0.0.1:";
    for (name, text) in &surfaces {
        assert!(
            text.contains(shown),
            "{name} names the redacted URL: {text}"
        );
        assert!(text.contains("access_token=***"), "{name}: {text}");
    }
    for table in ["datasource_events", "audit_log", "datasource_state"] {
        for row in client
            .query(&format!("SELECT t::text FROM {table} t"), &[])
            .await
            .unwrap()
        {
            surfaces.push(("a row", row.get(0)));
        }
    }
    let logs = server.logs.clone();
    server.stop().await;
    let logs = logs.lock().unwrap().clone();
    assert!(
        logs.iter().any(|l| l.contains(shown)),
        "the logs name the failing source (the retry's reason)"
    );
    for line in &logs {
        surfaces.push(("a log line", line.clone()));
    }
    for (name, text) in &surfaces {
        assert!(
            !text.contains(&password),
            "{name} shows the password: {text}"
        );
        assert!(!text.contains(&token), "{name} shows the token: {text}");
    }
}
