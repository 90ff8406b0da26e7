//! The `datasource_state` table: what operators want of a worker (`desired`,
//! `restart_generation`) and what it is doing (status, version, heartbeat, errors). The row is
//! created with its datasource by the schema's trigger.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::{Row, Transaction};
use uuid::Uuid;

use super::GenericClient;
use super::events::{self, NewEvent};
use super::typed;
use crate::db::Error;
use crate::domain::{DesiredState, WorkerStatus};

const COLUMNS: &str = "datasource_id, desired, restart_generation, worker_status, running_version, owner_instance, \
     lease_epoch, last_heartbeat_at, last_progress_at, last_event_at, error_code, error_message, restart_count, \
     metrics, updated_at, failing_since";

/// A datasource's runtime state.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// The datasource.
    pub datasource_id: Uuid,
    /// What operators want.
    pub desired: DesiredState,
    /// Bumped by every restart request.
    pub restart_generation: i64,
    /// What the worker is doing.
    pub worker_status: WorkerStatus,
    /// The version it runs.
    pub running_version: Option<i32>,
    /// The instance that owns the worker.
    pub owner_instance: Option<String>,
    /// The owner's fencing epoch.
    pub lease_epoch: i64,
    /// Last heartbeat.
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// Last time the worker made progress.
    pub last_progress_at: Option<DateTime<Utc>>,
    /// Last event the worker handled.
    pub last_event_at: Option<DateTime<Utc>>,
    /// Machine-readable error code.
    pub error_code: Option<String>,
    /// Human-readable error (never secret values).
    pub error_message: Option<String>,
    /// Restarts since the last healthy run.
    pub restart_count: i32,
    /// The latest metrics snapshot.
    pub metrics: serde_json::Value,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Whether the owner is alive (see [`owner_live`]); `None` where the read did not look.
    pub owner_live: Option<bool>,
    /// Since when the worker has failed with no healthy run (the give-up policy's clock).
    pub failing_since: Option<DateTime<Utc>>,
    /// Dead letters waiting for the datasource; `None` where the read did not count them.
    pub dead_letters: Option<i64>,
}

impl State {
    fn from_row(row: &Row) -> Result<Self, Error> {
        Self::from_row_prefixed(row, "")
    }

    /// Reads the columns named `<prefix><column>`.
    fn from_row_prefixed(row: &Row, prefix: &str) -> Result<Self, Error> {
        let parse_err =
            |e: crate::domain::InvalidField| Error::Invalid(format!("stored state: {e}"));
        let col = |name: &str| format!("{prefix}{name}");
        let row = Prefixed { row, col: &col };
        Ok(Self {
            datasource_id: row.get("datasource_id"),
            desired: row.text("desired").parse().map_err(parse_err)?,
            restart_generation: row.get("restart_generation"),
            worker_status: row.text("worker_status").parse().map_err(parse_err)?,
            running_version: row.get("running_version"),
            owner_instance: row.get("owner_instance"),
            lease_epoch: row.get("lease_epoch"),
            last_heartbeat_at: row.get("last_heartbeat_at"),
            last_progress_at: row.get("last_progress_at"),
            last_event_at: row.get("last_event_at"),
            error_code: row.get("error_code"),
            error_message: row.get("error_message"),
            restart_count: row.get("restart_count"),
            metrics: row.get("metrics"),
            updated_at: row.get("updated_at"),
            owner_live: row.row.try_get(col("owner_live").as_str()).ok(),
            failing_since: row.get("failing_since"),
            dead_letters: row.row.try_get(col("dead_letters").as_str()).ok(),
        })
    }
}

/// A row whose columns carry a prefix.
struct Prefixed<'a> {
    row: &'a Row,
    col: &'a dyn Fn(&str) -> String,
}

impl Prefixed<'_> {
    fn get<'b, T: tokio_postgres::types::FromSql<'b>>(&'b self, name: &str) -> T {
        self.row.get((self.col)(name).as_str())
    }

    fn text(&self, name: &str) -> &str {
        self.row.get((self.col)(name).as_str())
    }
}

/// The prefix of the `application_name` of each instance's lease renewer connection, followed
/// by the instance id (see [`renewer_application_name`]).
pub const RENEWER_APPLICATION: &str = "dsreg-renewer ";

