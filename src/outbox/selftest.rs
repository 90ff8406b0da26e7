//! The notification path's self-test, and the outbox poll that stands in for it while it
//! fails.
//!
//! A LISTEN connection can be up and answer queries and still never receive a notification:
//! behind a transaction-mode pooler (the server session that ran LISTEN goes back to the
//! pool), on a read-only replica (NOTIFY is not replicated), or on a half-open connection. So
//! at start and then every [`SelfTestConfig::interval`], a token of this instance's is
//! NOTIFYed on [`PROBE_CHANNEL`] through the pool, and the listener must deliver it within
//! [`SelfTestConfig::timeout`]. The verdict lives in [`NotificationPath`]: readiness and gRPC
//! health report a broken path with its cause, `/metrics` shows it, and until a check passes
//! the supervisor is woken every [`SelfTestConfig::poll_interval`] to read the outbox, so
//! publishes converge at that pace instead of waiting for the next full resync.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::listener::{ListenerStats, Signal};
use crate::db::repository::typed;

/// The channel self-test tokens are sent on.
pub const PROBE_CHANNEL: &str = "dsreg_probe";

/// Longest token payload the listener records (a token is an instance's uuid and a count).
const MAX_TOKEN_BYTES: usize = 64;

/// The self-test's pacing.
#[derive(Debug, Clone)]
pub struct SelfTestConfig {
    /// Time between checks.
    pub interval: Duration,
    /// How long a token may take to arrive.
    pub timeout: Duration,
    /// Time between outbox reads while the path is not known to work.
    pub poll_interval: Duration,
}

impl Default for SelfTestConfig {
    /// A check every 10 s, 5 s for the token, the outbox read every second meanwhile.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    /// No check has finished yet.
    Unchecked,
    /// The last token arrived in time.
    Working,
    /// The last check failed, for this reason.
    Broken(String),
}

/// Whether notifications sent through the pool reach the LISTEN connection; shared by the
/// listener (which delivers tokens), the self-test, readiness and the metrics.
#[derive(Debug)]
pub struct NotificationPath {
    /// The latest token the listener received.
    received: watch::Sender<String>,
    verdict: Mutex<Verdict>,
    failures: AtomicU64,
}

impl Default for NotificationPath {
    fn default() -> Self {
        Self {
            received: watch::Sender::new(String::new()),
            verdict: Mutex::new(Verdict::Unchecked),
            failures: AtomicU64::new(0),
        }
    }
}

impl NotificationPath {
    fn verdict(&self) -> std::sync::MutexGuard<'_, Verdict> {
        self.verdict
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a token the listener received on [`PROBE_CHANNEL`] (anything longer than a
    /// token is ignored: any role that can connect can NOTIFY).
    pub fn received(&self, payload: &str) {
        if payload.len() <= MAX_TOKEN_BYTES {
            self.received.send_replace(payload.to_owned());
        }
    }

    /// Whether the last check passed.
    pub fn working(&self) -> bool {
        *self.verdict() == Verdict::Working
    }

    /// Why the last check failed, when it did.
    pub fn problem(&self) -> Option<String> {
        match &*self.verdict() {
            Verdict::Broken(cause) => Some(cause.clone()),
            Verdict::Unchecked | Verdict::Working => None,
        }
    }

    /// Checks that failed since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Records a check's outcome; logs when the path breaks or works again.
    fn record(&self, outcome: Result<(), String>) {
        let now = match outcome {
            Ok(()) => Verdict::Working,
            Err(cause) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                Verdict::Broken(cause)
            }
        };
        let before = std::mem::replace(&mut *self.verdict(), now.clone());
        match (&before, &now) {
            (Verdict::Broken(_), Verdict::Working) => {
                tracing::info!(
                    "notifications reach the LISTEN connection again; outbox polling stops"
                );
            }
            (Verdict::Unchecked | Verdict::Working, Verdict::Broken(cause)) => {
                tracing::warn!(cause = %cause, "the notification path is broken; polling the outbox");
            }
            _ => {}
        }
    }
}

/// The self-test and the fallback poll of one instance.
pub struct SelfTest {
    pool: Pool,
    stats: Arc<ListenerStats>,
    config: SelfTestConfig,
    /// Tokens are `<instance token>:<count>`: instances sharing a database ignore each
    /// other's.
    me: Uuid,
}

