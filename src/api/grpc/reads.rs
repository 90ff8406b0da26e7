//! Coalesced status reads: every `GetStatus`, `WatchStatus` and lifecycle-wait read of one
//! datasource goes through reader tasks (the registry runs one), each of which takes every
//! read queued while its previous statement ran and answers them all with one statement
//! (`state::with_datasources`).
//!
//! A read alone costs one statement, as before, plus a hop through a channel; 64 callers at
//! once cost a handful of statements instead of 64, which is most of what a status read
//! costs the database. Every answer still comes from a statement started after its request
//! was queued: nothing is cached.
//!
//! Idle `WatchStatus` streams re-read on a shared clock ([`StatusReads::reread_clock`]), not
//! each on a timer of its own: the streams are dealt into [`PHASES`] groups, one group's reads
//! arrive together at each tick and a statement or two answers them all. A thousand idle
//! streams cost a statement every half second instead of two hundred a second, and no tick
//! brings every stream's read at once.
//!
//! The readers and the clock stop when the server shuts down (`shutdown`); a read queued then
//! is answered UNAVAILABLE.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::status;
use crate::db::repository::datasources::Datasource;
use crate::db::repository::state::{self, State};

/// Most datasources read by one statement.
const MAX_BATCH: usize = 256;

/// How often the shared re-read clock ticks: how stale an idle `WatchStatus` stream's
/// heartbeat time may get (heartbeats wake no one), and how soon a missed notification is made
/// good.
pub const REREAD_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The groups idle streams are dealt into: one group re-reads at each tick, a tick every
/// [`REREAD_EVERY`] / `PHASES`.
pub const PHASES: u32 = 10;

type Answer = Result<(Datasource, State), tonic::Status>;
/// A queued read: the datasource, and where its answer goes.
type Read = (Uuid, oneshot::Sender<Answer>);

/// Queues single-datasource reads for the reader tasks; cheap to share.
#[derive(Debug)]
pub struct StatusReads {
    queue: mpsc::UnboundedSender<Read>,
    clock: Vec<watch::Receiver<u64>>,
}

impl StatusReads {
    /// Starts `readers` reader tasks on `tracker` (each holds a pooled connection only while
    /// its statement runs), stopping at `shutdown`.
    pub fn start(
        pool: Pool,
        readers: usize,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let (queue, queued) = mpsc::unbounded_channel();
        let queued = Arc::new(Mutex::new(queued));
        for _ in 0..readers.max(1) {
            tracker.spawn(reader(pool.clone(), queued.clone(), shutdown.clone()));
        }
        let (ticks, clock): (Vec<_>, Vec<_>) = (0..PHASES).map(|_| watch::channel(0)).unzip();
        tracker.spawn(async move {
            let mut every = tokio::time::interval(REREAD_EVERY / PHASES);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            for phase in (0..ticks.len()).cycle() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => ticks[phase].send_modify(|n| *n += 1),
                }
            }
        });
        Self { queue, clock }
    }

    /// A re-read clock of a group chosen at random: `changed()` resolves every
    /// [`REREAD_EVERY`], when every stream of the group re-reads, so their reads are coalesced.
    pub fn reread_clock(&self) -> watch::Receiver<u64> {
        let phase = rand::random_range(0..self.clock.len());
        self.clock[phase].clone()
    }

    /// The datasource and its state, read by a statement that starts after this call.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown id; UNAVAILABLE when the database is, or the server is
    /// stopping.
    pub async fn read(&self, id: Uuid) -> Answer {
        let stopping = || tonic::Status::unavailable("the registry is shutting down");
        let (answer, answered) = oneshot::channel();
        self.queue.send((id, answer)).map_err(|_| stopping())?;
        answered.await.map_err(|_| stopping())?
    }
}

/// Takes what is queued (waiting for the first read), reads it in one statement, answers.
async fn reader(
    pool: Pool,
    queued: Arc<Mutex<mpsc::UnboundedReceiver<Read>>>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        {
            let mut queued = tokio::select! {
                () = shutdown.cancelled() => return,
                queued = queued.lock() => queued,
            };
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = queued.recv_many(&mut batch, MAX_BATCH) => received,
            };
            if received == 0 {
                return;
            }
        }
        let mut ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        let read = async {
            let client = pool.get().await?;
            state::with_datasources(&client, &ids).await
        }
        .await;
        match read {
            Ok(mut found) => {
                // Duplicates (one datasource watched by several callers) get clones.
                let mut left: HashMap<Uuid, usize> = HashMap::new();
                for (id, _) in &batch {
                    *left.entry(*id).or_default() += 1;
                }
                for (id, answer) in batch.drain(..) {
                    let n = left.get_mut(&id).expect("counted above");
                    *n -= 1;
                    let row = if *n == 0 {
                        found.remove(&id)
                    } else {
                        found.get(&id).cloned()
                    };
                    let _ = answer.send(row.ok_or_else(|| status::datasource_not_found(id)));
                }
            }
            Err(e) => {
                let refused = status::db(e);
                for (_, answer) in batch.drain(..) {
                    let _ = answer.send(Err(refused.clone()));
                }
            }
        }
    }
}