/// The `application_name` the lease renewer of instance `id` connects with. Postgres keeps 63
/// bytes of it; [`owner_live`] takes a name cut that short for the prefix it is.
pub fn renewer_application_name(id: &str) -> String {
    let mut name = format!("{RENEWER_APPLICATION}{id}");
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

/// The SQL condition that the owner of state row `s` is alive: it holds the lease, and — when the
/// database shows renewer sessions at all (a pooler in transaction mode hides them) — its
/// lease renewer's session is open. A killed instance's connections close with it, so it is
/// seen gone at once rather than when its lease runs out.
///
/// Per row it costs two primary-key probes (the lease, the owner): a status read must not
/// pay for every lease of the instance. The renewer sessions are read once per statement (an
/// uncorrelated subquery, which Postgres runs once), not once per row: `pg_stat_activity` is a
/// function over every backend, joined to the catalogs.
pub fn owner_live() -> String {
    const RENEWERS: &str = "(SELECT coalesce(array_agg(a.application_name), '{}') \
         FROM pg_stat_activity a WHERE a.datname = current_database() \
         AND a.application_name LIKE 'dsreg-renewer %')";
    format!(
        "(s.owner_instance IS NOT NULL \
         AND (SELECT l.owner FROM datasource_leases l WHERE l.datasource_id = s.datasource_id) \
             = s.owner_instance \
         AND {} \
         AND (cardinality({RENEWERS}) = 0 \
              OR EXISTS (SELECT 1 FROM unnest({RENEWERS}) AS r(name) \
                         WHERE starts_with('dsreg-renewer ' || s.owner_instance, r.name) \
                           AND (r.name = 'dsreg-renewer ' || s.owner_instance \
                                OR octet_length(r.name) >= 60))))",
        super::leases::is_live("s.owner_instance")
    )
}

/// The statement of [`with_datasources`]: the datasource's columns as they are, the state's
/// prefixed with `s_`.
static WITH_DATASOURCES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let d: Vec<String> = super::datasources::COLUMNS
        .split(',')
        .map(|c| format!("d.{}", c.trim()))
        .collect();
    let s: Vec<String> = COLUMNS
        .split(',')
        .map(|c| format!("s.{0} AS s_{0}", c.trim()))
        .collect();
    format!(
        "SELECT {}, {}, {} AS s_owner_live, \
         (SELECT count(*) FROM datasource_dead_letters x WHERE x.datasource_id = d.id) AS s_dead_letters \
         FROM datasources d JOIN datasource_state s ON s.datasource_id = d.id WHERE d.id = ANY($1)",
        d.join(", "),
        s.join(", "),
        owner_live()
    )
});

/// Datasources and their runtime states (with their owners' liveness and dead-letter counts) in
/// one statement, sent with its parameter types in one round trip: the API's hottest read (concurrent status reads share it). Ids that name no
/// datasource are missing from the answer.
///
/// # Errors
/// The query failed.
pub async fn with_datasources(
    client: &deadpool_postgres::ClientWrapper,
    datasources: &[Uuid],
) -> Result<HashMap<Uuid, (super::datasources::Datasource, State)>, Error> {
    let rows = client
        .query_typed(&WITH_DATASOURCES, &typed::params(&[&datasources]))
        .await?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in &rows {
        let datasource = super::datasources::Datasource::from_row(row)?;
        let state = State::from_row_prefixed(row, "s_")?;
        found.insert(datasource.id, (datasource, state));
    }
    Ok(found)
}

/// Reads a datasource's runtime state.
///
/// # Errors
/// [`Error::DatasourceNotFound`].
pub async fn get(client: &impl GenericClient, datasource: Uuid) -> Result<State, Error> {
    let row = client
        .query_typed_opt(
            &format!("SELECT {COLUMNS} FROM datasource_state WHERE datasource_id = $1"),
            &typed::params(&[&datasource]),
        )
        .await?
        .ok_or(Error::DatasourceNotFound(datasource))?;
    State::from_row(&row)
}

/// Whether a request changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The row changed and an event was written.
    Changed,
    /// It already was so; nothing written.
    Unchanged,
}

/// Sets the desired state; a change writes a `desired_changed` event, which wakes the
/// instance that owns the worker.
///
/// # Errors
/// [`Error::DatasourceNotFound`].
pub async fn set_desired(
    tx: &Transaction<'_>,
    datasource: Uuid,
    desired: DesiredState,
) -> Result<Outcome, Error> {
    let changed = tx
        .query_typed_opt(
            "UPDATE datasource_state SET desired = $2, updated_at = now()
             WHERE datasource_id = $1 AND desired <> $2 RETURNING 1",
            &typed::params(&[&datasource, &desired.as_str()]),
        )
        .await?
        .is_some();
    if !changed {
        get(tx, datasource).await?;
        return Ok(Outcome::Unchanged);
    }
    events::append(
        tx,
        &[NewEvent {
            at: None,
            datasource_id: Some(datasource),
            kind: "desired_changed".into(),
            version: None,
            payload: serde_json::json!({ "desired": desired.as_str() }),
        }],
    )
    .await?;
    Ok(Outcome::Changed)
}

