//! Settings: every knob of the service, typed, with its flag, its environment variable and its
//! default in one place. Loaded once by the CLI; nothing else reads the environment for them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::api::grpc::limits::RpcLimits;
use crate::api::tls::TlsFiles;
use crate::backoff::BackoffPolicy;
use crate::connectors::sink::Target;
use crate::files::http::{Source, SourceConfig, Token};
use crate::files::{ConflictPolicy, WatchConfig};
use crate::supervisor::SupervisorConfig;
use crate::transform::Limits;

/// Whether statements are prepared by name on the pool's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PreparedStatements {
    /// When the pool's connections are sessions: no separate LISTEN URL.
    Auto,
    /// Always.
    On,
    /// Never: every statement goes unnamed.
    Off,
}

/// How `dsreg` reaches its database and where it serves.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Postgres URL; when unset, an embedded cluster in `--data-dir` is used.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Postgres URL of the LISTEN connection (the main URL when unset): a direct connection
    /// to the primary when `--database-url` goes through a transaction-mode pooler
    /// (PgBouncer), where LISTEN never receives anything. TLS as its own `sslmode` says.
    #[arg(long, env = "DSREG_LISTEN_DATABASE_URL", hide_env_values = true)]
    pub listen_database_url: Option<String>,

    /// Whether the registry's most frequent statements (the desired-state read of every
    /// reload, the worker-state writes) are prepared once per pooled connection and reused by
    /// name: `auto` when `--listen-database-url` is unset (the database URL then carries
    /// LISTEN, so its connections are sessions), `on` behind a pooler that keeps prepared
    /// statements (PgBouncer 1.21+ with `max_prepared_statements`), `off` behind any other
    /// transaction-mode pooler.
    #[arg(long, env = "DSREG_PREPARED_STATEMENTS", value_enum, default_value_t = PreparedStatements::Auto)]
    pub prepared_statements: PreparedStatements,

    /// How often a notification is sent through the pool to check that the LISTEN connection
    /// receives it, in milliseconds (the first check runs at start).
    #[arg(long, env = "DSREG_NOTIFICATION_CHECK_INTERVAL_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub notification_check_interval_ms: u64,

    /// How long that notification may take to arrive before the notification path counts as
    /// broken, in milliseconds.
    #[arg(long, env = "DSREG_NOTIFICATION_CHECK_TIMEOUT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub notification_check_timeout_ms: u64,

    /// How often the outbox is read while the notification path is not known to work, in
    /// milliseconds: publishes still converge, at this pace instead of at once.
    #[arg(long, env = "DSREG_OUTBOX_POLL_INTERVAL_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub outbox_poll_interval_ms: u64,

    /// Folder for the embedded cluster (`<data-dir>/pg`) and local state.
    #[arg(long, env = "DSREG_DATA_DIR", default_value = ".dsreg")]
    pub data_dir: PathBuf,

    /// Fixed port for the embedded cluster; a free one is picked when unset.
    #[arg(long, env = "DSREG_PG_PORT")]
    pub pg_port: Option<u16>,

    /// Address of the HTTP port: `/healthz`, `/readyz`, `/metrics` and the webhook ingress
    /// (`POST /ingest/{datasource}`).
    #[arg(long, env = "DSREG_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Address of the gRPC port.
    #[arg(long, env = "DSREG_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// The gRPC port's TLS certificate chain (PEM, leaf first); with `--grpc-tls-key` the
    /// port speaks TLS only. Re-read when the file changes. Plaintext when unset.
    #[arg(long, env = "DSREG_GRPC_TLS_CERT", value_name = "PATH")]
    pub grpc_tls_cert: Option<PathBuf>,

    /// The gRPC port's TLS private key (PEM). Re-read when the file changes.
    #[arg(long, env = "DSREG_GRPC_TLS_KEY", value_name = "PATH")]
    pub grpc_tls_key: Option<PathBuf>,

    /// CA certificates (PEM) gRPC clients' certificates must be signed by: mutual TLS, a
    /// client without such a certificate is refused at the handshake.
    #[arg(long, env = "DSREG_GRPC_TLS_CLIENT_CA", value_name = "PATH")]
    pub grpc_tls_client_ca: Option<PathBuf>,

    /// The HTTP port's TLS certificate chain (PEM, leaf first); with `--http-tls-key` the port
    /// (health, readiness, metrics, webhooks) speaks HTTPS only. Plaintext when unset.
    #[arg(long, env = "DSREG_HTTP_TLS_CERT", value_name = "PATH")]
    pub http_tls_cert: Option<PathBuf>,

    /// The HTTP port's TLS private key (PEM).
    #[arg(long, env = "DSREG_HTTP_TLS_KEY", value_name = "PATH")]
    pub http_tls_key: Option<PathBuf>,

    /// CA certificates (PEM) HTTP clients' certificates must be signed by (mutual TLS on the
    /// HTTP port: probes and webhook senders need a certificate too).
    #[arg(long, env = "DSREG_HTTP_TLS_CLIENT_CA", value_name = "PATH")]
    pub http_tls_client_ca: Option<PathBuf>,

    /// Connections in the database pool; by default three per CPU (4 to 64): more connections
    /// than the machine can run at once only queue inside Postgres.
    #[arg(long, env = "DSREG_POOL_SIZE", default_value_t = default_pool_size())]
    pub pool_size: usize,

    /// How long a request waits for a pooled connection, in milliseconds.
    #[arg(long, env = "DSREG_POOL_WAIT_MS", default_value_t = 5_000)]
    pub pool_wait_ms: u64,

    /// How long opening a database connection may take, TCP, TLS and authentication
    /// together, in milliseconds (per host; 0: unbounded). A `connect_timeout` in the URL wins.
    #[arg(long, env = "DSREG_DB_CONNECT_TIMEOUT_MS", default_value_t = 5_000)]
    pub db_connect_timeout_ms: u64,

    /// The server's `statement_timeout` for dsreg's connections, in milliseconds (0: the
    /// server's own), sent in the startup options so it holds through a transaction pooler.
    /// A `statement_timeout` in the URL's `options` wins.
    #[arg(long, env = "DSREG_DB_STATEMENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub db_statement_timeout_ms: u64,

    /// Idle time before a database connection's first TCP keepalive, in milliseconds (whole
    /// seconds, at least one). A `keepalives_idle` in the URL wins; `keepalives=0` turns
    /// keepalives off.
    #[arg(long, env = "DSREG_DB_KEEPALIVE_IDLE_MS", default_value_t = 10_000)]
    pub db_keepalive_idle_ms: u64,

    /// Time between unanswered TCP keepalives, in milliseconds (whole seconds, at least one).
    /// A `keepalives_interval` in the URL wins.
    #[arg(long, env = "DSREG_DB_KEEPALIVE_INTERVAL_MS", default_value_t = 2_000)]
    pub db_keepalive_interval_ms: u64,

    /// Unanswered TCP keepalives before a database connection is dropped. A
    /// `keepalives_count` in the URL wins.
    #[arg(long, env = "DSREG_DB_KEEPALIVE_COUNT", default_value_t = 3)]
    pub db_keepalive_count: u32,

    /// How long data sent to the database may stay unacknowledged before the connection is
    /// dropped (`TCP_USER_TIMEOUT`), in milliseconds (0: the system's). A `tcp_user_timeout`
    /// in the URL wins.
    #[arg(long, env = "DSREG_DB_TCP_USER_TIMEOUT_MS", default_value_t = 20_000)]
    pub db_tcp_user_timeout_ms: u64,

    /// How long shutdown waits for in-flight work, in milliseconds.
    #[arg(long, env = "DSREG_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,

    /// Master keys for secrets, `1:<base64 32 bytes>,2:<base64>`; the highest is active unless
    /// `--active-key-version` says otherwise.
    #[arg(long, env = "DSREG_MASTER_KEYS", hide_env_values = true)]
    pub master_keys: Option<String>,

    /// A master key file (`{"active": 2, "keys": {"1": "<base64>", ...}}`, mode 0600). The
    /// embedded default creates a development one in `--data-dir` when no key is given.
    #[arg(long, env = "DSREG_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,

    /// A command that prints the master key set (`{"active": 2, "keys": {"1": "<base64>"}}`)
    /// on stdout, run once at start without a shell (the program and its arguments, split at
    /// spaces): any KMS CLI plugs in this way.
    #[arg(long, env = "DSREG_MASTER_KEY_COMMAND")]
    pub master_key_command: Option<String>,

    /// Vault's address, to unwrap master keys kept wrapped by its transit engine (with
    /// `--vault-wrapped-keys` and `--vault-token-file`); once, at start.
    #[arg(long, env = "DSREG_VAULT_ADDR")]
    pub vault_addr: Option<String>,

    /// A file holding the Vault token (mode 0600, as a Vault agent's token sink writes it).
    #[arg(long, env = "DSREG_VAULT_TOKEN_FILE")]
    pub vault_token_file: Option<PathBuf>,

    /// The mount of Vault's transit engine.
    #[arg(long, env = "DSREG_VAULT_TRANSIT_MOUNT", default_value = "transit")]
    pub vault_transit_mount: String,

    /// The transit key that wrapped the master keys.
    #[arg(long, env = "DSREG_VAULT_TRANSIT_KEY", default_value = "dsreg")]
    pub vault_transit_key: String,

    /// The wrapped key set: `{"active": 2, "keys": {"1": "vault:v1:…"}}`, each entry a transit
    /// ciphertext of a base64 32-byte key.
    #[arg(long, env = "DSREG_VAULT_WRAPPED_KEYS")]
    pub vault_wrapped_keys: Option<PathBuf>,

    /// How gRPC callers authenticate.
    #[command(flatten)]
    pub auth: crate::api::grpc::auth::AuthSettings,

    /// The master key version new secrets are sealed with (with `--master-keys`).
    #[arg(long, env = "DSREG_ACTIVE_KEY_VERSION")]
    pub active_key_version: Option<u32>,

    /// Start even when the master keys do not open a sample of the stored secrets (a
    /// version some rows use is missing, or a key of the right version is wrong): the
    /// datasources whose secrets do not open fail until the keys are fixed. By default
    /// `serve` refuses to start then.
    #[arg(long, env = "DSREG_SKIP_KEY_CHECK")]
    pub skip_key_check: bool,

    /// Where workers' records go: `postgres` (the registry's database), `http` or `kafka`.
    #[arg(long, env = "DSREG_SINK", default_value = "postgres", value_parser = ["postgres", "http", "kafka"])]
    pub sink: String,

    /// The gateway URL the `http` sink POSTs batches to.
    #[arg(long, env = "DSREG_SINK_URL")]
    pub sink_url: Option<String>,

    /// The brokers the `kafka` sink writes to (`host:port,…`).
    #[arg(long, env = "DSREG_SINK_KAFKA_BROKERS")]
    pub sink_kafka_brokers: Option<String>,

    /// The topic the `kafka` sink writes every record to.
    #[arg(long, env = "DSREG_SINK_KAFKA_TOPIC")]
    pub sink_kafka_topic: Option<String>,

    /// The record field whose value keys each message of the `kafka` sink (a string as it
    /// is, anything else as its JSON text); unset or missing: no key.
    #[arg(long, env = "DSREG_SINK_KAFKA_KEY_FIELD")]
    pub sink_kafka_key_field: Option<String>,

    /// The `kafka` sink speaks TLS to the brokers, verifying them against the system's root
    /// certificates (or the CA of `--sink-kafka-ca-file`).
    #[arg(long, env = "DSREG_SINK_KAFKA_TLS")]
    pub sink_kafka_tls: bool,

    /// A PEM file of the CA certificates the `kafka` sink verifies the brokers against (TLS
    /// on, the system roots not used); read once, at start.
    #[arg(long, env = "DSREG_SINK_KAFKA_CA_FILE")]
    pub sink_kafka_ca_file: Option<PathBuf>,

    /// The `kafka` sink's compression: none, gzip, snappy, lz4 or zstd.
    #[arg(long, env = "DSREG_SINK_KAFKA_COMPRESSION", default_value = "lz4")]
    pub sink_kafka_compression: String,

    /// Transform limit: operations per record, the script's callbacks (`map`, `filter`,
    /// `reduce`, …) at any depth included.
    #[arg(long, env = "DSREG_TRANSFORM_MAX_OPERATIONS", default_value_t = Limits::default().max_operations)]
    pub transform_max_operations: u64,

    /// Transform limit: wall-clock time per record, in milliseconds, checked every 64
    /// operations wherever the script is (callbacks included).
    #[arg(long, env = "DSREG_TRANSFORM_DEADLINE_MS", default_value_t = Limits::default().deadline.as_millis() as u64)]
    pub transform_deadline_ms: u64,

    /// Transform limit: bytes of string data in one value (all strings inside one array or
    /// map together).
    #[arg(long, env = "DSREG_TRANSFORM_MAX_STRING_BYTES", default_value_t = Limits::default().max_string_bytes)]
    pub transform_max_string_bytes: usize,

    /// Transform limit: elements of one array, nested arrays included.
    #[arg(long, env = "DSREG_TRANSFORM_MAX_ARRAY_LEN", default_value_t = Limits::default().max_array_len)]
    pub transform_max_array_len: usize,

    /// Transform limit: entries of one object map, nested maps included.
    #[arg(long, env = "DSREG_TRANSFORM_MAX_MAP_LEN", default_value_t = Limits::default().max_map_len)]
    pub transform_max_map_len: usize,

    /// Transform limit: output records one input record may produce.
    #[arg(long, env = "DSREG_TRANSFORM_MAX_OUTPUTS", default_value_t = Limits::default().max_outputs)]
    pub transform_max_outputs: usize,

    /// Transform limit: nested function calls (recursion depth).
    #[arg(long, env = "DSREG_TRANSFORM_MAX_CALL_DEPTH", default_value_t = Limits::default().max_call_depth)]
    pub transform_max_call_depth: usize,

    /// Transform limit: nesting of expressions in a script, checked when it compiles.
    #[arg(long, env = "DSREG_TRANSFORM_MAX_EXPR_DEPTH", default_value_t = Limits::default().max_expr_depth)]
    pub transform_max_expr_depth: usize,

    /// Transform limit: bytes of a script's source.
    #[arg(long, env = "DSREG_TRANSFORM_MAX_SCRIPT_BYTES", default_value_t = Limits::default().max_script_bytes)]
    pub transform_max_script_bytes: usize,

    /// Transform limit: bytes one record's script may hold allocated at once (everything it
    /// builds, callback results included), checked every 64 operations.
    #[arg(long, env = "DSREG_TRANSFORM_MAX_MEMORY_BYTES", default_value_t = Limits::default().max_memory_bytes)]
    pub transform_max_memory_bytes: usize,

    /// Test runs (`RunTest`) executing at once; more get RESOURCE_EXHAUSTED. A run holds its
    /// slot until its records have stopped running, past its deadline included. Default: one
    /// per CPU the process may use.
    #[arg(long, env = "DSREG_HARNESS_MAX_CONCURRENT_RUNS", default_value_t = default_harness_runs(), value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub harness_max_concurrent_runs: u64,

    /// The share of one CPU core, in percent, each test run's scripts may take: a run computes
    /// 1 ms at a time and rests between. A busy core slows the registry's other calls even
    /// when the run has the lowest priority; 100 lets runs compute without rest.
    #[arg(long, env = "DSREG_HARNESS_CPU_PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub harness_cpu_percent: u8,

    /// Full resync period, in milliseconds.
    #[arg(long, env = "DSREG_RESYNC_INTERVAL_MS", default_value_t = 30_000)]
    pub resync_interval_ms: u64,

    /// How old the oldest open transaction of the database server (any database) may grow,
    /// in milliseconds, before the log names it: while it is open, events committed after it
    /// wait, so reloads and the event feed stall.
    #[arg(
        long,
        env = "DSREG_OUTBOX_HORIZON_WARN_AFTER_MS",
        default_value_t = 30_000
    )]
    pub outbox_horizon_warn_after_ms: u64,

    /// Worker heartbeat period, in milliseconds (each heartbeat is written 1,000 workers a
    /// statement, spread over a quarter of the period).
    #[arg(long, env = "DSREG_HEARTBEAT_INTERVAL_MS", default_value_t = 10_000)]
    pub heartbeat_interval_ms: u64,

    /// Dead letters older than this many hours are deleted, checked every minute (0: kept
    /// whatever their age).
    #[arg(long, env = "DSREG_DEAD_LETTER_MAX_AGE_HOURS", default_value_t = 168)]
    pub dead_letter_max_age_hours: u64,

    /// Each datasource keeps at most this many dead letters, the newest; older ones are
    /// deleted, checked every minute (0: no bound).
    #[arg(
        long,
        env = "DSREG_DEAD_LETTER_MAX_PER_DATASOURCE",
        default_value_t = 100_000
    )]
    pub dead_letter_max_per_datasource: u64,

    /// Disable a datasource whose worker has failed with no healthy run for this many
    /// seconds, with an `auto_disabled` event saying why (0: never; an operator enables it
    /// again).
    #[arg(long, env = "DSREG_GIVE_UP_AFTER_SECS", default_value_t = 0)]
    pub give_up_after_secs: u64,

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

    /// This instance's id among the registry's instances; a new one each start when unset.
    #[arg(long, env = "DSREG_INSTANCE_ID", value_parser = instance_id)]
    pub instance_id: Option<String>,

    /// The gRPC URL other instances and clients see for this one (`ListInstances`); the bound
    /// gRPC address when unset.
    #[arg(long, env = "DSREG_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// How long a datasource lease lasts without renewal, in milliseconds: a dead instance's
    /// datasources move to the others after this. Renewed four times per lease time.
    #[arg(long, env = "DSREG_LEASE_TTL_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1_000..=600_000))]
    pub lease_ttl_ms: u64,

    /// Leases an instance gives up at a time when they belong elsewhere (an instance joined):
    /// the next batch starts once this one has moved, so moves are gradual, never a storm.
    #[arg(long, env = "DSREG_LEASE_MOVES_PER_TICK", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub lease_moves_per_tick: u64,

    /// How long a stopped or silent instance stays listed (`dsreg instances`), in seconds:
    /// older rows of `dsreg_instances` are deleted at start and then every retention (at
    /// most an hour apart).
    #[arg(
        long,
        env = "DSREG_DEAD_INSTANCE_RETENTION_SECS",
        default_value_t = 86_400
    )]
    pub dead_instance_retention_secs: u64,

    /// The crash-loop window, in milliseconds.
    #[arg(long, env = "DSREG_CRASH_LOOP_WINDOW_MS", default_value_t = 60_000)]
    pub crash_loop_window_ms: u64,

    /// Streams (`WatchEvents`, `WatchStatus`) one caller (token subject) may hold open at
    /// once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "DSREG_GRPC_MAX_STREAMS_PER_CALLER", default_value_t = RpcLimits::default().streams_per_caller, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub grpc_max_streams_per_caller: usize,

    /// HTTP/2 streams one gRPC connection may have in flight.
    #[arg(long, env = "DSREG_GRPC_MAX_STREAMS_PER_CONNECTION", default_value_t = RpcLimits::default().streams_per_connection, value_parser = clap::value_parser!(u32).range(1..))]
    pub grpc_max_streams_per_connection: u32,

    /// gRPC handlers running at once across all connections; later calls wait their turn.
    #[arg(long, env = "DSREG_GRPC_MAX_CONCURRENT_CALLS", default_value_t = RpcLimits::default().concurrent_calls, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub grpc_max_concurrent_calls: usize,
}

