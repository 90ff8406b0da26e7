//! A publish reaches real connectors: many `http_poll` workers started by one publish all poll
//! a local server, through the process's one HTTP client.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsreg::domain::WorkerStatus;
use serde_json::json;

use crate::helpers::{TestApp, TestDb, test_settings, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// A local source answering every path with one record, counting the GETs per path.
async fn serve_counting() -> (String, Arc<Mutex<BTreeMap<String, usize>>>) {
    use axum::extract::State;
    type Seen = Arc<Mutex<BTreeMap<String, usize>>>;
    async fn handler(State(seen): State<Seen>, uri: axum::http::Uri) -> String {
        *seen
            .lock()
            .unwrap()
            .entry(uri.path().to_owned())
            .or_default() += 1;
        json!({ "items": [{ "path": uri.path() }] }).to_string()
    }
    let seen: Seen = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .fallback(handler)
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn two_hundred_http_poll_workers_started_in_one_publish_all_poll_a_local_server() {
    const N: usize = 200;
    let db = TestDb::new().await;
    let (base, seen) = serve_counting().await;
    let app = TestApp::spawn_with(test_settings(&db.url), |_| {}).await;
    let mut drafts = Vec::with_capacity(N);
    for i in 0..N {
        let ds = db.datasource_of(&format!("poller-{i}"), "http_poll").await;
        // Every worker its own path and its own timeout: one client serves them all.
        let v = db
            .version(
                ds.id,
                json!({
                    "url": format!("{base}/source/{i}"),
                    "interval_ms": 3_600_000,
                    "timeout_ms": 5_000 + i,
                    "record_path": "/items",
                }),
            )
            .await;
        drafts.push((ds.id, v));
    }

    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    for (id, v) in &drafts {
        tx.execute("SELECT dsreg_publish($1, $2)", &[id, v])
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let missing = |seen: &BTreeMap<String, usize>| {
        (0..N)
            .filter(|i| !seen.contains_key(&format!("/source/{i}")))
            .count()
    };
    wait_for("a GET from every new worker", WAIT, || async {
        (missing(&seen.lock().unwrap()) == 0).then_some(())
    })
    .await;
    wait_for("every worker running", WAIT, || async {
        let running: i64 = db
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM datasource_state WHERE worker_status = $1",
                &[&WorkerStatus::Running.as_str()],
            )
            .await
            .unwrap()
            .get(0);
        (running == N as i64).then_some(())
    })
    .await;
    let polled: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(DISTINCT datasource_id) FROM datasource_records",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(polled, N as i64, "every worker's record reached the sink");
    assert_eq!(
        dsreg::connectors::http::clients_built(),
        1,
        "one HTTP client in the process, whatever the workers' timeouts"
    );
    app.stop().await.unwrap();
}

/// A script of about `lines` statements: the record's `seq`, plus the sum of 0..lines, as `n`.
fn long_script(lines: usize, broken: bool) -> String {
    let mut script = String::from("let n = record.seq;\n");
    for i in 0..lines {
        script.push_str(&format!("n += {i}; // step {i} of a long mapping\n"));
    }
    script.push_str(if broken { "#{ n: n " } else { "#{ n: n }" });
    script
}

#[tokio::test]
async fn big_transforms_published_together_compile_and_run_and_a_broken_one_is_refused_alone() {
    const N: usize = 8;
    const LINES: usize = 200;
    let db = TestDb::new().await;
    let app = TestApp::spawn_with(test_settings(&db.url), |_| {}).await;
    let script = long_script(LINES, false);
    assert!(
        script.len() > 4 * 1024,
        "long enough to compile off the runtime"
    );
    let mut drafts = Vec::new();
    for i in 0..N {
        let ds = db.datasource(&format!("mapped-{i}")).await;
        let v = db
            .version(
                ds.id,
                json!({ "rate_per_sec": 100, "count": 3, "template": {}, "transform": script }),
            )
            .await;
        drafts.push((ds.id, v));
    }
    let broken = db.datasource("broken").await;
    let broken_v = db
        .version(
            broken.id,
            json!({ "rate_per_sec": 100, "count": 3, "template": {}, "transform": long_script(LINES, true) }),
        )
        .await;

    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    for (id, v) in drafts.iter().chain([&(broken.id, broken_v)]) {
        tx.execute("SELECT dsreg_publish($1, $2)", &[id, v])
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let sum: i64 = (0..LINES as i64).sum();
    for (id, _) in &drafts {
        let out = wait_for("three transformed records", WAIT, || async {
            let rows = db
                .client()
                .await
                .query(
                    "SELECT record FROM datasource_records WHERE datasource_id = $1 ORDER BY id",
                    &[id],
                )
                .await
                .unwrap();
            (rows.len() == 3).then(|| {
                rows.iter()
                    .map(|r| r.get::<_, serde_json::Value>(0))
                    .collect::<Vec<_>>()
            })
        })
        .await;
        assert_eq!(out[0], json!({ "n": sum }));
        assert_eq!(out[2], json!({ "n": 2 + sum }));
    }
    let state = db
        .wait_for_state(broken.id, "refused as invalid_transform", |s| {
            s.error_code.as_deref() == Some("invalid_transform")
        })
        .await;
    assert_eq!(state.worker_status, WorkerStatus::Error);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn webhooks_published_together_open_their_own_secrets_and_a_tampered_one_is_refused_alone() {
    const N: usize = 6;
    let db = TestDb::new().await;
    let mut settings = test_settings(&db.url);
    settings.master_keys = Some(crate::connectors::MASTER_KEYS.to_owned());
    let app = TestApp::spawn_with(settings, |_| {}).await;
    let mut hooks = Vec::new();
    for i in 0..N {
        let ds = db.datasource_of(&format!("hook-{i}"), "webhook").await;
        let key = format!("key-of-hook-{i}");
        crate::helpers::put_secret(
            &db,
            crate::connectors::MASTER_KEYS,
            ds.id,
            "webhook_secret",
            &key,
        )
        .await;
        let v = db.version(ds.id, json!({})).await;
        hooks.push((ds.id, v, key));
    }
    let tampered = hooks[N / 2].0;
    db.client()
        .await
        .execute(
            "UPDATE datasource_secrets SET ciphertext = set_byte(ciphertext, 0, get_byte(ciphertext, 0) # 1)
             WHERE datasource_id = $1",
            &[&tampered],
        )
        .await
        .unwrap();

    let mut client = db.client().await;
    let tx = client.transaction().await.unwrap();
    for (id, v, _) in &hooks {
        tx.execute("SELECT dsreg_publish($1, $2)", &[id, v])
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let state = db
        .wait_for_state(tampered, "the tampered one refused", |s| {
            s.worker_status == WorkerStatus::Error
        })
        .await;
    assert_eq!(state.error_code.as_deref(), Some("secret_unavailable"));
    let http = crate::helpers::http_client(Duration::from_secs(10)).unwrap();
    let body = br#"[{"n":1}]"#;
    for (id, _, key) in hooks.iter().filter(|(id, _, _)| *id != tampered) {
        db.wait_for_state(*id, "RUNNING", |s| s.worker_status == WorkerStatus::Running)
            .await;
        // Each accepts a post signed with its own key, and only with it.
        let post = |key: String| {
            http.post(format!("http://{}/ingest/{id}", app.http_addr))
                .header("content-type", "application/json")
                .header(
                    "x-dsreg-signature",
                    dsreg::connectors::webhook::sign(key.as_bytes(), body),
                )
                .body(body.to_vec())
                .send()
        };
        assert_eq!(post(key.clone()).await.unwrap().status().as_u16(), 202);
        let other = hooks.iter().find(|(o, _, _)| o != id).unwrap().2.clone();
        assert_eq!(post(other).await.unwrap().status().as_u16(), 401);
    }
    app.stop().await.unwrap();
}
