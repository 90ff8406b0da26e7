//! Containment of connector and transform code: whatever runs it (the supervisor, the
//! harness, the blocking pool, the API's checks) calls it through [`contain`], so a panic
//! becomes that datasource's error ([`Panicked`]) and never its caller's.
//!
//! The process's panic hook ([`crate::telemetry::panics`]) still logs each panic once, as a
//! structured, rate-limited line naming the datasource when one is in scope.

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Connector or transform code panicked; the panic's message, when it had one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} panicked: {message}")]
pub struct Panicked {
    /// What was running (`validate`, `stall_after`, `transform`).
    pub what: &'static str,
    /// The panic's message (a `&str` or `String` payload), or a placeholder.
    pub message: String,
}

impl Panicked {
    /// The panic of `what` carrying `payload` (as a task's `JoinError` or `catch_unwind` gives).
    pub fn from_payload(what: &'static str, payload: &(dyn std::any::Any + Send)) -> Self {
        Self {
            what,
            message: message_of(payload),
        }
    }
}

pub use crate::telemetry::panics::message_of;

/// Runs `f`, connector or transform code named `what`; a panic in it is returned as
/// [`Panicked`].
///
/// The code contained only reads its inputs (configs, records) or owns what it changes, so
/// nothing it leaves half-done is seen afterwards: unwind safety is asserted on that ground.
///
/// # Errors
/// [`Panicked`] when `f` panicked.
pub fn contain<T>(what: &'static str, f: impl FnOnce() -> T) -> Result<T, Panicked> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| Panicked::from_payload(what, &*payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message() {
        assert_eq!(contain("validate", || 7), Ok(7));
        let err = contain("stall_after", || -> u8 {
            panic!("overflow in {}", "from_secs_f64")
        })
        .unwrap_err();
        assert_eq!(err.what, "stall_after");
        assert_eq!(err.message, "overflow in from_secs_f64");
        let err = contain("validate", || std::panic::panic_any(5_u8)).unwrap_err();
        assert_eq!(err.message, "a panic without a message");
    }
}
