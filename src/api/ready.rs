//! Readiness, one definition for both ports: the database answers, holds the latest schema,
//! the LISTEN connection is up, and the sink commits (it has not been failing with nothing
//! committed for a second). `/readyz` answers it; gRPC health reports NOT_SERVING
//! while it fails.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::db;
use crate::outbox::listener::ListenerStats;

/// How long a readiness probe waits for the database.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What readiness looks at; cheap to clone.
#[derive(Clone)]
pub struct Readiness {
    /// The pool the registry serves from.
    pub pool: Pool,
    /// The LISTEN connection's state.
    pub listener: Arc<ListenerStats>,
    /// Whether the sink commits.
    pub sink: crate::connectors::sink::SinkStatus,
    /// Where each check's outcome is published (`dsreg_ready` on `/metrics`).
    pub gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Readiness {
    /// Whether the registry can serve; otherwise why not.
    ///
    /// # Errors
    /// The reason, for `/readyz` and the log.
    pub async fn check(&self) -> Result<(), String> {
        let result = self.probe().await;
        self.gauge.set(i64::from(result.is_ok()));
        result
    }

    async fn probe(&self) -> Result<(), String> {
        let probe = async {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| format!("database unreachable: {e}"))?;
            let applied = db::migrations::current_version(&client)
                .await
                .map_err(|e| format!("database unreachable: {e}"))?;
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
        self.sink.check()
    }
}
