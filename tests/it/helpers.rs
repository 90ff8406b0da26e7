//! Shared test fixtures: one throwaway Postgres cluster per test run (or `DATABASE_URL`), a
//! template database migrated once, and a fresh database per test, dropped on teardown.

use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::Pool;
use dsreg::db::embedded::EmbeddedCluster;
use dsreg::db::repository::datasources::{self, Datasource, NewDatasource};
use dsreg::db::repository::{self as repo, WriteContext, versions};
use dsreg::domain::Name;
use tokio::sync::OnceCell;

/// Where test databases are made.
struct Server {
    admin_url: String,
    template: String,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();
static CLUSTER: Mutex<Option<EmbeddedCluster>> = Mutex::new(None);

extern "C" fn stop_cluster_at_exit() {
    if let Ok(mut guard) = CLUSTER.lock()
        && let Some(mut cluster) = guard.take()
    {
        let _ = cluster.stop();
    }
}

/// Installs the test log subscriber when `TEST_LOG` is set; silent otherwise.
pub fn init_test_log() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_test_writer()
            .try_init();
    }
}

async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            init_test_log();
            let admin_url = match std::env::var("DATABASE_URL") {
                Ok(url) => url,
                Err(_) => {
                    let cluster = tokio::task::spawn_blocking(EmbeddedCluster::start_temporary)
                        .await
                        .expect("launcher task")
                        .expect("starting the test cluster");
                    let url = cluster.url("postgres");
                    *CLUSTER.lock().unwrap() = Some(cluster);
                    // SAFETY: registering a plain extern "C" function with no captured state.
                    unsafe { libc::atexit(stop_cluster_at_exit) };
                    url
                }
            };
            let template = format!("dsreg_template_{}", uuid::Uuid::new_v4().simple());
            dsreg::db::create_database(&admin_url, &template, None)
                .await
                .expect("template database");
            let url = with_database(&admin_url, &template);
            dsreg::app::migrate(&url)
                .await
                .expect("migrating the template");
            // The migration connection is dropped here: a template with a session cannot be cloned.
            Server {
                admin_url,
                template,
            }
        })
        .await
}

/// `url` pointing at `database` instead.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// A database of its own for one test, migrated, dropped when this is dropped.
pub struct TestDb {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// A pool on it.
    pub pool: Pool,
    admin_url: String,
}

impl TestDb {
    /// A fresh migrated database.
    pub async fn new() -> Self {
        let server = server().await;
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        dsreg::db::create_database(&server.admin_url, &name, Some(&server.template))
            .await
            .expect("creating the test database");
        let url = with_database(&server.admin_url, &name);
        let pool = dsreg::db::pool(&url, 16, Duration::from_secs(10)).expect("pool");
        Self {
            name,
            url,
            pool,
            admin_url: server.admin_url.clone(),
        }
    }

    /// A fresh database on the server of `admin_url` (any server, say one that requires
    /// TLS), migrated from scratch.
    pub async fn on_server(admin_url: &str) -> Self {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        dsreg::db::create_database(admin_url, &name, None)
            .await
            .expect("creating the test database");
        let url = with_database(admin_url, &name);
        dsreg::app::migrate(&url).await.expect("migrating");
        let pool = dsreg::db::pool(&url, 16, Duration::from_secs(10)).expect("pool");
        Self {
            name,
            url,
            pool,
            admin_url: admin_url.to_owned(),
        }
    }

    /// A pooled client.
    pub async fn client(&self) -> deadpool_postgres::Client {
        self.pool.get().await.expect("pooled client")
    }

