//! Settings: every knob of the service, typed, with its flag, its environment variable and its
//! default in one place. Loaded once by the CLI; nothing else reads the environment for them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::supervisor::SupervisorConfig;
use crate::supervisor::backoff::BackoffPolicy;

/// How `dsreg` reaches its database and where it serves.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Postgres URL; when unset, an embedded cluster in `--data-dir` is used.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Folder for the embedded cluster (`<data-dir>/pg`) and local state.
    #[arg(long, env = "DSREG_DATA_DIR", default_value = ".dsreg")]
    pub data_dir: PathBuf,

    /// Fixed port for the embedded cluster; a free one is picked when unset.
    #[arg(long, env = "DSREG_PG_PORT")]
    pub pg_port: Option<u16>,

    /// Address of the HTTP port (`/healthz`, `/readyz`).
    #[arg(long, env = "DSREG_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Address of the gRPC port.
    #[arg(long, env = "DSREG_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Connections in the database pool.
    #[arg(long, env = "DSREG_POOL_SIZE", default_value_t = 16)]
    pub pool_size: usize,

    /// How long a request waits for a pooled connection, in milliseconds.
    #[arg(long, env = "DSREG_POOL_WAIT_MS", default_value_t = 5_000)]
    pub pool_wait_ms: u64,

    /// How long shutdown waits for in-flight work, in milliseconds.
    #[arg(long, env = "DSREG_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,

    /// Full resync period, in milliseconds.
    #[arg(long, env = "DSREG_RESYNC_INTERVAL_MS", default_value_t = 30_000)]
    pub resync_interval_ms: u64,

    /// Worker heartbeat period (one statement for all workers), in milliseconds.
    #[arg(long, env = "DSREG_HEARTBEAT_INTERVAL_MS", default_value_t = 10_000)]
    pub heartbeat_interval_ms: u64,

    /// How long a stopping worker gets before it is aborted, in milliseconds.
    #[arg(long, env = "DSREG_STOP_DEADLINE_MS", default_value_t = 5_000)]
    pub stop_deadline_ms: u64,

    /// First restart delay of a failed worker, in milliseconds.
    #[arg(long, env = "DSREG_BACKOFF_BASE_MS", default_value_t = 200)]
    pub backoff_base_ms: u64,

    /// Restart delay cap, in milliseconds.
    #[arg(long, env = "DSREG_BACKOFF_MAX_MS", default_value_t = 60_000)]
    pub backoff_max_ms: u64,

    /// Failures within the crash-loop window that make a crash loop.
    #[arg(long, env = "DSREG_CRASH_LOOP_FAILURES", default_value_t = 5)]
    pub crash_loop_failures: usize,

    /// The crash-loop window, in milliseconds.
    #[arg(long, env = "DSREG_CRASH_LOOP_WINDOW_MS", default_value_t = 60_000)]
    pub crash_loop_window_ms: u64,
}

impl Settings {
    /// The defaults (and environment) with `url` as the database and free ports: for
    /// in-process registries in tests and benchmarks.
    pub fn for_database(url: &str) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            settings: Settings,
        }
        let mut settings = Defaults::parse_from(["dsreg"]).settings;
        settings.database_url = Some(url.to_owned());
        settings.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        settings.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        settings
    }

    /// The embedded cluster's data folder.
    pub fn pg_data_dir(&self) -> PathBuf {
        self.data_dir.join("pg")
    }

    /// Pool checkout deadline.
    pub fn pool_wait(&self) -> Duration {
        Duration::from_millis(self.pool_wait_ms)
    }

    /// Shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// The supervisor's pacing.
    pub fn supervisor(&self) -> SupervisorConfig {
        SupervisorConfig {
            resync_interval: Duration::from_millis(self.resync_interval_ms),
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            ..SupervisorConfig::default()
        }
    }

    /// Restart pacing of failed workers.
    pub fn backoff(&self) -> BackoffPolicy {
        BackoffPolicy {
            base: Duration::from_millis(self.backoff_base_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            crash_loop_failures: self.crash_loop_failures,
            window: Duration::from_millis(self.crash_loop_window_ms),
        }
    }

    /// Stop deadline of a worker.
    pub fn stop_deadline(&self) -> Duration {
        Duration::from_millis(self.stop_deadline_ms)
    }

    /// Checks what types alone cannot.
    ///
    /// # Errors
    /// A description of the first invalid setting.
    pub fn check(&self) -> Result<(), String> {
        if self.pool_size == 0 || self.pool_size > 1_000 {
            return Err(format!(
                "--pool-size must be 1..=1000, not {}",
                self.pool_size
            ));
        }
        for (flag, value) in [
            ("--resync-interval-ms", self.resync_interval_ms),
            ("--heartbeat-interval-ms", self.heartbeat_interval_ms),
            ("--backoff-base-ms", self.backoff_base_ms),
        ] {
            if value == 0 {
                return Err(format!("{flag} must be positive"));
            }
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            return Err("--backoff-max-ms must not be below --backoff-base-ms".into());
        }
        if self.crash_loop_failures == 0 {
            return Err("--crash-loop-failures must be positive".into());
        }
        if self.database_url.as_deref().is_some_and(str::is_empty) {
            return Err(
                "DATABASE_URL is set but empty; unset it to use the embedded database".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    #[test]
    fn defaults_are_local_and_valid() {
        let cli = Cli::try_parse_from(["dsreg", "--database-url", "postgres://x"]).unwrap();
        assert_eq!(cli.settings.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(cli.settings.pg_data_dir(), PathBuf::from(".dsreg/pg"));
        assert!(cli.settings.check().is_ok());
    }

    #[test]
    fn a_zero_pool_is_refused() {
        let cli = Cli::try_parse_from(["dsreg", "--pool-size", "0"]).unwrap();
        assert!(cli.settings.check().unwrap_err().contains("--pool-size"));
    }
}
