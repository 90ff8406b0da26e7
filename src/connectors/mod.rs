//! Connectors: the [`Connector`] trait every kind implements, the [`Catalog`] of kinds by
//! name, the built-in kinds (one file each) and the sinks records go to.
//!
//! A connector validates a config and runs until its cancellation token fires; it reports
//! progress through its [`Health`] handle and writes records to its [`sink::SinkHandle`]. It
//! does not decide when it runs (that is the supervisor's) nor map data (the transform's).

pub mod generator;
pub mod sink;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A boxed future a connector's run returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A config refused by a kind: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config.{field}: {reason}")]
pub struct ConfigError {
    /// The JSON path of the field within the config (`rate_per_sec`, `template.x`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// A refusal of `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Why a running connector stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source failed; a restart may help.
    #[error("source failed: {0}")]
    Source(String),
    /// The sink refused or is gone; a restart may help.
    #[error("sink failed: {0}")]
    Sink(String),
    /// The config cannot work; only a new version helps.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl Error {
    /// Whether restarting the worker with the same config may help.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Error::Config(_))
    }

    /// A short machine-readable code for `datasource_state.error_code`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Source(_) => "source_failed",
            Error::Sink(_) => "sink_failed",
            Error::Config(_) => "invalid_config",
        }
    }
}

/// Push connectors receive records (webhook); pull connectors fetch them (http_poll).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Records are pushed to the registry.
    Push,
    /// The worker fetches records.
    Pull,
}

/// What the catalog knows of a kind.
#[derive(Debug, Clone)]
pub struct KindInfo {
    /// The kind's name (`generator`).
    pub name: &'static str,
    /// The kind's version (semver).
    pub version: &'static str,
    /// A one-line description.
    pub summary: &'static str,
    /// The JSON Schema of its config.
    pub config_schema: serde_json::Value,
    /// Names of the secrets it needs.
    pub secrets: &'static [&'static str],
    /// Push or pull.
    pub mode: Mode,
    /// Whether it can re-read history on request.
    pub can_backfill: bool,
}

/// Progress and counters a worker shares with the supervisor; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<HealthCounters>);

#[derive(Debug, Default)]
struct HealthCounters {
    last_progress_ms: AtomicI64,
    running_since_ms: AtomicI64,
    records: AtomicU64,
    errors: AtomicU64,
}

impl Health {
    /// Records progress now (a record handled, a poll answered).
    pub fn progress(&self) {
        self.0
            .last_progress_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Marks the connector as running from now on (`true`) or not running (`false`).
    pub fn set_running(&self, running: bool) {
        let since = if running {
            chrono::Utc::now().timestamp_millis()
        } else {
            0
        };
        self.0.running_since_ms.store(since, Ordering::Relaxed);
    }

    /// Since when the connector runs, as Unix milliseconds (0: not running).
    pub fn running_since_ms(&self) -> i64 {
        self.0.running_since_ms.load(Ordering::Relaxed)
    }

    /// Counts `n` records ingested (and progress).
    pub fn records(&self, n: u64) {
        self.0.records.fetch_add(n, Ordering::Relaxed);
        self.progress();
    }

    /// Counts an error that did not stop the worker.
    pub fn error(&self) {
        self.0.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Last progress, as Unix milliseconds (0: none yet).
    pub fn last_progress_ms(&self) -> i64 {
        self.0.last_progress_ms.load(Ordering::Relaxed)
    }

    /// Records ingested so far.
    pub fn records_total(&self) -> u64 {
        self.0.records.load(Ordering::Relaxed)
    }

    /// Errors so far.
    pub fn errors_total(&self) -> u64 {
        self.0.errors.load(Ordering::Relaxed)
    }
}

/// Everything one run of a connector gets.
#[derive(Clone)]
pub struct RunContext {
    /// The datasource.
    pub datasource_id: Uuid,
    /// The version being run.
    pub version: i32,
    /// The version's config (validated).
    pub config: Arc<serde_json::Value>,
    /// Where records go.
    pub sink: sink::SinkHandle,
    /// Fires when the run must stop; a connector returns soon after.
    pub cancel: CancellationToken,
    /// Progress reporting.
    pub health: Health,
}

/// One kind of connector.
pub trait Connector: Send + Sync + 'static {
    /// The kind's metadata.
    fn info(&self) -> &KindInfo;

    /// Checks a config before anything runs with it.
    ///
    /// # Errors
    /// The first field that is wrong.
    fn validate(&self, config: &serde_json::Value) -> Result<(), ConfigError>;

    /// How long this config may go without progress before the worker counts as stalled
    /// (`None`: never, e.g. a push source with no traffic).
    fn stall_after(&self, config: &serde_json::Value) -> Option<Duration>;

    /// Runs until `ctx.cancel` fires (then returns `Ok`) or the source fails.
    fn run(&self, ctx: RunContext) -> BoxFuture<Result<(), Error>>;
}

/// The kinds this registry can run, by name.
#[derive(Clone, Default)]
pub struct Catalog {
    kinds: BTreeMap<String, Arc<dyn Connector>>,
}

impl Catalog {
    /// The built-in kinds.
    pub fn builtin() -> Self {
        let mut catalog = Self::default();
        catalog.register(Arc::new(generator::Generator::new()));
        catalog
    }

    /// Adds (or replaces) a kind.
    pub fn register(&mut self, connector: Arc<dyn Connector>) {
        self.kinds
            .insert(connector.info().name.to_owned(), connector);
    }

    /// The kind named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Connector>> {
        self.kinds.get(name)
    }

    /// Every kind's metadata, by name.
    pub fn kinds(&self) -> impl Iterator<Item = &KindInfo> {
        self.kinds.values().map(|c| c.info())
    }
}

/// Keys of a version's config that belong to the registry, not to the connector kind.
pub const VERSION_KEYS: &[&str] = &["transform", "output_schema"];

/// Reads an optional non-negative number field of a config object.
///
/// # Errors
/// The field is present but not a non-negative number.
pub(crate) fn optional_number(
    config: &serde_json::Value,
    field: &str,
) -> Result<Option<f64>, ConfigError> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(n) if n.is_finite() && n >= 0.0 => Ok(Some(n)),
            _ => Err(ConfigError::new(
                field,
                format!("must be a non-negative number, got {v}"),
            )),
        },
    }
}
