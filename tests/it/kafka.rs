//! The `kafka` kind against a real Kafka-protocol broker (tansu, one per test, in memory or on
//! SQLite storage in a folder of the test's own; see `tests/support/kafka_broker.rs`): 10,000
//! JSON messages through a transform into the Postgres sink, each once; a `kill -9` of the real
//! binary mid-way loses none and repeats at most the batch in flight; a hot reload with a new
//! transform and a lease move carry the position over; a backfill reads everything again; bad
//! configs (unreachable brokers, an unknown topic) are a clear error on the datasource, retried
//! with backoff, no storm; a burst and then a paced stream in batches of many messages all
//! arrive; the source over TLS with the CA from a secret (tansu behind a TLS terminator);
//! SCRAM-SHA-256 and SCRAM-SHA-512 logins with the password from a secret (users stored in
//! tansu's SQLite storage) and a PLAIN one (tansu behind a login front: it has no PLAIN), and a
//! refused login of each kind, the password nowhere; a partition added while the source runs
//! (through the broker's storage: tansu has no CreatePartitions); the `kafka` sink's epoch
//! header and its fence; the sink over TLS trusting its CA, and a wrong CA as a clear error on
//! the datasource that writes nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{Value, json};

use crate::helpers::{ServeProcess, TestApp, TestDb, wait_for};

#[path = "../support/kafka_broker.rs"]
mod kafka_broker;
pub use kafka_broker::{KafkaBroker, create_topic, create_topic_with, plain, produce_paced, send};

/// Generous: the machine may be busy; waits end as soon as their condition holds.
const WAIT: Duration = Duration::from_secs(120);
/// The most records one sink write carries in these tests: the bound on what a crash repeats.
const BATCH: i64 = 500;

/// The transform every test runs: a mapping of the message's value and where it was read.
const TRANSFORM: &str = r#"#{ id: record.value.id, name: record.value.name,
    doubled: record.value.n * 2, partition: record.partition, offset: record.offset, v: "one" }"#;

/// Produces messages `from..to` as JSON `{"id", "name", "n"}` with keys, round robin over
/// `partitions`, and waits until every one is acknowledged.
pub async fn produce(broker: &str, topic: &str, partitions: i32, from: u64, to: u64) {
    produce_with(plain(broker), topic, partitions, from, to).await;
}

/// [`produce`] through a client made from `config`.
pub async fn produce_with(config: ClientConfig, topic: &str, partitions: i32, from: u64, to: u64) {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        // One message per record batch: tansu 0.6 answers a fetch from an offset inside a
        // batch with the batches after it (Kafka answers with the batch holding it), so a run
        // resuming mid-batch would wait for, or skip, the rest of that batch there.
        let producer: BaseProducer = config
            .clone()
            .set("linger.ms", "0")
            .set("batch.num.messages", "1")
            .set("acks", "all")
            .create()
            .expect("a producer");
        for id in from..to {
            let value = json!({ "id": id, "name": format!("item-{id}"), "n": id % 97 }).to_string();
            let key = format!("k{id}");
            let partition = i32::try_from(id % u64::try_from(partitions).unwrap()).unwrap();
            send(
                &producer,
                BaseRecord::to(&topic)
                    .payload(&value)
                    .key(&key)
                    .partition(partition),
            );
        }
        producer
            .flush(Duration::from_secs(60))
            .expect("every message acknowledged");
    })
    .await
    .unwrap();
}