/// One port's TLS files from its three options (named `<option>-cert`, `-key`, `-client-ca`).
fn tls_files(
    option: &'static str,
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
    client_ca: Option<&PathBuf>,
) -> Result<Option<TlsFiles>, String> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            option,
            cert: cert.clone(),
            key: key.clone(),
            client_ca: client_ca.cloned(),
        })),
        (None, None) if client_ca.is_none() => Ok(None),
        (None, None) => Err(format!(
            "{option}-client-ca needs {option}-cert and {option}-key (mutual TLS is TLS)"
        )),
        (Some(_), None) => Err(format!("{option}-cert needs {option}-key")),
        (None, Some(_)) => Err(format!("{option}-key needs {option}-cert")),
    }
}

/// An instance id: 1 to 128 letters, digits, `.`, `_`, `-` or `:`.
fn instance_id(value: &str) -> Result<String, String> {
    let ok = (1..=128).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'));
    if ok {
        Ok(value.to_owned())
    } else {
        Err("1 to 128 letters, digits, '.', '_', '-' or ':'".to_owned())
    }
}

/// A folder of datasource files the registry keeps the database in step with (`serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct SyncSettings {
    /// A folder of datasource files to sync into the database while serving, as `dsreg sync
    /// --watch` does.
    #[arg(long = "sync-dir", env = "DSREG_SYNC_DIR")]
    pub dir: Option<PathBuf>,

    /// What the sync does with a datasource changed both in its file and in the database since
    /// the file's last sync: `fail`, `file-wins` or `db-wins`.
    #[arg(long = "sync-conflict", env = "DSREG_SYNC_CONFLICT", value_enum, default_value_t = ConflictPolicy::Fail)]
    pub conflict: ConflictPolicy,

    /// Archive datasources whose file is removed from the folder.
    #[arg(long = "sync-prune", env = "DSREG_SYNC_PRUNE")]
    pub prune: bool,

    /// Quiet time after a change in the folder before syncing, in milliseconds.
    #[arg(
        long = "sync-debounce-ms",
        env = "DSREG_SYNC_DEBOUNCE_MS",
        default_value_t = 200
    )]
    pub debounce_ms: u64,

    /// Time between full rescans of the folder, in milliseconds.
    #[arg(
        long = "sync-rescan-interval-ms",
        env = "DSREG_SYNC_RESCAN_INTERVAL_MS",
        default_value_t = 30_000
    )]
    pub rescan_interval_ms: u64,

    /// An HTTP(S) URL serving datasource definitions (a YAML document, a multi-document YAML
    /// bundle, or a `.tar.gz` / `.zip` archive of a folder) to poll and sync into the database
    /// while serving, as `dsreg sync --from` does; repeatable (comma-separated in the
    /// environment).
    #[arg(
        long = "sync-url",
        env = "DSREG_SYNC_URL",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub urls: Vec<String>,

    /// How HTTP sources are fetched.
    #[command(flatten)]
    pub http: HttpSourceSettings,
}