    /// Creates an active datasource named `name` in org `acme`, project `core`.
    pub async fn datasource(&self, name: &str) -> Datasource {
        let mut client = self.client().await;
        let tx = repo::begin(&mut client, &WriteContext::actor("test"))
            .await
            .unwrap();
        let ds = datasources::create(
            &tx,
            &NewDatasource {
                org: Name::parse("org", "acme").unwrap(),
                project: Name::parse("project", "core").unwrap(),
                name: Name::parse("name", name).unwrap(),
                kind: "generator".into(),
                owner: "team-a".into(),
                tags: vec!["demo".into()],
                description: String::new(),
            },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        ds
    }

    /// Adds `n` draft versions to a datasource; returns their numbers.
    pub async fn drafts(&self, datasource: uuid::Uuid, n: usize) -> Vec<i32> {
        let mut client = self.client().await;
        let tx = repo::begin(&mut client, &WriteContext::actor("test"))
            .await
            .unwrap();
        let mut out = Vec::new();
        for i in 0..n {
            let v =
                versions::create_draft(&tx, datasource, &serde_json::json!({ "rate": i }), "draft")
                    .await
                    .unwrap();
            out.push(v.version);
        }
        tx.commit().await.unwrap();
        out
    }
}

/// A Postgres server of one test's own, stopped and removed when dropped (after the test's
/// databases: declare it first). For tests whose transactions reach past their database: an
/// xid held open holds back the horizon of every database on its server, a lagging listener
/// fills the server's one NOTIFY queue; on the run's shared server they would stall the event
/// feeds of every other test.
pub struct OwnServer(EmbeddedCluster);

impl OwnServer {
    /// Starts one.
    pub async fn start() -> Self {
        init_test_log();
        let cluster = tokio::task::spawn_blocking(EmbeddedCluster::start_temporary)
            .await
            .unwrap()
            .expect("a server of the test's own");
        Self(cluster)
    }

    /// A fresh migrated database on it.
    pub async fn db(&self) -> TestDb {
        TestDb::on_server(&self.0.url("postgres")).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.pool.close();
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime; the drop statement runs on a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime
                .block_on(dsreg::db::drop_database(&admin_url, &name))
                .map_err(std::io::Error::other)
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: test database {} was not dropped", self.name);
        }
    }
}

/// Waits until `check` returns `Some`, polling every few milliseconds, or panics after `timeout`
/// naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until a session of `client`'s database waits for a lock in a statement whose text
/// holds `statement` (any statement when it is empty).
pub async fn wait_for_lock_wait(client: &tokio_postgres::Client, what: &str, statement: &str) {
    wait_for(what, Duration::from_secs(60), || async {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND strpos(query, $1) > 0",
                &[&statement],
            )
            .await
            .unwrap()
            .get(0);
        (waiting > 0).then_some(())
    })
    .await;
}

/// A registry running in a runtime of its own, so a test can stop it gracefully or kill it
/// outright (every task dropped at once, as in a crash).
pub struct TestApp {
    /// The HTTP address.
    pub http_addr: std::net::SocketAddr,
    /// The gRPC address.
    pub grpc_addr: std::net::SocketAddr,
    /// The listener's counters.
    pub listener_stats: std::sync::Arc<dsreg::outbox::listener::ListenerStats>,
    shutdown: tokio_util::sync::CancellationToken,
    stop: Option<std::sync::mpsc::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<Option<anyhow::Result<()>>>>,
}

/// Settings for an in-process registry on `url`, on free ports, with fast timers.
pub fn test_settings(url: &str) -> dsreg::config::Settings {
    let mut settings = dsreg::config::Settings::for_database(url);
    settings.pool_size = 8;
    settings.backoff_base_ms = 20;
    settings.backoff_max_ms = 2_000;
    settings.stop_deadline_ms = 2_000;
    settings.auth.insecure_no_auth = true;
    settings
}

impl TestApp {
    /// Starts a registry on `url`; `configure` adjusts it before it runs.
    pub async fn spawn(
        url: &str,
        configure: impl FnOnce(&mut dsreg::app::App) + Send + 'static,
    ) -> Self {
        Self::spawn_with(test_settings(url), configure).await
    }

    /// Starts a registry with `settings`.
    pub async fn spawn_with(
        settings: dsreg::config::Settings,
        configure: impl FnOnce(&mut dsreg::app::App) + Send + 'static,
    ) -> Self {
        Self::try_spawn_with(settings, configure)
            .await
            .expect("the registry starts")
    }