/// `(id → times stored)` of a datasource's records.
async fn stored_ids(db: &TestDb, datasource: uuid::Uuid) -> BTreeMap<i64, i64> {
    db.client()
        .await
        .query(
            "SELECT (record->>'id')::bigint, count(*) FROM datasource_records \
             WHERE datasource_id = $1 GROUP BY 1",
            &[&datasource],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until every id in `0..n` is stored; returns how many records were stored twice or
/// more (the extra copies).
async fn wait_for_all(db: &TestDb, datasource: uuid::Uuid, n: i64) -> i64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    let ids = loop {
        let ids = stored_ids(db, datasource).await;
        if ids.len() as i64 >= n {
            break ids;
        }
        if tokio::time::Instant::now() >= deadline {
            let state = db.state(datasource).await;
            panic!(
                "{} of {n} ids stored within {WAIT:?}; the worker: {:?} {:?} {:?}, owner {:?}",
                ids.len(),
                state.worker_status,
                state.error_code,
                state.error_message,
                state.owner_instance
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        ids.keys().copied().eq(0..n),
        "exactly the ids 0..{n}, none other"
    );
    ids.values().map(|c| c - 1).sum()
}

fn source_config(broker: &str, topic: &str, transform: &str) -> Value {
    json!({
        "bootstrap_servers": [broker],
        "topics": [topic],
        "batch_max_records": BATCH,
        "headers": ["trace"],
        "transform": transform,
    })
}

async fn stored_position(db: &TestDb, datasource: uuid::Uuid) -> Option<Value> {
    db.client()
        .await
        .query_one(
            "SELECT source_cursor FROM datasource_state WHERE datasource_id = $1",
            &[&datasource],
        )
        .await
        .unwrap()
        .get(0)
}

/// The sum of the offsets a position holds: how many messages it says were committed.
fn committed(position: Option<&Value>) -> i64 {
    position
        .and_then(|p| p.get("offsets"))
        .and_then(Value::as_object)
        .map_or(0, |o| o.values().filter_map(Value::as_i64).sum())
}

#[tokio::test]
async fn ten_thousand_messages_pass_a_transform_into_postgres_each_once() {
    // Arrange: 10,000 messages over three partitions.
    let broker = KafkaBroker::start().await;
    create_topic(&broker.address(), "orders", 3).await;
    produce(&broker.address(), "orders", 3, 0, 10_000).await;
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource_of("orders", "kafka").await.id;

    // Act
    let v = db
        .version(ds, source_config(&broker.address(), "orders", TRANSFORM))
        .await;
    db.publish_sql(ds, v).await;

    // Assert: every message once, mapped; the position says all 10,000 are committed.
    let extra = wait_for_all(&db, ds, 10_000).await;
    assert_eq!(extra, 0, "no record stored twice without a crash");
    let sample: Value = db
        .client()
        .await
        .query_one(
            "SELECT record FROM datasource_records WHERE datasource_id = $1 \
             AND record->>'id' = '142'",
            &[&ds],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(sample["doubled"], json!(2 * (142 - 97)));
    assert_eq!(sample["name"], json!("item-142"));
    assert_eq!(sample["partition"], json!(142 % 3));
    wait_for("the position to cover every message", WAIT, || async {
        (committed(stored_position(&db, ds).await.as_ref()) == 10_000).then_some(())
    })
    .await;
    let state = db.state(ds).await;
    assert_eq!(state.error_code, None);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_kill_9_mid_way_loses_nothing_and_repeats_at_most_the_batch_in_flight() {
    // Arrange: the real binary consuming 10,000 messages.
    let broker = KafkaBroker::start().await;
    create_topic(&broker.address(), "orders", 2).await;
    produce(&broker.address(), "orders", 2, 0, 10_000).await;
    let db = TestDb::new().await;
    let ds = db.datasource_of("orders", "kafka").await.id;
    let mut config = source_config(&broker.address(), "orders", TRANSFORM);
    // Small batches: the kill lands mid-stream, with many committed batches before it.
    config["batch_max_records"] = json!(100);
    let v = db.version(ds, config).await;
    db.publish_sql(ds, v).await;
    let mut first = ServeProcess::start(&db.url, &[]).await;
    wait_for("some records stored", WAIT, || async {
        let n: i64 = db
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM datasource_records WHERE datasource_id = $1",
                &[&ds],
            )
            .await
            .unwrap()
            .get(0);
        (n >= 1_000).then_some(())
    })
    .await;

    // Act: SIGKILL, then a new process.
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();
    let at_kill = stored_ids(&db, ds).await.len();
    assert!(at_kill < 10_000, "killed mid-way ({at_kill} stored)");
    let second = ServeProcess::start(&db.url, &[]).await;

    // Assert: none lost; the copies are at most one batch (the one committed to the sink but
    // not yet to the position when the process died).
    let extra = wait_for_all(&db, ds, 10_000).await;
    eprintln!("kill -9 after {at_kill} stored: {extra} records stored twice");
    assert!(
        extra <= 100,
        "{extra} records stored twice; at most one batch of 100"
    );
    second.stop().await;
}

/// A registry with a `kafka` datasource reading `topic` at `broker`, once it has stored the
/// `n` messages there: its database, the registry and the datasource.
async fn reading(broker: &str, topic: &str, n: i64) -> (TestDb, TestApp, uuid::Uuid) {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource_of(topic, "kafka").await.id;
    let v = db
        .version(ds, source_config(broker, topic, TRANSFORM))
        .await;
    db.publish_sql(ds, v).await;
    wait_for_all(&db, ds, n).await;
    (db, app, ds)
}

#[tokio::test]
async fn a_hot_reload_with_a_new_transform_carries_the_position_over() {
    // Arrange: a worker that has read the first 5,000 messages.
    let broker = KafkaBroker::start().await;
    create_topic(&broker.address(), "orders", 1).await;
    produce(&broker.address(), "orders", 1, 0, 5_000).await;
    let (db, app, ds) = reading(&broker.address(), "orders", 5_000).await;

    // Act: a new transform, published while messages keep arriving.
    let v2 = db
        .version(
            ds,
            source_config(
                &broker.address(),
                "orders",
                &TRANSFORM.replace(r#"v: "one""#, r#"v: "two""#),
            ),
        )
        .await;
    db.publish_sql(ds, v2).await;
    produce(&broker.address(), "orders", 1, 5_000, 10_000).await;

    // Assert: nothing skipped; read twice at most the batch the reload interrupted (not the
    // 5,000 before it), the later messages mapped by the new transform.
    let extra = wait_for_all(&db, ds, 10_000).await;
    assert!(
        extra <= BATCH,
        "{extra} read twice: the reload resumed from the committed offset"
    );
    let by_version: Vec<(String, i64, i64)> = db
        .client()
        .await
        .query(
            "SELECT record->>'v', min((record->>'id')::bigint), max((record->>'id')::bigint) \
             FROM datasource_records WHERE datasource_id = $1 GROUP BY 1 ORDER BY 1",
            &[&ds],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(by_version[0].0, "one");
    assert_eq!(by_version[1].0, "two");
    assert_eq!(by_version[1].2, 9_999);
    assert!(by_version[1].1 >= 5_000 - BATCH, "{by_version:?}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_lease_move_resumes_from_the_committed_offset_on_the_new_owner() {
    // Arrange: two instances; the datasource runs on the first, which has read 3,000.
    let broker = KafkaBroker::start().await;
    create_topic(&broker.address(), "orders", 2).await;
    produce(&broker.address(), "orders", 2, 0, 3_000).await;
    let db = TestDb::new().await;
    let a = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource_of("orders", "kafka").await.id;
    let v = db
        .version(ds, source_config(&broker.address(), "orders", TRANSFORM))
        .await;
    db.publish_sql(ds, v).await;
    wait_for_all(&db, ds, 3_000).await;
    let first_owner = db.state(ds).await.owner_instance.expect("an owner");
    let b = TestApp::spawn(&db.url, |_| {}).await;

    // Act: the first instance stops (its leases are released); more messages arrive.
    a.stop().await.unwrap();
    produce(&broker.address(), "orders", 2, 3_000, 6_000).await;

    // Assert: the second instance owns it and read on from where the first committed.
    let extra = wait_for_all(&db, ds, 6_000).await;
    assert_eq!(extra, 0, "the new owner resumed from the committed offsets");
    let owner = db.state(ds).await.owner_instance.expect("an owner");
    assert_ne!(owner, first_owner);
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_backfill_to_the_start_reads_every_message_again() {
    // Arrange: a worker that has read 2,000 messages.
    let broker = KafkaBroker::start().await;
    create_topic(&broker.address(), "orders", 2).await;
    produce(&broker.address(), "orders", 2, 0, 2_000).await;
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource_of("orders", "kafka").await.id;
    let v = db
        .version(ds, source_config(&broker.address(), "orders", TRANSFORM))
        .await;
    db.publish_sql(ds, v).await;
    wait_for_all(&db, ds, 2_000).await;
    let mut lifecycle = LifecycleClient::connect(format!("http://{}", app.grpc_addr))
        .await
        .unwrap();

    // Act: a backfill from the start (no position), then one from a position naming offsets.
    lifecycle
        .backfill(pb::BackfillRequest {
            datasource_id: ds.to_string(),
            from_cursor_json: String::new(),
        })
        .await
        .unwrap();

    // Assert: every message twice.
    wait_for("every message read again", WAIT, || async {
        let ids = stored_ids(&db, ds).await;
        (ids.len() == 2_000 && ids.values().all(|c| *c == 2)).then_some(())
    })
    .await;

    // A position that is not the kind's is refused naming the field.
    let refused = lifecycle
        .backfill(pb::BackfillRequest {
            datasource_id: ds.to_string(),
            from_cursor_json: json!({ "offsets": { "orders": 1 } }).to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("offsets"),
        "{}",
        refused.message()
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn unreachable_brokers_and_an_unknown_topic_are_clear_errors_retried_without_a_storm() {
    // Arrange: one datasource pointed at a port nothing listens on, one at a missing topic.
    let broker = KafkaBroker::start().await;
    create_topic(&broker.address(), "orders", 1).await;
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let nowhere = format!("127.0.0.1:{}", kafka_broker::free_port());
    let unreachable = db.datasource_of("unreachable", "kafka").await.id;
    let v = db
        .version(unreachable, source_config(&nowhere, "orders", TRANSFORM))
        .await;
    db.publish_sql(unreachable, v).await;
    let unknown = db.datasource_of("unknown-topic", "kafka").await.id;
    let v = db
        .version(
            unknown,
            source_config(&broker.address(), "no-such-topic", TRANSFORM),
        )
        .await;
    db.publish_sql(unknown, v).await;

    // Assert: each shows why, naming the brokers or the topic.
    let state = wait_for("the unreachable brokers' error", WAIT, || async {
        let state = db.state(unreachable).await;
        state.error_code.is_some().then_some(state)
    })
    .await;
    assert_eq!(state.error_code.as_deref(), Some("source_failed"));
    let message = state.error_message.unwrap_or_default();
    assert!(message.contains(&nowhere), "{message}");
    let state = wait_for("the unknown topic's error", WAIT, || async {
        let state = db.state(unknown).await;
        state.error_code.is_some().then_some(state)
    })
    .await;
    assert_eq!(state.error_code.as_deref(), Some("source_refused"));
    let message = state.error_message.unwrap_or_default();
    assert!(message.contains("no-such-topic"), "{message}");
    assert!(message.contains("does not exist"), "{message}");
    // A refusal waits the long delay: a few restarts at most while the test looks.
    let restarts = db.state(unknown).await.restart_count;
    assert!(restarts <= 2, "{restarts} restarts: a storm");
    app.stop().await.unwrap();
}

/// A local source for `http_poll`: the records with an `id` above the `since` parameter.
async fn serve_source(records: std::sync::Arc<std::sync::Mutex<Vec<Value>>>) -> String {
    use axum::extract::State;
    type Shared = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;
    async fn handler(State(records): State<Shared>, uri: axum::http::Uri) -> axum::Json<Value> {
        let since: i64 = uri
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("since=")))
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1);
        let fresh: Vec<Value> = records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["id"].as_i64().unwrap() > since)
            .cloned()
            .collect();
        axum::Json(json!({ "items": fresh }))
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .route("/items", axum::routing::get(handler))
        .with_state(records);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/items")
}

/// A message read back: its key, its value, and its `dsreg-epoch` header.
#[derive(Debug)]
struct ReadBack {
    key: Option<String>,
    value: Value,
    epoch: Option<String>,
}

/// Reads `topic`'s partition 0 from the start until messages with `n` distinct ids are in
/// hand (or panics after [`WAIT`]).
async fn read_topic(broker: &str, topic: &str, n: usize) -> Vec<ReadBack> {
    read_topic_with(plain(broker), topic, n).await
}

/// [`read_topic`] through a client made from `config`.
async fn read_topic_with(config: ClientConfig, topic: &str, n: usize) -> Vec<ReadBack> {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers as _;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config
            .clone()
            .set("group.id", "test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        list.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&list).unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        let mut read: Vec<ReadBack> = Vec::new();
        let mut ids = std::collections::BTreeSet::new();
        while ids.len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {n} ids in {topic} within {WAIT:?}",
                ids.len()
            );
            let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let epoch = message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "dsreg-epoch")
                    .and_then(|h| Some(String::from_utf8_lossy(h.value?).into_owned()))
            });
            let value: Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
            ids.insert(value["id"].to_string());
            read.push(ReadBack {
                key: message
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
                value,
                epoch,
            });
        }
        read
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn http_poll_records_reach_the_kafka_sink_keyed_and_a_frozen_broker_loses_none() {
    // Arrange: a broker with the sink's topic, a source with 500 records, and a registry
    // writing to Kafka keyed by `id`.
    let broker = KafkaBroker::start().await;
    create_topic(&broker.address(), "out", 1).await;
    let records = std::sync::Arc::new(std::sync::Mutex::new(
        (0..500)
            .map(|id| json!({ "id": id, "name": format!("item-{id}") }))
            .collect::<Vec<_>>(),
    ));
    let url = serve_source(records.clone()).await;
    let db = TestDb::new().await;
    let mut settings = crate::helpers::test_settings(&db.url);
    settings.sink = "kafka".into();
    settings.sink_kafka_brokers = Some(broker.address());
    settings.sink_kafka_topic = Some("out".into());
    settings.sink_kafka_key_field = Some("id".into());
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let ds = db.datasource_of("poller", "http_poll").await.id;
    let v = db
        .version(
            ds,
            json!({
                "url": url, "interval_ms": 100, "record_path": "/items",
                "cursor": { "field": "id", "param": "since" },
            }),
        )
        .await;
    db.publish_sql(ds, v).await;

    // Assert: the 500 records are in the topic, keyed by id, with the worker's epoch.
    let read = read_topic(&broker.address(), "out", 500).await;
    let epoch = db.state(ds).await.lease_epoch.to_string();
    for message in &read {
        assert_eq!(message.key, Some(message.value["id"].to_string()));
        assert_eq!(message.epoch.as_deref(), Some(epoch.as_str()));
    }

    // Act: the broker freezes for 10 s while 500 more records appear at the source.
    broker.pause();
    records
        .lock()
        .unwrap()
        .extend((500..1_000).map(|id| json!({ "id": id, "name": format!("item-{id}") })));
    // The outage itself: the scenario is "the broker is gone for 10 s".
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.resume();

    // Assert: every record arrives; none lost.
    let read = read_topic(&broker.address(), "out", 1_000).await;
    let ids: std::collections::BTreeSet<i64> = read
        .iter()
        .map(|m| m.value["id"].as_i64().unwrap())
        .collect();
    assert!(ids.iter().copied().eq(0..1_000), "every id from 0 to 999");
    let state = db.state(ds).await;
    assert_eq!(state.error_code, None, "{:?}", state.error_message);
    app.stop().await.unwrap();
}

/// A client configuration for `broker` in plain text, logging in with PLAIN as `user` with
/// `password`.
fn with_plain_login(broker: &str, user: &str, password: &str) -> ClientConfig {
    let mut config = plain(broker);
    config
        .set("security.protocol", "sasl_plaintext")
        .set("sasl.mechanism", "PLAIN")
        .set("sasl.username", user)
        .set("sasl.password", password);
    config
}

/// A password no other text holds by chance.
fn canary() -> String {
    format!("canary-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn a_refused_login_is_a_clear_error_and_the_password_is_nowhere() {
    // Arrange: two brokers that refuse the datasources' login, each for one mechanism and
    // each with its own reason: one requiring SCRAM that knows no user, and one requiring a
    // PLAIN login whose user `dsreg` has another password (tansu behind a login front, see
    // tests/support/kafka_broker.rs); the real binary with debug logs; a datasource for each,
    // whose password is a canary.
    let scram = KafkaBroker::start_authenticating().await;
    let plain_front = KafkaBroker::start_plain_login("dsreg", &canary()).await;
    let db = TestDb::new().await;
    let password = canary();
    let mut datasources = Vec::new();
    for (mechanism, broker, reason) in [
        ("SCRAM-SHA-512", &scram, "unknown-user"),
        ("PLAIN", &plain_front, "invalid username or password"),
    ] {
        let ds = db
            .datasource_of(&mechanism.to_lowercase(), "kafka")
            .await
            .id;
        crate::helpers::put_secret(&db, MASTER_KEYS, ds, "kafka_password", &password).await;
        let mut config = source_config(&broker.address(), "orders", TRANSFORM);
        config["sasl"] = json!({
            "mechanism": mechanism, "username": "dsreg", "password_secret": "kafka_password"
        });
        let v = db.version(ds, config).await;
        db.publish_sql(ds, v).await;
        datasources.push((mechanism, ds, broker, reason));
    }
    let serve = ServeProcess::start(
        &db.url,
        &[("DSREG_MASTER_KEYS", MASTER_KEYS), ("DSREG_LOG", "debug")],
    )
    .await;

    // Assert: each datasource says the login was refused and the broker's reason, and waits
    // the long delay; the password is nowhere.
    for (mechanism, ds, broker, reason) in datasources {
        let state = wait_for("the refused login's error", WAIT, || async {
            let state = db.state(ds).await;
            state.error_code.is_some().then_some(state)
        })
        .await;
        let message = state.error_message.clone().unwrap_or_default();
        let client_lines: Vec<String> = serve
            .logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("librdkafka") || l.contains("kafka"))
            .cloned()
            .collect();
        assert_eq!(
            state.error_code.as_deref(),
            Some("source_refused"),
            "{mechanism}: {message}\n{}\nbroker: {}",
            client_lines.join("\n"),
            broker.logs()
        );
        assert!(message.contains("login"), "{mechanism}: {message}");
        assert!(message.contains(reason), "{mechanism}: {message}");
        for (what, text) in everything_said(&serve, &db, ds).await {
            assert!(
                !text.contains(&password),
                "{mechanism}: the password is in {what}"
            );
        }
    }
    serve.stop().await;
}

#[tokio::test]
async fn plain_logins_with_the_password_from_a_secret_consume_the_topic() {
    // Arrange: a broker that lets a client in only after a PLAIN login as `reader` (tansu
    // behind a login front, see tests/support/kafka_broker.rs), whose password is a canary;
    // 500 messages, produced through such a login.
    let password = canary();
    let broker = KafkaBroker::start_plain_login("reader", &password).await;
    let logged_in = with_plain_login(&broker.address(), "reader", &password);
    create_topic_with(logged_in.clone(), "orders", 2).await;
    produce_with(logged_in, "orders", 2, 0, 500).await;
    let db = TestDb::new().await;
    let ds = db.datasource_of("plain", "kafka").await.id;
    crate::helpers::put_secret(&db, MASTER_KEYS, ds, "kafka_password", &password).await;
    let mut config = source_config(&broker.address(), "orders", TRANSFORM);
    config["sasl"] = json!({
        "mechanism": "PLAIN", "username": "reader", "password_secret": "kafka_password"
    });
    let serve = ServeProcess::start(
        &db.url,
        &[("DSREG_MASTER_KEYS", MASTER_KEYS), ("DSREG_LOG", "debug")],
    )
    .await;

    // Act
    let v = db.version(ds, config).await;
    db.publish_sql(ds, v).await;

    // Assert: the datasource logs in and reads every message once; the password is nowhere.
    let extra = wait_for_all(&db, ds, 500).await;
    assert_eq!(extra, 0);
    let state = db.state(ds).await;
    assert_eq!(state.error_code, None, "{:?}", state.error_message);
    for (what, text) in everything_said(&serve, &db, ds).await {
        assert!(!text.contains(&password), "the password is in {what}");
    }
    serve.stop().await;
}

#[tokio::test]
async fn scram_logins_with_the_password_from_a_secret_consume_the_topic() {
    // Arrange: a broker keeping its data in a file of the test's own (tansu's in-memory
    // storage keeps no SCRAM users; its SQLite storage does), 500 messages, and a
    // SCRAM-SHA-256 and a SCRAM-SHA-512 user stored while the broker takes requests without a
    // login; then the same data served again by a broker that requires a login for every
    // request.
    let storage = tempfile::tempdir().unwrap();
    let mut open = KafkaBroker::start_in(storage.path(), false).await;
    create_topic(&open.address(), "orders", 2).await;
    produce(&open.address(), "orders", 2, 0, 500).await;
    let password = canary();
    open.create_scram_user("reader256", &password, "scram256");
    open.create_scram_user("reader512", &password, "scram512");
    open.stop();
    let broker = KafkaBroker::start_in(storage.path(), true).await;
    let db = TestDb::new().await;
    let mut datasources = Vec::new();
    for (name, mechanism, user) in [
        ("sha256", "SCRAM-SHA-256", "reader256"),
        ("sha512", "SCRAM-SHA-512", "reader512"),
    ] {
        let ds = db.datasource_of(name, "kafka").await.id;
        crate::helpers::put_secret(&db, MASTER_KEYS, ds, "kafka_password", &password).await;
        let mut config = source_config(&broker.address(), "orders", TRANSFORM);
        config["sasl"] = json!({
            "mechanism": mechanism, "username": user, "password_secret": "kafka_password"
        });
        datasources.push((ds, config));
    }
    let serve = ServeProcess::start(
        &db.url,
        &[("DSREG_MASTER_KEYS", MASTER_KEYS), ("DSREG_LOG", "debug")],
    )
    .await;

    // Act
    for (ds, config) in &datasources {
        let v = db.version(*ds, config.clone()).await;
        db.publish_sql(*ds, v).await;
    }

    // Assert: each datasource logs in and reads every message once; the password is nowhere.
    for (ds, _) in &datasources {
        let extra = wait_for_all(&db, *ds, 500).await;
        assert_eq!(extra, 0);
        let state = db.state(*ds).await;
        assert_eq!(state.error_code, None, "{:?}", state.error_message);
        for (what, text) in everything_said(&serve, &db, *ds).await {
            assert!(!text.contains(&password), "the password is in {what}");
        }
    }
    serve.stop().await;
}

#[tokio::test]
async fn a_partition_added_while_the_source_runs_is_read_and_the_old_one_loses_nothing() {
    // Arrange: a broker keeping its data in a file (where a partition can be added), a topic
    // of one partition holding 300 messages, and a `kafka` datasource that has read them.
    let storage = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start_in(storage.path(), false).await;
    create_topic(&broker.address(), "orders", 1).await;
    produce(&broker.address(), "orders", 1, 0, 300).await;
    let (db, app, ds) = reading(&broker.address(), "orders", 300).await;

    // Act: a second partition is added while the source runs, through the broker's storage
    // (tansu 0.6 has no CreatePartitions; its Metadata answer lists what the storage holds),
    // then 300 more messages go to both partitions in turn.
    let added = kafka_broker::add_partition(storage.path(), "orders");
    produce(&broker.address(), "orders", 2, 300, 600).await;

    // Assert: every message arrives once, the new partition's half included, without a
    // restart; the position names the new partition.
    assert_eq!(added, 1);
    let extra = wait_for_all(&db, ds, 600).await;
    assert_eq!(extra, 0);
    let from_new: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM datasource_records \
             WHERE datasource_id = $1 AND record->>'partition' = '1'",
            &[&ds],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(from_new, 150);
    let state = db.state(ds).await;
    assert_eq!(state.restart_count, 0);
    assert_eq!(state.error_code, None, "{:?}", state.error_message);
    let position = wait_for("the new partition's offset saved", WAIT, || async {
        let position = stored_position(&db, ds).await?;
        (position["offsets"]["orders:1"].as_i64() == Some(150)).then_some(position)
    })
    .await;
    assert_eq!(position["offsets"]["orders:0"], json!(450));
    app.stop().await.unwrap();
}

/// The offset after the last message of `topic`'s `partition` (its high watermark).
async fn end_of(broker: &str, topic: &str, partition: i32) -> i64 {
    end_of_with(plain(broker), topic, partition).await
}

/// [`end_of`] through a client made from `config`.
async fn end_of_with(config: ClientConfig, topic: &str, partition: i32) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config
            .clone()
            .set("group.id", "test-watermarks")
            .create()
            .unwrap();
        consumer
            .fetch_watermarks(&topic, partition, Duration::from_secs(10))
            .expect("the broker answers")
            .1
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_kafka_sink_carries_the_writers_epoch_and_refuses_a_worker_whose_lease_is_gone() {
    use dsreg::connectors::kafka_sink::KafkaTarget;
    use dsreg::connectors::sink::{RetryPolicy, Target};
    // Arrange: a broker with the sink's topic, and a sink of instance `sink-test` writing to
    // it; `sink-test` holds the datasource's lease under epoch 1.
    let broker = KafkaBroker::start().await;
    create_topic(&broker.address(), "out", 1).await;
    let db = TestDb::new().await;
    let ds = db.datasource("fenced").await.id;
    crate::sink::lease(&db, "sink-test", &[ds]).await;
    let target =
        KafkaTarget::new(&broker.address(), "out", Some("id".into()), "lz4", None).unwrap();
    let retry = RetryPolicy {
        base: Duration::from_millis(20),
        max: Duration::from_millis(200),
        http_attempts: 3,
    };
    let (sink, stop, writer) =
        crate::sink::sink_on(&db, Target::Kafka(std::sync::Arc::new(target)), retry);
    let first = crate::sink::handle(&sink, ds);

    // Act: a write while the lease holds.
    first
        .write_durable(vec![json!({ "id": 1 })])
        .await
        .expect("written while the lease holds");

    // Assert: the message carries the epoch it was written under.
    let read = read_topic(&broker.address(), "out", 1).await;
    assert_eq!(read[0].epoch.as_deref(), Some("1"));
    assert_eq!(read[0].key.as_deref(), Some("1"));

    // Act: the lease moves to another instance under epoch 2; the old worker writes again.
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO dsreg_instances (id, leases_until) VALUES ('elsewhere', now() + interval '1 hour')",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE datasource_leases SET owner = 'elsewhere', epoch = 2 WHERE datasource_id = $1",
            &[&ds],
        )
        .await
        .unwrap();
    let refused = first.write_durable(vec![json!({ "id": 2 })]).await;

    // Assert: refused, and nothing reached the brokers (a write answers only once its
    // messages are acknowledged, so one sent would already be in the topic).
    let refused = refused.expect_err("a worker whose lease is gone cannot write");
    assert!(refused.to_string().contains("no longer holds"), "{refused}");
    assert_eq!(end_of(&broker.address(), "out", 0).await, 1);

    // Act: the lease comes back to this instance under epoch 3; a worker of that epoch writes.
    client
        .execute(
            "UPDATE datasource_leases SET owner = 'sink-test', epoch = 3 WHERE datasource_id = $1",
            &[&ds],
        )
        .await
        .unwrap();
    let identity =
        dsreg::transform::Transform::compile(None, None, &dsreg::transform::Limits::default())
            .unwrap();
    let third = sink.handle(ds, 1, 3, identity, dsreg::connectors::Health::default());
    third
        .write_durable(vec![json!({ "id": 3 })])
        .await
        .expect("written under the lease's epoch");
    // The old worker stays refused.
    assert!(first.write_durable(vec![json!({ "id": 4 })]).await.is_err());

    // Assert: two messages, each with the epoch of its writer; the fenced ones are not there.
    let read = read_topic(&broker.address(), "out", 2).await;
    let epochs: Vec<(i64, Option<String>)> = read
        .iter()
        .map(|m| (m.value["id"].as_i64().unwrap(), m.epoch.clone()))
        .collect();
    assert_eq!(
        epochs,
        [(1, Some("1".to_owned())), (3, Some("3".to_owned()))]
    );
    assert_eq!(end_of(&broker.address(), "out", 0).await, 2);
    stop.cancel();
    writer.await.unwrap();
}

pub(crate) const MASTER_KEYS: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A CA (`ca.crt`) and a broker certificate it signed, made in a folder of their own; a broker
/// reachable over TLS only with that certificate (tansu behind a TLS terminator, see
/// tests/support/kafka_broker.rs); and a client configuration trusting the CA.
async fn tls_broker() -> (tempfile::TempDir, KafkaBroker, ClientConfig) {
    let pki = tempfile::tempdir().unwrap();
    crate::pgtls::ca(pki.path(), "ca");
    crate::pgtls::leaf(
        pki.path(),
        "ca",
        "broker",
        "127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    let read = |name: &str| std::fs::read_to_string(pki.path().join(name)).unwrap();
    let broker = KafkaBroker::start_tls(&read("broker.crt"), &read("broker.key")).await;
    let mut over_tls = plain(&broker.address());
    over_tls
        .set("security.protocol", "ssl")
        .set("ssl.ca.pem", read("ca.crt"));
    (pki, broker, over_tls)
}

#[tokio::test]
async fn the_kafka_source_reads_over_tls_trusting_the_ca_from_a_datasource_secret() {
    // Arrange: a CA and a broker certificate made here; a broker reachable over TLS only
    // (tansu behind a TLS terminator, see tests/support/kafka_broker.rs); 1,000 messages.
    let (pki, broker, over_tls) = tls_broker().await;
    let ca_pem = std::fs::read_to_string(pki.path().join("ca.crt")).unwrap();
    create_topic_with(over_tls.clone(), "orders", 2).await;
    produce_with(over_tls, "orders", 2, 0, 1_000).await;
    let db = TestDb::new().await;
    let mut settings = crate::helpers::test_settings(&db.url);
    settings.master_keys = Some(MASTER_KEYS.into());
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let ds = db.datasource_of("secure", "kafka").await.id;
    crate::helpers::put_secret(&db, MASTER_KEYS, ds, "broker_ca", &ca_pem).await;
    let mut config = source_config(&broker.address(), "orders", TRANSFORM);
    config["tls"] = json!({ "ca_secret": "broker_ca" });
    // A second datasource trusting only the system roots, which do not know the test's CA.
    let untrusting = db.datasource_of("untrusting", "kafka").await.id;
    let mut system_roots = source_config(&broker.address(), "orders", TRANSFORM);
    system_roots["tls"] = json!({});

    // Act
    let v = db.version(ds, config).await;
    db.publish_sql(ds, v).await;
    let v = db.version(untrusting, system_roots).await;
    db.publish_sql(untrusting, v).await;

    // Assert: every message once over TLS with the CA from the secret.
    let extra = wait_for_all(&db, ds, 1_000).await;
    assert_eq!(extra, 0);
    assert_eq!(db.state(ds).await.error_code, None);
    // The other reads nothing, and says the handshake failed.
    let state = wait_for("the untrusting datasource's error", WAIT, || async {
        let state = db.state(untrusting).await;
        state.error_code.is_some().then_some(state)
    })
    .await;
    let message = state.error_message.unwrap_or_default();
    assert_eq!(
        state.error_code.as_deref(),
        Some("source_failed"),
        "{message}"
    );
    assert!(message.contains("TLS handshake failed"), "{message}");
    assert!(stored_ids(&db, untrusting).await.is_empty());
    app.stop().await.unwrap();
}

/// Produces `count` messages with ids from `first`, batched as a producer batches by default
/// (many messages per record batch), at `rate` messages a second when given.
async fn produce_batched(broker: &str, topic: &str, first: u64, count: u64, rate: Option<f64>) {
    let config = plain(broker);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        produce_paced(&config, &topic, first, count, rate, |id| {
            json!({ "id": id, "name": format!("item-{id}"), "n": id % 97 }).to_string()
        });
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_burst_then_a_paced_stream_of_batched_messages_all_arrive() {
    // Arrange: 20,000 messages already in two partitions, in record batches of many messages
    // each (as the bench writes them).
    let broker = KafkaBroker::start().await;
    create_topic(&broker.address(), "orders", 2).await;
    produce_batched(&broker.address(), "orders", 0, 20_000, None).await;
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource_of("orders", "kafka").await.id;
    let mut config = source_config(&broker.address(), "orders", TRANSFORM);
    config["batch_max_records"] = json!(5_000);
    config["batch_linger_ms"] = json!(5);
    let v = db.version(ds, config).await;
    db.publish_sql(ds, v).await;
    wait_for_all(&db, ds, 20_000).await;

    // Act: 10,000 more, paced at 5,000 a second.
    produce_batched(&broker.address(), "orders", 20_000, 10_000, Some(5_000.0)).await;

    // Assert: every one arrives, once.
    let extra = wait_for_all(&db, ds, 30_000).await;
    assert_eq!(extra, 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_kafka_sink_writes_over_tls_trusting_its_ca_and_a_wrong_ca_is_a_clear_error_writing_nothing()
 {
    // Arrange: a CA and a broker certificate made here, and a second CA that signed nothing
    // of the broker's; a broker reachable over TLS only (tansu behind a TLS terminator); an
    // `http_poll` source of 200 records.
    let (pki, broker, over_tls) = tls_broker().await;
    crate::pgtls::ca(pki.path(), "other");
    let read = |name: &str| std::fs::read_to_string(pki.path().join(name)).unwrap();
    create_topic_with(over_tls.clone(), "out", 1).await;
    create_topic_with(over_tls.clone(), "refused", 1).await;
    let records = std::sync::Arc::new(std::sync::Mutex::new(
        (0..200)
            .map(|id| json!({ "id": id, "name": format!("item-{id}") }))
            .collect::<Vec<_>>(),
    ));
    let url = serve_source(records).await;
    let poller = json!({ "url": url, "interval_ms": 200, "record_path": "/items" });
    let ca_file = pki.path().join("ca.crt").display().to_string();
    let other_file = pki.path().join("other.crt").display().to_string();
    let sink_to = |topic: &'static str, ca: &str| -> Vec<(&'static str, String)> {
        vec![
            ("DSREG_MASTER_KEYS", MASTER_KEYS.to_owned()),
            ("DSREG_SINK", "kafka".to_owned()),
            ("DSREG_SINK_KAFKA_BROKERS", broker.address()),
            ("DSREG_SINK_KAFKA_TOPIC", topic.to_owned()),
            ("DSREG_SINK_KAFKA_KEY_FIELD", "id".to_owned()),
            ("DSREG_SINK_KAFKA_CA_FILE", ca.to_owned()),
            ("DSREG_LOG", "debug".to_owned()),
        ]
    };
    // Act: one registry whose sink trusts the broker's CA, one whose sink trusts the other
    // CA, each with a datasource of its own.
    let db = TestDb::new().await;
    let trusting_env = sink_to("out", &ca_file);
    let trusting = ServeProcess::start(&db.url, &borrowed(&trusting_env)).await;
    let ds = db.datasource_of("poller", "http_poll").await.id;
    let v = db.version(ds, poller.clone()).await;
    db.publish_sql(ds, v).await;
    let wrong_db = TestDb::new().await;
    let wrong_env = sink_to("refused", &other_file);
    let wrong = ServeProcess::start(&wrong_db.url, &borrowed(&wrong_env)).await;
    let refused = wrong_db.datasource_of("poller", "http_poll").await.id;
    let v = wrong_db.version(refused, poller).await;
    wrong_db.publish_sql(refused, v).await;

    // Assert: the trusting sink's records are all in the topic, keyed by id.
    let landed = read_topic_with(over_tls.clone(), "out", 200).await;
    for message in &landed {
        assert_eq!(message.key, Some(message.value["id"].to_string()));
    }
    assert_eq!(db.state(ds).await.error_code, None);
    // The other's datasource says its sink's TLS handshake failed; its topic holds nothing and
    // its records were handed back to the source, not dead-lettered.
    let state = wait_for("the wrong CA's error on the datasource", WAIT, || async {
        let state = wrong_db.state(refused).await;
        state.error_code.is_some().then_some(state)
    })
    .await;
    let message = state.error_message.clone().unwrap_or_default();
    assert_eq!(
        state.error_code.as_deref(),
        Some("sink_failed"),
        "{message}"
    );
    assert!(message.contains("TLS handshake"), "{message}");
    assert!(message.contains("certificate verify failed"), "{message}");
    assert_eq!(end_of_with(over_tls, "refused", 0).await, 0);
    let dead: i64 = wrong_db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM datasource_dead_letters WHERE datasource_id = $1",
            &[&refused],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 0);
    // Neither CA's certificate text is in the datasource's state, its status, its events or
    // the registry's logs.
    let bodies: Vec<String> = [read("ca.crt"), read("other.crt")]
        .iter()
        .flat_map(|pem| {
            pem.lines()
                .filter(|l| !l.starts_with("-----") && l.len() > 40)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!bodies.is_empty());
    for (what, text) in everything_said(&wrong, &wrong_db, refused).await {
        for body in &bodies {
            assert!(!text.contains(body.as_str()), "a CA's text is in {what}");
        }
    }
    wrong.stop().await;
    trusting.stop().await;
}

/// `pairs` as `ServeProcess::start` takes them.
fn borrowed<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Everything the registry `serve` says of datasource `ds`: its state, its GetStatus answer,
/// its events and the registry's logs, each named.
async fn everything_said(
    serve: &ServeProcess,
    db: &TestDb,
    ds: uuid::Uuid,
) -> [(&'static str, String); 4] {
    let mut status = LifecycleClient::new(serve.channel().await);
    let answer = status
        .get_status(pb::GetStatusRequest {
            datasource_id: ds.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    [
        ("the state", format!("{:?}", db.state(ds).await)),
        ("GetStatus", format!("{answer:?}")),
        ("the events", format!("{:?}", db.events(ds).await)),
        ("the logs", serve.logs.lock().unwrap().join("\n")),
    ]
}

/// Partitions whose saved position passes an offset not stored: `(partition, position, how
/// many offsets below it are stored)`. The position is read before the records, so a run that
/// saves a position only after its records commit never shows here.
async fn positions_ahead_of_records(db: &TestDb, datasource: uuid::Uuid) -> Vec<(i64, i64, i64)> {
    let position = stored_position(db, datasource).await;
    let offsets = position
        .as_ref()
        .and_then(|p| p.get("offsets"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut ahead = Vec::new();
    for (key, next) in offsets {
        let partition: i64 = key.rsplit_once(':').unwrap().1.parse().unwrap();
        let next = next.as_i64().unwrap();
        let below: i64 = db
            .client()
            .await
            .query_one(
                "SELECT count(DISTINCT (record->>'offset')::bigint) FROM datasource_records \
                 WHERE datasource_id = $1 AND (record->>'partition')::bigint = $2 \
                 AND (record->>'offset')::bigint < $3",
                &[&datasource, &partition, &next],
            )
            .await
            .unwrap()
            .get(0);
        if below != next {
            ahead.push((partition, next, below));
        }
    }
    ahead
}

#[tokio::test]
async fn the_position_never_passes_a_record_not_stored_while_the_sink_is_held_up() {
    // Arrange: 4,000 messages in two partitions, read in batches of 100: the source reads and
    // transforms the next batch while the sink writes the one before.
    let broker = KafkaBroker::start().await;
    create_topic(&broker.address(), "orders", 2).await;
    produce(&broker.address(), "orders", 2, 0, 4_000).await;
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource_of("orders", "kafka").await.id;
    let mut config = source_config(&broker.address(), "orders", TRANSFORM);
    config["batch_max_records"] = json!(100);
    let v = db.version(ds, config).await;
    db.publish_sql(ds, v).await;
    wait_for("some records stored", WAIT, || async {
        (!stored_ids(&db, ds).await.is_empty()).then_some(())
    })
    .await;

    // Act: hold the sink's writes (a lock that lets reads through) until one of them waits
    // for it, so that batches read after it pile up behind the write.
    let mut holder = db.client().await;
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE datasource_records IN SHARE MODE")
        .await
        .unwrap();
    let observer = db.client().await;
    crate::helpers::wait_for_lock_wait(
        &observer,
        "a sink write waiting for the lock",
        "INSERT INTO datasource_records",
    )
    .await;
    let held = positions_ahead_of_records(&db, ds).await;
    hold.rollback().await.unwrap();

    // Assert: while held, and at every look until all are stored, no position passed a
    // record that was not stored; then every message is stored once.
    assert_eq!(held, [], "(partition, position, offsets stored below it)");
    let deadline = tokio::time::Instant::now() + WAIT;
    while stored_ids(&db, ds).await.len() < 4_000 {
        assert_eq!(positions_ahead_of_records(&db, ds).await, []);
        assert!(
            tokio::time::Instant::now() < deadline,
            "not all stored in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(wait_for_all(&db, ds, 4_000).await, 0);
    wait_for("the position to cover every message", WAIT, || async {
        (committed(stored_position(&db, ds).await.as_ref()) == 4_000).then_some(())
    })
    .await;
    assert_eq!(positions_ahead_of_records(&db, ds).await, []);
    app.stop().await.unwrap();
}
