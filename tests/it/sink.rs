//! The sink under records it cannot store, through the real HTTP port and a real Postgres: a
//! record with NUL, a transform that panics, rows Postgres refuses (a constraint) and a
//! datasource whose every flush fails for a while. Each is that record's (or that
//! datasource's) problem: dead-lettered with its reason, never lost, never holding another
//! tenant's records; the webhook's 202 counts what became of every record.

use std::time::Duration;

use dsreg::connectors::sink::find_nul;
use dsreg::connectors::webhook::sign;
use dsreg::domain::WorkerStatus;
use proptest::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::connectors::MASTER_KEYS;
use crate::helpers::{TestApp, TestDb, test_settings, wait_for};

const WAIT: Duration = Duration::from_secs(20);
const WEBHOOK_KEY: &str = "whsec-sink-key";

/// Sorts 21 floats with NaNs among them when `record.nan` is true: the standard library's
/// sort panics on the inconsistent order Rhai hands it.
const NAN_SORT: &str = r#"
let a = [];
for i in 0..21 {
    if record.nan == true && i % 3 == 0 { a.push(parse_float("NaN")) } else { a.push(((i * 7919) % 101).to_float()) }
}
a.sort();
record
"#;

async fn spawn(db: &TestDb) -> TestApp {
    let mut settings = test_settings(&db.url);
    settings.master_keys = Some(MASTER_KEYS.to_owned());
    TestApp::spawn_with(settings, |_| {}).await
}

/// A running webhook datasource with `config`; returns its id.
async fn webhook(db: &TestDb, name: &str, config: Value) -> Uuid {
    let ds = db.datasource_of(name, "webhook").await;
    crate::helpers::put_secret(db, MASTER_KEYS, ds.id, "webhook_secret", WEBHOOK_KEY).await;
    let v = db.version(ds.id, config).await;
    db.publish_sql(ds.id, v).await;
    db.wait_for_state(ds.id, "webhook RUNNING", |s| {
        s.worker_status == WorkerStatus::Running && s.running_version == Some(v)
    })
    .await;
    ds.id
}

/// A generator datasource in organisation `org`, publishing `config`; returns its id.
async fn generator(db: &TestDb, name: &str, org: &str, config: Value) -> Uuid {
    let ds = db.datasource(name).await;
    db.client()
        .await
        .execute(
            "UPDATE datasources SET org = $2 WHERE id = $1",
            &[&ds.id, &org],
        )
        .await
        .unwrap();
    let v = db.version(ds.id, config).await;
    db.publish_sql(ds.id, v).await;
    ds.id
}

/// POSTs a signed JSON body to a webhook; the status and the answer.
async fn deliver(app: &TestApp, id: Uuid, body: &[u8]) -> (u16, Value) {
    let response = crate::helpers::http_client(Duration::from_secs(60))
        .unwrap()
        .post(format!("http://{}/ingest/{id}", app.http_addr))
        .header("content-type", "application/json")
        .header("x-dsreg-signature", sign(WEBHOOK_KEY.as_bytes(), body))
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let answer = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null);
    (status, answer)
}

