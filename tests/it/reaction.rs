//! A publish reaches real connectors: many `http_poll` workers started by one publish all poll
//! a local server, through the process's one HTTP client.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dsreg::domain::WorkerStatus;
use serde_json::json;

use crate::helpers::{TestApp, TestDb, test_settings, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// How many datasources have a record in the sink.
async fn datasources_with_records(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(DISTINCT datasource_id) FROM datasource_records",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

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
    let polled = datasources_with_records(&db).await;
    assert_eq!(polled, N as i64, "every worker's record reached the sink");
    assert_eq!(
        dsreg::connectors::http::clients_built(),
        1,
        "one HTTP client in the process, whatever the workers' timeouts"
    );
    app.stop().await.unwrap();
}

/// A local source that holds every GET until `n` have arrived, then answers each with one
/// record, behind a relay that counts the connections open to it now and at most.
struct Held {
    base: String,
    open: Arc<std::sync::atomic::AtomicUsize>,
    most: Arc<std::sync::atomic::AtomicUsize>,
}

async fn serve_held(n: usize) -> Held {
    use axum::extract::State;
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// GETs arrived so far, and how many to hold for.
    type Arrived = Arc<(tokio::sync::watch::Sender<usize>, usize)>;
    async fn handler(State(arrived): State<Arrived>, uri: axum::http::Uri) -> String {
        let (count, n) = &*arrived;
        count.send_modify(|c| *c += 1);
        let _ = count.subscribe().wait_for(|c| *c >= *n).await;
        json!({ "items": [{ "path": uri.path() }] }).to_string()
    }
    let arrived: Arrived = Arc::new((tokio::sync::watch::channel(0).0, n));
    let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inner_addr = inner.local_addr().unwrap();
    let router = axum::Router::new().fallback(handler).with_state(arrived);
    tokio::spawn(async move { axum::serve(inner, router).await.unwrap() });

    let outer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = outer.local_addr().unwrap();
    let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counted, peak) = (open.clone(), most.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = outer.accept().await else {
                return;
            };
            let now = counted.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            let counted = counted.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(inner_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
                counted.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Held {
        base: format!("http://{addr}"),
        open,
        most,
    }
}

#[tokio::test]
async fn pollers_of_one_host_starting_together_leave_few_connections_open() {
    use std::sync::atomic::Ordering;
    const N: usize = 100;
    let db = TestDb::new().await;
    // Every first request is held until all have arrived: N connections open at once.
    let held = serve_held(N).await;
    let app = TestApp::spawn_with(test_settings(&db.url), |_| {}).await;
    let mut client = db.client().await;
    let mut drafts = Vec::with_capacity(N);
    for i in 0..N {
        let ds = db.datasource_of(&format!("burst-{i}"), "http_poll").await;
        let config = json!({
            "url": format!("{}/burst/{i}", held.base),
            "interval_ms": 3_600_000,
            "record_path": "/items",
        });
        drafts.push((ds.id, db.version(ds.id, config).await));
    }
    let tx = client.transaction().await.unwrap();
    for (id, v) in &drafts {
        tx.execute("SELECT dsreg_publish($1, $2)", &[id, v])
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    wait_for("every poller's record in the sink", WAIT, || async {
        (datasources_with_records(&db).await == N as i64).then_some(())
    })
    .await;
    assert_eq!(
        held.most.load(Ordering::SeqCst),
        N,
        "the first polls overlapped"
    );
    // Done with their requests, the connections beyond the client's idle pool close.
    let open = wait_for(
        "the connections past the idle pool closed",
        WAIT,
        || async {
            let open = held.open.load(Ordering::SeqCst);
            (open <= 32).then_some(open)
        },
    )
    .await;
    assert!(open <= 32);
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

/// Each request's path and `since` parameter, in order.
type Requests = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A local source behind a counting TCP relay: every path answers the records whose `id` is
/// above the `since` query parameter; each request's path and `since` are kept, and so is the
/// number of TCP connections opened to it.
struct Relayed {
    base: String,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    requests: Requests,
    records: Arc<Mutex<Vec<i64>>>,
}

async fn serve_relayed() -> Relayed {
    use axum::extract::State;
    use std::sync::atomic::{AtomicUsize, Ordering};
    #[derive(Clone, Default)]
    struct Source {
        requests: Requests,
        records: Arc<Mutex<Vec<i64>>>,
    }
    async fn handler(State(source): State<Source>, uri: axum::http::Uri) -> String {
        let since = uri.query().and_then(|q| {
            q.split('&')
                .find_map(|pair| pair.strip_prefix("since="))
                .map(str::to_owned)
        });
        source
            .requests
            .lock()
            .unwrap()
            .push((uri.path().to_owned(), since.clone()));
        let after: i64 = since.and_then(|s| s.parse().ok()).unwrap_or(i64::MIN);
        let items: Vec<_> = source
            .records
            .lock()
            .unwrap()
            .iter()
            .filter(|id| **id > after)
            .map(|id| json!({ "id": id }))
            .collect();
        json!({ "items": items }).to_string()
    }
    let source = Source::default();
    let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inner_addr = inner.local_addr().unwrap();
    let router = axum::Router::new()
        .fallback(handler)
        .with_state(source.clone());
    tokio::spawn(async move { axum::serve(inner, router).await.unwrap() });

    let outer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = outer.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = outer.accept().await else {
                return;
            };
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(inner_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    Relayed {
        base: format!("http://{addr}"),
        connections,
        requests: source.requests,
        records: source.records,
    }
}

impl Relayed {
    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The `since` of each request to `path`, in order.
    fn sinces(&self, path: &str) -> Vec<Option<String>> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, since)| since.clone())
            .collect()
    }
}

fn cursor_config(base: &str, path: &str) -> serde_json::Value {
    json!({
        "url": format!("{base}{path}"),
        "interval_ms": 3_600_000,
        "record_path": "/items",
        "cursor": { "field": "id", "param": "since" },
    })
}

#[tokio::test]
async fn a_reload_to_the_same_source_reuses_its_connection_and_a_new_source_is_checked_first() {
    let db = TestDb::new().await;
    let same = serve_relayed().await;
    let other = serve_relayed().await;
    let app = TestApp::spawn_with(test_settings(&db.url), |_| {}).await;
    let ds = db.datasource_of("moving", "http_poll").await;
    let running_on = |v: i32| {
        move |s: &dsreg::db::repository::state::State| {
            s.worker_status == WorkerStatus::Running && s.running_version == Some(v)
        }
    };

    let v1 = db.version(ds.id, cursor_config(&same.base, "/a")).await;
    db.publish_sql(ds.id, v1).await;
    db.wait_for_state(ds.id, "RUNNING on v1", running_on(v1))
        .await;
    assert_eq!(same.sinces("/a").len(), 1);
    assert_eq!(same.connections(), 1);

    // Another path of the same source: the running version shows it reachable, and its
    // kept-alive connection serves the new version's first poll.
    let v2 = db.version(ds.id, cursor_config(&same.base, "/b")).await;
    db.publish_sql(ds.id, v2).await;
    db.wait_for_state(ds.id, "RUNNING on v2", running_on(v2))
        .await;
    assert_eq!(same.sinces("/b").len(), 1);
    assert_eq!(
        same.connections(),
        1,
        "no connection opened to check a source the running version works against"
    );

    // Another source: make before break still checks it with a connection of its own
    // before the running version stops, then polls it.
    let v3 = db.version(ds.id, cursor_config(&other.base, "/c")).await;
    db.publish_sql(ds.id, v3).await;
    db.wait_for_state(ds.id, "RUNNING on v3", running_on(v3))
        .await;
    assert_eq!(other.sinces("/c").len(), 1);
    assert_eq!(
        other.connections(),
        2,
        "the start check's connection, then the poll's"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn reloads_resume_from_the_last_saved_cursor_and_a_backfill_starts_over() {
    let db = TestDb::new().await;
    let source = serve_relayed().await;
    source.records.lock().unwrap().extend([1, 2]);
    let app = TestApp::spawn_with(test_settings(&db.url), |_| {}).await;
    let ds = db.datasource_of("resuming", "http_poll").await;
    let polled = |path: &'static str, n: usize| {
        let source = &source;
        move || async move { (source.sinces(path).len() >= n).then_some(()) }
    };
    let saved = |cursor: i64| {
        let db = &db;
        move || async move {
            let row = db
                .client()
                .await
                .query_one(
                    "SELECT source_cursor FROM datasource_state WHERE datasource_id = $1",
                    &[&ds.id],
                )
                .await
                .unwrap();
            let saved: Option<serde_json::Value> = row.get(0);
            (saved.and_then(|c| c["cursor"].as_i64()) == Some(cursor)).then_some(())
        }
    };

    let v1 = db.version(ds.id, cursor_config(&source.base, "/v1")).await;
    db.publish_sql(ds.id, v1).await;
    wait_for("v1's poll", WAIT, polled("/v1", 1)).await;
    wait_for("the cursor at 2", WAIT, saved(2)).await;
    assert_eq!(source.sinces("/v1"), [None]);

    // A reload starts where the last run ended, and saves where it ends.
    source.records.lock().unwrap().push(3);
    let v2 = db.version(ds.id, cursor_config(&source.base, "/v2")).await;
    db.publish_sql(ds.id, v2).await;
    wait_for("v2's poll", WAIT, polled("/v2", 1)).await;
    assert_eq!(source.sinces("/v2"), [Some("2".to_owned())]);
    wait_for("the cursor at 3", WAIT, saved(3)).await;
    let v3 = db.version(ds.id, cursor_config(&source.base, "/v3")).await;
    db.publish_sql(ds.id, v3).await;
    wait_for("v3's poll", WAIT, polled("/v3", 1)).await;
    assert_eq!(source.sinces("/v3"), [Some("3".to_owned())]);

    // A backfill from the start: the restarted worker polls without a cursor, whatever the
    // runs before it knew.
    let mut client = db.client().await;
    let tx = dsreg::db::repository::begin(
        &mut client,
        &dsreg::db::repository::WriteContext::actor("test"),
    )
    .await
    .unwrap();
    dsreg::db::repository::state::request_backfill(&tx, ds.id, None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    wait_for("v3's poll after the backfill", WAIT, polled("/v3", 2)).await;
    assert_eq!(source.sinces("/v3"), [Some("3".to_owned()), None]);
    wait_for("the cursor at 3 again", WAIT, saved(3)).await;

    // And the records: 1, 2 by v1, 3 by v2, nothing by v3 until the backfill wrote 1..3.
    let by_version = |v: i32| db.records(ds.id, v);
    assert_eq!(by_version(v1).await, 2);
    assert_eq!(by_version(v2).await, 1);
    assert_eq!(by_version(v3).await, 3);
    app.stop().await.unwrap();
}
