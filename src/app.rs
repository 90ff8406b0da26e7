//! Wiring: opens the database (embedded or `DATABASE_URL`), migrates it, binds the ports and
//! runs the components under one shutdown token and one task tracker.
//!
//! Shutdown order: gRPC health NOT_SERVING and both servers stop accepting, the listener
//! stops → the supervisor stops reconciling and stops every worker (each within its stop
//! deadline) → the state writer writes their final states → the sink drains → tracker
//! drained (bounded by the grace period) → pools closed → the embedded cluster stopped, if
//! this process owns it (started it, or adopted one a killed process left running).
//!
//! The supervisor is supervised: its task ending before shutdown (a panic) makes readiness
//! fail with the reason, and the run then stops everything and returns that error, so the
//! process exits non-zero. The control plane (leases, heartbeats, state writes) has a pool of
//! its own ([`CONTROL_POOL_SIZE`]) that worker I/O cannot take; the health checks (readiness,
//! the notification self-test, the outbox pressure watch) have one more
//! ([`PROBE_POOL_SIZE`]), so a control plane busy starting thousands of workers is not
//! reported as a database that does not answer. The health checks and the LISTEN connection
//! also run on a thread of their own, as the lease renewer does ([`crate::own_thread`]): a
//! shared runtime kept busy by workers delays neither.

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
use crate::api::tls::{ALPN_H2, ALPN_HTTP1, ServerTls, TlsFiles};
use crate::backoff::BackoffPolicy;
use crate::config::{Settings, SyncSettings};
use crate::connectors::Catalog;
use crate::connectors::sink::{ShutdownDrain, Sink, Target, WriterOptions};
use crate::connectors::webhook::Ingress;
use crate::db::{self, embedded};
use crate::files::http::{Poller, SourceHealth};
use crate::files::{WatchConfig, Watcher};
use crate::outbox::listener::{Listener, ListenerConfig, ListenerStats};
use crate::secrets::{
    EnvKeyProvider, ExecKeyProvider, FileKeyProvider, KeyProvider, SecretString, Secrets,
    VaultKeyProvider, VaultSettings, kms,
};
use crate::supervisor::elector::Elector;
use crate::supervisor::lease::PeerPresence;
use crate::supervisor::worker::{Started, WorkerEnv};
use crate::supervisor::writer::{StateWriter, Written};
use crate::supervisor::{Supervisor, SupervisorConfig, SupervisorParts};
use crate::telemetry::metrics::Metrics;

/// An instance's metrics: the registry, reading the database pool's usage, the LISTEN
/// connection's counters and the HTTP definition sources' states at each scrape.
pub fn metrics(pool: &Pool, listener: &Arc<ListenerStats>, sources: &Arc<SourceHealth>) -> Metrics {
    Metrics::new(vec![
        Box::new(crate::db::metrics::PoolMetrics(pool.clone())),
        Box::new(crate::outbox::metrics::ListenerMetrics(Arc::clone(
            listener,
        ))),
        Box::new(Arc::clone(sources)),
    ])
}

/// Reader tasks coalescing status reads: every read queued while a statement runs joins the
/// next, so 64 concurrent callers cost a few statements rather than 64. Two, so a big batch
/// (a group of idle `WatchStatus` streams re-reading) never holds a lone caller's read behind
/// it (measured: a bystander's p99 beside 2,000 idle streams 1.72× its idle p99 with one
/// reader, 1.33–1.45× with two; 64 streams' throughput the same within the noise).
const STATUS_READERS: usize = 2;

/// Connections of the control plane's own pool: lease claims, the state writer, the
/// readiness probe and heartbeats never wait behind worker I/O for one (beside the main pool
/// and the lease renewer's own connection, so the registry opens this many plus one more
/// connections than `--pool-size`).
pub const CONTROL_POOL_SIZE: usize = 4;

/// Connections of the health checks' pool: readiness, the notification self-test and the
/// outbox pressure watch, each a short statement at a time.
pub const PROBE_POOL_SIZE: usize = 2;