async fn stored(db: &TestDb, id: Uuid) -> Vec<Value> {
    db.client()
        .await
        .query(
            "SELECT record FROM datasource_records WHERE datasource_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Dead letters of a datasource: record, code, message.
async fn dead_letters(db: &TestDb, id: Uuid) -> Vec<(Value, String, String)> {
    db.client()
        .await
        .query(
            "SELECT record, error_code, error FROM datasource_dead_letters WHERE datasource_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn count(db: &TestDb, table: &str, id: Uuid) -> i64 {
    db.client()
        .await
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE datasource_id = $1"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until the datasource has more than `than` records stored.
async fn flowing(db: &TestDb, id: Uuid, than: i64, what: &str) -> i64 {
    wait_for(what, WAIT, || async {
        let n = count(db, "datasource_records", id).await;
        (n > than).then_some(n)
    })
    .await
}

/// A sample's value in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(app: &TestApp) -> String {
    let (status, body) = crate::serve::http_get(&app.http_addr.to_string(), "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The JSON a dead letter kept of a record Postgres cannot store as jsonb.
fn kept(record: &Value) -> Value {
    serde_json::from_str(record["json_text"].as_str().expect("kept as JSON text")).unwrap()
}

#[tokio::test]
async fn a_webhook_record_with_nul_is_dead_lettered_and_another_orgs_generator_keeps_flowing() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let other = generator(&db, "steady", "globex", json!({ "rate_per_sec": 200 })).await;
    let hook = webhook(&db, "hook", json!({})).await;
    let before = flowing(&db, other, 0, "the other org's generator writes").await;

    let body = br#"[{"n": 1, "note": "a\u0000b"}, {"n": 2}, {"k\u0000": 3}]"#;
    let (status, answer) = deliver(&app, hook, body).await;

    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer,
        json!({ "accepted": 3, "written": 1, "dead_lettered": 2 })
    );
    assert_eq!(stored(&db, hook).await, [json!({ "n": 2 })]);
    let dead = dead_letters(&db, hook).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead.iter().all(|(_, code, _)| code == "nul_character"));
    assert_eq!(
        kept(&dead[0].0),
        json!({ "n": 1, "note": "a\u{0}b" }),
        "lossless"
    );
    assert_eq!(kept(&dead[1].0), json!({ "k\u{0}": 3 }));
    assert!(
        dead[0].2.contains("/note"),
        "the reason names where: {}",
        dead[0].2
    );
    // The other tenant never waited, and later deliveries are answered at once.
    flowing(
        &db,
        other,
        before + 50,
        "the other org's generator keeps writing",
    )
    .await;
    let (status, answer) = deliver(&app, hook, br#"{"n": 4}"#).await;
    assert_eq!((status, answer["written"].as_i64()), (202, Some(1)));
    let (status, body) = crate::serve::http_get(&app.http_addr.to_string(), "/readyz").await;
    assert_eq!(status, 200, "{body}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_transform_that_panics_dead_letters_its_record_and_the_answer_counts_it() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let hook = webhook(&db, "nan-hook", json!({ "transform": NAN_SORT })).await;

    let body = br#"[{"n": 1, "nan": true}, {"n": 2, "nan": false}, {"n": 3, "nan": true}]"#;
    let (status, answer) = deliver(&app, hook, body).await;

    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer,
        json!({ "accepted": 3, "written": 1, "dead_lettered": 2 })
    );
    assert_eq!(stored(&db, hook).await, [json!({ "n": 2, "nan": false })]);
    let dead = dead_letters(&db, hook).await;
    let inputs: Vec<&Value> = dead.iter().map(|(r, _, _)| r).collect();
    assert_eq!(
        inputs,
        [
            &json!({ "n": 1, "nan": true }),
            &json!({ "n": 3, "nan": true })
        ]
    );
    assert!(
        dead.iter().all(|(_, code, _)| code == "transform_panicked"),
        "{dead:?}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_generator_whose_transform_panics_loses_nothing_and_counts_what_was_stored() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let script = format!("record.nan = record.seq % 2 == 0;\n{NAN_SORT}");
    let nan_gen = generator(
        &db,
        "nan-gen",
        "acme",
        json!({ "rate_per_sec": 200, "count": 20, "transform": script }),
    )
    .await;

    wait_for("10 records and 10 dead letters", WAIT, || async {
        (count(&db, "datasource_records", nan_gen).await == 10
            && count(&db, "datasource_dead_letters", nan_gen).await == 10)
            .then_some(())
    })
    .await;

    let dead = dead_letters(&db, nan_gen).await;
    assert!(dead.iter().all(|(r, code, _)| code == "transform_panicked"
        && r["seq"].as_i64().unwrap() % 2 == 0));
    let labels = format!("{{datasource=\"{nan_gen}\",kind=\"generator\"}}");
    let text = scrape(&app).await;
    assert_eq!(
        sample(&text, &format!("dsreg_datasource_records_total{labels}")),
        Some(10.0),
        "counts what was written"
    );
    assert_eq!(
        sample(
            &text,
            &format!("dsreg_datasource_dead_lettered_total{labels}")
        ),
        Some(10.0)
    );
    let state = db.state(nan_gen).await;
    assert_eq!(state.worker_status, WorkerStatus::Running);
    app.stop().await.unwrap();
}

/// Postgres refuses records with a top-level `poison` key in this database (a constraint).
async fn refuse_poison(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "ALTER TABLE datasource_records ADD CONSTRAINT no_poison CHECK (NOT record ? 'poison')",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn rows_postgres_refuses_are_split_out_and_dead_lettered_without_holding_anyone() {
    let db = TestDb::new().await;
    refuse_poison(&db).await;
    let app = spawn(&db).await;
    let other = generator(&db, "clean", "globex", json!({ "rate_per_sec": 200 })).await;
    let poisoned = generator(
        &db,
        "poisoned",
        "acme",
        json!({ "rate_per_sec": 200, "count": 40, "template": { "poison": true } }),
    )
    .await;
    let hook = webhook(&db, "mixed", json!({})).await;

    let body = br#"[{"n": 1}, {"n": 2, "poison": 1}, {"n": 3}, {"n": 4}, {"n": 5, "poison": 2}]"#;
    let (status, answer) = deliver(&app, hook, body).await;

    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer,
        json!({ "accepted": 5, "written": 3, "dead_lettered": 2 })
    );
    let written: Vec<i64> = stored(&db, hook)
        .await
        .iter()
        .map(|r| r["n"].as_i64().unwrap())
        .collect();
    assert_eq!(written, [1, 3, 4], "the rest committed, in order");
    let dead = dead_letters(&db, hook).await;
    assert_eq!(
        dead.iter().map(|(r, _, _)| r.clone()).collect::<Vec<_>>(),
        [
            json!({ "n": 2, "poison": 1 }),
            json!({ "n": 5, "poison": 2 })
        ]
    );
    assert!(
        dead.iter()
            .all(|(_, code, message)| code == "unstorable" && message.contains("no_poison"))
    );
    wait_for("every poisoned record dead-lettered", WAIT, || async {
        (count(&db, "datasource_dead_letters", poisoned).await == 40).then_some(())
    })
    .await;
    assert_eq!(count(&db, "datasource_records", poisoned).await, 0);
    let before = count(&db, "datasource_records", other).await;
    flowing(
        &db,
        other,
        before + 50,
        "the other org's generator keeps writing",
    )
    .await;
    let text = scrape(&app).await;
    assert!(
        sample(&text, "dsreg_sink_flush_failures_total{kind=\"refused\"}").unwrap() >= 1.0,
        "{text}"
    );
    app.stop().await.unwrap();
}

/// Makes every insert of `datasource`'s records fail, until [`heal`], with a serialization
/// failure (a transient error); with `None`, every record's insert, as if the database could
/// not take connections (`cannot_connect_now`).
async fn hold(db: &TestDb, datasource: Option<Uuid>) {
    let (only, code) = datasource.map_or(("true".to_owned(), "57P03"), |id| {
        (format!("NEW.datasource_id = '{id}'"), "40001")
    });
    db.client()
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION test_hold() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF {only} THEN RAISE EXCEPTION 'held by the test' USING ERRCODE = '{code}'; END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER test_hold BEFORE INSERT ON datasource_records
                 FOR EACH ROW EXECUTE FUNCTION test_hold();"
        ))
        .await
        .unwrap();
}

async fn heal(db: &TestDb) {
    db.client()
        .await
        .batch_execute("DROP TRIGGER test_hold ON datasource_records; DROP FUNCTION test_hold();")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_datasource_whose_flushes_keep_failing_holds_no_other_and_catches_up_when_healed() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let failing = db.datasource("failing").await.id;
    hold(&db, Some(failing)).await;
    let v = db
        .version(failing, json!({ "rate_per_sec": 200, "count": 30 }))
        .await;
    db.publish_sql(failing, v).await;
    let other = generator(&db, "healthy", "globex", json!({ "rate_per_sec": 200 })).await;

    let before = flowing(&db, other, 0, "the healthy generator writes").await;
    flowing(
        &db,
        other,
        before + 100,
        "the healthy generator keeps writing",
    )
    .await;
    let text = wait_for("the failing datasource in the metrics", WAIT, || async {
        let text = scrape(&app).await;
        (sample(&text, "dsreg_sink_failing_datasources") >= Some(1.0)).then_some(text)
    })
    .await;
    assert!(sample(&text, "dsreg_sink_flush_failures_total{kind=\"transient\"}").unwrap() >= 1.0);
    assert_eq!(count(&db, "datasource_records", failing).await, 0);
    assert_eq!(
        count(&db, "datasource_dead_letters", failing).await,
        0,
        "transient is not dead"
    );

    heal(&db).await;

    let seqs = wait_for(
        "the held records, once healed",
        Duration::from_secs(40),
        || async {
            let seqs: std::collections::BTreeSet<i64> = stored(&db, failing)
                .await
                .iter()
                .map(|r| r["seq"].as_i64().unwrap())
                .collect();
            (seqs.len() == 30).then_some(seqs)
        },
    )
    .await;
    assert_eq!(
        seqs.into_iter().collect::<Vec<_>>(),
        (0..30).collect::<Vec<_>>()
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn readiness_and_the_webhook_tell_when_the_sink_cannot_commit() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let addr = app.http_addr.to_string();
    let hook = webhook(&db, "stuck", json!({})).await;
    hold(&db, None).await;
    let failing = generator(&db, "stuck-gen", "acme", json!({ "rate_per_sec": 50 })).await;

    let body = wait_for("readiness failing on the sink", WAIT, || async {
        let (status, body) = crate::serve::http_get(&addr, "/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("the sink has committed nothing"), "{body}");
    assert_eq!(count(&db, "datasource_records", failing).await, 0);

    heal(&db).await;

    wait_for("readiness back", WAIT, || async {
        (crate::serve::http_get(&addr, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    flowing(&db, failing, 0, "the held generator's records").await;
    let (status, answer) = deliver(&app, hook, br#"{"n": 1}"#).await;
    assert_eq!((status, answer["written"].as_i64()), (202, Some(1)));
    app.stop().await.unwrap();
}

/// Strings a record may carry: NUL, escapes that look like NUL, quotes, controls, non-ASCII.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\u{0}".to_owned()),
        Just("a\u{0}b".to_owned()),
        Just("\\u0000".to_owned()),
        Just("\"'\\".to_owned()),
        Just("\u{1}\u{1f}\t\n\r".to_owned()),
        Just("é😀\u{feff}\u{2028}".to_owned()),
        Just("poison".to_owned()),
        "[a-z]{0,8}",
        any::<String>().prop_map(|s| s.chars().take(16).collect()),
    ]
}

fn hostile_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(hostile_string(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Records: objects (the key `poison` at the top is refused by Postgres in this database).
fn hostile_record() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(hostile_string(), hostile_value(), 0..5)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

#[test]
fn every_hostile_record_is_committed_or_dead_lettered_and_none_holds_another_datasource() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (db, app, hook, other) = runtime.block_on(async {
        let db = TestDb::new().await;
        refuse_poison(&db).await;
        let app = spawn(&db).await;
        let other = generator(&db, "bystander", "globex", json!({ "rate_per_sec": 200 })).await;
        let hook = webhook(&db, "hostile", json!({})).await;
        (db, app, hook, other)
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    runner
        .run(&prop::collection::vec(hostile_record(), 1..6), |records| {
            runtime.block_on(async {
                let before_stored = stored(&db, hook).await.len();
                let before_dead = dead_letters(&db, hook).await.len();
                let body = serde_json::to_vec(&records).unwrap();
                let (status, answer) = deliver(&app, hook, &body).await;
                prop_assert_eq!(status, 202, "{}", answer);
                let has_nul = |r: &&Value| find_nul(r).is_some();
                let nul = records.iter().filter(has_nul).count();
                let poison = records
                    .iter()
                    .filter(|r| !has_nul(r) && r.get("poison").is_some())
                    .count();
                prop_assert_eq!(
                    answer,
                    json!({
                        "accepted": records.len(),
                        "written": records.len() - nul - poison,
                        "dead_lettered": nul + poison,
                    })
                );
                let now_stored = stored(&db, hook).await;
                let now_dead = dead_letters(&db, hook).await;
                // None lost, none twice: what was sent is exactly what was stored or kept.
                let mut kept_records: Vec<Value> = now_stored[before_stored..].to_vec();
                for (record, code, _) in &now_dead[before_dead..] {
                    kept_records.push(if code == "nul_character" {
                        kept(record)
                    } else {
                        record.clone()
                    });
                }
                let key = |v: &Value| v.to_string();
                let mut sent: Vec<String> = records.iter().map(key).collect();
                let mut got: Vec<String> = kept_records.iter().map(key).collect();
                sent.sort();
                got.sort();
                prop_assert_eq!(sent, got);
                Ok::<(), TestCaseError>(())
            })
        })
        .unwrap();
    runtime.block_on(async {
        let before = count(&db, "datasource_records", other).await;
        flowing(&db, other, before + 20, "the bystander keeps writing").await;
        app.stop().await.unwrap();
    });
}

/// Datasources `ids` leased to instance `owner` under epoch 1, for a sink used on its own.
pub(crate) async fn lease(db: &TestDb, owner: &str, ids: &[Uuid]) {
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO dsreg_instances (id, leases_until) VALUES ($1, now() + interval '1 hour')",
            &[&owner],
        )
        .await
        .unwrap();
    for id in ids {
        client
            .execute(
                "INSERT INTO datasource_leases (datasource_id, owner, epoch) VALUES ($1, $2, 1)
                 ON CONFLICT (datasource_id) DO UPDATE SET owner = $2, epoch = 1",
                &[id, &owner],
            )
            .await
            .unwrap();
    }
}

/// A sink on `db` for instance `sink-test` with fast retries, its writer running.
pub(crate) fn sink_on(
    db: &TestDb,
    target: dsreg::connectors::sink::Target,
    retry: dsreg::connectors::sink::RetryPolicy,
) -> (
    dsreg::connectors::sink::Sink,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let options = dsreg::connectors::sink::WriterOptions { drain: None, retry };
    let (sink, writer) = dsreg::connectors::sink::Sink::new(
        db.pool.clone(),
        target,
        "sink-test".into(),
        None,
        options,
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    (sink, stop, task)
}

pub(crate) fn handle(
    sink: &dsreg::connectors::sink::Sink,
    id: Uuid,
) -> dsreg::connectors::sink::SinkHandle {
    let identity =
        dsreg::transform::Transform::compile(None, None, &dsreg::transform::Limits::default())
            .unwrap();
    sink.handle(id, 1, 1, identity, dsreg::connectors::Health::default())
}

#[tokio::test]
async fn flushed_returns_while_a_datasource_waits_after_failures_and_shutdown_answers_its_senders()
{
    let db = TestDb::new().await;
    let held = db.datasource("held").await.id;
    let free = db.datasource("free").await.id;
    lease(&db, "sink-test", &[held, free]).await;
    hold(&db, Some(held)).await;
    let retry = dsreg::connectors::sink::RetryPolicy {
        base: Duration::from_millis(20),
        max: Duration::from_millis(200),
        http_attempts: 3,
    };
    let (sink, stop, task) = sink_on(&db, dsreg::connectors::sink::Target::Postgres, retry);
    let waiting = tokio::spawn({
        let held = handle(&sink, held);
        async move { held.write_durable(vec![json!({ "n": 1 })]).await }
    });
    let status = sink.status();
    wait_for("the held datasource failing", WAIT, || async {
        (status.failing_datasources() == 1).then_some(())
    })
    .await;
    assert_eq!(
        status.check(),
        Ok(()),
        "one datasource failing on its own does not make the instance unready"
    );

    let outcome = handle(&sink, free)
        .write_durable(vec![json!({ "n": 2 })])
        .await
        .expect("the other datasource commits");
    assert_eq!((outcome.written, outcome.dead_lettered), (1, 0));
    // What the supervisor awaits before releasing leases: answered although `held` waits.
    tokio::time::timeout(WAIT, sink.flushed())
        .await
        .expect("flushed() returns while a datasource waits for a retry");
    assert!(
        !waiting.is_finished(),
        "the held records are still waiting, not dropped"
    );
    assert_eq!(count(&db, "datasource_records", held).await, 0);

    stop.cancel();
    task.await.unwrap();
    let answer = waiting.await.unwrap();
    assert!(
        answer
            .as_ref()
            .is_err_and(|e| e.to_string().contains("shut down before committing")),
        "{answer:?}"
    );
    assert_eq!(count(&db, "datasource_records", free).await, 1);
}

/// A local gateway: 400 for a batch holding a `poison` record, 500 while `down` (with a
/// `Retry-After` date already past), else takes the batch.
#[derive(Default)]
struct Gateway {
    down: std::sync::atomic::AtomicBool,
    calls: std::sync::atomic::AtomicUsize,
    received: std::sync::Mutex<Vec<Value>>,
}

async fn serve_gateway(gateway: std::sync::Arc<Gateway>) -> String {
    use std::sync::atomic::Ordering;
    async fn take(
        axum::extract::State(gateway): axum::extract::State<std::sync::Arc<Gateway>>,
        body: axum::body::Bytes,
    ) -> (axum::http::StatusCode, axum::http::HeaderMap) {
        gateway.calls.fetch_add(1, Ordering::SeqCst);
        let mut headers = axum::http::HeaderMap::new();
        if gateway.down.load(Ordering::SeqCst) {
            headers.insert(
                "retry-after",
                "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
            );
            return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, headers);
        }
        let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
        if batch.iter().any(|r| r["record"].get("poison").is_some()) {
            return (axum::http::StatusCode::BAD_REQUEST, headers);
        }
        gateway.received.lock().unwrap().extend(batch);
        (axum::http::StatusCode::OK, headers)
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .route("/pipeline", axum::routing::post(take))
        .with_state(gateway);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/pipeline")
}

fn http_target(url: String) -> dsreg::connectors::sink::Target {
    dsreg::connectors::sink::Target::Http {
        client: crate::helpers::http_client(Duration::from_secs(5)).unwrap(),
        url,
    }
}

#[tokio::test]
async fn the_http_sink_splits_out_what_the_gateway_refuses_and_gives_up_within_its_bound() {
    use std::sync::atomic::Ordering;
    let db = TestDb::new().await;
    let id = db.datasource("shipped").await.id;
    lease(&db, "sink-test", &[id]).await;
    let gateway = std::sync::Arc::new(Gateway::default());
    let url = serve_gateway(gateway.clone()).await;
    let retry = dsreg::connectors::sink::RetryPolicy {
        base: Duration::from_millis(10),
        max: Duration::from_millis(50),
        http_attempts: 4,
    };
    let (sink, stop, task) = sink_on(&db, http_target(url), retry);
    let shipped = handle(&sink, id);

    let outcome = shipped
        .write_durable(vec![
            json!({ "n": 1 }),
            json!({ "n": 2, "poison": true }),
            json!({ "n": 3 }),
        ])
        .await
        .unwrap();

    assert_eq!((outcome.written, outcome.dead_lettered), (2, 1));
    let received: Vec<i64> = gateway
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r["record"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(received, [1, 3]);
    let dead = dead_letters(&db, id).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, json!({ "n": 2, "poison": true }));
    assert_eq!(dead[0].1, "unstorable");
    assert!(dead[0].2.contains("400"), "{}", dead[0].2);

    gateway.down.store(true, Ordering::SeqCst);
    let calls = gateway.calls.load(Ordering::SeqCst);
    let outcome = shipped
        .write_durable(vec![json!({ "n": 4 })])
        .await
        .unwrap();

    assert_eq!((outcome.written, outcome.dead_lettered), (0, 1));
    assert_eq!(
        gateway.calls.load(Ordering::SeqCst) - calls,
        4,
        "bounded: four attempts, then dead letters"
    );
    let dead = dead_letters(&db, id).await;
    assert_eq!(dead[1].0, json!({ "n": 4 }));
    assert_eq!(dead[1].1, "sink_unavailable");
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_cancels_the_http_sinks_retries_and_dead_letters_what_is_left() {
    let db = TestDb::new().await;
    let id = db.datasource("stranded").await.id;
    lease(&db, "sink-test", &[id]).await;
    let gateway = std::sync::Arc::new(Gateway::default());
    gateway
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let url = serve_gateway(gateway.clone()).await;
    // Retries an hour apart: only shutdown can end the wait.
    let retry = dsreg::connectors::sink::RetryPolicy {
        base: Duration::from_secs(3_600),
        max: Duration::from_secs(3_600),
        http_attempts: 10,
    };
    let (sink, stop, task) = sink_on(&db, http_target(url), retry);
    let waiting = tokio::spawn({
        let stranded = handle(&sink, id);
        async move { stranded.write_durable(vec![json!({ "n": 1 })]).await }
    });
    wait_for("the first attempt", WAIT, || async {
        (gateway.calls.load(std::sync::atomic::Ordering::SeqCst) >= 1).then_some(())
    })
    .await;

    stop.cancel();

    task.await.unwrap();
    let outcome = waiting.await.unwrap().unwrap();
    assert_eq!((outcome.written, outcome.dead_lettered), (0, 1));
    let dead = dead_letters(&db, id).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (&dead[0].0, dead[0].1.as_str()),
        (&json!({ "n": 1 }), "sink_unavailable")
    );
}

/// A local gateway that answers 503 with `Retry-After` as an HTTP-date `ask_for` after the
/// answer while `down`, and takes batches otherwise; it keeps when each call came and the
/// date it asked for.
struct Throttling {
    down: std::sync::atomic::AtomicBool,
    ask_for: Duration,
    calls: std::sync::Mutex<Vec<std::time::SystemTime>>,
    asked: std::sync::Mutex<Vec<std::time::SystemTime>>,
    received: std::sync::Mutex<Vec<Value>>,
}

impl Throttling {
    fn new(ask_for: Duration) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            down: std::sync::atomic::AtomicBool::new(true),
            ask_for,
            calls: std::sync::Mutex::default(),
            asked: std::sync::Mutex::default(),
            received: std::sync::Mutex::default(),
        })
    }

    fn calls(&self) -> Vec<std::time::SystemTime> {
        self.calls.lock().unwrap().clone()
    }
}

async fn serve_throttling(gateway: std::sync::Arc<Throttling>) -> String {
    async fn take(
        axum::extract::State(gateway): axum::extract::State<std::sync::Arc<Throttling>>,
        body: axum::body::Bytes,
    ) -> (axum::http::StatusCode, axum::http::HeaderMap) {
        let now = std::time::SystemTime::now();
        gateway.calls.lock().unwrap().push(now);
        let mut headers = axum::http::HeaderMap::new();
        if gateway.down.load(std::sync::atomic::Ordering::SeqCst) {
            let date = httpdate::fmt_http_date(now + gateway.ask_for);
            // What the date means, at the one-second resolution an HTTP-date has.
            gateway
                .asked
                .lock()
                .unwrap()
                .push(httpdate::parse_http_date(&date).unwrap());
            headers.insert("retry-after", date.parse().unwrap());
            return (axum::http::StatusCode::SERVICE_UNAVAILABLE, headers);
        }
        let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
        gateway.received.lock().unwrap().extend(batch);
        (axum::http::StatusCode::OK, headers)
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .route("/pipeline", axum::routing::post(take))
        .with_state(gateway);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/pipeline")
}

#[tokio::test]
async fn the_http_sink_retries_after_the_date_a_503_asks_for_and_not_before() {
    let db = TestDb::new().await;
    let id = db.datasource("throttled").await.id;
    lease(&db, "sink-test", &[id]).await;
    let gateway = Throttling::new(Duration::from_secs(3));
    let url = serve_throttling(gateway.clone()).await;
    // Its own delays are milliseconds: only the date can hold the retry back.
    let retry = dsreg::connectors::sink::RetryPolicy {
        base: Duration::from_millis(10),
        max: Duration::from_millis(20),
        http_attempts: 10,
    };
    let (sink, stop, task) = sink_on(&db, http_target(url), retry);
    let waiting = tokio::spawn({
        let throttled = handle(&sink, id);
        async move { throttled.write_durable(vec![json!({ "n": 1 })]).await }
    });
    wait_for("the first attempt", WAIT, || async {
        (!gateway.calls().is_empty()).then_some(())
    })
    .await;

    gateway
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);

    let outcome = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the retry came")
        .unwrap()
        .unwrap();
    assert_eq!((outcome.written, outcome.dead_lettered), (1, 0));
    let calls = gateway.calls();
    let asked = gateway.asked.lock().unwrap().clone();
    assert_eq!((calls.len(), asked.len()), (2, 1), "one 503, one retry");
    assert!(
        calls[1] >= asked[0],
        "retried at {:?}, before the {:?} asked for",
        httpdate::fmt_http_date(calls[1]),
        httpdate::fmt_http_date(asked[0])
    );
    assert_eq!(
        gateway.received.lock().unwrap()[0]["record"],
        json!({ "n": 1 })
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_worker_stopped_while_its_http_sink_waits_to_retry_stops_and_the_registry_too() {
    let db = TestDb::new().await;
    // Two minutes asked for each time: only stopping can end the wait.
    let gateway = Throttling::new(Duration::from_secs(120));
    let mut settings = test_settings(&db.url);
    settings.sink = "http".into();
    settings.sink_url = Some(serve_throttling(gateway.clone()).await);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let id = generator(
        &db,
        "stuck",
        "org-a",
        json!({ "rate_per_sec": 100, "count": 5 }),
    )
    .await;
    db.wait_for_state(id, "RUNNING", |s| s.worker_status == WorkerStatus::Running)
        .await;
    wait_for("the gateway's first 503", WAIT, || async {
        (!gateway.calls().is_empty()).then_some(())
    })
    .await;

    db.set_status(id, "disabled").await;

    db.wait_for_state(id, "STOPPED while the sink waits", |s| {
        s.worker_status == WorkerStatus::Stopped
    })
    .await;
    tokio::time::timeout(Duration::from_secs(60), app.stop())
        .await
        .expect("the registry stops while the sink waits to retry")
        .unwrap();
    assert!(
        gateway.received.lock().unwrap().is_empty(),
        "the gateway never took anything"
    );
}
