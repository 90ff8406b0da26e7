//! Every metric family `/metrics` serves: name, type, unit and help, in one list. The
//! registry and the collectors register these and nothing else; the tests (the scrape's
//! families, the dashboard's queries) read the same list, so renaming one fails them.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

static SECONDS: Unit = Unit::Seconds;

/// A metric family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A counter (its samples end in `_total`).
    Counter,
    /// A gauge.
    Gauge,
    /// A histogram (its samples end in `_bucket`, `_sum`, `_count`).
    Histogram,
}

impl Kind {
    /// The type as `# TYPE` says it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }

    /// The type as collectors describe it.
    pub fn metric_type(self) -> MetricType {
        match self {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
            Kind::Histogram => MetricType::Histogram,
        }
    }
}

/// One metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// The name registered (without the unit suffix).
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Whether it is measured in seconds (its family name then ends in `_seconds`).
    pub seconds: bool,
    /// Its help, one sentence without the final period.
    pub help: &'static str,
}

impl Family {
    /// The family name: `# TYPE` names it so.
    pub fn family(&self) -> String {
        if self.seconds {
            format!("{}_seconds", self.name)
        } else {
            self.name.to_owned()
        }
    }

    /// The name queries use for its samples: the family name, with `_total` for a counter
    /// (a histogram's samples add `_bucket`, `_sum` and `_count` to it).
    pub fn sample(&self) -> String {
        match self.kind {
            Kind::Counter => format!("{}_total", self.family()),
            Kind::Gauge | Kind::Histogram => self.family(),
        }
    }

    /// The help as a sentence, as collectors write it (the registry adds the period itself).
    pub fn sentence(&self) -> String {
        format!("{}.", self.help)
    }

    /// Writes the family's `# HELP`, `# TYPE` and `# UNIT` lines, for a collector; its
    /// samples follow through the encoder returned.
    ///
    /// # Errors
    /// The text could not be written.
    pub fn describe<'a>(
        &self,
        encoder: &'a mut DescriptorEncoder<'_>,
    ) -> Result<MetricEncoder<'a>, fmt::Error> {
        encoder.encode_descriptor(
            self.name,
            &self.sentence(),
            self.seconds.then_some(&SECONDS),
            self.kind.metric_type(),
        )
    }
}

const fn family(name: &'static str, kind: Kind, help: &'static str) -> Family {
    Family {
        name,
        kind,
        seconds: false,
        help,
    }
}

const fn seconds(name: &'static str, kind: Kind, help: &'static str) -> Family {
    Family {
        name,
        kind,
        seconds: true,
        help,
    }
}

use Kind::{Counter, Gauge, Histogram};

// --- Recorded by the registry's handle ----------------------------------------------------------

