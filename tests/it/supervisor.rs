//! The reconcile loop end to end: SQL publishes and status changes drive workers; invalid
//! versions, failing and panicking connectors, stalls, stops that need an abort, a database
//! restart, a crashed registry, out-of-order commits, a 1,000-datasource publish and forged
//! notifications.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use dsreg::connectors::{BoxFuture, ConfigError, Connector, Error, KindInfo, Mode, RunContext};
use dsreg::db::repository::WriteContext;
use dsreg::domain::WorkerStatus;
use dsreg::supervisor::ops::{self, Op};
use serde_json::json;

use crate::helpers::{TestApp, TestDb, wait_for};

const WAIT: Duration = Duration::from_secs(15);

#[derive(Clone, Copy)]
enum Behaviour {
    Fail,
    Panic,
    Stuck,
    Deaf,
}

/// A connector kind whose behaviour a test chooses.
struct TestKind(Behaviour, &'static KindInfo);

fn kind(name: &'static str, behaviour: Behaviour) -> Arc<dyn Connector> {
    let info: &'static KindInfo = Box::leak(Box::new(KindInfo {
        name,
        version: "1.0.0",
        summary: "test kind",
        config_schema: json!({ "type": "object" }),
        secrets: &[],
        mode: Mode::Pull,
        can_backfill: false,
    }));
    Arc::new(TestKind(behaviour, info))
}

impl Connector for TestKind {
    fn info(&self) -> &KindInfo {
        self.1
    }

    fn validate(&self, _config: &serde_json::Value) -> Result<(), ConfigError> {
        Ok(())
    }

