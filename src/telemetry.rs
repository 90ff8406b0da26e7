//! Logging: a `tracing` subscriber writing JSON when stdout is not a terminal and readable
//! text when it is; the level comes from `DSREG_LOG` (or `RUST_LOG`), `info` by default.
//! OpenTelemetry export and the Prometheus registry join here with the observability work.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls are no-ops.
pub fn init_logging() {
    let filter = std::env::var("DSREG_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::io::stdout().is_terminal() {
        builder.try_init()
    } else {
        builder.json().flatten_event(true).try_init()
    };
}