/// Reload latency.
pub const RELOAD_LATENCY: Family = seconds(
    "dsreg_supervisor_reload_latency",
    Histogram,
    "Time from the commit of an outbox event asking for a worker (publish, rollback, restart, start) to its worker recorded RUNNING",
);
/// Outbox lag.
pub const OUTBOX_LAG: Family = seconds(
    "dsreg_outbox_lag",
    Histogram,
    "Time from the commit of an outbox event to the supervisor reading it",
);
/// Malformed trace contexts.
pub const INVALID_TRACEPARENT: Family = family(
    "dsreg_outbox_invalid_traceparent",
    Counter,
    "Outbox events read whose writer set a malformed trace context (dsreg.traceparent), which was dropped: the event was written untraced",
);
/// Panics.
pub const PANICS: Family = family(
    "dsreg_panics",
    Counter,
    "Panics anywhere in the process (each also logged as one structured ERROR line, at most 10 a second)",
);
/// Time test runs rested to keep to their CPU share.
pub const HARNESS_RESTED: Family = seconds(
    "dsreg_harness_rested",
    Counter,
    "Time test runs' threads rested to keep to their share of a core (--harness-cpu-percent)",
);
/// The outbox horizon's age.
pub const HORIZON_AGE: Family = seconds(
    "dsreg_outbox_horizon_age",
    Gauge,
    "How long the oldest open writing transaction of the server has held the outbox horizon (events of later transactions wait for it), read at each scrape; 0 when none is open",
);
/// The outbox horizon's holder.
pub const HORIZON_PID: Family = family(
    "dsreg_outbox_horizon_holder_pid",
    Gauge,
    "The backend pid of that transaction (pg_stat_activity.pid); 0 when none is open",
);
/// Outbox rows read.
pub const OUTBOX_ROWS: Family = family(
    "dsreg_outbox_rows_read",
    Counter,
    "Rows the supervisor's outbox reads returned from the database (what reading the outbox costs)",
);
/// Outbox reader restarts.
pub const OUTBOX_REANCHORS: Family = family(
    "dsreg_outbox_reanchors",
    Counter,
    "Times the outbox reader started over because another server, timeline or history answered (failover, restore)",
);
/// The NOTIFY queue.
pub const NOTIFY_QUEUE: Family = family(
    "dsreg_outbox_notify_queue_usage_ratio",
    Gauge,
    "The share of the database server's NOTIFY queue in use (pg_notification_queue_usage(), 0 to 1), read every second; above 0.5 readiness warns, at 1 publishes fail",
);
/// Reconcile passes.
pub const RECONCILE: Family = seconds(
    "dsreg_supervisor_reconcile_duration",
    Histogram,
    "Reconcile passes and how long each took, by pass (full resync or targeted)",
);
/// gRPC calls.
pub const RPC_REQUESTS: Family = family(
    "dsreg_grpc_requests",
    Counter,
    "gRPC calls answered, by method and status code (streaming calls when their response starts)",
);
/// gRPC call durations.
pub const RPC_DURATION: Family = seconds(
    "dsreg_grpc_request_duration",
    Histogram,
    "Time to answer a gRPC call, by method and status code (streaming calls: to the start of the response)",
);
/// Fenced writes.
pub const FENCED: Family = family(
    "dsreg_fenced_writes",
    Counter,
    "Writes refused because this instance no longer held the datasource's lease under the writer's epoch, by what was written (records, state)",
);
/// Lease moves.
pub const LEASE_MOVES: Family = family(
    "dsreg_lease_moves",
    Counter,
    "Datasource leases this instance acquired, released (rebalance, retired, shutdown) or lost (not renewed in time)",
);
/// Lease renewals.
pub const LEASE_RENEWALS: Family = family(
    "dsreg_lease_renewals",
    Counter,
    "Lease renewal statements (one per tick for every lease held), by outcome",
);
/// Leases held.
pub const LEASES_HELD: Family = family(
    "dsreg_leases_held",
    Gauge,
    "Datasource leases this instance holds",
);
/// Live instances.
pub const INSTANCES_LIVE: Family = family(
    "dsreg_instances_live",
    Gauge,
    "Registry instances alive as this instance last saw them (itself included)",
);
/// Datasources failing in the sink.
pub const SINK_FAILING: Family = family(
    "dsreg_sink_failing_datasources",
    Gauge,
    "Datasources whose records wait in the sink for a retry after a failed flush",
);
/// Records waiting in the sink.
pub const SINK_PENDING: Family = family(
    "dsreg_sink_pending_records",
    Gauge,
    "Records and dead letters waiting in the sink to be stored",
);
/// Sink flush failures.
pub const SINK_FAILURES: Family = family(
    "dsreg_sink_flush_failures",
    Counter,
    "Failed sink flush attempts, by kind (transient: retried with backoff; refused: the target refused the data, which is split to dead-letter the refused records)",
);
/// Records lost by the sink.
pub const SINK_LOST: Family = family(
    "dsreg_sink_records_lost",
    Counter,
    "Records the sink could store neither in its target nor as dead letters (at shutdown, or refused everywhere)",
);
/// Readiness.
pub const READY: Family = family(
    "dsreg_ready",
    Gauge,
    "Whether this instance can serve (1) or not (0), as /readyz and gRPC health say: the database answers with the latest schema and the LISTEN connection is up; re-checked every second",
);

