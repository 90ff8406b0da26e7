//! Sinks: where workers' records go, through the version's transform. One writer task
//! drains every worker's records, flushing whatever has accumulated as soon as the previous
//! flush is done (batched by size under load, no added delay at rest; one statement for many
//! datasources while all is well).
//!
//! Targets: `postgres` (the embedded default: one statement per flush into
//! `datasource_records`), `http` (a JSON array POSTed to a gateway URL per flush) and `kafka`
//! (each record a message to one topic, see [`super::kafka_sink`]).
//! Delivery is at least once: a flush retried after a timeout may arrive twice.
//!
//! # Failure behaviour
//!
//! - **At the edge** ([`SinkHandle`]), before anything reaches a target: an input record
//!   holding U+0000 (NUL) anywhere, in a key or a string, is dead-lettered (`nul_character`),
//!   as is an input whose transform output holds one; a transform that fails or panics on a
//!   record dead-letters that record (its error code, `transform_panicked` for a panic), and
//!   the other records go on.
//! - **A record the target refuses for good** (Postgres SQLSTATE classes 22 data exception,
//!   23 constraint, 54 too large; a gateway's 400, 413 or 422) is found by splitting the
//!   flush in halves until the refused records stand alone; each is dead-lettered
//!   (`unstorable`, with the reason) and everything else commits.
//! - **Dead letters** go to `datasource_dead_letters` in the registry's database, whatever
//!   the target. A record Postgres cannot store as jsonb is kept as
//!   `{"json_text": "<its JSON text, \u-escaped to ASCII>"}` (lossless), and past 64 KiB as
//!   `{"json_text_prefix": …, "bytes": n}`; error messages have NULs escaped.
//! - **Transient failures** (the database or gateway unreachable, 5xx, 408, 429, other
//!   server errors) retry per datasource with capped exponential backoff and jitter, honouring
//!   `Retry-After` (seconds or an HTTP date). A flush of many datasources that fails this
//!   way is retried one datasource at a time, so one datasource's failure never holds
//!   another's records. Each datasource has at most [`MAX_PENDING`] records waiting: beyond
//!   that its own workers wait (backpressure), no one else's. The `http` target gives up
//!   after [`RetryPolicy::http_attempts`] attempts and dead-letters the records (`sink_unavailable`); the
//!   `postgres` target keeps retrying, since the database is the records' only home.
//! - **Signals**: [`SinkStatus`] (readiness fails once the sink has failed and committed
//!   nothing for a second, its target unreachable or several datasources failing) and the metrics `dsreg_sink_failing_datasources`,
//!   `dsreg_sink_pending_records`, `dsreg_sink_flush_failures` and `dsreg_sink_records_lost`.
//! - **Shutdown**: after the workers stop, every waiting datasource gets one more attempt
//!   within the shutdown grace (the `http` target's leftovers are dead-lettered); what still
//!   cannot be stored is logged per datasource, counted as lost, and its push senders are
//!   answered with an error so they retry.
//!
//! A connector writes with [`SinkHandle::write`] (queued) or [`SinkHandle::write_durable`]
//! (returns once every record is committed or dead-lettered: what a push source answers 202
//! on). Counters ([`super::Health`]) count what was committed and dead-lettered, when it was.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Error, Health};
use crate::db::repository::leases;
use crate::db::repository::records::{self, SinkColumns};
use crate::transform::Transform;

/// Longest `Retry-After` a gateway is obeyed for (a longer one is cut to this).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Records per flush at most.
const MAX_BATCH: usize = 5_000;
/// Queue capacity, in batches sent by workers.
const QUEUE: usize = 1_024;
/// Records (and dead letters) one datasource's worker may have waiting in the sink; beyond
/// it, its writes wait.
pub const MAX_PENDING: usize = 20_000;
/// How a datasource whose flush failed is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First delay; doubles per failure.
    pub base: Duration,
    /// Longest delay (before jitter).
    pub max: Duration,
    /// Attempts at the `http` target before a datasource's waiting records are
    /// dead-lettered (`sink_unavailable`).
    pub http_attempts: u32,
}

impl Default for RetryPolicy {
    /// 200 ms doubling to 30 s; 10 attempts at the `http` target.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            max: Duration::from_secs(30),
            http_attempts: 10,
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `failures + 1`: exponential from `base`, capped at `max`,
    /// with jitter down to half so datasources failing together spread out.
    fn delay(&self, failures: u32) -> Duration {
        crate::backoff::Exponential::new(self.base, self.max).delay(failures, rand::random::<f64>())
    }
}
/// One attempt (a statement, a POST) taking longer counts as a transient failure.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the sink may fail without committing anything before readiness says so.
const STUCK_AFTER: Duration = Duration::from_secs(1);
/// Shutdown drain budget when no grace was given.
const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
/// Longest JSON text a dead letter keeps of a record Postgres refused; beyond, a prefix.
const MAX_KEPT_TEXT: usize = 64 * 1024;

/// An input record that could not be stored, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The record (in a form the database stores).
    pub record: Value,
    /// Short machine-readable reason.
    pub code: &'static str,
    /// The reason.
    pub message: String,
}

impl DeadLetter {
    /// A dead letter of `record`; NULs in `message` are escaped, since Postgres text cannot
    /// hold them.
    pub fn new(record: Value, code: &'static str, message: impl Into<String>) -> Self {
        let message: String = message.into();
        Self {
            record,
            code,
            message: message.replace('\0', "\\u0000"),
        }
    }
}

/// What became of written input records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Output records committed (queued, for [`SinkHandle::write`]).
    pub written: usize,
    /// Records sent to dead letters: inputs refused at the edge or by the transform, outputs
    /// the target refused.
    pub dead_lettered: usize,
}

/// Why a batch's records were not all committed or dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Undelivered {
    /// This instance no longer holds the datasource's lease under the writer's epoch.
    Fenced,
    /// Neither the target nor the dead letters took them (the reason).
    Lost(String),
    /// The target cannot be written as configured (the reason): the writer keeps them.
    HandedBack(String),
}

/// Where a JSON value holds U+0000, as a JSON Pointer, if anywhere.
pub fn find_nul(value: &Value) -> Option<String> {
    fn escape(key: &str) -> String {
        key.replace('~', "~0")
            .replace('/', "~1")
            .replace('\0', "\\u0000")
    }
    match value {
        Value::String(s) if s.contains('\0') => Some(String::new()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_nul(v).map(|p| format!("/{i}{p}"))),
        Value::Object(fields) => fields.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                return Some(format!("/{}", escape(k)));
            }
            find_nul(v).map(|p| format!("/{}{p}", escape(k)))
        }),
        _ => None,
    }
}