/// How an HTTP source of datasource definitions is fetched (`serve --sync-url`, `dsreg sync
/// --from`).
#[derive(Debug, Clone, clap::Args)]
pub struct HttpSourceSettings {
    /// Time between polls of an HTTP source, in milliseconds (spread a fifth either way).
    #[arg(
        long = "sync-poll-interval-ms",
        env = "DSREG_SYNC_POLL_INTERVAL_MS",
        default_value_t = 30_000
    )]
    pub poll_interval_ms: u64,

    /// The longest one request to an HTTP source may take, in milliseconds.
    #[arg(
        long = "sync-http-timeout-ms",
        env = "DSREG_SYNC_HTTP_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub timeout_ms: u64,

    /// The largest body an HTTP source may send, in bytes.
    #[arg(
        long = "sync-max-bytes",
        env = "DSREG_SYNC_MAX_BYTES",
        default_value_t = 16 * 1024 * 1024
    )]
    pub max_bytes: u64,

    /// A file holding the bearer token sent to HTTP sources (read before each request).
    #[arg(
        long = "sync-token-file",
        env = "DSREG_SYNC_TOKEN_FILE",
        conflicts_with = "token_env"
    )]
    pub token_file: Option<PathBuf>,

    /// The name of an environment variable holding the bearer token sent to HTTP sources.
    #[arg(long = "sync-token-env", env = "DSREG_SYNC_TOKEN_ENV")]
    pub token_env: Option<String>,

    /// A PEM file of the CA certificates HTTP sources are trusted by, instead of the system's
    /// roots.
    #[arg(long = "sync-ca-file", env = "DSREG_SYNC_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

