//! Denials written to `audit_log` off the answer's path, aggregated: one row per caller,
//! action, reason and minute with a count, so a flood of refused calls neither waits on the
//! database nor grows the table without bound, and a refusal costs the caller the same time
//! whether or not a row is written for it.
//!
//! Callers hand a denial to [`Auditor::deny`] (no I/O, no await); the writer task merges the
//! denials gathered since its last write and adds each one's count to its row. It stops with
//! its shutdown token after a last write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::repository::audit::{self, AuditContext, AuditEntry};

/// Distinct (caller, action, reason) kept between two writes; beyond it, denials are counted
/// in the log only (memory stays bounded under any flood).
const MAX_PENDING: usize = 10_000;
/// How long the writer waits for a write before it tries again later.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

type Key = (String, String, Option<String>);

#[derive(Debug, Default)]
struct Pending {
    denials: HashMap<Key, (AuditEntry, AuditContext, i32)>,
    dropped: u64,
}

#[derive(Debug, Default)]
struct Inner {
    pending: Mutex<Pending>,
    wake: Notify,
}

/// Takes denials for the audit log; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Auditor(Arc<Inner>);

impl Auditor {
    /// An auditor whose writer runs on `tracker` until `shutdown`.
    pub fn start(
        pool: Pool,
        tracker: &tokio_util::task::TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let auditor = Self::default();
        tracker.spawn(write(auditor.0.clone(), pool, shutdown));
        auditor
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A map of counters: consistent after a panic elsewhere.
        self.0
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a denial: merged with the others of its caller, action and reason, written
    /// soon after.
    pub fn deny(&self, entry: AuditEntry, context: AuditContext) {
        let key = (
            entry.actor.clone(),
            entry.action.clone(),
            entry.reason.clone(),
        );
        let mut pending = self.pending();
        let size = pending.denials.len();
        match pending.denials.get_mut(&key) {
            Some((_, _, count)) => *count = count.saturating_add(1),
            None if size < MAX_PENDING => {
                pending.denials.insert(key, (entry, context, 1));
            }
            None => pending.dropped += 1,
        }
        drop(pending);
        self.0.wake.notify_one();
    }
}

/// A fresh W3C trace id (32 lowercase hex digits), for audit rows of calls that came without
/// a trace context.
pub fn new_trace_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The writer: drains the pending denials after each wake-up and writes them.
async fn write(inner: Arc<Inner>, pool: Pool, shutdown: CancellationToken) {
    let auditor = Auditor(inner);
    loop {
        let stopping = tokio::select! {
            () = shutdown.cancelled() => true,
            () = auditor.0.wake.notified() => false,
        };
        let (denials, dropped) = {
            let mut pending = auditor.pending();
            (
                std::mem::take(&mut pending.denials),
                std::mem::take(&mut pending.dropped),
            )
        };
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "denials beyond the audit writer's bound were not written"
            );
        }
        for (_, (entry, context, count)) in denials {
            let written = tokio::time::timeout(WRITE_TIMEOUT, async {
                let client = pool.get().await.map_err(crate::db::Error::from)?;
                audit::record_denials(&**client, &entry, &context, count).await
            })
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(
                    error = %e, action = %entry.action, count, "auditing denied calls failed"
                ),
                Err(_) => tracing::warn!(
                    action = %entry.action, count, "auditing denied calls timed out"
                ),
            }
        }
        if stopping {
            return;
        }
    }
}
