//! Connectors end to end: records from each kind land in the postgres sink, transformed;
//! the webhook's every answer; http_poll against a local server (ETag, retries, a cursor that
//! survives a restart); runaway and failing scripts; the test harness beside a running worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use dsreg::connectors::webhook::sign;
use dsreg::domain::WorkerStatus;
use serde_json::{Value, json};

use crate::helpers::{TestApp, TestDb, test_settings, wait_for};

const WAIT: Duration = Duration::from_secs(15);
/// The master key the tests' registries use (base64 of 32 bytes).
pub const MASTER_KEYS: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const WEBHOOK_KEY: &str = "whsec-test-key";

fn running_on(version: i32) -> impl Fn(&dsreg::db::repository::state::State) -> bool {
    move |s| s.worker_status == WorkerStatus::Running && s.running_version == Some(version)
}

async fn spawn(db: &TestDb) -> TestApp {
    let mut settings = test_settings(&db.url);
    settings.master_keys = Some(MASTER_KEYS.to_owned());
    TestApp::spawn_with(settings, |_| {}).await
}

async fn records(db: &TestDb, id: uuid::Uuid) -> Vec<Value> {
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

async fn dead_letters(db: &TestDb, id: uuid::Uuid) -> Vec<(Value, String)> {
    db.client()
        .await
        .query(
            "SELECT record, error_code FROM datasource_dead_letters WHERE datasource_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn generator_records_land_in_the_sink_transformed() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let ds = db.datasource("gen").await;
    let v = db
        .version(
            ds.id,
            json!({
                "rate_per_sec": 100,
                "count": 20,
                "template": { "name": "ada" },
                "transform": "#{ id: record.seq, upper: record.name.to_upper() }",
                "output_schema": { "type": "object", "required": ["id", "upper"] },
            }),
        )
        .await;
    db.publish_sql(ds.id, v).await;
    let out = wait_for("20 transformed records", WAIT, || async {
        let r = records(&db, ds.id).await;
        (r.len() == 20).then_some(r)
    })
    .await;
    assert_eq!(out[0], json!({ "id": 0, "upper": "ADA" }));
    assert_eq!(out[19]["id"], 19);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_script_that_fails_on_some_records_dead_letters_them_and_the_rest_flow() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let ds = db.datasource("picky").await;
    let v = db
        .version(
            ds.id,
            json!({
                "rate_per_sec": 100,
                "count": 10,
                "transform": "if record.seq % 3 == 0 { throw \"multiple of three\" } record",
            }),
        )
        .await;
    db.publish_sql(ds.id, v).await;
    // seq 0..=9: 0, 3, 6 and 9 fail.
    wait_for("6 records and 4 dead letters", WAIT, || async {
        (records(&db, ds.id).await.len() == 6 && dead_letters(&db, ds.id).await.len() == 4)
            .then_some(())
    })
    .await;
    let dead = dead_letters(&db, ds.id).await;
    assert!(
        dead.iter()
            .all(|(r, _)| r["seq"].as_i64().unwrap() % 3 == 0)
    );
    assert_eq!(db.state(ds.id).await.worker_status, WorkerStatus::Running);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn runaway_scripts_are_stopped_and_other_workers_keep_their_pace() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let steady = db.datasource("steady").await;
    let sv = db.version(steady.id, json!({ "rate_per_sec": 200 })).await;
    db.publish_sql(steady.id, sv).await;
    db.wait_for_state(steady.id, "steady RUNNING", running_on(sv))
        .await;

    let scripts = [
        ("spin", "loop { }"),
        ("recurse", "fn f(x) { f(x + 1) } f(0)"),
        ("string", "let s = \"ab\"; loop { s += s; }"),
        ("array", "let a = [1]; loop { a += a; }"),
        (
            "outputs",
            "let out = []; for i in 0..100000 { out.push(#{ i: i }); } out",
        ),
    ];
    let mut ids = Vec::new();
    for (name, script) in scripts {
        let ds = db.datasource(name).await;
        let v = db
            .version(
                ds.id,
                json!({ "rate_per_sec": 20, "count": 2, "transform": script }),
            )
            .await;
        db.publish_sql(ds.id, v).await;
        ids.push((name, ds.id));
    }
    let before = db.records(steady.id, sv).await;
    for (name, id) in &ids {
        let dead = wait_for(
            &format!("{name}: both records dead-lettered"),
            WAIT,
            || async {
                let d = dead_letters(&db, *id).await;
                (d.len() == 2).then_some(d)
            },
        )
        .await;
        assert!(!dead[0].1.is_empty(), "{name}: a clear error code");
        assert!(
            records(&db, *id).await.is_empty(),
            "{name}: nothing written"
        );
    }
    // The steady worker kept producing while the scripts ran away (its pace is a bench's
    // figure, not a test's: a loaded machine slows every worker alike).
    wait_for("steady produces after the runaways", WAIT, || async {
        (db.records(steady.id, sv).await > before).then_some(())
    })
    .await;
    let (status, _) = crate::serve::http_get(&app.http_addr.to_string(), "/readyz").await;
    assert_eq!(status, 200);
    app.stop().await.unwrap();
}

async fn post(
    addr: &str,
    id: &str,
    content_type: &str,
    body: &[u8],
    signature: Option<String>,
) -> (u16, HeaderMap, Value) {
    let client = reqwest_client();
    let mut request = client
        .post(format!("http://{addr}/ingest/{id}"))
        .header("content-type", content_type)
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("x-dsreg-signature", signature);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

fn reqwest_client() -> reqwest::Client {
    crate::helpers::http_client(Duration::from_secs(30)).unwrap()
}

#[tokio::test]
async fn the_webhook_answers_every_case_and_loses_nothing_it_accepted() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let addr = app.http_addr.to_string();
    let ds = db.datasource_of("hook", "webhook").await;
    crate::helpers::put_secret(&db, MASTER_KEYS, ds.id, "webhook_secret", WEBHOOK_KEY).await;
    let v = db
        .version(ds.id, json!({ "max_body_bytes": 4096, "queue_capacity": 1, "transform": "record.n *= 10; record" }))
        .await;
    db.publish_sql(ds.id, v).await;
    db.wait_for_state(ds.id, "webhook RUNNING", running_on(v))
        .await;
    let id = ds.id.to_string();
    let key = WEBHOOK_KEY.as_bytes();

    let body = br#"[{"n": 1}, {"n": 2}]"#;
    let (status, _, answer) =
        post(&addr, &id, "application/json", body, Some(sign(key, body))).await;
    assert_eq!((status, answer["accepted"].as_i64()), (202, Some(2)));
    let ndjson = b"{\"n\": 3}\n{\"n\": 4}\n";
    assert_eq!(
        post(
            &addr,
            &id,
            "application/x-ndjson",
            ndjson,
            Some(sign(key, ndjson))
        )
        .await
        .0,
        202
    );
    let written: Vec<i64> = records(&db, ds.id)
        .await
        .iter()
        .map(|r| r["n"].as_i64().unwrap())
        .collect();
    assert_eq!(
        written,
        [10, 20, 30, 40],
        "202 means committed, transformed"
    );

    assert_eq!(
        post(&addr, &id, "application/json", body, None).await.0,
        401,
        "no signature"
    );
    assert_eq!(
        post(
            &addr,
            &id,
            "application/json",
            body,
            Some(sign(b"forged", body))
        )
        .await
        .0,
        401,
        "forged"
    );
    let replayed = br#"[{"n": 1}, {"n": 2}, {"n": 999}]"#;
    assert_eq!(
        post(
            &addr,
            &id,
            "application/json",
            replayed,
            Some(sign(key, body))
        )
        .await
        .0,
        401,
        "a body replayed under another body's signature"
    );
    assert_eq!(
        post(&addr, &id, "text/plain", body, Some(sign(key, body)))
            .await
            .0,
        415
    );
    let big = vec![b' '; 5000];
    assert_eq!(
        post(&addr, &id, "application/json", &big, Some(sign(key, &big)))
            .await
            .0,
        413
    );
    let junk = b"{not json";
    assert_eq!(
        post(&addr, &id, "application/json", junk, Some(sign(key, junk)))
            .await
            .0,
        400
    );
    assert_eq!(
        post(
            &addr,
            &uuid::Uuid::new_v4().to_string(),
            "application/json",
            body,
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        post(&addr, "not-a-uuid", "application/json", body, None)
            .await
            .0,
        404
    );

    // A flood beyond the queue: some get 429 with Retry-After, and every 202 is in the table.
    let accepted = Arc::new(AtomicUsize::new(0));
    let throttled = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (addr, id, accepted, throttled) = (
            addr.clone(),
            id.clone(),
            accepted.clone(),
            throttled.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let body = serde_json::to_vec(&json!([{ "n": 1000 + i }])).unwrap();
            let (status, headers, _) = post(
                &addr,
                &id,
                "application/json",
                &body,
                Some(sign(WEBHOOK_KEY.as_bytes(), &body)),
            )
            .await;
            match status {
                202 => accepted.fetch_add(1, Ordering::Relaxed),
                429 => {
                    assert_eq!(headers.get("retry-after").unwrap(), "1");
                    throttled.fetch_add(1, Ordering::Relaxed)
                }
                other => panic!("unexpected {other}"),
            };
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        throttled.load(Ordering::Relaxed) > 0,
        "the flood met backpressure"
    );
    let flood: usize = records(&db, ds.id)
        .await
        .iter()
        .filter(|r| r["n"].as_i64().unwrap() >= 10_000)
        .count();
    assert_eq!(
        flood,
        accepted.load(Ordering::Relaxed),
        "every accepted record is committed"
    );

    db.set_status(ds.id, "disabled").await;
    db.wait_for_state(ds.id, "STOPPED", |s| {
        s.worker_status == WorkerStatus::Stopped
    })
    .await;
    // A webhook that is not running answers as an id that does not exist.
    assert_eq!(
        post(&addr, &id, "application/json", body, Some(sign(key, body)))
            .await
            .0,
        404
    );
    app.stop().await.unwrap();
}

/// A local source for http_poll: pages of records with an ETag, failing the first requests.
#[derive(Default)]
struct Source {
    requests: AtomicUsize,
    fail_first: usize,
    not_modified: AtomicUsize,
    since: Mutex<Vec<Option<String>>>,
    records: Mutex<Vec<Value>>,
}

async fn serve_source(source: Arc<Source>) -> String {
    use axum::extract::State;
    use axum::routing::get;
    async fn handler(
        State(source): State<Arc<Source>>,
        uri: axum::http::Uri,
        headers: HeaderMap,
    ) -> (StatusCode, HeaderMap, String) {
        let since_param: Option<String> = uri
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("since=")))
            .map(str::to_owned);
        let n = source.requests.fetch_add(1, Ordering::SeqCst);
        if n < source.fail_first {
            return (StatusCode::BAD_GATEWAY, HeaderMap::new(), String::new());
        }
        assert_eq!(headers.get("authorization").unwrap(), "Bearer poll-token");
        source.since.lock().unwrap().push(since_param.clone());
        let since: i64 = since_param.and_then(|s| s.parse().ok()).unwrap_or(0);
        let all = source.records.lock().unwrap().clone();
        let fresh: Vec<Value> = all
            .into_iter()
            .filter(|r| r["id"].as_i64().unwrap() > since)
            .collect();
        let etag = format!("\"{}-{since}\"", fresh.len());
        let mut out = HeaderMap::new();
        out.insert("etag", etag.parse().unwrap());
        if headers
            .get("if-none-match")
            .is_some_and(|v| v.to_str().unwrap() == etag)
        {
            source.not_modified.fetch_add(1, Ordering::SeqCst);
            return (StatusCode::NOT_MODIFIED, out, String::new());
        }
        (
            StatusCode::OK,
            out,
            json!({ "data": { "items": fresh } }).to_string(),
        )
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .route("/items", get(handler))
        .with_state(source);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/items")
}

#[tokio::test]
async fn http_poll_retries_honours_etags_and_resumes_from_its_cursor_after_a_restart() {
    let db = TestDb::new().await;
    let source = Arc::new(Source {
        fail_first: 2,
        records: Mutex::new(vec![json!({ "id": 1 }), json!({ "id": 2 })]),
        ..Default::default()
    });
    let url = serve_source(source.clone()).await;
    let app = spawn(&db).await;
    let ds = db.datasource_of("poller", "http_poll").await;
    crate::helpers::put_secret(&db, MASTER_KEYS, ds.id, "token", "poll-token").await;
    let v = db
        .version(
            ds.id,
            json!({
                "url": url,
                "interval_ms": 100,
                "retry_base_ms": 20,
                "bearer_secret": "token",
                "record_path": "/data/items",
                "cursor": { "field": "id", "param": "since" },
            }),
        )
        .await;
    db.publish_sql(ds.id, v).await;
    wait_for("the two records after two 502s", WAIT, || async {
        (records(&db, ds.id).await.len() == 2).then_some(())
    })
    .await;
    assert!(
        source.requests.load(Ordering::SeqCst) >= 3,
        "5xx answers were retried"
    );
    wait_for("a 304 for an unchanged source", WAIT, || async {
        (source.not_modified.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    app.stop().await.unwrap();

    source.records.lock().unwrap().push(json!({ "id": 3 }));
    source.since.lock().unwrap().clear();
    let app = spawn(&db).await;
    wait_for("the new record after the restart", WAIT, || async {
        (records(&db, ds.id).await.len() == 3).then_some(())
    })
    .await;
    assert_eq!(
        source
            .since
            .lock()
            .unwrap()
            .first()
            .cloned()
            .flatten()
            .as_deref(),
        Some("2"),
        "the first poll after the restart resumes from the saved cursor"
    );
    let ids: Vec<i64> = records(&db, ds.id)
        .await
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3], "nothing written twice");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_harness_tests_a_draft_without_touching_the_running_worker() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let ds = db.datasource("tried").await;
    let live = db.version(ds.id, json!({ "rate_per_sec": 50 })).await;
    db.publish_sql(ds.id, live).await;
    db.wait_for_state(ds.id, "RUNNING", running_on(live)).await;
    let starts_before = db
        .event_kinds(ds.id)
        .await
        .iter()
        .filter(|k| *k == "worker_starting")
        .count();

    let draft = json!({
        "rate_per_sec": 50,
        "transform": "print(`seen ${record.n}`); if record.n > 1 { throw \"too big\" } #{ doubled: record.n * 2 }",
        "output_schema": { "type": "object", "required": ["doubled"] },
    });
    let report = dsreg::harness::run(
        &dsreg::connectors::Catalog::builtin(),
        dsreg::harness::Slots::new(1, 100).take().unwrap(),
        dsreg::harness::Request {
            kind: "generator".into(),
            config: draft,
            samples: vec![json!([{ "n": 1 }, { "n": 2 }])],
            fetch_sample: false,
            secrets: Default::default(),
        },
        &dsreg::transform::Limits::default(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(report.inputs, 2);
    assert_eq!(report.outputs, [json!({ "doubled": 2 })]);
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(
        (report.rejected[0].sample, report.rejected[0].index),
        (0, 1)
    );
    assert_eq!(report.logs, ["seen 1", "seen 2"]);

    let bad = dsreg::harness::run(
        &dsreg::connectors::Catalog::builtin(),
        dsreg::harness::Slots::new(1, 100).take().unwrap(),
        dsreg::harness::Request {
            kind: "generator".into(),
            config: json!({ "transform": "let x = ;" }),
            samples: Vec::new(),
            fetch_sample: false,
            secrets: Default::default(),
        },
        &dsreg::transform::Limits::default(),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(bad, dsreg::harness::Error::Compile(_)), "{bad}");

    let state = db.state(ds.id).await;
    assert_eq!(
        (state.worker_status, state.running_version),
        (WorkerStatus::Running, Some(live))
    );
    let starts_after = db
        .event_kinds(ds.id)
        .await
        .iter()
        .filter(|k| *k == "worker_starting")
        .count();
    assert_eq!(
        starts_after, starts_before,
        "the published worker was not touched"
    );
    app.stop().await.unwrap();
}

/// A local gateway: answers 429 (Retry-After: 1), then 500, then takes batches.
#[derive(Default)]
struct Gateway {
    calls: AtomicUsize,
    received: Mutex<Vec<Value>>,
}

async fn serve_gateway(gateway: Arc<Gateway>) -> String {
    use axum::extract::State;
    use axum::routing::post;
    async fn handler(
        State(gateway): State<Arc<Gateway>>,
        body: axum::body::Bytes,
    ) -> (StatusCode, HeaderMap) {
        let mut headers = HeaderMap::new();
        match gateway.calls.fetch_add(1, Ordering::SeqCst) {
            0 => {
                headers.insert("retry-after", "1".parse().unwrap());
                (StatusCode::TOO_MANY_REQUESTS, headers)
            }
            1 => (StatusCode::INTERNAL_SERVER_ERROR, headers),
            _ => {
                let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
                gateway.received.lock().unwrap().extend(batch);
                (StatusCode::OK, headers)
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .route("/pipeline", post(handler))
        .with_state(gateway);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/pipeline")
}

#[tokio::test]
async fn the_http_sink_honours_retry_after_retries_server_errors_and_delivers_every_record() {
    let db = TestDb::new().await;
    let gateway = Arc::new(Gateway::default());
    let mut settings = test_settings(&db.url);
    settings.sink = "http".into();
    settings.sink_url = Some(serve_gateway(gateway.clone()).await);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let ds = db.datasource("shipped").await;
    let v = db
        .version(ds.id, json!({ "rate_per_sec": 100, "count": 5 }))
        .await;
    db.publish_sql(ds.id, v).await;
    let started = Instant::now();
    let received = wait_for("5 records at the gateway", WAIT, || async {
        let r = gateway.received.lock().unwrap().clone();
        (r.len() >= 5).then_some(r)
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was honoured"
    );
    assert!(
        gateway.calls.load(Ordering::SeqCst) >= 3,
        "the 429 and the 500 were retried"
    );
    let seqs: std::collections::BTreeSet<i64> = received
        .iter()
        .map(|r| r["record"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs.into_iter().collect::<Vec<_>>(),
        [0, 1, 2, 3, 4],
        "at least once, none missing"
    );
    assert!(
        received
            .iter()
            .all(|r| r["datasource_id"] == ds.id.to_string())
    );
    assert!(
        records(&db, ds.id).await.is_empty(),
        "nothing in the postgres sink"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_tampered_secret_keeps_the_worker_from_starting_and_flags_the_datasource() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let ds = db.datasource_of("tampered", "webhook").await;
    crate::helpers::put_secret(&db, MASTER_KEYS, ds.id, "webhook_secret", "canary-7c1f").await;
    db.client()
        .await
        .execute(
            "UPDATE datasource_secrets SET ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 1)
             WHERE datasource_id = $1",
            &[&ds.id],
        )
        .await
        .unwrap();
    let v = db.version(ds.id, json!({})).await;
    db.publish_sql(ds.id, v).await;
    let state = db
        .wait_for_state(ds.id, "the datasource flagged", |s| {
            s.worker_status == WorkerStatus::Error
        })
        .await;
    assert_eq!(state.error_code.as_deref(), Some("secret_unavailable"));
    let message = state.error_message.unwrap();
    assert!(
        message.contains("webhook_secret") && !message.contains("canary-7c1f"),
        "{message}"
    );
    assert!(
        !db.event_kinds(ds.id)
            .await
            .contains(&"worker_starting".to_owned()),
        "the worker was not started"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_webhook_signature_spelled_with_a_sign_in_a_hex_pair_is_refused_over_the_port() {
    let db = TestDb::new().await;
    let app = spawn(&db).await;
    let addr = app.http_addr.to_string();
    let ds = db.datasource_of("signed", "webhook").await;
    crate::helpers::put_secret(&db, MASTER_KEYS, ds.id, "webhook_secret", WEBHOOK_KEY).await;
    let v = db.version(ds.id, json!({})).await;
    db.publish_sql(ds.id, v).await;
    db.wait_for_state(ds.id, "webhook RUNNING", running_on(v))
        .await;
    let id = ds.id.to_string();
    let key = WEBHOOK_KEY.as_bytes();
    // A body whose signature has a pair `0x`, which a lax hex reader also takes as `+x`.
    let (body, signed, at) = (0..10_000u32)
        .find_map(|n| {
            let body = format!(r#"[{{"n": {n}}}]"#).into_bytes();
            let signed = sign(key, &body);
            let hex_at = "sha256=".len();
            let at = (hex_at..signed.len())
                .step_by(2)
                .find(|i| signed.as_bytes()[*i] == b'0')?;
            Some((body, signed, at))
        })
        .expect("some body signs with a 0 at a pair boundary");
    let mut lax = signed.clone();
    lax.replace_range(at..=at, "+");

    let (status, _, _) = post(&addr, &id, "application/json", &body, Some(lax)).await;

    assert_eq!(status, 401, "a sign is not a hex digit");
    assert!(records(&db, ds.id).await.is_empty(), "nothing was taken");
    let (status, _, _) = post(&addr, &id, "application/json", &body, Some(signed)).await;
    assert_eq!(status, 202, "the same body, signed as sent");
    app.stop().await.unwrap();
}
