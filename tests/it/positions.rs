//! Source positions through the real API and the real binary: an `http_poll` worker's
//! position read field by field, a reset refused while the worker runs and taken while it is
//! stopped (audited, an event), and the next poll against a local server sending the reset
//! cursor; hostile positions refused naming the field; a kind without a position; another
//! tenant's datasource NOT_FOUND.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use dsreg::api::grpc::pb;
use dsreg::api::grpc::pb::lifecycle_client::LifecycleClient;
use serde_json::{Value, json};
use tonic::Code;

use crate::cli::{dsreg, run};
use crate::helpers::{TestApp, TestDb, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// A local source for `http_poll`: records with ids, those above `since` on each poll, with
/// an ETag; it remembers what each request sent.
#[derive(Default)]
struct Source {
    records: Mutex<Vec<Value>>,
    /// `(since, If-None-Match)` of every request, in order.
    seen: Mutex<Vec<(Option<String>, Option<String>)>>,
}

impl Source {
    fn seen(&self) -> Vec<(Option<String>, Option<String>)> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve_source(source: Arc<Source>) -> String {
    use axum::extract::State;
    async fn handler(
        State(source): State<Arc<Source>>,
        uri: axum::http::Uri,
        headers: HeaderMap,
    ) -> (StatusCode, HeaderMap, String) {
        let since: Option<String> = uri
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("since=")))
            .map(str::to_owned);
        let matched = headers
            .get("if-none-match")
            .map(|v| v.to_str().unwrap().to_owned());
        source
            .seen
            .lock()
            .unwrap()
            .push((since.clone(), matched.clone()));
        let after: i64 = since.and_then(|s| s.parse().ok()).unwrap_or(0);
        let fresh: Vec<Value> = source
            .records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["id"].as_i64().unwrap() > after)
            .cloned()
            .collect();
        let etag = format!("\"{}-{after}\"", fresh.len());
        let mut out = HeaderMap::new();
        out.insert("etag", etag.parse().unwrap());
        if matched.as_deref() == Some(etag.as_str()) {
            return (StatusCode::NOT_MODIFIED, out, String::new());
        }
        (StatusCode::OK, out, json!({ "items": fresh }).to_string())
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .route("/items", axum::routing::get(handler))
        .with_state(source);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/items")
}

