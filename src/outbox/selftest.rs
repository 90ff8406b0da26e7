//! The notification path's self-test, and the outbox poll that stands in for it while it
//! fails.
//!
//! A LISTEN connection can be up and answer queries and still never receive a notification:
//! behind a transaction-mode pooler (the server session that ran LISTEN goes back to the
//! pool), on a read-only replica (NOTIFY is not replicated), or on a half-open connection. So
//! at start and then every [`SelfTestConfig::interval`], a token of this instance's is
//! NOTIFYed on [`PROBE_CHANNEL`] through the pool, and the listener must deliver it within
//! [`SelfTestConfig::timeout`]. The verdict lives in [`NotificationPath`]: after one missed
//! token the path is suspect and the supervisor is woken every
//! [`SelfTestConfig::poll_interval`] to read the outbox, so publishes converge at that pace
//! instead of waiting for the next full resync; after [`MISSES_TO_BROKEN`] missed tokens in a
//! row readiness and gRPC health report a broken path with its cause, and `/metrics` shows it,
//! until a token arrives again.
//!
//! A check that cannot even send its token (no pooled connection free within the timeout, as
//! when thousands of workers start on a small pool) says nothing about the notification path:
//! it leaves the verdict as it was and is counted apart.

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

/// Missed tokens in a row before the path is reported broken: one late token on a machine
/// short of CPU only makes it suspect (and the outbox polled).
pub const MISSES_TO_BROKEN: u32 = 2;

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
    /// The last this many tokens did not arrive (fewer than [`MISSES_TO_BROKEN`]); the outbox
    /// is polled meanwhile.
    Suspect(u32, String),
    /// [`MISSES_TO_BROKEN`] or more tokens in a row did not arrive, the last for this reason.
    Broken(String),
}

/// Why a check did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// The token was sent and did not arrive, or the server refused to send it.
    Missed(String),
    /// The token could not be sent at all (the pool had no connection free): the path was not
    /// tested.
    Untested(String),
}

/// Whether notifications sent through the pool reach the LISTEN connection; shared by the
/// listener (which delivers tokens), the self-test, readiness and the metrics.
#[derive(Debug)]
pub struct NotificationPath {
    /// The latest token the listener received.
    received: watch::Sender<String>,
    verdict: Mutex<Verdict>,
    failures: AtomicU64,
    untested: AtomicU64,
}