impl HttpSourceSettings {
    /// The source at `url`, synced under `conflict` and `prune`.
    ///
    /// # Errors
    /// A URL that cannot be fetched (or has credentials in it), a zero interval, timeout or
    /// size bound.
    pub fn source(
        &self,
        url: &str,
        conflict: ConflictPolicy,
        prune: bool,
    ) -> Result<SourceConfig, String> {
        if self.poll_interval_ms == 0 || self.timeout_ms == 0 || self.max_bytes == 0 {
            return Err(
                "--sync-poll-interval-ms, --sync-http-timeout-ms and --sync-max-bytes must be \
                 positive"
                    .into(),
            );
        }
        let token = match (&self.token_file, &self.token_env) {
            (Some(file), _) => Some(Token::File(file.clone())),
            (None, Some(var)) => Some(Token::Env(var.clone())),
            (None, None) => None,
        };
        Ok(SourceConfig {
            source: Source::parse(url).map_err(|e| e.to_string())?,
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            timeout: Duration::from_millis(self.timeout_ms),
            max_bytes: self.max_bytes,
            token,
            ca_file: self.ca_file.clone(),
            conflict,
            prune,
        })
    }
}

impl SyncSettings {
    /// The HTTP sources to poll.
    ///
    /// # Errors
    /// As [`HttpSourceSettings::source`].
    pub fn http_sources(&self) -> Result<Vec<SourceConfig>, String> {
        self.urls
            .iter()
            .map(|url| self.http.source(url, self.conflict, self.prune))
            .collect()
    }

