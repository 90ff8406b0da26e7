//! The Prometheus registry served at `/metrics` in the OpenMetrics text format, and the
//! [`Metrics`] handle the components report to: a sink the others write to, which reads no
//! other module.
//!
//! - [`names`]: every family's name, type, unit and help ([`NAMES`]), the one list the
//!   registry, the collectors and the tests use;
//! - [`exposition`]: the two text formats a scrape is served in;
//! - `reloads`: the reload-latency pairing below;
//! - `workers`: the live workers' series, read at scrape time from their [`Figures`];
//! - `dead_letters`: dead letters waiting, per datasource for the ones with the most.
//!
//! Counting stays where it happens. Per-datasource figures are read at scrape time from the
//! live workers' [`Figures`] (this instance's workers only: a datasource's series appear when
//! its worker starts here and disappear when it stops); the LISTEN connection's and the
//! pool's come from collectors their owners hand to [`Metrics::new`]. Only what has no other
//! home is recorded here: reload latency, outbox lag, reconcile passes, RPCs.
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

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry, Unit};
use uuid::Uuid;

mod dead_letters;
pub mod exposition;
pub mod names;
mod reloads;
mod workers;

pub use dead_letters::DEAD_LETTER_SERIES;
pub use exposition::{CONTENT_TYPE, TEXT_CONTENT_TYPE, to_prometheus_text, wants_openmetrics};
pub use names::NAMES;
pub use workers::{Figures, Identity};

use crate::domain::WorkerStatus;
use dead_letters::DeadLetterCounts;

/// Time test runs' threads rested to keep to their share of a core, process-wide
/// (`dsreg_harness_rested_seconds_total`): the transform's pacing adds to it.
pub static HARNESS_RESTED: std::sync::LazyLock<Counter<f64, std::sync::atomic::AtomicU64>> =
    std::sync::LazyLock::new(Counter::default);
