//! Wiring: opens the database (embedded or `DATABASE_URL`), migrates it, binds the ports and
//! runs the components under one shutdown token and one task tracker.
//!
//! Shutdown order: gRPC health NOT_SERVING and both servers stop accepting, the listener
//! stops → the supervisor stops reconciling and stops every worker (each within its stop
//! deadline) → the state writer writes their final states → the sink drains → tracker
//! drained (bounded by the grace period) → pool closed → the embedded cluster stopped, if
//! this process started it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::api::grpc::auth::{Authenticator, dev_credentials};
use crate::config::{Settings, SyncSettings};
use crate::connectors::Catalog;
use crate::connectors::sink::{Sink, Target};
use crate::connectors::webhook::Ingress;
use crate::db::{self, embedded};
use crate::files::{WatchConfig, Watcher};
use crate::outbox::listener::{Listener, ListenerConfig, ListenerStats};
use crate::secrets::{EnvKeyProvider, FileKeyProvider, KeyProvider, Secrets};
use crate::supervisor::backoff::BackoffPolicy;
use crate::supervisor::worker::{Started, WorkerEnv};
use crate::supervisor::writer::{StateWriter, Written};
use crate::supervisor::{Supervisor, SupervisorConfig};
use crate::telemetry::metrics::Metrics;

/// Reader tasks coalescing status reads. One: every read queued while its statement runs
/// joins the next, so 64 concurrent callers cost a few statements rather than 64 (measured:
/// two or four readers made smaller batches, more statements, and slower calls).
const STATUS_READERS: usize = 1;

/// The file in the data folder holding the embedded default's gRPC address, for the client.
pub const GRPC_ADDR_FILE: &str = "grpc.addr";

/// A database ready for the registry: its URL, and the embedded cluster when one was launched.
pub struct Database {
    /// The connection URL.
    pub url: String,
    /// The launched cluster, stopped when this is dropped (if this process started it).
    pub cluster: Option<embedded::EmbeddedCluster>,
}

impl Database {
    /// Uses `DATABASE_URL`, or launches (or reuses) the embedded cluster and makes sure its
    /// `dsreg` database exists.
    ///
    /// # Errors
    /// The cluster could not be launched, or the database could not be created.
    pub async fn open(settings: &Settings) -> anyhow::Result<Self> {
        if let Some(url) = &settings.database_url {
            return Ok(Self {
                url: url.clone(),
                cluster: None,
            });
        }
        let options = embedded::ClusterOptions {
            port: settings.pg_port,
            ..embedded::ClusterOptions::durable(settings.pg_data_dir())
        };
        let cluster =
            tokio::task::spawn_blocking(move || embedded::EmbeddedCluster::start(&options))
                .await
                .context("launcher task")??;
        db::create_database(&cluster.url("postgres"), embedded::DATABASE, None)
            .await
            .context("creating the dsreg database in the embedded cluster")?;
        Ok(Self {
            url: cluster.url(embedded::DATABASE),
            cluster: Some(cluster),
        })
    }

    /// Stops the embedded cluster if this process started it.
    pub async fn close(mut self) {
        if let Some(mut cluster) = self.cluster.take() {
            let stopped = tokio::task::spawn_blocking(move || cluster.stop()).await;
            if let Ok(Err(e)) = stopped {
                tracing::warn!(error = %e, "stopping the embedded PostgreSQL failed");
            }
        }
    }
}

/// Applies pending migrations on `url`; returns the schema version.
///
/// # Errors
/// Connection or migration failure.
pub async fn migrate(url: &str) -> anyhow::Result<i32> {
    let mut client = db::connect(url).await.context("connecting to migrate")?;
    let applied = db::migrations::migrate_up(&mut client).await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "migrations applied");
    }
    Ok(db::migrations::current_version(&client).await?)
}