/// Asks for a restart of the worker (a new `restart_generation` and a `reload_requested`
/// event); returns the new generation.
///
/// # Errors
/// [`Error::DatasourceNotFound`].
pub async fn request_restart(tx: &Transaction<'_>, datasource: Uuid) -> Result<i64, Error> {
    let generation: i64 = tx
        .query_typed_opt(
            "UPDATE datasource_state SET restart_generation = restart_generation + 1, updated_at = now()
             WHERE datasource_id = $1 RETURNING restart_generation",
            &typed::params(&[&datasource]),)
        .await?
        .ok_or(Error::DatasourceNotFound(datasource))?
        .get(0);
    events::append(
        tx,
        &[NewEvent {
            at: None,
            datasource_id: Some(datasource),
            kind: "reload_requested".into(),
            version: None,
            payload: serde_json::json!({ "restart_generation": generation }),
        }],
    )
    .await?;
    Ok(generation)
}

/// The last event this transaction wrote for `datasource` (0 when none): the mark after which
/// [`outcome_since`] looks for what a request produced.
///
/// # Errors
/// The query failed.
pub async fn request_mark(tx: &Transaction<'_>, datasource: Uuid) -> Result<i64, Error> {
    Ok(tx
        .query_typed_one(
            "SELECT coalesce(max(id), 0) FROM datasource_events \
              WHERE datasource_id = $1 AND xid = pg_current_xact_id()",
            &typed::params(&[&datasource]),
        )
        .await?
        .get(0))
}

/// How a worker's last start since a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerOutcome {
    /// It runs (`worker_running`, `reload_applied`).
    Running,
    /// It failed or was refused (`worker_error`, `reload_rejected`).
    Failed,
}

/// The newest start or failure of `datasource`'s worker recorded after event `after_id`, or
/// `None` while there is none yet.
///
/// # Errors
/// The query failed.
pub async fn outcome_since(
    client: &impl GenericClient,
    datasource: Uuid,
    after_id: i64,
) -> Result<Option<WorkerOutcome>, Error> {
    let row = client
        .query_typed_opt(
            "SELECT type FROM datasource_events \
              WHERE datasource_id = $1 AND id > $2 \
                AND type IN ('worker_running', 'reload_applied', 'worker_error', 'reload_rejected') \
              ORDER BY id DESC LIMIT 1",
            &typed::params(&[&datasource, &after_id]),)
        .await?;
    Ok(row.map(|row| match row.get::<_, &str>(0) {
        "worker_running" | "reload_applied" => WorkerOutcome::Running,
        _ => WorkerOutcome::Failed,
    }))
}

/// Asks every owner to re-read the tables for `datasource` (a `reload_requested` event); with
/// `None`, for every datasource (a full resync everywhere).
///
/// # Errors
/// [`Error::DatasourceNotFound`] for an unknown datasource.
pub async fn request_reload(tx: &Transaction<'_>, datasource: Option<Uuid>) -> Result<(), Error> {
    if let Some(id) = datasource {
        get(tx, id).await?;
    }
    events::append(
        tx,
        &[NewEvent {
            at: None,
            datasource_id: datasource,
            kind: "reload_requested".into(),
            version: None,
            payload: serde_json::json!({ "scope": if datasource.is_some() { "datasource" } else { "all" } }),
        }],
    )
    .await
}

/// What the tables say a datasource's worker should be, and what they last recorded of it.
#[derive(Debug, Clone)]
pub struct Desired {
    /// The datasource.
    pub datasource_id: Uuid,
    /// Its connector kind.
    pub kind: String,
    /// Active, disabled or archived.
    pub status: crate::domain::DatasourceStatus,
    /// What operators want.
    pub desired: DesiredState,
    /// Bumped by restart requests.
    pub restart_generation: i64,
    /// Bumped by every secret put or delete.
    pub secrets_generation: i64,
    /// Tenant: organisation (secrets are keyed by tenant).
    pub org: String,
    /// Tenant: project.
    pub project: String,
    /// Its name in the project.
    pub name: String,
    /// The published version.
    pub version: Option<i32>,
    /// The published version's config, when asked for.
    pub config: Option<serde_json::Value>,
    /// The last recorded worker status.
    pub worker_status: WorkerStatus,
    /// The saved source position, read with the config (`None` without it, or when none is
    /// saved).
    pub source_cursor: Option<serde_json::Value>,
}

