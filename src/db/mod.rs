//! The database layer: the connection pool, the schema migrations, the embedded Postgres
//! launcher and one repository per aggregate (`repository::*`), whose functions hold the SQL
//! that touches their tables. Nothing outside this module writes SQL against the registry's
//! tables.
//!
//! Errors are [`Error`]: known constraint violations and the schema's own SQLSTATEs
//! (`DSR01`..) become domain variants here, so no caller inspects SQLSTATE.

pub mod connection;
pub mod embedded;
pub mod metrics;
pub mod migrations;
pub mod repository;
pub mod retention;
pub mod tls;
pub mod watchdog;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Connection};

pub use connection::ConnectOptions;
pub use tls::Target;
use uuid::Uuid;

/// What went wrong talking to the database, in the registry's terms.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No datasource with this id (or not visible to the caller).
    #[error("datasource {0} not found")]
    DatasourceNotFound(Uuid),
    /// The datasource has no such version.
    #[error("datasource {datasource} has no version {version}")]
    VersionNotFound {
        /// The datasource.
        datasource: Uuid,
        /// The missing version.
        version: i32,
    },
    /// The datasource is archived; it can be neither published nor changed.
    #[error("datasource {0} is archived")]
    DatasourceArchived(Uuid),
    /// A rollback found no earlier published version.
    #[error("datasource {0} has no earlier published version to roll back to")]
    NoEarlierVersion(Uuid),
    /// A rollback target that was never published.
    #[error("version {version} of datasource {datasource} was never published; publish it instead")]
    NeverPublished {
        /// The datasource.
        datasource: Uuid,
        /// The target version.
        version: i32,
    },
    /// A version change the lifecycle does not allow (back to draft, editing a non-draft).
    #[error("version {version} of datasource {datasource}: {reason}")]
    VersionNotDraft {
        /// The datasource.
        datasource: Uuid,
        /// The version.
        version: i32,
        /// What was refused.
        reason: String,
    },
    /// Another live datasource already has this org/project/name.
    #[error("a datasource named {org}/{project}/{name} already exists")]
    NameTaken {
        /// Organisation.
        org: String,
        /// Project.
        project: String,
        /// Name.
        name: String,
    },
    /// The caller's etag (revision) is not the current one.
    #[error("datasource {datasource} was changed since revision {expected} (now {actual})")]
    StaleRevision {
        /// The datasource.
        datasource: Uuid,
        /// The revision the caller had.
        expected: i64,
        /// The current revision.
        actual: i64,
    },
    /// A value the schema's checks refuse (named by the constraint).
    #[error("invalid value: {0}")]
    Invalid(String),
    /// A concurrent writer won; the operation can be retried.
    #[error("concurrent update conflict: {0}")]
    Conflict(String),
    /// The transaction could not commit because the server's NOTIFY queue is full (a listening
    /// session stopped reading); nothing of it was written, and it can be retried once the
    /// queue drains.
    #[error("the database's NOTIFY queue is full; the transaction was rolled back")]
    NotifyQueueFull,
    /// The database cannot be reached or the pool is exhausted; retryable.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migration(String),
    /// The embedded cluster could not be launched.
    #[error(transparent)]
    Launch(#[from] embedded::LaunchError),
    /// Any other database error: the server's SQLSTATE and message, or the client's error.
    #[error("database error: {}", summary(.0))]
    Query(#[source] tokio_postgres::Error),
}

impl Error {
    /// Whether the same operation may succeed if retried later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Conflict(_) | Error::Unavailable(_) | Error::NotifyQueueFull
        )
    }

    /// Whether the server refused the data itself, so the same rows fail the same way on
    /// every retry: a data exception (SQLSTATE class 22: U+0000 or untranslatable text,
    /// values out of range), an integrity constraint (class 23) or a value too large
    /// (class 54).
    pub fn refuses_data(&self) -> bool {
        match self {
            Error::Invalid(_) => true,
            Error::Query(e) => {
                sqlstate(e).is_some_and(|code| matches!(code.get(..2), Some("22" | "23" | "54")))
            }
            _ => false,
        }
    }

    /// Whether the database could not be reached at all (no connection, an exhausted pool):
    /// every statement fails the same way, whatever its rows.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }

    /// A one-line account for logs and dead letters: a server error's SQLSTATE and message,
    /// without its detail (which can quote the refused row).
    pub fn brief(&self) -> String {
        match self {
            Error::Query(e) => summary(e),
            other => other.to_string(),
        }
    }
}