/// A registry bound to its ports, ready to run. Its public fields may be adjusted before
/// [`App::run`] (tests register extra connector kinds and observers).
pub struct App {
    http: TcpListener,
    grpc: TcpListener,
    pool: Pool,
    schema_version: i32,
    instance_id: String,
    /// Where other instances and clients reach this one's gRPC API.
    advertise: String,
    /// The connector kinds workers can run.
    pub catalog: Catalog,
    /// Supervisor pacing.
    pub supervisor: SupervisorConfig,
    /// Restart pacing.
    pub backoff: BackoffPolicy,
    /// How long a stopping worker gets before it is aborted.
    pub stop_deadline: Duration,
    /// The LISTEN connection's settings.
    pub listener: ListenerConfig,
    /// The listener's counters.
    pub listener_stats: Arc<ListenerStats>,
    /// The metrics `/metrics` serves; it reads the pool and the listener's counters as they
    /// were at build.
    metrics: Metrics,
    /// Receives every worker start (benchmarks and tests).
    pub started: Option<mpsc::UnboundedSender<Started>>,
    /// Receives every written batch of worker states (benchmarks and tests).
    pub written: Option<mpsc::UnboundedSender<Written>>,
    /// Seals and opens secrets; `None` when no master key is configured.
    pub secrets: Option<Arc<Secrets>>,
    /// Where workers' records go.
    pub sink_target: Target,
    /// Limits of test runs' transforms.
    pub limits: crate::transform::Limits,
    /// Verifies gRPC callers' tokens.
    pub auth: Authenticator,
    /// What one caller may hold of the gRPC port.
    pub rpc_limits: api::grpc::limits::RpcLimits,
    /// Signs page tokens.
    page_key: api::grpc::page::PageKey,
    /// A folder of datasource files to keep the database in step with.
    pub file_sync: Option<WatchConfig>,
}