/// A form of `record` every Postgres database stores as jsonb: its JSON text, with every
/// character outside ASCII (and NUL, as JSON always does) `\u`-escaped, as one string.
/// Lossless: parsing `json_text` gives the record back.
pub fn storable(record: &Value) -> Value {
    json!({ "json_text": ascii_json(record) })
}

/// The last resort for a record whose full text is refused too (too large): a prefix.
fn storable_prefix(record: &Value) -> Value {
    let text = ascii_json(record);
    let bytes = text.len();
    // ASCII only: any index is a character boundary.
    let prefix = text.get(..MAX_KEPT_TEXT.min(bytes)).unwrap_or_default();
    json!({ "json_text_prefix": prefix, "bytes": bytes })
}

fn ascii_json(record: &Value) -> String {
    let text = record.to_string();
    let mut out = String::with_capacity(text.len());
    // Non-ASCII characters only occur inside JSON strings, where an escape means the same.
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// A batch one worker sent, and what became of it so far.
struct Batch {
    datasource_id: Uuid,
    version: i32,
    epoch: i64,
    /// Output records not yet settled.
    records: Vec<Value>,
    /// Dead letters not yet stored.
    dead: Vec<DeadLetter>,
    /// Told what became of the batch once every record is settled.
    ack: Option<oneshot::Sender<Result<Outcome, Undelivered>>>,
    health: Health,
    /// Settled so far.
    done: Outcome,
    /// Records the fence refused.
    fenced: usize,
    /// Records neither target nor dead letters took, and why.
    lost: Option<(usize, String)>,
    /// Why the target cannot be written as configured, when the batch is handed back.
    handed_back: Option<String>,
    /// Arrival order, for flush requests.
    seq: u64,
    /// The room it takes in its datasource's allowance; freed when the batch is dropped.
    _room: Option<OwnedSemaphorePermit>,
}

impl Batch {
    fn is_settled(&self) -> bool {
        self.records.is_empty() && self.dead.is_empty()
    }

    fn pending(&self) -> usize {
        self.records.len() + self.dead.len()
    }
}

enum Message {
    Batch(Batch),
    /// Answered once every batch sent before it is settled or waiting after a failure.
    Flushed(oneshot::Sender<()>),
}

/// Records through the sink's edge ([`SinkHandle::edge`]), waiting to be written: what may be
/// stored, and the dead letters beside them.
#[derive(Debug)]
pub struct Edged {
    records: Vec<Value>,
    dead: Vec<DeadLetter>,
}

/// A worker's handle on the sink: its datasource, version, fencing epoch and transform.
#[derive(Clone)]
pub struct SinkHandle {
    queue: mpsc::Sender<Message>,
    datasource_id: Uuid,
    version: i32,
    epoch: i64,
    transform: Transform,
    health: Health,
    room: Arc<Semaphore>,
    lease: super::LeaseCheck,
}

impl SinkHandle {
    /// This handle refuses writes once `lease` no longer holds, before they reach the queue.
    pub fn fenced(mut self, lease: super::LeaseCheck) -> Self {
        self.lease = lease;
        self
    }

    /// Transforms `records` and queues the result for the next flush; waits while the queue
    /// is full or this datasource has [`MAX_PENDING`] records waiting.
    ///
    /// # Errors
    /// [`Error::Sink`] when the sink has shut down.
    pub async fn write(&self, records: Vec<Value>) -> Result<Outcome, Error> {
        self.send(records, Vec::new(), None).await
    }

    /// Like [`Self::write`], and returns only once every record is committed or
    /// dead-lettered, with what became of them.
    ///
    /// # Errors
    /// [`Error::Sink`] when the sink shut down before settling them, could store them
    /// nowhere, or refused them because this instance no longer holds the datasource's lease
    /// under this epoch.
    pub async fn write_durable(&self, records: Vec<Value>) -> Result<Outcome, Error> {
        self.write_durable_with(records, Vec::new()).await
    }

    /// Like [`Self::write_durable`], with input records the source itself could not turn
    /// into records (a Kafka message that does not decode), settled as dead letters in the
    /// same flush.
    ///
    /// # Errors
    /// As [`Self::write_durable`].
    pub async fn write_durable_with(
        &self,
        records: Vec<Value>,
        undecodable: Vec<DeadLetter>,
    ) -> Result<Outcome, Error> {
        let edged = self.edge(records, undecodable).await?;
        self.write_edged_durable(edged).await
    }

    /// Runs the sink's edge (the NUL checks and the transform) on `records` ahead of their
    /// write, with `undecodable` input records to dead-letter beside them: a source may so
    /// transform one batch while the previous one is being written, and write it with
    /// [`Self::write_edged_durable`].
    ///
    /// # Errors
    /// [`Error::Sink`] when this instance no longer surely holds the datasource's lease (no
    /// transform runs then) or the runtime is shutting down.
    pub async fn edge(
        &self,
        records: Vec<Value>,
        undecodable: Vec<DeadLetter>,
    ) -> Result<Edged, Error> {
        self.check_lease()?;
        let (records, mut dead) = self.apply(records).await?;
        dead.extend(undecodable);
        Ok(Edged { records, dead })
    }

    /// Like [`Self::write_durable_with`], for records through [`Self::edge`] already.
    ///
    /// # Errors
    /// As [`Self::write_durable`].
    pub async fn write_edged_durable(&self, edged: Edged) -> Result<Outcome, Error> {
        let (ack, settled) = oneshot::channel();
        self.send_edged(edged, Some(ack)).await?;
        match settled.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(Undelivered::Fenced)) => Err(Error::Sink(format!(
                "refused: this instance no longer holds the datasource's lease (epoch {})",
                self.epoch
            ))),
            Ok(Err(Undelivered::Lost(reason))) => Err(Error::Sink(format!(
                "records could not be stored: {reason}"
            ))),
            Ok(Err(Undelivered::HandedBack(reason))) => Err(Error::Sink(format!(
                "the sink cannot write to its target: {reason}"
            ))),
            Err(_) => Err(Error::Sink("the sink shut down before committing".into())),
        }
    }

    async fn send(
        &self,
        records: Vec<Value>,
        undecodable: Vec<DeadLetter>,
        ack: Option<oneshot::Sender<Result<Outcome, Undelivered>>>,
    ) -> Result<Outcome, Error> {
        let edged = self.edge(records, undecodable).await?;
        self.send_edged(edged, ack).await
    }

    fn check_lease(&self) -> Result<(), Error> {
        if self.lease.holds() {
            return Ok(());
        }
        Err(Error::Sink(format!(
            "refused: this instance no longer surely holds the datasource's lease (epoch {})",
            self.epoch
        )))
    }

    async fn send_edged(
        &self,
        Edged { records, dead }: Edged,
        ack: Option<oneshot::Sender<Result<Outcome, Undelivered>>>,
    ) -> Result<Outcome, Error> {
        self.check_lease()?;
        let queued = Outcome {
            written: records.len(),
            dead_lettered: dead.len(),
        };
        let want = (records.len() + dead.len()).clamp(1, MAX_PENDING);
        let room = Arc::clone(&self.room)
            .acquire_many_owned(u32::try_from(want).unwrap_or(u32::MAX))
            .await
            .map_err(|_| Error::Sink("the sink has shut down".into()))?;
        self.queue
            .send(Message::Batch(Batch {
                datasource_id: self.datasource_id,
                version: self.version,
                epoch: self.epoch,
                records,
                dead,
                ack,
                health: self.health.clone(),
                done: Outcome::default(),
                fenced: 0,
                lost: None,
                handed_back: None,
                seq: 0,
                _room: Some(room),
            }))
            .await
            .map_err(|_| Error::Sink("the sink has shut down".into()))?;
        Ok(queued)
    }

    /// The edge: refuses records holding NUL, runs the transform (on the blocking pool, so a
    /// slow record, bounded by the transform's deadline, never holds up the runtime other
    /// workers share), and refuses outputs holding NUL.
    async fn apply(&self, records: Vec<Value>) -> Result<(Vec<Value>, Vec<DeadLetter>), Error> {
        if self.transform.is_identity() {
            return Ok(edge(records, None));
        }
        let transform = self.transform.clone();
        tokio::task::spawn_blocking(move || edge(records, Some(&transform)))
            .await
            .map_err(|_| Error::Sink("the runtime is shutting down".into()))
    }
}

