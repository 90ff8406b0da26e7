//! Dead-letter retention: deletes dead letters past their age and beyond each datasource's
//! count, once at start and then every [`INTERVAL`], so the table cannot grow without bound.
//! It also counts the dead letters waiting for `/metrics`. Every instance may run it: deleting what is already gone deletes nothing. Stops when its
//! token is cancelled.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::repository::dead_letters;

/// How often the bounds are applied.
pub const INTERVAL: Duration = Duration::from_secs(60);

/// The bounds; `None` leaves one off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Dead letters older than this are deleted.
    pub max_age: Option<Duration>,
    /// Each datasource keeps at most this many, the newest.
    pub max_per_datasource: Option<i64>,
}

impl Retention {
    /// Applies the bounds now; returns how many dead letters were deleted.
    ///
    /// # Errors
    /// The database could not be reached or the statement failed.
    pub async fn apply(&self, pool: &deadpool_postgres::Pool) -> Result<u64, super::Error> {
        if self.max_age.is_none() && self.max_per_datasource.is_none() {
            return Ok(0);
        }
        let client = pool
            .get()
            .await
            .map_err(|e| super::Error::Unavailable(e.to_string()))?;
        dead_letters::prune(&**client, self.max_age, self.max_per_datasource).await
    }

    /// Applies the bounds at once and every [`INTERVAL`] until `shutdown`; a failure is
    /// logged and tried again at the next tick.
    ///
    /// # Cancel safety
    /// Runs until cancelled; an interrupted delete is rolled back by the database.
    pub async fn run(
        self,
        pool: deadpool_postgres::Pool,
        metrics: crate::telemetry::metrics::Metrics,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.apply(&pool).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "dead letters past their retention deleted"),
                Err(e) => tracing::warn!(error = %e, "applying the dead-letter retention failed"),
            }
            match count(&pool).await {
                Ok((top, rest)) => metrics.dead_letters_counted(top, rest),
                Err(e) => tracing::warn!(error = %e, "counting dead letters failed"),
            }
        }
    }
}

/// The datasources with the most dead letters and the total of the others, for `/metrics`.
async fn count(
    pool: &deadpool_postgres::Pool,
) -> Result<(Vec<(uuid::Uuid, i64)>, i64), super::Error> {
    let client = pool
        .get()
        .await
        .map_err(|e| super::Error::Unavailable(e.to_string()))?;
    dead_letters::top_counts(&**client, crate::telemetry::metrics::DEAD_LETTER_SERIES).await
}