impl App {
    /// Migrates the database at `url` and binds the ports of `settings`.
    ///
    /// # Errors
    /// Migration, pool or bind failures.
    pub async fn build(settings: &Settings, url: &str) -> anyhow::Result<Self> {
        let secrets = secrets_service(settings)?;
        let auth = authenticator(settings)?;
        let schema_version = migrate(url).await?;
        let pool = db::pool(url, settings.pool_size, settings.pool_wait())?;
        let page_key = {
            let client = pool.get().await.context("connecting to the database")?;
            api::grpc::page::PageKey::load(&**client)
                .await
                .context("reading the page token key")?
        };
        let listener_stats = Arc::<ListenerStats>::default();
        let metrics = Metrics::new(pool.clone(), listener_stats.clone());
        let http = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("binding the HTTP port {}", settings.http_addr))?;
        let grpc = TcpListener::bind(settings.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC port {}", settings.grpc_addr))?;
        let advertise = match &settings.advertise_addr {
            Some(addr) => addr.clone(),
            None => format!("http://{}", grpc.local_addr()?),
        };
        Ok(Self {
            http,
            grpc,
            pool,
            schema_version,
            instance_id: settings
                .instance_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            advertise,
            catalog: Catalog::builtin(),
            supervisor: settings.supervisor(),
            backoff: settings.backoff(),
            stop_deadline: settings.stop_deadline(),
            listener: ListenerConfig::new(url),
            listener_stats,
            metrics,
            started: None,
            written: None,
            secrets,
            sink_target: settings.sink_target().map_err(anyhow::Error::msg)?,
            limits: settings.transform_limits(),
            rpc_limits: settings.rpc_limits(),
            page_key,
            auth,
            file_sync: None,
        })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// This process's instance id.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The pool the components share.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The metrics served at `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Runs until `shutdown` is cancelled, then stops in order within `grace`: servers and
    /// listener stop, the supervisor stops every worker, the state writer writes their final
    /// states, the sink drains.
    ///
    /// # Errors
    /// The listener's first connect failed, or a server failed.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) -> anyhow::Result<()> {
        let listener = Listener::connect(self.listener.clone(), self.listener_stats.clone())
            .await
            .context("connecting the LISTEN connection")?;
        let tracker = TaskTracker::new();
        let (mut writer, writer_handle) =
            StateWriter::new(self.pool.clone(), self.instance_id.clone());
        if let Some(written) = self.written {
            writer.observe(written);
        }
        writer.signal(self.listener_stats.activity.clone());
        writer.measure(self.metrics.clone());
        let grpc_catalog = self.catalog.clone();
        if let Some(config) = self.file_sync {
            let watcher = Watcher::new(
                self.pool.clone(),
                self.catalog.clone(),
                self.limits.clone(),
                config,
            );
            let stop = shutdown.child_token();
            tracker.spawn(async move {
                if let Err(e) = watcher.run(stop).await {
                    tracing::error!(error = %e, "the datasource file sync stopped");
                }
            });
        }
        let grpc_secrets = self.secrets.clone();
        let (sink, mut sink_writer) = Sink::new(
            self.pool.clone(),
            self.sink_target,
            self.instance_id.clone(),
        );
        sink_writer.measure(self.metrics.clone());
        let ingress = Ingress::default();
        let env = WorkerEnv {
            sink,
            writer: writer_handle,
            backoff: self.backoff,
            stop_deadline: self.stop_deadline,
            instance: self.instance_id.clone(),
            started: self.started,
            pool: self.pool.clone(),
            ingress: ingress.clone(),
        };
        let me = crate::db::repository::leases::InstanceInfo {
            id: self.instance_id.clone(),
            address: self.advertise.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let mut supervisor = Supervisor::new(
            self.pool.clone(),
            self.catalog,
            self.supervisor,
            env,
            tracker.clone(),
            self.secrets,
            me,
        );
        supervisor.measure(self.metrics.clone());
        writer.notify_for(supervisor.peers());
        let (signals, signals_rx) = mpsc::unbounded_channel();
        let sink_stop = CancellationToken::new();
        tracker.spawn(listener.run(signals, shutdown.child_token()));
        tracker.spawn(writer.run());
        tracker.spawn(sink_writer.run(sink_stop.clone()));
        {
            let shutdown = shutdown.child_token();
            // Workers write to the sink until they stop; the sink drains after them.
            tracker.spawn(async move {
                supervisor.run(signals_rx, shutdown).await;
                sink_stop.cancel();
            });
        }
        let readiness = api::ready::Readiness {
            pool: self.pool.clone(),
            listener: self.listener_stats.clone(),
        };
        let http_state = api::http::HttpState {
            pool: self.pool.clone(),
            ingress,
            metrics: self.metrics.clone(),
            readiness: readiness.clone(),
        };
        let http = tracker.spawn(api::http::serve(
            self.http,
            api::http::router(http_state),
            shutdown.child_token(),
        ));
        let grpc_ctx = Arc::new(api::grpc::Ctx {
            pool: self.pool.clone(),
            reads: api::grpc::reads::StatusReads::start(
                self.pool.clone(),
                STATUS_READERS,
                &tracker,
                shutdown.child_token(),
            ),
            catalog: grpc_catalog,
            secrets: grpc_secrets,
            limits: self.limits,
            activity: self.listener_stats.activity.clone(),
            listener_stats: self.listener_stats.clone(),
            instance_id: self.instance_id,
            schema_version: self.schema_version,
            shutdown: shutdown.child_token(),
            tracker: tracker.clone(),
            readiness,
            feed: api::grpc::feed::Feed::start(
                self.pool.clone(),
                self.listener_stats.activity.clone(),
                &tracker,
                shutdown.child_token(),
            ),
            streams: api::grpc::limits::StreamSlots::new(self.rpc_limits.streams_per_caller),
            rpc_limits: self.rpc_limits,
            auditor: api::grpc::auditor::Auditor::start(
                self.pool.clone(),
                &tracker,
                shutdown.child_token(),
            ),
            page_key: self.page_key,
        });
        let grpc = tracker.spawn(api::grpc::serve(
            self.grpc,
            grpc_ctx,
            self.auth,
            self.metrics,
            shutdown.child_token(),
        ));
        tracker.close();
        let served = tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            r = async { tokio::join!(http, grpc) } => {
                let (h, g) = r;
                h.context("HTTP task")
                    .and_then(|r| r.context("HTTP server"))
                    .and_then(|()| g.context("gRPC task"))
                    .and_then(|r| r.context("gRPC server"))
            }
        };
        shutdown.cancel();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                ?grace,
                "shutdown grace period elapsed with tasks still running"
            );
        }
        self.pool.close();
        served
    }
}

