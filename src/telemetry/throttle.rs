//! A log throttle: lets through at most a set number of lines per second and counts the
//! rest, so the next line that passes can say how many were held back. For lines any outside
//! party can cause at will (malformed notifications, panics, failing workers), which must
//! never flood the log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `per_second` admissions in each one-second window; the rest are counted.
#[derive(Debug)]
pub struct Throttle {
    per_second: u32,
    state: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    started: Option<Instant>,
    admitted: u32,
    suppressed: u64,
}

impl Throttle {
    /// A throttle of `per_second` lines a second.
    pub const fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: Mutex::new(Window {
                started: None,
                admitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be written now: `Some(n)` with the lines held back since the last
    /// one that passed, `None` when this one is held back (and counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        // A holder that panicked left plain counters behind: still usable.
        let mut w = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if w.started
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1))
        {
            w.started = Some(now);
            w.admitted = 0;
        }
        if w.admitted < self.per_second {
            w.admitted += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lets_through_the_rate_and_counts_what_it_held_back() {
        let throttle = Throttle::new(2);
        let t0 = Instant::now();
        assert_eq!(throttle.admit_at(t0), Some(0));
        assert_eq!(throttle.admit_at(t0), Some(0));
        for _ in 0..1_000 {
            assert_eq!(throttle.admit_at(t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(throttle.admit_at(t0 + Duration::from_secs(1)), Some(1_000));
        assert_eq!(throttle.admit_at(t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(throttle.admit_at(t0 + Duration::from_millis(1_100)), None);
    }
}