/// Each record through the NUL check and `transform`: what may be stored, and dead letters.
/// The sink's edge, and a dead-letter replay's.
pub fn edge(records: Vec<Value>, transform: Option<&Transform>) -> (Vec<Value>, Vec<DeadLetter>) {
    let mut out = Vec::with_capacity(records.len());
    let mut dead = Vec::new();
    for record in records {
        if let Some(at) = find_nul(&record) {
            dead.push(DeadLetter::new(
                storable(&record),
                "nul_character",
                format!(
                    "the record holds U+0000 at '{at}', which Postgres cannot store; kept as its JSON text"
                ),
            ));
            continue;
        }
        let Some(transform) = transform else {
            out.push(record);
            continue;
        };
        // The transform contains its engine's panics; this catches whatever else in it might.
        let applied =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| transform.apply(&record)));
        match applied {
            Ok(Ok(outputs)) => match outputs.iter().find_map(find_nul) {
                None => out.extend(outputs),
                Some(at) => dead.push(DeadLetter::new(
                    record,
                    "nul_character",
                    format!(
                        "the transform's output holds U+0000 at '{at}', which Postgres cannot store"
                    ),
                )),
            },
            Ok(Err(e)) => dead.push(DeadLetter::new(record, e.code(), e.to_string())),
            Err(_) => dead.push(DeadLetter::new(
                record,
                "transform_panicked",
                "the transform panicked on this record",
            )),
        }
    }
    (out, dead)
}

/// Where flushed records go.
#[derive(Clone)]
pub enum Target {
    /// `datasource_records` in the registry's database.
    Postgres,
    /// A gateway URL that takes JSON arrays of records.
    Http {
        /// The client.
        client: reqwest::Client,
        /// The URL.
        url: String,
    },
    /// A Kafka topic (see [`super::kafka_sink`]).
    Kafka(Arc<super::kafka_sink::KafkaTarget>),
}

impl Target {
    /// Whether records leave the registry's database (`http`, `kafka`): the target cannot
    /// check leases itself, and records it keeps refusing become dead letters after
    /// [`RetryPolicy::http_attempts`] attempts.
    fn is_remote(&self) -> bool {
        !matches!(self, Target::Postgres)
    }
}

/// Whether the sink can commit, for readiness; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct SinkStatus(Arc<Mutex<StatusInner>>);

#[derive(Debug, Default)]
struct StatusInner {
    /// Since when attempts fail with no commit in between.
    stuck_since: Option<Instant>,
    /// The last failure's reason.
    last_error: String,
    /// Whether the last failure was the target's, whatever the rows (it is unreachable).
    everyone: bool,
    /// Datasources waiting after a failure.
    failing: usize,
    /// Records waiting.
    pending: usize,
}

impl SinkStatus {
    /// Whether the sink commits; otherwise why not. One datasource failing on its own is
    /// that datasource's problem (its log lines and the metrics show it), not the instance's.
    ///
    /// # Errors
    /// The sink has failed and committed nothing for a second or more, with its target
    /// unreachable or more than one datasource failing.
    pub fn check(&self) -> Result<(), String> {
        let inner = self.lock();
        match inner.stuck_since {
            Some(since)
                if since.elapsed() >= STUCK_AFTER && (inner.everyone || inner.failing > 1) =>
            {
                Err(format!(
                    "the sink has committed nothing for {} s: {} ({} datasources, {} records waiting)",
                    since.elapsed().as_secs(),
                    inner.last_error,
                    inner.failing,
                    inner.pending
                ))
            }
            _ => Ok(()),
        }
    }

