//! Sinks: where workers' records go, through the version's transform. One writer task
//! drains every worker's records, flushing whatever has accumulated as soon as the previous
//! flush is done (batched by size under load, no added delay at rest); its bounded queue is
//! the backpressure workers feel, so a sink outage slows sources instead of dropping records.
//!
//! Targets: `postgres` (the embedded default: one statement per flush into
//! `datasource_records`) and `http` (a JSON array POSTed to a gateway URL per flush; 429 with
//! `Retry-After`, 5xx and connection errors are retried with backoff until they succeed).
//! Delivery is at least once: a flush retried after a timeout may arrive twice. Records the
//! transform refuses become dead letters in `datasource_dead_letters`, as do batches the
//! gateway rejects outright (4xx other than 429).
//!
//! A connector writes with [`SinkHandle::write`] (queued) or [`SinkHandle::write_durable`]
//! (returns once the records are committed: what a push source answers 202 on).

use std::collections::HashSet;
use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Error;
use crate::db::repository::leases;
use crate::db::repository::records::{self, SinkColumns};
use crate::transform::Transform;

/// Records per flush at most.
const MAX_BATCH: usize = 5_000;
/// Queue capacity, in batches sent by workers.
const QUEUE: usize = 1_024;

/// An input record the transform refused, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The input record.
    pub record: Value,
    /// Short machine-readable reason.
    pub code: &'static str,
    /// The reason.
    pub message: String,
}

struct Batch {
    datasource_id: Uuid,
    version: i32,
    epoch: i64,
    records: Vec<Value>,
    dead: Vec<DeadLetter>,
    /// Told whether the batch was written (false: refused, its lease is no longer held).
    ack: Option<oneshot::Sender<bool>>,
}

/// What became of written input records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Output records queued (or committed) for the sink.
    pub written: usize,
    /// Input records sent to dead letters.
    pub dead_lettered: usize,
}

/// A worker's handle on the sink: its datasource, version, fencing epoch and transform.
#[derive(Clone)]
pub struct SinkHandle {
    queue: mpsc::Sender<Batch>,
    datasource_id: Uuid,
    version: i32,
    epoch: i64,
    transform: Transform,
    health: super::Health,
    lease: super::LeaseCheck,
}

impl SinkHandle {
    /// This handle refuses writes once `lease` no longer holds, before they reach the queue.
    pub fn fenced(mut self, lease: super::LeaseCheck) -> Self {
        self.lease = lease;
        self
    }

    /// Transforms `records` and queues the result for the next flush; waits while the queue
    /// is full.
    ///
    /// # Errors
    /// [`Error::Sink`] when the sink has shut down.
    pub async fn write(&self, records: Vec<Value>) -> Result<Outcome, Error> {
        self.send(records, None).await
    }

    /// Like [`Self::write`], and returns only once the records are committed.
    ///
    /// # Errors
    /// [`Error::Sink`] when the sink has shut down before committing them, or refused them
    /// because this instance no longer holds the datasource's lease under this epoch.
    pub async fn write_durable(&self, records: Vec<Value>) -> Result<Outcome, Error> {
        let (ack, committed) = oneshot::channel();
        let outcome = self.send(records, Some(ack)).await?;
        match committed.await {
            Ok(true) => Ok(outcome),
            Ok(false) => Err(Error::Sink(format!(
                "refused: this instance no longer holds the datasource's lease (epoch {})",
                self.epoch
            ))),
            Err(_) => Err(Error::Sink("the sink shut down before committing".into())),
        }
    }

    async fn send(
        &self,
        records: Vec<Value>,
        ack: Option<oneshot::Sender<bool>>,
    ) -> Result<Outcome, Error> {
        if !self.lease.holds() {
            return Err(Error::Sink(format!(
                "refused: this instance no longer surely holds the datasource's lease (epoch {})",
                self.epoch
            )));
        }
        let (records, dead) = self.apply(records).await;
        if !dead.is_empty() {
            self.health.dead_lettered(dead.len() as u64);
        }
        let outcome = Outcome {
            written: records.len(),
            dead_lettered: dead.len(),
        };
        self.queue
            .send(Batch {
                datasource_id: self.datasource_id,
                version: self.version,
                epoch: self.epoch,
                records,
                dead,
                ack,
            })
            .await
            .map_err(|_| Error::Sink("the sink has shut down".into()))?;
        Ok(outcome)
    }