async fn record_ids(db: &TestDb, id: uuid::Uuid) -> Vec<i64> {
    db.client()
        .await
        .query(
            "SELECT record FROM datasource_records WHERE datasource_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, Value>(0)["id"].as_i64().unwrap())
        .collect()
}

async fn stored_position(db: &TestDb, id: uuid::Uuid) -> Option<Value> {
    db.client()
        .await
        .query_one(
            "SELECT source_cursor FROM datasource_state WHERE datasource_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

fn reset(id: &str, position: &str) -> pb::ResetSourcePositionRequest {
    pb::ResetSourcePositionRequest {
        datasource_id: id.to_owned(),
        position_json: position.to_owned(),
        clear: false,
    }
}

#[tokio::test]
async fn a_position_is_read_reset_only_while_stopped_and_the_next_poll_sends_it() {
    // Arrange: a polling worker that has read three records.
    let db = TestDb::new().await;
    let source = Arc::new(Source::default());
    *source.records.lock().unwrap() = (1..=3).map(|id| json!({ "id": id })).collect();
    let url = serve_source(source.clone()).await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let server = format!("http://{}", app.grpc_addr);
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
    let dir = tempfile::tempdir().unwrap();
    let cli = |args: &[&str]| {
        let mut command = dsreg(dir.path());
        command.args(args).args(["--server", &server]);
        command
    };
    let id = ds.to_string();

    // A read: the position the worker saved, field by field with what each means.
    let read = wait_for(
        "the worker's position after the three records",
        WAIT,
        || async {
            let ran = run(cli(&["position", "get", &id, "-o", "json"]), None).await;
            ran.assert_success();
            let line = ran.json_lines().remove(0);
            // The state writer records the run as working a moment after the position is
            // saved.
            (line["position"]["cursor"] == 3 && line["worker_status"] == "running").then_some(line)
        },
    )
    .await;
    assert_eq!(read["kind"], "http_poll");
    assert_eq!(read["supported"], true);
    let fields: Vec<&str> = read["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["etag", "cursor"]);
    assert_eq!(read["fields"][1]["value"], 3);
    assert!(read["fields"][0]["value"].is_string(), "{read}");
    assert!(
        read["fields"][0]["meaning"]
            .as_str()
            .unwrap()
            .contains("If-None-Match"),
        "{read}"
    );
    let table = run(cli(&["position", "get", &id]), None).await;
    table.assert_success();
    assert!(
        table.stdout.contains("FIELD") && table.stdout.contains("cursor.param"),
        "{}",
        table.stdout
    );

    // Refused while running, naming the state; nothing changes.
    let refused = run(
        cli(&["position", "reset", &id, "--to", r#"{"cursor": 1}"#]),
        None,
    )
    .await;
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("FAILED_PRECONDITION") && refused.stderr.contains("running"),
        "{}",
        refused.stderr
    );
    let mut lifecycle = LifecycleClient::connect(server.clone()).await.unwrap();
    let status = lifecycle
        .reset_source_position(reset(&id, r#"{"cursor": 1}"#))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("running"), "{status:?}");
    assert_eq!(stored_position(&db, ds).await.unwrap()["cursor"], 3);

    run(cli(&["worker", "stop", &id]), None)
        .await
        .assert_success();
    let saved = stored_position(&db, ds).await;

    // Hostile or malformed positions: INVALID_ARGUMENT naming the field, nothing stored.
    let oversized = json!({ "cursor": "x".repeat(20 * 1024) }).to_string();
    let cases: Vec<(pb::ResetSourcePositionRequest, &str)> = vec![
        (reset(&id, r#"{"cursor": "a\u0000b"}"#), "position_json"),
        (reset(&id, r#"{"etag": "\u0000"}"#), "position_json"),
        (reset(&id, &oversized), "position_json"),
        (reset(&id, "[1, 2]"), "position_json"),
        (reset(&id, "not json"), "position_json"),
        (reset(&id, r#"{"etag": 5}"#), "position_json.etag"),
        (
            reset(&id, r#"{"etag": "a\r\nInjected: 1"}"#),
            "position_json.etag",
        ),
        (
            reset(&id, r#"{"cursor": {"a": 1}}"#),
            "position_json.cursor",
        ),
        (reset(&id, r#"{"offset": 1}"#), "position_json.offset"),
        (reset(&id, ""), "position_json"),
        (
            pb::ResetSourcePositionRequest {
                clear: true,
                ..reset(&id, r#"{"cursor": 1}"#)
            },
            "position_json",
        ),
        (reset("not-a-uuid", r#"{"cursor": 1}"#), "datasource_id"),
    ];
    for (request, field) in cases {
        let status = lifecycle
            .reset_source_position(request.clone())
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{request:?}: {status:?}"
        );
        assert!(
            status.message().starts_with(&format!("{field}:")),
            "{field}: {status:?}"
        );
    }
    // A backfill's position takes the same check.
    let status = lifecycle
        .backfill(pb::BackfillRequest {
            datasource_id: id.clone(),
            from_cursor_json: r#"{"cursor": [1]}"#.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("from_cursor_json.cursor:"),
        "{status:?}"
    );
    assert_eq!(
        stored_position(&db, ds).await,
        saved,
        "refusals change nothing"
    );

    // A reset while stopped: audited, an event, the answer shows it.
    let before = source.seen().len();
    let done = run(
        cli(&[
            "position",
            "reset",
            &id,
            "--to",
            r#"{"cursor": 1}"#,
            "-o",
            "json",
        ]),
        None,
    )
    .await;
    done.assert_success();
    let answer = done.json_lines().remove(0);
    assert_eq!(answer["position"], json!({ "cursor": 1 }), "{answer}");
    assert_eq!(answer["worker_status"], "stopped", "{answer}");
    assert_eq!(stored_position(&db, ds).await, Some(json!({ "cursor": 1 })));
    let events = db.events(ds).await;
    let event = events
        .iter()
        .rev()
        .find(|e| e.kind == "source_position_reset")
        .expect("a source_position_reset event");
    assert_eq!(event.payload["to"], json!({ "cursor": 1 }));
    assert_eq!(event.payload["from"], saved.clone().unwrap());
    let audited: (String, Value) = {
        let row = db
            .client()
            .await
            .query_one(
                "SELECT outcome, diff FROM audit_log WHERE action = 'ResetSourcePosition'
                   AND target_id = $1 AND outcome = 'ok'",
                &[&ds],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(audited.1["source_position"]["to"], json!({ "cursor": 1 }));
    assert_eq!(source.seen().len(), before, "nothing polled while stopped");

    // The next poll sends the reset cursor and no ETag; the records after it come again.
    run(cli(&["worker", "start", &id]), None)
        .await
        .assert_success();
    let first = wait_for("a poll after the start", WAIT, || async {
        source.seen().get(before).cloned()
    })
    .await;
    assert_eq!(first, (Some("1".to_owned()), None));
    wait_for("records 2 and 3 read again", WAIT, || async {
        (record_ids(&db, ds).await == [1, 2, 3, 2, 3]).then_some(())
    })
    .await;

    // An ETag alone: the next poll asks conditionally, with no cursor.
    run(cli(&["worker", "stop", &id]), None)
        .await
        .assert_success();
    let before = source.seen().len();
    run(
        cli(&["position", "reset", &id, "--to", r#"{"etag": "\"seen\""}"#]),
        None,
    )
    .await
    .assert_success();
    run(cli(&["worker", "start", &id]), None)
        .await
        .assert_success();
    let first = wait_for("a poll after the second start", WAIT, || async {
        source.seen().get(before).cloned()
    })
    .await;
    assert_eq!(first, (None, Some("\"seen\"".to_owned())));

    // Cleared: the next poll reads from the start, unconditionally.
    run(cli(&["worker", "stop", &id]), None)
        .await
        .assert_success();
    let before = source.seen().len();
    let cleared = run(cli(&["position", "reset", &id, "--clear"]), None).await;
    cleared.assert_success();
    assert!(
        cleared
            .stdout
            .contains("(none: the next run reads from the start)"),
        "{}",
        cleared.stdout
    );
    assert_eq!(stored_position(&db, ds).await, None);
    let last = db
        .events(ds)
        .await
        .into_iter()
        .rev()
        .find(|e| e.kind == "source_position_reset")
        .unwrap();
    assert_eq!(last.payload["cleared"], true, "{:?}", last.payload);
    run(cli(&["worker", "start", &id]), None)
        .await
        .assert_success();
    let first = wait_for("a poll after the third start", WAIT, || async {
        source.seen().get(before).cloned()
    })
    .await;
    assert_eq!(first, (None, None));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_generator_numbers_from_its_position_and_a_webhook_keeps_none() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let server = format!("http://{}", app.grpc_addr);
    let mut lifecycle = LifecycleClient::connect(server.clone()).await.unwrap();

    // A generator stopped before its first run: reset, then started.
    let generator = db.datasource("numbered").await.id;
    let id = generator.to_string();
    lifecycle
        .stop_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap();
    let v = db
        .version(generator, json!({ "rate_per_sec": 100, "count": 3 }))
        .await;
    db.publish_sql(generator, v).await;
    let refused = lifecycle
        .reset_source_position(reset(&id, r#"{"seq": -1}"#))
        .await
        .unwrap_err();
    assert!(
        refused.message().starts_with("position_json.seq:"),
        "{refused:?}"
    );
    let answer = lifecycle
        .reset_source_position(reset(&id, r#"{"seq": 1000}"#))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.fields[0].name, "seq");
    assert_eq!(answer.fields[0].value_json, "1000");
    lifecycle
        .start_worker(pb::LifecycleRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap();
    let seqs = wait_for("three records", WAIT, || async {
        let rows = db
            .client()
            .await
            .query(
                "SELECT (record->>'seq')::bigint FROM datasource_records
                  WHERE datasource_id = $1 ORDER BY 1",
                &[&generator],
            )
            .await
            .unwrap();
        (rows.len() == 3).then(|| rows.iter().map(|r| r.get(0)).collect::<Vec<i64>>())
    })
    .await;
    assert_eq!(seqs, [1000, 1001, 1002]);

    // A webhook keeps none: the read says so, a reset is refused.
    let hook = db.datasource_of("hook", "webhook").await.id.to_string();
    let read = lifecycle
        .get_source_position(pb::GetSourcePositionRequest {
            datasource_id: hook.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!read.supported);
    assert!(read.fields.is_empty());
    assert!(
        read.summary.contains("keeps no source position"),
        "{read:?}"
    );
    let refused = lifecycle
        .reset_source_position(pb::ResetSourcePositionRequest {
            datasource_id: hook,
            clear: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn another_tenants_position_is_not_found_to_read_and_to_reset() {
    use dsreg::api::grpc::auth::issue_token;
    const SECRET: &[u8] = b"positions-test-secret-0123456789abcdef-0123";
    let db = TestDb::new().await;
    let (settings, _dir) = crate::helpers::hs256_settings(&db, SECRET);
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let theirs = db.datasource("theirs").await;
    let token = |role: &str, org: &str| {
        issue_token(
            SECRET,
            &json!({
                "sub": format!("{role}@{org}"), "iss": "test", "aud": "dsreg", "org": org,
                "roles": [role], "exp": chrono::Utc::now().timestamp() + 600,
            }),
        )
    };
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let as_caller = |t: String| {
        LifecycleClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
            Ok(r)
        })
    };
    let other_org = format!("not-{}", theirs.org);
    let mut stranger = as_caller(token("datasource:admin", &other_org));
    let id = theirs.id.to_string();
    let read = stranger
        .get_source_position(pb::GetSourcePositionRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(read.code(), Code::NotFound, "{read:?}");
    for request in [
        pb::ResetSourcePositionRequest {
            datasource_id: id.clone(),
            clear: true,
            ..Default::default()
        },
        reset(&id, r#"{"seq": 5}"#),
        reset(&id, "not json"),
    ] {
        let refused = stranger.reset_source_position(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    }
    // A viewer of the right tenant may not read it (operator), an operator may.
    let mut viewer = as_caller(token("datasource:viewer", &theirs.org));
    let denied = viewer
        .get_source_position(pb::GetSourcePositionRequest {
            datasource_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let mut operator = as_caller(token("datasource:operator", &theirs.org));
    let mine = operator
        .get_source_position(pb::GetSourcePositionRequest { datasource_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.kind, "generator");
    assert_eq!(
        stored_position(&db, theirs.id).await,
        None,
        "nothing was reset"
    );
    app.stop().await.unwrap();
}