    /// The watcher's configuration, when a folder is set.
    ///
    /// # Errors
    /// A zero debounce or rescan interval.
    pub fn watch(&self) -> Result<Option<WatchConfig>, String> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        if self.debounce_ms == 0 || self.rescan_interval_ms == 0 {
            return Err("--sync-debounce-ms and --sync-rescan-interval-ms must be positive".into());
        }
        Ok(Some(WatchConfig {
            dir: dir.clone(),
            conflict: self.conflict,
            prune: self.prune,
            debounce: Duration::from_millis(self.debounce_ms),
            rescan_interval: Duration::from_millis(self.rescan_interval_ms),
        }))
    }
}

/// Three pooled connections per CPU, 4 to 64.
fn default_pool_size() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |n| n.get() * 3)
        .clamp(4, 64)
}

/// One concurrent test run per CPU the process may use (1 when that cannot be told): runs
/// take a CPU each for as long as they run, so more at once only queue for the CPUs.
fn default_harness_runs() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
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

    /// The gRPC port's TLS files; `None` for plaintext.
    ///
    /// # Errors
    /// A certificate without a key, a key without a certificate, or a client CA without both.
    pub fn grpc_tls(&self) -> Result<Option<TlsFiles>, String> {
        tls_files(
            "--grpc-tls",
            self.grpc_tls_cert.as_ref(),
            self.grpc_tls_key.as_ref(),
            self.grpc_tls_client_ca.as_ref(),
        )
    }

    /// The HTTP port's TLS files; `None` for plaintext.
    ///
    /// # Errors
    /// As [`Settings::grpc_tls`].
    pub fn http_tls(&self) -> Result<Option<TlsFiles>, String> {
        tls_files(
            "--http-tls",
            self.http_tls_cert.as_ref(),
            self.http_tls_key.as_ref(),
            self.http_tls_client_ca.as_ref(),
        )
    }

    /// The limits of the gRPC port.
    pub fn rpc_limits(&self) -> RpcLimits {
        RpcLimits {
            streams_per_caller: self.grpc_max_streams_per_caller,
            streams_per_connection: self.grpc_max_streams_per_connection,
            concurrent_calls: self.grpc_max_concurrent_calls,
        }
    }

    /// The folder of the embedded default's development signing key and admin token.
    pub fn dev_auth_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// The development key file the embedded default creates.
    pub fn dev_key_file(&self) -> PathBuf {
        self.data_dir.join("master-keys.json")
    }

    /// The embedded cluster's data folder.
    pub fn pg_data_dir(&self) -> PathBuf {
        self.data_dir.join("pg")
    }

    /// The LISTEN connection's URL: `--listen-database-url`, else `url` (the main one).
    pub fn listen_url(&self, url: &str) -> String {
        self.listen_database_url
            .clone()
            .unwrap_or_else(|| url.to_owned())
    }

    /// The notification path's self-test and the fallback poll.
    pub fn notification_check(&self) -> crate::outbox::selftest::SelfTestConfig {
        crate::outbox::selftest::SelfTestConfig {
            interval: Duration::from_millis(self.notification_check_interval_ms),
            timeout: Duration::from_millis(self.notification_check_timeout_ms),
            poll_interval: Duration::from_millis(self.outbox_poll_interval_ms),
        }
    }

    /// Pool checkout deadline.
    pub fn pool_wait(&self) -> Duration {
        Duration::from_millis(self.pool_wait_ms)
    }

    /// The bounds of every database connection (the URL's own parameters win).
    pub fn connect_options(&self) -> crate::db::ConnectOptions {
        use crate::db::connection::millis_or_none;
        crate::db::ConnectOptions {
            connect_timeout: millis_or_none(self.db_connect_timeout_ms),
            statement_timeout: millis_or_none(self.db_statement_timeout_ms),
            keepalives: true,
            keepalive_idle: Duration::from_millis(self.db_keepalive_idle_ms),
            keepalive_interval: Duration::from_millis(self.db_keepalive_interval_ms),
            keepalive_count: self.db_keepalive_count,
            tcp_user_timeout: millis_or_none(self.db_tcp_user_timeout_ms),
        }
    }

    /// How long a dead instance's row is kept.
    pub fn dead_instance_retention(&self) -> Duration {
        Duration::from_secs(self.dead_instance_retention_secs)
    }

    /// Shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    /// Whether the pool's connections prepare the frequent statements by name.
    pub fn prepared_statements(&self) -> bool {
        match self.prepared_statements {
            PreparedStatements::Auto => self.listen_database_url.is_none(),
            PreparedStatements::On => true,
            PreparedStatements::Off => false,
        }
    }

    /// The supervisor's pacing and the transform limits.
    pub fn supervisor(&self) -> SupervisorConfig {
        SupervisorConfig {
            prepared: self.prepared_statements(),
            resync_interval: Duration::from_millis(self.resync_interval_ms),
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            limits: self.transform_limits(),
            leases: crate::supervisor::lease::LeaseConfig {
                ttl: Duration::from_millis(self.lease_ttl_ms),
                moves_per_tick: usize::try_from(self.lease_moves_per_tick).unwrap_or(usize::MAX),
                ..crate::supervisor::lease::LeaseConfig::default()
            },
            ..SupervisorConfig::default()
        }
    }

    /// The limits every transform runs under (the defaults for what has no flag).
    pub fn transform_limits(&self) -> Limits {
        Limits {
            max_operations: self.transform_max_operations,
            deadline: Duration::from_millis(self.transform_deadline_ms),
            max_string_bytes: self.transform_max_string_bytes,
            max_array_len: self.transform_max_array_len,
            max_map_len: self.transform_max_map_len,
            max_outputs: self.transform_max_outputs,
            max_call_depth: self.transform_max_call_depth,
            max_expr_depth: self.transform_max_expr_depth,
            max_script_bytes: self.transform_max_script_bytes,
            max_memory_bytes: self.transform_max_memory_bytes,
        }
    }

    /// The sink target.
    ///
    /// # Errors
    /// `--sink http` without a usable `--sink-url`.
    pub fn sink_target(&self) -> Result<Target, String> {
        match (self.sink.as_str(), &self.sink_url) {
            ("http", Some(url)) => {
                let parsed = reqwest::Url::parse(url).map_err(|e| format!("--sink-url: {e}"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err("--sink-url must be http or https".into());
                }
                let client = crate::connectors::http::client().map_err(|e| e.to_string())?;
                Ok(Target::Http {
                    client,
                    url: url.clone(),
                })
            }
            ("http", None) => Err("--sink http needs --sink-url".into()),
            ("kafka", _) => {
                let brokers = self
                    .sink_kafka_brokers
                    .as_deref()
                    .filter(|b| !b.trim().is_empty())
                    .ok_or("--sink kafka needs --sink-kafka-brokers")?;
                let topic = self
                    .sink_kafka_topic
                    .as_deref()
                    .ok_or("--sink kafka needs --sink-kafka-topic")?;
                use crate::connectors::kafka_client::Trust;
                let tls = match &self.sink_kafka_ca_file {
                    Some(path) => {
                        Some(Trust::Ca(std::fs::read_to_string(path).map_err(|e| {
                            format!("--sink-kafka-ca-file {}: {e}", path.display())
                        })?))
                    }
                    None => self.sink_kafka_tls.then_some(Trust::SystemRoots),
                };
                crate::connectors::kafka_sink::KafkaTarget::new(
                    brokers,
                    topic,
                    self.sink_kafka_key_field.clone(),
                    &self.sink_kafka_compression,
                    tls,
                )
                .map(|t| Target::Kafka(std::sync::Arc::new(t)))
            }
            _ => Ok(Target::Postgres),
        }
    }

    /// Restart pacing of failed workers.
    pub fn backoff(&self) -> BackoffPolicy {
        BackoffPolicy {
            base: Duration::from_millis(self.backoff_base_ms),
            max: Duration::from_millis(self.backoff_max_ms),
            crash_loop_failures: self.crash_loop_failures,
            window: Duration::from_millis(self.crash_loop_window_ms),
            // A source that refuses (401, 404, …) is asked again after five minutes, or the
            // cap when that is longer.
            permanent: Duration::from_millis(self.backoff_max_ms).max(Duration::from_secs(300)),
        }
    }

    /// How long a worker may fail with no healthy run before its datasource is disabled
    /// (`None`: never).
    pub fn give_up_after(&self) -> Option<Duration> {
        (self.give_up_after_secs > 0).then(|| Duration::from_secs(self.give_up_after_secs))
    }

    /// The dead-letter retention: the longest age and the most per datasource (`None`: no
    /// bound).
    pub fn dead_letter_retention(&self) -> crate::db::retention::Retention {
        crate::db::retention::Retention {
            max_age: (self.dead_letter_max_age_hours > 0)
                .then(|| Duration::from_secs(self.dead_letter_max_age_hours.saturating_mul(3_600))),
            max_per_datasource: (self.dead_letter_max_per_datasource > 0)
                .then(|| i64::try_from(self.dead_letter_max_per_datasource).unwrap_or(i64::MAX)),
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
        for (flag, value) in [
            ("--db-keepalive-idle-ms", self.db_keepalive_idle_ms),
            ("--db-keepalive-interval-ms", self.db_keepalive_interval_ms),
        ] {
            if value < 1_000 {
                return Err(format!(
                    "{flag} must be at least 1000 (keepalives count whole seconds)"
                ));
            }
        }
        if self.backoff_max_ms < self.backoff_base_ms {
            return Err("--backoff-max-ms must not be below --backoff-base-ms".into());
        }
        let limits = self.transform_limits();
        let sizes = [
            ("--transform-max-string-bytes", limits.max_string_bytes),
            ("--transform-max-array-len", limits.max_array_len),
            ("--transform-max-map-len", limits.max_map_len),
            ("--transform-max-outputs", limits.max_outputs),
            ("--transform-max-call-depth", limits.max_call_depth),
            ("--transform-max-expr-depth", limits.max_expr_depth),
            ("--transform-max-script-bytes", limits.max_script_bytes),
            ("--transform-max-memory-bytes", limits.max_memory_bytes),
        ];
        if self.transform_deadline_ms == 0 || self.transform_max_operations == 0 {
            return Err("transform limits must be positive".into());
        }
        if let Some((flag, _)) = sizes.iter().find(|(_, value)| *value == 0) {
            return Err(format!("{flag} must be positive"));
        }
        self.sink_target()?;
        self.grpc_tls()?;
        self.http_tls()?;
        self.auth.check().map_err(|e| e.to_string())?;
        if self.crash_loop_failures == 0 {
            return Err("--crash-loop-failures must be positive".into());
        }
        if self.listen_database_url.is_some() && self.database_url.is_none() {
            return Err(
                "--listen-database-url needs --database-url (the embedded database is always direct)"
                    .into(),
            );
        }
        if self
            .listen_database_url
            .as_deref()
            .is_some_and(str::is_empty)
        {
            return Err(
                "DSREG_LISTEN_DATABASE_URL is set but empty; unset it to listen on DATABASE_URL"
                    .into(),
            );
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
    fn test_runs_default_to_one_per_cpu_and_the_flag_sets_them() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let cli = Cli::try_parse_from(["dsreg"]).unwrap();
        assert_eq!(cli.settings.harness_max_concurrent_runs, cpus);
        let cli = Cli::try_parse_from(["dsreg", "--harness-max-concurrent-runs", "7"]).unwrap();
        assert_eq!(cli.settings.harness_max_concurrent_runs, 7);
        assert!(Cli::try_parse_from(["dsreg", "--harness-max-concurrent-runs", "0"]).is_err());
        assert_eq!(cli.settings.harness_cpu_percent, 50);
        let cli = Cli::try_parse_from(["dsreg", "--harness-cpu-percent", "100"]).unwrap();
        assert_eq!(cli.settings.harness_cpu_percent, 100);
        for bad in ["0", "101", "x"] {
            assert!(Cli::try_parse_from(["dsreg", "--harness-cpu-percent", bad]).is_err());
        }
    }

    #[test]
    fn statements_are_prepared_by_default_only_where_the_database_url_carries_listen() {
        let prepared = |args: &[&str]| {
            let mut all = vec!["dsreg", "--database-url", "postgres://db/x"];
            all.extend(args);
            Cli::try_parse_from(all)
                .unwrap()
                .settings
                .supervisor()
                .prepared
        };
        assert!(prepared(&[]));
        let direct_listener = ["--listen-database-url", "postgres://primary/x"];
        assert!(!prepared(&direct_listener));
        assert!(prepared(
            &[&direct_listener[..], &["--prepared-statements", "on"]].concat()
        ));
        assert!(!prepared(&["--prepared-statements", "off"]));
        assert!(Cli::try_parse_from(["dsreg", "--prepared-statements", "yes"]).is_err());
    }

    #[test]
    fn the_listener_has_its_own_url_only_next_to_a_database_url() {
        let cli = Cli::try_parse_from(["dsreg", "--database-url", "postgres://pooler/x"]).unwrap();
        assert_eq!(
            cli.settings.listen_url("postgres://pooler/x"),
            "postgres://pooler/x"
        );
        let check = cli.settings.notification_check();
        assert_eq!(
            (check.interval, check.timeout, check.poll_interval),
            (
                Duration::from_secs(10),
                Duration::from_secs(5),
                Duration::from_secs(1)
            )
        );
        let cli = Cli::try_parse_from([
            "dsreg",
            "--database-url",
            "postgres://pooler/x",
            "--listen-database-url",
            "postgres://primary/x",
            "--outbox-poll-interval-ms",
            "250",
        ])
        .unwrap();
        assert!(cli.settings.check().is_ok());
        assert_eq!(
            cli.settings.listen_url("postgres://pooler/x"),
            "postgres://primary/x"
        );
        assert_eq!(
            cli.settings.notification_check().poll_interval,
            Duration::from_millis(250)
        );
        let alone = Cli::try_parse_from(["dsreg", "--listen-database-url", "postgres://primary/x"])
            .unwrap();
        assert!(
            alone
                .settings
                .check()
                .unwrap_err()
                .contains("--listen-database-url needs --database-url")
        );
        assert!(
            Cli::try_parse_from(["dsreg", "--outbox-poll-interval-ms", "0"]).is_err(),
            "a zero poll interval is refused"
        );
    }

    #[test]
    fn defaults_are_local_and_valid() {
        let cli = Cli::try_parse_from(["dsreg", "--database-url", "postgres://x"]).unwrap();
        assert_eq!(cli.settings.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(cli.settings.pg_data_dir(), PathBuf::from(".dsreg/pg"));
        assert!(cli.settings.check().is_ok());
    }

    #[test]
    fn database_bounds_default_to_seconds_and_zero_unbounds() {
        let cli = Cli::try_parse_from(["dsreg"]).unwrap();
        assert_eq!(
            cli.settings.connect_options(),
            crate::db::ConnectOptions::default()
        );
        let cli = Cli::try_parse_from([
            "dsreg",
            "--db-connect-timeout-ms",
            "0",
            "--db-statement-timeout-ms",
            "0",
            "--db-tcp-user-timeout-ms",
            "1500",
        ])
        .unwrap();
        let options = cli.settings.connect_options();
        assert_eq!(options.connect_timeout, None);
        assert_eq!(options.statement_timeout, None);
        assert_eq!(options.tcp_user_timeout, Some(Duration::from_millis(1500)));
        let cli = Cli::try_parse_from(["dsreg", "--db-keepalive-idle-ms", "500"]).unwrap();
        assert!(
            cli.settings
                .check()
                .unwrap_err()
                .contains("--db-keepalive-idle-ms")
        );
    }

    #[test]
    fn tls_options_come_in_pairs_and_mutual_tls_needs_tls() {
        let parse = |args: &[&str]| {
            let cli =
                Cli::try_parse_from(std::iter::once("dsreg").chain(args.iter().copied())).unwrap();
            cli.settings
        };
        assert_eq!(parse(&[]).grpc_tls(), Ok(None));
        let both = parse(&["--grpc-tls-cert", "c.pem", "--grpc-tls-key", "k.pem"]);
        let files = both.grpc_tls().unwrap().unwrap();
        assert_eq!(
            (files.cert, files.key, files.client_ca),
            ("c.pem".into(), "k.pem".into(), None)
        );
        assert_eq!(both.http_tls(), Ok(None));
        for (args, refusal) in [
            (
                &["--grpc-tls-cert", "c.pem"][..],
                "--grpc-tls-cert needs --grpc-tls-key",
            ),
            (
                &["--http-tls-key", "k.pem"],
                "--http-tls-key needs --http-tls-cert",
            ),
            (
                &["--http-tls-client-ca", "ca.pem"],
                "--http-tls-client-ca needs --http-tls-cert",
            ),
        ] {
            let error = parse(args).check().unwrap_err();
            assert!(error.contains(refusal), "{args:?}: {error}");
        }
    }

    #[test]
    fn a_zero_pool_is_refused() {
        let cli = Cli::try_parse_from(["dsreg", "--pool-size", "0"]).unwrap();
        assert!(cli.settings.check().unwrap_err().contains("--pool-size"));
    }
}
