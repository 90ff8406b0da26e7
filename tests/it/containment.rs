//! Connector code that panics, or a config that would make it panic, is that datasource's
//! error: the supervisor keeps running, every other worker keeps working, later publishes are
//! applied, and readiness stays true.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use dsreg::connectors::{BoxFuture, ConfigError, Connector, Error, KindInfo, Mode, RunContext};
use dsreg::domain::WorkerStatus;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestDb, wait_for};

const WAIT: Duration = Duration::from_secs(15);

/// A kind whose every method but `info` panics when the config says `"panic_in": <method>`.
struct Treacherous;

static TREACHEROUS: LazyLock<KindInfo> = LazyLock::new(|| KindInfo {
    name: "treacherous",
    version: "1.0.0",
    summary: "panics where its config says",
    config_schema: json!({ "type": "object" }),
    secrets: &[],
    mode: Mode::Pull,
    can_backfill: false,
});

fn panics_in(config: &Value, method: &str) -> bool {
    config.get("panic_in").and_then(Value::as_str) == Some(method)
}

impl Connector for Treacherous {
    fn info(&self) -> &KindInfo {
        &TREACHEROUS
    }

    fn validate(&self, config: &Value) -> Result<(), ConfigError> {
        assert!(!panics_in(config, "validate"), "validate bug");
        Ok(())
    }

    fn required_secrets(&self, config: &Value) -> Vec<String> {
        assert!(
            !panics_in(config, "required_secrets"),
            "required_secrets bug"
        );
        Vec::new()
    }

    fn stall_after(&self, config: &Value) -> Option<Duration> {
        assert!(!panics_in(config, "stall_after"), "stall_after bug");
        None
    }

    fn run(&self, ctx: RunContext) -> BoxFuture<Result<(), Error>> {
        assert!(!panics_in(&ctx.config, "run"), "run bug");
        Box::pin(async move {
            ctx.cancel.cancelled().await;
            Ok(())
        })
    }
}

async fn spawn(db: &TestDb) -> TestApp {
    TestApp::spawn(&db.url, |app| {
        app.catalog.register(Arc::new(Treacherous));
    })
    .await
}

