//! Retry pacing, one policy for every loop that tries again: [`Exponential`] (a delay
//! doubling from a base up to a cap, spread by jitter) with [`Retries`] for a loop retrying
//! one thing until it works (the outbox listener's reconnects, the sink's flushes, an
//! `http_poll` within a poll, the file watcher's passes, the CLI's event follower), and
//! [`Failures`] for a worker's restarts, which adds crash-loop detection (too many failures
//! within a window; once in a crash loop a worker stays there, at the capped delay with
//! jitter, until a run works for a window or a new version comes). Permanent failures (a
//! source that refuses) wait the long delay instead and are no crash loop.
//!
//! Pure: the caller supplies the clock and the randomness, so the schedule is tested without
//! timers. The loops sleep with [`sleep_unless`], which wakes on their shutdown token.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// A delay doubling from `base` per failure up to `max`, spread by jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exponential {
    /// The delay after the first failure (before jitter).
    pub base: Duration,
    /// The cap (before jitter).
    pub max: Duration,
}

impl Exponential {
    /// Doubling from `base` up to `max`.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The delay after `failures` failures in a row (the first is 1), before jitter:
    /// `base * 2^(failures - 1)`, at most `max`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        self.base.saturating_mul(1u32 << exponent).min(self.max)
    }

    /// The delay after `failures` failures in a row, spread over the upper half of
    /// [`Self::ceiling`] by `jitter` in [0, 1], so that loops failing together do not retry
    /// together.
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        self.ceiling(failures)
            .mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// A loop retrying one thing until it works: failures since the last success.
#[derive(Debug, Clone)]
pub struct Retries {
    policy: Exponential,
    failures: u32,
}

impl Retries {
    /// No failures yet.
    pub const fn new(policy: Exponential) -> Self {
        Self {
            policy,
            failures: 0,
        }
    }

    /// Records a failure; the delay before the next attempt, spread by `jitter` in [0, 1].
    pub fn failed(&mut self, jitter: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.policy.delay(self.failures, jitter)
    }

    /// Forgets the failures: the thing worked.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Sleeps for `delay` unless `shutdown` fires first; false when it did.
///
/// # Cancel safety
/// Cancel safe: it holds nothing but the timer.
pub async fn sleep_unless(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// How restarts are paced.
#[derive(Debug, Clone)]
pub struct BackoffPolicy {
    /// Delay before the first restart.
    pub base: Duration,
    /// The cap.
    pub max: Duration,
    /// Failures within `window` that make a crash loop.
    pub crash_loop_failures: usize,
    /// The crash-loop window; a run that works this long forgets the failures before it.
    pub window: Duration,
    /// Delay after a permanent failure (a source that refuses: 401, 404, …).
    pub permanent: Duration,
}

impl BackoffPolicy {
    /// The restart delays before a crash loop.
    pub fn exponential(&self) -> Exponential {
        Exponential::new(self.base, self.max)
    }
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            max: Duration::from_secs(60),
            crash_loop_failures: 5,
            window: Duration::from_secs(60),
            permanent: Duration::from_secs(300),
        }
    }
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Wait this long before the next start.
    pub delay: Duration,
    /// The worker is crash-looping (restarted at the capped delay only).
    pub crash_loop: bool,
    /// Failures since the last healthy run or new version.
    pub failures: u32,
}

/// One worker's failure history.
#[derive(Debug)]
pub struct Failures {
    policy: BackoffPolicy,
    recent: VecDeque<Instant>,
    consecutive: u32,
    /// In a crash loop since the window last filled up: it holds while failures continue.
    looping: bool,
}

