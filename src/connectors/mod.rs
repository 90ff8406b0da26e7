//! Connectors: the [`Connector`] trait every kind implements, the [`Catalog`] of kinds by
//! name, the built-in kinds (one file each) and the sinks records go to.
//!
//! A connector validates a config and runs until its cancellation token fires; it reports
//! progress through its [`Health`] handle and writes records to its [`sink::SinkHandle`]. It
//! does not decide when it runs (that is the supervisor's) nor map data (the transform's).

pub mod contain;
pub mod generator;
pub mod http;
pub mod http_poll;
pub mod kafka;
pub mod kafka_client;
pub mod kafka_sink;
pub mod position;
pub mod sink;
pub mod ticks;
pub mod webhook;

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
    /// The 1-based line within the field's own text (a transform script), when known.
    pub line: Option<usize>,
    /// The name of a required secret that is not stored, when that is the problem.
    pub missing_secret: Option<String>,
}

impl ConfigError {
    /// A refusal of `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
            line: None,
            missing_secret: None,
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
    /// The source refused the request for a reason that does not pass by itself within
    /// seconds (401, 403, 404, 410, a certificate that does not verify): tried again only
    /// after the long delay, never in a hot loop.
    #[error("source refused: {0}")]
    Refused(String),
    /// The source asked to be called again later (429 or 503 with `Retry-After`).
    #[error("source throttled: {message}")]
    Throttled {
        /// What the source answered.
        message: String,
        /// How long it asked to be left alone.
        after: Duration,
    },
    /// The config cannot work; only a new version helps.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// How a failure is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Transient (a connection error, a 5xx): exponential backoff, crash loop at the cap.
    Backoff,
    /// The source named the time: not before `after`, and not before the backoff either.
    NotBefore(Duration),
    /// Permanent until someone acts at the source: the long delay, no crash loop.
    Permanent,
    /// Only a new version helps.
    Never,
}

impl Error {
    /// Whether restarting the worker with the same config may help.
    pub fn is_retryable(&self) -> bool {
        self.retry() != Retry::Never
    }

    /// How the worker retries after this failure.
    pub fn retry(&self) -> Retry {
        match self {
            Error::Source(_) | Error::Sink(_) => Retry::Backoff,
            Error::Refused(_) => Retry::Permanent,
            Error::Throttled { after, .. } => Retry::NotBefore(*after),
            Error::Config(_) => Retry::Never,
        }
    }

    /// A short machine-readable code for `datasource_state.error_code`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Source(_) => "source_failed",
            Error::Sink(_) => "sink_failed",
            Error::Refused(_) => "source_refused",
            Error::Throttled { .. } => "source_throttled",
            Error::Config(_) => "invalid_config",
        }
    }
}

/// The longest `Retry-After` honoured: a source asking for more is asked again after this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3_600);

/// The delay a `Retry-After` value asks for, in either form (delay-seconds, digits only, or
/// an HTTP-date in any of its three formats, counted from `now`), at most
/// [`MAX_RETRY_AFTER`]; `None` when it is neither. A date in the past asks for no wait.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    let after = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only: more than u64 seconds is still "longer than the cap".
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    };
    Some(after.min(MAX_RETRY_AFTER))
}

/// Whether the instance still holds the lease a worker runs under: checked right before
/// every external action (a poll, a sink write, accepting a delivery), so an instance that
/// wakes from a pause past its lease acts no more, even before its cancellation arrives.
#[derive(Clone)]
pub struct LeaseCheck(Option<Arc<dyn Fn() -> bool + Send + Sync>>);

impl LeaseCheck {
    /// A check that asks `holds`.
    pub fn new(holds: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(holds)))
    }

    /// No lease to lose (the harness, a run outside the supervisor).
    pub fn always() -> Self {
        Self(None)
    }

    /// Whether the lease is still surely held now.
    pub fn holds(&self) -> bool {
        self.0.as_ref().is_none_or(|holds| holds())
    }
}

impl std::fmt::Debug for LeaseCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LeaseCheck").field(&self.holds()).finish()
    }
}

