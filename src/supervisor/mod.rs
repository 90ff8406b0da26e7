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
//! It runs only the workers of datasources whose lease this instance holds ([`lease`]): it
//! claims the leases assigned to it, drains and releases those assigned elsewhere, and stops
//! whatever it no longer holds.
//!
//! Stopping: when its token is cancelled it stops reconciling, cancels every worker (each
//! gets the stop deadline, then is aborted), waits for them, writes their final states,
//! releases its leases, and returns.

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
use crate::db::repository::leases::{self, InstanceInfo, Release};
use crate::db::repository::state::{self, Desired, Heartbeat, Transition, Which};
use crate::domain::{DatasourceStatus, DesiredState, WorkerStatus};
use crate::outbox::OutboxReader;
use crate::outbox::listener::Signal;
use crate::secrets::Secrets as SecretsService;
use crate::telemetry::metrics::{EventRead, Identity, Metrics};
use crate::transform::{Limits, Transform};
use lease::{LeaseConfig, Peers, Renewal, Renewer, Tenure};
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
    /// Lease pacing.
    pub leases: LeaseConfig,
    /// Fault injection for tests of the supervision path: when this fires, the supervisor's
    /// task panics, as a bug in it would. `None` in production.
    pub fault: Option<CancellationToken>,
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
        }
    }
}

/// Ends this instance's tenure when dropped: every worker is aborted at once, so a supervisor
/// task that ends (a panic unwinding through it included) leaves nothing running without it.
struct AbortWorkersOnDrop(Arc<Tenure>);

impl Drop for AbortWorkersOnDrop {
    fn drop(&mut self) {
        self.0.guard().cancel();
    }
}

/// What makes a running worker current: its version, restart generation, secrets
/// generation and lease epoch.
type SpecKey = (i32, i64, i64, i64);

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

/// A lease this instance holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: i64,
    /// When it was claimed or first seen renewed: a renewal sent earlier need not list it.
    since: Instant,
}

/// This instance among the others: what it holds, what it is giving up, who is alive.
struct Cluster {
    me: InstanceInfo,
    config: LeaseConfig,
    tenure: Arc<Tenure>,
    renewals: Option<watch::Receiver<Option<Renewal>>>,
    held: HashMap<Uuid, Held>,
    /// Leases being given up once their worker has stopped: to whom (`None`: the datasource
    /// is archived or gone).
    draining: HashMap<Uuid, Option<String>>,
    /// Leases released lately, so a renewal sent before the release does not bring them back.
    released: HashMap<Uuid, Instant>,
    /// Live instances (this one included), sorted.
    live: Vec<String>,
    /// Whether others were live at the latest look, for the state writer.
    peers: Peers,
    /// The last balance's assignment: whether each datasource it saw is this instance's.
    assigned: HashMap<Uuid, bool>,
    /// More leases should move than one balance gives up: the next renewal balances again.
    moves_left: bool,
}

impl Cluster {
    fn epoch(&self, id: &Uuid) -> i64 {
        self.held.get(id).map_or(0, |h| h.epoch)
    }