/// The datasources [`desired`] reads: the ones named, or one page of a full resync.
#[derive(Debug, Clone, Copy)]
pub enum DesiredFor<'a> {
    /// These, archived or not.
    Ids(&'a [Uuid]),
    /// Up to `limit` live (not archived) datasources in id order, from just after `after`
    /// (from the first when `None`): one page of a full resync.
    Page {
        /// The last id of the previous page.
        after: Option<Uuid>,
        /// Page size.
        limit: i64,
    },
}

/// The columns [`desired`] reads; `$1` says whether the published config is read too.
const DESIRED: &str =
    "SELECT d.id, d.kind, d.status, s.desired, s.restart_generation, d.current_version,
            v.config, s.worker_status, s.secrets_generation, d.org, d.project,
            CASE WHEN $1 THEN s.source_cursor END, d.name
     FROM datasources d
     JOIN datasource_state s ON s.datasource_id = d.id
     LEFT JOIN datasource_versions v
            ON $1 AND v.datasource_id = d.id AND v.version = d.current_version";

/// The desired state of the datasources `which` names, with the published configs and the
/// saved source positions when `with_config`. One query, whatever the number.
///
/// # Errors
/// The query failed.
pub async fn desired(
    client: &impl typed::Run,
    which: DesiredFor<'_>,
    with_config: bool,
) -> Result<Vec<Desired>, Error> {
    let mut params: Vec<&dyn typed::Param> = vec![&with_config];
    let filter = match &which {
        // One datasource (a reload's usual read) by a plain key: its plan is the same whatever
        // the key, so a prepared statement's generic plan serves it without planning again.
        DesiredFor::Ids([id]) => {
            params.push(id);
            "d.id = $2"
        }
        DesiredFor::Ids(ids) => {
            params.push(ids);
            "d.id = ANY($2)"
        }
        DesiredFor::Page {
            after: Some(after),
            limit,
        } => {
            params.extend([after as &dyn typed::Param, limit]);
            "d.status <> 'archived' AND d.id > $2 ORDER BY d.id LIMIT $3"
        }
        DesiredFor::Page { after: None, limit } => {
            params.push(limit);
            "d.status <> 'archived' ORDER BY d.id LIMIT $2"
        }
    };
    let rows = client
        .rows(&format!("{DESIRED} WHERE {filter}"), &params)
        .await?;
    let parse_err = |e: crate::domain::InvalidField| Error::Invalid(format!("stored state: {e}"));
    rows.iter()
        .map(|r| {
            Ok(Desired {
                datasource_id: r.get(0),
                kind: r.get(1),
                status: r.get::<_, &str>(2).parse().map_err(parse_err)?,
                desired: r.get::<_, &str>(3).parse().map_err(parse_err)?,
                restart_generation: r.get(4),
                version: r.get(5),
                config: r.get(6),
                worker_status: r.get::<_, &str>(7).parse().map_err(parse_err)?,
                secrets_generation: r.get(8),
                org: r.get(9),
                project: r.get(10),
                source_cursor: r.get(11),
                name: r.get(12),
            })
        })
        .collect()
}

/// A change of a worker's recorded state; `None` fields are left as they are.
#[derive(Debug, Clone)]
pub struct Transition {
    /// The datasource.
    pub datasource_id: Uuid,
    /// New status.
    pub status: Option<WorkerStatus>,
    /// New running version. With a new `status` and no version, nothing runs: the running
    /// version is cleared, so it only ever names what runs.
    pub running_version: Option<i32>,
    /// `Some(None)` clears the error; `Some(Some((code, message)))` sets it.
    pub error: Option<Option<(String, String)>>,
    /// New restart count.
    pub restart_count: Option<i32>,
    /// The event recording it.
    pub event: Option<NewEvent>,
    /// The lease epoch it is written under (refused unless the lease still has it).
    pub epoch: i64,
}

impl Transition {
    /// Folds a later transition of the same datasource into this one (its epoch wins).
    pub fn merge(&mut self, later: Transition) {
        self.epoch = later.epoch;
        self.status = later.status.or(self.status);
        self.running_version = later.running_version.or(self.running_version);
        self.error = later.error.or(self.error.take());
        self.restart_count = later.restart_count.or(self.restart_count);
    }
}

/// The channel the state writer NOTIFYs with the datasources whose worker state it wrote
/// (comma-separated ids, or `*` for many): it wakes API waits and watches on every instance.
pub const STATE_CHANNEL: &str = "dsreg_state";

