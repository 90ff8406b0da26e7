//! The Prometheus registry served at `/metrics` in the OpenMetrics text format: every metric's
//! name, help and type, and the [`Metrics`] handle the components report to.
//!
//! Counting stays where it happens. Per-datasource figures are read at scrape time from the
//! live workers' [`Health`] counters (this instance's workers only: a datasource's series
//! appear when its worker starts here and disappear when it stops); the listener's come from
//! its [`ListenerStats`], the pool's from `Pool::status`. Only what has no other home is
//! recorded here: reload latency, outbox lag, reconcile passes, RPCs.
//!
//! Reload latency runs from the commit of the outbox event that asked for a worker to the
//! state writer's statement that records that worker RUNNING. The event's `created_at` stands
//! for its commit (`clock_timestamp()` when the row is written, the last thing a publish
//! does); the end is the registry's clock when the statement returned, so an external
//! database's clock is assumed in step with the registry's (a negative difference counts as
//! zero). The supervisor may start a worker before it has read the event that woke it (a
//! notification naming the datasource is acted on first), so the pairing tolerates both
//! orders: [`Metrics::reload_ordered`] marks the (re)start, [`Metrics::outbox_read`] notes the
//! events, and [`Metrics::settle_reloads`], at the end of each supervisor wake-up, pairs the
//! two; RUNNING completes the measurement whether it was written before or after. Starts no
//! event asked for (start-up, repairs after a resync) and crash restarts are not measured.
//!
//! No task of its own: nothing to stop.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use uuid::Uuid;

use crate::connectors::Health;
use crate::db::repository::events::Event;
use crate::db::repository::state::Transition;
use crate::domain::WorkerStatus;
use crate::outbox::listener::ListenerStats;

/// The `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format (what a scraper that does not ask for
/// OpenMetrics, `curl` or `promtool check metrics` reads).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (Prometheus servers do); anything else is
/// served the Prometheus text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut fields = part.split(';').map(str::trim);
            let is_openmetrics = fields
                .next()
                .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"));
            // `q=0` refuses the type.
            is_openmetrics && !fields.any(|f| f.replace(' ', "") == "q=0")
        })
    })
}