impl Default for NotificationPath {
    fn default() -> Self {
        Self {
            received: watch::Sender::new(String::new()),
            verdict: Mutex::new(Verdict::Unchecked),
            failures: AtomicU64::new(0),
            untested: AtomicU64::new(0),
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

    /// Why the path is reported broken, when it is.
    pub fn problem(&self) -> Option<String> {
        match &*self.verdict() {
            Verdict::Broken(cause) => Some(cause.clone()),
            Verdict::Unchecked | Verdict::Working | Verdict::Suspect(..) => None,
        }
    }

    /// Checks whose token did not arrive, since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Checks that could not send their token (the path untested), since start.
    pub fn untested(&self) -> u64 {
        self.untested.load(Ordering::Relaxed)
    }

    /// Records a check's outcome; logs when the path turns suspect, breaks or works again.
    /// Returns whether the path is now suspect (one missed token: check again at once).
    fn record(&self, outcome: Result<(), Failure>) -> bool {
        let mut verdict = self.verdict();
        let now = match outcome {
            Ok(()) => Verdict::Working,
            Err(Failure::Untested(cause)) => {
                self.untested.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(cause = %cause, "the notification self-test could not send its token");
                return false;
            }
            Err(Failure::Missed(cause)) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let misses = match &*verdict {
                    Verdict::Suspect(misses, _) => misses + 1,
                    Verdict::Broken(_) => MISSES_TO_BROKEN,
                    Verdict::Unchecked | Verdict::Working => 1,
                };
                if misses >= MISSES_TO_BROKEN {
                    Verdict::Broken(cause)
                } else {
                    Verdict::Suspect(misses, cause)
                }
            }
        };
        let suspect = matches!(now, Verdict::Suspect(..));
        let before = std::mem::replace(&mut *verdict, now.clone());
        drop(verdict);
        match (&before, &now) {
            (Verdict::Broken(_) | Verdict::Suspect(..), Verdict::Working) => {
                tracing::info!(
                    "notifications reach the LISTEN connection again; outbox polling stops"
                );
            }
            (Verdict::Unchecked | Verdict::Working, Verdict::Suspect(_, cause)) => {
                tracing::info!(cause = %cause, "a notification self-test token did not arrive; polling the outbox until one does");
            }
            (
                Verdict::Unchecked | Verdict::Working | Verdict::Suspect(..),
                Verdict::Broken(cause),
            ) => {
                tracing::warn!(cause = %cause, "the notification path is broken; polling the outbox");
            }
            _ => {}
        }
        suspect
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

    /// A check at start and every interval; after a missed token, the next check follows at
    /// once, so a broken path is reported within about two timeouts.
    async fn checks(&self) {
        for count in 0u64.. {
            let outcome = self.check(&format!("{}:{count}", self.me.simple())).await;
            if !self.stats.path.record(outcome) {
                tokio::time::sleep(self.config.interval).await;
            }
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
    async fn check(&self, token: &str) -> Result<(), Failure> {
        let mut arrived = self.stats.path.received.subscribe();
        arrived.mark_unchanged();
        let client = match tokio::time::timeout(self.config.timeout, self.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(Failure::Untested(format!(
                    "no pooled connection to send a notification: {}",
                    crate::db::Error::from(e)
                )));
            }
            Err(_) => {
                return Err(Failure::Untested(format!(
                    "no pooled connection was free within {:?}",
                    self.config.timeout
                )));
            }
        };
        let send = async {
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
                return Err(Failure::Missed(format!(
                    "a notification could not be sent through the pool: {e}"
                )));
            }
            Err(_) => {
                return Err(Failure::Missed(format!(
                    "a notification could not be sent through the pool within {:?}",
                    self.config.timeout
                )));
            }
        }
        drop(client);
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
                Failure::Missed(format!(
                    "a notification sent through the pool did not reach the LISTEN connection \
                     within {:?} (is the listener behind a transaction-mode pooler, on a \
                     read-only replica or on a dead connection? --listen-database-url gives it \
                     a direct connection to the primary); the outbox is read every {:?} \
                     meanwhile",
                    self.config.timeout, self.config.poll_interval
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_missed_token_makes_the_path_suspect_and_two_in_a_row_broken() {
        let path = NotificationPath::default();
        assert!(!path.working());
        assert_eq!(path.problem(), None, "unchecked is no problem yet");
        path.record(Err(Failure::Missed("no token".into())));
        assert!(!path.working(), "a suspect path is polled");
        assert_eq!(path.problem(), None, "one late token is not reported");
        path.record(Err(Failure::Missed("still none".into())));
        assert_eq!(path.problem().as_deref(), Some("still none"));
        path.record(Err(Failure::Missed("and again".into())));
        assert_eq!(path.problem().as_deref(), Some("and again"));
        assert_eq!(path.failures(), 3);
        path.record(Ok(()));
        assert!(path.working());
        assert_eq!(path.problem(), None);
        assert_eq!(path.failures(), 3);
        // After a token arrived, one miss is again only suspect.
        path.record(Err(Failure::Missed("late".into())));
        assert_eq!(path.problem(), None);
        assert!(!path.working());
    }

    #[test]
    fn a_check_that_could_not_send_leaves_the_verdict_as_it_was() {
        let path = NotificationPath::default();
        path.record(Ok(()));
        path.record(Err(Failure::Untested("pool busy".into())));
        assert!(path.working());
        assert_eq!((path.failures(), path.untested()), (0, 1));
        path.record(Err(Failure::Missed("no token".into())));
        path.record(Err(Failure::Untested("pool busy".into())));
        path.record(Err(Failure::Missed("no token again".into())));
        assert_eq!(
            path.problem().as_deref(),
            Some("no token again"),
            "an untested check neither breaks nor resets a run of misses"
        );
        assert_eq!((path.failures(), path.untested()), (2, 2));
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
