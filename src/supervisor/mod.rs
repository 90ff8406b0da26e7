//! The supervisor: brings this instance's workers to the state the tables describe.
//!
//! Level-triggered, edge-woken: a [`Signal`] only says "look"; [`Supervisor::run`] then reads
//! the outbox after its cursor and the desired state of the datasources concerned, and
//! starts, hot-reloads or stops workers until they match. Running it twice changes nothing.
//! A periodic full resync and a catch-up after every listener reconnect repair whatever a
//! lost notification missed.
//!
//! It owns the worker map (one task, no locks); worker tasks own their connector runs;
//! the state writer owns every write to `datasource_state`. Operations from the API
//! ([`ops`]) only write the tables and let the owning instance apply them.
//!
//! Stopping: when its token is cancelled it stops reconciling, cancels every worker (each
//! gets the stop deadline, then is aborted), waits for them, and returns; the state writer
//! then drains the final transitions.

pub mod backoff;
pub mod ops;
pub mod worker;
pub mod writer;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::connectors::{Catalog, Health, SecretMap};
use crate::db::Error;
use crate::db::repository::events::NewEvent;
use crate::db::repository::state::{self, Desired, Heartbeat, Transition};
use crate::domain::{DatasourceStatus, DesiredState, WorkerStatus};
use crate::outbox::OutboxReader;
use crate::outbox::listener::Signal;
use crate::secrets::Secrets as SecretsService;
use crate::telemetry::metrics::Metrics;
use crate::transform::{Limits, Transform};
use worker::{Spec, WorkerEnv};

/// A completed reconcile pass, reported to observers (benchmarks, metrics).
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// A full resync (true) or a targeted reconcile.
    pub full: bool,
    /// Datasources looked at.
    pub datasources: usize,
    /// How long the pass took.
    pub took: Duration,
}

/// How the supervisor paces itself.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Full resync period.
    pub resync_interval: Duration,
    /// Heartbeat (and stall check) period.
    pub heartbeat_interval: Duration,
    /// Delay before a failed reconcile is retried as a full resync.
    pub retry_delay: Duration,
    /// Receives every completed pass.
    pub passes: Option<mpsc::UnboundedSender<Pass>>,
    /// Limits every transform runs under.
    pub limits: Limits,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            retry_delay: Duration::from_secs(1),
            passes: None,
            limits: Limits::default(),
        }
    }
}

/// What makes a running worker current: its version, restart generation and secrets
/// generation.
type SpecKey = (i32, i64, i64);

struct Worker {
    key: SpecKey,
    /// A newer spec that failed validation (reported once, old worker kept).
    rejected: Option<SpecKey>,
    spec: watch::Sender<Arc<Spec>>,
    cancel: CancellationToken,
    join: JoinHandle<()>,
    health: Health,
    stall_after: Option<Duration>,
    stalled: bool,
}

/// The span of a reconcile of `datasources` caused by writers in `traces`: a child of the
/// writer's span when there is one trace (publish → reconcile → worker restart is one trace),
/// linked to each when a batch serves several.
fn reconcile_span(datasources: usize, traces: &[String]) -> tracing::Span {
    let span = tracing::info_span!("reconcile", datasources, trace_id = tracing::field::Empty);
    let mut distinct: Vec<&str> = traces.iter().map(String::as_str).collect();
    distinct.sort_unstable();
    distinct.dedup();
    match distinct.as_slice() {
        [] => {}
        [one] => crate::telemetry::continue_trace(&span, one),
        many => crate::telemetry::link_traces(&span, many.iter().copied()),
    }
    span
}

/// Reconciles this instance's workers with the tables.
pub struct Supervisor {
    pool: Pool,
    catalog: Catalog,
    config: SupervisorConfig,
    env: WorkerEnv,
    tracker: TaskTracker,
    workers: HashMap<Uuid, Worker>,
    /// Workers cancelled but perhaps not finished; a new worker of the same datasource waits.
    stopping: HashMap<Uuid, JoinHandle<()>>,
    /// Published specs that failed validation with no worker running (reported once).
    failed: HashMap<Uuid, SpecKey>,
    reader: Option<OutboxReader>,
    /// Opens the workers' secrets; `None` when no master key is configured.
    secrets: Option<Arc<SecretsService>>,
    metrics: Option<Metrics>,
}