/// An OpenMetrics scrape in the Prometheus text format (0.0.4): a counter family is named with
/// its `_total` suffix, an info family becomes a gauge named with its `_info` suffix, `unknown`
/// is `untyped`, and `# UNIT` and `# EOF` are left out. Samples are the same lines.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut renamed: HashMap<&str, (String, &str)> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            renamed.insert(name, (format!("{name}{suffix}"), kind));
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let header = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match header {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let (new_name, kind) = renamed
                    .get(name)
                    .map_or((name, tail), |(n, k)| (n.as_str(), *k));
                let tail = if prefix == "# TYPE " { kind } else { tail };
                out.push_str(prefix);
                out.push_str(new_name);
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

const RELOAD_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const FAST_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

type PassLabels = [(&'static str, &'static str); 1];
type RpcLabels = [(&'static str, &'static str); 2];
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn fast_histogram() -> Histogram {
    Histogram::new(FAST_BUCKETS)
}

/// The registry and what the components report to it; cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

struct Inner {
    registry: Registry,
    workers: Arc<Workers>,
    reloads: Mutex<Reloads>,
    reload_latency: Histogram,
    outbox_lag: Histogram,
    invalid_traceparents: Counter,
    reconcile: Histograms<PassLabels>,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: Histograms<RpcLabels>,
    fenced: Family<PassLabels, Counter>,
    lease_moves: Family<PassLabels, Counter>,
    lease_renewals: Family<PassLabels, Counter>,
    leases_held: Gauge,
    instances_live: Gauge,
    sink_failing: Gauge,
    sink_pending: Gauge,
    sink_failures: Family<PassLabels, Counter>,
    sink_lost: Counter,
    ready: Gauge,
    horizon_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    horizon_pid: Gauge,
    outbox_rows: Counter,
    outbox_reanchors: Counter,
    notify_queue: Gauge<f64, std::sync::atomic::AtomicU64>,
    dead_letters: Arc<DeadLetterCounts>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry that also reports `pool`'s usage and the listener's `stats` at each scrape.
    pub fn new(pool: Pool, stats: Arc<ListenerStats>) -> Self {
        // The registry ends every registered metric's help with a period; collectors write
        // their own.
        let mut registry = Registry::default();
        let workers = Arc::new(Workers::default());
        registry.register_collector(Box::new(Arc::clone(&workers)));
        registry.register_collector(Box::new(Listener(stats)));
        registry.register_collector(Box::new(PoolUsage(pool)));
        let dead_letters = Arc::new(DeadLetterCounts::default());
        registry.register_collector(Box::new(Arc::clone(&dead_letters)));

        let reload_latency = Histogram::new(RELOAD_BUCKETS);
        registry.register_with_unit(
            "dsreg_supervisor_reload_latency",
            "Time from the commit of an outbox event asking for a worker (publish, rollback, restart, start) to its worker recorded RUNNING",
            Unit::Seconds,
            reload_latency.clone(),
        );
        let outbox_lag = fast_histogram();
        registry.register_with_unit(
            "dsreg_outbox_lag",
            "Time from the commit of an outbox event to the supervisor reading it",
            Unit::Seconds,
            outbox_lag.clone(),
        );
        let invalid_traceparents = Counter::default();
        registry.register(
            "dsreg_outbox_invalid_traceparent",
            "Outbox events read whose writer set a malformed trace context (dsreg.traceparent), which was dropped: the event was written untraced",
            invalid_traceparents.clone(),
        );
        registry.register(
            "dsreg_panics",
            "Panics anywhere in the process (each also logged as one structured ERROR line, at most 10 a second)",
            crate::telemetry::panics::counter(),
        );
        let horizon_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "dsreg_outbox_horizon_age",
            "How long the oldest open writing transaction of the server has held the outbox horizon (events of later transactions wait for it), read at each scrape; 0 when none is open",
            Unit::Seconds,
            horizon_age.clone(),
        );
        let horizon_pid = Gauge::default();
        registry.register(
            "dsreg_outbox_horizon_holder_pid",
            "The backend pid of that transaction (pg_stat_activity.pid); 0 when none is open",
            horizon_pid.clone(),
        );
        let outbox_rows = Counter::default();
        registry.register(
            "dsreg_outbox_rows_read",
            "Rows the supervisor's outbox reads returned from the database (what reading the outbox costs)",
            outbox_rows.clone(),
        );
        let outbox_reanchors = Counter::default();
        registry.register(
            "dsreg_outbox_reanchors",
            "Times the outbox reader started over because another server, timeline or history answered (failover, restore)",
            outbox_reanchors.clone(),
        );
        let notify_queue = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "dsreg_outbox_notify_queue_usage_ratio",
            "The share of the database server's NOTIFY queue in use (pg_notification_queue_usage(), 0 to 1), read every second; above 0.5 readiness warns, at 1 publishes fail",
            notify_queue.clone(),
        );
        let reconcile: Histograms<PassLabels> = Family::new_with_constructor(fast_histogram);
        registry.register_with_unit(
            "dsreg_supervisor_reconcile_duration",
            "Reconcile passes and how long each took, by pass (full resync or targeted)",
            Unit::Seconds,
            reconcile.clone(),
        );
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "dsreg_grpc_requests",
            "gRPC calls answered, by method and status code (streaming calls when their response starts)",
            rpc_requests.clone(),
        );
        let rpc_duration: Histograms<RpcLabels> = Family::new_with_constructor(fast_histogram);
        registry.register_with_unit(
            "dsreg_grpc_request_duration",
            "Time to answer a gRPC call, by method and status code (streaming calls: to the start of the response)",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let fenced = Family::<PassLabels, Counter>::default();
        registry.register(
            "dsreg_fenced_writes",
            "Writes refused because this instance no longer held the datasource's lease under the writer's epoch, by what was written (records, state)",
            fenced.clone(),
        );
        let lease_moves = Family::<PassLabels, Counter>::default();
        registry.register(
            "dsreg_lease_moves",
            "Datasource leases this instance acquired, released (rebalance, retired, shutdown) or lost (not renewed in time)",
            lease_moves.clone(),
        );
        let lease_renewals = Family::<PassLabels, Counter>::default();
        registry.register(
            "dsreg_lease_renewals",
            "Lease renewal statements (one per tick for every lease held), by outcome",
            lease_renewals.clone(),
        );
        let leases_held = Gauge::default();
        registry.register(
            "dsreg_leases_held",
            "Datasource leases this instance holds",
            leases_held.clone(),
        );
        let instances_live = Gauge::default();
        registry.register(
            "dsreg_instances_live",
            "Registry instances alive as this instance last saw them (itself included)",
            instances_live.clone(),
        );
        let sink_failing = Gauge::default();
        registry.register(
            "dsreg_sink_failing_datasources",
            "Datasources whose records wait in the sink for a retry after a failed flush",
            sink_failing.clone(),
        );
        let sink_pending = Gauge::default();
        registry.register(
            "dsreg_sink_pending_records",
            "Records and dead letters waiting in the sink to be stored",
            sink_pending.clone(),
        );
        let sink_failures = Family::<PassLabels, Counter>::default();
        registry.register(
            "dsreg_sink_flush_failures",
            "Failed sink flush attempts, by kind (transient: retried with backoff; refused: the target refused the data, which is split to dead-letter the refused records)",
            sink_failures.clone(),
        );
        let sink_lost = Counter::default();
        registry.register(
            "dsreg_sink_records_lost",
            "Records the sink could store neither in its target nor as dead letters (at shutdown, or refused everywhere)",
            sink_lost.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "dsreg_ready",
            "Whether this instance can serve (1) or not (0), as /readyz and gRPC health say: the database answers with the latest schema and the LISTEN connection is up; re-checked every second",
            ready.clone(),
        );
        // Every known series from zero, so a rate over them exists before the first event.
        for kind in ["transient", "refused"] {
            drop(sink_failures.get_or_create(&[("kind", kind)]));
        }
        for what in ["records", "state"] {
            drop(fenced.get_or_create(&[("what", what)]));
        }
        for kind in ["acquired", "released", "lost"] {
            drop(lease_moves.get_or_create(&[("kind", kind)]));
        }
        for outcome in ["ok", "failed"] {
            drop(lease_renewals.get_or_create(&[("outcome", outcome)]));
        }
        Self(Arc::new(Inner {
            registry,
            fenced,
            lease_moves,
            lease_renewals,
            leases_held,
            instances_live,
            sink_failing,
            sink_pending,
            sink_failures,
            sink_lost,
            ready,
            horizon_age,
            horizon_pid,
            outbox_rows,
            outbox_reanchors,
            notify_queue,
            dead_letters,
            workers,
            reloads: Mutex::default(),
            reload_latency,
            outbox_lag,
            invalid_traceparents,
            reconcile,
            rpc_requests,
            rpc_duration,
        }))
    }

    /// The transaction holding the outbox horizon, as read now: its pid and age in seconds
    /// (`None`: no writing transaction is open).
    pub fn outbox_horizon(&self, holder: Option<(i32, f64)>) {
        let (pid, age) = holder.unwrap_or((0, 0.0));
        self.0.horizon_pid.set(i64::from(pid));
        self.0.horizon_age.set(age);
    }

    /// The scrape: every metric in the OpenMetrics text format, `# EOF` included.
    ///
    /// # Errors
    /// A metric could not be formatted.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.0.registry)?;
        Ok(text)
    }

    /// A worker of `datasource` started on this instance: its series appear, read from `health`.
    pub fn worker_started(&self, datasource: Uuid, kind: &'static str, health: Health) {
        lock(&self.0.workers.0).insert(
            datasource,
            Worker {
                kind,
                health,
                status: WorkerStatus::Starting,
            },
        );
    }

    /// The worker of `datasource` is stopping for good: its series and any reload awaiting it
    /// are dropped.
    pub fn worker_stopped(&self, datasource: Uuid) {
        lock(&self.0.workers.0).remove(&datasource);
        lock(&self.0.reloads).awaiting.remove(&datasource);
    }

    /// The state writer recorded `transitions` at `at`: live workers take their new status and
    /// a RUNNING on the version a reload awaits completes it.
    pub fn states_written(&self, transitions: &[Transition], at: DateTime<Utc>) {
        {
            let mut workers = lock(&self.0.workers.0);
            for t in transitions {
                if let (Some(status), Some(worker)) = (t.status, workers.get_mut(&t.datasource_id))
                {
                    worker.status = status;
                }
            }
        }
        let mut samples = Vec::new();
        {
            let mut reloads = lock(&self.0.reloads);
            for t in transitions {
                if t.status != Some(WorkerStatus::Running) {
                    continue;
                }
                if let Some(sample) = reloads.running(t.datasource_id, t.running_version, at) {
                    samples.push(sample);
                }
            }
        }
        for sample in samples {
            self.0.reload_latency.observe(sample);
        }
    }

    /// The supervisor read `events` from the outbox at `at`: their lag is observed, and the
    /// earliest per datasource is kept as the request a (re)start of this wake-up answers.
    pub fn outbox_read(&self, events: &[Event], at: DateTime<Utc>) {
        let mut reloads = lock(&self.0.reloads);
        for event in events {
            self.0
                .outbox_lag
                .observe(seconds_between(event.created_at, at));
            if event.traceparent_invalid {
                self.0.invalid_traceparents.inc();
            }
            if let Some(id) = event.datasource_id {
                reloads
                    .triggers
                    .entry(id)
                    .and_modify(|t| *t = (*t).min(event.created_at))
                    .or_insert(event.created_at);
            }
        }
    }

    /// An outbox read returned `rows` rows.
    pub fn outbox_rows_read(&self, rows: u64) {
        self.0.outbox_rows.inc_by(rows);
    }

    /// The share of the server's NOTIFY queue in use, 0 to 1.
    pub fn notify_queue_usage(&self, usage: f64) {
        self.0.notify_queue.set(usage);
    }

    /// The outbox reader started over on another server or history.
    pub fn outbox_reanchored(&self) {
        self.0.outbox_reanchors.inc();
    }

    /// The supervisor started, or hot-reloaded, the worker of `datasource` on `version`.
    pub fn reload_ordered(&self, datasource: Uuid, version: i32) {
        let mut reloads = lock(&self.0.reloads);
        let awaiting = reloads.awaiting.entry(datasource).or_insert(Awaiting {
            version,
            asked_at: None,
            running_at: None,
        });
        // A newer order supersedes the old one; the earliest request still waits for it.
        awaiting.version = version;
        awaiting.running_at = None;
        reloads.ordered.insert(datasource);
    }

    /// Ends one supervisor wake-up: each (re)start ordered during it is paired with the
    /// events read during it; one that no event asked for is not measured.
    pub fn settle_reloads(&self) {
        let samples = lock(&self.0.reloads).settle();
        for sample in samples {
            self.0.reload_latency.observe(sample);
        }
    }

    /// A reconcile pass (`full`: a resync) took `took`.
    pub fn reconcile_pass(&self, full: bool, took: Duration) {
        let pass = if full { "full" } else { "targeted" };
        self.0
            .reconcile
            .get_or_create(&[("pass", pass)])
            .observe(took.as_secs_f64());
    }

    /// A gRPC call of `method` was answered with `code` after `took`. Both labels come from
    /// fixed sets (known methods, status code names), which bounds the series.
    pub fn rpc_handled(&self, method: &'static str, code: &'static str, took: Duration) {
        let labels = [("method", method), ("code", code)];
        self.0.rpc_requests.get_or_create(&labels).inc();
        self.0
            .rpc_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }
}