/// Whether an error without a server answer came from the path to the server: the
/// connection is closed, or an I/O error (refused, reset, timed out, a TLS handshake) lies in
/// its cause chain. Decided by error kinds, never by message text.
fn is_transport(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.is::<std::io::Error>() || c.is::<rustls::Error>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A server error's SQLSTATE and message without its detail (which can quote a refused row),
/// or a client error with its cause chain.
fn summary(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("SQLSTATE {}: {}", db.code().code(), db.message()),
        None => cause(e),
    }
}

/// The cause of a failed statement or connection in words: the server's SQLSTATE, message,
/// detail and hint when it answered, else the error and its cause chain (`connection refused`,
/// the certificate problem). Never the connection string.
pub fn cause(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut out = format!("SQLSTATE {}: {}", db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            out.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            out.push_str(&format!("; hint: {hint}"));
        }
        return out;
    }
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Commits `tx`. A COMMIT refused with SQLSTATE 54000 (`program_limit_exceeded`) is the
/// server's NOTIFY queue being full: Postgres queues a transaction's notifications at commit,
/// before the commit is recorded, so the transaction rolled back whole.
///
/// # Errors
/// [`Error::NotifyQueueFull`], or the commit's error.
pub async fn commit(tx: tokio_postgres::Transaction<'_>) -> Result<(), Error> {
    tx.commit().await.map_err(commit_error)
}

/// What a failed COMMIT means (see [`commit`]).
pub fn commit_error(e: tokio_postgres::Error) -> Error {
    match e.code() {
        Some(code) if is_notify_queue_full(code) => Error::NotifyQueueFull,
        _ => Error::from(e),
    }
}

/// Whether a COMMIT refused with `code` was refused for a full NOTIFY queue: the limit a commit
/// itself exceeds (the registry's schema has no deferred trigger that could raise 54000).
fn is_notify_queue_full(code: &SqlState) -> bool {
    *code == SqlState::PROGRAM_LIMIT_EXCEEDED
}

/// A failed connect to `target` as [`Error::Unavailable`] naming the server (host and port,
/// user, database; never the password) and the cause, with the server's SQLSTATE.
pub fn connect_error(target: &str, e: &tokio_postgres::Error) -> Error {
    Error::Unavailable(format!("cannot connect to {target}: {}", cause(e)))
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            // No server error: the connection broke or could not be made.
            return if is_transport(&e) {
                Error::Unavailable(cause(&e))
            } else {
                Error::Query(e)
            };
        };
        let code = db.code();
        if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            return Error::Conflict(db.message().to_owned());
        }
        // Text with a NUL byte (or other bytes Postgres cannot hold as text or jsonb): the value
        // came from a caller; the API checks named fields first, this catches any other.
        if *code == SqlState::CHARACTER_NOT_IN_REPERTOIRE
            || *code == SqlState::UNTRANSLATABLE_CHARACTER
        {
            return Error::Invalid(
                "a text value holds a character Postgres cannot store (NUL, \\u0000)".to_owned(),
            );
        }
        if *code == SqlState::CHECK_VIOLATION || *code == SqlState::NOT_NULL_VIOLATION {
            return Error::Invalid(
                db.constraint()
                    .or(db.column())
                    .unwrap_or(db.message())
                    .to_owned(),
            );
        }
        // Connection exceptions (class 08), an operator or crash shutdown (57P01..57P03),
        // too many connections, and the refusals of a connect: a wrong password or a
        // pg_hba.conf rejection (class 28), an unknown database (3D000).
        if matches!(code.code().get(..2), Some("08" | "28"))
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::TOO_MANY_CONNECTIONS
            || *code == SqlState::INVALID_CATALOG_NAME
        {
            return Error::Unavailable(cause(&e));
        }
        Error::Query(e)
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError;
        // A pooled connection that cannot be made or recycled: the database is unreachable.
        // Said in the database's words, not the pool's.
        Error::Unavailable(match e {
            PoolError::Backend(e) => format!("cannot connect to the database: {}", cause(&e)),
            PoolError::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                "no database connection became free in time".to_owned()
            }
            PoolError::Timeout(_) => {
                "cannot connect to the database: no answer within the connect timeout (TCP, TLS and authentication)".to_owned()
            }
            PoolError::Closed => "the connection pool is closed".to_owned(),
            PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => e.to_string(),
        })
    }
}

