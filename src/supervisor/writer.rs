//! The state writer: every worker transition and its event go through one task that writes
//! whatever has accumulated in one statement (`state::apply_transitions`), so a burst of
//! 1,000 starts costs a handful of statements and a single start is written within
//! [`LINGER`], together with whatever follows it that soon.
//!
//! It runs until every [`WriterHandle`] is dropped, so the final transitions of stopping
//! workers are written before it returns. A failed write is retried; nothing is dropped.
//! Every transition is fenced by its datasource's lease: one whose epoch is no longer held
//! by this instance is refused, with its event.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::lease::PeerPresence;
use crate::db::repository::events::NewEvent;
use crate::db::repository::state::{self, Transition};
use crate::domain::WorkerStatus;
use crate::telemetry::metrics::StateWritten;

/// Most transitions written per statement.
const MAX_BATCH: usize = 5_000;

/// How long a batch stays open for more transitions after its first: a worker's start and
/// its first success (a poll answered a moment later) go in one statement, and the write
/// keeps off the path of the start it records.
const LINGER: Duration = Duration::from_millis(2);

enum Message {
    Transition(Transition),
    /// Answered once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

/// Sends transitions to the writer; cheap to clone.
#[derive(Clone)]
pub struct WriterHandle(mpsc::UnboundedSender<Message>);

impl WriterHandle {
    /// Queues a transition; never blocks. Its event is stamped now, when it happened, not
    /// when its batch reaches the database.
    pub fn send(&self, mut transition: Transition) {
        if let Some(event) = &mut transition.event {
            event.at.get_or_insert_with(chrono::Utc::now);
        }
        // The writer outlives every handle; a send can only fail during process exit.
        let _ = self.0.send(Message::Transition(transition));
    }

    /// Returns once every transition queued before the call is written (or refused).
    pub async fn flushed(&self) {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Message::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// A batch that reached the database: which datasources now show which status, and when.
#[derive(Debug, Clone)]
pub struct Written {
    /// (datasource, status, running version) as written.
    pub states: Vec<(Uuid, Option<WorkerStatus>, Option<i32>)>,
    /// When the statement returned.
    pub at: Instant,
}

/// The writer task.
pub struct StateWriter {
    pool: Pool,
    queue: mpsc::UnboundedReceiver<Message>,
    instance: String,
    actor: String,
    observer: Option<mpsc::UnboundedSender<Written>>,
    activity: Option<crate::outbox::Activity>,
    metrics: Option<crate::telemetry::metrics::Metrics>,
    peers: PeerPresence,
    prepared: bool,
}

impl StateWriter {
    /// A writer for `instance` and the handle that feeds it. After every written batch it
    /// bumps `activity` (API waits and watches), reports the batch to `metrics` (worker
    /// states, reloads reaching RUNNING) and to `observer` (benchmarks and tests). It NOTIFYs
    /// the written batches only while `peers` says other instances may listen. With
    /// `prepared`, its statement is prepared once per pooled connection
    /// ([`crate::db::repository::typed::Pooled`]).
    pub fn new(
        pool: Pool,
        prepared: bool,
        instance: String,
        activity: Option<crate::outbox::Activity>,
        metrics: Option<crate::telemetry::metrics::Metrics>,
        peers: PeerPresence,
        observer: Option<mpsc::UnboundedSender<Written>>,
    ) -> (Self, WriterHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        let actor = format!("dsreg:{instance}");
        (
            Self {
                pool,
                queue: rx,
                instance,
                actor,
                observer,
                activity,
                metrics,
                peers,
                prepared,
            },
            WriterHandle(tx),
        )
    }

    /// Writes until every handle is dropped and the queue is empty.
    pub async fn run(mut self) {
        let mut pending: HashMap<Uuid, Transition> = HashMap::new();
        let mut order: Vec<Uuid> = Vec::new();
        let mut events: Vec<NewEvent> = Vec::new();
        let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
        let mut open = true;
        loop {
            if pending.is_empty() {
                for flush in flushes.drain(..) {
                    let _ = flush.send(());
                }
                match self.queue.recv().await {
                    Some(Message::Transition(t)) => add(&mut pending, &mut order, &mut events, t),
                    Some(Message::Flush(flush)) => {
                        let _ = flush.send(());
                        continue;
                    }
                    None => return,
                }
            }
            // What follows within the linger joins the batch: a start and its first success
            // come a moment apart and are written together.
            let linger = tokio::time::sleep(LINGER);
            tokio::pin!(linger);
            while open && pending.len() < MAX_BATCH {
                let message = match self.queue.try_recv() {
                    Ok(message) => Some(message),
                    Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                        biased;
                        message = self.queue.recv() => message,
                        () = &mut linger => break,
                    },
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                };
                match message {
                    Some(Message::Transition(t)) => add(&mut pending, &mut order, &mut events, t),
                    Some(Message::Flush(flush)) => {
                        // Everything before it is in this batch: answered once it is written.
                        flushes.push(flush);
                        break;
                    }
                    None => open = false,
                }
            }
            let batch: Vec<Transition> = order
                .iter()
                .filter_map(|id| pending.get(id).cloned())
                .collect();
            match self.write(&batch, &events).await {
                Ok(refused) => {
                    if !refused.is_empty() {
                        tracing::info!(
                            transitions = refused.len(),
                            "worker states refused: their leases are no longer held by this instance under their epochs"
                        );
                        if let Some(metrics) = &self.metrics {
                            metrics.writes_fenced("state", refused.len() as u64);
                        }
                    }
                    let batch: Vec<Transition> = batch
                        .into_iter()
                        .filter(|t| !refused.contains(&t.datasource_id))
                        .collect();
                    if let Some(activity) = &self.activity {
                        activity.bump_for(batch.iter().map(|t| t.datasource_id));
                    }
                    if let Some(metrics) = &self.metrics {
                        let written: Vec<StateWritten> = batch
                            .iter()
                            .map(|t| StateWritten {
                                datasource: t.datasource_id,
                                status: t.status,
                                running_version: t.running_version,
                            })
                            .collect();
                        metrics.states_written(&written, chrono::Utc::now());
                    }
                    if let Some(observer) = &self.observer {
                        let states = batch
                            .iter()
                            .map(|t| (t.datasource_id, t.status, t.running_version))
                            .collect();
                        let _ = observer.send(Written {
                            states,
                            at: Instant::now(),
                        });
                    }
                    pending.clear();
                    order.clear();
                    events.clear();
                    for flush in flushes.drain(..) {
                        let _ = flush.send(());
                    }
                    if !open && self.queue.is_empty() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, transitions = batch.len(), "writing worker states failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Writes a batch; returns the datasources whose transitions were refused.
    async fn write(
        &self,
        batch: &[Transition],
        events: &[NewEvent],
    ) -> Result<Vec<Uuid>, crate::db::Error> {
        let client = self.pool.get().await?;
        let notify = self.peers.others_may_be_live();
        state::apply_transitions(
            &crate::db::repository::typed::Pooled::new(&client, self.prepared),
            batch,
            events,
            &self.instance,
            &self.actor,
            notify,
        )
        .await
    }
}

fn add(
    pending: &mut HashMap<Uuid, Transition>,
    order: &mut Vec<Uuid>,
    events: &mut Vec<NewEvent>,
    mut t: Transition,
) {
    if let Some(event) = t.event.take() {
        events.push(event);
    }
    match pending.get_mut(&t.datasource_id) {
        Some(existing) => existing.merge(t),
        None => {
            order.push(t.datasource_id);
            pending.insert(t.datasource_id, t);
        }
    }
}
