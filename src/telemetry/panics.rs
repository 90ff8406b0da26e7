//! Panics as log lines: the process's panic hook writes each panic as one structured ERROR
//! event (message, location, thread, and the datasource whose connector code was running,
//! when one is in scope), at most [`PANIC_LINES_PER_SEC`] a second, with a count of those held
//! back, instead of the default hook's unthrottled plain text on stderr; every panic, written
//! or held back, is counted (`dsreg_panics_total`). The code that caught
//! the panic (a worker, [`crate::connectors::contain`]) turns it into that datasource's error.

use std::future::Future;
use std::sync::LazyLock;

use prometheus_client::metrics::counter::Counter;

use uuid::Uuid;

use super::throttle::Throttle;

/// Panic lines written per second at most.
pub const PANIC_LINES_PER_SEC: u32 = 10;

static PANIC_LINES: Throttle = Throttle::new(PANIC_LINES_PER_SEC);

/// Every panic of the process, written or held back (`dsreg_panics_total`).
static PANICS: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The process's panic counter, for the metrics registry (clones share the count).
pub fn counter() -> Counter {
    PANICS.clone()
}

tokio::task_local! {
    static DATASOURCE: Uuid;
}

/// Runs `work` (a datasource's connector code) with `datasource` named in any panic line it
/// causes.
pub async fn scoped<F: Future>(datasource: Uuid, work: F) -> F::Output {
    DATASOURCE.scope(datasource, work).await
}

/// The datasource whose code runs on this task, if any.
pub fn current_datasource() -> Option<Uuid> {
    DATASOURCE.try_with(|id| *id).ok()
}

/// Replaces the process's panic hook with the structured, throttled one.
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.inc();
        let Some(suppressed) = PANIC_LINES.admit() else {
            return;
        };
        let message = message_of(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        match current_datasource() {
            Some(datasource_id) => tracing::error!(
                %datasource_id,
                panic.message = %message,
                panic.location = %location,
                thread,
                suppressed,
                "panic in a datasource's connector code; the datasource records it as its error"
            ),
            None => tracing::error!(
                panic.message = %message,
                panic.location = %location,
                thread,
                suppressed,
                "panic"
            ),
        }
    }));
}

/// The message a panic payload carries: `panic!("…")` gives a `&str` or a `String`.
pub fn message_of(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}