    /// Whether this instance should take a datasource no one holds straight away: the last
    /// balance assigned it here, or (a datasource it has not seen yet) rendezvous alone puts it
    /// here first; the next balance evens out the rest.
    fn takes(&self, id: Uuid) -> bool {
        match self.assigned.get(&id) {
            Some(mine) => *mine,
            None => lease::assign(&[id], &self.live, f64::INFINITY)
                .get(&id)
                .is_some_and(|o| *o == self.me.id),
        }
    }
}

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
    /// The control plane's connections (leases, heartbeats), which worker I/O cannot take.
    control: Pool,
    /// The lease renewer's own connection, opened and driven on its own thread.
    renewal: Pool,
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
    cluster: Cluster,
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
    /// A supervisor of instance `me`'s workers; they are spawned on `tracker`.
    pub fn new(
        pool: Pool,
        catalog: Catalog,
        config: SupervisorConfig,
        env: WorkerEnv,
        tracker: TaskTracker,
        secrets: Option<Arc<SecretsService>>,
        me: InstanceInfo,
    ) -> Self {
        let cluster = Cluster {
            live: vec![me.id.clone()],
            peers: Peers::default(),
            me,
            config: config.leases.clone(),
            tenure: Arc::default(),
            renewals: None,
            held: HashMap::new(),
            draining: HashMap::new(),
            released: HashMap::new(),
            assigned: HashMap::new(),
            moves_left: false,
        };
        Self {
            cluster,
            secrets,
            control: pool.clone(),
            renewal: pool.clone(),
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
            heartbeats: None,
            pass: None,
            handled: HashSet::new(),
            catch_up_at: None,
        }
    }

    /// Takes leases, renews them and writes heartbeats on `pool` (a small pool of the
    /// control plane's own) rather than the pool reconciles and workers share.
    pub fn control_plane(&mut self, pool: Pool) {
        self.control = pool;
    }

    /// Renews the leases on `pool`, a pool of one connection that nothing else uses: it is
    /// opened and driven on the renewer's own thread, so a starved shared runtime cannot
    /// delay a renewal.
    pub fn renew_on(&mut self, pool: Pool) {
        self.renewal = pool;
    }

    /// Whether others were live at the latest look at the instances (see [`Peers`]).
    pub fn peers(&self) -> Peers {
        self.cluster.peers.clone()
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
        self.wait_out_namesake(&shutdown).await;
        let renewer_stop = CancellationToken::new();
        // However this task ends (a panic included), the leases stop being renewed and the
        // workers stop: another instance can take over once the leases lapse.
        let _renewer_stop = renewer_stop.clone().drop_guard();
        let _abort_workers = AbortWorkersOnDrop(self.cluster.tenure.clone());
        let fault = self.config.fault.clone().unwrap_or_default();
        {
            let (renewer, renewals) = Renewer::new(
                self.renewal.clone(),
                self.cluster.me.clone(),
                self.cluster.config.clone(),
                self.cluster.tenure.clone(),
                self.metrics.clone(),
            );
            self.cluster.renewals = Some(renewals);
            // On a thread of its own, so no load on the shared runtime delays a renewal.
            match renewer.spawn_on_own_thread(renewer_stop.clone()) {
                Ok(finished) => {
                    self.tracker.spawn(async move {
                        let _ = finished.await;
                    });
                }
                Err(e) => {
                    // Without a renewer no lease can be held: end, and let the process exit
                    // non-zero as for any other end of the supervisor.
                    tracing::error!(error = %e, "cannot start the lease renewer's thread");
                    return;
                }
            }
        }
        if let Err(e) = self.register().await {
            tracing::warn!(error = %e, "registering this instance failed; the renewals retry");
        }
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
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
        let mut renewals = self
            .cluster
            .renewals
            .clone()
            .expect("the renewer was started above");
        loop {
            let result = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = fault.cancelled(), if self.config.fault.is_some() => {
                    panic!("fault injected into the supervisor")
                }
                Ok(()) = renewals.changed() => {
                    let renewal = renewals.borrow_and_update().clone();
                    match renewal {
                        Some(renewal) => self.on_renewal(renewal).await,
                        None => Ok(()),
                    }
                }
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
        renewer_stop.cancel();
    }

    /// A process that ran under this instance id moments ago (a crash, then a restart with
    /// `--instance-id`) may still look alive, and renewing its leases would run its workers
    /// twice if it is in fact still running (two hosts given one id): wait until it is seen
    /// dead, so its leases are claimed again under new epochs.
    async fn wait_out_namesake(&self, shutdown: &CancellationToken) {
        let mut said = false;
        loop {
            let left = match self.control.get().await {
                Ok(client) => leases::live_for(&**client, &self.cluster.me.id).await,
                Err(e) => Err(e.into()),
            };
            let left = match left {
                Ok(Some(left)) => left,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check whether this instance id is in use");
                    return;
                }
            };
            if !said {
                said = true;
                tracing::warn!(
                    instance = %self.cluster.me.id,
                    wait_ms = left.as_millis() as u64,
                    "this instance id was alive moments ago (another process, or this one before a crash): waiting until it is seen dead before taking any lease"
                );
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(left.min(Duration::from_secs(1)) + Duration::from_millis(50)) => {}
            }
        }
    }

    async fn register(&self) -> Result<(), Error> {
        let client = self.control.get().await?;
        leases::register(&**client, &self.cluster.me).await
    }

    /// A renewal (or a look between renewals) arrived: what it renewed is taken stock of, and
    /// what it saw of the others may call for a balance.
    async fn on_renewal(&mut self, renewal: Renewal) -> Result<(), Error> {
        if renewal.lost {
            self.cluster.peers.saw(true);
            let lost = self.cluster.held.len();
            self.cluster.held.clear();
            self.cluster.draining.clear();
            self.failed.clear();
            let ids: Vec<Uuid> = self.workers.keys().copied().collect();
            for id in ids {
                // Already cancelled through the tenure's guard.
                self.stop_worker(id);
            }
            self.metered(|m| {
                m.lease_moves("lost", lost as u64);
                m.cluster(0, self.cluster.live.len());
            });
            return Ok(());
        }
        if renewal.renewed {
            self.take_up(&renewal).await?;
        }
        // Someone came or went, a lease is free, or leases are being (or still to be) given
        // up: look again.
        let mut live = renewal.seen.live.clone();
        if let Err(at) = live.binary_search(&self.cluster.me.id) {
            live.insert(at, self.cluster.me.id.clone());
        }
        self.cluster.peers.saw(live.len() > 1);
        if live != self.cluster.live
            || renewal.seen.free > 0
            || !self.cluster.draining.is_empty()
            || self.cluster.moves_left
        {
            self.balance().await?;
        }
        Ok(())
    }

    /// Leases the renewal did not renew are gone (their workers stop); leases held in the
    /// database that this map lacks (kept through a brief outage) are taken up again.
    async fn take_up(&mut self, renewal: &Renewal) -> Result<(), Error> {
        let renewed: HashMap<Uuid, i64> = renewal.seen.held.iter().copied().collect();
        let lost: Vec<Uuid> = self
            .cluster
            .held
            .iter()
            .filter(|(id, h)| h.since < renewal.sent && renewed.get(id) != Some(&h.epoch))
            .map(|(id, _)| *id)
            .collect();
        for id in &lost {
            tracing::warn!(datasource_id = %id, "lease lost: stopping its worker");
            self.cluster.held.remove(id);
            self.cluster.draining.remove(id);
            self.failed.remove(id);
            self.stop_worker(*id);
        }
        let released = &self.cluster.released;
        let adopted: Vec<(Uuid, i64)> = renewed
            .iter()
            .filter(|(id, _)| !self.cluster.held.contains_key(id))
            .filter(|(id, _)| released.get(id).is_none_or(|at| *at < renewal.sent))
            .map(|(id, epoch)| (*id, *epoch))
            .collect();
        let adopted: Vec<Uuid> = adopted
            .into_iter()
            .map(|(id, epoch)| {
                let since = renewal.sent;
                self.cluster.held.insert(id, Held { epoch, since });
                id
            })
            .collect();
        let held = self.cluster.held.len();
        self.metered(|m| {
            m.lease_moves("lost", lost.len() as u64);
            m.cluster(held, self.cluster.live.len());
        });
        if !adopted.is_empty() {
            self.reconcile(&adopted).await?;
        }
        Ok(())
    }

    /// Claims what is assigned here and free, gives up (a few per tick) what is assigned
    /// elsewhere once its worker has stopped, and releases the leases of retired datasources.
    async fn balance(&mut self) -> Result<(), Error> {
        let result = self.balance_once().await;
        if result.is_err() {
            // Forget what it saw, so the next renewal balances again rather than wait for the
            // periodic resync.
            self.cluster.live.clear();
        }
        result
    }

    async fn balance_once(&mut self) -> Result<(), Error> {
        let ttl = self.cluster.config.ttl;
        self.cluster
            .released
            .retain(|_, at| at.elapsed() < ttl.saturating_mul(2));
        let (mut live, standings) = {
            let client = self.control.get().await?;
            (
                leases::live_instances(&**client).await?,
                leases::standings(&**client).await?,
            )
        };
        let me = self.cluster.me.id.clone();
        if let Err(at) = live.binary_search(&me) {
            live.insert(at, me.clone());
        }
        self.cluster.live.clone_from(&live);
        let ids: Vec<Uuid> = standings.iter().map(|s| s.datasource_id).collect();
        let owners = lease::assign(&ids, &live, self.cluster.config.slack);
        let mine = |id: &Uuid| owners.get(id).is_some_and(|o| *o == me);
        self.cluster.assigned = ids.iter().map(|id| (*id, mine(id))).collect();

        let free: Vec<Uuid> = standings
            .iter()
            .filter(|s| s.owner.is_none() && mine(&s.datasource_id))
            .filter(|s| !self.cluster.held.contains_key(&s.datasource_id))
            .map(|s| s.datasource_id)
            .collect();
        let mut wake: Vec<Uuid> = self
            .claim(&free)
            .await?
            .into_iter()
            .map(|c| c.datasource_id)
            .collect();

        // Draining ones assigned back here stay.
        let back: Vec<Uuid> = self
            .cluster
            .draining
            .keys()
            .filter(|id| mine(id))
            .copied()
            .collect();
        for id in back {
            self.cluster.draining.remove(&id);
            wake.push(id);
        }
        let standing: HashSet<Uuid> = ids.iter().copied().collect();
        let mut leaving: Vec<(Uuid, Option<String>)> = Vec::new();
        for id in self.cluster.held.keys() {
            if self.cluster.draining.contains_key(id) {
                continue;
            }
            if !standing.contains(id) {
                leaving.push((*id, None));
            } else if let Some(to) = owners.get(id).filter(|o| **o != me) {
                leaving.push((*id, Some((*to).to_owned())));
            }
        }
        // Retired ones first, then moves in a stable order, a few at a time.
        leaving.sort_by_key(|(id, to)| (to.is_some(), *id));
        let room = self
            .cluster
            .config
            .moves_per_tick
            .saturating_sub(self.cluster.draining.len());
        let retired = leaving.iter().filter(|(_, to)| to.is_none()).count();
        let take = retired.max(room);
        self.cluster.moves_left = leaving.len() > take;
        leaving.truncate(take);
        for (id, to) in leaving {
            self.cluster.draining.insert(id, to);
            self.failed.remove(&id);
            self.stop_worker(id);
        }
        self.release_drained().await?;
        let held = self.cluster.held.len();
        self.metered(|m| m.cluster(held, self.cluster.live.len()));
        if wake.is_empty() {
            return Ok(());
        }
        // The events that asked for these workers (a publish of a datasource just claimed)
        // are read with them, as a resync does, and whatever else they name is looked at too.
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

    /// Claims the leases of `ids` that are free; returns those claimed. Each claim's owner and
    /// epoch go to the datasource's state.
    async fn claim(&mut self, ids: &[Uuid]) -> Result<Vec<leases::Claimed>, Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sent = Instant::now();
        let claimed = {
            let mut client = self.control.get().await?;
            leases::claim(&mut client, &self.cluster.me.id, ids).await?
        };
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        self.cluster
            .tenure
            .claimed(sent, self.cluster.config.safe_for());
        for c in &claimed {
            self.cluster.held.insert(
                c.datasource_id,
                Held {
                    epoch: c.epoch,
                    since: sent,
                },
            );
            self.cluster.released.remove(&c.datasource_id);
            self.env.writer.send(Transition {
                datasource_id: c.datasource_id,
                status: None,
                running_version: None,
                error: None,
                restart_count: None,
                event: None,
                epoch: c.epoch,
            });
        }
        self.metered(|m| m.lease_moves("acquired", claimed.len() as u64));
        Ok(claimed)
    }

    /// Releases the draining leases whose workers have stopped, after their last records and
    /// states are written.
    async fn release_drained(&mut self) -> Result<(), Error> {
        let done: Vec<(Uuid, Option<String>)> = self
            .cluster
            .draining
            .iter()
            .filter(|(id, _)| !self.workers.contains_key(id))
            .filter(|(id, _)| self.stopping.get(id).is_none_or(JoinHandle::is_finished))
            .map(|(id, to)| (*id, to.clone()))
            .collect();
        if done.is_empty() {
            return Ok(());
        }
        self.env.sink.flushed().await;
        self.env.writer.flushed().await;
        let released = {
            let mut client = self.control.get().await?;
            leases::release(&mut client, &self.cluster.me.id, &done, Release::Retired).await?
        };
        let now = Instant::now();
        for (id, _) in &done {
            self.cluster.draining.remove(id);
            self.cluster.held.remove(id);
            self.cluster.released.insert(*id, now);
        }
        self.metered(|m| m.lease_moves("released", released.len() as u64));
        Ok(())
    }

    /// Shutdown: every worker has stopped; their last states are written, then every lease
    /// is released and this instance signs off, so the others take over at once.
    async fn sign_off(&mut self) -> Result<(), Error> {
        self.env.sink.flushed().await;
        self.env.writer.flushed().await;
        let mut client = self.control.get().await?;
        let released = leases::sign_off(&mut client, &self.cluster.me.id).await?;
        self.cluster.held.clear();
        self.metered(|m| m.lease_moves("released", released as u64));
        Ok(())
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
            let page = Which::Page {
                after,
                limit: limit as i64,
            };
            state::desired(&**client, page, false).await?
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
            state::desired(&**client, Which::Ids(ids), true).await?
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
            .filter(|id| !self.cluster.held.contains_key(id) && self.cluster.takes(*id))
            .collect();
        // A lease held before (epoch above 1) may have had a worker elsewhere that saved a
        // source position after the read above: those workers read theirs when they start.
        // The others' positions come with the read.
        let taken_over: HashSet<Uuid> = self
            .claim(&unheld)
            .await?
            .into_iter()
            .filter(|c| c.epoch > 1)
            .map(|c| c.datasource_id)
            .collect();
        let mut need_config = Vec::new();
        let mut to_build = Vec::new();
        for row in rows {
            let id = row.datasource_id;
            if !self.cluster.held.contains_key(&id) {
                // Another instance's, or no one's yet: never touched from here.
                self.failed.remove(&id);
                self.stop_worker(id);
                continue;
            }
            if self.cluster.draining.contains_key(&id) {
                continue;
            }
            let epoch = self.cluster.epoch(&id);
            let wanted = (row.status == DatasourceStatus::Active
                && row.desired == DesiredState::Running)
                .then_some(row.version)
                .flatten()
                .map(|v| (v, row.restart_generation, row.secrets_generation, epoch));
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
                self.metered(|m| m.reload_ordered(id, key.0));
                let identity = Identity {
                    org: row.org.clone(),
                    project: row.project.clone(),
                    name: row.name.clone(),
                    version: key.0,
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
                tracing::info!(datasource_id = %id, version = key.0, code, reason, "published version refused");
                if let Some(worker) = self.workers.get_mut(&id) {
                    worker.rejected = Some(key);
                    self.env.writer.send(Transition {
                        datasource_id: id,
                        epoch: key.3,
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
                        epoch: key.3,
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
        let config = row
            .config
            .clone()
            .ok_or_else(|| ("invalid_config", format!("version {} has no config", key.0)))?;
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
            version: key.0,
            generation: key.1,
            epoch: key.3,
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
        let guard = self.cluster.tenure.guard();
        let cancel = guard.child_token();
        let health = Health::default();
        self.metered(|m| m.worker_started(id, kind, Arc::new(health.clone())));
        let previous = self.stopping.remove(&id);
        let check = self.cluster.tenure.check(guard.clone());
        let join = self.tracker.spawn(worker::run(
            rx,
            previous,
            self.env.clone(),
            health.clone(),
            cancel.clone(),
            guard,
            check,
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

    /// Stall detection, and the heartbeat of every worker, written beside the reconcile loop
    /// (a registry with 10,000 workers writes 10,000 rows) in statements of
    /// [`HEARTBEATS_PER_STATEMENT`], spread over a [`HEARTBEAT_SPREAD`]th of the period. A
    /// tick that finds the last write still going skips its own.
    async fn heartbeat(&mut self) -> Result<(), Error> {
        self.stopping.retain(|_, join| !join.is_finished());
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
        let me = self.cluster.me.id.clone();
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
        for (_, join) in self.stopping.drain() {
            // Each worker bounds its own stop by the deadline, then aborts its run.
            let _ = join.await;
        }
        if let Err(e) = self.sign_off().await {
            tracing::warn!(error = %e, "releasing the leases failed; they expire on their own");
        }
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
        key.3,
        status,
        key.0,
        kind,
        json!({ "idle_ms": idle.as_millis() as u64, "recovered": !stalled }),
    )
}
