//! Polling an HTTP source: a pass at start, then one every poll interval (spread a fifth
//! either way, so registries polling one server do not poll together). A pass fetches
//! conditionally; a 304 does nothing; a body is read as a bundle and synced. A source that
//! cannot be fetched or read, a pass the database refused, or one that skipped definitions
//! with problems, leaves the database as it is (but for what could be applied) and is
//! retried with backoff, asking for the body whole until one is applied without problems.
//!
//! Stops when its cancellation token fires; a pass in flight is dropped with its
//! transaction, which rolls back.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::fetch::{Fetched, Fetcher};
use super::{SourceConfig, SourceError, SourceHealth, bundle};
use crate::backoff::{Exponential, Retries};
use crate::connectors::Catalog;
use crate::files::Error;
use crate::files::sync::{Mode, Options, Report, Syncer};
use crate::transform::Limits;

/// What a pass did: nothing (a 304), or a sync.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The source had not changed.
    NotModified,
    /// The body was synced.
    Synced(Report),
}

/// Keeps the database in step with an HTTP source.
pub struct Poller {
    config: SourceConfig,
    fetcher: Fetcher,
    syncer: Syncer,
    reports: Option<mpsc::UnboundedSender<Result<Outcome, String>>>,
    health: Option<Arc<SourceHealth>>,
}

impl Poller {
    /// A poller writing through `pool`, checking with `catalog` under `limits`.
    ///
    /// # Errors
    /// The CA file cannot be read, or the TLS stack cannot be set up.
    pub fn new(
        pool: Pool,
        catalog: Catalog,
        limits: Limits,
        config: SourceConfig,
    ) -> Result<Self, SourceError> {
        Ok(Self {
            fetcher: Fetcher::new(&config)?,
            syncer: Syncer::new(pool, catalog, limits),
            config,
            reports: None,
            health: None,
        })
    }

    /// Sends each pass's outcome (or failure) to `reports`.
    pub fn report_to(&mut self, reports: mpsc::UnboundedSender<Result<Outcome, String>>) {
        self.reports = Some(reports);
    }

    /// Reports each pass to `health` (for `/metrics` and `/readyz`).
    pub fn report_health(&mut self, health: Arc<SourceHealth>) {
        health.register(self.fetcher.source().name());
        self.health = Some(health);
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        self.fetcher.source().name()
    }

    /// One pass: `Import` applies all or nothing, `Watch` what it can.
    ///
    /// # Errors
    /// [`Error::Http`] when the source cannot be fetched or read; otherwise as
    /// [`Syncer::run`].
    pub async fn pass(&mut self, mode: Mode, dry_run: bool) -> Result<Outcome, Error> {
        let (bytes, validators) = match self.fetcher.fetch().await? {
            Fetched::NotModified => return Ok(Outcome::NotModified),
            Fetched::Body { bytes, validators } => (bytes, validators),
        };
        let name = self.name().to_owned();
        let scan = tokio::task::spawn_blocking(move || bundle::scan(&name, bytes))
            .await
            .map_err(|e| SourceError::Bundle {
                source_name: self.name().to_owned(),
                reason: format!("the reader stopped: {e}"),
            })??;
        let options = Options {
            mode,
            conflict: self.config.conflict,
            prune: self.config.prune,
            dry_run,
        };
        let report = self.syncer.run_scan(scan, options, None).await?;
        // A body with problems is asked for whole again at the retry: it is reported again,
        // and what can be applied of it is.
        if !dry_run && report.problems.is_empty() {
            self.fetcher.applied(validators);
        }
        Ok(Outcome::Synced(report))
    }

    /// Polls until `shutdown` fires.
    ///
    /// # Cancel safety
    /// Dropping it mid-pass rolls that pass's transaction back; nothing is half applied.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(
            source = self.name(),
            conflict = self.config.conflict.as_str(),
            prune = self.config.prune,
            "polling datasource definitions"
        );
        let interval = self.config.poll_interval;
        let base = interval.min(Duration::from_secs(1));
        let mut retries = Retries::new(Exponential::new(base, (interval * 8).max(base)));
        loop {
            let result = tokio::select! {
                () = shutdown.cancelled() => break,
                result = self.pass(Mode::Watch, false) => result,
            };
            let name = self.name().to_owned();
            let clean = match &result {
                Ok(outcome) => {
                    log(&name, outcome);
                    match outcome {
                        Outcome::NotModified => true,
                        Outcome::Synced(report) => {
                            if let Some(health) = &self.health {
                                let first = report.problems.first().map(ToString::to_string);
                                health.passed(&name, report.problems.len(), first);
                            }
                            report.problems.is_empty()
                        }
                    }
                }
                Err(e) => {
                    if let Some(health) = &self.health {
                        health.failed(&name, &e.to_string());
                    }
                    false
                }
            };
            let wait = if clean {
                retries.succeeded();
                crate::backoff::spread_a_fifth(interval, rand::random::<f64>())
            } else {
                let wait = retries.failed(rand::random::<f64>());
                if let Err(e) = &result {
                    tracing::warn!(source = name, error = %e, retry_in_ms = wait.as_millis() as u64, "syncing from the source failed; the database is kept as it is");
                }
                wait
            };
            if let Some(reports) = &self.reports {
                let _ = reports.send(result.map_err(|e| e.to_string()));
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn log(source: &str, outcome: &Outcome) {
    let Outcome::Synced(report) = outcome else {
        tracing::debug!(source, "datasource definitions not modified");
        return;
    };
    for step in report
        .plan
        .steps
        .iter()
        .filter(|s| s.action.writes() || s.conflict.is_some())
    {
        tracing::info!(
            action = step.action.as_str(),
            datasource = %step.key,
            id = step.datasource.map(tracing::field::display),
            version = step.version,
            source,
            conflict = step.conflict.as_ref().map(|c| c.resolution.as_str()),
            "http sync"
        );
    }
    for problem in &report.problems {
        tracing::warn!(source, problem = %problem, "datasource definition skipped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn a_poll_interval_is_spread_a_fifth_either_way(ms in 1u64..3_600_000, r in 0.0f64..=1.0) {
            let interval = Duration::from_millis(ms);
            let wait = crate::backoff::spread_a_fifth(interval, r);
            proptest::prop_assert!(wait >= interval.mul_f64(0.8));
            proptest::prop_assert!(wait <= interval.mul_f64(1.2));
        }
    }
}
