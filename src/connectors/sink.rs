//! Sinks: where workers' records go. The `postgres` sink (the embedded default) batches the
//! records of every worker into one `INSERT` per flush, through one writer task; its bounded
//! queue is the backpressure workers feel.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Error;
use crate::db::repository::records::{self, RecordColumns};

/// Records per flush at most.
const MAX_BATCH: usize = 2_000;
/// Queue capacity, in batches sent by workers.
const QUEUE: usize = 1_024;

struct Batch {
    datasource_id: Uuid,
    version: i32,
    epoch: i64,
    records: Vec<Value>,
}

/// A worker's handle on the sink, tagged with its datasource, version and fencing epoch.
#[derive(Clone)]
pub struct SinkHandle {
    queue: mpsc::Sender<Batch>,
    datasource_id: Uuid,
    version: i32,
    epoch: i64,
}

impl SinkHandle {
    /// Queues records for the next flush; waits while the queue is full.
    ///
    /// # Errors
    /// [`Error::Sink`] when the sink has shut down.
    pub async fn write(&self, records: Vec<Value>) -> Result<(), Error> {
        self.queue
            .send(Batch {
                datasource_id: self.datasource_id,
                version: self.version,
                epoch: self.epoch,
                records,
            })
            .await
            .map_err(|_| Error::Sink("the sink has shut down".into()))
    }
}

/// The `postgres` sink: records land in `datasource_records`.
#[derive(Clone)]
pub struct PostgresSink {
    queue: mpsc::Sender<Batch>,
}

/// The writer task of a [`PostgresSink`].
pub struct PostgresSinkWriter {
    pool: Pool,
    queue: mpsc::Receiver<Batch>,
}

impl PostgresSink {
    /// A sink on `pool` and the writer that must run for it to drain.
    pub fn new(pool: Pool) -> (Self, PostgresSinkWriter) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { queue: tx }, PostgresSinkWriter { pool, queue: rx })
    }

    /// A handle for one worker run.
    pub fn handle(&self, datasource_id: Uuid, version: i32, epoch: i64) -> SinkHandle {
        SinkHandle {
            queue: self.queue.clone(),
            datasource_id,
            version,
            epoch,
        }
    }
}

impl PostgresSinkWriter {
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
            let mut size: usize = pending.iter().map(|b| b.records.len()).sum();
            while size < MAX_BATCH {
                match self.queue.try_recv() {
                    Ok(b) => {
                        size += b.records.len();
                        pending.push(b);
                    }
                    Err(_) => break,
                }
            }
            match self.flush(&pending).await {
                Ok(()) => pending.clear(),
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
        if !pending.is_empty()
            && let Err(e) = self.flush(&pending).await
        {
            tracing::error!(error = %e, "final sink flush failed; queued records lost");
        }
    }

    async fn flush(&self, batches: &[Batch]) -> Result<(), crate::db::Error> {
        let mut rows = RecordColumns::default();
        for b in batches {
            for r in &b.records {
                rows.datasource_ids.push(b.datasource_id);
                rows.versions.push(b.version);
                rows.epochs.push(b.epoch);
                rows.records.push(r);
            }
        }
        let client = self.pool.get().await?;
        records::append(&**client, &rows).await
    }
}