    fn stall_after(&self, _config: &serde_json::Value) -> Option<Duration> {
        matches!(self.0, Behaviour::Stuck).then_some(Duration::from_millis(150))
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<Result<(), Error>> {
        let behaviour = self.0;
        Box::pin(async move {
            match behaviour {
                Behaviour::Fail => Err(Error::Source("the source refused the connection".into())),
                Behaviour::Panic => panic!("connector bug"),
                Behaviour::Stuck => {
                    ctx.cancel.cancelled().await;
                    Ok(())
                }
                Behaviour::Deaf => {
                    ctx.health.working();
                    std::future::pending().await
                }
            }
        })
    }
}

static TEST_KINDS: LazyLock<Vec<Arc<dyn Connector>>> = LazyLock::new(|| {
    vec![
        kind("failing", Behaviour::Fail),
        kind("panicking", Behaviour::Panic),
        kind("stuck", Behaviour::Stuck),
        kind("deaf", Behaviour::Deaf),
    ]
});

fn with_test_kinds(app: &mut dsreg::app::App) {
    for k in TEST_KINDS.iter() {
        app.catalog.register(k.clone());
    }
}

fn running_on(version: i32) -> impl Fn(&dsreg::db::repository::state::State) -> bool {
    move |s| s.worker_status == WorkerStatus::Running && s.running_version == Some(version)
}

fn stopped(s: &dsreg::db::repository::state::State) -> bool {
    s.worker_status == WorkerStatus::Stopped
}

/// Waits until `n` workers are RUNNING on version 1.
async fn wait_all_running_on_1(db: &TestDb, n: usize, timeout: Duration) {
    let client = db.client().await;
    wait_for(&format!("{n} workers RUNNING on version 1"), timeout, || async {
        let running: i64 = client
            .query_one(
                "SELECT count(*) FROM datasource_state WHERE worker_status = 'running' AND running_version = 1",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (running == n as i64).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sql_publishes_and_status_changes_drive_the_worker() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource("orders").await;
    let v1 = db.version(ds.id, json!({ "rate_per_sec": 200 })).await;

    db.publish_sql(ds.id, v1).await;
    db.wait_for_state(ds.id, "RUNNING on v1", running_on(v1))
        .await;
    wait_for("records from v1 in the sink", WAIT, || async {
        (db.records(ds.id, v1).await > 0).then_some(())
    })
    .await;

    let v2 = db
        .version(
            ds.id,
            json!({ "rate_per_sec": 200, "template": { "source": "v2" } }),
        )
        .await;
    db.publish_sql(ds.id, v2).await;
    db.wait_for_state(ds.id, "hot reload to v2", running_on(v2))
        .await;
    assert!(
        db.event_kinds(ds.id)
            .await
            .contains(&"reload_applied".to_owned())
    );

    db.set_status(ds.id, "disabled").await;
    db.wait_for_state(ds.id, "STOPPED when disabled", stopped)
        .await;
    db.set_status(ds.id, "active").await;
    db.wait_for_state(ds.id, "RUNNING when re-enabled", running_on(v2))
        .await;
    db.set_status(ds.id, "archived").await;
    db.wait_for_state(ds.id, "STOPPED when archived", stopped)
        .await;

    // Gone: a resync after the archive starts nothing, and the sink stops hearing from it.
    let events = db.events(ds.id).await;
    let last_stop = events
        .iter()
        .rposition(|e| e.kind == "worker_stopped")
        .unwrap();
    assert!(
        events[last_stop..]
            .iter()
            .all(|e| e.kind != "worker_starting")
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_invalid_new_version_is_rejected_and_the_old_worker_keeps_running() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource("guarded").await;
    let good = db.version(ds.id, json!({ "rate_per_sec": 100 })).await;
    db.publish_sql(ds.id, good).await;
    db.wait_for_state(ds.id, "RUNNING on the good version", running_on(good))
        .await;

    let bad = db.version(ds.id, json!({ "rate_per_sec": "fast" })).await;
    db.publish_sql(ds.id, bad).await;
    let state = db
        .wait_for_state(ds.id, "the datasource flagged", |s| {
            s.error_code.as_deref() == Some("reload_rejected")
        })
        .await;
    assert_eq!(state.worker_status, WorkerStatus::Running);
    assert_eq!(state.running_version, Some(good));
    assert!(state.error_message.unwrap().contains("rate_per_sec"));
    let rejected = db
        .events(ds.id)
        .await
        .into_iter()
        .find(|e| e.kind == "reload_rejected")
        .unwrap();
    assert_eq!(rejected.version, Some(bad));
    assert!(
        rejected.payload["reason"]
            .as_str()
            .unwrap()
            .contains("rate_per_sec")
    );

    // The old version keeps producing.
    let before = db.records(ds.id, good).await;
    wait_for("more records from the old version", WAIT, || async {
        (db.records(ds.id, good).await > before).then_some(())
    })
    .await;
    assert_eq!(db.records(ds.id, bad).await, 0);

    // A fixed version clears the flag.
    let fixed = db.version(ds.id, json!({ "rate_per_sec": 50 })).await;
    db.publish_sql(ds.id, fixed).await;
    let state = db
        .wait_for_state(ds.id, "RUNNING on the fix", running_on(fixed))
        .await;
    assert_eq!(state.error_code, None);
    app.stop().await.unwrap();
}

/// Waits for `n` failures of a datasource; returns, per failure, the delay it announced and
/// the time until the next start actually began.
async fn restart_delays(db: &TestDb, id: uuid::Uuid, n: usize) -> Vec<(Duration, Duration)> {
    let events = wait_for("repeated restarts", WAIT, || async {
        let events = db.events(id).await;
        let starts = events
            .iter()
            .filter(|e| e.kind == "worker_starting")
            .count();
        (starts > n).then_some(events)
    })
    .await;
    let mut delays = Vec::new();
    let mut failed_at = None;
    for e in &events {
        match (e.kind.as_str(), failed_at.take()) {
            ("worker_error", _) => {
                let announced = Duration::from_millis(e.payload["retry_in_ms"].as_u64().unwrap());
                failed_at = Some((e.created_at, announced));
            }
            ("worker_starting", Some((at, announced))) => {
                delays.push((announced, (e.created_at - at).to_std().unwrap()));
            }
            (_, pending) => failed_at = pending,
        }
    }
    delays
}

#[tokio::test]
async fn failing_and_panicking_connectors_restart_with_growing_delays_and_the_registry_stays_up() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, with_test_kinds).await;
    let healthy = db.datasource("healthy").await;
    let hv = db.version(healthy.id, json!({ "rate_per_sec": 100 })).await;
    db.publish_sql(healthy.id, hv).await;
    let mut ids = Vec::new();
    for kind in ["failing", "panicking"] {
        let ds = db.datasource_of(kind, kind).await;
        let v = db.version(ds.id, json!({})).await;
        db.publish_sql(ds.id, v).await;
        ids.push(ds.id);
    }
    for id in &ids {
        // Delays are drawn from [½, 1] × 20 ms × 2ⁿ: each is longer than the one two before
        // it, whatever the jitter, and the worker really waited that long.
        let delays = restart_delays(&db, *id, 4).await;
        assert!(delays.len() >= 4, "{delays:?}");
        for pair in delays.windows(3) {
            assert!(pair[2].0 > pair[0].0, "announced delays grow: {delays:?}");
        }
        for (announced, waited) in &delays {
            assert!(
                waited >= announced,
                "waited {waited:?} before restarting, announced {announced:?}"
            );
        }
        // Between a failure and the next, a restart briefly shows the worker running with
        // no error: wait for a failure to be on record rather than reading one moment.
        db.wait_for_state(*id, "the failures on record", |s| {
            s.restart_count >= 4 && s.error_code.is_some()
        })
        .await;
    }
    assert_eq!(
        db.state(ids[1]).await.error_code.as_deref(),
        Some("connector_panicked")
    );
    // Five failures within the window: a crash loop, visible as such.
    db.wait_for_state(ids[0], "a visible crash loop", |s| {
        s.worker_status == WorkerStatus::CrashLoop
    })
    .await;
    // The registry and the healthy worker are unaffected.
    let (status, _) = crate::serve::http_get(&app.http_addr.to_string(), "/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(
        db.state(healthy.id).await.worker_status,
        WorkerStatus::Running
    );
    let before = db.records(healthy.id, hv).await;
    wait_for("the healthy worker producing", WAIT, || async {
        (db.records(healthy.id, hv).await > before).then_some(())
    })
    .await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_worker_without_progress_is_stalled_and_one_that_ignores_stop_is_aborted() {
    let db = TestDb::new().await;
    let mut settings = crate::helpers::test_settings(&db.url);
    settings.heartbeat_interval_ms = 50;
    settings.stop_deadline_ms = 200;
    let app = TestApp::spawn_with(settings, with_test_kinds).await;
    let stuck = db.datasource_of("stuck", "stuck").await;
    let deaf = db.datasource_of("deaf", "deaf").await;
    for ds in [&stuck, &deaf] {
        let v = db.version(ds.id, json!({})).await;
        db.publish_sql(ds.id, v).await;
    }
    db.wait_for_state(stuck.id, "STALLED without progress", |s| {
        s.worker_status == WorkerStatus::Stalled
    })
    .await;
    assert!(
        db.event_kinds(stuck.id)
            .await
            .contains(&"worker_stalled".to_owned())
    );

    db.wait_for_state(deaf.id, "RUNNING", |s| {
        s.worker_status == WorkerStatus::Running
    })
    .await;
    ops::apply(&db.pool, &WriteContext::actor("ops"), &Op::Stop(deaf.id))
        .await
        .unwrap();
    db.wait_for_state(deaf.id, "STOPPED after the deadline", stopped)
        .await;
    let stop = db
        .events(deaf.id)
        .await
        .into_iter()
        .rfind(|e| e.kind == "worker_stopped")
        .unwrap();
    assert_eq!(stop.payload["aborted"], true, "the abort is recorded");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn lifecycle_operations_are_idempotent_and_applied_through_the_tables() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource("ops").await;
    let v = db.version(ds.id, json!({ "rate_per_sec": 10 })).await;
    db.publish_sql(ds.id, v).await;
    db.wait_for_state(ds.id, "RUNNING", running_on(v)).await;
    let ctx = WriteContext::actor("ops");

    assert_eq!(
        ops::apply(&db.pool, &ctx, &Op::Start(ds.id))
            .await
            .unwrap()
            .outcome,
        dsreg::db::repository::state::Outcome::Unchanged
    );
    assert_eq!(
        ops::apply(&db.pool, &ctx, &Op::Stop(ds.id))
            .await
            .unwrap()
            .outcome,
        dsreg::db::repository::state::Outcome::Changed
    );
    assert_eq!(
        ops::apply(&db.pool, &ctx, &Op::Stop(ds.id))
            .await
            .unwrap()
            .outcome,
        dsreg::db::repository::state::Outcome::Unchanged
    );
    db.wait_for_state(ds.id, "STOPPED", stopped).await;
    ops::apply(&db.pool, &ctx, &Op::Start(ds.id)).await.unwrap();
    db.wait_for_state(ds.id, "RUNNING again", running_on(v))
        .await;

    let starts = |kinds: Vec<String>| kinds.iter().filter(|k| *k == "worker_starting").count();
    let before = starts(db.event_kinds(ds.id).await);
    ops::apply(&db.pool, &ctx, &Op::Restart(ds.id))
        .await
        .unwrap();
    wait_for("a restart", WAIT, || async {
        (starts(db.event_kinds(ds.id).await) > before).then_some(())
    })
    .await;
    db.wait_for_state(ds.id, "RUNNING after restart", running_on(v))
        .await;

    // A reload with nothing changed restarts nothing.
    let before = starts(db.event_kinds(ds.id).await);
    ops::apply(&db.pool, &ctx, &Op::Reload(Some(ds.id)))
        .await
        .unwrap();
    ops::apply(&db.pool, &ctx, &Op::Reload(None)).await.unwrap();
    let marker = db.datasource("marker").await;
    let mv = db.version(marker.id, json!({ "rate_per_sec": 0 })).await;
    db.publish_sql(marker.id, mv).await;
    db.wait_for_state(marker.id, "the marker RUNNING", running_on(mv))
        .await;
    assert_eq!(starts(db.event_kinds(ds.id).await), before);
    assert!(matches!(
        ops::apply(&db.pool, &ctx, &Op::Stop(uuid::Uuid::new_v4())).await,
        Err(dsreg::db::Error::DatasourceNotFound(_))
    ));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_stops_every_worker_and_writes_final_states() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let ds = db.datasource(&format!("ds-{i}")).await;
        let v = db.version(ds.id, json!({ "rate_per_sec": 50 })).await;
        db.publish_sql(ds.id, v).await;
        ids.push((ds.id, v));
    }
    for (id, v) in &ids {
        db.wait_for_state(*id, "RUNNING", running_on(*v)).await;
    }
    app.stop().await.unwrap();
    for (id, _) in &ids {
        assert_eq!(db.state(*id).await.worker_status, WorkerStatus::Stopped);
    }
}

#[tokio::test]
async fn a_new_registry_after_a_crash_converges_to_the_tables() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let kept = db.datasource("kept").await;
    let dropped = db.datasource("dropped").await;
    let kv1 = db.version(kept.id, json!({ "rate_per_sec": 10 })).await;
    let dv = db.version(dropped.id, json!({ "rate_per_sec": 10 })).await;
    db.publish_sql(kept.id, kv1).await;
    db.publish_sql(dropped.id, dv).await;
    db.wait_for_state(kept.id, "RUNNING", running_on(kv1)).await;
    db.wait_for_state(dropped.id, "RUNNING", running_on(dv))
        .await;

    app.crash().await;
    let kv2 = db.version(kept.id, json!({ "rate_per_sec": 20 })).await;
    db.publish_sql(kept.id, kv2).await;
    db.set_status(dropped.id, "disabled").await;
    // Nothing runs them now; the rows still say what the dead process last wrote.
    assert_eq!(
        db.state(dropped.id).await.worker_status,
        WorkerStatus::Running
    );

    let app = TestApp::spawn(&db.url, |_| {}).await;
    db.wait_for_state(
        kept.id,
        "RUNNING on the version published while down",
        running_on(kv2),
    )
    .await;
    db.wait_for_state(dropped.id, "the stale RUNNING corrected", stopped)
        .await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn two_publishers_committing_out_of_id_order_are_both_applied() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let a = db.datasource("a").await;
    let b = db.datasource("b").await;
    let va = db.version(a.id, json!({ "rate_per_sec": 0 })).await;
    let vb = db.version(b.id, json!({ "rate_per_sec": 0 })).await;
    let mut first = db.client().await;
    let mut second = db.client().await;
    let tx_a = first.transaction().await.unwrap();
    tx_a.execute("SELECT dsreg_publish($1, $2)", &[&a.id, &va])
        .await
        .unwrap();
    let tx_b = second.transaction().await.unwrap();
    tx_b.execute("SELECT dsreg_publish($1, $2)", &[&b.id, &vb])
        .await
        .unwrap();
    tx_b.commit().await.unwrap();
    db.wait_for_state(b.id, "B RUNNING", running_on(vb)).await;
    tx_a.commit().await.unwrap();
    db.wait_for_state(
        a.id,
        "A RUNNING though its event id is lower",
        running_on(va),
    )
    .await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_thousand_datasources_published_in_one_transaction_all_run() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO datasources (org, project, name, kind)
               SELECT 'acme', 'bulk', 'ds-' || i, 'generator' FROM generate_series(1, 1000) i;
             INSERT INTO datasource_versions (datasource_id, version, config)
               SELECT id, 1, '{\"rate_per_sec\": 0}' FROM datasources WHERE project = 'bulk';
             UPDATE datasource_versions SET state = 'published';",
        )
        .await
        .unwrap();
    wait_all_running_on_1(&db, 1000, Duration::from_secs(30)).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_forged_notification_is_counted_and_disturbs_nothing() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let client = db.client().await;
    client
        .batch_execute(
            "SELECT pg_notify('dsreg_events', 'garbage');
             SELECT pg_notify('dsreg_events', '{\"id\": 1, \"type\": \"published\", \"datasource_id\": \"00000000-0000-0000-0000-000000000000\"}');",
        )
        .await
        .unwrap();
    wait_for("the forged payload counted", WAIT, || async {
        (app.listener_stats
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1)
            .then_some(())
    })
    .await;
    let ds = db.datasource("after").await;
    let v = db.version(ds.id, json!({ "rate_per_sec": 0 })).await;
    db.publish_sql(ds.id, v).await;
    db.wait_for_state(ds.id, "a real publish still applied", running_on(v))
        .await;
    assert!(
        app.listener_stats
            .connected
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_publish_committed_while_the_listener_is_down_is_applied_after_postgres_restarts() {
    // A cluster of its own: restarting the shared one would disturb every other test.
    let cluster =
        tokio::task::spawn_blocking(dsreg::db::embedded::EmbeddedCluster::start_temporary)
            .await
            .unwrap()
            .unwrap();
    dsreg::db::create_database(&cluster.url("postgres"), "dsreg", None)
        .await
        .unwrap();
    let url = cluster.url("dsreg");
    let app = TestApp::spawn(&url, |_| {}).await;
    let pool = dsreg::db::pool(&url, 2, Duration::from_secs(10)).unwrap();
    let ds_id = {
        let client = dsreg::db::connect(&url).await.unwrap();
        let row = client
            .query_one(
                "INSERT INTO datasources (org, project, name, kind) VALUES ('acme', 'core', 'restart', 'generator') RETURNING id",
                &[],
            )
            .await
            .unwrap();
        let id: uuid::Uuid = row.get(0);
        client
            .batch_execute(&format!(
                "INSERT INTO datasource_versions (datasource_id, version, config) VALUES
                   ('{id}', 1, '{{\"rate_per_sec\": 0}}'), ('{id}', 2, '{{\"rate_per_sec\": 0}}');
                 SELECT dsreg_publish('{id}', 1);"
            ))
            .await
            .unwrap();
        id
    };
    let state_of = |pool: deadpool_postgres::Pool| async move {
        let client = pool.get().await.ok()?;
        dsreg::db::repository::state::get(&**client, ds_id)
            .await
            .ok()
    };
    wait_for("RUNNING on v1", WAIT, || async {
        state_of(pool.clone())
            .await
            .filter(running_on(1))
            .map(|_| ())
    })
    .await;

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart().unwrap();
        cluster
    })
    .await
    .unwrap();
    // Published as soon as the server is back, before the listener's first reconnect attempt.
    let client = dsreg::db::connect(&url).await.unwrap();
    client
        .execute("SELECT dsreg_publish($1, 2)", &[&ds_id])
        .await
        .unwrap();
    wait_for("RUNNING on v2 after the restart", WAIT, || async {
        state_of(pool.clone())
            .await
            .filter(running_on(2))
            .map(|_| ())
    })
    .await;
    assert!(
        app.listener_stats
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    app.stop().await.unwrap();
    drop(cluster);
}

#[tokio::test]
async fn a_full_resync_goes_a_page_at_a_time_and_a_publish_meanwhile_is_not_held_up() {
    const N: usize = 400;
    let db = TestDb::new().await;
    let (passes_tx, mut passes) = tokio::sync::mpsc::unbounded_channel();
    let app = TestApp::spawn(&db.url, move |app| {
        // One datasource a page: the pass takes hundreds of steps.
        app.supervisor.resync_page = 1;
        app.supervisor.passes = Some(passes_tx);
    })
    .await;
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO datasources (org, project, name, kind)
               SELECT 'acme', 'paged', 'ds-' || i, 'generator' FROM generate_series(1, {N}) i;
             INSERT INTO datasource_versions (datasource_id, version, config)
               SELECT id, v, jsonb_build_object('rate_per_sec', 0, 'template', jsonb_build_object('v', v))
               FROM datasources, generate_series(1, 2) v WHERE project = 'paged';
             UPDATE datasource_versions SET state = 'published' WHERE version = 1;"
        ))
        .await
        .unwrap();
    let ids: Vec<uuid::Uuid> = client
        .query("SELECT id FROM datasources ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    wait_all_running_on_1(&db, N, WAIT).await;

    // Changes no notification announces, which only a full pass finds: the first datasource
    // (the first page) moves to version 2, one in the middle is archived.
    let (first, middle, last) = (ids[0], ids[N / 2], ids[N - 1]);
    client
        .batch_execute(&format!(
            "SET session_replication_role = replica;
             UPDATE datasources SET current_version = 2 WHERE id = '{first}';
             UPDATE datasources SET status = 'archived' WHERE id = '{middle}';
             SET session_replication_role = DEFAULT;"
        ))
        .await
        .unwrap();
    while passes.try_recv().is_ok() {}
    ops::apply(&db.pool, &WriteContext::actor("test"), &Op::Reload(None))
        .await
        .unwrap();
    // The pass is under way once its first page is applied; the last datasource, published
    // now, is reached by its own notification long before the pass gets to its page.
    db.wait_for_state(first, "the first page applied", running_on(2))
        .await;
    db.publish_sql(last, 2).await;
    let full = loop {
        let pass = tokio::time::timeout(WAIT, passes.recv())
            .await
            .expect("the full pass ends")
            .expect("the registry runs");
        if pass.full {
            break pass;
        }
    };
    assert_eq!(full.datasources, N - 1, "every live datasource, once");
    let state = db.state(last).await;
    assert!(
        running_on(2)(&state),
        "the publish made during the pass was applied before it ended: {state:?}"
    );
    db.wait_for_state(middle, "the archived one stopped by its page", stopped)
        .await;
    app.stop().await.unwrap();
}
