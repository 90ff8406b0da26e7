//! Configs of every shape thrown at every kind: validation, the stall limit and a short run
//! never panic; whatever a kind cannot run with is refused at validation, naming the field.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dsreg::connectors::sink::{Sink, Target, WriterOptions};
use dsreg::connectors::webhook::Ingress;
use dsreg::connectors::{Catalog, CursorDb, CursorStore, Health, RunContext};
use dsreg::secrets::SecretString;
use dsreg::transform::{Limits, Transform};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

use crate::helpers::TestDb;

/// Numbers of every magnitude and sign, and values of every other type.
fn any_value() -> impl Strategy<Value = Value> {
    let numbers = prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(1e-300)),
        Just(json!(1e-19)),
        Just(json!(1e300)),
        Just(json!(-1e300)),
        Just(json!(f64::MAX)),
        Just(json!(f64::MIN_POSITIVE)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(0.5)),
        (-1_000_000i64..1_000_000).prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        // Finite floats of every exponent (JSON has no NaN or infinity).
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
    ];
    // No null: the kinds read a null field as an absent one, the JSON Schema refuses it, and
    // either way nothing runs with it.
    let others = prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        ".{0,12}".prop_map(Value::String),
        Just(json!([])),
        Just(json!([1, "a"])),
        Just(json!({})),
        Just(json!({ "field": "id", "param": "since" })),
    ];
    prop_oneof![3 => numbers, 1 => others]
}

/// A config of `kind` whose fields (each present or not) take any value; `url` is mostly a
/// reachable local source.
fn config_of(kind: &'static str, url: String) -> impl Strategy<Value = Value> {
    let fields: &'static [&'static str] = match kind {
        "generator" => &["rate_per_sec", "count", "template"],
        "http_poll" => &[
            "interval_ms",
            "timeout_ms",
            "max_retries",
            "retry_base_ms",
            "max_body_bytes",
            "record_path",
            "cursor",
            "headers",
        ],
        _ => &["max_body_bytes", "queue_capacity", "signature_header"],
    };
    let values = proptest::collection::vec(proptest::option::of(any_value()), fields.len());
    let url = prop_oneof![
        4 => Just(Value::String(url)),
        1 => any_value(),
    ];
    (values, url).prop_map(move |(values, url)| {
        let mut config = Map::new();
        for (field, value) in fields.iter().zip(values) {
            if let Some(value) = value {
                config.insert((*field).to_owned(), value);
            }
        }
        if kind == "http_poll" {
            config.insert("url".into(), url);
        }
        Value::Object(config)
    })
}

/// A source answering every GET with two records.
async fn serve_records() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route(
        "/items",
        axum::routing::get(|| async { axum::Json(json!([{ "id": 1 }, { "id": 2 }])) }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/items")
}

/// Runs a valid config briefly; `Err` when its run panicked.
async fn short_run(
    db: &TestDb,
    sink: &Sink,
    kind: &str,
    config: &Value,
) -> Result<(), TestCaseError> {
    let catalog = Catalog::builtin();
    let connector = catalog.get(kind).unwrap().clone();
    let id = uuid::Uuid::new_v4();
    let mut secrets = BTreeMap::new();
    secrets.insert(
        "webhook_secret".to_owned(),
        SecretString::new("k".into()).unwrap(),
    );
    let transform = Transform::from_config(config, &Limits::default()).unwrap();
    let health = Health::default();
    let cancel = tokio_util::sync::CancellationToken::new();
    let ctx = RunContext {
        datasource_id: id,
        version: 1,
        config: Arc::new(config.clone()),
        secrets: Arc::new(secrets),
        sink: sink.handle(id, 1, 1, transform, health.clone()),
        cursor: CursorStore::new(
            CursorDb::new(db.pool.clone(), 2),
            id,
            dsreg::db::repository::state::Writer {
                generation: 0,
                instance: "bounds".into(),
                epoch: 1,
            },
        ),
        ingress: Ingress::default(),
        cancel: cancel.clone(),
        health,
        lease: dsreg::connectors::LeaseCheck::always(),
    };
    let mut run = tokio::spawn(async move { connector.run(ctx).await });
    // A short run: its start and first ticks; then it is stopped.
    let ended = tokio::time::timeout(Duration::from_millis(30), &mut run).await;
    let joined = match ended {
        Ok(joined) => joined,
        Err(_) => {
            cancel.cancel();
            run.await
        }
    };
    match joined {
        Err(e) if e.is_panic() => Err(TestCaseError::fail(format!(
            "{kind} {config} panicked when run"
        ))),
        _ => Ok(()),
    }
}

#[test]
fn generated_configs_never_panic_validation_the_stall_limit_or_a_run() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = runtime.block_on(TestDb::new());
    let url = runtime.block_on(serve_records());
    let (sink, writer) = Sink::new(
        db.pool.clone(),
        Target::Postgres,
        "bounds".into(),
        None,
        WriterOptions::default(),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    runtime.spawn(writer.run(stop.clone()));
    let catalog = Catalog::builtin();
    let valid = std::sync::atomic::AtomicUsize::new(0);
    for kind in ["generator", "http_poll", "webhook"] {
        let mut runner = TestRunner::new(Config {
            cases: 96,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&config_of(kind, url.clone()), |config| {
                let connector = catalog.get(kind).unwrap();
                let validated = connector.validate(&config);
                let checked = catalog.check(
                    kind,
                    &config,
                    &["webhook_secret".into()],
                    &Limits::default(),
                );
                // The kind's own checks and its JSON Schema agree on what they accept.
                prop_assert_eq!(
                    validated.is_ok(),
                    checked.is_ok(),
                    "{} {}: validate {:?}, schema and checks {:?}",
                    kind,
                    &config,
                    validated,
                    checked
                );
                if let Err(e) = &validated {
                    prop_assert!(!e.reason.is_empty());
                    return Ok(());
                }
                valid.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = connector.stall_after(&config);
                runtime.block_on(short_run(&db, &sink, kind, &config))
            })
            .unwrap();
    }
    assert!(
        valid.into_inner() > 0,
        "some generated configs were valid and ran"
    );
    stop.cancel();
}

#[test]
fn a_generator_too_slow_to_schedule_is_refused_naming_its_rate() {
    let catalog = Catalog::builtin();
    let generator = catalog.get("generator").unwrap();
    for rate in [1e-19, 1e-300, 0.000_999, -1.0, 1e300] {
        let config = json!({ "rate_per_sec": rate });
        assert_eq!(
            generator.validate(&config).unwrap_err().field,
            "rate_per_sec",
            "{config}"
        );
        let problems = catalog
            .check("generator", &config, &[], &Limits::default())
            .unwrap_err();
        assert!(
            problems.iter().all(|p| p.field == "rate_per_sec"),
            "{problems:?}"
        );
    }
    for rate in [0.0, 0.001, 1.0, 1_000_000.0] {
        let config = json!({ "rate_per_sec": rate, "count": 1 });
        assert!(generator.validate(&config).is_ok(), "{config}");
        assert!(
            catalog
                .check("generator", &config, &[], &Limits::default())
                .is_ok()
        );
        assert!(
            generator
                .stall_after(&json!({ "rate_per_sec": rate }))
                .is_none_or(|d| d >= Duration::from_secs(10))
        );
    }
}