impl Default for LeaseCheck {
    fn default() -> Self {
        Self::always()
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
    /// Whether the current run has shown it works (see [`Health::working`]).
    working: tokio::sync::watch::Sender<bool>,
    last_progress_ms: AtomicI64,
    running_since_ms: AtomicI64,
    starts: AtomicU64,
    records: AtomicU64,
    errors: AtomicU64,
    dead_lettered: AtomicU64,
}

impl Health {
    /// Records progress now (a record handled, a poll answered): the run works.
    pub fn progress(&self) {
        self.0
            .last_progress_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
        self.working();
    }

    /// The connector reports that its run works: its first poll answered, its ingress bound,
    /// its first record generated. Until then the worker shows `starting`, never `running`.
    pub fn working(&self) {
        if !*self.0.working.borrow() {
            self.0.working.send_replace(true);
        }
    }

    /// Whether the current run has reported that it works.
    pub fn is_working(&self) -> bool {
        *self.0.working.borrow()
    }

    /// Returns once the current run has reported that it works.
    ///
    /// # Cancel safety
    /// Cancel safe: it only watches.
    pub async fn until_working(&self) {
        let mut working = self.0.working.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = working.wait_for(|w| *w).await;
    }

    /// Marks the connector as running from now on (`true`, which counts a start and waits
    /// for the new run to report that it works) or not running (`false`).
    pub fn set_running(&self, running: bool) {
        self.0.working.send_replace(false);
        let since = if running {
            self.0.starts.fetch_add(1, Ordering::Relaxed);
            chrono::Utc::now().timestamp_millis()
        } else {
            0
        };
        self.0.running_since_ms.store(since, Ordering::Relaxed);
    }

    /// Connector runs started so far: the first and every restart.
    pub fn starts_total(&self) -> u64 {
        self.0.starts.load(Ordering::Relaxed)
    }

    /// Since when the connector runs, as Unix milliseconds (0: not running).
    pub fn running_since_ms(&self) -> i64 {
        self.0.running_since_ms.load(Ordering::Relaxed)
    }

    /// Counts `n` records committed to the sink (and progress); the sink calls it when they
    /// are.
    pub fn records(&self, n: u64) {
        self.0.records.fetch_add(n, Ordering::Relaxed);
        self.progress();
    }