/// The secrets service for `settings`: keys from `--master-keys`, from `--master-key-file`,
/// or (embedded default only) from a development key file created on first run.
///
/// # Errors
/// The keys are malformed or the key file is unreadable or too open.
pub fn secrets_service(settings: &Settings) -> anyhow::Result<Option<Arc<Secrets>>> {
    let provider: Arc<dyn KeyProvider> = if let Some(keys) = &settings.master_keys {
        Arc::new(EnvKeyProvider::parse(keys, settings.active_key_version)?)
    } else if let Some(path) = &settings.master_key_file {
        Arc::new(FileKeyProvider::load(path)?)
    } else if settings.database_url.is_none() {
        let path = settings.dev_key_file();
        if FileKeyProvider::create_dev(&path)? {
            tracing::warn!(
                path = %path.display(),
                "created a development master key file; use DSREG_MASTER_KEYS or --master-key-file in production"
            );
        }
        Arc::new(FileKeyProvider::load(&path)?)
    } else {
        tracing::warn!(
            "no master key configured (DSREG_MASTER_KEYS or --master-key-file): secrets cannot be stored or opened"
        );
        return Ok(None);
    };
    Ok(Some(Arc::new(Secrets::new(provider))))
}

/// The gRPC authenticator for `settings`: the configured keys; with none, the embedded
/// default's development key and admin token (created on first run); with none and an
/// external database, a refusal to start unless `--insecure-no-auth` says so.
///
/// # Errors
/// Unusable key settings or files, or no keys for an external database.
pub fn authenticator(settings: &Settings) -> anyhow::Result<Authenticator> {
    let auth = &settings.auth;
    if auth.insecure_no_auth {
        tracing::warn!(
            "AUTHENTICATION IS OFF (--insecure-no-auth): every gRPC caller is an admin of every tenant; never run this way outside a laptop"
        );
        return Ok(Authenticator::insecure());
    }
    if auth.has_key_source() {
        return Ok(Authenticator::from_settings(auth)?);
    }
    if settings.database_url.is_some() {
        anyhow::bail!(
            "no token verification keys configured: give --auth-hs256-secret-file, --auth-public-key or \
             --auth-jwks-file (with --auth-issuer and --auth-audience), or --insecure-no-auth for a local trial"
        );
    }
    let dev = dev_credentials(&settings.dev_auth_dir())?;
    if dev.created || dev.token_issued {
        tracing::warn!(
            token = %dev.token_file.display(),
            key = %dev.secret_file.display(),
            "created a development signing key and an admin token; `dsreg` commands use the token from this folder; configure --auth-* keys in production"
        );
    }
    Ok(dev.authenticator)
}

/// `dsreg serve`: open the database, build, run until SIGINT/SIGTERM; with a sync folder,
/// keep the database in step with its datasource files too.
///
/// # Errors
/// Start-up failures, with context.
pub async fn serve(settings: Settings, sync: SyncSettings) -> anyhow::Result<()> {
    let file_sync = sync.watch().map_err(anyhow::Error::msg)?;
    if let Some(config) = &file_sync
        && !config.dir.is_dir()
    {
        anyhow::bail!("--sync-dir {}: not a folder", config.dir.display());
    }
    let database = Database::open(&settings).await?;
    let result = async {
        let mut app = App::build(&settings, &database.url).await?;
        app.file_sync = file_sync;
        let where_db = match &database.cluster {
            Some(c) => format!("embedded PostgreSQL in {} on port {}", c.data_dir().display(), c.port()),
            None => "DATABASE_URL".to_owned(),
        };
        tracing::info!(http = %app.http_addr(), grpc = %app.grpc_addr(), database = %where_db, "dsreg serving");
        if database.cluster.is_some() {
            // Where the command-line client finds the embedded default's server.
            let path = settings.data_dir.join(GRPC_ADDR_FILE);
            if let Err(e) = std::fs::write(&path, format!("http://{}\n", app.grpc_addr())) {
                tracing::warn!(path = %path.display(), error = %e, "cannot record the gRPC address for the client");
            }
        }
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested");
            signals.cancel();
        });
        app.run(shutdown, settings.shutdown_grace()).await
    }
    .await;
    database.close().await;
    result
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the service");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
