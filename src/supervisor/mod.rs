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
//! It runs only the workers of datasources whose lease this instance holds. The leases are
//! the [`elector`]'s: the supervisor follows what it publishes (starts the workers of leases
//! claimed, stops those of leases lost or being given up, and tells it when a drained worker
//! has stopped), and asks it to claim what a reconcile finds unheld.
//!
//! Stopping: when its token is cancelled it stops reconciling, cancels every worker (each
//! gets the stop deadline, then is aborted), waits for them, writes their final states,
//! has the elector release its leases, and returns.

pub mod elector;
pub mod give_up;
pub mod lease;
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

use crate::connectors::contain::{Panicked, contain};
use crate::connectors::{Catalog, Health, SecretMap};
use crate::db::Error;
use crate::db::repository::events::NewEvent;
use crate::db::repository::leases::Claimed;
use crate::db::repository::state::{self, Desired, DesiredFor, Heartbeat, Transition};
use crate::db::repository::typed::Pooled;
use crate::domain::{DatasourceStatus, DesiredState, WorkerStatus};
use crate::outbox::OutboxReader;
use crate::outbox::listener::Signal;
use crate::secrets::Secrets as SecretsService;
use crate::telemetry::metrics::{EventRead, Identity, Metrics};
use crate::transform::{Limits, Transform};
use elector::{ElectorHandle, Leases};
use lease::{LeaseConfig, LeaseDeadline};
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
    /// Datasources a full resync reads and applies per step: signals that arrive meanwhile
    /// are handled between steps, so a resync of 10,000 never holds up a publish for long.
    pub resync_page: usize,
    /// Heartbeat (and stall check) period.
    pub heartbeat_interval: Duration,
    /// Delay before a failed reconcile is retried as a full resync.
    pub retry_delay: Duration,
    /// Receives every completed pass.
    pub passes: Option<mpsc::UnboundedSender<Pass>>,
    /// Limits every transform runs under.
    pub limits: Limits,
    /// Lease pacing (the elector's).
    pub leases: LeaseConfig,
    /// Fault injection for tests of the supervision path: when this fires, the supervisor's
    /// task panics, as a bug in it would. `None` in production.
    pub fault: Option<CancellationToken>,
    /// Whether the pool's connections are sessions whose statements may be prepared by name
    /// ([`crate::db::repository::typed::Pooled`]).
    pub prepared: bool,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(30),
            resync_page: 1_000,
            heartbeat_interval: Duration::from_secs(10),
            retry_delay: Duration::from_secs(1),
            passes: None,
            limits: Limits::default(),
            leases: LeaseConfig::default(),
            fault: None,
            prepared: false,
        }
    }
}

/// Cancels every worker when dropped (through the lease deadline's guard), so a supervisor
/// task that ends (a panic unwinding through it included) leaves nothing running without it.
struct AbortWorkersOnDrop(Arc<LeaseDeadline>);

impl Drop for AbortWorkersOnDrop {
    fn drop(&mut self) {
        self.0.guard().cancel();
    }
}

/// What makes a running worker current: a worker built from the same key needs no reload,
/// and one whose key differs from what the tables want is hot-reloaded or stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SpecKey {
    /// The published version it runs.
    version: i32,
    /// Bumped by every restart request: a new one restarts the worker.
    restart_generation: i64,
    /// Bumped by every put or delete of one of its secrets: a new one reopens them.
    secrets_generation: i64,
    /// The fencing epoch of this instance's lease on the datasource.
    epoch: i64,
}