// --- This instance's workers, read at each scrape -----------------------------------------------

/// Records committed.
pub const DATASOURCE_RECORDS: Family = family(
    "dsreg_datasource_records",
    Counter,
    "Records of the datasource committed to the sink (after the transform)",
);
/// Dead letters.
pub const DATASOURCE_DEAD_LETTERED: Family = family(
    "dsreg_datasource_dead_lettered",
    Counter,
    "Input records of the datasource sent to dead letters",
);
/// Worker errors.
pub const DATASOURCE_ERRORS: Family = family(
    "dsreg_datasource_errors",
    Counter,
    "Errors the datasource's worker met without stopping",
);
/// Worker restarts.
pub const DATASOURCE_RESTARTS: Family = family(
    "dsreg_datasource_restarts",
    Counter,
    "Connector runs of the datasource's worker after its first (retries after failures, reloads, restart requests)",
);
/// Last progress.
pub const DATASOURCE_LAST_PROGRESS: Family = seconds(
    "dsreg_datasource_last_progress_timestamp",
    Gauge,
    "When the datasource's worker last made progress (a record handled, a poll answered), in Unix seconds; absent before its first",
);
/// Worker state.
pub const DATASOURCE_WORKER_STATE: Family = family(
    "dsreg_datasource_worker_state",
    Gauge,
    "1 for the state last recorded for the datasource's worker (starting, running, error, crash_loop, stalled, stopped)",
);
/// A datasource's identity, for joins.
pub const DATASOURCE_INFO: Family = family(
    "dsreg_datasource_info",
    Gauge,
    "1 for each datasource whose worker runs on this instance, labelled with its organisation, project, name, kind and the version it runs (join on datasource to name or roll up the other series)",
);

// --- The LISTEN connection and the notification path --------------------------------------------

/// The LISTEN connection.
pub const LISTENER_CONNECTED: Family = family(
    "dsreg_outbox_listener_connected",
    Gauge,
    "1 while the LISTEN connection is up",
);
/// The notification path.
pub const NOTIFICATION_PATH_OK: Family = family(
    "dsreg_notification_path_ok",
    Gauge,
    "1 while the last self-test's notification, sent through the pool, reached the LISTEN connection in time; 0 while it did not (the outbox is then polled) or before the first check",
);
/// Notification path failures.
pub const NOTIFICATION_PATH_FAILURES: Family = family(
    "dsreg_notification_path_failures",
    Counter,
    "Self-tests of the notification path whose token did not arrive in time (or the server refused to send it)",
);
/// Dead letters per datasource.
pub const DATASOURCE_DEAD_LETTERS: Family = family(
    "dsreg_datasource_dead_letters",
    Gauge,
    "Dead letters waiting for the datasource (the 100 datasources with the most; counted every minute)",
);
/// Dead letters of the datasources without a series of their own.
pub const DEAD_LETTERS_OTHER_DATASOURCES: Family = family(
    "dsreg_dead_letters_other_datasources",
    Gauge,
    "Dead letters waiting for every datasource without a series of its own in dsreg_datasource_dead_letters",
);
/// Datasources the give-up policy disabled.
pub const AUTO_DISABLED: Family = family(
    "dsreg_datasources_auto_disabled",
    Counter,
    "Datasources this instance disabled because their worker failed with no healthy run for longer than the give-up time (--give-up-after-secs)",
);
/// Notification path checks that could not send their token.
pub const NOTIFICATION_PATH_UNTESTED: Family = family(
    "dsreg_notification_path_untested",
    Counter,
    "Self-tests of the notification path that could not send their token (no pooled connection free in time); they leave the verdict as it was",
);
/// LISTEN reconnects.
pub const LISTENER_RECONNECTS: Family = family(
    "dsreg_outbox_listener_reconnects",
    Counter,
    "Reconnects of the LISTEN connection after its first connect",
);
/// Notifications received.
pub const NOTIFICATIONS_RECEIVED: Family = family(
    "dsreg_outbox_notifications_received",
    Counter,
    "Notifications received on the LISTEN connection",
);
/// Malformed notifications.
pub const NOTIFICATIONS_MALFORMED: Family = family(
    "dsreg_outbox_notifications_malformed",
    Counter,
    "Notifications whose payload could not be parsed (each still woke the supervisor)",
);