/// The SQLSTATE of a server error, for the repositories' own mapping.
pub(crate) fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().map(|db| db.code().code())
}

/// The constraint a server error names.
pub(crate) fn constraint(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().and_then(|db| db.constraint())
}

impl From<tls::TlsError> for Error {
    fn from(e: tls::TlsError) -> Self {
        Error::Invalid(e.to_string())
    }
}

/// Pooled connections idle at least this long are checked with an empty query before use.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The bound of that check when connects are unbounded.
const UNBOUNDED_CHECK: Duration = Duration::from_secs(5);

/// Builds a pool for `url` with the default bounds ([`pool_with`]).
///
/// # Errors
/// As [`pool_with`].
pub fn pool(url: &str, max_size: usize, wait: Duration) -> Result<Pool, Error> {
    pool_with(url, &ConnectOptions::default(), max_size, wait)
}

/// Builds a pool for `url` (`max_size` connections, checked out within `wait`), with TLS as
/// the URL's `sslmode` and the `PGSSL*` variables say ([`tls`]) and `bounds` for what the URL
/// does not set ([`connection`]). A new connection is given up on after the connect bound; a
/// connection that idled is checked with an empty query within the same bound before it is
/// handed out, and once one fails that check, those idle since before the failure are
/// dropped unchecked: against a database gone silent a checkout costs one check and one
/// connect, not one check per idle connection.
///
/// # Errors
/// [`Error::Invalid`] for a malformed URL or certificates that cannot be loaded.
pub fn pool_with(
    url: &str,
    bounds: &ConnectOptions,
    max_size: usize,
    wait: Duration,
) -> Result<Pool, Error> {
    pool_of(Target::parse_with(url, bounds)?, max_size, wait)
}

/// As [`pool_with`], its connections opened with `application_name` (whatever the URL says).
///
/// # Errors
/// As [`pool_with`].
pub fn pool_named(
    url: &str,
    bounds: &ConnectOptions,
    max_size: usize,
    wait: Duration,
    application_name: &str,
) -> Result<Pool, Error> {
    let mut target = Target::parse_with(url, bounds)?;
    target.config.application_name(application_name);
    pool_of(target, max_size, wait)
}

fn pool_of(target: Target, max_size: usize, wait: Duration) -> Result<Pool, Error> {
    let tls = target.tls_blocking()?;
    let connect = target.connect_bound();
    let check = connect.unwrap_or(UNBOUNDED_CHECK);
    let failed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let deadline = target.statement_deadline();
    let manager = Manager::from_connect(
        target.config,
        WatchedConnect { tls, deadline },
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(connect)
        .recycle_timeout(Some(check))
        .pre_recycle(Hook::async_fn(move |client, metrics| {
            let failed_at = failed_at.clone();
            Box::pin(async move {
                let last_used = metrics.recycled.unwrap_or(metrics.created);
                if last_used.elapsed() < CHECK_AFTER_IDLE {
                    return Ok(());
                }
                let failed = *failed_at.lock().unwrap_or_else(PoisonError::into_inner);
                if failed.is_some_and(|failed| last_used < failed) {
                    return Err(HookError::message(
                        "idle since before a connection of the pool failed its check",
                    ));
                }
                match tokio::time::timeout(check, client.simple_query("")).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => {
                        *failed_at.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(Instant::now());
                        Err(HookError::Backend(e))
                    }
                    Err(_) => {
                        *failed_at.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(Instant::now());
                        Err(HookError::message("no answer to the connection check"))
                    }
                }
            })
        }))
        .build()
        .map_err(|e| Error::Invalid(format!("database pool: {e}")))
}

/// Opens one connection outside the pool (migrations, the CLI) with the default bounds; its
/// driver task runs until the client is dropped.
///
/// # Errors
/// [`Error::Invalid`] for a malformed URL or certificates that cannot be loaded,
/// [`Error::Unavailable`] naming the server and the cause when it cannot be reached or
/// refuses the connection, or does not finish the startup within the connect bound.
pub async fn connect(url: &str) -> Result<Client, Error> {
    connect_with(url, &ConnectOptions::default()).await
}