use reloads::Reloads;
use workers::{Worker, Workers};

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
    auto_disabled: Counter,
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
    /// A registry that also reads `collectors` at each scrape: the figures their owners keep
    /// (the LISTEN connection's, the database pool's), each family one of [`NAMES`].
    pub fn new(collectors: Vec<Box<dyn Collector>>) -> Self {
        // The registry ends every registered metric's help with a period; collectors write
        // their own.
        let mut registry = Registry::default();
        let workers = Arc::new(Workers::default());
        registry.register_collector(Box::new(Arc::clone(&workers)));
        registry.register_collector(Box::new(SpanExport));
        let dead_letters = Arc::new(DeadLetterCounts::default());
        registry.register_collector(Box::new(Arc::clone(&dead_letters)));
        for collector in collectors {
            registry.register_collector(collector);
        }

        let reload_latency = Histogram::new(RELOAD_BUCKETS);
        register(
            &mut registry,
            &names::RELOAD_LATENCY,
            reload_latency.clone(),
        );
        let outbox_lag = fast_histogram();
        register(&mut registry, &names::OUTBOX_LAG, outbox_lag.clone());
        let invalid_traceparents = Counter::default();
        register(
            &mut registry,
            &names::INVALID_TRACEPARENT,
            invalid_traceparents.clone(),
        );
        register(
            &mut registry,
            &names::PANICS,
            crate::telemetry::panics::counter(),
        );
        register(
            &mut registry,
            &names::HARNESS_RESTED,
            HARNESS_RESTED.clone(),
        );
        let horizon_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        register(&mut registry, &names::HORIZON_AGE, horizon_age.clone());
        let horizon_pid = Gauge::default();
        register(&mut registry, &names::HORIZON_PID, horizon_pid.clone());
        let outbox_rows = Counter::default();
        register(&mut registry, &names::OUTBOX_ROWS, outbox_rows.clone());
        let outbox_reanchors = Counter::default();
        register(
            &mut registry,
            &names::OUTBOX_REANCHORS,
            outbox_reanchors.clone(),
        );
        let notify_queue = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        register(&mut registry, &names::NOTIFY_QUEUE, notify_queue.clone());
        let reconcile: Histograms<PassLabels> = Family::new_with_constructor(fast_histogram);
        register(&mut registry, &names::RECONCILE, reconcile.clone());
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        register(&mut registry, &names::RPC_REQUESTS, rpc_requests.clone());
        let rpc_duration: Histograms<RpcLabels> = Family::new_with_constructor(fast_histogram);
        register(&mut registry, &names::RPC_DURATION, rpc_duration.clone());
        let fenced = Family::<PassLabels, Counter>::default();
        register(&mut registry, &names::FENCED, fenced.clone());
        let lease_moves = Family::<PassLabels, Counter>::default();
        register(&mut registry, &names::LEASE_MOVES, lease_moves.clone());
        let lease_renewals = Family::<PassLabels, Counter>::default();
        register(
            &mut registry,
            &names::LEASE_RENEWALS,
            lease_renewals.clone(),
        );
        let leases_held = Gauge::default();
        register(&mut registry, &names::LEASES_HELD, leases_held.clone());
        let instances_live = Gauge::default();
        register(
            &mut registry,
            &names::INSTANCES_LIVE,
            instances_live.clone(),
        );
        let sink_failing = Gauge::default();
        register(&mut registry, &names::SINK_FAILING, sink_failing.clone());
        let sink_pending = Gauge::default();
        register(&mut registry, &names::SINK_PENDING, sink_pending.clone());
        let sink_failures = Family::<PassLabels, Counter>::default();
        register(&mut registry, &names::SINK_FAILURES, sink_failures.clone());
        let sink_lost = Counter::default();
        register(&mut registry, &names::SINK_LOST, sink_lost.clone());
        let ready = Gauge::default();
        register(&mut registry, &names::READY, ready.clone());
        let auto_disabled = Counter::default();
        register(&mut registry, &names::AUTO_DISABLED, auto_disabled.clone());
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
            auto_disabled,
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

    /// A worker of `datasource` started on this instance: its series appear, read from
    /// `figures`.
    pub fn worker_started(&self, datasource: Uuid, kind: &'static str, figures: Arc<dyn Figures>) {
        let mut workers = lock(&self.0.workers.0);
        let identity = workers.remove(&datasource).and_then(|w| w.identity);
        workers.insert(
            datasource,
            Worker {
                kind,
                figures,
                status: WorkerStatus::Starting,
                identity,
            },
        );
    }

    /// The worker of `datasource` was given `identity` (at its start and at each reload):
    /// `dsreg_datasource_info` names it so while it runs here.
    pub fn worker_identity(&self, datasource: Uuid, identity: Identity) {
        if let Some(worker) = lock(&self.0.workers.0).get_mut(&datasource) {
            worker.identity = Some(identity);
        }
    }

    /// The live figures of `datasource`'s worker, while it runs on this instance.
    pub fn worker_figures(&self, datasource: Uuid) -> Option<Arc<dyn Figures>> {
        lock(&self.0.workers.0)
            .get(&datasource)
            .map(|w| w.figures.clone())
    }

    /// The worker of `datasource` is stopping for good: its series and any reload awaiting it
    /// are dropped.
    pub fn worker_stopped(&self, datasource: Uuid) {
        lock(&self.0.workers.0).remove(&datasource);
        lock(&self.0.reloads).stopped(datasource);
    }

    /// The state writer recorded `transitions` at `at`: live workers take their new status and
    /// a RUNNING on the version a reload awaits completes it.
    pub fn states_written(&self, transitions: &[StateWritten], at: DateTime<Utc>) {
        {
            let mut workers = lock(&self.0.workers.0);
            for t in transitions {
                if let (Some(status), Some(worker)) = (t.status, workers.get_mut(&t.datasource)) {
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
                if let Some(sample) = reloads.running(t.datasource, t.running_version, at) {
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
    pub fn outbox_read(&self, events: impl IntoIterator<Item = EventRead>, at: DateTime<Utc>) {
        let mut reloads = lock(&self.0.reloads);
        for event in events {
            self.0
                .outbox_lag
                .observe(seconds_between(event.created_at, at));
            if event.invalid_traceparent {
                self.0.invalid_traceparents.inc();
            }
            if let Some(id) = event.datasource {
                reloads.asked(id, event.created_at);
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
        lock(&self.0.reloads).ordered(datasource, version);
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

    /// The give-up policy disabled `count` datasources.
    pub fn datasources_auto_disabled(&self, count: u64) {
        self.0.auto_disabled.inc_by(count);
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
    pub fn leases_held(&self, leases: usize, instances: usize) {
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

/// An outbox event as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct EventRead {
    /// The datasource it concerns (`None`: every one).
    pub datasource: Option<Uuid>,
    /// Its commit (`created_at`).
    pub created_at: DateTime<Utc>,
    /// Whether its writer set a malformed trace context.
    pub invalid_traceparent: bool,
}

/// A worker state as the state writer recorded it.
#[derive(Debug, Clone, Copy)]
pub struct StateWritten {
    /// The datasource.
    pub datasource: Uuid,
    /// Its new status, if it changed.
    pub status: Option<WorkerStatus>,
    /// The version it runs.
    pub running_version: Option<i32>,
}

fn register(registry: &mut Registry, family: &names::Family, metric: impl Metric) {
    if family.seconds {
        registry.register_with_unit(family.name, family.help, Unit::Seconds, metric);
    } else {
        registry.register(family.name, family.help, metric);
    }
}

/// The span exporter's counters ([`super::otel`]).
#[derive(Debug)]
struct SpanExport;

impl Collector for SpanExport {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        for (family, value) in [
            (&names::OTEL_SPANS_DROPPED, super::otel::dropped_spans()),
            (&names::OTEL_EXPORT_FAILURES, super::otel::failed_exports()),
        ] {
            ConstCounter::new(value).encode(family.describe(&mut encoder)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(Vec::new())
    }

    fn running(id: Uuid, version: i32) -> StateWritten {
        StateWritten {
            datasource: id,
            status: Some(WorkerStatus::Running),
            running_version: Some(version),
        }
    }

    fn event(id: Uuid, created_at: DateTime<Utc>) -> EventRead {
        EventRead {
            datasource: Some(id),
            created_at,
            invalid_traceparent: false,
        }
    }

    fn sample(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
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
        m.outbox_read([event(a, t0)], t0 + ms(5));
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
        m.outbox_read([event(b, t0)], t0 + ms(210));
        m.settle_reloads();
        assert_eq!(reload_count(&m), 2.0);
        assert!((reload_sum(&m) - 0.3).abs() < 1e-9);

        // A start no event asked for, and an event that started nothing, are not measured,
        // and leave nothing behind for a later RUNNING.
        let c = Uuid::new_v4();
        m.reload_ordered(c, 1);
        m.settle_reloads();
        m.outbox_read([event(c, t0)], t0);
        m.settle_reloads();
        m.states_written(&[running(c, 1)], t0 + ms(5_000));
        assert_eq!(reload_count(&m), 2.0);

        // A worker stopped before RUNNING drops its pending measurement.
        let d = Uuid::new_v4();
        m.outbox_read([event(d, t0)], t0);
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
            [event(id, t0), event(id, t0 + chrono::Duration::seconds(1))],
            t0 + chrono::Duration::milliseconds(250),
        );
        let text = m.encode().unwrap();
        assert_eq!(sample(&text, "dsreg_outbox_lag_seconds_count"), Some(2.0));
        assert_eq!(sample(&text, "dsreg_outbox_lag_seconds_sum"), Some(0.25));
    }
}