/// Writes many transitions (at most one per datasource: merge first) and their events in one
/// statement, as `instance`, with `actor` on the events. Each is fenced: written only while
/// `instance` holds the datasource's lease under the transition's epoch; the others (and
/// their events) are refused, and their datasources returned. With `notify`, the datasources
/// written are NOTIFYed on [`STATE_CHANNEL`], for the other instances.
///
/// # Errors
/// The statement failed; nothing was written.
pub async fn apply_transitions(
    client: &impl typed::Run,
    transitions: &[Transition],
    events: &[NewEvent],
    instance: &str,
    actor: &str,
    notify: bool,
) -> Result<Vec<Uuid>, Error> {
    let ids: Vec<Uuid> = transitions.iter().map(|t| t.datasource_id).collect();
    let statuses: Vec<Option<&str>> = transitions
        .iter()
        .map(|t| t.status.map(WorkerStatus::as_str))
        .collect();
    let versions: Vec<Option<i32>> = transitions.iter().map(|t| t.running_version).collect();
    let set_error: Vec<bool> = transitions.iter().map(|t| t.error.is_some()).collect();
    let codes: Vec<Option<&str>> = transitions
        .iter()
        .map(|t| {
            t.error
                .as_ref()
                .and_then(|e| e.as_ref())
                .map(|(c, _)| c.as_str())
        })
        .collect();
    let messages: Vec<Option<&str>> = transitions
        .iter()
        .map(|t| {
            t.error
                .as_ref()
                .and_then(|e| e.as_ref())
                .map(|(_, m)| m.as_str())
        })
        .collect();
    let restarts: Vec<Option<i32>> = transitions.iter().map(|t| t.restart_count).collect();
    let epochs: Vec<i64> = transitions.iter().map(|t| t.epoch).collect();
    let event_ids: Vec<Option<Uuid>> = events.iter().map(|e| e.datasource_id).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let event_versions: Vec<Option<i32>> = events.iter().map(|e| e.version).collect();
    let payloads: Vec<&serde_json::Value> = events.iter().map(|e| &e.payload).collect();
    let ats: Vec<Option<DateTime<Utc>>> = events.iter().map(|e| e.at).collect();
    let rows = client
        .rows(
            &format!(
                "WITH u AS (
                    SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::bool[], $5::text[], $6::text[],
                                         $7::int[], $15::bigint[])
                        AS u(id, status, version, set_error, code, message, restarts, epoch)
                 ), fenced AS (
                    SELECT u.* FROM u JOIN datasource_leases l ON l.datasource_id = u.id AND {}
                 ), locked AS (
                    -- Rows are locked in datasource order, as heartbeats lock them: the two
                    -- never deadlock (which Postgres would break only after a second). Each
                    -- locked row carries its transition: joining two CTEs on the id instead
                    -- costs time quadratic in the batch (5,000 rows took seconds).
                    SELECT f.* FROM fenced f JOIN datasource_state s ON s.datasource_id = f.id
                    ORDER BY s.datasource_id FOR UPDATE OF s
                 ), changed AS (
                    UPDATE datasource_state s SET
                        -- A new epoch with no status of its own (a claim) ends what the last
                        -- owner's worker claimed: the new owner's worker has yet to work.
                        worker_status = coalesce(u.status, CASE
                            WHEN u.epoch <> s.lease_epoch AND s.worker_status IN ('running', 'stalled')
                            THEN 'starting' ELSE s.worker_status END),
                        -- A new status naming no version: nothing of this datasource runs.
                        running_version = CASE WHEN u.status IS NOT NULL AND u.version IS NULL THEN NULL
                                               ELSE coalesce(u.version, s.running_version) END,
                        error_code = CASE WHEN u.set_error THEN u.code ELSE s.error_code END,
                        error_message = CASE WHEN u.set_error THEN u.message ELSE s.error_message END,
                        restart_count = coalesce(u.restarts, s.restart_count),
                        -- Since when the worker has failed with no healthy run: set at the
                        -- first failure, kept through the restarts after it, cleared by a
                        -- run that works or a stop (the give-up policy's clock).
                        failing_since = CASE
                            WHEN u.status IN ('error', 'crash_loop') THEN coalesce(s.failing_since, now())
                            WHEN u.status IN ('running', 'stopped', 'init') THEN NULL
                            ELSE s.failing_since END,
                        owner_instance = $8,
                        lease_epoch = u.epoch,
                        last_event_at = now(),
                        updated_at = now()
                    FROM locked u
                    WHERE s.datasource_id = u.id
                 ), recorded AS (
                    INSERT INTO datasource_events (datasource_id, type, version, actor, payload, created_at)
                    SELECT e.id, e.type, e.version, $9, e.payload, coalesce(e.at, clock_timestamp())
                    FROM unnest($10::uuid[], $11::text[], $12::int[], $13::jsonb[], $14::timestamptz[])
                         AS e(id, type, version, payload, at)
                    WHERE e.id IN (SELECT id FROM fenced)
                 )
                 SELECT id FROM u WHERE id NOT IN (SELECT id FROM fenced)
                 UNION ALL
                 -- The other instances hear which states changed (API waits and watches
                 -- served by an instance that does not own the worker): one notification a
                 -- batch, naming up to 100 datasources, else '*'. Its row has no id.
                 SELECT NULL FROM (
                    SELECT pg_notify('{}', CASE WHEN count(*) <= 100
                                                THEN string_agg(id::text, ',') ELSE '*' END)
                    FROM fenced HAVING count(*) > 0 AND $16
                 ) notified",
                super::leases::fence("$8", "u.epoch"),
                STATE_CHANNEL
            ),
            &[
                &ids, &statuses, &versions, &set_error, &codes, &messages, &restarts, &instance, &actor,
                &event_ids, &kinds, &event_versions, &payloads, &ats, &epochs, &notify,
            ],
        )
        .await?;
    Ok(rows.iter().filter_map(|r| r.get(0)).collect())
}