    /// Counts an error that did not stop the worker.
    pub fn error(&self) {
        self.0.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` input records sent to dead letters.
    pub fn dead_lettered(&self, n: u64) {
        self.0.dead_lettered.fetch_add(n, Ordering::Relaxed);
    }

    /// Input records sent to dead letters so far.
    pub fn dead_lettered_total(&self) -> u64 {
        self.0.dead_lettered.load(Ordering::Relaxed)
    }

    /// Last progress, as Unix milliseconds (0: none yet).
    pub fn last_progress_ms(&self) -> i64 {
        self.0.last_progress_ms.load(Ordering::Relaxed)
    }

    /// Records committed to the sink so far.
    pub fn records_total(&self) -> u64 {
        self.0.records.load(Ordering::Relaxed)
    }

    /// Errors so far.
    pub fn errors_total(&self) -> u64 {
        self.0.errors.load(Ordering::Relaxed)
    }
}

/// The worker's series on `/metrics` read these.
impl crate::telemetry::metrics::Figures for Health {
    fn records(&self) -> u64 {
        self.records_total()
    }

    fn errors(&self) -> u64 {
        self.errors_total()
    }

    fn dead_lettered(&self) -> u64 {
        self.dead_lettered_total()
    }

    fn restarts(&self) -> u64 {
        self.starts_total().saturating_sub(1)
    }

    fn last_progress_ms(&self) -> i64 {
        Health::last_progress_ms(self)
    }
}

/// A worker's decrypted secrets, by name. Plaintext lives only here, in values that redact
/// themselves and are zeroized when the last worker run holding them ends.
pub type SecretMap = Arc<BTreeMap<String, crate::secrets::SecretString>>;

/// Everything one run of a connector gets.
#[derive(Clone)]
pub struct RunContext {
    /// The datasource.
    pub datasource_id: Uuid,
    /// The version being run.
    pub version: i32,
    /// The version's config (validated).
    pub config: Arc<serde_json::Value>,
    /// The datasource's secrets.
    pub secrets: SecretMap,
    /// Where records go (through the version's transform).
    pub sink: sink::SinkHandle,
    /// Where a pull source keeps its position.
    pub cursor: CursorStore,
    /// Push sources register their inbox here.
    pub ingress: webhook::Ingress,
    /// Fires when the run must stop; a connector returns soon after.
    pub cancel: CancellationToken,
    /// Progress reporting.
    pub health: Health,
    /// Whether the instance still holds the datasource's lease: asked before every request
    /// to the source.
    pub lease: LeaseCheck,
}

impl RunContext {
    /// The plaintext of secret `name`, if the datasource has it.
    pub fn secret(&self, name: &str) -> Option<&str> {
        self.secrets.get(name).map(|s| s.expose())
    }

    /// Whether the run may act on the outside now: the lease is still surely held. A run
    /// that may not waits for its cancellation (which the lapsed lease brings) instead.
    pub fn may_act(&self) -> bool {
        self.lease.holds()
    }
}

/// The database every worker's cursor store shares: a pool, and slots bounding how many
/// cursor reads and saves use it at once. Thousands of pull workers starting together queue
/// for a slot (without a deadline) instead of taking every connection and failing on the
/// pool's wait timeout; the rest of the pool stays free for reconciles, the sink and the API.
#[derive(Clone)]
pub struct CursorDb {
    pool: deadpool_postgres::Pool,
    slots: Arc<tokio::sync::Semaphore>,
}

impl CursorDb {
    /// Cursor I/O on `pool`, at most `slots` (at least one) at a time.
    pub fn new(pool: deadpool_postgres::Pool, slots: usize) -> Self {
        Self {
            pool,
            slots: Arc::new(tokio::sync::Semaphore::new(slots.max(1))),
        }
    }

    /// A connection, once a slot is free; the slot is held as long as the connection.
    async fn get(&self, doing: &str) -> Result<(deadpool_postgres::Client, SlotPermit), Error> {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            // The semaphore is never closed.
            .map_err(|_| Error::Source(format!("{doing}: the registry is stopping")))?;
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| Error::Source(format!("{doing}: {e}")))?;
        Ok((client, permit))
    }
}

type SlotPermit = tokio::sync::OwnedSemaphorePermit;

/// A datasource's source position (`datasource_state.source_cursor`), and what its worker
/// knows of it.
///
/// The runs of one worker share that knowledge (clones share it): the position as the
/// supervisor read it with the desired state, then as each run read or saved it. Only the
/// datasource's worker writes the position while it holds the lease; a backfill moves the
/// restart generation on (and with it every save of the old generation is refused), so a new
/// generation starts from the position read with it ([`CursorStore::reset`]). A reload or a
/// restart under the same generation thus starts from what the last run left without reading
/// the database, and a save of the position already stored writes nothing.
#[derive(Clone)]
pub struct CursorStore {
    db: CursorDb,
    datasource_id: Uuid,
    writer: crate::db::repository::state::Writer,
    /// The stored position when known (`Some(None)`: known to be empty); `None`: read it.
    known: Arc<std::sync::Mutex<Option<Option<serde_json::Value>>>>,
}

impl CursorStore {
    /// The store of `datasource_id` for the worker `writer` (its restart generation, instance
    /// and lease epoch).
    pub fn new(
        db: CursorDb,
        datasource_id: Uuid,
        writer: crate::db::repository::state::Writer,
    ) -> Self {
        Self {
            db,
            datasource_id,
            writer,
            known: Arc::default(),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Option<Option<serde_json::Value>>> {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The store, with the position already read (`Some(None)`: known to be empty); `None`
    /// reads it at the next [`CursorStore::load`].
    #[must_use]
    pub fn with_known(self, known: Option<Option<serde_json::Value>>) -> Self {
        self.reset(known);
        self
    }

    /// Replaces what is known of the stored position (for every clone).
    pub fn reset(&self, known: Option<Option<serde_json::Value>>) {
        *self.known() = known;
    }

    /// The same store (sharing what is known) for a run of `writer`.
    #[must_use]
    pub fn for_writer(&self, writer: crate::db::repository::state::Writer) -> Self {
        Self {
            writer,
            ..self.clone()
        }
    }

    /// The saved position, if any: the known one, otherwise read from the database.
    ///
    /// # Errors
    /// [`Error::Source`] when the database cannot be read.
    pub async fn load(&self) -> Result<Option<serde_json::Value>, Error> {
        if let Some(known) = self.known().clone() {
            return Ok(known);
        }
        let (client, _slot) = self.db.get("reading the cursor").await?;
        let read = crate::db::repository::state::load_cursor(&**client, self.datasource_id)
            .await
            .map_err(|e| Error::Source(format!("reading the cursor: {e}")))?;
        *self.known() = Some(read.clone());
        Ok(read)
    }

    /// Saves the position (nothing to write when it is the one known to be stored); a
    /// worker superseded by a restart or backfill, or whose instance no longer holds the
    /// lease under its epoch, saves nothing.
    ///
    /// # Errors
    /// [`Error::Source`] when the database cannot be written.
    pub async fn save(&self, cursor: &serde_json::Value) -> Result<(), Error> {
        {
            let mut known = self.known();
            if known.as_ref().is_some_and(|k| k.as_ref() == Some(cursor)) {
                return Ok(());
            }
            // Unknown until the write is known to have landed: a save interrupted or failed
            // may or may not have.
            *known = None;
        }
        let (client, _slot) = self.db.get("saving the cursor").await?;
        let saved = crate::db::repository::state::save_cursor(
            &**client,
            self.datasource_id,
            &self.writer,
            cursor,
        )
        .await
        .map_err(|e| Error::Source(format!("saving the cursor: {e}")))?;
        if saved {
            *self.known() = Some(Some(cursor.clone()));
        }
        Ok(())
    }
}

/// Where a connector sends requests, and with them the datasource's credentials: the scheme,
/// host and port of a URL (the path does not matter: a credential sent to a host can be
/// used on every path of it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Destination {
    /// `http`, `https`, …
    pub scheme: String,
    /// The host, lower-cased (a name, an IPv4 address or a bracketed IPv6 one).
    pub host: String,
    /// The port, the scheme's default when the URL gives none.
    pub port: u16,
}

impl Destination {
    /// The destination of `url`.
    ///
    /// # Errors
    /// A [`ConfigError`] on `field` when `url` is not a URL with a host and a port.
    pub fn of_url(field: &str, url: &str) -> Result<Self, ConfigError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| ConfigError::new(field, format!("is not a URL: {e}")))?;
        let host = parsed
            .host()
            .ok_or_else(|| ConfigError::new(field, "has no host"))?
            .to_string()
            .to_ascii_lowercase();
        let port = parsed
            .port_or_known_default()
            .ok_or_else(|| ConfigError::new(field, "has no port and its scheme no default"))?;
        Ok(Self {
            scheme: parsed.scheme().to_owned(),
            host,
            port,
        })
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// The config key a schema violation is about, as the user wrote it (`template.x`): a missing
/// required property or an unexpected one is named by itself, not by the object holding it.
fn schema_field(e: &jsonschema::ValidationError<'_>) -> String {
    let path = e.instance_path().to_string();
    let mut field = path.trim_start_matches('/').replace('/', ".");
    let named = match e.kind() {
        jsonschema::error::ValidationErrorKind::Required { property } => {
            property.as_str().map(str::to_owned)
        }
        jsonschema::error::ValidationErrorKind::AdditionalProperties { unexpected } => {
            unexpected.first().cloned()
        }
        _ => None,
    };
    if let Some(name) = named {
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(&name);
    }
    field
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

    /// The secrets a run with this config needs (the kind's fixed ones by default).
    fn required_secrets(&self, _config: &serde_json::Value) -> Vec<String> {
        self.info()
            .secrets
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    }

    /// The config key that names the required secret `name`, when the config names it (a
    /// `bearer_secret: token`); `None` for a secret the kind always needs.
    fn secret_field(&self, _config: &serde_json::Value, _name: &str) -> Option<String> {
        None
    }

    /// Every destination a run with this config may send requests (and credentials) to:
    /// each URL the kind may call, the brokers it may connect to. None by default (kinds that
    /// call nowhere). Stored secrets follow saved destinations: a config that is not saved
    /// gets them only for destinations a saved version of its datasource has.
    ///
    /// # Errors
    /// The config is refused by the kind.
    fn destinations(&self, _config: &serde_json::Value) -> Result<Vec<Destination>, ConfigError> {
        Ok(Vec::new())
    }

    /// The records the connector's logic finds in a sample payload, for the test harness:
    /// by default an array gives its items and anything else is one record.
    ///
    /// # Errors
    /// The sample is missing (for kinds that need one) or does not fit the config.
    fn sample_records(
        &self,
        _config: &serde_json::Value,
        sample: Option<&serde_json::Value>,
    ) -> Result<Vec<serde_json::Value>, ConfigError> {
        match sample {
            None => Err(ConfigError::new(
                "sample",
                format!("kind {} needs a sample payload", self.info().name),
            )),
            Some(serde_json::Value::Array(items)) => Ok(items.clone()),
            Some(other) => Ok(vec![other.clone()]),
        }
    }

    /// How long this config may go without progress before the worker counts as stalled
    /// (`None`: never, e.g. a push source with no traffic).
    fn stall_after(&self, config: &serde_json::Value) -> Option<Duration>;

    /// The format of the source position the kind saves (what a restart resumes from), or
    /// `None` when it keeps none (a push source): then a position cannot be set for it.
    fn position(&self) -> Option<&'static position::Format> {
        None
    }

    /// Fetches one real sample payload from the source, for the test harness when asked.
    ///
    /// # Errors
    /// The kind cannot fetch (push and synthetic kinds), or the fetch failed.
    fn fetch_sample(
        &self,
        _config: &serde_json::Value,
        _secrets: &SecretMap,
    ) -> BoxFuture<Result<serde_json::Value, Error>> {
        let name = self.info().name;
        Box::pin(async move {
            Err(Error::Source(format!(
                "kind {name} cannot fetch a sample; give one"
            )))
        })
    }

    /// Make before break: whether a run with `config` can start, checked before a hot reload
    /// stops the running worker (for `http_poll`, the host resolves and a TCP connection
    /// opens). The worker bounds the check by `within` too. A kind with nothing external to
    /// reach passes. Skipped when the running version works against the same
    /// [`Connector::destinations`], which shows them reachable.
    ///
    /// # Errors
    /// Why a run with this config cannot start, without secrets in it.
    fn preflight(
        &self,
        _config: &serde_json::Value,
        _within: Duration,
    ) -> BoxFuture<Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether the kind can work at all (e.g. its client library initialises); cached by the
    /// catalog.
    fn health_check(&self) -> BoxFuture<Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Runs until `ctx.cancel` fires (then returns `Ok`) or the source fails. A run reports
    /// through [`Health::working`] (or [`Health::progress`]) once it works; until then its
    /// worker shows `starting`. Before every request to the outside it asks
    /// [`RunContext::may_act`].
    fn run(&self, ctx: RunContext) -> BoxFuture<Result<(), Error>>;
}

/// The kinds this registry can run, by name.
#[derive(Clone, Default)]
pub struct Catalog {
    kinds: BTreeMap<String, Arc<dyn Connector>>,
    /// Each kind's config schema, compiled once when the kind is registered.
    schemas: BTreeMap<String, Arc<Result<jsonschema::Validator, String>>>,
    health: Arc<std::sync::Mutex<BTreeMap<String, KindHealth>>>,
}

impl Catalog {
    /// The built-in kinds.
    pub fn builtin() -> Self {
        let mut catalog = Self::default();
        catalog.register(Arc::new(generator::Generator::new()));
        catalog.register(Arc::new(http_poll::HttpPoll::new()));
        catalog.register(Arc::new(kafka::Kafka::new()));
        catalog.register(Arc::new(webhook::Webhook::new()));
        catalog
    }

    /// Adds (or replaces) a kind.
    pub fn register(&mut self, connector: Arc<dyn Connector>) {
        let name = connector.info().name.to_owned();
        let schema =
            jsonschema::validator_for(&connector.info().config_schema).map_err(|e| e.to_string());
        self.schemas.insert(name.clone(), Arc::new(schema));
        self.kinds.insert(name, connector);
    }

    /// The kind named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Connector>> {
        self.kinds.get(name)
    }

    /// Every kind's metadata, by name.
    pub fn kinds(&self) -> impl Iterator<Item = &KindInfo> {
        self.kinds.values().map(|c| c.info())
    }

    /// Checks a version before it is published: the kind exists, its major version is the
    /// one the config was written for (`kind_version`, when given), the config matches the
    /// kind's JSON Schema and its own checks, the transform compiles, and every secret the
    /// config needs is among `secret_names`. Returns every problem found, each with its field.
    ///
    /// # Errors
    /// The list of field violations.
    pub fn check(
        &self,
        kind: &str,
        config: &serde_json::Value,
        secret_names: &[String],
        limits: &crate::transform::Limits,
    ) -> Result<(), Vec<ConfigError>> {
        let Some(connector) = self.get(kind) else {
            let known: Vec<&str> = self.kinds.keys().map(String::as_str).collect();
            return Err(vec![ConfigError::new(
                "kind",
                format!(
                    "unknown connector kind {kind:?}; known kinds: {}",
                    known.join(", ")
                ),
            )]);
        };
        let mut problems = Vec::new();
        let info = connector.info();
        if let Some(wanted) = config.get("kind_version") {
            let major = |v: &str| v.split('.').next().map(str::to_owned);
            match wanted.as_str() {
                Some(w) if major(w) == major(info.version) => {}
                Some(w) => problems.push(ConfigError::new(
                    "kind_version",
                    format!(
                        "written for {kind} {w}, but this registry runs {kind} {}",
                        info.version
                    ),
                )),
                None => problems.push(ConfigError::new("kind_version", "must be a version string")),
            }
        }
        // The kind's schema covers the kind's own fields, not the registry's.
        let mut own = config.clone();
        if let Some(object) = own.as_object_mut() {
            object.retain(|k, _| !VERSION_KEYS.contains(&k.as_str()));
        }
        match self.schemas.get(kind).map(|s| s.as_ref()) {
            Some(Ok(schema)) => problems.extend(
                schema
                    .iter_errors(&own)
                    .map(|e| ConfigError::new(schema_field(&e), e.to_string())),
            ),
            Some(Err(e)) => problems.push(ConfigError::new(
                "kind",
                format!("the kind's own schema is invalid: {e}"),
            )),
            None => {}
        }
        // The kind's code runs contained: a config it panics on is refused, naming the panic.
        let refused = |e: contain::Panicked| ConfigError::new("", e.to_string());
        if problems.is_empty() {
            match contain::contain("validate", || connector.validate(config)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => problems.push(e),
                Err(e) => problems.push(refused(e)),
            }
        }
        match contain::contain("transform", || {
            crate::transform::Transform::from_config(config, limits)
        }) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.push(ConfigError {
                line: e.line(),
                ..ConfigError::new(e.field(), e.to_string())
            }),
            Err(e) => problems.push(refused(e)),
        }
        let required = match self.secrets_needed(kind, config) {
            Ok(required) => required,
            Err(e) => {
                problems.push(e);
                Vec::new()
            }
        };
        for missing in required
            .into_iter()
            .filter(|name| !secret_names.contains(name))
        {
            let field =
                contain::contain("secret_field", || connector.secret_field(config, &missing))
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| format!("secrets.{missing}"));
            problems.push(ConfigError {
                missing_secret: Some(missing.clone()),
                ..ConfigError::new(
                    field,
                    format!(
                        "needs the secret {missing:?}, which is not stored for this datasource; \
                         put it before publishing"
                    ),
                )
            });
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The secrets `config` needs for `kind`, by name (none for an unknown kind).
    ///
    /// # Errors
    /// The kind's code panicked on this config: the refusal, naming the panic.
    pub fn secrets_needed(
        &self,
        kind: &str,
        config: &serde_json::Value,
    ) -> Result<Vec<String>, ConfigError> {
        let Some(connector) = self.get(kind) else {
            return Ok(Vec::new());
        };
        contain::contain("required_secrets", || connector.required_secrets(config))
            .map_err(|e| ConfigError::new("", e.to_string()))
    }

    /// The kind's health, checked at most once per `max_age` (the API's default is 60 s).
    pub async fn health(&self, kind: &str, max_age: Duration) -> Option<KindHealth> {
        let connector = self.get(kind)?.clone();
        if let Some(cached) = self
            .health
            .lock()
            .ok()?
            .get(kind)
            .filter(|h| h.checked_at.elapsed() < max_age)
        {
            return Some(cached.clone());
        }
        let result = connector.health_check().await;
        let health = KindHealth {
            healthy: result.is_ok(),
            detail: result.err().unwrap_or_default(),
            checked_at: std::time::Instant::now(),
        };
        if let Ok(mut cache) = self.health.lock() {
            cache.insert(kind.to_owned(), health.clone());
        }
        Some(health)
    }
}

/// A kind's last health check.
#[derive(Debug, Clone)]
pub struct KindHealth {
    /// Whether the kind can work (its dependencies are available).
    pub healthy: bool,
    /// Why not, when it cannot.
    pub detail: String,
    /// When it was checked.
    pub checked_at: std::time::Instant,
}

/// The records in a payload: an array's items, nothing for `null`, else the value itself.
pub(crate) fn records_in(payload: &serde_json::Value) -> Vec<serde_json::Value> {
    match payload {
        serde_json::Value::Array(items) => items.clone(),
        serde_json::Value::Null => Vec::new(),
        other => vec![other.clone()],
    }
}

/// Keys of a version's config that belong to the registry, not to the connector kind.
pub const VERSION_KEYS: &[&str] = &["transform", "output_schema", "kind_version"];

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

/// Reads an optional integer field of a config object, `default` when absent, refused unless
/// it is a whole number from `min` to `max` (a JSON number written `5.0` counts as whole, as in
/// JSON Schema).
///
/// # Errors
/// The field is present but not a whole number within the bounds.
pub(crate) fn integer_in(
    config: &serde_json::Value,
    field: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let refused = || ConfigError::new(field, format!("must be an integer from {min} to {max}"));
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => {
            if let Some(n) = v.as_u64() {
                return (min..=max).contains(&n).then_some(n).ok_or_else(refused);
            }
            match v.as_f64() {
                // Bounds below 2^53 are exact as floats, so the comparison is exact too.
                Some(n) if n.fract() == 0.0 && n >= min as f64 && n <= max as f64 => Ok(n as u64),
                _ => Err(refused()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::Limits;
    use serde_json::json;

    #[tokio::test]
    async fn a_known_cursor_is_served_without_the_database_until_a_save_may_have_changed_it() {
        // A pool on a port nothing listens on: any read or write fails.
        let pool = crate::db::pool(
            "postgres://dsreg@127.0.0.1:1/none",
            1,
            Duration::from_millis(200),
        )
        .expect("a pool is made without connecting");
        let writer = crate::db::repository::state::Writer {
            generation: 0,
            instance: "i".into(),
            epoch: 1,
        };
        let store = CursorStore::new(CursorDb::new(pool, 1), Uuid::new_v4(), writer.clone())
            .with_known(Some(Some(json!({ "cursor": 7 }))));
        assert_eq!(store.load().await.unwrap(), Some(json!({ "cursor": 7 })));
        // Another run of the same worker shares what is known.
        let next_run = store.for_writer(crate::db::repository::state::Writer {
            generation: 0,
            ..writer
        });
        assert_eq!(next_run.load().await.unwrap(), Some(json!({ "cursor": 7 })));
        // Saving the stored position writes nothing.
        next_run.save(&json!({ "cursor": 7 })).await.unwrap();
        // A save that fails leaves the position unknown: the next load reads it.
        assert!(next_run.save(&json!({ "cursor": 8 })).await.is_err());
        assert!(store.load().await.is_err(), "read from the database");
        let empty = store.clone().with_known(Some(None));
        assert_eq!(empty.load().await.unwrap(), None);
        assert_eq!(store.load().await.unwrap(), None, "clones share it");
    }

    fn fields(result: Result<(), Vec<ConfigError>>) -> Vec<String> {
        result.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn publishing_checks_kind_schema_transform_secrets_and_kind_version() {
        let catalog = Catalog::builtin();
        let limits = Limits::default();
        assert!(
            catalog
                .check("generator", &json!({ "rate_per_sec": 1 }), &[], &limits)
                .is_ok()
        );
        assert_eq!(
            fields(catalog.check("nope", &json!({}), &[], &limits)),
            ["kind"]
        );
        assert_eq!(
            fields(catalog.check("generator", &json!({ "rate_per_sec": "x" }), &[], &limits)),
            ["rate_per_sec"]
        );
        assert_eq!(
            fields(catalog.check(
                "http_poll",
                &json!({ "url": "http://x", "bearer_secret": "token" }),
                &[],
                &limits
            )),
            ["bearer_secret"]
        );
        // A missing required key, and an unknown one, are named by themselves.
        assert_eq!(
            fields(catalog.check("http_poll", &json!({}), &[], &limits)),
            ["url"]
        );
        assert_eq!(
            fields(catalog.check("generator", &json!({ "rat_per_sec": 1 }), &[], &limits)),
            ["rat_per_sec"]
        );
        assert!(
            catalog
                .check(
                    "http_poll",
                    &json!({ "url": "http://x", "bearer_secret": "token" }),
                    &["token".into()],
                    &limits
                )
                .is_ok()
        );
        assert_eq!(
            fields(catalog.check("webhook", &json!({}), &[], &limits)),
            ["secrets.webhook_secret"]
        );
        assert_eq!(
            fields(catalog.check(
                "generator",
                &json!({ "kind_version": "2.0.0" }),
                &[],
                &limits
            )),
            ["kind_version"]
        );
        assert!(
            catalog
                .check("generator", &json!({ "kind_version": "1.4" }), &[], &limits)
                .is_ok()
        );
        assert_eq!(
            fields(catalog.check(
                "generator",
                &json!({ "transform": "let x = ;" }),
                &[],
                &limits
            )),
            ["transform"]
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates_and_is_bounded() {
        // 2026-01-05T10:00:00Z.
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_767_607_200);
        assert_eq!(retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Mon, 05 Jan 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        // The obsolete forms an HTTP-date may still take.
        assert_eq!(
            retry_after("Monday, 05-Jan-26 10:01:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            retry_after("Mon Jan  5 10:00:05 2026", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_after("Mon, 05 Jan 2026 09:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past: now"
        );
        assert_eq!(retry_after("99999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(
            retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        for refused in [
            "soon",
            "-3",
            "+3",
            "3s",
            "",
            "1e3",
            "Mon, 05 Jan 2026 10:00:30 +0100",
        ] {
            assert_eq!(retry_after(refused, now), None, "{refused:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_retry_after_value_is_read_without_panic_and_bounded(value in "\\PC{0,40}") {
            let now = std::time::SystemTime::now();
            if let Some(after) = retry_after(&value, now) {
                proptest::prop_assert!(after <= MAX_RETRY_AFTER);
            }
        }

        #[test]
        fn retry_after_seconds_and_dates_agree(seconds in 0u64..200_000, pad in 0usize..3) {
            let now = std::time::UNIX_EPOCH + Duration::from_secs(1_767_607_200);
            let expected = Duration::from_secs(seconds).min(MAX_RETRY_AFTER);
            let spaces = " ".repeat(pad);
            proptest::prop_assert_eq!(
                retry_after(&format!("{spaces}{seconds}{spaces}"), now),
                Some(expected)
            );
            let date = httpdate::fmt_http_date(now + Duration::from_secs(seconds));
            proptest::prop_assert_eq!(retry_after(&date, now), Some(expected));
            let past = httpdate::fmt_http_date(now - Duration::from_secs(seconds));
            proptest::prop_assert_eq!(retry_after(&past, now), Some(Duration::ZERO));
        }
    }

    #[test]
    fn failures_say_how_they_are_retried() {
        assert_eq!(Error::Source("x".into()).retry(), Retry::Backoff);
        assert_eq!(Error::Refused("401".into()).retry(), Retry::Permanent);
        assert_eq!(
            Error::Throttled {
                message: "429".into(),
                after: Duration::from_secs(3)
            }
            .retry(),
            Retry::NotBefore(Duration::from_secs(3))
        );
        let config = Error::Config(ConfigError::new("url", "bad"));
        assert_eq!(config.retry(), Retry::Never);
        assert!(!config.is_retryable());
        assert!(Error::Refused("401".into()).is_retryable());
    }

    #[tokio::test]
    async fn a_run_is_not_working_until_it_says_so() {
        let health = Health::default();
        health.set_running(true);
        assert!(!health.is_working());
        let waiter = health.clone();
        let waited = tokio::spawn(async move { waiter.until_working().await });
        health.progress();
        waited.await.unwrap();
        assert!(health.is_working());
        // A new run starts out not working again.
        health.set_running(true);
        assert!(!health.is_working());
    }

    #[tokio::test]
    async fn kind_health_is_cached() {
        let catalog = Catalog::builtin();
        let first = catalog
            .health("generator", Duration::from_secs(60))
            .await
            .unwrap();
        assert!(first.healthy);
        let second = catalog
            .health("generator", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(first.checked_at, second.checked_at, "served from the cache");
        assert!(
            catalog
                .health("nope", Duration::from_secs(60))
                .await
                .is_none()
        );
    }
}
