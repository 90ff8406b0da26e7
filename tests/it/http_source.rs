//! Datasource definitions from an HTTP source (`dsreg sync --from URL`, `serve --sync-url`):
//! a local server (and an HTTPS one with a certificate made here) serving a bundle. Import,
//! a re-fetch answered 304, an edit followed within an interval, conflicts under each
//! policy, pruning scoped to the source, a malformed document, and the binary with a bearer
//! token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dsreg::connectors::Catalog;
use dsreg::db::repository::datasources::{self, Datasource};
use dsreg::db::repository::versions;
use dsreg::domain::DatasourceStatus;
use dsreg::files::http::poll::Outcome;
use dsreg::files::http::{Poller, Source, SourceConfig};
use dsreg::files::{Action, ConflictPolicy, Error, Mode, Report};
use dsreg::transform::Limits;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::cli::{dsreg, run};
use crate::helpers::{TestDb, wait_for};

/// A generous bound for conditions.
const WAIT: Duration = Duration::from_secs(60);

/// What the server serves and what it saw.
#[derive(Default)]
pub(crate) struct Served {
    /// The body, at every path.
    pub body: Vec<u8>,
    /// Bumped with each new body: the ETag is `"<generation>"`.
    pub generation: u64,
    /// Requests answered 200.
    pub full: u64,
    /// Requests answered 304 (their `If-None-Match` named the current body).
    pub not_modified: u64,
    /// The bearer token wanted, if any (others get a 401).
    pub token: Option<String>,
    /// Requests refused for their token.
    pub unauthorized: u64,
    /// Answer every request with this status instead.
    pub fail_with: Option<u16>,
    /// Wait this long before answering.
    pub delay: Option<Duration>,
    /// Serve `Last-Modified` instead of an `ETag`.
    pub dated: bool,
}

/// The `Last-Modified` of a generation: a day apart each.
fn date_of(generation: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + generation * 86_400);
    httpdate::fmt_http_date(at)
}

/// A local server of datasource definitions, over HTTP or HTTPS.
pub(crate) struct DefinitionServer {
    pub base: String,
    pub state: Arc<Mutex<Served>>,
    /// The CA that signed an HTTPS server's certificate.
    pub ca: Option<PathBuf>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for DefinitionServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_definitions(
    State(state): State<Arc<Mutex<Served>>>,
    headers: HeaderMap,
) -> Response {
    let delay = state.lock().unwrap().delay;
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let mut served = state.lock().unwrap();
    if let Some(status) = served.fail_with {
        return StatusCode::from_u16(status).unwrap().into_response();
    }
    if let Some(token) = &served.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(&format!("Bearer {token}")) {
            served.unauthorized += 1;
            return StatusCode::UNAUTHORIZED.into_response();
        }
    }
    if served.dated {
        let date = date_of(served.generation);
        let since = headers
            .get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok());
        if since == Some(date.as_str()) {
            served.not_modified += 1;
            return (StatusCode::NOT_MODIFIED, [(header::LAST_MODIFIED, date)]).into_response();
        }
        served.full += 1;
        return (
            StatusCode::OK,
            [(header::LAST_MODIFIED, date)],
            served.body.clone(),
        )
            .into_response();
    }
    let etag = format!("\"{}\"", served.generation);
    let asked = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    if asked == Some(etag.as_str()) {
        served.not_modified += 1;
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    served.full += 1;
    (StatusCode::OK, [(header::ETAG, etag)], served.body.clone()).into_response()
}

