//! A worker's state tells the truth, against a local HTTP recorder standing in for the
//! sources: `running` only once the connector works, failures visible until a success,
//! permanent refusals (401) apart from transient failures, `Retry-After` honoured in both
//! forms, a reload that cannot start rejected while the old worker keeps polling, and an
//! instance woken from SIGSTOP past its lease sending nothing once another took over.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use dsreg::domain::WorkerStatus;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::cluster::{balanced, running};
use crate::helpers::{ServeProcess, TestApp, TestDb, wait_for};

const WAIT: Duration = Duration::from_secs(30);

/// One answer of the recorder.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Reply {
    fn ok(body: serde_json::Value) -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            body: body.to_string(),
        }
    }

    fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    fn with(mut self, name: &'static str, value: String) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// A request the recorder received: on which of its listeners, for which path, when.
#[derive(Clone, Debug)]
struct Hit {
    via: &'static str,
    path: String,
    at: Instant,
    wall: chrono::DateTime<chrono::Utc>,
}

/// An HTTP source that records every request and answers per path: first from a script,
/// then with the path's standing answer (200 `[]` when none is set).
#[derive(Default)]
struct Recorder {
    hits: Mutex<Vec<Hit>>,
    script: Mutex<HashMap<String, VecDeque<Reply>>>,
    standing: Mutex<HashMap<String, Reply>>,
}

impl Recorder {
    fn answer(&self, path: &str, reply: Reply) {
        self.standing.lock().unwrap().insert(path.to_owned(), reply);
    }

    fn script(&self, path: &str, replies: Vec<Reply>) {
        self.script
            .lock()
            .unwrap()
            .insert(path.to_owned(), replies.into());
    }

    fn hits(&self, path: &str) -> Vec<Hit> {
        let hits = self.hits.lock().unwrap();
        hits.iter().filter(|h| h.path == path).cloned().collect()
    }

    /// Serves on a port of its own; requests through it are labelled `via`. Requests sent
    /// through it as a proxy (absolute-form targets) are answered the same way.
    async fn listen(self: &Arc<Self>, via: &'static str) -> SocketAddr {
        self.listen_at(via, "127.0.0.1:0").await
    }

    /// Like [`Self::listen`], on `addr`.
    async fn listen_at(self: &Arc<Self>, via: &'static str, addr: &str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = self.clone();
        let router = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let recorder = recorder.clone();
            async move {
                let path = uri.path().to_owned();
                recorder.hits.lock().unwrap().push(Hit {
                    via,
                    path: path.clone(),
                    at: Instant::now(),
                    wall: chrono::Utc::now(),
                });
                let scripted = recorder
                    .script
                    .lock()
                    .unwrap()
                    .get_mut(&path)
                    .and_then(VecDeque::pop_front);
                let reply = scripted
                    .or_else(|| recorder.standing.lock().unwrap().get(&path).cloned())
                    .unwrap_or_else(|| Reply::ok(json!([])));
                let mut headers = HeaderMap::new();
                for (name, mut value) in reply.headers {
                    if let Some(seconds) = value.strip_prefix('@') {
                        // An HTTP-date `seconds` from now, rounded up to a whole second.
                        let at = chrono::Utc::now()
                            + chrono::Duration::seconds(seconds.parse::<i64>().unwrap() + 1);
                        value = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
                    }
                    headers.insert(
                        HeaderName::from_static(name),
                        HeaderValue::from_str(&value).unwrap(),
                    );
                }
                (
                    StatusCode::from_u16(reply.status).unwrap(),
                    headers,
                    reply.body,
                )
            }
        });
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        addr
    }
}

/// Publishes an `http_poll` datasource named `name` polling `url`; its id.
async fn poller(db: &TestDb, name: &str, config: serde_json::Value) -> Uuid {
    let ds = db.datasource_of(name, "http_poll").await;
    let v = db.version(ds.id, config).await;
    db.publish_sql(ds.id, v).await;
    ds.id
}

fn errors(events: &[dsreg::db::repository::events::Event]) -> usize {
    events.iter().filter(|e| e.kind == "worker_error").count()
}