/// [`connect`] with `bounds` for what the URL does not set.
///
/// # Errors
/// As [`connect`].
pub async fn connect_with(url: &str, bounds: &ConnectOptions) -> Result<Client, Error> {
    connect_to(&Target::parse_with(url, bounds)?).await
}

/// [`connect`] for a parsed target.
///
/// # Errors
/// As [`connect`].
pub async fn connect_to(target: &Target) -> Result<Client, Error> {
    let (client, connection) = handshake(target).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// A connection to `target` and its driver (which the caller runs): TCP, TLS and
/// authentication together within [`Target::connect_bound`].
///
/// # Errors
/// As [`connect`].
pub async fn handshake(target: &Target) -> Result<(Client, DbConnection), Error> {
    let tls = target.tls().await?;
    let connecting = watchdog::connect(&target.config, tls, target.statement_deadline());
    let connected = match target.connect_bound() {
        Some(bound) => tokio::time::timeout(bound, connecting).await.map_err(|_| {
            Error::Unavailable(format!(
                "cannot connect to {}: no answer within {bound:?} (TCP, TLS and authentication)",
                target.describe()
            ))
        })?,
        None => connecting.await,
    };
    connected.map_err(|e| match e {
        watchdog::ConnectFailure::Startup(e) => connect_error(&target.describe(), &e),
        watchdog::ConnectFailure::Socket(e) => {
            Error::Unavailable(format!("cannot connect to {}: {e}", target.describe()))
        }
    })
}

/// A connection's driver, over a [`watchdog::Watched`] socket.
pub type DbConnection = Connection<watchdog::Watched, tls::RustlsStream<watchdog::Watched>>;

/// The pool's connects: over [`watchdog::Watched`] sockets, as [`handshake`].
struct WatchedConnect {
    tls: tls::MakeRustls,
    deadline: Option<Duration>,
}

impl deadpool_postgres::Connect for WatchedConnect {
    fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let tls = self.tls.clone();
        let config = config.clone();
        let deadline = self.deadline;
        Box::pin(async move {
            let (client, connection) = match watchdog::connect(&config, tls.clone(), deadline).await
            {
                Ok(connected) => connected,
                Err(watchdog::ConnectFailure::Startup(e)) => return Err(e),
                // The pool reports tokio-postgres's errors: its own connect says why the
                // socket cannot be made, in its words.
                Err(watchdog::ConnectFailure::Socket(_)) => {
                    let (client, connection) = config.connect(tls).await?;
                    let driver = tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!(error = %cause(&e), "pooled database connection closed");
                        }
                    });
                    return Ok((client, driver));
                }
            };
            let driver = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %cause(&e), "pooled database connection closed");
                }
            });
            Ok((client, driver))
        })
    }
}

/// Creates `database` on the server of `admin_url` unless it exists (`template` to clone),
/// without a statement timeout: copying a template takes as long as it takes.
///
/// # Errors
/// The server refused.
pub async fn create_database(
    admin_url: &str,
    database: &str,
    template: Option<&str>,
) -> Result<(), Error> {
    let client = connect_with(
        admin_url,
        &ConnectOptions::default().without_statement_timeout(),
    )
    .await?;
    let exists = client
        .query_typed_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &repository::typed::params(&[&database]),
        )
        .await?
        .is_some();
    if !exists {
        let template = template
            .map(|t| format!(" TEMPLATE {}", quote_ident(t)))
            .unwrap_or_default();
        client
            .batch_execute(&format!(
                "CREATE DATABASE {}{template}",
                quote_ident(database)
            ))
            .await?;
    }
    Ok(())
}

/// Drops `database`, disconnecting its sessions.
///
/// # Errors
/// The server refused.
pub async fn drop_database(admin_url: &str, database: &str) -> Result<(), Error> {
    let client = connect_with(
        admin_url,
        &ConnectOptions::default().without_statement_timeout(),
    )
    .await?;
    client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(database)
        ))
        .await?;
    Ok(())
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether the database answers a trivial query within `timeout`.
pub async fn ping(pool: &Pool, timeout: Duration) -> bool {
    let probe = async {
        let client = pool.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(_)))
}