    /// Runs the transform; a script runs on the blocking pool, so a slow record (bounded by
    /// the transform's deadline) never holds up the runtime other workers share.
    async fn apply(&self, records: Vec<Value>) -> (Vec<Value>, Vec<DeadLetter>) {
        if self.transform.is_identity() {
            return (records, Vec::new());
        }
        let transform = self.transform.clone();
        let run = move || {
            let mut out = Vec::with_capacity(records.len());
            let mut dead = Vec::new();
            for record in records {
                match transform.apply(&record) {
                    Ok(outputs) => out.extend(outputs),
                    Err(e) => dead.push(DeadLetter {
                        record,
                        code: e.code(),
                        message: e.to_string(),
                    }),
                }
            }
            (out, dead)
        };
        // The closure does not panic; a failed join means the runtime is shutting down.
        tokio::task::spawn_blocking(run).await.unwrap_or_default()
    }
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
}

/// The sink workers write to; cheap to clone.
#[derive(Clone)]
pub struct Sink {
    queue: mpsc::Sender<Batch>,
}

/// The writer task of a [`Sink`].
pub struct SinkWriter {
    pool: Pool,
    target: Target,
    instance: String,
    queue: mpsc::Receiver<Batch>,
    metrics: Option<crate::telemetry::metrics::Metrics>,
}

impl Sink {
    /// A sink writing to `target` (dead letters always go to `pool`'s database) on behalf of
    /// `instance`'s workers, and the writer that must run for it to drain. Every batch is
    /// fenced by its worker's lease: what an instance writes for a datasource it no longer
    /// holds, or under an old epoch, is refused.
    pub fn new(pool: Pool, target: Target, instance: String) -> (Self, SinkWriter) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self { queue: tx },
            SinkWriter {
                pool,
                target,
                instance,
                queue: rx,
                metrics: None,
            },
        )
    }

    /// Returns once every record queued before the call is written (or refused): a stopped
    /// worker's last records reach the sink before its lease is given up.
    pub async fn flushed(&self) {
        let (ack, done) = oneshot::channel();
        let marker = Batch {
            datasource_id: Uuid::nil(),
            version: 0,
            epoch: 0,
            records: Vec::new(),
            dead: Vec::new(),
            ack: Some(ack),
        };
        if self.queue.send(marker).await.is_ok() {
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
        health: super::Health,
    ) -> SinkHandle {
        SinkHandle {
            queue: self.queue.clone(),
            datasource_id,
            version,
            epoch,
            transform,
            health,
            lease: super::LeaseCheck::always(),
        }
    }
}

impl SinkWriter {
    /// Counts refused (fenced) records in `metrics`.
    pub fn measure(&mut self, metrics: crate::telemetry::metrics::Metrics) {
        self.metrics = Some(metrics);
    }

