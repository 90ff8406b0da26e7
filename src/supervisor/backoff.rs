//! Restart delays: exponential with jitter, capped, and crash-loop detection (too many
//! failures within a window). Pure: the caller supplies the clock and the randomness.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How restarts are paced.
#[derive(Debug, Clone)]
pub struct BackoffPolicy {
    /// Delay before the first restart.
    pub base: Duration,
    /// The cap.
    pub max: Duration,
    /// Failures within `window` that make a crash loop.
    pub crash_loop_failures: usize,
    /// The crash-loop window.
    pub window: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            max: Duration::from_secs(60),
            crash_loop_failures: 5,
            window: Duration::from_secs(60),
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
}

impl Failures {
    /// No failures yet.
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            recent: VecDeque::new(),
            consecutive: 0,
        }
    }

    /// Forgets the history (a new version, or a run that stayed healthy).
    pub fn reset(&mut self) {
        self.recent.clear();
        self.consecutive = 0;
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
        let crash_loop = self.recent.len() >= self.policy.crash_loop_failures;
        let exponent = (self.consecutive - 1).min(30);
        let ceiling = self
            .policy
            .base
            .saturating_mul(1u32 << exponent.min(20))
            .min(self.policy.max);
        let delay = if crash_loop {
            self.policy.max
        } else {
            ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
        };
        Verdict {
            delay,
            crash_loop,
            failures: self.consecutive,
        }
    }
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
        assert_eq!(verdicts[4].delay, Duration::from_secs(10));
        assert_eq!(verdicts[4].failures, 5);
        failures.reset();
        assert_eq!(failures.count(), 0);
        assert!(
            !failures
                .record(now + Duration::from_secs(6), 0.5)
                .crash_loop
        );
    }
}