impl SelfTest {
    /// A self-test sending through `pool` and waiting on the listener of `stats`.
    pub fn new(pool: Pool, stats: Arc<ListenerStats>, config: SelfTestConfig) -> Self {
        Self {
            pool,
            stats,
            config,
            me: Uuid::new_v4(),
        }
    }

    /// Checks at start and every interval, and wakes the supervisor (`signals`) and the
    /// API's waits every poll interval while the path is not known to work; until
    /// `shutdown` or until the supervisor is gone.
    pub async fn run(self, signals: mpsc::UnboundedSender<Signal>, shutdown: CancellationToken) {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = self.checks() => {}
            () = self.poll(&signals) => {}
        }
    }

    async fn checks(&self) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for count in 0u64.. {
            tick.tick().await;
            let outcome = self.check(&format!("{}:{count}", self.me.simple())).await;
            self.stats.path.record(outcome);
        }
    }

    /// Returns only when the supervisor is gone.
    async fn poll(&self, signals: &mpsc::UnboundedSender<Signal>) {
        let mut tick = tokio::time::interval(self.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.stats.path.working() {
                continue;
            }
            if signals.send(Signal::Wake).is_err() {
                return;
            }
            self.stats.activity.bump();
        }
    }

    /// Sends `token` through the pool and waits for the listener to receive it.
    async fn check(&self, token: &str) -> Result<(), String> {
        let mut arrived = self.stats.path.received.subscribe();
        arrived.mark_unchanged();
        let send = async {
            let client = self.pool.get().await?;
            client
                .execute_typed(
                    "SELECT pg_notify($1, $2)",
                    &typed::params(&[&PROBE_CHANNEL, &token]),
                )
                .await?;
            Ok::<(), crate::db::Error>(())
        };
        match tokio::time::timeout(self.config.timeout, send).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(format!(
                    "a notification could not be sent through the pool: {e}"
                ));
            }
            Err(_) => {
                return Err(format!(
                    "a notification could not be sent through the pool within {:?}",
                    self.config.timeout
                ));
            }
        }
        let delivered = async {
            while arrived.changed().await.is_ok() {
                if *arrived.borrow_and_update() == token {
                    return;
                }
            }
            // The sender lives in the shared path as long as `self`: never reached.
            std::future::pending::<()>().await;
        };
        tokio::time::timeout(self.config.timeout, delivered)
            .await
            .map_err(|_| {
                format!(
                    "a notification sent through the pool did not reach the LISTEN connection \
                     within {:?} (is the listener behind a transaction-mode pooler, on a \
                     read-only replica or on a dead connection? --listen-database-url gives it \
                     a direct connection to the primary); the outbox is read every {:?} \
                     meanwhile",
                    self.config.timeout, self.config.poll_interval
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_follows_the_last_check_and_failures_are_counted() {
        let path = NotificationPath::default();
        assert!(!path.working());
        assert_eq!(path.problem(), None, "unchecked is no problem yet");
        path.record(Err("no token".into()));
        path.record(Err("still none".into()));
        assert_eq!(path.problem().as_deref(), Some("still none"));
        assert!(!path.working());
        assert_eq!(path.failures(), 2);
        path.record(Ok(()));
        assert!(path.working());
        assert_eq!(path.problem(), None);
        assert_eq!(path.failures(), 2);
    }

    proptest::proptest! {
        /// Whatever anyone NOTIFYs on the probe channel, a token-sized payload is recorded
        /// verbatim and anything longer leaves the last one in place.
        #[test]
        fn any_payload_is_recorded_verbatim_or_ignored(payloads in proptest::collection::vec(".{0,100}", 1..8)) {
            let path = NotificationPath::default();
            let mut last = String::new();
            for payload in &payloads {
                path.received(payload);
                if payload.len() <= MAX_TOKEN_BYTES {
                    last = payload.clone();
                }
                proptest::prop_assert_eq!(&*path.received.borrow(), &last);
            }
        }
    }

    #[test]
    fn only_token_sized_payloads_are_recorded() {
        let path = NotificationPath::default();
        let mut rx = path.received.subscribe();
        path.received(&"x".repeat(MAX_TOKEN_BYTES + 1));
        assert!(!rx.has_changed().unwrap());
        path.received("abc:1");
        assert_eq!(*rx.borrow_and_update(), "abc:1");
    }
}