/// A TLS listener for `axum::serve`: connections whose handshake fails are dropped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl DefinitionServer {
    pub(crate) async fn start(tls: bool) -> Self {
        crate::helpers::init_test_log();
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(Mutex::new(Served::default()));
        let router = axum::Router::new()
            .route("/{*path}", axum::routing::get(serve_definitions))
            .with_state(state.clone());
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        if !tls {
            let task = tokio::spawn(async move {
                let _ = axum::serve(tcp, router).await;
            });
            return Self {
                base: format!("http://{addr}"),
                state,
                ca: None,
                task,
                _dir: dir,
            };
        }
        crate::pgtls::ca(dir.path(), "defs-ca");
        crate::pgtls::leaf(
            dir.path(),
            "defs-ca",
            "defs",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(dir.path().join("defs.crt"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.path().join("defs.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let listener = TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        };
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            base: format!("https://{addr}"),
            state,
            ca: Some(dir.path().join("defs-ca.crt")),
            task,
            _dir: dir,
        }
    }

    /// Serves `body` from now on, under a new ETag.
    pub(crate) fn set(&self, body: impl Into<Vec<u8>>) {
        let mut served = self.state.lock().unwrap();
        served.body = body.into();
        served.generation += 1;
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Served) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }
}

/// A generator definition of `name` in acme/shop emitting `{"n": rate}`.
fn generator(name: &str, rate: u32) -> String {
    format!(
        "org: acme\nproject: shop\nname: {name}\nkind: generator\nowner: team-shop\n\
         config:\n  rate_per_sec: {rate}\n  template:\n    n: {rate}\n"
    )
}

/// A multi-document bundle of `docs`.
fn bundle(docs: &[String]) -> String {
    docs.iter()
        .map(|d| format!("---\n{d}"))
        .collect::<Vec<_>>()
        .join("")
}

fn config(url: &str, ca: Option<&Path>, conflict: ConflictPolicy, prune: bool) -> SourceConfig {
    SourceConfig {
        source: Source::parse(url).unwrap(),
        poll_interval: Duration::from_millis(200),
        timeout: Duration::from_secs(10),
        max_bytes: 1024 * 1024,
        token: None,
        ca_file: ca.map(Path::to_owned),
        conflict,
        prune,
    }
}

fn poller(db: &TestDb, config: SourceConfig) -> Poller {
    Poller::new(
        db.pool.clone(),
        Catalog::builtin(),
        Limits::default(),
        config,
    )
    .unwrap()
}

fn synced(outcome: Outcome) -> Report {
    match outcome {
        Outcome::Synced(report) => report,
        Outcome::NotModified => panic!("expected a sync, got a 304"),
    }
}

fn actions(report: &Report) -> Vec<(String, Action)> {
    report
        .plan
        .steps
        .iter()
        .map(|s| (s.key.name.clone(), s.action))
        .collect()
}

async fn live(db: &TestDb, name: &str) -> Option<Datasource> {
    datasources::by_names(
        &**db.client().await,
        &[("acme".into(), "shop".into(), name.into())],
        false,
    )
    .await
    .unwrap()
    .into_iter()
    .find(|d| d.status != DatasourceStatus::Archived)
}

async fn published(db: &TestDb, id: uuid::Uuid) -> Option<(i32, Value)> {
    versions::published(&**db.client().await, id)
        .await
        .unwrap()
        .map(|v| (v.version, v.config))
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn an_https_bundle_is_imported_a_refetch_is_a_304_and_an_edit_is_one_new_version() {
    let db = TestDb::new().await;
    let server = DefinitionServer::start(true).await;
    server.set(bundle(&[generator("orders", 1), generator("carts", 2)]));
    let url = format!("{}/teams/shop.yaml?ref=main&sig=s3cret", server.base);
    let name = format!("{}/teams/shop.yaml", server.base);
    let mut source = poller(
        &db,
        config(&url, server.ca.as_deref(), ConflictPolicy::Fail, false),
    );

    let first = synced(source.pass(Mode::Import, false).await.unwrap());
    assert_eq!(
        actions(&first),
        [
            ("orders".into(), Action::Create),
            ("carts".into(), Action::Create)
        ]
    );
    let orders = live(&db, "orders").await.unwrap();
    assert_eq!(
        published(&db, orders.id).await.unwrap().1["rate_per_sec"],
        1
    );
    // Written as the source, named without its query.
    let actors: Vec<String> = db
        .client()
        .await
        .query(
            "SELECT DISTINCT actor FROM audit_log WHERE action LIKE 'files.%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(actors, [format!("http:{name}")]);
    let leaked = count(
        &db,
        "SELECT count(*) FROM audit_log WHERE actor LIKE '%s3cret%' OR diff::text LIKE '%s3cret%'",
    )
    .await
        + count(
            &db,
            "SELECT count(*) FROM datasource_events WHERE actor LIKE '%s3cret%' OR payload::text LIKE '%s3cret%'",
        )
        .await
        + count(
            &db,
            "SELECT count(*) FROM datasource_file_sync WHERE path LIKE '%s3cret%'",
        )
        .await;
    assert_eq!(leaked, 0);

    // Asked again: the server sees the ETag and answers 304; nothing is done.
    let versions_before = count(&db, "SELECT count(*) FROM datasource_versions").await;
    assert!(matches!(
        source.pass(Mode::Watch, false).await.unwrap(),
        Outcome::NotModified
    ));
    assert_eq!(server.with(|s| (s.full, s.not_modified)), (1, 1));

    // The same documents under a new ETag: fetched whole, and nothing changes.
    server.set(bundle(&[generator("orders", 1), generator("carts", 2)]));
    let same = synced(source.pass(Mode::Watch, false).await.unwrap());
    assert!(
        same.plan
            .steps
            .iter()
            .all(|s| s.action == Action::Unchanged)
    );
    assert!(!same.applied);
    assert_eq!(
        count(&db, "SELECT count(*) FROM datasource_versions").await,
        versions_before
    );

    // An edit: one new version of the one datasource that changed.
    server.set(bundle(&[generator("orders", 5), generator("carts", 2)]));
    let edited = synced(source.pass(Mode::Watch, false).await.unwrap());
    assert_eq!(
        actions(&edited),
        [
            ("orders".into(), Action::NewVersion),
            ("carts".into(), Action::Unchanged)
        ]
    );
    let (version, config) = published(&db, orders.id).await.unwrap();
    assert_eq!((version, &config["rate_per_sec"]), (2, &json!(5)));
}

#[tokio::test]
async fn an_https_source_signed_by_an_unknown_ca_is_refused_and_nothing_is_applied() {
    let db = TestDb::new().await;
    let server = DefinitionServer::start(true).await;
    server.set(generator("orders", 1));
    // The system's roots do not know the test's CA.
    let mut source = poller(
        &db,
        config(
            &format!("{}/orders.yaml", server.base),
            None,
            ConflictPolicy::Fail,
            false,
        ),
    );
    let Error::Http(e) = source.pass(Mode::Import, false).await.unwrap_err() else {
        panic!("a TLS refusal is the source's error");
    };
    let text = e.to_string();
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    assert_eq!(count(&db, "SELECT count(*) FROM datasources").await, 0);
}

#[tokio::test]
async fn a_polled_source_is_followed_within_an_interval_and_prune_archives_only_its_own() {
    let db = TestDb::new().await;
    let server = DefinitionServer::start(false).await;
    let other = DefinitionServer::start(false).await;
    server.set(bundle(&[generator("orders", 1), generator("carts", 1)]));
    other.set(generator("returns", 1));
    // Another source's datasource, which this source's pruning must leave alone.
    let mut others = poller(
        &db,
        config(
            &format!("{}/returns.yaml", other.base),
            None,
            ConflictPolicy::Fail,
            true,
        ),
    );
    synced(others.pass(Mode::Import, false).await.unwrap());

    let source = poller(
        &db,
        config(
            &format!("{}/shop.yaml", server.base),
            None,
            ConflictPolicy::Fail,
            true,
        ),
    );
    let stop = CancellationToken::new();
    let polling = tokio::spawn(source.run(stop.clone()));
    let orders = wait_for("orders imported", WAIT, || live(&db, "orders")).await;

    // A poll answered 304 before the edit: the poller asks conditionally.
    wait_for("a 304", WAIT, || async {
        (server.with(|s| s.not_modified) > 0).then_some(())
    })
    .await;
    server.set(bundle(&[generator("orders", 4), generator("carts", 1)]));
    wait_for("the edit published", WAIT, || async {
        published(&db, orders.id)
            .await
            .filter(|(_, c)| c["rate_per_sec"] == 4)
    })
    .await;

    // carts leaves the bundle: archived; the other source's datasource stays.
    let carts = live(&db, "carts").await.unwrap();
    server.set(generator("orders", 4));
    wait_for("carts archived", WAIT, || async {
        live(&db, "carts").await.is_none().then_some(())
    })
    .await;
    stop.cancel();
    polling.await.unwrap();
    let archived = datasources::get(&**db.client().await, carts.id)
        .await
        .unwrap();
    assert_eq!(archived.status, DatasourceStatus::Archived);
    assert!(live(&db, "returns").await.is_some());
    assert!(live(&db, "orders").await.is_some());
}

#[tokio::test]
async fn each_conflict_policy_settles_a_conflict_with_an_http_source() {
    let db = TestDb::new().await;
    let server = DefinitionServer::start(false).await;
    let url = format!("{}/orders.yaml", server.base);
    server.set(generator("orders", 1));
    synced(
        poller(&db, config(&url, None, ConflictPolicy::Fail, false))
            .pass(Mode::Import, false)
            .await
            .unwrap(),
    );
    let ds = live(&db, "orders").await.unwrap();
    let v2 = db.version(ds.id, json!({ "rate_per_sec": 7 })).await;
    db.publish_sql(ds.id, v2).await;
    server.set(generator("orders", 3));

    // fail: nothing applied.
    let refused = poller(&db, config(&url, None, ConflictPolicy::Fail, false))
        .pass(Mode::Import, false)
        .await;
    let Err(Error::Problems(problems)) = refused else {
        panic!("a conflict under fail is refused: {refused:?}");
    };
    assert!(
        problems[0].to_string().contains("conflict"),
        "{}",
        problems[0]
    );
    assert_eq!(published(&db, ds.id).await.unwrap().0, v2);

    // db-wins: the database's version stands.
    let kept = synced(
        poller(&db, config(&url, None, ConflictPolicy::DbWins, false))
            .pass(Mode::Import, false)
            .await
            .unwrap(),
    );
    assert_eq!(actions(&kept), [("orders".into(), Action::Conflict)]);
    assert_eq!(published(&db, ds.id).await.unwrap().0, v2);

    // file-wins: after another change on both sides, the source's is applied.
    let v3 = db.version(ds.id, json!({ "rate_per_sec": 9 })).await;
    db.publish_sql(ds.id, v3).await;
    server.set(generator("orders", 5));
    let applied = synced(
        poller(&db, config(&url, None, ConflictPolicy::FileWins, false))
            .pass(Mode::Import, false)
            .await
            .unwrap(),
    );
    assert_eq!(actions(&applied), [("orders".into(), Action::NewVersion)]);
    let (now, config) = published(&db, ds.id).await.unwrap();
    assert_eq!((now, &config["rate_per_sec"]), (v3 + 1, &json!(5)));

    let events: Vec<_> = db
        .events(ds.id)
        .await
        .into_iter()
        .filter(|e| e.kind == "sync_conflict")
        .collect();
    let seen: Vec<Value> = events
        .iter()
        .map(|e| json!([e.payload["resolution"], e.payload["policy"]]))
        .collect();
    assert_eq!(
        seen,
        [
            json!(["failed", "fail"]),
            json!(["db_wins", "db-wins"]),
            json!(["file_wins", "file-wins"]),
        ]
    );
    for e in &events {
        assert_eq!(e.payload["file"], url);
        assert_eq!(e.actor, format!("http:{url}"));
    }
}

#[tokio::test]
async fn a_malformed_document_applies_nothing_and_is_reported() {
    let db = TestDb::new().await;
    let server = DefinitionServer::start(false).await;
    let url = format!("{}/shop.yaml", server.base);
    server.set(format!(
        "{}---\norg: acme\nproject: shop\nname: broken\nkind: generator\nconfig: [unclosed\n",
        generator("orders", 1)
    ));
    let once = poller(&db, config(&url, None, ConflictPolicy::Fail, false))
        .pass(Mode::Import, false)
        .await;
    let Err(Error::Problems(problems)) = once else {
        panic!("a malformed document is refused: {once:?}");
    };
    assert!(problems[0].to_string().starts_with(&url), "{}", problems[0]);

    let watched = synced(
        poller(&db, config(&url, None, ConflictPolicy::Fail, false))
            .pass(Mode::Watch, false)
            .await
            .unwrap(),
    );
    assert!(!watched.problems.is_empty());
    assert!(!watched.applied);
    assert_eq!(count(&db, "SELECT count(*) FROM datasources").await, 0);
}

#[tokio::test]
async fn the_binary_syncs_once_with_a_bearer_token_from_a_file_and_refuses_without_it() {
    let db = TestDb::new().await;
    let home = tempfile::tempdir().unwrap();
    let server = DefinitionServer::start(false).await;
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    server.with(|s| s.token = Some(token.clone()));
    server.set(bundle(&[generator("orders", 1), generator("carts", 1)]));
    let token_file = home.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let url = format!("{}/shop.yaml?sig=q-s3cret", server.base);
    let dsreg_on = |args: &[&str]| {
        let mut command = dsreg(home.path());
        command.env("DATABASE_URL", &db.url).args(args);
        command
    };

    let refused = run(dsreg_on(&["sync", "--from", &url, "--once"]), None).await;
    assert_eq!(refused.status.code(), Some(1), "{}", refused.stderr);
    assert!(refused.stderr.contains("401"), "{}", refused.stderr);
    assert!(!refused.stderr.contains("q-s3cret"), "{}", refused.stderr);
    assert_eq!(count(&db, "SELECT count(*) FROM datasources").await, 0);

    let applied = run(
        dsreg_on(&[
            "sync",
            "--from",
            &url,
            "--once",
            "--sync-token-file",
            token_file.to_str().unwrap(),
            "-o",
            "json",
        ]),
        None,
    )
    .await;
    applied.assert_success();
    let steps = applied.json_lines();
    assert_eq!(steps.len(), 2, "{}", applied.stdout);
    assert!(steps.iter().all(|s| s["action"] == "create"));
    for output in [&applied.stdout, &applied.stderr, &refused.stdout] {
        assert!(!output.contains(&token));
        assert!(!output.contains("q-s3cret"));
    }
    assert_eq!(server.with(|s| s.unauthorized), 1);
    assert_eq!(count(&db, "SELECT count(*) FROM datasources").await, 2);

    // The token from an environment variable: the same documents, nothing to change.
    server.set(bundle(&[generator("orders", 1), generator("carts", 1)]));
    let mut from_env = dsreg_on(&[
        "sync",
        "--from",
        &url,
        "--once",
        "--sync-token-env",
        "DEFS_TOKEN",
    ]);
    from_env.env("DEFS_TOKEN", &token);
    let again = run(from_env, None).await;
    again.assert_success();
    assert_eq!(
        again.stdout.matches("unchanged").count(),
        2,
        "{}",
        again.stdout
    );
    assert_eq!(server.with(|s| s.unauthorized), 1);
}

/// `/readyz` and `/metrics` of a registry at `http_addr`.
async fn readyz_and_metrics(http_addr: &str) -> (String, String) {
    let client = crate::helpers::http_client(Duration::from_secs(10)).unwrap();
    let get = |path: &str| {
        let request = client.get(format!("http://{http_addr}{path}"));
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    (get("/readyz").await, get("/metrics").await)
}

/// The `dsreg_sync_source_failures_total` sample of `source` in a scrape.
fn failures(metrics: &str, source: &str) -> Option<u64> {
    let prefix = format!("dsreg_sync_source_failures_total{{source=\"{source}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

#[tokio::test]
async fn serve_follows_its_sync_url_and_a_failing_source_keeps_the_database_and_is_reported() {
    let db = TestDb::new().await;
    let server = DefinitionServer::start(false).await;
    server.set(generator("orders", 1));
    let url = format!("{}/orders.yaml?sig=q-s3cret", server.base);
    let name = format!("{}/orders.yaml", server.base);
    let serve = crate::helpers::ServeProcess::start(
        &db.url,
        &[
            ("DSREG_SYNC_URL", url.as_str()),
            ("DSREG_SYNC_POLL_INTERVAL_MS", "200"),
        ],
    )
    .await;
    let orders = wait_for("orders from the source", WAIT, || live(&db, "orders")).await;
    let up = format!("dsreg_sync_source_up{{source=\"{name}\"}} 1");
    wait_for("the source up", WAIT, || async {
        let (_, metrics) = readyz_and_metrics(&serve.http_addr).await;
        metrics.contains(&up).then_some(())
    })
    .await;

    // The server fails: the database keeps v1; the failure shows in /readyz and /metrics.
    server.with(|s| s.fail_with = Some(500));
    let (readyz, metrics) = wait_for("the failure reported", WAIT, || async {
        let (readyz, metrics) = readyz_and_metrics(&serve.http_addr).await;
        (readyz.contains("answered 500") && failures(&metrics, &name) >= Some(2))
            .then_some((readyz, metrics))
    })
    .await;
    assert!(readyz.starts_with("ready\n"), "{readyz}");
    assert!(
        readyz.contains(&format!("definition source {name} is failing")),
        "{readyz}"
    );
    assert!(metrics.contains(&format!("dsreg_sync_source_up{{source=\"{name}\"}} 0")));

    // A malformed body: reported, nothing applied.
    server.with(|s| s.fail_with = None);
    server.set("org: acme\nproject: shop\nname: orders\nkind: generator\nconfig: [unclosed\n");
    wait_for("the malformed body reported", WAIT, || async {
        let (readyz, _) = readyz_and_metrics(&serve.http_addr).await;
        readyz.contains("problem(s)").then_some(())
    })
    .await;
    assert_eq!(published(&db, orders.id).await.unwrap().0, 1);

    // Fixed with an edit: applied, and the warning goes.
    server.set(generator("orders", 6));
    wait_for("the edit published", WAIT, || async {
        published(&db, orders.id)
            .await
            .filter(|(_, c)| c["rate_per_sec"] == 6)
    })
    .await;
    wait_for("the warning gone", WAIT, || async {
        let (readyz, _) = readyz_and_metrics(&serve.http_addr).await;
        (!readyz.contains("definition source")).then_some(())
    })
    .await;
    let logs = serve.logs.lock().unwrap().join("\n");
    assert!(logs.contains("answered 500"), "the failure is logged");
    assert!(!logs.contains("q-s3cret"), "the query is never logged");
}

/// A `.tar.gz` of `entries` (path, text), laid out as a folder.
fn tar_gz(entries: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    for (path, text) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        builder
            .append_data(&mut header, path, text.as_bytes())
            .unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// A `.zip` of `entries` (path, bytes), deflated.
fn zip(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (path, data) in entries {
        writer.start_file(*path, options).unwrap();
        writer.write_all(data).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

#[tokio::test]
async fn an_archive_is_synced_as_a_folder_applying_what_it_can_when_watched_and_nothing_once() {
    let db = TestDb::new().await;
    let server = DefinitionServer::start(false).await;
    let url = format!("{}/shop.tar.gz", server.base);
    let broken =
        "org: acme\nproject: shop\nname: carts\nkind: generator\nconfig:\n  rate_per_sec: -1\n";
    server.set(tar_gz(&[
        ("shop/orders.yaml", &generator("orders", 1)),
        ("shop/carts.yaml", broken),
        ("README.md", "not a datasource file"),
    ]));

    // Once: all or nothing, every problem named by its entry.
    let once = poller(&db, config(&url, None, ConflictPolicy::Fail, true))
        .pass(Mode::Import, false)
        .await;
    let Err(Error::Problems(problems)) = once else {
        panic!("a bundle with a problem is refused once: {once:?}");
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0]
            .to_string()
            .starts_with(&format!("{url}!/shop/carts.yaml:")),
        "{}",
        problems[0]
    );
    assert_eq!(count(&db, "SELECT count(*) FROM datasources").await, 0);

    // Watched: the good file is applied, the broken one skipped and reported.
    let mut watched = poller(&db, config(&url, None, ConflictPolicy::Fail, true));
    let report = synced(watched.pass(Mode::Watch, false).await.unwrap());
    assert_eq!(actions(&report), [("orders".into(), Action::Create)]);
    assert_eq!(report.problems.len(), 1);
    let orders = live(&db, "orders").await.unwrap();
    let recorded: String = db
        .client()
        .await
        .query_one(
            "SELECT path FROM datasource_file_sync WHERE datasource_id = $1",
            &[&orders.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, format!("{url}!/shop/orders.yaml"));

    // Fixed, with a second datasource; then one entry removed: pruned, scoped to the source.
    server.set(tar_gz(&[
        ("shop/orders.yaml", &generator("orders", 1)),
        ("shop/carts.yaml", &generator("carts", 1)),
    ]));
    let fixed = synced(watched.pass(Mode::Watch, false).await.unwrap());
    assert_eq!(
        actions(&fixed),
        [
            ("carts".into(), Action::Create),
            ("orders".into(), Action::Unchanged)
        ]
    );
    server.set(tar_gz(&[("shop/orders.yaml", &generator("orders", 1))]));
    let pruned = synced(watched.pass(Mode::Watch, false).await.unwrap());
    assert_eq!(
        actions(&pruned),
        [
            ("orders".into(), Action::Unchanged),
            ("carts".into(), Action::Archive)
        ]
    );
    assert!(live(&db, "carts").await.is_none());
}

#[tokio::test]
async fn a_zip_bomb_and_a_path_traversal_archive_are_refused_and_the_database_kept() {
    let db = TestDb::new().await;
    let server = DefinitionServer::start(false).await;
    let url = format!("{}/defs.zip", server.base);
    server.set(zip(&[(
        "shop/orders.yaml",
        generator("orders", 1).as_bytes(),
    )]));
    let mut source = poller(&db, config(&url, None, ConflictPolicy::Fail, true));
    synced(source.pass(Mode::Watch, false).await.unwrap());
    let orders = live(&db, "orders").await.unwrap();
    let footprint = count(&db, "SELECT count(*) FROM datasource_versions").await
        + count(&db, "SELECT count(*) FROM audit_log").await;

    // 70 MiB of zeros: well under the body bound compressed, over the unpacked bound.
    let zeros = vec![0u8; 70 * 1024 * 1024];
    let bomb = zip(&[
        ("shop/orders.yaml", generator("orders", 2).as_bytes()),
        ("shop/zeros.yaml", &zeros),
    ]);
    assert!(bomb.len() < 1024 * 1024);
    server.set(bomb);
    let Error::Http(e) = source.pass(Mode::Watch, false).await.unwrap_err() else {
        panic!("a zip bomb is the source's error");
    };
    assert!(e.to_string().contains("unpacks to more than"), "{e}");

    for path in ["../../etc/orders.yaml", "/etc/orders.yaml"] {
        server.set(zip(&[(path, generator("orders", 3).as_bytes())]));
        let Error::Http(e) = source.pass(Mode::Watch, false).await.unwrap_err() else {
            panic!("a path outside the archive is the source's error");
        };
        let text = e.to_string();
        assert!(text.contains(path) && text.contains("refused"), "{text}");
    }

    // Nothing of either was applied, and nothing was pruned.
    assert_eq!(published(&db, orders.id).await.unwrap().0, 1);
    assert_eq!(
        count(&db, "SELECT count(*) FROM datasource_versions").await
            + count(&db, "SELECT count(*) FROM audit_log").await,
        footprint
    );
    assert!(live(&db, "orders").await.is_some());
}

#[tokio::test]
async fn last_modified_makes_a_conditional_request_and_the_time_and_size_bounds_hold() {
    let db = TestDb::new().await;
    let server = DefinitionServer::start(false).await;
    server.with(|s| s.dated = true);
    server.set(generator("orders", 1));
    let url = format!("{}/orders.yaml", server.base);
    let mut source = poller(&db, config(&url, None, ConflictPolicy::Fail, false));
    synced(source.pass(Mode::Watch, false).await.unwrap());
    assert!(matches!(
        source.pass(Mode::Watch, false).await.unwrap(),
        Outcome::NotModified
    ));
    assert_eq!(server.with(|s| (s.full, s.not_modified)), (1, 1));

    // Over the size bound: refused, nothing applied.
    server.set(format!(
        "{}# {}\n",
        generator("orders", 2),
        "x".repeat(4096)
    ));
    let small = SourceConfig {
        max_bytes: 1024,
        ..config(&url, None, ConflictPolicy::Fail, false)
    };
    let e = poller(&db, small)
        .pass(Mode::Import, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("over 1024 bytes"), "{e}");

    // Slower than the timeout: refused, nothing applied.
    server.with(|s| s.delay = Some(Duration::from_secs(30)));
    let hasty = SourceConfig {
        timeout: Duration::from_millis(300),
        ..config(&url, None, ConflictPolicy::Fail, false)
    };
    let e = poller(&db, hasty)
        .pass(Mode::Import, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("timed out"), "{e}");
    let orders = live(&db, "orders").await.unwrap();
    assert_eq!(
        published(&db, orders.id).await.unwrap().1["rate_per_sec"],
        1
    );
}

#[tokio::test]
async fn the_binary_polls_a_source_until_ctrl_c_printing_each_change() {
    use tokio::io::AsyncBufReadExt;
    let db = TestDb::new().await;
    let home = tempfile::tempdir().unwrap();
    let server = DefinitionServer::start(false).await;
    server.set(generator("orders", 1));
    let url = format!("{}/orders.yaml", server.base);
    let mut command = dsreg(home.path());
    command
        .env("DATABASE_URL", &db.url)
        .args([
            "sync",
            "--from",
            &url,
            "--sync-poll-interval-ms",
            "100",
            "-o",
            "json",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a change within the wait")
            .unwrap()
            .expect("the command is running");
        serde_json::from_str(&line).unwrap()
    };

    let created = next().await;
    // Polls answered 304 print nothing; the edit is the next line.
    wait_for("a 304", WAIT, || async {
        (server.with(|s| s.not_modified) > 0).then_some(())
    })
    .await;
    server.set(generator("orders", 2));
    let edited = next().await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("sync stops on Ctrl-C")
        .unwrap();

    assert_eq!(
        (&created["action"], &created["version"], &created["file"]),
        (&json!("create"), &json!(1), &json!(url))
    );
    assert_eq!(
        (&edited["action"], &edited["version"]),
        (&json!("new version"), &json!(2))
    );
    assert!(status.success(), "{status:?}");
}