impl Metrics {
    /// `count` writes of `what` (`records`, `state`) were refused by their lease fence.
    pub fn writes_fenced(&self, what: &'static str, count: u64) {
        self.0.fenced.get_or_create(&[("what", what)]).inc_by(count);
    }

    /// A sink flush attempt failed: `kind` is `transient` or `refused`.
    pub fn sink_flush_failed(&self, kind: &'static str) {
        self.0.sink_failures.get_or_create(&[("kind", kind)]).inc();
    }

    /// `count` records could be stored nowhere.
    pub fn sink_records_lost(&self, count: u64) {
        self.0.sink_lost.inc_by(count);
    }

    /// The sink has `failing` datasources waiting for a retry and `pending` records waiting.
    pub fn sink_waiting(&self, failing: u64, pending: u64) {
        self.0
            .sink_failing
            .set(i64::try_from(failing).unwrap_or(i64::MAX));
        self.0
            .sink_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// `count` leases were `kind` (`acquired`, `released`, `lost`).
    pub fn lease_moves(&self, kind: &'static str, count: u64) {
        self.0
            .lease_moves
            .get_or_create(&[("kind", kind)])
            .inc_by(count);
    }

    /// A renewal statement ended (`ok`: it ran; `failed`).
    pub fn lease_renewed(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.0
            .lease_renewals
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// The gauge readiness checks write their outcome to (`dsreg_ready`).
    pub fn ready(&self) -> Gauge {
        self.0.ready.clone()
    }

    /// This instance now holds `leases` and sees `instances` alive.
    pub fn cluster(&self, leases: usize, instances: usize) {
        self.0.leases_held.set(leases as i64);
        self.0.instances_live.set(instances as i64);
    }
}

/// Locks `mutex`, whose data stays consistent even if a holder panicked (each update is a
/// single insert or remove).
impl Metrics {
    /// Records the dead letters waiting: the datasources with the most (at most
    /// [`DEAD_LETTER_SERIES`]) and the total of all the others.
    pub fn dead_letters_counted(&self, top: Vec<(Uuid, i64)>, rest: i64) {
        *lock(&self.0.dead_letters.0) = Some((top, rest));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from)
        .to_std()
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

/// A (re)start waiting to be measured.
#[derive(Debug)]
struct Awaiting {
    /// The version ordered.
    version: i32,
    /// The earliest event asking for it, once read.
    asked_at: Option<DateTime<Utc>>,
    /// When RUNNING on `version` was written, if before the event was read.
    running_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Default)]
struct Reloads {
    /// Invariant: an entry without `asked_at` lives only until the end of the wake-up that
    /// ordered it.
    awaiting: HashMap<Uuid, Awaiting>,
    /// Datasources (re)started in the current wake-up.
    ordered: HashSet<Uuid>,
    /// The earliest event per datasource read in the current wake-up.
    triggers: HashMap<Uuid, DateTime<Utc>>,
}

impl Reloads {
    /// RUNNING on `version` was written at `at`; returns a completed measurement.
    fn running(&mut self, id: Uuid, version: Option<i32>, at: DateTime<Utc>) -> Option<f64> {
        let awaiting = self.awaiting.get_mut(&id)?;
        if Some(awaiting.version) != version {
            return None;
        }
        match awaiting.asked_at {
            Some(asked_at) => {
                self.awaiting.remove(&id);
                Some(seconds_between(asked_at, at))
            }
            None => {
                awaiting.running_at.get_or_insert(at);
                None
            }
        }
    }

    fn settle(&mut self) -> Vec<f64> {
        let mut samples = Vec::new();
        for id in std::mem::take(&mut self.ordered) {
            let Some(awaiting) = self.awaiting.get_mut(&id) else {
                continue;
            };
            if let Some(&trigger) = self.triggers.get(&id) {
                let earliest = awaiting.asked_at.map_or(trigger, |a| a.min(trigger));
                awaiting.asked_at = Some(earliest);
            }
            match (awaiting.asked_at, awaiting.running_at) {
                (None, _) => {
                    self.awaiting.remove(&id);
                }
                (Some(asked_at), Some(running_at)) => {
                    samples.push(seconds_between(asked_at, running_at));
                    self.awaiting.remove(&id);
                }
                (Some(_), None) => {}
            }
        }
        self.triggers.clear();
        samples
    }
}

/// A live worker as the scrape sees it.
#[derive(Debug)]
struct Worker {
    kind: &'static str,
    health: Health,
    /// The last status the state writer recorded.
    status: WorkerStatus,
}

/// This instance's live workers, by datasource.
#[derive(Debug, Default)]
struct Workers(Mutex<HashMap<Uuid, Worker>>);

/// One worker's figures, read at once.
struct Row {
    datasource: String,
    kind: &'static str,
    records: u64,
    errors: u64,
    dead_lettered: u64,
    restarts: u64,
    last_progress_ms: i64,
    status: WorkerStatus,
}

impl Row {
    fn labels(&self) -> [(&'static str, &str); 2] {
        [
            ("datasource", self.datasource.as_str()),
            ("kind", self.kind),
        ]
    }
}

fn encode_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[Row],
    value: impl Fn(&Row) -> u64,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for row in rows {
        ConstCounter::new(value(row)).encode(family.encode_family(&row.labels())?)?;
    }
    Ok(())
}

impl Collector for Workers {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut rows: Vec<Row> = lock(&self.0)
            .iter()
            .map(|(id, w)| Row {
                datasource: id.to_string(),
                kind: w.kind,
                records: w.health.records_total(),
                errors: w.health.errors_total(),
                dead_lettered: w.health.dead_lettered_total(),
                restarts: w.health.starts_total().saturating_sub(1),
                last_progress_ms: w.health.last_progress_ms(),
                status: w.status,
            })
            .collect();
        rows.sort_unstable_by(|a, b| a.datasource.cmp(&b.datasource));
        let e = &mut encoder;
        encode_counters(
            e,
            "dsreg_datasource_records",
            "Records of the datasource committed to the sink (after the transform).",
            &rows,
            |r| r.records,
        )?;
        encode_counters(
            e,
            "dsreg_datasource_dead_lettered",
            "Input records of the datasource sent to dead letters.",
            &rows,
            |r| r.dead_lettered,
        )?;
        encode_counters(
            e,
            "dsreg_datasource_errors",
            "Errors the datasource's worker met without stopping.",
            &rows,
            |r| r.errors,
        )?;
        encode_counters(
            e,
            "dsreg_datasource_restarts",
            "Connector runs of the datasource's worker after its first (retries after failures, reloads, restart requests).",
            &rows,
            |r| r.restarts,
        )?;
        let seconds = Unit::Seconds;
        let mut progress = e.encode_descriptor(
            "dsreg_datasource_last_progress_timestamp",
            "When the datasource's worker last made progress (a record handled, a poll answered), in Unix seconds; absent before its first.",
            Some(&seconds),
            MetricType::Gauge,
        )?;
        for row in rows.iter().filter(|r| r.last_progress_ms > 0) {
            ConstGauge::new(row.last_progress_ms as f64 / 1000.0)
                .encode(progress.encode_family(&row.labels())?)?;
        }
        let mut state = e.encode_descriptor(
            "dsreg_datasource_worker_state",
            "1 for the state last recorded for the datasource's worker (starting, running, error, crash_loop, stalled, stopped).",
            None,
            MetricType::Gauge,
        )?;
        for row in &rows {
            let [datasource, kind] = row.labels();
            let labels = [datasource, kind, ("state", row.status.as_str())];
            ConstGauge::new(1i64).encode(state.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Most datasources with a dead-letter series of their own; the others are counted together,
/// so the number of series stays bounded whatever the number of datasources.
pub const DEAD_LETTER_SERIES: i64 = 100;

/// Dead letters waiting, as the retention task last counted them: the datasources with the
/// most (at most [`DEAD_LETTER_SERIES`]), and all the others together.
#[derive(Debug, Default)]
struct DeadLetterCounts(Mutex<Option<Counted>>);

/// The datasources with the most dead letters, with their counts, and the others' total.
type Counted = (Vec<(Uuid, i64)>, i64);

impl Collector for DeadLetterCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some((top, rest)) = lock(&self.0).clone() else {
            return Ok(());
        };
        {
            let mut family = encoder.encode_descriptor(
            "dsreg_datasource_dead_letters",
            "Dead letters waiting for the datasource (the 100 datasources with the most; counted every minute).",
            None,
            MetricType::Gauge,
        )?;
            for (id, n) in &top {
                let id = id.to_string();
                ConstGauge::new(*n)
                    .encode(family.encode_family(&[("datasource", id.as_str())])?)?;
            }
        }
        ConstGauge::new(rest).encode(encoder.encode_descriptor(
            "dsreg_dead_letters_other_datasources",
            "Dead letters waiting for every datasource without a series of its own in dsreg_datasource_dead_letters.",
            None,
            MetricType::Gauge,
        )?)
    }
}

/// The listener's counters.
#[derive(Debug)]
struct Listener(Arc<ListenerStats>);

impl Collector for Listener {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = &self.0;
        let connected = i64::from(stats.connected.load(Ordering::Relaxed));
        ConstGauge::new(connected).encode(encoder.encode_descriptor(
            "dsreg_outbox_listener_connected",
            "1 while the LISTEN connection is up.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(i64::from(stats.path.working())).encode(encoder.encode_descriptor(
            "dsreg_notification_path_ok",
            "1 while the last self-test's notification, sent through the pool, reached the LISTEN connection in time; 0 while it did not (the outbox is then polled) or before the first check.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(stats.path.failures()).encode(encoder.encode_descriptor(
            "dsreg_notification_path_failures",
            "Self-tests of the notification path that failed (the token was not sent, or did not arrive in time).",
            None,
            MetricType::Counter,
        )?)?;
        for (name, help, value) in [
            (
                "dsreg_outbox_listener_reconnects",
                "Reconnects of the LISTEN connection after its first connect.",
                &stats.reconnects,
            ),
            (
                "dsreg_outbox_notifications_received",
                "Notifications received on the LISTEN connection.",
                &stats.received,
            ),
            (
                "dsreg_outbox_notifications_malformed",
                "Notifications whose payload could not be parsed (each still woke the supervisor).",
                &stats.malformed,
            ),
        ] {
            ConstCounter::new(value.load(Ordering::Relaxed)).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        ConstCounter::new(super::otel::dropped_spans()).encode(encoder.encode_descriptor(
            "dsreg_otel_spans_dropped",
            "Spans lost because their batch could not be exported to the OTLP collector, or the collector rejected them.",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(super::otel::failed_exports()).encode(encoder.encode_descriptor(
            "dsreg_otel_export_failures",
            "Span exports to the OTLP collector that failed or that it answered with a partial success.",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

/// The database pool's usage.
struct PoolUsage(Pool);

impl fmt::Debug for PoolUsage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PoolUsage").finish_non_exhaustive()
    }
}

impl Collector for PoolUsage {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let status = self.0.status();
        for (name, help, value) in [
            (
                "dsreg_db_pool_max_connections",
                "Connections the database pool may open.",
                status.max_size,
            ),
            (
                "dsreg_db_pool_connections",
                "Connections the database pool holds open, in use or idle.",
                status.size,
            ),
            (
                "dsreg_db_pool_available_connections",
                "Idle connections ready in the database pool.",
                status.available,
            ),
            (
                "dsreg_db_pool_waiting_tasks",
                "Tasks waiting for a connection from the database pool.",
                status.waiting,
            ),
        ] {
            let value = i64::try_from(value).unwrap_or(i64::MAX);
            ConstGauge::new(value).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn the_format_asked_for_is_served() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        for other in [
            None,
            Some("*/*"),
            Some("text/plain;version=0.0.4"),
            Some("application/openmetrics-text; q=0, text/plain"),
        ] {
            assert!(!wants_openmetrics(other), "{other:?}");
        }
        let open = "# HELP a_requests Calls.\n# TYPE a_requests counter\na_requests_total{m=\"x\"} 2\n\
                    # HELP b Build.\n# TYPE b info\nb_info{v=\"1\"} 1\n\
                    # HELP c Seconds.\n# TYPE c gauge\n# UNIT c seconds\nc 0.5\n# EOF\n";
        assert_eq!(
            to_prometheus_text(open),
            "# HELP a_requests_total Calls.\n# TYPE a_requests_total counter\na_requests_total{m=\"x\"} 2\n\
             # HELP b_info Build.\n# TYPE b_info gauge\nb_info{v=\"1\"} 1\n\
             # HELP c Seconds.\n# TYPE c gauge\nc 0.5\n"
        );
    }

    fn metrics() -> Metrics {
        let pool = crate::db::pool("postgres://localhost/unused", 4, Duration::from_secs(1))
            .expect("a pool is built without connecting");
        Metrics::new(pool, Arc::default())
    }

    fn running(id: Uuid, version: i32) -> Transition {
        Transition {
            datasource_id: id,
            epoch: 1,
            status: Some(WorkerStatus::Running),
            running_version: Some(version),
            error: None,
            restart_count: None,
            event: None,
        }
    }

    fn event(id: Uuid, created_at: DateTime<Utc>) -> Event {
        Event {
            id: 1,
            datasource_id: Some(id),
            kind: "published".into(),
            version: Some(1),
            actor: "test".into(),
            payload: serde_json::json!({}),
            traceparent: None,
            traceparent_invalid: false,
            xid: 1,
            created_at,
        }
    }

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
    fn every_family_has_its_name_type_and_a_sentence_of_help() {
        let m = metrics();
        let id = Uuid::new_v4();
        let health = Health::default();
        health.set_running(true);
        health.records(3);
        m.worker_started(id, "generator", health);
        m.rpc_handled("/dsreg.v1.Registry/GetInfo", "OK", Duration::from_millis(2));
        m.reconcile_pass(true, Duration::from_millis(5));
        let text = m.encode().unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");

        let found = families(&text);
        let expected = [
            ("dsreg_datasource_dead_lettered", "counter"),
            ("dsreg_datasource_errors", "counter"),
            ("dsreg_datasource_last_progress_timestamp_seconds", "gauge"),
            ("dsreg_datasource_records", "counter"),
            ("dsreg_datasource_restarts", "counter"),
            ("dsreg_datasource_worker_state", "gauge"),
            ("dsreg_db_pool_available_connections", "gauge"),
            ("dsreg_db_pool_connections", "gauge"),
            ("dsreg_db_pool_max_connections", "gauge"),
            ("dsreg_db_pool_waiting_tasks", "gauge"),
            ("dsreg_fenced_writes", "counter"),
            ("dsreg_grpc_request_duration_seconds", "histogram"),
            ("dsreg_grpc_requests", "counter"),
            ("dsreg_instances_live", "gauge"),
            ("dsreg_lease_moves", "counter"),
            ("dsreg_lease_renewals", "counter"),
            ("dsreg_leases_held", "gauge"),
            ("dsreg_notification_path_failures", "counter"),
            ("dsreg_notification_path_ok", "gauge"),
            ("dsreg_otel_export_failures", "counter"),
            ("dsreg_otel_spans_dropped", "counter"),
            ("dsreg_outbox_horizon_age_seconds", "gauge"),
            ("dsreg_outbox_horizon_holder_pid", "gauge"),
            ("dsreg_outbox_invalid_traceparent", "counter"),
            ("dsreg_outbox_lag_seconds", "histogram"),
            ("dsreg_outbox_listener_connected", "gauge"),
            ("dsreg_outbox_listener_reconnects", "counter"),
            ("dsreg_outbox_notifications_malformed", "counter"),
            ("dsreg_outbox_notifications_received", "counter"),
            ("dsreg_outbox_notify_queue_usage_ratio", "gauge"),
            ("dsreg_outbox_reanchors", "counter"),
            ("dsreg_outbox_rows_read", "counter"),
            ("dsreg_panics", "counter"),
            ("dsreg_ready", "gauge"),
            ("dsreg_sink_failing_datasources", "gauge"),
            ("dsreg_sink_flush_failures", "counter"),
            ("dsreg_sink_pending_records", "gauge"),
            ("dsreg_sink_records_lost", "counter"),
            ("dsreg_supervisor_reconcile_duration_seconds", "histogram"),
            ("dsreg_supervisor_reload_latency_seconds", "histogram"),
        ];
        let names: Vec<(&str, &str)> = found
            .iter()
            .map(|(name, (kind, _))| (name.as_str(), kind.as_str()))
            .collect();
        assert_eq!(names, expected);
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
                "dsreg_grpc_requests_total{method=\"/dsreg.v1.Registry/GetInfo\",code=\"OK\"}"
            ),
            Some(1.0)
        );
        assert_eq!(sample(&text, "dsreg_db_pool_max_connections"), Some(4.0));

        m.worker_stopped(id);
        let text = m.encode().unwrap();
        assert!(!text.contains(&id.to_string()), "{text}");
        assert!(text.contains("# TYPE dsreg_datasource_records counter\n"));
    }

    fn reload_count(m: &Metrics) -> f64 {
        sample(
            &m.encode().unwrap(),
            "dsreg_supervisor_reload_latency_seconds_count",
        )
        .unwrap()
    }

    fn reload_sum(m: &Metrics) -> f64 {
        sample(
            &m.encode().unwrap(),
            "dsreg_supervisor_reload_latency_seconds_sum",
        )
        .unwrap()
    }

    #[test]
    fn a_reload_is_measured_from_its_event_to_running_whichever_is_seen_first() {
        let m = metrics();
        let t0 = Utc::now();
        let ms = chrono::Duration::milliseconds;

        // The event is read before RUNNING is written.
        let a = Uuid::new_v4();
        m.outbox_read(&[event(a, t0)], t0 + ms(5));
        m.reload_ordered(a, 2);
        m.settle_reloads();
        assert_eq!(reload_count(&m), 0.0);
        m.states_written(&[running(a, 1)], t0 + ms(50));
        assert_eq!(reload_count(&m), 0.0, "another version's RUNNING");
        m.states_written(&[running(a, 2)], t0 + ms(100));
        assert_eq!(reload_count(&m), 1.0);
        assert!((reload_sum(&m) - 0.1).abs() < 1e-9);
        m.states_written(&[running(a, 2)], t0 + ms(900));
        assert_eq!(reload_count(&m), 1.0, "measured once");

        // RUNNING is written before the event is read (a notification acted on first).
        let b = Uuid::new_v4();
        m.reload_ordered(b, 1);
        m.states_written(&[running(b, 1)], t0 + ms(200));
        m.outbox_read(&[event(b, t0)], t0 + ms(210));
        m.settle_reloads();
        assert_eq!(reload_count(&m), 2.0);
        assert!((reload_sum(&m) - 0.3).abs() < 1e-9);

        // A start no event asked for, and an event that started nothing, are not measured,
        // and leave nothing behind for a later RUNNING.
        let c = Uuid::new_v4();
        m.reload_ordered(c, 1);
        m.settle_reloads();
        m.outbox_read(&[event(c, t0)], t0);
        m.settle_reloads();
        m.states_written(&[running(c, 1)], t0 + ms(5_000));
        assert_eq!(reload_count(&m), 2.0);

        // A worker stopped before RUNNING drops its pending measurement.
        let d = Uuid::new_v4();
        m.outbox_read(&[event(d, t0)], t0);
        m.reload_ordered(d, 1);
        m.settle_reloads();
        m.worker_stopped(d);
        m.states_written(&[running(d, 1)], t0 + ms(5_000));
        assert_eq!(reload_count(&m), 2.0);
    }

    #[test]
    fn outbox_lag_is_observed_per_event_and_never_negative() {
        let m = metrics();
        let t0 = Utc::now();
        let id = Uuid::new_v4();
        m.outbox_read(
            &[event(id, t0), event(id, t0 + chrono::Duration::seconds(1))],
            t0 + chrono::Duration::milliseconds(250),
        );
        let text = m.encode().unwrap();
        assert_eq!(sample(&text, "dsreg_outbox_lag_seconds_count"), Some(2.0));
        assert_eq!(sample(&text, "dsreg_outbox_lag_seconds_sum"), Some(0.25));
    }
}
