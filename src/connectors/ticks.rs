//! The pace of a run that works on an interval (`http_poll`'s polls, the generator's
//! batches): its first unit of work goes out at once, the next ones every period.
//!
//! Not `tokio::time::interval` alone: its first tick is due at once but still goes through the
//! timer, which fires on its next millisecond, so a new run's first request waited up to 1 ms
//! for nothing (seen in a trace of hot reloads: the runtime's thread slept out a 1 ms timer
//! between spawning the run and sending its request).

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

/// Turns for a run's units of work.
#[derive(Debug)]
pub struct Ticks {
    interval: Interval,
    started: bool,
}

impl Ticks {
    /// The first turn now, then one every `period` from now (a late turn delays the next
    /// ones rather than bunching them).
    pub fn every(period: Duration) -> Ticks {
        let mut interval = tokio::time::interval_at(Instant::now() + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ticks {
            interval,
            started: false,
        }
    }

    /// Waits for the next turn; `false` when `cancel` fired first (or had already).
    pub async fn next(&mut self, cancel: &CancellationToken) -> bool {
        if !std::mem::replace(&mut self.started, true) {
            return !cancel.is_cancelled();
        }
        tokio::select! {
            () = cancel.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn the_first_turn_needs_no_timer_and_the_next_waits_for_its_period() {
        let cancel = CancellationToken::new();
        let mut ticks = Ticks::every(Duration::from_secs(60));
        // Ready on its first poll: no timer was waited on.
        assert_eq!(ticks.next(&cancel).now_or_never(), Some(true));
        // The next is a period away.
        assert_eq!(ticks.next(&cancel).now_or_never(), None);
    }

    #[tokio::test]
    async fn a_cancelled_run_gets_no_turn() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(!Ticks::every(Duration::from_secs(1)).next(&cancel).await);
        let mut ticks = Ticks::every(Duration::from_secs(3600));
        let live = CancellationToken::new();
        assert!(ticks.next(&live).await);
        live.cancel();
        // A turn an hour away gives way to the cancel at once.
        assert!(!ticks.next(&live).await);
    }

    #[tokio::test]
    async fn an_interval_alone_waits_for_the_timer_on_its_first_tick() {
        // Why `Ticks` exists: the interval's first tick is not ready on its first poll.
        let mut interval = tokio::time::interval(Duration::from_secs(60));
        assert!(interval.tick().now_or_never().is_none());
    }
}