/// One worker's heartbeat.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    /// The datasource.
    pub datasource_id: Uuid,
    /// Last progress.
    pub last_progress_at: Option<DateTime<Utc>>,
    /// Metrics snapshot.
    pub metrics: serde_json::Value,
}

/// Writes the heartbeats of many workers in one statement, for those whose lease `instance`
/// still holds.
///
/// # Errors
/// The statement failed.
pub async fn heartbeat(
    client: &impl GenericClient,
    beats: &[Heartbeat],
    instance: &str,
) -> Result<(), Error> {
    if beats.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = beats.iter().map(|b| b.datasource_id).collect();
    let progress: Vec<Option<DateTime<Utc>>> = beats.iter().map(|b| b.last_progress_at).collect();
    let metrics: Vec<&serde_json::Value> = beats.iter().map(|b| &b.metrics).collect();
    client
        .execute_typed(
            &format!(
                "WITH u AS (
                    SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::jsonb[]) AS u(id, progress, metrics)
                 ), locked AS (
                    -- Rows are locked in datasource order, as the state writer locks them:
                    -- never a deadlock.
                    SELECT u.* FROM u
                    JOIN datasource_state s ON s.datasource_id = u.id
                    JOIN datasource_leases l ON l.datasource_id = u.id
                    WHERE {}
                    ORDER BY s.datasource_id FOR UPDATE OF s
                 )
                 UPDATE datasource_state s SET last_heartbeat_at = now(),
                        last_progress_at = coalesce(u.progress, s.last_progress_at), metrics = u.metrics
                 FROM locked u
                 WHERE s.datasource_id = u.id",
                super::leases::held_by("$4")
            ),
            &typed::params(&[&ids, &progress, &metrics, &instance]),)
        .await?;
    Ok(())
}

/// A pull source's saved position.
///
/// # Errors
/// The query failed.
pub async fn load_cursor(
    client: &impl GenericClient,
    datasource: Uuid,
) -> Result<Option<serde_json::Value>, Error> {
    Ok(client
        .query_typed_opt(
            "SELECT source_cursor FROM datasource_state WHERE datasource_id = $1",
            &typed::params(&[&datasource]),
        )
        .await?
        .and_then(|r| r.get(0)))
}

/// Whose write a cursor save is: the worker started at a restart generation, on an instance,
/// under a lease epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    /// The restart generation the worker was started for.
    pub generation: i64,
    /// The instance it runs on.
    pub instance: String,
    /// Its lease epoch.
    pub epoch: i64,
}

/// Saves a pull source's position, written by `writer`; returns false (nothing saved) once a
/// restart or backfill has moved the generation on, so a worker that is stopping cannot
/// overwrite the position a backfill set, or once its instance no longer holds the lease
/// under its epoch.
///
/// # Errors
/// The query failed.
pub async fn save_cursor(
    client: &impl GenericClient,
    datasource: Uuid,
    writer: &Writer,
    cursor: &serde_json::Value,
) -> Result<bool, Error> {
    let saved = client
        .execute_typed(
            &format!(
                "UPDATE datasource_state s SET source_cursor = $3
                 FROM datasource_leases l
                 WHERE s.datasource_id = $1 AND s.restart_generation = $2
                   AND l.datasource_id = $1 AND {}",
                super::leases::fence("$4", "$5")
            ),
            &typed::params(&[
                &datasource,
                &writer.generation,
                cursor,
                &writer.instance,
                &writer.epoch,
            ]),
        )
        .await?;
    Ok(saved == 1)
}

