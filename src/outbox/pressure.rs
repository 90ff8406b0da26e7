//! What holds the outbox back, watched: the oldest transaction holding an xid anywhere on the
//! server (every event committed after it is final, and read, only once it ends) and the
//! server's NOTIFY queue (when it fills, every publish fails at COMMIT). Read once a second;
//! published as gauges, as readiness details, and as rate-limited log lines that name the
//! blocking backend. It decides nothing; it stops with its shutdown token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::db::repository::events::{self, Pressure};
use crate::telemetry::metrics::Metrics;

/// Above this share of the NOTIFY queue in use, readiness carries a warning and the log says so.
pub const QUEUE_WARN_ABOVE: f64 = 0.5;
/// How often the server is looked at.
const INTERVAL: Duration = Duration::from_secs(1);
/// How long one look may take.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// The same warning is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// The last reading, shared with readiness.
#[derive(Debug, Default)]
pub struct PressureState {
    /// `f64` bits of the NOTIFY queue's usage.
    queue_usage: AtomicU64,
}

impl PressureState {
    /// The share of the NOTIFY queue in use at the last reading, 0 to 1.
    pub fn queue_usage(&self) -> f64 {
        f64::from_bits(self.queue_usage.load(Ordering::Relaxed))
    }

    /// What readiness reports beside "ready": nothing while all is well.
    pub fn warnings(&self) -> Vec<String> {
        queue_warning(self.queue_usage()).into_iter().collect()
    }
}

/// The warning for a NOTIFY queue `usage` full, if it is above [`QUEUE_WARN_ABOVE`].
fn queue_warning(usage: f64) -> Option<String> {
    (usage > QUEUE_WARN_ABOVE).then(|| {
        format!(
            "the database's NOTIFY queue is {:.0}% full: a listening session is not reading (or sits in a long transaction); at 100% every publish fails",
            usage * 100.0
        )
    })
}

/// Watches [`Pressure`] until shut down.
pub struct PressureWatch {
    pool: Pool,
    warn_after: Duration,
    metrics: Option<Metrics>,
    state: Arc<PressureState>,
}

/// When a warning was last logged, and about what.
#[derive(Debug, Default)]
struct Logged {
    holder: Option<(i32, Instant)>,
    queue: Option<Instant>,
}

impl PressureWatch {
    /// A watch on `pool`'s server that logs a transaction holding the horizon back once it is
    /// `warn_after` old.
    pub fn new(pool: Pool, warn_after: Duration, metrics: Option<Metrics>) -> Self {
        Self {
            pool,
            warn_after,
            metrics,
            state: Arc::default(),
        }
    }

    /// The state readiness reads.
    pub fn state(&self) -> Arc<PressureState> {
        self.state.clone()
    }

    /// Looks at the server every second until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut logged = Logged::default();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(INTERVAL) => {}
            }
            let read = async {
                let client = self.pool.get().await.map_err(crate::db::Error::from)?;
                events::pressure(&**client).await
            };
            match tokio::time::timeout(READ_TIMEOUT, read).await {
                Ok(Ok(pressure)) => self.observe(&pressure, &mut logged, Instant::now()),
                // Readiness reports an unreachable database; this watch only waits for it.
                Ok(Err(e)) => tracing::debug!(error = %e, "outbox pressure not read"),
                Err(_) => tracing::debug!("outbox pressure not read in time"),
            }
        }
    }

    fn observe(&self, pressure: &Pressure, logged: &mut Logged, now: Instant) {
        self.state
            .queue_usage
            .store(pressure.queue_usage.to_bits(), Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.outbox_horizon(pressure.holder.as_ref().map(|h| (h.pid, h.age_seconds)));
            m.notify_queue_usage(pressure.queue_usage);
        }
        if let Some(h) = &pressure.holder
            && Duration::from_secs_f64(h.age_seconds) >= self.warn_after
            && logged
                .holder
                .is_none_or(|(pid, at)| pid != h.pid || now.duration_since(at) >= LOG_EVERY)
        {
            tracing::warn!(
                pid = h.pid,
                database = h.database.as_deref().unwrap_or("?"),
                transaction_age_s = h.age_seconds.round() as u64,
                "a long transaction holds the outbox back: events committed after it are read only once it ends"
            );
            logged.holder = Some((h.pid, now));
        }
        if let Some(warning) = queue_warning(pressure.queue_usage)
            && logged
                .queue
                .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            tracing::warn!(usage = pressure.queue_usage, "{warning}");
            logged.queue = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_warning_starts_above_half_and_says_how_full() {
        assert_eq!(queue_warning(0.0), None);
        assert_eq!(queue_warning(0.5), None);
        let warning = queue_warning(0.63).unwrap();
        assert!(warning.contains("63% full"), "{warning}");
        let state = PressureState::default();
        assert!(state.warnings().is_empty());
        state.queue_usage.store(0.9f64.to_bits(), Ordering::Relaxed);
        assert_eq!(state.warnings().len(), 1);
    }
}