#[tokio::test]
async fn a_worker_failing_every_start_never_shows_running_and_its_error_stays_until_a_success() {
    let db = TestDb::new().await;
    let recorder = Arc::new(Recorder::default());
    let source = recorder.listen("source").await;
    recorder.answer("/down", Reply::status(500));
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let id = poller(
        &db,
        "down",
        json!({ "url": format!("http://{source}/down"), "interval_ms": 100, "max_retries": 0 }),
    )
    .await;

    // Sample the state through several failed starts: it is never RUNNING, and once a
    // failure is on record it stays on record (a restart does not clear it).
    let mut samples = 0;
    let mut seen_error = false;
    let deadline = Instant::now() + WAIT;
    while errors(&db.events(id).await) < 5 {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for five failed starts"
        );
        let state = db.state(id).await;
        samples += 1;
        assert_ne!(state.worker_status, WorkerStatus::Running, "{state:?}");
        if seen_error {
            assert_eq!(
                state.error_code.as_deref(),
                Some("source_failed"),
                "{state:?}"
            );
        }
        seen_error |= state.error_code.is_some();
    }
    assert!(samples > 5 && seen_error);
    let events = db.events(id).await;
    assert!(
        events.iter().all(|e| e.kind != "worker_running"),
        "a start that never worked was reported running: {:?}",
        events.iter().map(|e| &e.kind).collect::<Vec<_>>()
    );
    assert!(
        events
            .iter()
            .filter(|e| e.kind == "worker_starting")
            .count()
            >= 5,
        "each restart shows as starting"
    );

    // The source recovers: the next start works, and only then is the worker RUNNING, its
    // error cleared.
    recorder.answer("/down", Reply::ok(json!([{ "n": 1 }])));
    let state = db
        .wait_for_state(id, "RUNNING once a poll succeeded", |s| {
            s.worker_status == WorkerStatus::Running
        })
        .await;
    assert_eq!(state.error_code, None);
    assert!(db.records(id, 1).await >= 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_source_answering_401_is_a_permanent_error_without_a_hot_loop() {
    let db = TestDb::new().await;
    let recorder = Arc::new(Recorder::default());
    let source = recorder.listen("source").await;
    recorder.answer("/denied", Reply::status(401));
    recorder.answer("/flaky", Reply::status(503));
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let denied = poller(
        &db,
        "denied",
        json!({ "url": format!("http://{source}/denied"), "interval_ms": 100, "retry_base_ms": 1 }),
    )
    .await;
    let flaky = poller(
        &db,
        "flaky",
        json!({ "url": format!("http://{source}/flaky"), "interval_ms": 100, "max_retries": 0 }),
    )
    .await;

    // The transient failure is the clock: it goes through its restarts into a crash loop...
    db.wait_for_state(flaky, "the 503 source in a crash loop", |s| {
        s.worker_status == WorkerStatus::CrashLoop
    })
    .await;
    assert!(recorder.hits("/flaky").len() >= 5);
    // ...while the refused one asked once, no retry within the poll, no restart since.
    assert_eq!(recorder.hits("/denied").len(), 1);
    let state = db.state(denied).await;
    assert_eq!(state.worker_status, WorkerStatus::Error, "{state:?}");
    assert_eq!(state.error_code.as_deref(), Some("source_refused"));
    assert!(state.error_message.unwrap().contains("401"));
    let failure = db
        .events(denied)
        .await
        .into_iter()
        .find(|e| e.kind == "worker_error")
        .unwrap();
    assert_eq!(failure.payload["permanent"], true);
    assert_eq!(failure.payload["crash_loop"], false);
    assert!(
        failure.payload["retry_in_ms"].as_u64().unwrap() >= 225_000,
        "{failure:?}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_server_certificate_that_does_not_verify_is_a_permanent_error() {
    let db = TestDb::new().await;
    // A TLS server (openssl's own) with a self-signed certificate no trust store knows.
    let dir = tempfile::tempdir().unwrap();
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .arg("-keyout")
        .arg(dir.path().join("key.pem"))
        .arg("-out")
        .arg(dir.path().join("cert.pem"))
        .output()
        .expect("openssl on the PATH");
    assert!(made.status.success(), "{made:?}");
    let port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = tokio::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(dir.path().join("cert.pem"))
        .arg("-key")
        .arg(dir.path().join("key.pem"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl s_server starts");
    wait_for("the TLS server listening", WAIT, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let id = poller(
        &db,
        "untrusted",
        json!({ "url": format!("https://localhost:{port}/"), "interval_ms": 100, "retry_base_ms": 1 }),
    )
    .await;
    let state = db
        .wait_for_state(id, "the refusal on record", |s| s.error_code.is_some())
        .await;
    assert_eq!(
        state.error_code.as_deref(),
        Some("source_refused"),
        "{state:?}"
    );
    assert_eq!(state.worker_status, WorkerStatus::Error);
    let failures: Vec<_> = db
        .events(id)
        .await
        .into_iter()
        .filter(|e| e.kind == "worker_error")
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].payload["permanent"], true);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn retry_after_is_honoured_as_seconds_and_as_an_http_date() {
    let db = TestDb::new().await;
    let recorder = Arc::new(Recorder::default());
    let source = recorder.listen("source").await;
    recorder.script(
        "/busy",
        vec![
            Reply::status(429).with("retry-after", "1".into()),
            // An HTTP-date at least two seconds after the answer.
            Reply::status(503).with("retry-after", "@2".into()),
        ],
    );
    recorder.answer("/busy", Reply::ok(json!([{ "n": 1 }])));
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let id = poller(
        &db,
        "busy",
        json!({ "url": format!("http://{source}/busy"), "interval_ms": 60_000, "retry_base_ms": 1 }),
    )
    .await;

    db.wait_for_state(id, "RUNNING once the source let it in", |s| {
        s.worker_status == WorkerStatus::Running
    })
    .await;
    assert_eq!(db.records(id, 1).await, 1);
    let hits = recorder.hits("/busy");
    assert_eq!(hits.len(), 3, "{hits:?}");
    // The retries waited at least as long as asked (a retry base of 1 ms would not).
    assert!(
        hits[1].at - hits[0].at >= Duration::from_secs(1),
        "{hits:?}"
    );
    assert!(
        hits[2].at - hits[1].at >= Duration::from_secs(1),
        "{hits:?}"
    );
    // Waiting as asked within a poll is no failure.
    assert_eq!(errors(&db.events(id).await), 0);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_retry_after_longer_than_a_poll_waits_is_shown_and_waited_out_by_the_worker() {
    let db = TestDb::new().await;
    let recorder = Arc::new(Recorder::default());
    let source = recorder.listen("source").await;
    recorder.answer(
        "/later",
        Reply::status(429).with("retry-after", "120".into()),
    );
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let id = poller(
        &db,
        "later",
        json!({ "url": format!("http://{source}/later"), "interval_ms": 100, "retry_base_ms": 1 }),
    )
    .await;
    let state = db
        .wait_for_state(id, "the throttling on record", |s| s.error_code.is_some())
        .await;
    assert_eq!(
        state.error_code.as_deref(),
        Some("source_throttled"),
        "{state:?}"
    );
    assert_eq!(state.worker_status, WorkerStatus::Error);
    let failure = db
        .events(id)
        .await
        .into_iter()
        .find(|e| e.kind == "worker_error")
        .unwrap();
    assert!(
        failure.payload["retry_in_ms"].as_u64().unwrap() >= 120_000,
        "{failure:?}"
    );
    // Not asked again within the poll, nor by a restart.
    assert_eq!(recorder.hits("/later").len(), 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_reload_to_a_host_that_does_not_resolve_is_rejected_and_the_old_worker_keeps_polling() {
    let db = TestDb::new().await;
    let recorder = Arc::new(Recorder::default());
    let source = recorder.listen("source").await;
    recorder.answer("/items", Reply::ok(json!([{ "n": 1 }])));
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource_of("moving", "http_poll").await;
    let good = db
        .version(
            ds.id,
            json!({ "url": format!("http://{source}/items"), "interval_ms": 100 }),
        )
        .await;
    db.publish_sql(ds.id, good).await;
    db.wait_for_state(ds.id, "RUNNING on the good version", |s| {
        s.worker_status == WorkerStatus::Running && s.running_version == Some(good)
    })
    .await;

    let unresolvable = db
        .version(
            ds.id,
            json!({ "url": "http://no-such-host.invalid:8080/items", "interval_ms": 100 }),
        )
        .await;
    db.publish_sql(ds.id, unresolvable).await;
    let rejected = wait_for("the reload rejected", WAIT, || async {
        db.events(ds.id)
            .await
            .into_iter()
            .find(|e| e.kind == "reload_rejected")
    })
    .await;
    assert_eq!(rejected.version, Some(unresolvable));
    assert_eq!(rejected.payload["running_version"], good);
    let reason = rejected.payload["reason"].as_str().unwrap();
    assert!(reason.contains("no-such-host.invalid"), "{reason}");

    // The old worker was never stopped and keeps polling.
    let events = db.events(ds.id).await;
    assert!(
        events.iter().all(|e| e.kind != "worker_stopped"),
        "{events:?}"
    );
    let before = recorder.hits("/items").len();
    let records_before = db.records(ds.id, good).await;
    wait_for("more polls by the old worker", WAIT, || async {
        (recorder.hits("/items").len() > before + 2).then_some(())
    })
    .await;
    wait_for("more records by the old worker", WAIT, || async {
        (db.records(ds.id, good).await > records_before).then_some(())
    })
    .await;
    let state = db.state(ds.id).await;
    assert_eq!(state.worker_status, WorkerStatus::Running);
    assert_eq!(state.running_version, Some(good));
    assert_eq!(state.error_code.as_deref(), Some("reload_rejected"));

    // A version that can start replaces it, and clears the flag once it works.
    let fixed = db
        .version(
            ds.id,
            json!({ "url": format!("http://{source}/items"), "interval_ms": 200 }),
        )
        .await;
    db.publish_sql(ds.id, fixed).await;
    let state = db
        .wait_for_state(ds.id, "RUNNING on the fix", |s| {
            s.worker_status == WorkerStatus::Running && s.running_version == Some(fixed)
        })
        .await;
    assert_eq!(state.error_code, None);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_rejected_reload_replaces_the_old_worker_once_its_source_can_be_reached() {
    let db = TestDb::new().await;
    let recorder = Arc::new(Recorder::default());
    let source = recorder.listen("source").await;
    let app = TestApp::spawn(&db.url, |_| {}).await;
    let ds = db.datasource_of("later", "http_poll").await;
    let old = db
        .version(
            ds.id,
            json!({ "url": format!("http://{source}/old"), "interval_ms": 100 }),
        )
        .await;
    db.publish_sql(ds.id, old).await;
    db.wait_for_state(ds.id, "RUNNING on the old version", |s| {
        s.worker_status == WorkerStatus::Running && s.running_version == Some(old)
    })
    .await;

    // A port nothing listens on yet.
    let port = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let new = db
        .version(
            ds.id,
            json!({ "url": format!("http://{port}/new"), "interval_ms": 100 }),
        )
        .await;
    db.publish_sql(ds.id, new).await;
    db.wait_for_state(ds.id, "the reload rejected", |s| {
        s.error_code.as_deref() == Some("reload_rejected") && s.running_version == Some(old)
    })
    .await;
    assert!(recorder.hits("/new").is_empty());

    // The new source comes up: the version that was rejected takes over by itself.
    recorder.listen_at("new", &port.to_string()).await;
    let state = db
        .wait_for_state(ds.id, "RUNNING on the new version", |s| {
            s.worker_status == WorkerStatus::Running && s.running_version == Some(new)
        })
        .await;
    assert_eq!(state.error_code, None);
    assert!(!recorder.hits("/new").is_empty());
    let kinds = db.event_kinds(ds.id).await;
    assert_eq!(
        kinds.iter().filter(|k| *k == "reload_rejected").count(),
        1,
        "rejected once, checked again quietly: {kinds:?}"
    );
    assert!(kinds.contains(&"reload_applied".to_owned()));
    app.stop().await.unwrap();
}

fn signal(process: &ServeProcess, signal: Signal) {
    let pid = process.child.id().expect("the process runs");
    kill(Pid::from_raw(pid as i32), signal).expect("signal delivered");
}

/// `dsreg serve` as `name`, its outgoing HTTP sent through `proxy` (the recorder's listener
/// that labels its requests as this instance's).
async fn instance(db: &TestDb, name: &str, proxy: SocketAddr) -> ServeProcess {
    let proxy = format!("http://{proxy}");
    ServeProcess::start(
        &db.url,
        &[
            ("DSREG_INSTANCE_ID", name),
            ("DSREG_LEASE_TTL_MS", "3000"),
            ("DSREG_HEARTBEAT_INTERVAL_MS", "1000"),
            ("DSREG_POOL_SIZE", "4"),
            ("DSREG_LOG", "info"),
            ("HTTP_PROXY", &proxy),
            ("http_proxy", &proxy),
            ("NO_PROXY", "nothing.invalid"),
            ("no_proxy", "nothing.invalid"),
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_woken_from_sigstop_past_its_lease_sends_no_request_after_the_takeover() {
    let db = TestDb::new().await;
    let recorder = Arc::new(Recorder::default());
    let source = recorder.listen("source").await;
    let via_a = recorder.listen("node-a").await;
    let via_b = recorder.listen("node-b").await;
    // Sixteen pollers, each on a path of its own, polling five times a second.
    let client = db.client().await;
    let ids: Vec<Uuid> = client
        .query(
            "WITH d AS (
                INSERT INTO datasources (org, project, name, kind)
                SELECT 'acme', 'paused', 'p' || i, 'http_poll' FROM generate_series(1, 16) i
                RETURNING id, name
             )
             INSERT INTO datasource_versions (datasource_id, version, config)
             SELECT id, 1, jsonb_build_object('url', $1::text || '/' || id, 'interval_ms', 200)
             FROM d RETURNING datasource_id",
            &[&format!("http://{source}/ds")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    client
        .execute(
            "UPDATE datasource_versions SET state = 'published' WHERE datasource_id = ANY($1)",
            &[&ids],
        )
        .await
        .unwrap();
    let a = instance(&db, "node-a", via_a).await;
    let b = instance(&db, "node-b", via_b).await;
    let before = balanced(
        &client,
        &ids,
        &["node-a", "node-b"],
        Duration::from_secs(90),
    )
    .await;
    let paused: Vec<Uuid> = ids
        .iter()
        .filter(|id| before[*id] == "node-a")
        .copied()
        .collect();
    assert!(!paused.is_empty());
    // Each of node-a's pollers has reached the source through node-a's proxy.
    wait_for("node-a polling its share", WAIT, || async {
        paused
            .iter()
            .all(|id| {
                recorder
                    .hits(&format!("/ds/{id}"))
                    .iter()
                    .any(|h| h.via == "node-a")
            })
            .then_some(())
    })
    .await;
    let epochs = running(&client).await;

    signal(&a, Signal::SIGSTOP);
    wait_for(
        "node-a's share RUNNING on node-b",
        Duration::from_secs(60),
        || async {
            let running = running(&client).await;
            paused
                .iter()
                .all(|id| {
                    running
                        .get(id)
                        .is_some_and(|(on, epoch)| on == "node-b" && *epoch > epochs[id].1)
                })
                .then_some(())
        },
    )
    .await;
    // RUNNING on node-b is the truth: node-b has polled each of them (a claim does not carry
    // node-a's RUNNING over). node-a's poll timers are all due by now.
    for id in &paused {
        let hits = recorder.hits(&format!("/ds/{id}"));
        assert!(hits.iter().any(|h| h.via == "node-b"), "{id}: {hits:?}");
    }
    let woken_at = chrono::Utc::now();
    signal(&a, Signal::SIGCONT);

    // node-a notices its leases ran out, then rejoins and takes its share back.
    wait_for("node-a noticing its lapsed leases", WAIT, || async {
        let logs = a.logs.lock().unwrap();
        logs.iter()
            .any(|l| l.contains("leases not renewed in time"))
            .then_some(())
    })
    .await;
    assert_eq!(
        balanced(
            &client,
            &ids,
            &["node-a", "node-b"],
            Duration::from_secs(90)
        )
        .await,
        before
    );

    // Between its wake-up and claiming a datasource anew, node-a sent it nothing.
    let reclaimed: HashMap<Uuid, chrono::DateTime<chrono::Utc>> = client
        .query(
            "SELECT datasource_id, acquired_at FROM datasource_leases
             WHERE owner = 'node-a' AND datasource_id = ANY($1)",
            &[&paused],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for id in &paused {
        let reclaimed_at = reclaimed[id];
        assert!(
            reclaimed_at > woken_at,
            "{id} was claimed anew after the wake-up"
        );
        let stray: Vec<Hit> = recorder
            .hits(&format!("/ds/{id}"))
            .into_iter()
            .filter(|h| h.via == "node-a" && h.wall >= woken_at && h.wall < reclaimed_at)
            .collect();
        assert!(
            stray.is_empty(),
            "node-a polled {id} after node-b took it over: {stray:?}"
        );
    }
    a.stop().await;
    b.stop().await;
}