/// Asks for a backfill: sets the source position to `from` (`None`: from the start) and
/// restarts the worker (as [`request_restart`]), recording a `backfill_requested` event.
/// Returns the new restart generation.
///
/// # Errors
/// [`Error::DatasourceNotFound`].
pub async fn request_backfill(
    tx: &Transaction<'_>,
    datasource: Uuid,
    from: Option<&serde_json::Value>,
) -> Result<i64, Error> {
    tx.execute_typed(
        "UPDATE datasource_state SET source_cursor = $2 WHERE datasource_id = $1",
        &typed::params(&[&datasource, &from]),
    )
    .await?;
    let generation = request_restart(tx, datasource).await?;
    events::append(
        tx,
        &[NewEvent {
            at: None,
            datasource_id: Some(datasource),
            kind: "backfill_requested".into(),
            version: None,
            payload: serde_json::json!({ "from_start": from.is_none() }),
        }],
    )
    .await?;
    Ok(generation)
}

/// Live datasources and their workers by status, within a tenant scope (`None`: all).
///
/// # Errors
/// The query failed.
pub async fn counts(
    client: &impl GenericClient,
    org: Option<&str>,
    projects: Option<&[String]>,
) -> Result<(i64, Vec<(String, i64)>), Error> {
    let rows = client
        .query_typed(
            "SELECT s.worker_status, count(*) FROM datasources d
             JOIN datasource_state s ON s.datasource_id = d.id
             WHERE d.status <> 'archived'
               AND ($1::text IS NULL OR d.org = $1)
               AND ($2::text[] IS NULL OR d.project = ANY($2))
             GROUP BY s.worker_status",
            &typed::params(&[&org, &projects]),
        )
        .await?;
    let by_status: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok((by_status.iter().map(|(_, n)| n).sum(), by_status))
}

/// Which workers a bulk restart selects: those of active datasources matching every filter
/// given, within the tenant given.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Worker statuses (empty: any).
    pub statuses: Vec<WorkerStatus>,
    /// A connector kind.
    pub kind: Option<String>,
    /// An organisation.
    pub org: Option<String>,
    /// A project.
    pub project: Option<String>,
    /// A tag.
    pub tag: Option<String>,
    /// Datasource ids.
    pub ids: Option<Vec<Uuid>>,
    /// The caller's organisation, when it is limited to one.
    pub tenant_org: Option<String>,
    /// The caller's projects, when it is limited to some.
    pub tenant_projects: Option<Vec<String>>,
    /// At most this many, by id.
    pub limit: i64,
}