async fn ready(app: &TestApp) -> bool {
    crate::helpers::http_client(Duration::from_secs(5))
        .unwrap()
        .get(format!("http://{}/readyz", app.http_addr))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Waits until a generator has written more than `than` records of `version`.
async fn records_beyond(db: &TestDb, id: uuid::Uuid, version: i32, than: i64) -> i64 {
    wait_for("more generated records", WAIT, || async {
        let n = db.records(id, version).await;
        (n > than).then_some(n)
    })
    .await
}

#[tokio::test]
async fn a_config_that_would_panic_is_that_datasources_error_and_every_other_worker_keeps_working()
{
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let healthy = db.datasource("healthy").await;
    let v1 = db.version(healthy.id, json!({ "rate_per_sec": 200 })).await;
    db.publish_sql(healthy.id, v1).await;
    let before = records_beyond(&db, healthy.id, v1, 0).await;

    // Published with a plain SQL UPDATE, past every API check.
    let poison = db.datasource("poison").await;
    let bad = db
        .version(poison.id, json!({ "rate_per_sec": 1e-19 }))
        .await;
    db.publish_sql(poison.id, bad).await;
    let mut panicking = Vec::new();
    for method in ["validate", "required_secrets", "stall_after", "run"] {
        let ds = db
            .datasource_of(&format!("panics-in-{method}"), "treacherous")
            .await;
        let v = db.version(ds.id, json!({ "panic_in": method })).await;
        db.publish_sql(ds.id, v).await;
        panicking.push((ds.id, method));
    }

    let refused = db
        .wait_for_state(poison.id, "the poison version refused", |s| {
            s.worker_status == WorkerStatus::Error
        })
        .await;
    assert_eq!(refused.error_code.as_deref(), Some("invalid_config"));
    assert!(
        refused
            .error_message
            .as_deref()
            .unwrap_or("")
            .contains("rate_per_sec"),
        "{refused:?}"
    );
    assert_eq!(refused.running_version, None, "nothing of it runs");
    for (id, method) in &panicking {
        let state = db
            .wait_for_state(*id, "the panicking kind in error", |s| {
                matches!(
                    s.worker_status,
                    WorkerStatus::Error | WorkerStatus::CrashLoop
                )
            })
            .await;
        assert_eq!(
            state.error_code.as_deref(),
            Some("connector_panicked"),
            "{method}: {state:?}"
        );
    }

    // The other worker never stopped, and the supervisor still applies publishes.
    records_beyond(&db, healthy.id, v1, before).await;
    let healthy_state = db.state(healthy.id).await;
    assert_eq!(healthy_state.worker_status, WorkerStatus::Running);
    assert_eq!(healthy_state.restart_count, 0);
    let v2 = db.version(healthy.id, json!({ "rate_per_sec": 300 })).await;
    db.publish_sql(healthy.id, v2).await;
    records_beyond(&db, healthy.id, v2, 0).await;
    assert!(ready(&app).await, "readiness stays true");

    // A fixed version of the poisoned datasource runs.
    let good = db.version(poison.id, json!({ "rate_per_sec": 100 })).await;
    db.publish_sql(poison.id, good).await;
    records_beyond(&db, poison.id, good, 0).await;
    app.stop().await.unwrap();
}

/// The checks `CreateVersion`, `PublishVersion`, file imports and the harness run.
#[test]
fn publish_checks_refuse_configs_that_would_panic_naming_the_field() {
    let catalog = dsreg::connectors::Catalog::builtin();
    let problems = catalog
        .check(
            "generator",
            &json!({ "rate_per_sec": 1e-19 }),
            &[],
            &dsreg::transform::Limits::default(),
        )
        .unwrap_err();
    assert_eq!(problems[0].field, "rate_per_sec");
    let mut with_panic = catalog.clone();
    with_panic.register(Arc::new(Treacherous));
    for method in ["validate", "required_secrets"] {
        let problems = with_panic
            .check(
                "treacherous",
                &json!({ "panic_in": method }),
                &[],
                &dsreg::transform::Limits::default(),
            )
            .unwrap_err();
        assert!(
            problems[0].reason.contains(&format!("{method} panicked")),
            "{problems:?}"
        );
    }
}

#[tokio::test]
async fn a_supervisor_that_dies_stops_its_workers_and_the_process_ends_with_an_error() {
    let db = TestDb::new().await;
    let fault = tokio_util::sync::CancellationToken::new();
    let inject = fault.clone();
    let app = TestApp::spawn(&db.url, move |app| {
        app.supervisor.fault = Some(inject);
    })
    .await;
    let ds = db.datasource("working").await;
    let v = db.version(ds.id, json!({ "rate_per_sec": 200 })).await;
    db.publish_sql(ds.id, v).await;
    records_beyond(&db, ds.id, v, 0).await;
    assert!(ready(&app).await);

    fault.cancel();
    let ended = app.finished(WAIT).await;
    let error = format!("{:#}", ended.expect_err("the process ends with an error"));
    assert!(
        error.contains("the supervisor stopped") && error.contains("fault injected"),
        "{error}"
    );
}

#[tokio::test]
async fn after_a_restart_with_an_invalid_published_version_no_version_is_named_running() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let ds = db.datasource("restarted").await;
    let v1 = db.version(ds.id, json!({ "rate_per_sec": 0 })).await;
    db.publish_sql(ds.id, v1).await;
    db.wait_for_state(ds.id, "v1 running", |s| {
        s.worker_status == WorkerStatus::Running && s.running_version == Some(v1)
    })
    .await;
    app.stop().await.unwrap();

    let v2 = db.version(ds.id, json!({ "rate_per_sec": 1e-19 })).await;
    db.publish_sql(ds.id, v2).await;
    let app = spawn(&db).await;
    let state = db
        .wait_for_state(ds.id, "the invalid version refused", |s| {
            s.worker_status == WorkerStatus::Error
        })
        .await;
    assert_eq!(state.error_code.as_deref(), Some("invalid_config"));
    assert_eq!(state.running_version, None, "{state:?}");
    app.stop().await.unwrap();
}
