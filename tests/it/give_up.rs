//! The give-up policy against a real failing source: an `http_poll` worker whose local server
//! answers 500 is disabled once it has failed for the give-up time, with an `auto_disabled`
//! event and audit row saying why; a healthy datasource beside it is untouched; enabling it
//! again restarts it and its failure clock. With two `dsreg serve` processes sharing the
//! database, each datasource is disabled by the instance holding its lease.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
use dsreg::domain::WorkerStatus;
use serde_json::json;

use crate::helpers::{ServeProcess, TestApp, TestDb, test_settings, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// A local source answering every poll with `status` (an empty array when 200).
#[derive(Default)]
struct Source {
    status: AtomicU16,
    polls: AtomicUsize,
}

async fn serve_source(source: Arc<Source>) -> String {
    use axum::extract::State;
    async fn handler(State(source): State<Arc<Source>>) -> (StatusCode, String) {
        source.polls.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(source.status.load(Ordering::SeqCst)).unwrap();
        (status, "[]".to_owned())
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .route("/items", axum::routing::get(handler))
        .with_state(source);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/items")
}

async fn status_and_clock(
    db: &TestDb,
    id: uuid::Uuid,
) -> (String, String, Option<chrono::DateTime<chrono::Utc>>) {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT d.status, s.worker_status, s.failing_since FROM datasources d
             JOIN datasource_state s ON s.datasource_id = d.id WHERE d.id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn a_datasource_failing_past_the_give_up_time_is_disabled_with_its_reason_and_can_be_enabled_again()
 {
    // Arrange: a healthy generator first, then a poller whose source answers 500.
    let db = TestDb::new().await;
    let source = Arc::new(Source::default());
    source.status.store(500, Ordering::SeqCst);
    let url = serve_source(source.clone()).await;
    let mut settings = test_settings(&db.url);
    settings.give_up_after_secs = 2;
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let healthy = db.datasource("healthy").await.id;
    let v = db.version(healthy, json!({ "rate_per_sec": 20 })).await;
    db.publish_sql(healthy, v).await;
    db.wait_for_state(healthy, "the healthy one running", |s| {
        s.worker_status == WorkerStatus::Running
    })
    .await;
    let failing = db.datasource_of("failing", "http_poll").await.id;
    let v = db
        .version(
            failing,
            json!({ "url": url, "interval_ms": 100, "max_retries": 0 }),
        )
        .await;
    db.publish_sql(failing, v).await;

    // The clock starts at the first failure.
    let (_, _, since) = wait_for("the failure clock set", WAIT, || async {
        let now = status_and_clock(&db, failing).await;
        now.2.is_some().then_some(now)
    })
    .await;

    // GetStatus shows the clock.
    let mut lifecycle =
        pb::lifecycle_client::LifecycleClient::connect(format!("http://{}", app.grpc_addr))
            .await
            .unwrap();
    let shown = lifecycle
        .get_status(pb::GetStatusRequest {
            datasource_id: failing.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    if shown.status != pb::WorkerStatus::Stopped as i32 {
        assert_eq!(
            shown.failing_since,
            since.map(dsreg::api::grpc::convert::timestamp),
            "{shown:?}"
        );
    }

    // Act: nothing but time; the policy disables it.
    let (status, worker, clock) =
        wait_for("the failing one disabled and stopped", WAIT, || async {
            let now = status_and_clock(&db, failing).await;
            (now.0 == "disabled" && now.1 == "stopped").then_some(now)
        })
        .await;
    assert_eq!((status.as_str(), worker.as_str()), ("disabled", "stopped"));
    assert_eq!(clock, None, "a stopped worker's clock is cleared");
    let events = db.events(failing).await;
    let auto = events
        .iter()
        .find(|e| e.kind == "auto_disabled")
        .expect("an auto_disabled event");
    let reason = auto.payload["reason"].as_str().unwrap();
    assert!(reason.contains("more than 2 s"), "{reason}");
    assert!(reason.contains("source_failed"), "{reason}");
    assert_eq!(auto.payload["give_up_after_secs"], 2);
    assert_eq!(auto.actor, dsreg::supervisor::give_up::ACTOR);
    let failed_for =
        chrono::DateTime::parse_from_rfc3339(auto.payload["failing_since"].as_str().unwrap())
            .unwrap();
    assert_eq!(
        failed_for,
        since.unwrap(),
        "the reason's clock is the one set"
    );
    assert!(
        auto.created_at - since.unwrap() >= chrono::Duration::seconds(2),
        "not before the give-up time"
    );
    assert!(events.iter().any(|e| e.kind == "disabled"));
    let audited: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM audit_log WHERE action = 'AutoDisable'
               AND resource = $1 AND target_id = $2 AND outcome = 'ok'
               AND reason LIKE '%source_failed%'",
            &[&format!("datasource/{failing}"), &failing],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 1);
    let (code, scrape) = crate::serve::http_get(&app.http_addr.to_string(), "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        scrape.contains("\ndsreg_datasources_auto_disabled_total 1\n"),
        "{scrape}"
    );

    // The healthy one beside it is untouched.
    let (status, worker, clock) = status_and_clock(&db, healthy).await;
    assert_eq!(
        (status.as_str(), worker.as_str(), clock),
        ("active", "running", None)
    );
    assert!(
        !db.event_kinds(healthy)
            .await
            .contains(&"auto_disabled".to_owned())
    );

    // An operator enables it again (the source healed meanwhile): it runs, its clock clear.
    source.status.store(200, Ordering::SeqCst);
    let mut datasources = DatasourcesClient::connect(format!("http://{}", app.grpc_addr))
        .await
        .unwrap();
    datasources
        .update_datasource(pb::UpdateDatasourceRequest {
            datasource: Some(pb::Datasource {
                id: failing.to_string(),
                status: pb::DatasourceStatus::Active as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["status".into()],
            }),
            etag: String::new(),
        })
        .await
        .unwrap();
    db.wait_for_state(failing, "running again", |s| {
        s.worker_status == WorkerStatus::Running
    })
    .await;
    let (status, _, clock) = status_and_clock(&db, failing).await;
    assert_eq!((status.as_str(), clock), ("active", None));
    let autos = db
        .event_kinds(failing)
        .await
        .iter()
        .filter(|k| *k == "auto_disabled")
        .count();
    assert_eq!(autos, 1, "given up once");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn with_the_policy_off_a_failing_datasource_keeps_its_clock_and_stays_active() {
    let db = TestDb::new().await;
    let source = Arc::new(Source::default());
    source.status.store(500, Ordering::SeqCst);
    let url = serve_source(source.clone()).await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let failing = db.datasource_of("failing", "http_poll").await.id;
    let v = db
        .version(
            failing,
            json!({ "url": url, "interval_ms": 100, "max_retries": 0 }),
        )
        .await;
    db.publish_sql(failing, v).await;
    let (_, _, since) = wait_for("the failure clock set", WAIT, || async {
        let now = status_and_clock(&db, failing).await;
        now.2.is_some().then_some(now)
    })
    .await;
    // Failures keep coming; the clock stays where the first one set it.
    let polls = source.polls.load(Ordering::SeqCst);
    wait_for("three more failed polls", WAIT, || async {
        (source.polls.load(Ordering::SeqCst) >= polls + 3).then_some(())
    })
    .await;
    let (status, _, clock) = status_and_clock(&db, failing).await;
    assert_eq!(status, "active");
    assert_eq!(clock, since, "the clock runs from the first failure");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn of_two_instances_only_the_lease_holder_disables_a_failing_datasource() {
    let db = TestDb::new().await;
    let source = Arc::new(Source::default());
    source.status.store(500, Ordering::SeqCst);
    let url = serve_source(source.clone()).await;
    let mut failing = Vec::new();
    for i in 0..6 {
        let id = db
            .datasource_of(&format!("failing-{i}"), "http_poll")
            .await
            .id;
        let v = db
            .version(
                id,
                json!({ "url": url, "interval_ms": 100, "max_retries": 0 }),
            )
            .await;
        db.publish_sql(id, v).await;
        failing.push(id);
    }
    let env = |name: &'static str| {
        [
            ("DSREG_INSTANCE_ID", name),
            ("DSREG_GIVE_UP_AFTER_SECS", "2"),
            ("DSREG_LEASE_TTL_MS", "3000"),
            ("DSREG_POOL_SIZE", "4"),
            ("DSREG_BACKOFF_BASE_MS", "20"),
            ("DSREG_BACKOFF_MAX_MS", "1000"),
        ]
    };
    let a = ServeProcess::start(&db.url, &env("giver-a")).await;
    let b = ServeProcess::start(&db.url, &env("giver-b")).await;

    for id in &failing {
        wait_for("every failing datasource disabled", WAIT, || async {
            let now = status_and_clock(&db, *id).await;
            (now.0 == "disabled" && now.1 == "stopped").then_some(())
        })
        .await;
    }
    for id in &failing {
        let events = db.events(*id).await;
        let autos: Vec<_> = events
            .iter()
            .filter(|e| e.kind == "auto_disabled")
            .collect();
        assert_eq!(autos.len(), 1, "{id}: disabled once");
        // The instance that stopped the worker owned it; the one that disabled it is that one.
        let owner = db.state(*id).await.owner_instance;
        assert_eq!(
            autos[0].payload["instance"].as_str(),
            owner.as_deref(),
            "{id}: disabled by its lease holder"
        );
    }
    drop((a, b));
}

#[tokio::test]
async fn a_sweep_acts_only_on_the_datasources_whose_lease_its_instance_holds() {
    // A registry with the policy off owns a datasource that has failed for over a second.
    let db = TestDb::new().await;
    let source = Arc::new(Source::default());
    source.status.store(500, Ordering::SeqCst);
    let url = serve_source(source.clone()).await;
    let mut settings = test_settings(&db.url);
    settings.instance_id = Some("holder".into());
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let failing = db.datasource_of("failing", "http_poll").await.id;
    let v = db
        .version(
            failing,
            json!({ "url": url, "interval_ms": 100, "max_retries": 0 }),
        )
        .await;
    db.publish_sql(failing, v).await;
    let since = wait_for("the failure clock set", WAIT, || async {
        status_and_clock(&db, failing).await.2
    })
    .await;
    let after = Duration::from_secs(1);
    wait_for(
        "a second of failure, by the database's clock",
        WAIT,
        || async {
            let now: chrono::DateTime<chrono::Utc> = db
                .client()
                .await
                .query_one("SELECT now()", &[])
                .await
                .unwrap()
                .get(0);
            (now - since > chrono::Duration::from_std(after).unwrap()).then_some(())
        },
    )
    .await;

    // Another instance's sweep (live or not) leaves it; the holder's disables it.
    let other = dsreg::supervisor::give_up::GiveUp::new(db.pool.clone(), "bystander", after);
    assert!(other.sweep().await.unwrap().is_empty());
    assert_eq!(status_and_clock(&db, failing).await.0, "active");
    let holder = dsreg::supervisor::give_up::GiveUp::new(db.pool.clone(), "holder", after);
    let given_up = holder.sweep().await.unwrap();
    assert_eq!(
        given_up.iter().map(|g| g.datasource_id).collect::<Vec<_>>(),
        [failing]
    );
    assert_eq!(given_up[0].failing_since, since);
    assert_eq!(status_and_clock(&db, failing).await.0, "disabled");
    assert!(holder.sweep().await.unwrap().is_empty(), "given up once");
    app.stop().await.unwrap();
}
