//! Readiness, one definition for both ports: no essential task has ended ([`Fatal`]), the
//! database answers, holds the latest schema, the LISTEN connection is up and receives what is
//! sent through the pool (the last self-test passed, [`crate::outbox::selftest`]), and the sink commits
//! (it has not been failing with nothing committed for a second). `/readyz` answers it; gRPC
//! health reports NOT_SERVING while it fails.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::db;
use crate::outbox::listener::ListenerStats;

/// How long a readiness probe waits for the database.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why an essential task (the supervisor) ended while the process was meant to run: set
/// once, never cleared — the process is on its way out and exits non-zero.
#[derive(Debug, Default)]
pub struct Fatal(std::sync::OnceLock<String>);

impl Fatal {
    /// Records why the process can no longer do its work (the first reason is kept).
    pub fn set(&self, reason: String) {
        let _ = self.0.set(reason);
    }

    /// The reason, once set.
    pub fn reason(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// What readiness looks at; cheap to clone.
#[derive(Clone)]
pub struct Readiness {
    /// The pool readiness probes use (the health checks' own, which neither workers nor the
    /// control plane can take).
    pub pool: Pool,
    /// The LISTEN connection's state.
    pub listener: Arc<ListenerStats>,
    /// Whether the sink commits.
    pub sink: crate::connectors::sink::SinkStatus,
    /// Where each check's outcome is published (`dsreg_ready` on `/metrics`).
    pub gauge: prometheus_client::metrics::gauge::Gauge,
    /// Set when an essential task ended unexpectedly.
    pub fatal: Arc<Fatal>,
    /// What holds the outbox back (warnings, not failures).
    pub pressure: Arc<crate::outbox::pressure::PressureState>,
    /// The HTTP definition sources of the registry's own sync (a failing one is a warning).
    pub sources: Arc<crate::files::http::SourceHealth>,
    /// The runtime the database probe runs on, where [`Self::pool`] is used (the health
    /// checks' own thread, [`crate::own_thread`]): a shared runtime too busy to poll the
    /// answer in time does not make a database that answered look unready. `None`: the
    /// caller's.
    pub probe_runtime: Option<tokio::runtime::Handle>,
}

impl Readiness {
    /// Whether the registry can serve; otherwise why not.
    ///
    /// # Errors
    /// The reason, for `/readyz` and the log.
    pub async fn check(&self) -> Result<(), String> {
        let result = match &self.probe_runtime {
            Some(runtime) => {
                let readiness = self.clone();
                runtime
                    .spawn(async move { readiness.probe().await })
                    .await
                    .unwrap_or_else(|_| Err("the health checks stopped".to_owned()))
            }
            None => self.probe().await,
        };
        self.gauge.set(i64::from(result.is_ok()));
        result
    }

    /// What is worth an operator's attention while ready (a filling NOTIFY queue, a failing
    /// definition source).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = self.pressure.warnings();
        warnings.extend(self.sources.warnings());
        warnings
    }

    async fn probe(&self) -> Result<(), String> {
        if let Some(reason) = self.fatal.reason() {
            return Err(reason.to_owned());
        }
        let probe = async {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| db::Error::from(e).to_string())?;
            // Said in the database's words (its SQLSTATE and message), not the pool's.
            let applied = db::migrations::current_version(&client)
                .await
                .map_err(|e| e.to_string())?;
            let wanted = db::migrations::latest_known();
            if applied < wanted {
                return Err(format!("schema at migration {applied}, {wanted} expected"));
            }
            Ok(())
        };
        tokio::time::timeout(PROBE_TIMEOUT, probe)
            .await
            .unwrap_or_else(|_| Err(format!("database did not answer within {PROBE_TIMEOUT:?}")))?;
        if !self.listener.connected.load(Ordering::Relaxed) {
            return Err("the LISTEN connection is down; reconnecting".to_owned());
        }
        if let Some(cause) = self.listener.path.problem() {
            return Err(format!("the notification path is broken: {cause}"));
        }
        self.sink.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ended_supervisor_makes_the_process_unready_before_anything_else_is_asked() {
        // No database behind the pool: the fatal reason is answered without asking it.
        let readiness = Readiness {
            pool: db::pool("postgres://127.0.0.1:1/none", 1, Duration::from_millis(10)).unwrap(),
            listener: Arc::default(),
            sink: Default::default(),
            gauge: Default::default(),
            fatal: Arc::default(),
            pressure: Arc::default(),
            sources: Arc::default(),
            probe_runtime: None,
        };
        assert!(readiness.check().await.unwrap_err().contains("database"));
        readiness
            .fatal
            .set("the supervisor stopped: it panicked (bug)".into());
        readiness.fatal.set("a later reason".into());
        assert_eq!(
            readiness.check().await.unwrap_err(),
            "the supervisor stopped: it panicked (bug)"
        );
    }
}
