//! Stops are recorded as stops: a worker stopped by its datasource being disabled, or by the
//! registry shutting down, is `stopped`, never `completed` (which only a connector that
//! finished its work on its own is).

use std::time::Duration;

use serde_json::json;

use crate::helpers::{TestApp, TestDb, wait_for};

const WORKERS: usize = 40;

async fn stop_reasons(db: &TestDb) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT payload->>'reason' FROM datasource_events WHERE type = 'worker_stopped'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn start_idle_generators(db: &TestDb) -> Vec<uuid::Uuid> {
    let mut ids = Vec::new();
    for i in 0..WORKERS {
        let ds = db.datasource(&format!("idle-{i}")).await;
        // Rate 0 idles until cancelled, then returns Ok: the shape that raced with the stop.
        let v = db.version(ds.id, json!({ "rate_per_sec": 0 })).await;
        db.publish_sql(ds.id, v).await;
        ids.push(ds.id);
    }
    let client = db.client().await;
    wait_for(
        "every idle generator running",
        Duration::from_secs(30),
        || async {
            let running: i64 = client
                .query_one(
                    "SELECT count(*) FROM datasource_state WHERE worker_status = 'running'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (running == WORKERS as i64).then_some(())
        },
    )
    .await;
    ids
}

#[tokio::test]
async fn disabled_and_shut_down_workers_are_recorded_as_stopped_not_completed() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ids = start_idle_generators(&db).await;
    for id in &ids[..WORKERS / 2] {
        db.set_status(*id, "disabled").await;
    }
    wait_for(
        "the disabled workers stopped",
        Duration::from_secs(30),
        || async { (stop_reasons(&db).await.len() >= WORKERS / 2).then_some(()) },
    )
    .await;
    app.stop().await.unwrap();

    let reasons = stop_reasons(&db).await;
    // Every worker's own stop is `stopped` (later resyncs may add "not running on this
    // instance" for disabled ones); none is `completed`.
    assert!(
        reasons.iter().filter(|r| *r == "stopped").count() >= WORKERS,
        "{reasons:?}"
    );
    assert!(!reasons.iter().any(|r| r == "completed"), "{reasons:?}");
}

#[tokio::test]
async fn an_open_health_watch_does_not_hold_the_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let db = TestDb::new().await;
    let mut settings = crate::helpers::test_settings(&db.url);
    // Long enough that a shutdown held to the grace would outlast the wait below.
    settings.shutdown_grace_ms = 120_000;
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let stopping = tokio::spawn(app.stop());
    let mut last = first.status;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(message)) = watch.message().await {
            last = message.status;
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch stream ended with the shutdown");
    assert_eq!(last, ServingStatus::NotServing as i32);
    tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("the registry stopped without waiting out the grace")
        .unwrap()
        .unwrap();
}