/// The datasources `selection` selects, by id.
///
/// # Errors
/// The query failed.
pub async fn select(
    client: &impl GenericClient,
    selection: &Selection,
) -> Result<Vec<Uuid>, Error> {
    let statuses: Option<Vec<&str>> = (!selection.statuses.is_empty())
        .then(|| selection.statuses.iter().map(|s| s.as_str()).collect());
    let rows = client
        .query_typed(
            "SELECT d.id FROM datasources d JOIN datasource_state s ON s.datasource_id = d.id
             WHERE d.status = 'active'
               AND ($1::text[] IS NULL OR s.worker_status = ANY($1))
               AND ($2::text IS NULL OR d.kind = $2)
               AND ($3::text IS NULL OR d.org = $3)
               AND ($4::text IS NULL OR d.project = $4)
               AND ($5::text IS NULL OR d.tags @> ARRAY[$5])
               AND ($6::uuid[] IS NULL OR d.id = ANY($6))
               AND ($7::text IS NULL OR d.org = $7)
               AND ($8::text[] IS NULL OR d.project = ANY($8))
             ORDER BY d.id LIMIT $9",
            &typed::params(&[
                &statuses,
                &selection.kind,
                &selection.org,
                &selection.project,
                &selection.tag,
                &selection.ids,
                &selection.tenant_org,
                &selection.tenant_projects,
                &selection.limit,
            ]),
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What a source position read or reset needs of a datasource's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    /// What the worker is doing.
    pub worker_status: WorkerStatus,
    /// What operators want.
    pub desired: DesiredState,
    /// The stored position (`None`: none; the next run reads from the start).
    pub source_cursor: Option<serde_json::Value>,
}

/// Reads a datasource's source position and worker status; with `lock`, locks the state row
/// for the rest of the transaction (a reset holds it while it checks and writes).
///
/// # Errors
/// [`Error::DatasourceNotFound`].
pub async fn position(
    client: &impl GenericClient,
    datasource: Uuid,
    lock: bool,
) -> Result<Position, Error> {
    let row = client
        .query_typed_opt(
            &format!(
                "SELECT worker_status, desired, source_cursor FROM datasource_state
                 WHERE datasource_id = $1{}",
                if lock { " FOR UPDATE" } else { "" }
            ),
            &typed::params(&[&datasource]),
        )
        .await?
        .ok_or(Error::DatasourceNotFound(datasource))?;
    let parse_err = |e: crate::domain::InvalidField| Error::Invalid(format!("stored state: {e}"));
    Ok(Position {
        worker_status: row.get::<_, &str>(0).parse().map_err(parse_err)?,
        desired: row.get::<_, &str>(1).parse().map_err(parse_err)?,
        source_cursor: row.get(2),
    })
}

/// Sets (or with `None` clears) a datasource's source position, recording a
/// `source_position_reset` event with the position before and after. The caller has checked
/// that the worker is stopped, with the row locked ([`position`]).
///
/// # Errors
/// [`Error::DatasourceNotFound`].
pub async fn reset_position(
    tx: &Transaction<'_>,
    datasource: Uuid,
    previous: Option<&serde_json::Value>,
    to: Option<&serde_json::Value>,
) -> Result<(), Error> {
    let updated = tx
        .execute_typed(
            "UPDATE datasource_state SET source_cursor = $2, updated_at = now() WHERE datasource_id = $1",
            &typed::params(&[&datasource, &to]),
        )
        .await?;
    if updated == 0 {
        return Err(Error::DatasourceNotFound(datasource));
    }
    events::append(
        tx,
        &[NewEvent {
            at: None,
            datasource_id: Some(datasource),
            kind: "source_position_reset".into(),
            version: None,
            payload: serde_json::json!({ "from": previous, "to": to, "cleared": to.is_none() }),
        }],
    )
    .await
}

/// A datasource the give-up policy disabled ([`give_up`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GivenUp {
    /// The datasource.
    pub datasource_id: Uuid,
    /// Tenant organisation.
    pub org: String,
    /// Tenant project.
    pub project: String,
    /// Since when its worker had failed with no healthy run.
    pub failing_since: DateTime<Utc>,
    /// Its worker's status then.
    pub worker_status: WorkerStatus,
    /// Its last error's code.
    pub error_code: Option<String>,
    /// Its last error (never secret values).
    pub error_message: Option<String>,
}

/// Disables (`status = 'disabled'`) up to `limit` active datasources whose worker has failed
/// with no healthy run since at least `after` ago (`datasource_state.failing_since`), among
/// those whose lease `instance` holds now; returns them. The status change writes the
/// `disabled` event that stops the worker; the caller records why. Rows another transaction
/// holds are skipped (the next sweep sees them).
///
/// # Errors
/// The statement failed; nothing was disabled.
pub async fn give_up(
    tx: &Transaction<'_>,
    instance: &str,
    after: std::time::Duration,
    limit: i64,
) -> Result<Vec<GivenUp>, Error> {
    let after_secs = after.as_secs_f64();
    let rows = tx
        .query_typed(
            &format!(
                "WITH due AS (
                    SELECT d.id FROM datasources d
                    JOIN datasource_state s ON s.datasource_id = d.id
                    JOIN datasource_leases l ON l.datasource_id = d.id
                    WHERE d.status = 'active' AND s.failing_since IS NOT NULL
                      AND s.failing_since <= now() - make_interval(secs => $2)
                      AND {}
                    ORDER BY d.id LIMIT $3
                    FOR UPDATE OF d SKIP LOCKED
                 ), disabled AS (
                    UPDATE datasources d SET status = 'disabled'
                    FROM due WHERE d.id = due.id
                    RETURNING d.id, d.org, d.project
                 )
                 SELECT x.id, x.org, x.project, s.failing_since, s.worker_status, s.error_code,
                        s.error_message
                 FROM disabled x JOIN datasource_state s ON s.datasource_id = x.id
                 ORDER BY x.id",
                super::leases::held_by("$1")
            ),
            &typed::params(&[&instance, &after_secs, &limit]),
        )
        .await?;
    let parse_err = |e: crate::domain::InvalidField| Error::Invalid(format!("stored state: {e}"));
    rows.iter()
        .map(|r| {
            Ok(GivenUp {
                datasource_id: r.get(0),
                org: r.get(1),
                project: r.get(2),
                failing_since: r.get(3),
                worker_status: r.get::<_, &str>(4).parse().map_err(parse_err)?,
                error_code: r.get(5),
                error_message: r.get(6),
            })
        })
        .collect()
}