    /// Starts a registry with `settings`, or returns why it could not start (say, its fixed
    /// port is still held by a registry that was just killed).
    pub async fn try_spawn_with(
        settings: dsreg::config::Settings,
        configure: impl FnOnce(&mut dsreg::app::App) + Send + 'static,
    ) -> anyhow::Result<Self> {
        init_test_log();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<bool>();
        let token = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("app runtime");
            let grace = settings.shutdown_grace();
            let url = settings.database_url.clone().expect("a database URL");
            let task = runtime.spawn(async move {
                let mut app = match dsreg::app::App::build(&settings, &url).await {
                    Ok(app) => app,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return Ok(());
                    }
                };
                configure(&mut app);
                let _ = ready_tx.send(Ok((
                    app.http_addr(),
                    app.grpc_addr(),
                    app.listener_stats.clone(),
                )));
                app.run(token, grace).await
            });
            // true: stop gracefully; false (or the test gone): crash.
            if stop_rx.recv().unwrap_or(false) {
                Some(runtime.block_on(task).expect("app task"))
            } else {
                runtime.shutdown_background();
                None
            }
        });
        let (http_addr, grpc_addr, listener_stats) =
            match ready_rx.await.expect("the app task reports its start") {
                Ok(ready) => ready,
                Err(e) => {
                    // The sender's drop ends the thread, which has nothing left to run.
                    drop(stop_tx);
                    tokio::task::spawn_blocking(move || thread.join().expect("app thread"))
                        .await
                        .unwrap();
                    return Err(e);
                }
            };
        // Notifications sent before the LISTEN would be lost to a test that waits for them.
        wait_for(
            "the registry's listener",
            Duration::from_secs(30),
            || async {
                listener_stats
                    .connected
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .then_some(())
            },
        )
        .await;
        Ok(Self {
            http_addr,
            grpc_addr,
            listener_stats,
            shutdown,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Stops gracefully (as on SIGTERM) and returns the run's result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let _ = self.stop.take().expect("running").send(true);
        let thread = self.thread.take().expect("running");
        tokio::task::spawn_blocking(move || thread.join().expect("app thread"))
            .await
            .unwrap()
            .expect("a graceful stop returns the run's result")
    }

    /// Waits (up to `timeout`) for the registry to end on its own, without asking it to stop,
    /// and returns the run's result.
    pub async fn finished(mut self, timeout: Duration) -> anyhow::Result<()> {
        let _ = self.stop.take().expect("running").send(true);
        let thread = self.thread.take().expect("running");
        let joined = tokio::time::timeout(
            timeout,
            tokio::task::spawn_blocking(move || thread.join().expect("app thread")),
        )
        .await;
        match joined {
            Ok(joined) => joined.unwrap().expect("the run's result"),
            Err(_) => {
                // Stop it so the test's database can be dropped, then fail.
                self.shutdown.cancel();
                panic!("the registry did not end on its own within {timeout:?}");
            }
        }
    }

    /// Kills the registry: every task dropped where it stands, nothing written on the way out.
    pub async fn crash(mut self) {
        let _ = self.stop.take().expect("running").send(false);
        let thread = self.thread.take().expect("running");
        tokio::task::spawn_blocking(move || thread.join().expect("app thread"))
            .await
            .unwrap();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(false);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl TestDb {
    /// Creates a datasource of `kind` named `name`.
    pub async fn datasource_of(&self, name: &str, kind: &str) -> Datasource {
        let ds = self.datasource(name).await;
        if kind != "generator" {
            self.client()
                .await
                .execute(
                    "UPDATE datasources SET kind = $2 WHERE id = $1",
                    &[&ds.id, &kind],
                )
                .await
                .unwrap();
        }
        ds
    }

    /// Adds a draft with `config`; returns its number.
    pub async fn version(&self, datasource: uuid::Uuid, config: serde_json::Value) -> i32 {
        let mut client = self.client().await;
        let tx = repo::begin(&mut client, &WriteContext::actor("test"))
            .await
            .unwrap();
        let v = versions::create_draft(&tx, datasource, &config, "")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        v.version
    }

    /// Publishes like any SQL client would: a plain UPDATE.
    pub async fn publish_sql(&self, datasource: uuid::Uuid, version: i32) {
        self.client()
            .await
            .execute(
                "UPDATE datasource_versions SET state = 'published' WHERE datasource_id = $1 AND version = $2",
                &[&datasource, &version],
            )
            .await
            .unwrap();
    }

    /// Sets a datasource's status with a plain UPDATE.
    pub async fn set_status(&self, datasource: uuid::Uuid, status: &str) {
        self.client()
            .await
            .execute(
                "UPDATE datasources SET status = $2 WHERE id = $1",
                &[&datasource, &status],
            )
            .await
            .unwrap();
    }

    /// The runtime state row.
    pub async fn state(&self, datasource: uuid::Uuid) -> dsreg::db::repository::state::State {
        dsreg::db::repository::state::get(&**self.client().await, datasource)
            .await
            .unwrap()
    }

    /// Waits until the state row satisfies `check`.
    pub async fn wait_for_state(
        &self,
        datasource: uuid::Uuid,
        what: &str,
        check: impl Fn(&dsreg::db::repository::state::State) -> bool,
    ) -> dsreg::db::repository::state::State {
        let last = std::sync::Mutex::new(None);
        let waited = tokio::time::timeout(
            Duration::from_secs(15),
            wait_for(what, Duration::from_secs(16), || async {
                let state = self.state(datasource).await;
                let done = check(&state);
                *last.lock().unwrap() = Some(state.clone());
                done.then_some(state)
            }),
        )
        .await;
        match waited {
            Ok(state) => state,
            Err(_) => panic!(
                "timed out waiting for {what}; last state: {:?}",
                last.lock().unwrap()
            ),
        }
    }

    /// Event types of a datasource, oldest first.
    pub async fn event_kinds(&self, datasource: uuid::Uuid) -> Vec<String> {
        self.events(datasource)
            .await
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    /// Events of a datasource, oldest first.
    pub async fn events(
        &self,
        datasource: uuid::Uuid,
    ) -> Vec<dsreg::db::repository::events::Event> {
        dsreg::db::repository::events::list(
            &**self.client().await,
            &dsreg::db::repository::events::EventFilter {
                datasource_id: Some(datasource),
                limit: 10_000,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .events
    }

    /// Records the sink wrote for a datasource and version.
    pub async fn records(&self, datasource: uuid::Uuid, version: i32) -> i64 {
        self.client()
            .await
            .query_one(
                "SELECT count(*) FROM datasource_records WHERE datasource_id = $1 AND version = $2",
                &[&datasource, &version],
            )
            .await
            .unwrap()
            .get(0)
    }
}

/// Puts a secret the way the API does, sealed under `master_keys`.
pub async fn put_secret(
    db: &TestDb,
    master_keys: &str,
    datasource: uuid::Uuid,
    name: &str,
    value: &str,
) {
    use dsreg::secrets::{EnvKeyProvider, SecretString, Secrets};
    let service = Secrets::new(std::sync::Arc::new(
        EnvKeyProvider::parse(master_keys, None).unwrap(),
    ));
    let mut client = db.client().await;
    let tx = repo::begin(&mut client, &WriteContext::actor("test"))
        .await
        .unwrap();
    service
        .put(
            &tx,
            datasource,
            name,
            &SecretString::new(value.to_owned()).unwrap(),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[path = "../support/cluster.rs"]
pub mod cluster;
#[path = "../support/otlp.rs"]
pub mod otlp;
#[path = "../support/serve_process.rs"]
mod serve_process;
pub use serve_process::ServeProcess;

/// Settings of a registry that verifies HS256 tokens signed with `secret`, of issuer `test`
/// for audience `dsreg`; the secret file lives in the returned folder.
pub fn hs256_settings(db: &TestDb, secret: &[u8]) -> (dsreg::config::Settings, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("hs256.secret");
    std::fs::write(&secret_file, secret).unwrap();
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let mut settings = test_settings(&db.url);
    settings.auth.insecure_no_auth = false;
    settings.auth.auth_hs256_secret_file = Some(secret_file);
    settings.auth.auth_issuer = Some("test".into());
    settings.auth.auth_audience = Some("dsreg".into());
    (settings, dir)
}

/// Sends raw protobuf bytes and reads raw bytes back, so any RPC can be called by path with
/// any body.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; bytes::Buf::remaining(src)];
        bytes::Buf::copy_to_slice(src, &mut out);
        Ok(Some(out))
    }
}

/// A fresh HTTP client for a test's own calls: its pooled connections belong to the test's
/// runtime, never to one an earlier test has already shut down (the registry's shared client
/// is per process, and each test has a runtime of its own).
pub fn http_client(timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(timeout).build()
}
