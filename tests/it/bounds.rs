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

/// The secrets generated `kafka` configs may name, and what they hold.
const KAFKA_SECRETS: &[(&str, &str)] = &[("pw", "kafka-password"), ("ca", "not a certificate")];

/// A `kafka` config whose fields (each present or not) take plausible values or any value;
/// `broker` is mostly a reachable broker that has the topic `orders`.
fn kafka_config(broker: String) -> impl Strategy<Value = Value> {
    use proptest::collection::vec;
    let servers = prop_oneof![
        4 => Just(json!([broker])),
        1 => Just(json!(["127.0.0.1:1"])),
        1 => vec("[a-z0-9.:/ ,]{0,12}", 0..3).prop_map(|v| json!(v)),
        1 => any_value(),
    ];
    let topics = prop_oneof![
        4 => Just(json!(["orders"])),
        1 => Just(json!(["missing"])),
        1 => vec("[A-Za-z0-9._ -]{0,8}", 0..3).prop_map(|v| json!(v)),
        1 => any_value(),
    ];
    let format = || {
        prop_oneof![
            Just(json!("json")),
            Just(json!("text")),
            Just(json!("base64")),
            Just(json!("xml")),
            any_value(),
        ]
    };
    let start = prop_oneof![
        Just(json!("earliest")),
        Just(json!("latest")),
        Just(json!("soon")),
        any_value(),
    ];
    let headers = prop_oneof![vec(".{0,6}", 0..3).prop_map(|v| json!(v)), any_value()];
    let sasl = prop_oneof![
        (
            prop_oneof![
                Just("PLAIN"),
                Just("SCRAM-SHA-256"),
                Just("SCRAM-SHA-512"),
                Just("GSSAPI"),
            ],
            proptest::option::of(".{0,6}"),
            proptest::option::of(prop_oneof![Just("pw".to_owned()), ".{0,4}"]),
        )
            .prop_map(|(mechanism, username, secret)| {
                let mut sasl = json!({ "mechanism": mechanism });
                if let Some(username) = username {
                    sasl["username"] = json!(username);
                }
                if let Some(secret) = secret {
                    sasl["password_secret"] = json!(secret);
                }
                sasl
            }),
        any_value(),
    ];
    let tls = prop_oneof![
        Just(json!({})),
        Just(json!({ "ca_secret": "ca" })),
        Just(json!({ "ca_secret": 1 })),
        any_value(),
    ];
    let group = prop_oneof![".{0,10}".prop_map(Value::String), any_value()];
    let batch = prop_oneof![(0u64..6_000).prop_map(|n| json!(n)), any_value()];
    let linger = prop_oneof![(0u64..12_000).prop_map(|n| json!(n)), any_value()];
    let some = |weight: f64, s: BoxedStrategy<Value>| proptest::option::weighted(weight, s);
    (
        some(0.9, servers.boxed()),
        some(0.9, topics.boxed()),
        some(0.3, group.boxed()),
        some(0.3, start.boxed()),
        some(0.3, format().boxed()),
        some(0.3, format().boxed()),
        some(0.3, headers.boxed()),
        some(0.2, sasl.boxed()),
        some(0.2, tls.boxed()),
        some(0.3, batch.boxed()),
        some(0.3, linger.boxed()),
    )
        .prop_map(
            |(servers, topics, group, start, key, value, headers, sasl, tls, batch, linger)| {
                let fields = [
                    ("bootstrap_servers", servers),
                    ("topics", topics),
                    ("group_id", group),
                    ("start", start),
                    ("key_format", key),
                    ("value_format", value),
                    ("headers", headers),
                    ("sasl", sasl),
                    ("tls", tls),
                    ("batch_max_records", batch),
                    ("batch_linger_ms", linger),
                ];
                let mut config = Map::new();
                for (field, value) in fields {
                    if let Some(value) = value {
                        config.insert(field.to_owned(), value);
                    }
                }
                Value::Object(config)
            },
        )
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
    // The `kafka` configs' password and CA (not a certificate: the client refuses it).
    for (name, value) in KAFKA_SECRETS {
        secrets.insert(
            (*name).to_owned(),
            SecretString::new((*value).into()).unwrap(),
        );
    }
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

/// The field a refused `CreateVersion` names (`config_json.<field>…`).
fn violated_field(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt as _;
    status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
}

#[test]
fn generated_kafka_configs_never_panic_or_stop_the_supervisor_and_invalid_ones_name_their_field() {
    use dsreg::api::grpc::pb;
    use dsreg::api::grpc::pb::datasources_client::DatasourcesClient;
    use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Arrange: a real broker with the topic `orders`; a registry over gRPC with one `kafka`
    // datasource (holding the secrets the configs may name) and a bystander generator.
    let broker = runtime.block_on(crate::kafka::KafkaBroker::start());
    runtime.block_on(crate::kafka::create_topic(&broker.address(), "orders", 2));
    let db = runtime.block_on(TestDb::new());
    let (app, channel) = runtime.block_on(crate::grpc::serve(&db));
    let datasources = DatasourcesClient::new(channel.clone());
    let mut lifecycle = LifecycleClient::new(channel);
    let create = |name: &str, kind: &str| {
        let mut request = crate::grpc::create_req(name);
        request.kind = kind.into();
        request
    };
    let id = runtime
        .block_on(
            datasources
                .clone()
                .create_datasource(create("generated", "kafka")),
        )
        .unwrap()
        .into_inner()
        .id;
    let uuid = uuid::Uuid::parse_str(&id).unwrap();
    for (name, value) in KAFKA_SECRETS {
        runtime.block_on(crate::helpers::put_secret(
            &db,
            crate::kafka::MASTER_KEYS,
            uuid,
            name,
            value,
        ));
    }
    let bystander = runtime
        .block_on(db.datasource_of("bystander", "generator"))
        .id;
    let v = runtime.block_on(db.version(bystander, json!({ "rate_per_sec": 50 })));
    runtime.block_on(db.publish_sql(bystander, v));
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
    let connector = catalog.get("kafka").unwrap();
    let names: Vec<String> = KAFKA_SECRETS.iter().map(|(n, _)| (*n).to_owned()).collect();
    let valid = std::sync::atomic::AtomicUsize::new(0);
    let invalid = std::sync::atomic::AtomicUsize::new(0);

    // Act and assert, config by config.
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&kafka_config(broker.address()), |config| {
            let validated = connector.validate(&config);
            let checked = catalog.check("kafka", &config, &names, &Limits::default());
            // The kind's own checks and its JSON Schema agree on what they accept; past them,
            // the catalog only adds the secrets a config names and the datasource lacks.
            let only_secrets_missing = checked
                .as_ref()
                .err()
                .is_some_and(|problems| problems.iter().all(|p| p.missing_secret.is_some()));
            prop_assert_eq!(
                validated.is_ok(),
                checked.is_ok() || only_secrets_missing,
                "{}: validate {:?}, schema and checks {:?}",
                &config,
                validated,
                checked
            );
            if validated.is_ok() && checked.is_err() {
                return Ok(());
            }
            let mut datasources = datasources.clone();
            let created = runtime.block_on(datasources.create_version(pb::CreateVersionRequest {
                datasource_id: id.clone(),
                config_json: config.to_string(),
                comment: String::new(),
            }));
            // Text holding NUL cannot be stored: the API refuses it before the kind looks,
            // naming `config_json` and the path to it.
            let holds_nul = config.to_string().contains("\\u0000");
            if validated.is_err() || holds_nul {
                invalid.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Refused as the caller's mistake, naming a field the config has (or a
                // required one it lacks).
                let status = created.expect_err("an invalid config is refused");
                prop_assert_eq!(status.code(), tonic::Code::InvalidArgument, "{:?}", status);
                let field = violated_field(&status).unwrap_or_default();
                let named = match field.strip_prefix("config_json.") {
                    Some(path) => path.split(['.', '/']).next().unwrap_or_default().to_owned(),
                    None => status
                        .message()
                        .split_once(" at '/")
                        .and_then(|(_, path)| path.split(['/', '\'']).next())
                        .unwrap_or_default()
                        .to_owned(),
                };
                prop_assert!(
                    config.get(&named).is_some()
                        || ["bootstrap_servers", "topics"].contains(&named.as_str()),
                    "{} refused naming {:?}: {:?}",
                    &config,
                    field,
                    status
                );
                return Ok(());
            }
            valid.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let version = created
                .map_err(|e| TestCaseError::fail(format!("{config} refused: {e:?}")))?
                .into_inner()
                .version;
            let _ = connector.stall_after(&config);
            runtime.block_on(short_run(&db, &sink, "kafka", &config))?;
            // The supervisor runs it (a hot reload of the one datasource each time).
            runtime
                .block_on(datasources.publish_version(pb::PublishVersionRequest {
                    datasource_id: id.clone(),
                    version,
                }))
                .map_err(|e| TestCaseError::fail(format!("{config} not published: {e:?}")))?;
            Ok(())
        })
        .unwrap();

    // Assert: both kinds of config were generated; the supervisor still runs the bystander
    // and answers for the kafka datasource.
    let (valid, invalid) = (valid.into_inner(), invalid.into_inner());
    assert!(valid > 0 && invalid > 0, "{valid} valid, {invalid} invalid");
    let status = runtime
        .block_on(lifecycle.get_status(pb::GetStatusRequest {
            datasource_id: id.clone(),
        }))
        .expect("the status of the kafka datasource");
    eprintln!("the kafka datasource after {valid} publishes: {status:?}");
    runtime.block_on(async {
        let before = count_records(&db, bystander).await;
        crate::helpers::wait_for(
            "the bystander writing on",
            Duration::from_secs(60),
            || async { (count_records(&db, bystander).await > before).then_some(()) },
        )
        .await;
        app.stop().await.expect("the registry stops cleanly");
    });
    stop.cancel();
}

async fn count_records(db: &TestDb, id: uuid::Uuid) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM datasource_records WHERE datasource_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
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