impl Failures {
    /// No failures yet.
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            recent: VecDeque::new(),
            consecutive: 0,
            looping: false,
        }
    }

    /// Forgets the history (a new version, or a run that stayed healthy).
    pub fn reset(&mut self) {
        self.recent.clear();
        self.consecutive = 0;
        self.looping = false;
    }

    /// Failures since the last reset.
    pub fn count(&self) -> u32 {
        self.consecutive
    }

    /// Records a failure at `now`; `jitter` in [0, 1) spreads the delay over its upper half
    /// so that many workers failing together do not restart together.
    pub fn record(&mut self, now: Instant, jitter: f64) -> Verdict {
        self.consecutive = self.consecutive.saturating_add(1);
        self.recent.push_back(now);
        while let Some(first) = self.recent.front() {
            if now.duration_since(*first) > self.policy.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.looping |= self.recent.len() >= self.policy.crash_loop_failures;
        let delay = if self.looping {
            capped(self.policy.max, jitter)
        } else {
            self.policy.exponential().delay(self.consecutive, jitter)
        };
        Verdict {
            delay,
            crash_loop: self.looping,
            failures: self.consecutive,
        }
    }

    /// Records a permanent failure (the source refuses): the long delay, with jitter, and no
    /// crash loop, however often it happens.
    pub fn refused(&mut self, jitter: f64) -> Verdict {
        self.consecutive = self.consecutive.saturating_add(1);
        Verdict {
            delay: capped(self.policy.permanent, jitter),
            crash_loop: false,
            failures: self.consecutive,
        }
    }
}

/// A capped delay spread over its upper quarter, so workers failing together at the cap do
/// not restart together.
fn capped(cap: Duration, jitter: f64) -> Duration {
    cap.mul_f64(0.75 + 0.25 * jitter.clamp(0.0, 1.0))
}