    /// Flushes queued records until `shutdown`, then drains what is queued.
    ///
    /// A failed flush is retried with a short pause; records are kept until they are written
    /// or the process stops.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut pending: Vec<Batch> = Vec::new();
        loop {
            if pending.is_empty() {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    batch = self.queue.recv() => match batch {
                        Some(b) => pending.push(b),
                        None => break,
                    },
                }
            }
            let mut size: usize = pending.iter().map(|b| b.records.len() + b.dead.len()).sum();
            while size < MAX_BATCH {
                match self.queue.try_recv() {
                    Ok(b) => {
                        size += b.records.len() + b.dead.len();
                        pending.push(b);
                    }
                    Err(_) => break,
                }
            }
            match self.flush(&pending).await {
                Ok(accepted) => self.acknowledge(&mut pending, &accepted),
                Err(e) => {
                    tracing::warn!(error = %e, records = size, "sink flush failed; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
        self.queue.close();
        while let Ok(b) = self.queue.try_recv() {
            pending.push(b);
        }
        if !pending.is_empty() {
            match self.flush(&pending).await {
                Ok(accepted) => self.acknowledge(&mut pending, &accepted),
                Err(e) => {
                    tracing::error!(error = %e, "final sink flush failed; queued records lost")
                }
            }
        }
    }

    /// Writes `batches`; returns the (datasource, epoch) pairs whose leases held, whose
    /// records were written. The others' records were refused.
    async fn flush(&self, batches: &[Batch]) -> Result<HashSet<(Uuid, i64)>, crate::db::Error> {
        let pairs: HashSet<(Uuid, i64)> =
            batches.iter().map(|b| (b.datasource_id, b.epoch)).collect();
        let client = self.pool.get().await?;
        let (rejected, held) = match &self.target {
            Target::Postgres => (None, None),
            Target::Http { client: http, url } => {
                // The gateway cannot check leases: ask first, and send only what still holds.
                let pairs: Vec<(Uuid, i64)> = pairs.iter().copied().collect();
                let held: HashSet<(Uuid, i64)> = leases::holding(&**client, &self.instance, &pairs)
                    .await?
                    .into_iter()
                    .collect();
                let sent: Vec<&Batch> = batches
                    .iter()
                    .filter(|b| held.contains(&(b.datasource_id, b.epoch)))
                    .collect();
                (post(http, url, &sent).await, Some(held))
            }
        };
        let batches: Vec<&Batch> = batches
            .iter()
            .filter(|b| {
                held.as_ref()
                    .is_none_or(|h| h.contains(&(b.datasource_id, b.epoch)))
            })
            .collect();
        let mut rows = SinkColumns::default();
        for b in batches {
            if matches!(self.target, Target::Postgres) {
                for r in &b.records {
                    rows.datasource_ids.push(b.datasource_id);
                    rows.versions.push(b.version);
                    rows.epochs.push(b.epoch);
                    rows.records.push(r);
                }
            }
            let refused = rejected
                .as_deref()
                .map(|reason| b.records.iter().map(move |r| (r, "sink_rejected", reason)));
            let dead = b
                .dead
                .iter()
                .map(|d| (&d.record, d.code, d.message.as_str()));
            for (record, code, message) in dead.chain(refused.into_iter().flatten()) {
                rows.dead_datasource_ids.push(b.datasource_id);
                rows.dead_versions.push(b.version);
                rows.dead_epochs.push(b.epoch);
                rows.dead_records.push(record);
                rows.dead_codes.push(code);
                rows.dead_errors.push(message);
            }
        }
        if rows.records.is_empty() && rows.dead_records.is_empty() {
            return Ok(held.unwrap_or(pairs));
        }
        let written: HashSet<(Uuid, i64)> = records::append(&**client, &rows, &self.instance)
            .await?
            .into_iter()
            .collect();
        // A pair with nothing to write here (all sent to the gateway) held if the gateway got it.
        Ok(match held {
            Some(held) => held,
            None => written,
        })
    }

    /// Tells the writers of `pending` whether their batches were written, and counts the
    /// records refused.
    fn acknowledge(&self, pending: &mut Vec<Batch>, accepted: &HashSet<(Uuid, i64)>) {
        let mut refused = 0usize;
        for batch in pending.drain(..) {
            let ok = accepted.contains(&(batch.datasource_id, batch.epoch))
                || (batch.records.is_empty() && batch.dead.is_empty());
            if !ok {
                refused += batch.records.len() + batch.dead.len();
            }
            if let Some(ack) = batch.ack {
                let _ = ack.send(ok);
            }
        }
        if refused > 0 {
            tracing::warn!(
                records = refused,
                "records refused: their worker's lease is no longer held by this instance under its epoch"
            );
            if let Some(metrics) = &self.metrics {
                metrics.writes_fenced("records", refused as u64);
            }
        }
    }
}

/// POSTs every record of `batches` as one JSON array, retrying until the gateway takes it;
/// returns the gateway's reason when it refuses the batch for good (a 4xx other than 429).
async fn post(client: &reqwest::Client, url: &str, batches: &[&Batch]) -> Option<String> {
    let body: Vec<Value> = batches
        .iter()
        .flat_map(|b| {
            b.records.iter().map(move |r| {
                serde_json::json!({
                    "datasource_id": b.datasource_id,
                    "version": b.version,
                    "epoch": b.epoch,
                    "record": r,
                })
            })
        })
        .collect();
    if body.is_empty() {
        return None;
    }
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let mut attempt: u32 = 0;
    loop {
        let sent = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await;
        let wait = match sent {
            Ok(response) if response.status().is_success() => return None,
            Ok(response) if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS => response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s.min(60))),
            Ok(response) if response.status().is_client_error() => {
                return Some(format!(
                    "the gateway refused the batch: {}",
                    response.status()
                ));
            }
            Ok(response) => {
                tracing::warn!(status = %response.status(), attempt, "http sink: gateway error; retrying");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e.without_url(), attempt, "http sink: request failed; retrying");
                None
            }
        };
        let backoff = Duration::from_millis(100)
            .saturating_mul(1 << attempt.min(9))
            .min(Duration::from_secs(30));
        tokio::time::sleep(wait.unwrap_or(backoff)).await;
        attempt = attempt.saturating_add(1);
    }
}
