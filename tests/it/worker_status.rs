//! A worker's status tells the truth without lag, through the real API: a restart shows in
//! `WatchStatus` and in the counters (restarts requested apart from failures), and a killed
//! owner is reported gone (`owner_live: false`) long before its lease expires, and the
//! counters of a worker are its counts now, not the last heartbeat's.

use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use serde_json::json;

use crate::helpers::cluster::fleet;
use crate::helpers::{ServeProcess, TestApp, TestDb, wait_for};

const WAIT: Duration = Duration::from_secs(60);

async fn lifecycle(addr: impl std::fmt::Display) -> LifecycleClient<tonic::transport::Channel> {
    LifecycleClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn status_of(id: uuid::Uuid) -> pb::GetStatusRequest {
    pb::GetStatusRequest {
        datasource_id: id.to_string(),
    }
}

#[tokio::test]
async fn a_restart_shows_in_the_watch_and_counts_apart_from_failures() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource("watched").await;
    let v = db.version(ds.id, json!({ "rate_per_sec": 10 })).await;
    db.publish_sql(ds.id, v).await;
    db.wait_for_state(ds.id, "RUNNING", |s| {
        s.worker_status == dsreg::domain::WorkerStatus::Running && s.running_version == Some(v)
    })
    .await;
    let mut client = lifecycle(app.grpc_addr).await;
    let mut watch = client
        .watch_status(status_of(ds.id))
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.restarts_requested, 0, "{first:?}");
    assert!(first.owner_live, "a running instance owns it: {first:?}");

    let restarted = client
        .restart_worker(pb::LifecycleRequest {
            datasource_id: ds.id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(restarted.settled, "{restarted:?}");
    assert_eq!(restarted.restarts_requested, 1, "{restarted:?}");
    assert_eq!(restarted.failures_since_healthy, 0, "{restarted:?}");

    // The watch shows the restart: a state that counts it.
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let state = watch.message().await.unwrap().expect("the watch goes on");
            if state.restarts_requested == 1 {
                return state;
            }
        }
    })
    .await
    .expect("the watch shows the restart");
    assert_eq!(seen.datasource_id, ds.id.to_string());

    let metrics = client
        .get_datasource_metrics(status_of(ds.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(metrics.restarts_requested, 1, "{metrics:?}");
    assert_eq!(
        metrics.restarts_total, 1,
        "the one restart, run: {metrics:?}"
    );
    assert_eq!(metrics.failures_since_healthy, 0, "{metrics:?}");
    drop(watch);
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_is_reported_gone_before_its_lease_expires() {
    let db = TestDb::new().await;
    let ids = fleet(&**db.client().await, 4, 1.0).await;
    // A lease time far longer than the test waits: whatever says the owner is gone is not the
    // lease running out.
    let env = |name: &'static str| {
        [
            ("DSREG_INSTANCE_ID", name),
            ("DSREG_LEASE_TTL_MS", "60000"),
            ("DSREG_HEARTBEAT_INTERVAL_MS", "1000"),
            ("DSREG_POOL_SIZE", "4"),
            ("DSREG_LOG", "info"),
        ]
    };
    let mut a = ServeProcess::start(&db.url, &env("node-a")).await;
    let b = ServeProcess::start(&db.url, &env("node-b")).await;
    let through_b = LifecycleClient::new(b.channel().await);

    // A datasource node-a runs, as node-b reports it.
    let owned = wait_for("a datasource running on node-a", WAIT, || {
        let mut client = through_b.clone();
        let ids = ids.clone();
        async move {
            for id in ids {
                let s = client.get_status(status_of(id)).await.ok()?.into_inner();
                if s.owner_instance == "node-a" && s.status() == pb::WorkerStatus::Running {
                    return Some((id, s));
                }
            }
            None
        }
    })
    .await;
    let (id, before) = owned;
    assert!(before.owner_live, "{before:?}");

    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();

    let gone = wait_for("node-b reports node-a gone", WAIT, || {
        let mut client = through_b.clone();
        async move {
            let s = client.get_status(status_of(id)).await.ok()?.into_inner();
            (!s.owner_live).then_some(s)
        }
    })
    .await;
    let lease_left: bool = db
        .client()
        .await
        .query_one(
            "SELECT i.leases_until > now() AND l.owner = 'node-a' \
             FROM datasource_leases l JOIN dsreg_instances i ON i.id = l.owner \
             WHERE l.datasource_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        lease_left,
        "reported gone while node-a's lease still runs: {gone:?}"
    );
    assert_eq!(gone.owner_instance, "node-a", "{gone:?}");
    b.stop().await;
}

#[tokio::test]
async fn the_metrics_of_a_worker_of_this_instance_are_its_counters_now() {
    let db = TestDb::new().await;
    let mut settings = crate::helpers::test_settings(&db.url);
    // No heartbeat writes a snapshot while the test runs: what it reads is the live count.
    settings.heartbeat_interval_ms = 600_000;
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let ds = db.datasource("counted").await;
    let v = db.version(ds.id, json!({ "rate_per_sec": 50 })).await;
    db.publish_sql(ds.id, v).await;
    wait_for("21 records written", WAIT, || async {
        (db.records(ds.id, v).await >= 21).then_some(())
    })
    .await;
    let client = lifecycle(app.grpc_addr).await;
    let metrics = wait_for("the metrics count them", WAIT, || {
        let mut client = client.clone();
        async move {
            let m = client
                .get_datasource_metrics(status_of(ds.id))
                .await
                .ok()?
                .into_inner();
            (m.records_total >= 21).then_some(m)
        }
    })
    .await;
    let stored = db.state(ds.id).await;
    assert_eq!(
        stored.metrics.get("records_total"),
        None,
        "no snapshot was written: {:?} (counted {})",
        stored.metrics,
        metrics.records_total
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_worker_counts_its_restarts_apart_from_restarts_requested_and_failures() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let source = format!("http://{}/", listener.local_addr().unwrap());
    let router = axum::Router::new().route(
        "/",
        axum::routing::get(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let ds = db.datasource_of("retried", "http_poll").await;
    let v = db
        .version(
            ds.id,
            json!({ "url": source, "interval_ms": 100, "max_retries": 0 }),
        )
        .await;
    db.publish_sql(ds.id, v).await;
    let client = lifecycle(app.grpc_addr).await;
    // Every run fails, and each failure is followed by a run: restarts nobody asked for.
    let metrics = wait_for("two restarts after failures", WAIT, || {
        let mut client = client.clone();
        async move {
            let m = client
                .get_datasource_metrics(status_of(ds.id))
                .await
                .ok()?
                .into_inner();
            // The failures are counted as they happen; the state writer records them a
            // moment later.
            (m.restarts_total >= 2 && m.failures_since_healthy >= 2).then_some(m)
        }
    })
    .await;
    assert_eq!(metrics.restarts_requested, 0, "{metrics:?}");

    // The CLI shows the three counts, each under its own name.
    let dir = tempfile::tempdir().unwrap();
    let mut command = crate::cli::dsreg(dir.path());
    command.args([
        "status",
        "metrics",
        &ds.id.to_string(),
        "--server",
        &format!("http://{}", app.grpc_addr),
    ]);
    let ran = crate::cli::run(command, None).await;
    ran.assert_success();
    let field = |name: &str| -> i64 {
        ran.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {}", ran.stdout))
            .trim()
            .replace(',', "")
            .parse()
            .unwrap()
    };
    assert!(field("restarts") >= 2, "{}", ran.stdout);
    assert_eq!(field("restarts requested"), 0, "{}", ran.stdout);
    assert!(field("failures") >= 2, "{}", ran.stdout);
    app.stop().await.unwrap();
}
