//! The give-up policy: a datasource whose worker has failed with no healthy run in between
//! for longer than a set time (`--give-up-after-secs`; off by default) is disabled, with an
//! `auto_disabled` event and an audit row saying why. An operator enables it again (status
//! `active`), and its failure clock starts again from the next failure.
//!
//! The clock is `datasource_state.failing_since`, which the state writer sets at a worker's
//! first failure and clears when a run works or the worker stops. Every instance sweeps, but
//! only over the datasources whose lease it holds, so a datasource is acted on by its owner
//! alone. Owns no worker: the `disabled` event the status change writes stops the worker
//! through the normal reconcile. Stops when its token is cancelled.

use std::time::Duration;

use deadpool_postgres::Pool;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::db::Error;
use crate::db::repository::audit::{self, AuditContext, AuditEntry, Outcome};
use crate::db::repository::events::{self, NewEvent};
use crate::db::repository::state::{self, GivenUp};
use crate::db::repository::{self as repo, WriteContext};

/// The actor the policy's events and audit rows name.
pub const ACTOR: &str = "dsreg:give-up";

/// The most datasources one sweep disables; more wait for the next sweep.
const BATCH: i64 = 500;

/// The policy: disable what has failed for longer than `after`, on `instance`'s leases.
#[derive(Debug, Clone)]
pub struct GiveUp {
    pool: Pool,
    instance: String,
    after: Duration,
    metrics: Option<crate::telemetry::metrics::Metrics>,
}

impl GiveUp {
    /// The policy for `instance`, giving up after `after` of failure.
    pub fn new(pool: Pool, instance: impl Into<String>, after: Duration) -> Self {
        Self {
            pool,
            instance: instance.into(),
            after,
            metrics: None,
        }
    }

    /// The policy, counting what it disables in `metrics`
    /// (`dsreg_datasources_auto_disabled_total`).
    #[must_use]
    pub fn with_metrics(mut self, metrics: crate::telemetry::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// How often the sweep runs: a quarter of the give-up time, from 200 ms to 30 s, so a
    /// datasource is disabled at most a quarter (or 30 s) late.
    pub fn interval(&self) -> Duration {
        (self.after / 4).clamp(Duration::from_millis(200), Duration::from_secs(30))
    }

    /// Disables, in one transaction, the datasources of this instance's leases that are due;
    /// returns them.
    ///
    /// # Errors
    /// The database could not be reached or a statement failed; nothing was disabled.
    pub async fn sweep(&self) -> Result<Vec<GivenUp>, Error> {
        let mut client = self.pool.get().await?;
        let tx = repo::begin(&mut client, &WriteContext::actor(ACTOR)).await?;
        let given_up = state::give_up(&tx, &self.instance, self.after, BATCH).await?;
        if given_up.is_empty() {
            return Ok(given_up);
        }
        let after_secs = self.after.as_secs();
        let reasons: Vec<String> = given_up.iter().map(|g| reason(g, self.after)).collect();
        let recorded: Vec<NewEvent> = given_up
            .iter()
            .zip(&reasons)
            .map(|(g, reason)| NewEvent {
                at: None,
                datasource_id: Some(g.datasource_id),
                kind: "auto_disabled".into(),
                version: None,
                payload: json!({
                    "reason": reason,
                    "instance": self.instance,
                    "failing_since": g.failing_since,
                    "give_up_after_secs": after_secs,
                    "worker_status": g.worker_status.as_str(),
                    "error_code": g.error_code,
                    "error_message": g.error_message,
                }),
            })
            .collect();
        events::append(&tx, &recorded).await?;
        // A row each, naming its datasource (ListAudit finds it by datasource); giving up is
        // rare, so a statement each costs little.
        for (g, reason) in given_up.iter().zip(reasons) {
            let entry = AuditEntry {
                actor: ACTOR.into(),
                action: "AutoDisable".into(),
                resource: format!("datasource/{}", g.datasource_id),
                org: Some(g.org.clone()),
                project: Some(g.project.clone()),
                version: None,
                outcome: Outcome::Ok,
                reason: Some(reason),
                diff: Some(json!({ "status": { "from": "active", "to": "disabled" } })),
                trace_id: None,
            };
            let context = AuditContext {
                target_id: Some(g.datasource_id),
                ..AuditContext::default()
            };
            audit::record_in(&tx, &entry, &context).await?;
        }
        tx.commit().await?;
        if let Some(metrics) = &self.metrics {
            metrics.datasources_auto_disabled(given_up.len() as u64);
        }
        Ok(given_up)
    }

    /// Sweeps every [`GiveUp::interval`] until `shutdown`; a failed sweep is logged and tried
    /// again at the next tick.
    ///
    /// # Cancel safety
    /// Runs until cancelled; an interrupted sweep is rolled back by the database.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let swept = tokio::select! {
                () = shutdown.cancelled() => return,
                swept = self.sweep() => swept,
            };
            match swept {
                Ok(given_up) => {
                    for g in given_up {
                        tracing::warn!(
                            datasource_id = %g.datasource_id,
                            failing_since = %g.failing_since,
                            error_code = g.error_code.as_deref().unwrap_or(""),
                            "datasource disabled: its worker kept failing"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the give-up sweep failed; trying again"),
            }
        }
    }
}

/// Why `g` was disabled, for people: how long it failed and its last error.
fn reason(g: &GivenUp, after: Duration) -> String {
    let last = match (&g.error_code, &g.error_message) {
        (Some(code), Some(message)) => format!("; last error {code}: {message}"),
        (Some(code), None) => format!("; last error {code}"),
        (None, Some(message)) => format!("; last error: {message}"),
        (None, None) => String::new(),
    };
    format!(
        "the worker failed with no healthy run for more than {} s (since {}){last}",
        after.as_secs(),
        g.failing_since
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}