/// The file in the data folder holding the embedded default's gRPC address, for the client.
pub const GRPC_ADDR_FILE: &str = "grpc.addr";

/// A database ready for the registry: its URL, and the embedded cluster when one was launched.
pub struct Database {
    /// The connection URL.
    pub url: String,
    /// The launched cluster, stopped when this is dropped (if this process owns it).
    pub cluster: Option<embedded::EmbeddedCluster>,
}

impl Database {
    /// Uses `DATABASE_URL`, or launches (or reuses) the embedded cluster and makes sure its
    /// `dsreg` database exists. A cluster another process owns (a running `dsreg serve`) is
    /// reused and left running.
    ///
    /// # Errors
    /// The cluster could not be launched, or the database could not be created.
    pub async fn open(settings: &Settings) -> anyhow::Result<Self> {
        Self::open_with(settings, false).await
    }

    /// [`Self::open`] for `dsreg serve`, the embedded cluster's one owner: refused, naming
    /// the running owner's pid, when another process owns the data folder.
    ///
    /// # Errors
    /// As [`Self::open`].
    pub async fn open_owned(settings: &Settings) -> anyhow::Result<Self> {
        Self::open_with(settings, true).await
    }

    async fn open_with(settings: &Settings, exclusive: bool) -> anyhow::Result<Self> {
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
        let cluster = tokio::task::spawn_blocking(move || {
            if exclusive {
                embedded::EmbeddedCluster::start_exclusive(&options)
            } else {
                embedded::EmbeddedCluster::start(&options)
            }
        })
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

    /// Stops the embedded cluster if this process owns it.
    pub async fn close(mut self) {
        if let Some(mut cluster) = self.cluster.take() {
            let stopped = tokio::task::spawn_blocking(move || cluster.stop()).await;
            if let Ok(Err(e)) = stopped {
                tracing::warn!(error = %e, "stopping the embedded PostgreSQL failed");
            }
        }
    }
}

/// Applies pending migrations on `url` with the default connection bounds; returns the
/// schema version.
///
/// # Errors
/// Connection or migration failure.
pub async fn migrate(url: &str) -> anyhow::Result<i32> {
    migrate_with(url, &db::ConnectOptions::default()).await
}

/// [`migrate`] with `bounds`, except that no `statement_timeout` is set: a migration may
/// rewrite a large table.
///
/// # Errors
/// Connection or migration failure.
pub async fn migrate_with(url: &str, bounds: &db::ConnectOptions) -> anyhow::Result<i32> {
    let mut client = db::connect_with(url, &bounds.without_statement_timeout())
        .await
        .context("connecting to migrate")?;
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
    /// The HTTP port's TLS; plaintext when `None`.
    http_tls: Option<Arc<ServerTls>>,
    /// The gRPC port's TLS; plaintext when `None`.
    grpc_tls: Option<Arc<ServerTls>>,
    pool: Pool,
    /// The control plane's pool ([`CONTROL_POOL_SIZE`]).
    control: Pool,
    /// The health checks' pool ([`PROBE_POOL_SIZE`]).
    probe: Pool,
    /// The lease renewer's connection, used only on the renewer's own thread (one more
    /// connection than the two pools).
    renewal: Pool,
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
    /// How long a stopped or silent instance's row is kept; older ones go at start.
    pub dead_instance_retention: Duration,
    /// How old a transaction holding the outbox horizon may grow before the log names it.
    pub horizon_warn_after: Duration,
    /// The LISTEN connection's settings.
    pub listener: ListenerConfig,
    /// The listener's counters.
    pub listener_stats: Arc<ListenerStats>,
    /// The notification path's self-test and the outbox poll standing in for it.
    pub notification_check: crate::outbox::selftest::SelfTestConfig,
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
    /// The dead-letter retention.
    pub dead_letter_retention: crate::db::retention::Retention,
    /// How long a worker may fail before its datasource is disabled (`None`: never).
    pub give_up_after: Option<Duration>,
    /// Limits of test runs' transforms.
    pub limits: crate::transform::Limits,
    /// The test runs allowed at once.
    pub harness_slots: crate::harness::Slots,
    /// Verifies gRPC callers' tokens.
    pub auth: Authenticator,
    /// What one caller may hold of the gRPC port.
    pub rpc_limits: api::grpc::limits::RpcLimits,
    /// Signs page tokens.
    page_key: api::grpc::page::PageKey,
    /// A folder of datasource files to keep the database in step with.
    pub file_sync: Option<WatchConfig>,
    /// HTTP sources of datasource definitions to poll into the database.
    pub http_sync: Vec<Poller>,
    /// How the HTTP definition sources are doing (for `/metrics` and `/readyz`).
    pub sync_sources: Arc<SourceHealth>,
}

impl App {
    /// Migrates the database at `url` and binds the ports of `settings`.
    ///
    /// # Errors
    /// Migration, pool or bind failures.
    pub async fn build(settings: &Settings, url: &str) -> anyhow::Result<Self> {
        // The one HTTP client (its root store read from disk) is built here, on a blocking
        // thread, before any worker, sink or key provider asks for it.
        crate::connectors::http::prepare().await;
        let secrets = secrets_service(settings).await?;
        let auth = authenticator(settings)?;
        let grpc_tls = server_tls(settings.grpc_tls(), ALPN_H2).await?;
        let http_tls = server_tls(settings.http_tls(), ALPN_HTTP1).await?;
        let bounds = settings.connect_options();
        let schema_version = migrate_with(url, &bounds).await?;
        let pool = db::pool_with(url, &bounds, settings.pool_size, settings.pool_wait())?;
        if let Some(secrets) = &secrets {
            check_keys(secrets, &pool, settings.skip_key_check).await?;
        }
        let control = db::pool_with(url, &bounds, CONTROL_POOL_SIZE, settings.pool_wait())?;
        let probe = db::pool_with(url, &bounds, PROBE_POOL_SIZE, settings.pool_wait())?;
        let instance_id = settings
            .instance_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        // Named after the instance, so the others see in `pg_stat_activity` whether it lives.
        let renewal = db::pool_named(
            url,
            &bounds,
            1,
            settings.pool_wait(),
            &crate::db::repository::state::renewer_application_name(&instance_id),
        )?;
        let page_key = {
            let client = pool.get().await.context("connecting to the database")?;
            api::grpc::page::PageKey::load(&**client)
                .await
                .context("reading the page token key")?
        };
        let listener_stats = Arc::<ListenerStats>::default();
        let sync_sources = Arc::<SourceHealth>::default();
        let metrics = metrics(&pool, &listener_stats, &sync_sources);
        let http = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("binding the HTTP port {}", settings.http_addr))?;
        let grpc = TcpListener::bind(settings.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC port {}", settings.grpc_addr))?;
        let advertise = match &settings.advertise_addr {
            Some(addr) => addr.clone(),
            None => grpc_url(grpc.local_addr()?, grpc_tls.is_some()),
        };
        Ok(Self {
            http,
            grpc,
            http_tls,
            grpc_tls,
            pool,
            control,
            probe,
            renewal,
            schema_version,
            instance_id,
            advertise,
            catalog: Catalog::builtin(),
            supervisor: settings.supervisor(),
            backoff: settings.backoff(),
            stop_deadline: settings.stop_deadline(),
            dead_instance_retention: settings.dead_instance_retention(),
            listener: ListenerConfig {
                connect: bounds,
                ..ListenerConfig::new(settings.listen_url(url))
            },
            horizon_warn_after: Duration::from_millis(settings.outbox_horizon_warn_after_ms),
            listener_stats,
            notification_check: settings.notification_check(),
            metrics,
            started: None,
            written: None,
            secrets,
            sink_target: settings.sink_target().map_err(anyhow::Error::msg)?,
            dead_letter_retention: settings.dead_letter_retention(),
            give_up_after: settings.give_up_after(),
            limits: settings.transform_limits(),
            harness_slots: crate::harness::Slots::new(
                usize::try_from(settings.harness_max_concurrent_runs).unwrap_or(usize::MAX),
                settings.harness_cpu_percent,
            ),
            rpc_limits: settings.rpc_limits(),
            page_key,
            auth,
            file_sync: None,
            http_sync: Vec::new(),
            sync_sources,
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

    /// The gRPC port's URL: `https://` when it speaks TLS, `http://` otherwise.
    pub fn grpc_url(&self) -> String {
        grpc_url(self.grpc_addr(), self.grpc_tls.is_some())
    }

    /// Whether the gRPC port speaks TLS.
    pub fn grpc_is_tls(&self) -> bool {
        self.grpc_tls.is_some()
    }

    /// Whether the HTTP port speaks TLS.
    pub fn http_is_tls(&self) -> bool {
        self.http_tls.is_some()
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
        let (signals, signals_rx) = mpsc::unbounded_channel();
        let pressure = crate::outbox::pressure::PressureWatch::new(
            self.probe.clone(),
            self.horizon_warn_after,
            Some(self.metrics.clone()),
        );
        let pressure_state = pressure.state();
        let health = HealthChecks {
            listener: self.listener.clone(),
            stats: self.listener_stats.clone(),
            probe: self.probe.clone(),
            notification_check: self.notification_check,
            pressure,
        }
        .start(signals, shutdown.child_token())
        .await?;
        let tracker = TaskTracker::new();
        tracker.spawn(prune_dead_instances_every(
            self.control.clone(),
            self.dead_instance_retention,
            shutdown.child_token(),
        ));
        let me = crate::db::repository::leases::InstanceInfo {
            id: self.instance_id.clone(),
            address: self.advertise.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        // Set by the elector's looks at the instances; read by the state writer, which
        // NOTIFYs its batches only while another instance may listen.
        let peers = PeerPresence::default();
        let (elector, elector_handle) = Elector::new(
            me,
            self.supervisor.leases.clone(),
            self.control.clone(),
            self.renewal.clone(),
            Some(self.metrics.clone()),
            peers.clone(),
        );
        let (writer, writer_handle) = StateWriter::new(
            self.control.clone(),
            self.supervisor.prepared,
            self.instance_id.clone(),
            Some(self.listener_stats.activity.clone()),
            Some(self.metrics.clone()),
            peers.clone(),
            self.written,
        );
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
        for mut poller in self.http_sync {
            poller.report_health(self.sync_sources.clone());
            tracker.spawn(poller.run(shutdown.child_token()));
        }
        let grpc_secrets = self.secrets.clone();
        if let Some(after) = self.give_up_after {
            let policy = crate::supervisor::give_up::GiveUp::new(
                self.pool.clone(),
                self.instance_id.clone(),
                after,
            )
            .with_metrics(self.metrics.clone());
            tracker.spawn(policy.run(shutdown.child_token()));
        }
        tracker.spawn(self.dead_letter_retention.run(
            self.pool.clone(),
            self.metrics.clone(),
            shutdown.child_token(),
        ));
        let sink_target = self.sink_target.clone();
        let (sink, sink_writer) = Sink::new(
            self.pool.clone(),
            self.sink_target,
            self.instance_id.clone(),
            Some(self.metrics.clone()),
            WriterOptions {
                drain: Some(ShutdownDrain {
                    shutdown: shutdown.clone(),
                    grace,
                }),
                ..WriterOptions::default()
            },
        );
        let sink_status = sink.status();
        let ingress = Ingress::default();
        let env = WorkerEnv {
            sink,
            writer: writer_handle,
            backoff: self.backoff,
            stop_deadline: self.stop_deadline,
            instance: self.instance_id.clone(),
            started: self.started,
            // Half the pool at most for cursors: reconciles, the sink and the API keep the rest.
            pool: crate::connectors::CursorDb::new(
                self.pool.clone(),
                self.pool.status().max_size / 2,
            ),
            ingress: ingress.clone(),
        };
        let supervisor = Supervisor::new(
            SupervisorParts {
                pool: self.pool.clone(),
                control: self.control.clone(),
                catalog: self.catalog,
                env,
                tracker: tracker.clone(),
                secrets: self.secrets,
                metrics: Some(self.metrics.clone()),
                elector: elector_handle,
            },
            self.supervisor,
        );
        let sink_stop = CancellationToken::new();
        tracker.spawn(writer.run());
        tracker.spawn(sink_writer.run(sink_stop.clone()));
        let fatal = Arc::new(api::ready::Fatal::default());
        // The supervisor is supervised: its task ending before shutdown (a panic in it) makes
        // the process unready and then end with an error, for the orchestrator to restart it.
        // Its leases are no longer renewed and its workers are aborted as it unwinds.
        // The elector keeps renewing through the supervisor's stop, until it signs off; a
        // supervisor that ends without signing off leaves it to stop renewing.
        tracker.spawn(elector.run(shutdown.child_token()));
        let supervisor_ended = {
            let supervisor_task = tracker.spawn(supervisor.run(signals_rx, shutdown.child_token()));
            let (fatal, shutdown) = (fatal.clone(), shutdown.clone());
            tracker.spawn(async move {
                let ended = supervisor_task.await;
                // Workers write to the sink until they stop; the sink drains after them.
                sink_stop.cancel();
                if shutdown.is_cancelled() && ended.is_ok() {
                    return None;
                }
                let reason = match ended {
                    Err(e) if e.is_panic() => format!(
                        "the supervisor stopped: it panicked ({})",
                        crate::connectors::contain::message_of(&*e.into_panic())
                    ),
                    Err(e) => format!("the supervisor stopped: {e}"),
                    Ok(()) => "the supervisor stopped unexpectedly".to_owned(),
                };
                tracing::error!(
                    reason = %reason,
                    "not ready: no worker can be started or stopped any more; leases are no longer renewed and the process exits"
                );
                fatal.set(reason.clone());
                Some(reason)
            })
        };
        let readiness = api::ready::Readiness {
            pool: self.probe.clone(),
            listener: self.listener_stats.clone(),
            sink: sink_status,
            gauge: self.metrics.ready(),
            fatal,
            pressure: pressure_state,
            sources: self.sync_sources.clone(),
            probe_runtime: Some(health.handle.clone()),
        };
        let http_state = api::http::HttpState {
            pool: self.pool.clone(),
            ingress,
            metrics: self.metrics.clone(),
            readiness: readiness.clone(),
        };
        let http = tracker.spawn(api::http::serve(
            self.http,
            self.http_tls,
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
            harness_slots: self.harness_slots,
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
            metrics: self.metrics.clone(),
            sink_target,
        });
        let grpc = tracker.spawn(api::grpc::serve(
            self.grpc,
            self.grpc_tls,
            grpc_ctx,
            self.auth,
            self.metrics,
            shutdown.child_token(),
        ));
        tracker.close();
        let served = tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            Ok(Some(reason)) = supervisor_ended => Err(anyhow::anyhow!(reason)),
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
        // The health checks stopped with the shutdown token; their thread ends with them.
        if tokio::time::timeout(grace, health.stopped).await.is_err() {
            tracing::warn!(
                ?grace,
                "the health checks' thread had not stopped after the grace period"
            );
        }
        self.pool.close();
        self.control.close();
        self.probe.close();
        self.renewal.close();
        served
    }
}

/// `https://addr` for a TLS port, `http://addr` for a plaintext one.
fn grpc_url(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{addr}")
}

/// A port's TLS from its files (read on a blocking thread), or `None` for plaintext.
///
/// # Errors
/// Inconsistent options, or files that do not load.
async fn server_tls(
    files: Result<Option<TlsFiles>, String>,
    alpn: &'static [u8],
) -> anyhow::Result<Option<Arc<ServerTls>>> {
    let Some(files) = files.map_err(anyhow::Error::msg)? else {
        return Ok(None);
    };
    let option = files.option;
    let tls = tokio::task::spawn_blocking(move || ServerTls::load(files, &[alpn]))
        .await
        .context("TLS loader task")?
        .with_context(|| format!("loading the {option}-* files"))?;
    Ok(Some(tls))
}

/// The secrets service for `settings`: keys from `--master-keys`, `--master-key-file`, a key
/// command (`--master-key-command`) or Vault (`--vault-addr`), one of them; or (embedded
/// default only) from a development key file created on first run.
///
/// # Errors
/// More than one key source; malformed keys; an unreadable or too open key file; a key
/// command or Vault that fails at start.
pub async fn secrets_service(settings: &Settings) -> anyhow::Result<Option<Arc<Secrets>>> {
    let sources = [
        settings.master_keys.is_some(),
        settings.master_key_file.is_some(),
        settings.master_key_command.is_some(),
        settings.vault_addr.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() > 1 {
        anyhow::bail!(
            "give one master key source: DSREG_MASTER_KEYS, --master-key-file, \
             --master-key-command or --vault-addr"
        );
    }
    let provider: Arc<dyn KeyProvider> = if let Some(keys) = &settings.master_keys {
        Arc::new(EnvKeyProvider::parse(keys, settings.active_key_version)?)
    } else if let Some(path) = &settings.master_key_file {
        Arc::new(FileKeyProvider::load(path)?)
    } else if let Some(command) = &settings.master_key_command {
        let argv: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
        Arc::new(ExecKeyProvider::load(&argv, kms::DEFAULT_TIMEOUT).await?)
    } else if let Some(addr) = &settings.vault_addr {
        let client = crate::connectors::http::client().map_err(|e| {
            let addr = crate::telemetry::redact::redact_url(addr);
            anyhow::anyhow!("the HTTP client for Vault at {addr}: {e}")
        })?;
        Arc::new(VaultKeyProvider::load(&vault_settings(settings, addr)?, client).await?)
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
            "no master key configured (DSREG_MASTER_KEYS, --master-key-file, --master-key-command or --vault-addr): secrets cannot be stored or opened"
        );
        return Ok(None);
    };
    Ok(Some(Arc::new(Secrets::new(provider))))
}

fn vault_settings(settings: &Settings, addr: &str) -> anyhow::Result<VaultSettings> {
    let token_file = settings
        .vault_token_file
        .as_ref()
        .context("--vault-addr needs --vault-token-file (DSREG_VAULT_TOKEN_FILE)")?;
    let wrapped_keys = settings
        .vault_wrapped_keys
        .clone()
        .context("--vault-addr needs --vault-wrapped-keys (DSREG_VAULT_WRAPPED_KEYS)")?;
    let token = zeroize::Zeroizing::new(
        std::fs::read_to_string(token_file)
            .with_context(|| format!("reading the Vault token file {}", token_file.display()))?,
    );
    Ok(VaultSettings {
        addr: addr.to_owned(),
        token: SecretString::new(token.trim().to_owned())?,
        mount: settings.vault_transit_mount.clone(),
        key_name: settings.vault_transit_key.clone(),
        wrapped_keys,
        timeout: kms::DEFAULT_TIMEOUT,
    })
}

/// The start-up key check: every key version some row uses is loaded and opens a sample row
/// of its own. Fails closed (naming the version, datasource and secret, never a key) unless
/// `skip` says to start anyway, which is logged.
///
/// # Errors
/// A key that does not open its rows, or a database failure.
pub async fn check_keys(secrets: &Secrets, pool: &Pool, skip: bool) -> anyhow::Result<()> {
    let client = pool
        .get()
        .await
        .context("connecting to check the master keys")?;
    match secrets.check(&**client).await {
        Ok(()) => Ok(()),
        Err(e) if skip => {
            tracing::warn!(error = %e, "the master keys do not open the stored secrets; starting anyway (--skip-key-check): the datasources whose secrets do not open will fail");
            Ok(())
        }
        Err(e @ crate::secrets::Error::Db(_)) => {
            Err(anyhow::Error::new(e).context("checking the master keys"))
        }
        Err(e) => anyhow::bail!(
            "the master keys do not open the stored secrets: {e}. Fix DSREG_MASTER_KEYS or the \
             key file, or start anyway with --skip-key-check (DSREG_SKIP_KEY_CHECK=true)"
        ),
    }
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
            "no token verification keys configured: give --auth-hs256-secret-file, --auth-public-key, \
             --auth-jwks-file or --auth-jwks-url (with --auth-issuer and --auth-audience), or \
             --auth-oidc-issuer (with --auth-audience), or --insecure-no-auth for a local trial"
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

/// What watches the database's health on a thread of its own ([`crate::own_thread`]): the
/// LISTEN connection, the notification self-test and the outbox pressure watch, with the
/// health checks' pool (readiness probes run there too). Thousands of workers starting on
/// the shared runtime then delay neither a notification nor a probe's answer.
struct HealthChecks {
    listener: ListenerConfig,
    stats: Arc<ListenerStats>,
    probe: Pool,
    notification_check: crate::outbox::selftest::SelfTestConfig,
    pressure: crate::outbox::pressure::PressureWatch,
}

impl HealthChecks {
    /// Connects the LISTEN connection and starts the checks, which forward to `signals` until
    /// `stop`; returns once the first connect is done.
    ///
    /// # Errors
    /// The thread could not start or the first connect failed.
    async fn start(
        self,
        signals: mpsc::UnboundedSender<crate::outbox::listener::Signal>,
        stop: CancellationToken,
    ) -> anyhow::Result<crate::own_thread::OwnThread> {
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        let thread = crate::own_thread::spawn("dsreg-health", async move {
            let listener = match Listener::connect(self.listener, self.stats.clone()).await {
                Ok(listener) => {
                    let _ = connected_tx.send(Ok(()));
                    listener
                }
                Err(e) => {
                    let _ = connected_tx.send(Err(e));
                    return;
                }
            };
            let selftest = crate::outbox::selftest::SelfTest::new(
                self.probe,
                self.stats,
                self.notification_check,
            );
            tokio::join!(
                selftest.run(signals.clone(), stop.clone()),
                listener.run(signals, stop.clone()),
                self.pressure.run(stop),
            );
        })
        .context("starting the health checks' thread")?;
        connected
            .await
            .context("the health checks' thread stopped before connecting")?
            .context("connecting the LISTEN connection")?;
        Ok(thread)
    }
}

/// Prunes dead instances' rows at start, then every `retention` (at most an hour apart), until
/// `stop`: a registry that runs for months does not keep a row per instance that ever ran.
async fn prune_dead_instances_every(pool: Pool, retention: Duration, stop: CancellationToken) {
    let every = retention.clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        prune_dead_instances(&pool, retention).await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Deletes the rows of instances dead for longer than `retention`, so `dsreg_instances` does
/// not grow by a row per start. A failure is logged: the rows wait for the next round.
async fn prune_dead_instances(pool: &Pool, retention: Duration) {
    let pruned = match pool.get().await {
        Ok(client) => db::repository::leases::prune_dead(&**client, retention).await,
        Err(e) => Err(e.into()),
    };
    match pruned {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            pruned = n,
            retention_secs = retention.as_secs(),
            "deleted the rows of instances dead for longer than the retention"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "pruning dead instances failed; the next round retries")
        }
    }
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
    let http_sync = sync.http_sources().map_err(anyhow::Error::msg)?;
    let database = Database::open_owned(&settings).await?;
    let result = async {
        let mut app = App::build(&settings, &database.url).await?;
        app.file_sync = file_sync;
        for config in http_sync {
            let (pool, catalog, limits) = (app.pool.clone(), app.catalog.clone(), app.limits.clone());
            app.http_sync.push(Poller::new(pool, catalog, limits, config)?);
        }
        let where_db = match &database.cluster {
            Some(c) => format!("embedded PostgreSQL in {} on port {}", c.data_dir().display(), c.port()),
            None => "DATABASE_URL".to_owned(),
        };
        tracing::info!(
            http = %app.http_addr(),
            http_tls = app.http_is_tls(),
            grpc = %app.grpc_addr(),
            grpc_tls = app.grpc_is_tls(),
            database = %where_db,
            "dsreg serving"
        );
        if database.cluster.is_some() {
            // Where the command-line client finds the embedded default's server.
            let path = settings.data_dir.join(GRPC_ADDR_FILE);
            if let Err(e) = std::fs::write(&path, format!("{}\n", app.grpc_url())) {
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use uuid::Uuid;

    use super::*;
    use crate::connectors::Health;
    use crate::telemetry::metrics::{Identity, NAMES};

    /// `# TYPE` of every family in a scrape, with its `# HELP`.
    fn families(text: &str) -> BTreeMap<String, (String, String)> {
        let mut help = HashMap::new();
        let mut out = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, text) = rest.split_once(' ').unwrap();
                help.insert(name.to_owned(), text.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                let help = help.get(name).cloned().unwrap_or_default();
                out.insert(name.to_owned(), (kind.to_owned(), help));
            }
        }
        out
    }

    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
    }

    #[test]
    fn an_instance_serves_every_listed_family_with_its_type_and_a_sentence_of_help() {
        let pool = crate::db::pool(
            "postgres://localhost/unused",
            4,
            std::time::Duration::from_secs(1),
        )
        .expect("a pool is built without connecting");
        let m = metrics(&pool, &Arc::default(), &Arc::default());
        let id = Uuid::new_v4();
        let health = Health::default();
        health.set_running(true);
        health.records(3);
        m.worker_started(id, "generator", Arc::new(health));
        m.worker_identity(
            id,
            Identity {
                org: "acme".into(),
                project: "shop".into(),
                name: "orders".into(),
                version: 7,
            },
        );
        m.rpc_handled(
            "/dsreg.v1.Registry/GetInfo",
            "OK",
            std::time::Duration::from_millis(2),
        );
        // A labelled family is written once it has a series.
        m.reconcile_pass(true, std::time::Duration::from_millis(5));
        m.dead_letters_counted(vec![(Uuid::new_v4(), 2)], 1);
        let text = m.encode().unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");

        let found = families(&text);
        let served: Vec<(&str, &str)> = found
            .iter()
            .map(|(name, (kind, _))| (name.as_str(), kind.as_str()))
            .collect();
        let listed: BTreeMap<String, &str> = NAMES
            .iter()
            .map(|f| (f.family(), f.kind.as_str()))
            .collect();
        let listed: Vec<(&str, &str)> = listed.iter().map(|(n, k)| (n.as_str(), *k)).collect();
        let unlisted: Vec<_> = served.iter().filter(|f| !listed.contains(f)).collect();
        let missing: Vec<_> = listed.iter().filter(|f| !served.contains(f)).collect();
        assert!(
            unlisted.is_empty() && missing.is_empty(),
            "served but not in NAMES: {unlisted:?}; in NAMES but not served: {missing:?}"
        );
        assert_eq!(listed.len(), NAMES.len(), "a family is listed twice");
        for (name, (_, help)) in &found {
            assert!(
                help.len() > 10 && help.ends_with('.') && !help.ends_with(".."),
                "{name}: help {help:?}"
            );
            if name.ends_with("_seconds") {
                assert!(text.contains(&format!("# UNIT {name} seconds\n")), "{name}");
            }
        }

        let labels = format!("{{datasource=\"{id}\",kind=\"generator\"}}");
        assert_eq!(
            sample(&text, &format!("dsreg_datasource_records_total{labels}")),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, &format!("dsreg_datasource_restarts_total{labels}")),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    "dsreg_datasource_worker_state{{datasource=\"{id}\",kind=\"generator\",state=\"starting\"}}"
                )
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    "dsreg_datasource_info{{datasource=\"{id}\",org=\"acme\",project=\"shop\",name=\"orders\",kind=\"generator\",version=\"7\"}}"
                )
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "dsreg_grpc_requests_total{method=\"/dsreg.v1.Registry/GetInfo\",code=\"OK\"}"
            ),
            Some(1.0)
        );
        assert_eq!(sample(&text, "dsreg_db_pool_max_connections"), Some(4.0));

        m.worker_stopped(id);
        let text = m.encode().unwrap();
        assert!(!text.contains(&id.to_string()), "{text}");
        assert!(text.contains("# TYPE dsreg_datasource_records counter\n"));
        assert!(text.contains("# TYPE dsreg_datasource_info gauge\n"));
    }
}