// --- Span export ----------------------------------------------------------------------------------

/// Spans dropped.
pub const OTEL_SPANS_DROPPED: Family = family(
    "dsreg_otel_spans_dropped",
    Counter,
    "Spans lost because their batch could not be exported to the OTLP collector, or the collector rejected them",
);
/// Failed span exports.
pub const OTEL_EXPORT_FAILURES: Family = family(
    "dsreg_otel_export_failures",
    Counter,
    "Span exports to the OTLP collector that failed or that it answered with a partial success",
);

// --- The database pool --------------------------------------------------------------------------

/// Pool size limit.
pub const POOL_MAX: Family = family(
    "dsreg_db_pool_max_connections",
    Gauge,
    "Connections the database pool may open",
);
/// Pool size.
pub const POOL_CONNECTIONS: Family = family(
    "dsreg_db_pool_connections",
    Gauge,
    "Connections the database pool holds open, in use or idle",
);
/// Idle connections.
pub const POOL_AVAILABLE: Family = family(
    "dsreg_db_pool_available_connections",
    Gauge,
    "Idle connections ready in the database pool",
);
/// Tasks waiting for a connection.
pub const POOL_WAITING: Family = family(
    "dsreg_db_pool_waiting_tasks",
    Gauge,
    "Tasks waiting for a connection from the database pool",
);

/// An HTTP definition source's state.
pub const SYNC_SOURCE_UP: Family = family(
    "dsreg_sync_source_up",
    Gauge,
    "Whether the last pass of an HTTP definition source (serve --sync-url) fetched, read and applied it without problems (1) or not (0), by source (its URL without query)",
);
/// An HTTP definition source's failures.
pub const SYNC_SOURCE_FAILURES: Family = family(
    "dsreg_sync_source_failures",
    Counter,
    "Passes of an HTTP definition source that could not fetch or read it, were refused by the database, or skipped definitions with problems, by source; the database keeps what it has and the pass is retried with backoff",
);

/// Every family `/metrics` serves.
pub const NAMES: &[Family] = &[
    RELOAD_LATENCY,
    OUTBOX_LAG,
    INVALID_TRACEPARENT,
    PANICS,
    HARNESS_RESTED,
    HORIZON_AGE,
    HORIZON_PID,
    OUTBOX_ROWS,
    OUTBOX_REANCHORS,
    NOTIFY_QUEUE,
    RECONCILE,
    RPC_REQUESTS,
    RPC_DURATION,
    FENCED,
    LEASE_MOVES,
    LEASE_RENEWALS,
    LEASES_HELD,
    INSTANCES_LIVE,
    SINK_FAILING,
    SINK_PENDING,
    SINK_FAILURES,
    SINK_LOST,
    READY,
    DATASOURCE_RECORDS,
    DATASOURCE_DEAD_LETTERED,
    DATASOURCE_ERRORS,
    DATASOURCE_RESTARTS,
    DATASOURCE_LAST_PROGRESS,
    DATASOURCE_WORKER_STATE,
    DATASOURCE_INFO,
    LISTENER_CONNECTED,
    NOTIFICATION_PATH_OK,
    NOTIFICATION_PATH_FAILURES,
    NOTIFICATION_PATH_UNTESTED,
    DATASOURCE_DEAD_LETTERS,
    DEAD_LETTERS_OTHER_DATASOURCES,
    AUTO_DISABLED,
    LISTENER_RECONNECTS,
    NOTIFICATIONS_RECEIVED,
    NOTIFICATIONS_MALFORMED,
    OTEL_SPANS_DROPPED,
    OTEL_EXPORT_FAILURES,
    POOL_MAX,
    POOL_CONNECTIONS,
    POOL_AVAILABLE,
    POOL_WAITING,
    SYNC_SOURCE_UP,
    SYNC_SOURCE_FAILURES,
];