impl Supervisor {
    /// A supervisor; workers are spawned on `tracker`.
    pub fn new(
        pool: Pool,
        catalog: Catalog,
        config: SupervisorConfig,
        env: WorkerEnv,
        tracker: TaskTracker,
        secrets: Option<Arc<SecretsService>>,
    ) -> Self {
        Self {
            secrets,
            pool,
            catalog,
            config,
            env,
            tracker,
            workers: HashMap::new(),
            stopping: HashMap::new(),
            failed: HashMap::new(),
            reader: None,
            metrics: None,
        }
    }

    /// Reports workers, reloads, outbox reads and passes to `metrics`.
    pub fn measure(&mut self, metrics: Metrics) {
        self.metrics = Some(metrics);
    }

    fn metered(&self, record: impl FnOnce(&Metrics)) {
        if let Some(metrics) = &self.metrics {
            record(metrics);
        }
    }

    /// Reconciles on every signal, every resync period, and heartbeats, until `shutdown`;
    /// then stops every worker.
    pub async fn run(
        mut self,
        mut signals: mpsc::UnboundedReceiver<Signal>,
        shutdown: CancellationToken,
    ) {
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
        let mut retry_at = match self.resync().await {
            Ok(()) => far(),
            Err(e) => {
                tracing::warn!(error = %e, "initial resync failed; retrying");
                Instant::now() + self.config.retry_delay
            }
        };
        self.metered(Metrics::settle_reloads);
        let mut resync = tokio::time::interval_at(
            Instant::now() + self.config.resync_interval,
            self.config.resync_interval,
        );
        let mut heartbeat = tokio::time::interval_at(
            Instant::now() + self.config.heartbeat_interval,
            self.config.heartbeat_interval,
        );
        for timer in [&mut resync, &mut heartbeat] {
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            let result = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(signal) = signals.recv() => {
                    let mut batch = vec![signal];
                    while let Ok(s) = signals.try_recv() {
                        batch.push(s);
                    }
                    self.on_signals(batch).await
                }
                () = tokio::time::sleep_until(retry_at) => {
                    retry_at = far();
                    self.resync().await
                }
                _ = resync.tick() => self.resync().await,
                _ = heartbeat.tick() => self.heartbeat().await,
            };
            self.metered(Metrics::settle_reloads);
            if let Err(e) = result {
                tracing::warn!(error = %e, "reconcile failed; a full resync follows");
                retry_at = Instant::now() + self.config.retry_delay;
            }
        }
        self.stop_all().await;
    }

    async fn on_signals(&mut self, batch: Vec<Signal>) -> Result<(), Error> {
        if batch.contains(&Signal::Reconnected) {
            return self.resync().await;
        }
        let mut hinted: HashSet<Uuid> = HashSet::new();
        let mut traces: Vec<String> = Vec::new();
        for signal in batch {
            match signal {
                Signal::Hint(Some(id)) => {
                    hinted.insert(id);
                }
                Signal::Traced(id, trace) => {
                    hinted.insert(id);
                    traces.push(trace);
                }
                Signal::Hint(None) | Signal::Reconnected => {}
            }
        }
        // The payload names the datasource: look at it first, then at the outbox for the
        // rest (bulk publishes, events whose notification was folded).
        if !hinted.is_empty() {
            let ids: Vec<Uuid> = hinted.iter().copied().collect();
            let span = reconcile_span(ids.len(), &traces);
            self.reconcile(&ids).instrument(span).await?;
        }
        let (events, everything) = self.read_outbox().await?;
        if everything {
            return self.resync().await;
        }
        let rest: Vec<Uuid> = events
            .keys()
            .filter(|id| !hinted.contains(id))
            .copied()
            .collect();
        if !rest.is_empty() {
            let traces: Vec<String> = rest
                .iter()
                .filter_map(|id| events.get(id).cloned().flatten())
                .collect();
            let span = reconcile_span(rest.len(), &traces);
            self.reconcile(&rest).instrument(span).await?;
        }
        Ok(())
    }

    /// Reads new waking events; returns the datasources they name, each with the trace
    /// context of its latest traced event, and whether one asked for a full resync.
    async fn read_outbox(&mut self) -> Result<(HashMap<Uuid, Option<String>>, bool), Error> {
        let client = self.pool.get().await?;
        let reader = match &mut self.reader {
            Some(reader) => reader,
            None => self
                .reader
                .insert(OutboxReader::from_now(&**client).await?.wakes_only()),
        };
        let events = reader.read(&**client).await?;
        self.metered(|m| m.outbox_read(&events, chrono::Utc::now()));
        let everything = events.iter().any(|e| e.datasource_id.is_none());
        let mut named: HashMap<Uuid, Option<String>> = HashMap::new();
        for event in events {
            if let Some(id) = event.datasource_id {
                let trace = named.entry(id).or_default();
                if event.traceparent.is_some() {
                    *trace = event.traceparent;
                }
            }
        }
        Ok((named, everything))
    }

    /// A full pass: every live datasource, and every worker the tables no longer want.
    #[tracing::instrument(name = "resync", skip_all)]
    async fn resync(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        // Move the outbox cursor first: whatever it returns is covered by this pass.
        self.read_outbox().await?;
        let rows = {
            let client = self.pool.get().await?;
            state::desired(&**client, None, false).await?
        };
        let live: HashSet<Uuid> = rows.iter().map(|r| r.datasource_id).collect();
        let gone: Vec<Uuid> = self
            .workers
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.stop_worker(id);
        }
        self.failed.retain(|id, _| live.contains(id));
        self.apply(rows, true).await?;
        self.report(true, live.len(), started);
        Ok(())
    }

    fn report(&self, full: bool, datasources: usize, started: Instant) {
        let took = started.elapsed();
        self.metered(|m| m.reconcile_pass(full, took));
        if let Some(passes) = &self.config.passes {
            let _ = passes.send(Pass {
                full,
                datasources,
                took,
            });
        }
    }

    /// Reconciles the given datasources (with their configs, in one query).
    async fn reconcile(&mut self, ids: &[Uuid]) -> Result<(), Error> {
        let started = Instant::now();
        let rows = {
            let client = self.pool.get().await?;
            state::desired(&**client, Some(ids), true).await?
        };
        self.apply(rows, false).await?;
        self.report(false, ids.len(), started);
        Ok(())
    }

    async fn apply(&mut self, rows: Vec<Desired>, fetch_configs: bool) -> Result<(), Error> {
        let mut need_config = Vec::new();
        let mut to_build = Vec::new();
        for row in rows {
            let id = row.datasource_id;
            let wanted = (row.status == DatasourceStatus::Active
                && row.desired == DesiredState::Running)
                .then_some(row.version)
                .flatten()
                .map(|v| (v, row.restart_generation, row.secrets_generation));
            let Some(key) = wanted else {
                self.failed.remove(&id);
                if self.workers.contains_key(&id) {
                    self.stop_worker(id);
                } else if !matches!(
                    row.worker_status,
                    WorkerStatus::Init | WorkerStatus::Stopped
                ) {
                    // Left behind by a process that did not stop cleanly.
                    self.env.writer.send(stale_stopped(id, row.version));
                }
                continue;
            };
            let current = match self.workers.get(&id) {
                Some(w) => w.key == key || w.rejected == Some(key),
                None => self.failed.get(&id) == Some(&key),
            };
            if current {
                continue;
            }
            match row.config {
                None if fetch_configs => need_config.push(id),
                _ => to_build.push((row, key)),
            }
        }
        let mut secrets = self.open_secrets(&to_build).await;
        for (row, key) in to_build {
            let opened = secrets.remove(&row.datasource_id);
            self.converge(row, key, opened);
        }
        if !need_config.is_empty() {
            Box::pin(self.reconcile(&need_config)).await?;
        }
        Ok(())
    }

    /// Opens the secrets of the datasources whose configs need some, in one query.
    async fn open_secrets(
        &self,
        rows: &[(Desired, SpecKey)],
    ) -> HashMap<Uuid, Result<SecretMap, String>> {
        let needing: Vec<Uuid> = rows
            .iter()
            .filter(|(row, _)| {
                let connector = self.catalog.get(&row.kind);
                let config = row.config.as_ref();
                matches!((connector, config), (Some(c), Some(config)) if !c.required_secrets(config).is_empty())
            })
            .map(|(row, _)| row.datasource_id)
            .collect();
        if needing.is_empty() {
            return HashMap::new();
        }
        let Some(service) = &self.secrets else {
            return needing
                .into_iter()
                .map(|id| (id, Err("no secrets key is configured".to_owned())))
                .collect();
        };
        let client = match self.pool.get().await {
            Ok(client) => client,
            Err(e) => {
                let reason = format!("secrets unavailable: {e}");
                return needing
                    .into_iter()
                    .map(|id| (id, Err(reason.clone())))
                    .collect();
            }
        };
        let mut opened = HashMap::with_capacity(needing.len());
        for id in needing {
            let result = service.open_all(&**client, id).await;
            opened.insert(id, result.map(Arc::new).map_err(|e| e.to_string()));
        }
        opened
    }

    /// Starts, or hot-reloads, a datasource whose tables want `key`: the new spec is built
    /// and validated first; an invalid one never touches a running worker.
    fn converge(&mut self, row: Desired, key: SpecKey, secrets: Option<Result<SecretMap, String>>) {
        let id = row.datasource_id;
        match self.build(&row, key, secrets) {
            Ok(spec) => {
                let stall_after = spec.connector.stall_after(&spec.config);
                self.metered(|m| m.reload_ordered(id, key.0));
                if let Some(worker) = self.workers.get_mut(&id) {
                    worker.key = key;
                    worker.rejected = None;
                    worker.stall_after = stall_after;
                    worker.stalled = false;
                    worker.spec.send_replace(Arc::new(spec));
                } else {
                    self.start_worker(spec, key, stall_after);
                }
            }
            Err((code, reason)) => {
                tracing::info!(datasource_id = %id, version = key.0, code, reason, "published version refused");
                if let Some(worker) = self.workers.get_mut(&id) {
                    worker.rejected = Some(key);
                    self.env.writer.send(Transition {
                        datasource_id: id,
                        status: None,
                        running_version: None,
                        error: Some(Some(("reload_rejected".into(), reason.clone()))),
                        restart_count: None,
                        event: Some(NewEvent {
                            at: None,
                            datasource_id: Some(id),
                            kind: "reload_rejected".into(),
                            version: Some(key.0),
                            payload: json!({ "code": code, "reason": reason, "running_version": worker.key.0 }),
                        }),
                    });
                } else {
                    self.failed.insert(id, key);
                    self.env.writer.send(Transition {
                        datasource_id: id,
                        status: Some(WorkerStatus::Error),
                        running_version: None,
                        error: Some(Some((code.into(), reason.clone()))),
                        restart_count: None,
                        event: Some(NewEvent {
                            at: None,
                            datasource_id: Some(id),
                            kind: "worker_error".into(),
                            version: Some(key.0),
                            payload: json!({ "code": code, "message": reason }),
                        }),
                    });
                }
            }
        }
    }

    /// Builds a worker spec from the tables, or says why it cannot run.
    fn build(
        &self,
        row: &Desired,
        key: SpecKey,
        secrets: Option<Result<SecretMap, String>>,
    ) -> Result<Spec, (&'static str, String)> {
        let connector = self
            .catalog
            .get(&row.kind)
            .ok_or_else(|| {
                (
                    "unknown_kind",
                    format!("unknown connector kind {:?}", row.kind),
                )
            })?
            .clone();
        let config = row
            .config
            .clone()
            .ok_or_else(|| ("invalid_config", format!("version {} has no config", key.0)))?;
        connector
            .validate(&config)
            .map_err(|e| ("invalid_config", e.to_string()))?;
        let transform = Transform::from_config(&config, &self.config.limits)
            .map_err(|e| ("invalid_transform", e.to_string()))?;
        let secrets = secrets
            .unwrap_or_else(|| Ok(SecretMap::default()))
            .map_err(|e| ("secret_unavailable", e))?;
        if let Some(missing) = connector
            .required_secrets(&config)
            .into_iter()
            .find(|name| !secrets.contains_key(name))
        {
            return Err(("secret_missing", format!("secret {missing:?} is missing")));
        }
        Ok(Spec {
            datasource_id: row.datasource_id,
            version: key.0,
            generation: key.1,
            config: Arc::new(config),
            connector,
            transform,
            secrets,
            trace: tracing_opentelemetry::OpenTelemetrySpanExt::context(&tracing::Span::current()),
        })
    }

    fn start_worker(&mut self, spec: Spec, key: SpecKey, stall_after: Option<Duration>) {
        let id = spec.datasource_id;
        let kind = spec.connector.info().name;
        let (tx, rx) = watch::channel(Arc::new(spec));
        let cancel = CancellationToken::new();
        let health = Health::default();
        self.metered(|m| m.worker_started(id, kind, health.clone()));
        let previous = self.stopping.remove(&id);
        let join = self.tracker.spawn(worker::run(
            rx,
            previous,
            self.env.clone(),
            health.clone(),
            cancel.clone(),
        ));
        self.failed.remove(&id);
        self.workers.insert(
            id,
            Worker {
                key,
                rejected: None,
                spec: tx,
                cancel,
                join,
                health,
                stall_after,
                stalled: false,
            },
        );
    }

    fn stop_worker(&mut self, id: Uuid) {
        if let Some(worker) = self.workers.remove(&id) {
            self.metered(|m| m.worker_stopped(id));
            worker.cancel.cancel();
            self.stopping.insert(id, worker.join);
        }
    }

    /// One statement of heartbeats for every worker, and stall detection.
    async fn heartbeat(&mut self) -> Result<(), Error> {
        self.stopping.retain(|_, join| !join.is_finished());
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut beats = Vec::with_capacity(self.workers.len());
        for (id, worker) in &mut self.workers {
            let progress_ms = worker.health.last_progress_ms();
            let running_since = worker.health.running_since_ms();
            beats.push(Heartbeat {
                datasource_id: *id,
                last_progress_at: chrono::DateTime::from_timestamp_millis(progress_ms)
                    .filter(|_| progress_ms > 0),
                metrics: json!({
                    "records_total": worker.health.records_total(),
                    "errors_total": worker.health.errors_total(),
                    "dead_lettered_total": worker.health.dead_lettered_total(),
                }),
            });
            let (Some(limit), true) = (worker.stall_after, running_since > 0) else {
                continue;
            };
            let idle = Duration::from_millis(
                now_ms.saturating_sub(progress_ms.max(running_since)).max(0) as u64,
            );
            if idle > limit && !worker.stalled {
                worker.stalled = true;
                self.env
                    .writer
                    .send(stall_transition(*id, worker.key.0, true, idle));
            } else if idle <= limit && worker.stalled {
                worker.stalled = false;
                self.env
                    .writer
                    .send(stall_transition(*id, worker.key.0, false, idle));
            }
        }
        let client = self.pool.get().await?;
        state::heartbeat(&**client, &beats).await
    }

    async fn stop_all(mut self) {
        let ids: Vec<Uuid> = self.workers.keys().copied().collect();
        for id in ids {
            self.stop_worker(id);
        }
        for (_, join) in self.stopping.drain() {
            // Each worker bounds its own stop by the deadline, then aborts its run.
            let _ = join.await;
        }
    }
}

fn stale_stopped(id: Uuid, version: Option<i32>) -> Transition {
    Transition {
        datasource_id: id,
        status: Some(WorkerStatus::Stopped),
        running_version: None,
        error: None,
        restart_count: None,
        event: Some(NewEvent {
            at: None,
            datasource_id: Some(id),
            kind: "worker_stopped".into(),
            version,
            payload: json!({ "reason": "not running on this instance" }),
        }),
    }
}

fn stall_transition(id: Uuid, version: i32, stalled: bool, idle: Duration) -> Transition {
    let (status, kind) = if stalled {
        (WorkerStatus::Stalled, "worker_stalled")
    } else {
        (WorkerStatus::Running, "worker_running")
    };
    worker::transition(
        id,
        status,
        version,
        kind,
        json!({ "idle_ms": idle.as_millis() as u64, "recovered": !stalled }),
    )
}