    /// Datasources whose records wait for a retry after a failed flush.
    pub fn failing_datasources(&self) -> usize {
        self.lock().failing
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StatusInner> {
        // A poisoned lock only means a panic elsewhere mid-update of plain counters.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The sink workers write to; cheap to clone.
#[derive(Clone)]
pub struct Sink {
    queue: mpsc::Sender<Message>,
    status: SinkStatus,
}

/// The writer task of a [`Sink`].
pub struct SinkWriter {
    pool: Pool,
    target: Target,
    instance: String,
    queue: mpsc::Receiver<Message>,
    metrics: Option<crate::telemetry::metrics::Metrics>,
    status: SinkStatus,
    lanes: HashMap<Uuid, Lane>,
    markers: Vec<(u64, oneshot::Sender<()>)>,
    next_seq: u64,
    drain: Option<ShutdownDrain>,
    retry: RetryPolicy,
    /// While draining at shutdown: no attempt runs past this.
    deadline: Option<Instant>,
}

/// One datasource's waiting batches and retry state.
#[derive(Default)]
struct Lane {
    batches: VecDeque<Batch>,
    failures: u32,
    retry_at: Option<Instant>,
}

impl Lane {
    fn pending(&self) -> usize {
        self.batches.iter().map(Batch::pending).sum()
    }
}

/// How an attempt failed.
#[derive(Debug, Clone)]
enum Failure {
    /// The target refused the data; the same rows fail again.
    Refused(String),
    /// May succeed later.
    Transient {
        reason: String,
        /// The target asked to wait this long.
        retry_after: Option<Duration>,
        /// Nothing could have succeeded (the target is unreachable), whatever the rows.
        everyone: bool,
        /// The target cannot be written as configured (a TLS handshake that fails): waiting
        /// writers get their records back with the reason (see [`SinkWriter::failed`]).
        misconfigured: bool,
    },
}

impl Failure {
    fn transient(reason: impl Into<String>, everyone: bool) -> Self {
        Failure::Transient {
            reason: reason.into(),
            retry_after: None,
            everyone,
            misconfigured: false,
        }
    }

    /// Whether nothing could have succeeded, whatever the rows.
    fn is_everyones(&self) -> bool {
        matches!(self, Failure::Transient { everyone: true, .. })
    }

    fn from_db(e: &crate::db::Error) -> Self {
        if e.refuses_data() {
            Failure::Refused(e.brief())
        } else {
            Failure::transient(e.brief(), e.is_unreachable())
        }
    }
}

/// One record or dead letter of a batch in the flush at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Item {
    batch: usize,
    slot: Slot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Slot {
    Record(usize),
    Dead(usize),
}

/// How long the writer's final drain may take: what remains of `grace` from when `shutdown`
/// fires.
#[derive(Debug, Clone)]
pub struct ShutdownDrain {
    /// The process's shutdown, which starts the grace period.
    pub shutdown: CancellationToken,
    /// The shutdown grace period.
    pub grace: Duration,
}

/// How a sink's writer retries and drains, given at construction.
#[derive(Debug, Clone, Default)]
pub struct WriterOptions {
    /// Bounds the final drain after the writer's stop token (a short default without one).
    pub drain: Option<ShutdownDrain>,
    /// How a datasource whose flush failed is retried.
    pub retry: RetryPolicy,
}

impl Sink {
    /// A sink writing to `target` (dead letters always go to `pool`'s database) on behalf of
    /// `instance`'s workers, and the writer that must run for it to drain. Every batch is
    /// fenced by its worker's lease: what an instance writes for a datasource it no longer
    /// holds, or under an old epoch, is refused. Refused (fenced) records, failures, waiting
    /// and lost records are counted in `metrics`. The writer retries and drains as `options`
    /// say.
    pub fn new(
        pool: Pool,
        target: Target,
        instance: String,
        metrics: Option<crate::telemetry::metrics::Metrics>,
        options: WriterOptions,
    ) -> (Self, SinkWriter) {
        let WriterOptions { drain, retry } = options;
        let (tx, rx) = mpsc::channel(QUEUE);
        let status = SinkStatus::default();
        (
            Self {
                queue: tx,
                status: status.clone(),
            },
            SinkWriter {
                pool,
                target,
                instance,
                queue: rx,
                metrics,
                status,
                lanes: HashMap::new(),
                markers: Vec::new(),
                next_seq: 0,
                drain,
                retry,
                deadline: None,
            },
        )
    }

    /// Whether the sink commits, for readiness.
    pub fn status(&self) -> SinkStatus {
        self.status.clone()
    }

    /// Returns once every record queued before the call is committed, dead-lettered or
    /// refused, or waits for a retry after a failure: a stopped worker's last records reach
    /// the sink before its lease is given up, and a failing sink does not hold the caller.
    pub async fn flushed(&self) {
        let (ack, done) = oneshot::channel();
        if self.queue.send(Message::Flushed(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// A handle for one worker run.
    pub fn handle(
        &self,
        datasource_id: Uuid,
        version: i32,
        epoch: i64,
        transform: Transform,
        health: Health,
    ) -> SinkHandle {
        SinkHandle {
            queue: self.queue.clone(),
            datasource_id,
            version,
            epoch,
            transform,
            health,
            room: Arc::new(Semaphore::new(MAX_PENDING)),
            lease: super::LeaseCheck::always(),
        }
    }
}

impl SinkWriter {
    /// Flushes queued records until `stop`, then drains: every waiting datasource gets one
    /// more attempt within the shutdown grace, and what cannot be stored is reported.
    pub async fn run(mut self, stop: CancellationToken) {
        let shutdown = self.drain.as_ref().map(|d| d.shutdown.clone());
        let mut drain_by: Option<Instant> = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            if drain_by.is_none() && shutdown.as_ref().is_some_and(|s| s.is_cancelled()) {
                let grace = self.drain.as_ref().map_or(DEFAULT_DRAIN, |d| d.grace);
                drain_by = Some(Instant::now() + grace.mul_f64(0.9));
            }
            self.settle_markers();
            self.publish_status();
            let now = Instant::now();
            let picked = self.pick(now);
            if !picked.is_empty() {
                self.flush_lanes(&picked).await;
                self.receive_ready();
                continue;
            }
            let next_retry = self.lanes.values().filter_map(|l| l.retry_at).min();
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = async {
                    match &shutdown {
                        Some(s) => s.cancelled().await,
                        None => std::future::pending().await,
                    }
                }, if drain_by.is_none() => {}
                message = self.queue.recv() => match message {
                    Some(m) => {
                        self.take(m);
                        self.receive_ready();
                    }
                    None => break,
                },
                () = sleep_until(next_retry), if next_retry.is_some() => {}
            }
        }
        self.deadline = Some(drain_by.unwrap_or_else(|| Instant::now() + DEFAULT_DRAIN));
        self.finish().await;
    }

    /// Takes every message already queued, without waiting.
    fn receive_ready(&mut self) {
        while let Ok(m) = self.queue.try_recv() {
            self.take(m);
        }
    }

    fn take(&mut self, message: Message) {
        match message {
            Message::Flushed(ack) => self.markers.push((self.next_seq, ack)),
            Message::Batch(mut batch) => {
                batch.seq = self.next_seq;
                self.next_seq += 1;
                if batch.is_settled() {
                    Self::acknowledge(batch);
                } else {
                    self.lanes
                        .entry(batch.datasource_id)
                        .or_default()
                        .batches
                        .push_back(batch);
                }
            }
        }
    }

    /// Answers the flush requests whose earlier batches are all settled, or wait in a
    /// datasource that is failing.
    fn settle_markers(&mut self) {
        if self.markers.is_empty() {
            return;
        }
        let oldest = self
            .lanes
            .values()
            .filter(|l| l.failures == 0)
            .filter_map(|l| l.batches.front().map(|b| b.seq))
            .min()
            .unwrap_or(u64::MAX);
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.markers)
            .into_iter()
            .partition(|(seq, _)| *seq <= oldest);
        self.markers = waiting;
        for (_, ack) in done {
            let _ = ack.send(());
        }
    }

    /// Datasources to flush now, oldest first, up to [`MAX_BATCH`] records (at least one
    /// datasource) whose retry, if any, is due. Healthy datasources
    /// go together; one retrying after a failure goes alone, once no healthy one waits.
    fn pick(&self, now: Instant) -> Vec<Uuid> {
        let mut ready: Vec<(bool, u64, Uuid, usize)> = self
            .lanes
            .iter()
            .filter(|(_, l)| !l.batches.is_empty())
            .filter(|(_, l)| l.retry_at.is_none_or(|t| t <= now))
            .map(|(id, l)| {
                let seq = l.batches.front().map_or(0, |b| b.seq);
                (l.failures > 0, seq, *id, l.pending())
            })
            .collect();
        ready.sort_unstable();
        if let Some((true, _, id, _)) = ready.first() {
            return vec![*id];
        }
        let mut size = 0;
        let mut picked = Vec::new();
        for (failing, _, id, pending) in ready {
            if failing {
                break;
            }
            if !picked.is_empty() && size + pending > MAX_BATCH {
                continue;
            }
            size += pending;
            picked.push(id);
        }
        picked
    }

    /// Flushes the waiting batches of `lanes`: together first; when that fails for a reason
    /// that is not the rows', each datasource on its own, so none holds another.
    async fn flush_lanes(&mut self, lanes: &[Uuid]) {
        let mut work: Vec<Batch> = Vec::new();
        for id in lanes {
            if let Some(lane) = self.lanes.get_mut(id) {
                let mut size = 0;
                while let Some(batch) = lane.batches.front() {
                    if size > 0 && size + batch.pending() > MAX_BATCH {
                        break;
                    }
                    size += batch.pending();
                    work.extend(lane.batches.pop_front());
                }
            }
        }
        let items = items_of(&work);
        let failed = match self.settle(&mut work, items).await {
            Ok(()) => Vec::new(),
            Err((failure, rest)) => {
                let mut ids: Vec<Uuid> = Vec::new();
                for item in rest {
                    let id = work[item.batch].datasource_id;
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                let mut failed = Vec::new();
                let mut shared = (failure.is_everyones() || ids.len() == 1).then_some(failure);
                for id in ids {
                    if let Some(failure) = &shared {
                        failed.push((id, failure.clone()));
                        continue;
                    }
                    // The settled items are gone from `work`: what is left of a datasource's
                    // batches is exactly what is left to do.
                    let items = items_where(&work, |b| b.datasource_id == id);
                    if let Err((own, _)) = self.settle(&mut work, items).await {
                        if own.is_everyones() {
                            shared = Some(own.clone());
                        }
                        failed.push((id, own));
                    }
                }
                failed
            }
        };
        let now = Instant::now();
        let mut committed = false;
        let mut fenced = 0;
        // Back to the front of their lanes, in order: what is left of unsettled batches.
        for batch in work.into_iter().rev() {
            if batch.done.written + batch.done.dead_lettered > 0 {
                committed = true;
            }
            if batch.is_settled() {
                fenced += Self::acknowledge(batch);
            } else {
                self.lanes
                    .entry(batch.datasource_id)
                    .or_default()
                    .batches
                    .push_front(batch);
            }
        }
        // Acknowledged in reverse above; order does not matter to the senders.
        for id in lanes {
            if failed.iter().any(|(d, _)| d == id) {
                continue;
            }
            if let Some(lane) = self.lanes.get_mut(id) {
                lane.failures = 0;
                lane.retry_at = None;
            }
        }
        let mut status = self.status.lock();
        if committed || failed.is_empty() {
            status.stuck_since = None;
        }
        drop(status);
        if fenced > 0 {
            tracing::warn!(
                records = fenced,
                "records refused: their worker's lease is no longer held by this instance under its epoch"
            );
            self.metered(|m| m.writes_fenced("records", fenced as u64));
        }
        // One line for a failure many datasources share, else one per datasource.
        let quiet = failed.len() > 1;
        if let (true, Some((_, Failure::Transient { reason, .. }))) = (quiet, failed.first()) {
            tracing::warn!(
                datasources = failed.len(),
                error = %reason,
                "sink flush failed; retrying each datasource with backoff"
            );
        }
        for (id, failure) in failed {
            self.failed(id, &failure, now, quiet);
        }
        self.lanes.retain(|_, l| !l.batches.is_empty());
    }

    /// Records a transient failure of datasource `id`: its next attempt waits. When the
    /// target cannot be written as configured, the batches whose writers wait for them
    /// (durable writes) are handed back at once with the reason, so the writer fails with it
    /// (the datasource shows the error, a pull source keeps its position, a push sender is
    /// told to retry) instead of waiting through every retry; queued writes stay and retry.
    fn failed(&mut self, id: Uuid, failure: &Failure, now: Instant, quiet: bool) {
        let Failure::Transient {
            reason,
            retry_after,
            everyone,
            misconfigured,
        } = failure
        else {
            return;
        };
        if *misconfigured && let Some(lane) = self.lanes.get_mut(&id) {
            let (back, kept): (VecDeque<Batch>, VecDeque<Batch>) =
                std::mem::take(&mut lane.batches)
                    .into_iter()
                    .partition(|b| b.ack.is_some());
            lane.batches = kept;
            for mut batch in back {
                tracing::warn!(datasource_id = %id, records = batch.pending(), error = %reason, "the sink cannot write to its target as configured; the records go back to their writer");
                batch.handed_back = Some(reason.clone());
                Self::acknowledge(batch);
            }
            if lane.batches.is_empty() {
                self.lanes.remove(&id);
                self.note_failure(reason, *everyone, now);
                return;
            }
        }
        let http = self.target.is_remote();
        let Some(lane) = self.lanes.get_mut(&id) else {
            return;
        };
        lane.failures = lane.failures.saturating_add(1);
        let failures = lane.failures;
        let delay = self
            .retry
            .delay(failures)
            .max(retry_after.unwrap_or_default());
        lane.retry_at = Some(now + delay);
        let records = lane.pending();
        if !quiet && failures.is_power_of_two() {
            tracing::warn!(
                datasource_id = %id,
                records,
                failures,
                retry_in_ms = delay.as_millis() as u64,
                error = %reason,
                "sink flush failed; retrying this datasource with backoff"
            );
        }
        if http && failures >= self.retry.http_attempts {
            // The gateway did not take them in time: they become dead letters, which the
            // registry's database stores.
            let whom = match self.target {
                Target::Kafka(_) => "the Kafka brokers",
                _ => "the gateway",
            };
            let message =
                format!("{whom} did not take the records after {failures} attempts: {reason}");
            for batch in &mut lane.batches {
                for record in std::mem::take(&mut batch.records) {
                    batch
                        .dead
                        .push(DeadLetter::new(record, "sink_unavailable", message.clone()));
                }
            }
            lane.retry_at = None;
            tracing::error!(datasource_id = %id, records, error = %reason, "the gateway keeps failing; dead-lettering the datasource's waiting records");
        }
        self.note_failure(reason, *everyone, now);
    }

    /// Counts a transient failure and keeps it for readiness.
    fn note_failure(&self, reason: &str, everyone: bool, now: Instant) {
        self.metered(|m| m.sink_flush_failed("transient"));
        let mut status = self.status.lock();
        status.stuck_since.get_or_insert(now);
        reason.clone_into(&mut status.last_error);
        status.everyone = everyone;
    }

    /// Settles `items` of `work`: attempts them together, splits what the target refuses
    /// until the refused records stand alone and dead-letters them. Stops at the first
    /// transient failure, returning it and the items left.
    async fn settle(
        &self,
        work: &mut [Batch],
        items: Vec<Item>,
    ) -> Result<(), (Failure, Vec<Item>)> {
        let whole = items.len() == work.iter().map(Batch::pending).sum::<usize>();
        let mut stack = vec![items];
        let mut settled: HashSet<Item> = HashSet::new();
        let mut result = Ok(());
        while let Some(part) = stack.pop() {
            if part.is_empty() {
                continue;
            }
            match self.attempt(work, &part, None).await {
                Ok(accepted) => {
                    for item in &part {
                        credit(&mut work[item.batch], item.slot, &accepted);
                    }
                    if !(whole && stack.is_empty() && settled.is_empty()) {
                        settled.extend(part);
                    } else {
                        // Everything at once, as usual: no bookkeeping per item.
                        for batch in work.iter_mut() {
                            batch.records.clear();
                            batch.dead.clear();
                        }
                    }
                }
                Err(Failure::Refused(_)) if part.len() > 1 => {
                    self.metered(|m| m.sink_flush_failed("refused"));
                    let mut first = part;
                    let second = first.split_off(first.len() / 2);
                    stack.push(second);
                    stack.push(first);
                }
                Err(Failure::Refused(reason)) => {
                    let item = part[0];
                    match self.keep_refused(work, item, &reason).await {
                        Ok(()) => {
                            settled.insert(item);
                        }
                        Err(failure) => {
                            let mut rest = part;
                            rest.extend(stack.into_iter().rev().flatten());
                            result = Err((failure, rest));
                            break;
                        }
                    }
                }
                Err(failure) => {
                    let mut rest = part;
                    rest.extend(stack.into_iter().rev().flatten());
                    result = Err((failure, rest));
                    break;
                }
            }
        }
        remove_settled(work, &settled);
        result
    }

    /// Dead-letters one item the target refused, in a form the database stores; a record
    /// that cannot be stored even so is counted lost with the reason.
    async fn keep_refused(
        &self,
        work: &mut [Batch],
        item: Item,
        reason: &str,
    ) -> Result<(), Failure> {
        let batch = &work[item.batch];
        let (original, code, message) = match item.slot {
            Slot::Record(i) => (
                &batch.records[i],
                "unstorable",
                format!("the sink refused the record: {reason}"),
            ),
            Slot::Dead(i) => {
                let d = &batch.dead[i];
                (
                    &d.record,
                    d.code,
                    format!("{} (then refused as it was: {reason})", d.message),
                )
            }
        };
        // As it is when the dead letters take it (a gateway's or a constraint's refusal),
        // else as its JSON text, else a prefix of that.
        let forms = [
            matches!(item.slot, Slot::Record(_)).then(|| original.clone()),
            Some(storable(original)),
            Some(storable_prefix(original)),
        ];
        for form in forms.into_iter().flatten() {
            let letter = DeadLetter::new(form, code, message.clone());
            match self.attempt(work, &[item], Some(&letter)).await {
                Ok(accepted) => {
                    credit(&mut work[item.batch], Slot::Dead(usize::MAX), &accepted);
                    return Ok(());
                }
                Err(Failure::Refused(_)) => continue,
                Err(transient) => return Err(transient),
            }
        }
        let batch = &mut work[item.batch];
        tracing::error!(datasource_id = %batch.datasource_id, error = %reason, "a record could be neither written nor dead-lettered");
        self.metered(|m| m.sink_records_lost(1));
        let lost = batch.lost.get_or_insert((0, reason.to_owned()));
        lost.0 += 1;
        Ok(())
    }

    /// One attempt at `part` of `work` (with `instead`: that dead letter in place of the one
    /// item of `part`). Returns the (datasource, epoch) pairs whose leases held; the others'
    /// rows were refused by the fence.
    async fn attempt(
        &self,
        work: &[Batch],
        part: &[Item],
        instead: Option<&DeadLetter>,
    ) -> Result<HashSet<(Uuid, i64)>, Failure> {
        let limit = match self.deadline {
            Some(deadline) => deadline
                .saturating_duration_since(Instant::now())
                .min(ATTEMPT_TIMEOUT),
            None => ATTEMPT_TIMEOUT,
        };
        match tokio::time::timeout(limit, self.attempt_once(work, part, instead)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::transient(
                format!("no answer within {} ms", limit.as_millis()),
                false,
            )),
        }
    }

    async fn attempt_once(
        &self,
        work: &[Batch],
        part: &[Item],
        instead: Option<&DeadLetter>,
    ) -> Result<HashSet<(Uuid, i64)>, Failure> {
        let pairs: HashSet<(Uuid, i64)> = part
            .iter()
            .map(|i| (work[i.batch].datasource_id, work[i.batch].epoch))
            .collect();
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| Failure::from_db(&crate::db::Error::from(e)))?;
        let mut held = None;
        if let (true, None) = (self.target.is_remote(), instead) {
            // The gateway or brokers cannot check leases: ask first, and send only what
            // still holds.
            let asked: Vec<(Uuid, i64)> = pairs.iter().copied().collect();
            let holding: HashSet<(Uuid, i64)> = leases::holding(&**client, &self.instance, &asked)
                .await
                .map_err(|e| Failure::from_db(&e))?
                .into_iter()
                .collect();
            let posted: Vec<&Item> = part
                .iter()
                .filter(|i| matches!(i.slot, Slot::Record(_)))
                .filter(|i| holding.contains(&(work[i.batch].datasource_id, work[i.batch].epoch)))
                .collect();
            match &self.target {
                Target::Http { client: http, url } => post(http, url, work, &posted).await?,
                Target::Kafka(kafka) => produce(kafka, work, &posted).await?,
                Target::Postgres => {}
            }
            held = Some(holding);
        }
        let mut rows = SinkColumns::default();
        for item in part {
            let b = &work[item.batch];
            let dead = match (instead, item.slot) {
                (Some(letter), _) => Some(letter),
                (None, Slot::Dead(i)) => Some(&b.dead[i]),
                (None, Slot::Record(i)) => {
                    if held.is_none() {
                        rows.datasource_ids.push(b.datasource_id);
                        rows.versions.push(b.version);
                        rows.epochs.push(b.epoch);
                        rows.records.push(&b.records[i]);
                    }
                    None
                }
            };
            if let Some(d) = dead {
                rows.dead_datasource_ids.push(b.datasource_id);
                rows.dead_versions.push(b.version);
                rows.dead_epochs.push(b.epoch);
                rows.dead_records.push(&d.record);
                rows.dead_codes.push(d.code);
                rows.dead_errors.push(d.message.as_str());
            }
        }
        if rows.records.is_empty() && rows.dead_records.is_empty() {
            return Ok(held.unwrap_or(pairs));
        }
        let written: HashSet<(Uuid, i64)> = records::append(&**client, &rows, &self.instance)
            .await
            .map_err(|e| Failure::from_db(&e))?
            .into_iter()
            .collect();
        Ok(match held {
            // Posted records count for pairs that held when asked.
            Some(held) => held,
            None => written,
        })
    }

    /// Tells a settled batch's writer what became of it, and counts it; returns how many of
    /// its records the fence refused.
    fn acknowledge(batch: Batch) -> usize {
        let done = batch.done;
        if done.written > 0 {
            batch.health.records(done.written as u64);
        }
        if done.dead_lettered > 0 {
            batch.health.dead_lettered(done.dead_lettered as u64);
        }
        let answer = match (&batch.handed_back, &batch.lost, batch.fenced) {
            (Some(reason), _, _) => Err(Undelivered::HandedBack(reason.clone())),
            (None, Some((_, reason)), _) => Err(Undelivered::Lost(reason.clone())),
            (None, None, 0) => Ok(done),
            (None, None, _) => Err(Undelivered::Fenced),
        };
        if let Some(ack) = batch.ack {
            let _ = ack.send(answer);
        }
        batch.fenced
    }

    /// Shutdown: every waiting datasource gets one more attempt (the `http` target's
    /// leftovers a second, as dead letters) before the deadline; the rest is reported.
    async fn finish(&mut self) {
        self.queue.close();
        self.receive_ready();
        for round in 0..2 {
            let mut waiting: Vec<(u64, Uuid)> = self
                .lanes
                .iter()
                .filter_map(|(id, l)| Some((l.batches.front()?.seq, *id)))
                .collect();
            if waiting.is_empty() || self.deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            waiting.sort_unstable();
            let mut queue: VecDeque<Uuid> = waiting.into_iter().map(|(_, id)| id).collect();
            // One pass over every waiting datasource, in groups of at most MAX_BATCH.
            while !queue.is_empty() && self.deadline.is_none_or(|d| Instant::now() < d) {
                let group = self.pick_among(&mut queue);
                self.flush_lanes(&group).await;
            }
            if round == 0 && self.target.is_remote() {
                let left: Vec<Uuid> = self.lanes.keys().copied().collect();
                for id in left {
                    if let Some(lane) = self.lanes.get_mut(&id) {
                        lane.failures = lane
                            .failures
                            .max(self.retry.http_attempts.saturating_sub(1));
                    }
                    self.failed(
                        id,
                        &Failure::transient("the registry is shutting down", false),
                        Instant::now(),
                        false,
                    );
                }
            } else {
                break;
            }
        }
        let mut lost = 0usize;
        for (id, lane) in self.lanes.drain() {
            let records = lane.pending();
            lost += records;
            tracing::error!(datasource_id = %id, records, "shutting down: the sink could not store these records; push senders are told to retry");
            // Dropping the batches answers their senders with an error.
        }
        if lost > 0 {
            self.metered(|m| m.sink_records_lost(lost as u64));
        }
        for (_, ack) in self.markers.drain(..) {
            let _ = ack.send(());
        }
        self.publish_status();
    }

    /// Takes from `queue` the next datasources whose waiting records fit one flush.
    fn pick_among(&self, queue: &mut VecDeque<Uuid>) -> Vec<Uuid> {
        let mut group = Vec::new();
        let mut size = 0;
        while let Some(id) = queue.front().copied() {
            let pending = self.lanes.get(&id).map_or(0, Lane::pending);
            if !group.is_empty() && size + pending > MAX_BATCH {
                break;
            }
            size += pending;
            group.push(id);
            queue.pop_front();
        }
        group
    }

    /// Shares the waiting figures with readiness and the metrics.
    fn publish_status(&self) {
        let failing = self.lanes.values().filter(|l| l.failures > 0).count();
        let pending: usize = self.lanes.values().map(Lane::pending).sum();
        {
            let mut status = self.status.lock();
            status.failing = failing;
            status.pending = pending;
            if failing == 0 {
                status.stuck_since = None;
            }
        }
        self.metered(|m| m.sink_waiting(failing as u64, pending as u64));
    }

    fn metered(&self, f: impl FnOnce(&crate::telemetry::metrics::Metrics)) {
        if let Some(metrics) = &self.metrics {
            f(metrics);
        }
    }
}

/// Every item of `work`: each batch's dead letters, then its records.
fn items_of(work: &[Batch]) -> Vec<Item> {
    items_where(work, |_| true)
}

/// The items of the batches of `work` that `wanted` picks.
fn items_where(work: &[Batch], wanted: impl Fn(&Batch) -> bool) -> Vec<Item> {
    work.iter()
        .enumerate()
        .filter(|(_, b)| wanted(b))
        .flat_map(|(batch, b)| {
            (0..b.dead.len())
                .map(move |i| Item {
                    batch,
                    slot: Slot::Dead(i),
                })
                .chain((0..b.records.len()).map(move |i| Item {
                    batch,
                    slot: Slot::Record(i),
                }))
        })
        .collect()
}

/// Counts one settled item of `batch`: stored where `accepted` holds its pair, else fenced.
/// `Slot::Dead` also stands for a record kept as a dead letter in its place.
fn credit(batch: &mut Batch, slot: Slot, accepted: &HashSet<(Uuid, i64)>) {
    if !accepted.contains(&(batch.datasource_id, batch.epoch)) {
        batch.fenced += 1;
        return;
    }
    match slot {
        Slot::Record(_) => batch.done.written += 1,
        Slot::Dead(_) => batch.done.dead_lettered += 1,
    }
}

/// Removes the settled items from their batches, keeping the others in order.
fn remove_settled(work: &mut [Batch], settled: &HashSet<Item>) {
    if settled.is_empty() {
        return;
    }
    for (index, batch) in work.iter_mut().enumerate() {
        let keep = |slot| !settled.contains(&Item { batch: index, slot });
        batch.records = std::mem::take(&mut batch.records)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| keep(Slot::Record(*i)))
            .map(|(_, r)| r)
            .collect();
        batch.dead = std::mem::take(&mut batch.dead)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| keep(Slot::Dead(*i)))
            .map(|(_, d)| d)
            .collect();
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// POSTs the `items` records of `work` as one JSON array, once.
///
/// # Errors
/// [`Failure::Refused`] for 400, 413 and 422 (the records are at fault), otherwise
/// [`Failure::Transient`], with the `Retry-After` the gateway asked for.
async fn post(
    client: &reqwest::Client,
    url: &str,
    work: &[Batch],
    items: &[&Item],
) -> Result<(), Failure> {
    let body: Vec<Value> = items
        .iter()
        .filter_map(|item| {
            let b = &work[item.batch];
            let Slot::Record(i) = item.slot else {
                return None;
            };
            Some(json!({
                "datasource_id": b.datasource_id,
                "version": b.version,
                "epoch": b.epoch,
                "record": &b.records[i],
            }))
        })
        .collect();
    if body.is_empty() {
        return Ok(());
    }
    let body = serde_json::to_vec(&body).map_err(|e| Failure::Refused(e.to_string()))?;
    let response = client
        .post(url)
        .timeout(ATTEMPT_TIMEOUT)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| {
            let everyone = e.is_connect() || e.is_timeout();
            Failure::transient(
                format!("the gateway request failed: {}", e.without_url()),
                everyone,
            )
        })?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let reason = format!("the gateway answered {status}");
    if matches!(status.as_u16(), 400 | 413 | 422) {
        return Err(Failure::Refused(reason));
    }
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| super::retry_after(v, std::time::SystemTime::now()))
        .map(|after| after.min(MAX_RETRY_AFTER));
    Err(Failure::Transient {
        reason,
        retry_after,
        everyone: false,
        misconfigured: false,
    })
}