/// `interval` spread a fifth either way by `r` in [0, 1]: what a periodic loop waits, so that
/// many of them (streams, pollers, instances) do not run in step.
pub fn spread_a_fifth(interval: Duration, r: f64) -> Duration {
    interval.mul_f64(0.8 + 0.4 * r.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BackoffPolicy {
        BackoffPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(10),
            crash_loop_failures: 5,
            window: Duration::from_secs(60),
            permanent: Duration::from_secs(300),
        }
    }

    #[test]
    fn delays_double_and_stay_within_the_jitter_band() {
        let mut failures = Failures::new(policy());
        let start = Instant::now();
        let mut previous_ceiling = Duration::ZERO;
        for i in 0..4u32 {
            let now = start + Duration::from_secs(100 * u64::from(i));
            let low = failures.record(now, 0.0);
            let ceiling = Duration::from_millis(100) * (1 << i);
            assert_eq!(low.delay, ceiling / 2);
            assert!(ceiling > previous_ceiling);
            previous_ceiling = ceiling;
            assert!(!low.crash_loop);
        }
    }

    #[test]
    fn delays_are_capped() {
        let mut failures = Failures::new(policy());
        let start = Instant::now();
        let mut last = Duration::ZERO;
        for i in 0..40u64 {
            last = failures
                .record(start + Duration::from_secs(61 * i), 0.999)
                .delay;
        }
        assert!(last <= Duration::from_secs(10));
        assert!(last > Duration::from_secs(9));
    }

    #[test]
    fn many_failures_within_the_window_are_a_crash_loop_at_the_cap() {
        let mut failures = Failures::new(policy());
        let now = Instant::now();
        let verdicts: Vec<Verdict> = (0..5)
            .map(|i| failures.record(now + Duration::from_secs(i), 0.5))
            .collect();
        assert!(!verdicts[3].crash_loop);
        assert!(verdicts[4].crash_loop);
        assert_eq!(verdicts[4].delay, Duration::from_millis(8_750));
        assert_eq!(verdicts[4].failures, 5);
        failures.reset();
        assert_eq!(failures.count(), 0);
        assert!(
            !failures
                .record(now + Duration::from_secs(6), 0.5)
                .crash_loop
        );
    }

    #[test]
    fn a_crash_loop_holds_while_failures_continue_at_the_cap_with_jitter() {
        let mut failures = Failures::new(policy());
        let start = Instant::now();
        for i in 0..5 {
            failures.record(start + Duration::from_secs(i), 0.5);
        }
        // Failures a capped delay apart leave the window nearly empty: still a crash loop,
        // and the delay stays at the cap, spread by the jitter.
        let mut at = start + Duration::from_secs(5);
        let mut delays = Vec::new();
        for jitter in [0.0, 0.999, 0.3, 0.7, 0.0, 0.999] {
            at += Duration::from_secs(120);
            let verdict = failures.record(at, jitter);
            assert!(verdict.crash_loop, "{verdict:?}");
            assert!(verdict.delay >= Duration::from_millis(7_500), "{verdict:?}");
            assert!(verdict.delay <= Duration::from_secs(10), "{verdict:?}");
            delays.push(verdict.delay);
        }
        assert!(delays.windows(2).any(|w| w[0] != w[1]), "{delays:?}");
        failures.reset();
        assert!(!failures.record(at, 0.5).crash_loop);
    }

    #[test]
    fn permanent_failures_wait_the_long_delay_and_are_no_crash_loop() {
        let mut failures = Failures::new(policy());
        for _ in 0..20 {
            let verdict = failures.refused(0.5);
            assert!(!verdict.crash_loop);
            assert!(verdict.delay >= Duration::from_secs(225), "{verdict:?}");
            assert!(verdict.delay <= Duration::from_secs(300), "{verdict:?}");
        }
        assert_eq!(failures.count(), 20);
    }

    #[test]
    fn a_retrying_loop_doubles_to_the_cap_in_the_upper_half_and_starts_over_after_success() {
        let mut retries = Retries::new(Exponential::new(
            Duration::from_millis(250),
            Duration::from_secs(2),
        ));
        let full: Vec<u128> = (0..6).map(|_| retries.failed(1.0).as_millis()).collect();
        assert_eq!(full, [250, 500, 1_000, 2_000, 2_000, 2_000]);
        assert_eq!(retries.failures(), 6);
        assert_eq!(retries.failed(0.0), Duration::from_secs(1), "half the cap");
        retries.succeeded();
        assert_eq!(retries.failures(), 0);
        assert_eq!(retries.failed(1.0), Duration::from_millis(250));
    }

    #[tokio::test]
    async fn a_backoff_sleep_wakes_on_shutdown() {
        let shutdown = CancellationToken::new();
        assert!(sleep_unless(Duration::from_millis(1), &shutdown).await);
        let sleeping = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { sleep_unless(Duration::from_secs(3_600), &shutdown).await }
        });
        tokio::task::yield_now().await;
        shutdown.cancel();
        assert!(!sleeping.await.unwrap(), "shutdown came first");
    }

    proptest::proptest! {
        /// Whatever the policy, the failures and the jitter: a delay is within the upper half
        /// of its ceiling, ceilings never shrink as failures grow, and none passes the cap.
        #[test]
        fn exponential_delays_stay_in_their_band(
            base_ms in 1u64..100_000,
            max_ms in 1u64..10_000_000,
            failures in 1u32..100,
            jitter in 0.0f64..=1.0,
        ) {
            let policy = Exponential::new(Duration::from_millis(base_ms), Duration::from_millis(max_ms));
            let ceiling = policy.ceiling(failures);
            let delay = policy.delay(failures, jitter);
            proptest::prop_assert!(ceiling <= policy.max);
            proptest::prop_assert!(ceiling >= policy.base.min(policy.max));
            proptest::prop_assert!(policy.ceiling(failures + 1) >= ceiling);
            proptest::prop_assert!(delay <= ceiling);
            proptest::prop_assert!(delay >= ceiling / 2);
        }

        /// Whatever the spacing of failures and the jitter: every delay is within the cap (the
        /// long delay for refusals), and once a crash loop, always a crash loop until a reset.
        #[test]
        fn delays_stay_bounded_and_a_crash_loop_holds(
            failures in proptest::collection::vec((0u64..200_000, 0.0f64..1.0, proptest::bool::weighted(0.1)), 1..60)
        ) {
            let policy = policy();
            let mut history = Failures::new(policy.clone());
            let mut at = Instant::now();
            let mut looping = false;
            for (gap_ms, jitter, refused) in failures {
                at += Duration::from_millis(gap_ms);
                let verdict = if refused {
                    history.refused(jitter)
                } else {
                    history.record(at, jitter)
                };
                if refused {
                    proptest::prop_assert!(verdict.delay <= policy.permanent);
                    proptest::prop_assert!(verdict.delay >= policy.permanent * 3 / 4);
                } else {
                    proptest::prop_assert!(verdict.delay <= policy.max);
                    proptest::prop_assert!(verdict.delay >= policy.base / 2);
                    proptest::prop_assert!(!looping || verdict.crash_loop, "a crash loop ended without a reset");
                    looping = verdict.crash_loop;
                    if looping {
                        proptest::prop_assert!(verdict.delay >= policy.max * 3 / 4);
                    }
                }
            }
        }
    }
}