/// A version's compiled transform, or the refusal (code, reason) it earns.
type Compiled = Result<Transform, (&'static str, String)>;

/// Scripts at least this long compile on the blocking pool, several at once, rather than in
/// the reconcile loop on the runtime: a big script takes milliseconds of CPU, and a thousand
/// of them would hold the loop (and the runtime thread under it) for seconds. Shorter ones
/// compile in microseconds, less than the hand-off would cost.
const COMPILE_INLINE_BYTES: usize = 4 * 1024;

/// Compiles the transform of `config`, contained: a panic is this version's refusal.
fn compile(config: &serde_json::Value, limits: &Limits) -> Compiled {
    contain("transform", || Transform::from_config(config, limits))
        .map_err(|e: Panicked| ("connector_panicked", e.to_string()))?
        .map_err(|e| ("invalid_transform", e.to_string()))
}

fn script_len(config: Option<&serde_json::Value>) -> usize {
    config
        .and_then(|c| c.get("transform"))
        .and_then(serde_json::Value::as_str)
        .map_or(0, str::len)
}

/// A worker cancelled but perhaps not finished.
struct Stopping {
    join: JoinHandle<()>,
    /// Cancelled when its task has ended.
    done: CancellationToken,
}

/// A worker this supervisor started and has not stopped.
struct Worker {
    key: SpecKey,
    /// Cancelled when its task has ended.
    done: CancellationToken,
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

/// What a supervisor works with, given at construction.
pub struct SupervisorParts {
    /// Reconciles, outbox reads and secrets.
    pub pool: Pool,
    /// The control plane's connections (heartbeats): a small pool of its own, which worker
    /// I/O cannot take.
    pub control: Pool,
    /// The connector kinds workers are built from.
    pub catalog: Catalog,
    /// What every worker shares: the sink, the state writer, backoff and stop deadline.
    pub env: WorkerEnv,
    /// Where workers and heartbeat writes are spawned.
    pub tracker: TaskTracker,
    /// Opens the workers' secrets; `None` when no master key is configured.
    pub secrets: Option<Arc<SecretsService>>,
    /// Receives workers, reloads, outbox reads and passes.
    pub metrics: Option<Metrics>,
    /// The lease elector: what this instance holds, and where claims and releases go.
    pub elector: ElectorHandle,
}

/// Reconciles this instance's workers with the tables.
pub struct Supervisor {
    pool: Pool,
    /// The control plane's connections (heartbeats), which worker I/O cannot take.
    control: Pool,
    catalog: Catalog,
    config: SupervisorConfig,
    env: WorkerEnv,
    tracker: TaskTracker,
    workers: HashMap<Uuid, Worker>,
    /// Workers cancelled but perhaps not finished; a new worker of the same datasource waits.
    stopping: HashMap<Uuid, Stopping>,
    /// Published specs that failed validation with no worker running (reported once).
    failed: HashMap<Uuid, SpecKey>,
    reader: Option<OutboxReader>,
    /// Opens the workers' secrets; `None` when no master key is configured.
    secrets: Option<Arc<SecretsService>>,
    metrics: Option<Metrics>,
    elector: ElectorHandle,
    /// The elector's leases as last followed: the workers run on these.
    leases: Leases,
    /// The heartbeat write in progress, if one is.
    heartbeats: Option<JoinHandle<()>>,
    /// The full pass under way, if one is.
    pass: Option<FullPass>,
    /// Events reconciled through their notifications since the last outbox read.
    handled: HashSet<i64>,
    /// When the outbox is read next for what the notifications did not name.
    catch_up_at: Option<Instant>,
}

/// How long after a reconcile woken by notifications the outbox is read for anything they
/// did not name: the read is off the reloads' path, and one read serves every batch of
/// notifications in between. (A lost notification costs this long plus the periodic resync
/// at most; a burst folded into one notification is read at once.)
const CATCH_UP_DELAY: Duration = Duration::from_millis(20);

/// A full resync under way.
struct FullPass {
    /// The last id of the last page applied; `None` before the first.
    after: Option<Uuid>,
    /// When it started.
    started: Instant,
    /// Datasources looked at so far.
    datasources: usize,
}

/// Heartbeats written per statement: each statement locks its rows of `datasource_state` only
/// until it commits, so a state write for one of them waits a few milliseconds at most, and
/// 10,000 workers cost one statement a second at the default period.
const HEARTBEATS_PER_STATEMENT: usize = 1_000;
/// The share of the heartbeat period a heartbeat write is spread over: its statements are
/// spaced out, so thousands of rows are never written in one burst that the publishes and
/// state writes of the moment queue behind.
const HEARTBEAT_SPREAD: u32 = 4;

impl Supervisor {
    /// A supervisor of this instance's workers; they are spawned on `parts.tracker`.
    pub fn new(parts: SupervisorParts, config: SupervisorConfig) -> Self {
        let SupervisorParts {
            pool,
            control,
            catalog,
            env,
            tracker,
            secrets,
            metrics,
            elector,
        } = parts;
        Self {
            elector,
            leases: Leases::default(),
            secrets,
            control,
            pool,
            catalog,
            config,
            env,
            tracker,
            workers: HashMap::new(),
            stopping: HashMap::new(),
            failed: HashMap::new(),
            reader: None,
            metrics,
            heartbeats: None,
            pass: None,
            handled: HashSet::new(),
            catch_up_at: None,
        }
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
        // However this task ends (a panic included), its workers stop; the elector, left
        // without it, stops renewing, and another instance can take over once the leases lapse.
        let _abort_workers = AbortWorkersOnDrop(self.elector.deadline().clone());
        let fault = self.config.fault.clone().unwrap_or_default();
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
        // The elector answers once it may take leases (a namesake waited out) and has.
        let first = match self.balance().await {
            Ok(()) => self.resync().await,
            Err(e) => Err(e),
        };
        let mut retry_at = match first {
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
                () = fault.cancelled(), if self.config.fault.is_some() => {
                    panic!("fault injected into the supervisor")
                }
                changed = self.elector.leases().changed() => match changed {
                    Ok(()) => self.follow_leases().await,
                    Err(_) => {
                        // Its renewer could not start, or it panicked: no lease can be held.
                        // End, and let the process exit non-zero as for any other end of the
                        // supervisor.
                        tracing::error!("the lease elector stopped");
                        break;
                    }
                },
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
                () = tokio::time::sleep_until(self.catch_up_at.unwrap_or_else(far)), if self.catch_up_at.is_some() => {
                    self.catch_up().await
                }
                _ = resync.tick() => match self.balance().await {
                    Ok(()) => self.resync().await,
                    Err(e) => Err(e),
                },
                _ = heartbeat.tick() => self.heartbeat().await,
                // Last: every signal that has arrived goes first.
                () = std::future::ready(()), if self.pass.is_some() => self.resync_page().await,
            };
            self.metered(Metrics::settle_reloads);
            if let Err(e) = result {
                tracing::warn!(error = %e, "reconcile failed; a full resync follows");
                retry_at = Instant::now() + self.config.retry_delay;
            }
        }
        self.stop_all().await;
    }

    /// Has the elector claim those of `ids` that are this instance's to take and free; each
    /// claim's owner and epoch go to the datasource's state, and its lease is followed from
    /// now on.
    async fn claim(&mut self, ids: Vec<Uuid>) -> Result<Vec<Claimed>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let claimed = self.elector.claim(ids).await?;
        for c in &claimed {
            self.leases.held.insert(c.datasource_id, c.epoch);
            self.env.writer.send(owned_under(c.datasource_id, c.epoch));
        }
        Ok(claimed)
    }

    /// Balances the leases (the elector claims what is assigned here and free and starts
    /// giving up what is not), then follows what it published.
    async fn balance(&mut self) -> Result<(), Error> {
        self.elector.balance().await?;
        self.follow_leases().await
    }

    /// Brings the workers in line with the leases the elector publishes: the workers of leases
    /// lost (or claimed again under a new epoch) and of leases being given up stop; leases
    /// claimed or taken up, and those kept after all, are reconciled, with the events that
    /// asked for them (a publish of a datasource just claimed), as a resync reads them. Once
    /// the worker of a lease being given up has stopped and its last records and state are
    /// written, the elector is told it can release the lease.
    async fn follow_leases(&mut self) -> Result<(), Error> {
        let now = self.elector.leases().borrow_and_update().clone();
        if now.ran_out != self.leases.ran_out {
            // Every worker was cancelled through the deadline's guard when the leases ran
            // out, whatever was claimed again since.
            self.failed.clear();
            let ids: Vec<Uuid> = self.workers.keys().copied().collect();
            for id in ids {
                self.stop_worker(id);
            }
            self.leases.held.clear();
            self.leases.draining.clear();
        }
        let gone: Vec<Uuid> = self
            .leases
            .held
            .iter()
            .filter(|(id, epoch)| now.held.get(id) != Some(epoch))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.failed.remove(&id);
            self.stop_worker(id);
        }
        let mut wake: Vec<Uuid> = Vec::new();
        for (id, epoch) in &now.held {
            if self.leases.held.get(id) != Some(epoch) {
                self.env.writer.send(owned_under(*id, *epoch));
                if !now.draining.contains_key(id) {
                    wake.push(*id);
                }
            } else if self.leases.draining.contains_key(id) && !now.draining.contains_key(id) {
                wake.push(*id);
            }
        }
        let mut drained: Vec<(Uuid, u64)> = Vec::new();
        for (id, number) in &now.draining {
            if self.leases.draining.get(id) != Some(number) {
                self.failed.remove(id);
                self.stop_worker(*id);
                drained.push((*id, *number));
            }
        }
        self.leases = Leases::clone(&now);
        self.release_when_stopped(drained);
        if wake.is_empty() {
            return Ok(());
        }
        let (events, everything) = self.read_outbox().await?;
        if everything {
            return self.resync().await;
        }
        wake.extend(
            events
                .keys()
                .filter(|id| !wake.contains(id))
                .copied()
                .collect::<Vec<_>>(),
        );
        self.reconcile(&wake).await
    }

    /// Once the workers of `drained` have stopped and their last records and states are
    /// written, tells the elector their leases can go.
    fn release_when_stopped(&self, drained: Vec<(Uuid, u64)>) {
        if drained.is_empty() {
            return;
        }
        let stopped: Vec<CancellationToken> = drained
            .iter()
            .filter_map(|(id, _)| self.stopping.get(id).map(|s| s.done.clone()))
            .collect();
        let sink = self.env.sink.clone();
        let writer = self.env.writer.clone();
        let releaser = self.elector.releaser();
        self.tracker.spawn(async move {
            for done in stopped {
                done.cancelled().await;
            }
            sink.flushed().await;
            writer.flushed().await;
            releaser.release(drained);
        });
    }

    /// Reconciles the datasources the notifications name at once; the outbox is read now
    /// when one named nothing (a folded burst, an event of no datasource), otherwise soon
    /// after ([`CATCH_UP_DELAY`]), off the path of the reloads, once for every batch in
    /// between.
    async fn on_signals(&mut self, batch: Vec<Signal>) -> Result<(), Error> {
        if batch.contains(&Signal::Reconnected) {
            return self.resync().await;
        }
        let mut hinted: Vec<Uuid> = Vec::new();
        let mut events: Vec<i64> = Vec::new();
        let mut traces: Vec<String> = Vec::new();
        let mut wake = false;
        for signal in batch {
            match signal {
                Signal::Event {
                    event,
                    datasource,
                    trace,
                } => {
                    if !hinted.contains(&datasource) {
                        hinted.push(datasource);
                    }
                    events.push(event);
                    traces.extend(trace);
                }
                Signal::Wake | Signal::Reconnected => wake = true,
            }
        }
        if !hinted.is_empty() {
            let span = reconcile_span(hinted.len(), &traces);
            self.reconcile(&hinted).instrument(span).await?;
            // Their events are handled: the outbox read passes over them.
            self.handled.extend(events);
        }
        if wake {
            self.catch_up().await
        } else {
            self.catch_up_at
                .get_or_insert_with(|| Instant::now() + CATCH_UP_DELAY);
            Ok(())
        }
    }

    /// Reads the outbox and reconciles what it names that no notification handled already.
    async fn catch_up(&mut self) -> Result<(), Error> {
        self.catch_up_at = None;
        let (events, everything) = self.read_outbox().await?;
        if everything {
            return self.resync().await;
        }
        if !events.is_empty() {
            let rest: Vec<Uuid> = events.keys().copied().collect();
            let traces: Vec<String> = events.into_values().flatten().collect();
            let span = reconcile_span(rest.len(), &traces);
            self.reconcile(&rest).instrument(span).await?;
        }
        Ok(())
    }

    /// Reads new waking events (but those already reconciled through their notifications);
    /// returns the datasources they name, each with the trace context of its latest traced
    /// event, and whether one asked for a full resync.
    async fn read_outbox(&mut self) -> Result<(HashMap<Uuid, Option<String>>, bool), Error> {
        let client = self.pool.get().await?;
        let reader = match &mut self.reader {
            Some(reader) => reader,
            None => self
                .reader
                .insert(OutboxReader::from_now(&**client).await?.wakes_only()),
        };
        let before = reader.rows_read();
        let read = reader.read(&**client).await?;
        let rows = reader.rows_read() - before;
        let mut events = read.events;
        self.metered(|m| {
            let read = events.iter().map(|e| EventRead {
                datasource: e.datasource_id,
                created_at: e.created_at,
                invalid_traceparent: e.traceparent_invalid,
            });
            m.outbox_read(read, chrono::Utc::now());
            m.outbox_rows_read(rows);
        });
        // Events reconciled through their notifications are done. A notification comes after
        // its commit, so each of them is in this read or was in an earlier one: forgotten now.
        let handled = std::mem::take(&mut self.handled);
        events.retain(|e| !handled.contains(&e.id));
        if let Some(change) = read.reanchored {
            // Transaction ids from before mean nothing on this history: whatever was
            // committed there is caught up on from the tables, and what only the lost history
            // had applied is reverted by the same pass.
            tracing::warn!(%change, "the outbox reader started over; catching up on the tables");
            self.metered(|m| m.outbox_reanchored());
            return Ok((HashMap::new(), true));
        }
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

    /// Starts a full pass: every live datasource, and every worker the tables no longer want,
    /// a page at a time ([`Self::resync_page`]); one already under way starts over.
    async fn resync(&mut self) -> Result<(), Error> {
        // Move the outbox cursor first: whatever it returns is covered by this pass.
        self.read_outbox().await?;
        self.catch_up_at = None;
        self.pass = Some(FullPass {
            after: None,
            started: Instant::now(),
            datasources: 0,
        });
        Ok(())
    }

    /// The next page of the full pass under way: the datasources after the last page's, in id
    /// order, applied; the workers in that id range the tables no longer list, stopped.
    async fn resync_page(&mut self) -> Result<(), Error> {
        let Some(after) = self.pass.as_ref().map(|p| p.after) else {
            return Ok(());
        };
        let result = self.resync_step(after).await;
        match result {
            Ok(None) => {
                if let Some(pass) = self.pass.take() {
                    self.report(true, pass.datasources, pass.started);
                }
                Ok(())
            }
            Ok(Some(last)) => {
                if let Some(pass) = &mut self.pass {
                    pass.after = Some(last);
                }
                Ok(())
            }
            Err(e) => {
                self.pass = None;
                Err(e)
            }
        }
    }

    /// Reads and applies the page after `after`; returns its last id, `None` when it was the
    /// last page.
    #[tracing::instrument(name = "resync", skip(self))]
    async fn resync_step(&mut self, after: Option<Uuid>) -> Result<Option<Uuid>, Error> {
        let limit = self.config.resync_page.max(1);
        let rows = {
            let client = self.pool.get().await?;
            let page = DesiredFor::Page {
                after,
                limit: limit as i64,
            };
            state::desired(&Pooled::new(&client, self.config.prepared), page, false).await?
        };
        let upto = (rows.len() >= limit)
            .then(|| rows.last().map(|r| r.datasource_id))
            .flatten();
        let in_page = |id: &Uuid| after.is_none_or(|a| *id > a) && upto.is_none_or(|u| *id <= u);
        let live: HashSet<Uuid> = rows.iter().map(|r| r.datasource_id).collect();
        let gone: Vec<Uuid> = self
            .workers
            .keys()
            .filter(|id| in_page(id) && !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.stop_worker(id);
        }
        self.failed
            .retain(|id, _| !in_page(id) || live.contains(id));
        if let Some(pass) = &mut self.pass {
            pass.datasources += rows.len();
        }
        self.apply(rows, true).await?;
        Ok(upto)
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
            let client = Pooled::new(&client, self.config.prepared);
            state::desired(&client, DesiredFor::Ids(ids), true).await?
        };
        self.apply(rows, false).await?;
        self.report(false, ids.len(), started);
        Ok(())
    }

    async fn apply(&mut self, rows: Vec<Desired>, fetch_configs: bool) -> Result<(), Error> {
        // Datasources no instance holds that are this one's to take: claimed at once, not at
        // the next balance.
        let unheld: Vec<Uuid> = rows
            .iter()
            .map(|r| r.datasource_id)
            .filter(|id| !self.leases.held.contains_key(id))
            .collect();
        // A lease held before (epoch above 1) may have had a worker elsewhere that saved a
        // source position after the read above: those workers read theirs when they start.
        // The others' positions come with the read.
        let taken_over: HashSet<Uuid> = self
            .claim(unheld)
            .await?
            .into_iter()
            .filter(|c| c.epoch > 1)
            .map(|c| c.datasource_id)
            .collect();
        let mut need_config = Vec::new();
        let mut to_build = Vec::new();
        for row in rows {
            let id = row.datasource_id;
            if !self.leases.held.contains_key(&id) {
                // Another instance's, or no one's yet: never touched from here.
                self.failed.remove(&id);
                self.stop_worker(id);
                continue;
            }
            if self.leases.draining.contains_key(&id) {
                continue;
            }
            let epoch = self.leases.held.get(&id).copied().unwrap_or_default();
            let wanted = (row.status == DatasourceStatus::Active
                && row.desired == DesiredState::Running)
                .then_some(row.version)
                .flatten()
                .map(|version| SpecKey {
                    version,
                    restart_generation: row.restart_generation,
                    secrets_generation: row.secrets_generation,
                    epoch,
                });
            let Some(key) = wanted else {
                self.failed.remove(&id);
                if self.workers.contains_key(&id) {
                    self.stop_worker(id);
                } else if !matches!(
                    row.worker_status,
                    WorkerStatus::Init | WorkerStatus::Stopped
                ) {
                    // Left behind by a process that did not stop cleanly.
                    self.env.writer.send(stale_stopped(id, row.version, epoch));
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
        let mut compiled = self.compile_big(&to_build).await;
        for (mut row, key) in to_build {
            let opened = secrets.remove(&row.datasource_id);
            let transform = compiled.remove(&row.datasource_id);
            let cursor = if taken_over.contains(&row.datasource_id) {
                None
            } else {
                Some(row.source_cursor.take())
            };
            self.converge(row, key, opened, cursor, transform);
        }
        if !need_config.is_empty() {
            Box::pin(self.reconcile(&need_config)).await?;
        }
        Ok(())
    }

    /// Compiles the big transforms of `rows` on the blocking pool, spread over the machine's
    /// cores; the others are compiled when their spec is built.
    async fn compile_big(&self, rows: &[(Desired, SpecKey)]) -> HashMap<Uuid, Compiled> {
        let big: Vec<(Uuid, serde_json::Value)> = rows
            .iter()
            .filter(|(row, _)| script_len(row.config.as_ref()) >= COMPILE_INLINE_BYTES)
            .filter_map(|(row, _)| Some((row.datasource_id, row.config.clone()?)))
            .collect();
        if big.is_empty() {
            return HashMap::new();
        }
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let per_task = big.len().div_ceil(cores);
        let mut tasks = Vec::new();
        let mut big = big.into_iter().peekable();
        while big.peek().is_some() {
            let chunk: Vec<_> = big.by_ref().take(per_task).collect();
            let limits = self.config.limits.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                chunk
                    .into_iter()
                    .map(|(id, config)| (id, compile(&config, &limits)))
                    .collect::<Vec<_>>()
            }));
        }
        let mut compiled = HashMap::new();
        for task in tasks {
            // A chunk whose thread failed is compiled inline when its specs are built.
            if let Ok(done) = task.await {
                compiled.extend(done);
            }
        }
        compiled
    }

    /// Opens the secrets of the datasources whose configs need some, in one query (a
    /// datasource whose secrets do not open costs one more, which records why).
    async fn open_secrets(
        &self,
        rows: &[(Desired, SpecKey)],
    ) -> HashMap<Uuid, Result<SecretMap, String>> {
        let needing: Vec<(Uuid, &str, &str)> = rows
            .iter()
            .filter(|(row, _)| {
                let connector = self.catalog.get(&row.kind);
                let config = row.config.as_ref();
                matches!((connector, config), (Some(c), Some(config)) if contain("required_secrets", || c.required_secrets(config)).is_ok_and(|r| !r.is_empty()))
            })
            .map(|(row, _)| (row.datasource_id, row.org.as_str(), row.project.as_str()))
            .collect();
        if needing.is_empty() {
            return HashMap::new();
        }
        let Some(service) = &self.secrets else {
            return needing
                .into_iter()
                .map(|(id, _, _)| (id, Err("no secrets key is configured".to_owned())))
                .collect();
        };
        let client = match self.pool.get().await {
            Ok(client) => client,
            Err(e) => {
                let reason = format!("secrets unavailable: {e}");
                return needing
                    .into_iter()
                    .map(|(id, _, _)| (id, Err(reason.clone())))
                    .collect();
            }
        };
        // The tenants come with the desired state: one query for every datasource's secrets.
        service
            .open_many(&**client, &needing)
            .await
            .into_iter()
            .map(|(id, result)| (id, result.map(Arc::new).map_err(|e| e.to_string())))
            .collect()
    }

    /// Starts, or hot-reloads, a datasource whose tables want `key`: the new spec is built
    /// and validated first; an invalid one never touches a running worker.
    /// `cursor` is the source position read with `row`, when that read is surely current;
    /// `transform` the version's transform when it was compiled already.
    fn converge(
        &mut self,
        row: Desired,
        key: SpecKey,
        secrets: Option<Result<SecretMap, String>>,
        cursor: Option<Option<serde_json::Value>>,
        transform: Option<Compiled>,
    ) {
        let id = row.datasource_id;
        match self.build(&row, key, secrets, cursor, transform) {
            Ok((spec, stall_after)) => {
                self.metered(|m| m.reload_ordered(id, key.version));
                let identity = Identity {
                    org: row.org.clone(),
                    project: row.project.clone(),
                    name: row.name.clone(),
                    version: key.version,
                };
                if let Some(worker) = self.workers.get_mut(&id) {
                    worker.key = key;
                    worker.rejected = None;
                    worker.stall_after = stall_after;
                    worker.stalled = false;
                    worker.spec.send_replace(Arc::new(spec));
                } else {
                    self.start_worker(spec, key, stall_after);
                }
                self.metered(|m| m.worker_identity(id, identity));
            }
            Err((code, reason)) => {
                tracing::info!(datasource_id = %id, version = key.version, code, reason, "published version refused");
                if let Some(worker) = self.workers.get_mut(&id) {
                    worker.rejected = Some(key);
                    self.env.writer.send(Transition {
                        datasource_id: id,
                        epoch: key.epoch,
                        status: None,
                        running_version: None,
                        error: Some(Some(("reload_rejected".into(), reason.clone()))),
                        restart_count: None,
                        event: Some(NewEvent {
                            at: None,
                            datasource_id: Some(id),
                            kind: "reload_rejected".into(),
                            version: Some(key.version),
                            payload: json!({ "code": code, "reason": reason, "running_version": worker.key.version }),
                        }),
                    });
                } else {
                    self.failed.insert(id, key);
                    self.env.writer.send(Transition {
                        datasource_id: id,
                        epoch: key.epoch,
                        status: Some(WorkerStatus::Error),
                        running_version: None,
                        error: Some(Some((code.into(), reason.clone()))),
                        restart_count: None,
                        event: Some(NewEvent {
                            at: None,
                            datasource_id: Some(id),
                            kind: "worker_error".into(),
                            version: Some(key.version),
                            payload: json!({ "code": code, "message": reason }),
                        }),
                    });
                }
            }
        }
    }

    /// Builds a worker spec and its stall limit from the tables, or says why it cannot run.
    /// The kind's code runs contained: a config that makes it panic is refused like an
    /// invalid one, as this datasource's error.
    fn build(
        &self,
        row: &Desired,
        key: SpecKey,
        secrets: Option<Result<SecretMap, String>>,
        cursor: Option<Option<serde_json::Value>>,
        transform: Option<Compiled>,
    ) -> Result<(Spec, Option<Duration>), (&'static str, String)> {
        let panicked = |e: Panicked| ("connector_panicked", e.to_string());
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
        let config = row.config.clone().ok_or_else(|| {
            (
                "invalid_config",
                format!("version {} has no config", key.version),
            )
        })?;
        contain("validate", || connector.validate(&config))
            .map_err(panicked)?
            .map_err(|e| ("invalid_config", e.to_string()))?;
        let transform = transform.unwrap_or_else(|| compile(&config, &self.config.limits))?;
        let stall_after =
            contain("stall_after", || connector.stall_after(&config)).map_err(panicked)?;
        let required = contain("required_secrets", || connector.required_secrets(&config))
            .map_err(panicked)?;
        let secrets = secrets
            .unwrap_or_else(|| Ok(SecretMap::default()))
            .map_err(|e| ("secret_unavailable", e))?;
        if let Some(missing) = required
            .into_iter()
            .find(|name| !secrets.contains_key(name))
        {
            return Err(("secret_missing", format!("secret {missing:?} is missing")));
        }
        let spec = Spec {
            datasource_id: row.datasource_id,
            version: key.version,
            generation: key.restart_generation,
            epoch: key.epoch,
            config: Arc::new(config),
            connector,
            transform,
            secrets,
            cursor,
            trace: tracing_opentelemetry::OpenTelemetrySpanExt::context(&tracing::Span::current()),
        };
        Ok((spec, stall_after))
    }

    fn start_worker(&mut self, spec: Spec, key: SpecKey, stall_after: Option<Duration>) {
        let id = spec.datasource_id;
        let kind = spec.connector.info().name;
        let (tx, rx) = watch::channel(Arc::new(spec));
        // Cancelled with every other worker if the leases run out.
        let guard = self.elector.deadline().guard();
        let cancel = guard.child_token();
        let health = Health::default();
        self.metered(|m| m.worker_started(id, kind, Arc::new(health.clone())));
        let previous = self.stopping.remove(&id).map(|s| s.join);
        let done = CancellationToken::new();
        let ended = done.clone();
        let check = self.elector.deadline().check(guard.clone());
        let run = worker::run(
            rx,
            previous,
            self.env.clone(),
            health.clone(),
            cancel.clone(),
            guard,
            check,
        );
        let join = self.tracker.spawn(async move {
            let _ended = ended.drop_guard();
            run.await;
        });
        self.failed.remove(&id);
        self.workers.insert(
            id,
            Worker {
                key,
                done,
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
            self.stopping.insert(
                id,
                Stopping {
                    join: worker.join,
                    done: worker.done,
                },
            );
        }
    }

    /// Stall detection, and the heartbeat of every worker, written beside the reconcile loop
    /// (a registry with 10,000 workers writes 10,000 rows) in statements of
    /// [`HEARTBEATS_PER_STATEMENT`], spread over a [`HEARTBEAT_SPREAD`]th of the period. A
    /// tick that finds the last write still going skips its own.
    async fn heartbeat(&mut self) -> Result<(), Error> {
        self.stopping.retain(|_, s| !s.join.is_finished());
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut beats = Vec::with_capacity(self.workers.len());
        for (id, worker) in &mut self.workers {
            let progress_ms = worker.health.last_progress_ms();
            let running_since = worker.health.running_since_ms();
            beats.push((*id, worker.health.clone()));
            let (Some(limit), true) = (worker.stall_after, running_since > 0) else {
                continue;
            };
            let working = worker.health.is_working();
            let idle = Duration::from_millis(
                now_ms.saturating_sub(progress_ms.max(running_since)).max(0) as u64,
            );
            if idle > limit && !worker.stalled {
                worker.stalled = true;
                self.env
                    .writer
                    .send(stall_transition(*id, worker.key, true, working, idle));
            } else if idle <= limit && worker.stalled {
                worker.stalled = false;
                self.env
                    .writer
                    .send(stall_transition(*id, worker.key, false, working, idle));
            }
        }
        if self.heartbeats.as_ref().is_some_and(|h| !h.is_finished()) {
            tracing::debug!("the last heartbeat write is still going: this one is skipped");
            return Ok(());
        }
        let pool = self.control.clone();
        let me = self.env.instance.clone();
        let statements = beats.len().div_ceil(HEARTBEATS_PER_STATEMENT).max(1);
        let spacing = self.config.heartbeat_interval / HEARTBEAT_SPREAD / statements as u32;
        self.heartbeats = Some(self.tracker.spawn(async move {
            let mut pace = tokio::time::interval(spacing.max(Duration::from_millis(1)));
            for chunk in beats.chunks(HEARTBEATS_PER_STATEMENT) {
                pace.tick().await;
                let beats: Vec<Heartbeat> = chunk.iter().map(|(id, h)| heartbeat_of(*id, h)).collect();
                let written = match pool.get().await {
                    Ok(client) => state::heartbeat(&**client, &beats, &me).await,
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = written {
                    tracing::warn!(error = %e, "writing heartbeats failed; the next tick writes them again");
                    return;
                }
            }
        }));
        Ok(())
    }

    async fn stop_all(mut self) {
        if let Some(heartbeats) = self.heartbeats.take() {
            heartbeats.abort();
        }
        let ids: Vec<Uuid> = self.workers.keys().copied().collect();
        for id in ids {
            self.stop_worker(id);
        }
        for (_, stopping) in self.stopping.drain() {
            // Each worker bounds its own stop by the deadline, then aborts its run.
            let _ = stopping.join.await;
        }
        // Their last records and states are written before the leases go.
        self.env.sink.flushed().await;
        self.env.writer.flushed().await;
        if let Err(e) = self.elector.sign_off().await {
            tracing::warn!(error = %e, "releasing the leases failed; they expire on their own");
        }
    }
}

/// This instance owns the datasource under `epoch` now: its state says so.
fn owned_under(id: Uuid, epoch: i64) -> Transition {
    Transition {
        datasource_id: id,
        status: None,
        running_version: None,
        error: None,
        restart_count: None,
        event: None,
        epoch,
    }
}

fn stale_stopped(id: Uuid, version: Option<i32>, epoch: i64) -> Transition {
    Transition {
        datasource_id: id,
        epoch,
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

/// A worker's heartbeat as its counters stand now.
fn heartbeat_of(id: Uuid, health: &crate::connectors::Health) -> Heartbeat {
    let progress_ms = health.last_progress_ms();
    Heartbeat {
        datasource_id: id,
        last_progress_at: chrono::DateTime::from_timestamp_millis(progress_ms)
            .filter(|_| progress_ms > 0),
        metrics: json!({
            "records_total": health.records_total(),
            "errors_total": health.errors_total(),
            "dead_lettered_total": health.dead_lettered_total(),
            "restarts_total": health.starts_total().saturating_sub(1),
        }),
    }
}

/// A stall, or the end of one: `running` again only if the current run has worked (a run
/// restarted since that has not yet is `starting`).
fn stall_transition(
    id: Uuid,
    key: SpecKey,
    stalled: bool,
    working: bool,
    idle: Duration,
) -> Transition {
    let (status, kind) = match (stalled, working) {
        (true, _) => (WorkerStatus::Stalled, "worker_stalled"),
        (false, true) => (WorkerStatus::Running, "worker_running"),
        (false, false) => (WorkerStatus::Starting, "worker_starting"),
    };
    worker::transition(
        id,
        key.epoch,
        status,
        key.version,
        kind,
        json!({ "idle_ms": idle.as_millis() as u64, "recovered": !stalled }),
    )
}