/// Sends `items`' records to the Kafka target, each with its worker's fencing epoch.
async fn produce(
    kafka: &super::kafka_sink::KafkaTarget,
    work: &[Batch],
    items: &[&Item],
) -> Result<(), Failure> {
    use super::kafka_sink::{Outgoing, SendFailure};
    let out: Vec<Outgoing<'_>> = items
        .iter()
        .filter_map(|item| {
            let b = &work[item.batch];
            let Slot::Record(i) = item.slot else {
                return None;
            };
            Some(Outgoing {
                datasource_id: b.datasource_id,
                version: b.version,
                epoch: b.epoch,
                record: &b.records[i],
            })
        })
        .collect();
    if out.is_empty() {
        return Ok(());
    }
    kafka.send(&out).await.map_err(|e| match e {
        SendFailure::Refused(reason) => Failure::Refused(reason),
        SendFailure::Transient(reason) => Failure::transient(reason, true),
        SendFailure::Unusable(reason) => Failure::Transient {
            reason,
            retry_after: None,
            everyone: true,
            misconfigured: true,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_is_found_in_keys_and_strings_at_any_depth() {
        assert_eq!(
            find_nul(&json!({"a": [1, {"b": "x\u{0}y"}]})),
            Some("/a/1/b".into())
        );
        assert_eq!(find_nul(&json!({"k\u{0}": 1})), Some("/k\\u0000".into()));
        assert_eq!(find_nul(&json!(["\u{0}"])), Some("/0".into()));
        assert_eq!(
            find_nul(&json!({"a/b": {"~": "\u{0}"}})),
            Some("/a~1b/~0".into())
        );
        assert_eq!(
            find_nul(&json!({"a": "\\u0000", "b": [1.5, null, true]})),
            None
        );
    }

    #[test]
    fn the_storable_form_is_ascii_and_gives_the_record_back() {
        let record = json!({"k\u{0}é": ["\u{0}", "😀", 1, null]});
        let kept = storable(&record);
        let text = kept["json_text"].as_str().unwrap();
        assert!(text.is_ascii() && !text.contains('\0'), "{text}");
        assert_eq!(serde_json::from_str::<Value>(text).unwrap(), record);
        let big = json!({"s": "x".repeat(MAX_KEPT_TEXT * 2)});
        let prefix = storable_prefix(&big);
        assert_eq!(
            prefix["json_text_prefix"].as_str().unwrap().len(),
            MAX_KEPT_TEXT
        );
        assert_eq!(prefix["bytes"], big.to_string().len());
    }

    #[test]
    fn dead_letter_messages_have_nul_escaped() {
        let d = DeadLetter::new(json!(1), "x", "bad \u{0} here");
        assert_eq!(d.message, "bad \\u0000 here");
    }

    #[test]
    fn retry_delays_grow_are_capped_and_jittered() {
        let policy = RetryPolicy::default();
        for failures in 1..40 {
            let d = policy.delay(failures);
            let full = policy
                .base
                .saturating_mul(1u32 << (failures - 1).min(16))
                .min(policy.max);
            assert!(d >= full / 2 && d <= full, "{failures}: {d:?}");
        }
    }

    #[test]
    fn the_edge_dead_letters_nul_in_inputs_and_outputs_and_passes_the_rest() {
        let transform = Transform::compile(
            Some("if record.n == 2 { #{ bad: \"\\u0000\" } } else { record }"),
            None,
            &crate::transform::Limits::default(),
        )
        .unwrap();
        let (out, dead) = edge(
            vec![json!({"n": 1}), json!({"n": 2}), json!({"n": "\u{0}"})],
            Some(&transform),
        );
        assert_eq!(out, [json!({"n": 1})]);
        let codes: Vec<&str> = dead.iter().map(|d| d.code).collect();
        assert_eq!(codes, ["nul_character", "nul_character"]);
        assert_eq!(
            dead[0].record,
            json!({"n": 2}),
            "a clean input is kept as it is"
        );
        assert!(
            dead[1].record["json_text"].is_string(),
            "{:?}",
            dead[1].record
        );
    }
}
