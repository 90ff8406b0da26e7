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
