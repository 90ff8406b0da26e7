//! The `datasource_events` table: the outbox and the history. Events that call for a
//! reconcile are NOTIFYed by the schema's trigger; this module appends and reads them.
//!
//! [`read_safe`] is the outbox query: it returns committed events by transaction horizon, not
//! by "highest id seen", because ids are taken in one order and committed in another.

use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use uuid::Uuid;

use super::GenericClient;
use super::typed;
use crate::db::Error;

const COLUMNS: &str = "id, datasource_id, type, version, actor, payload, traceparent, traceparent_invalid, xid::text::bigint AS xid, created_at";
/// [`COLUMNS`] of `datasource_events ev` in a join.
const EV_COLUMNS: &str = "ev.id, ev.datasource_id, ev.type, ev.version, ev.actor, ev.payload, ev.traceparent, ev.traceparent_invalid, ev.xid::text::bigint AS xid, ev.created_at";

/// One outbox / history row.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Position in the outbox (allocated in one order, committed in another).
    pub id: i64,
    /// The datasource it concerns, if any.
    pub datasource_id: Option<Uuid>,
    /// What happened (`published`, `rolled_back`, `worker_running`, ...).
    pub kind: String,
    /// The version concerned, if any.
    pub version: Option<i32>,
    /// Who caused it.
    pub actor: String,
    /// Details (never secret values).
    pub payload: serde_json::Value,
    /// The W3C trace context of the writing transaction.
    pub traceparent: Option<String>,
    /// Whether the writer set a trace context that was dropped as malformed.
    pub traceparent_invalid: bool,
    /// The writing transaction's id.
    pub xid: i64,
    /// When it was written.
    pub created_at: DateTime<Utc>,
}

impl Event {
    fn from_row(row: &Row) -> Self {
        Self {
            id: row.get("id"),
            datasource_id: row.get("datasource_id"),
            kind: row.get("type"),
            version: row.get("version"),
            actor: row.get("actor"),
            payload: row.get("payload"),
            traceparent: row.get("traceparent"),
            traceparent_invalid: row.get("traceparent_invalid"),
            xid: row.get("xid"),
            created_at: row.get("created_at"),
        }
    }
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The datasource it concerns.
    pub datasource_id: Option<Uuid>,
    /// What happened.
    pub kind: String,
    /// The version concerned.
    pub version: Option<i32>,
    /// Details (never secret values).
    pub payload: serde_json::Value,
    /// When it happened, if not at the time of writing.
    pub at: Option<DateTime<Utc>>,
}

/// Appends events in one statement, whatever their number; actor and trace context come from
/// the transaction (see [`super::begin`]).
///
/// # Errors
/// [`Error::Invalid`] for a malformed type or an oversized payload.
pub async fn append(client: &impl GenericClient, events: &[NewEvent]) -> Result<(), Error> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Option<Uuid>> = events.iter().map(|e| e.datasource_id).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let versions: Vec<Option<i32>> = events.iter().map(|e| e.version).collect();
    let payloads: Vec<&serde_json::Value> = events.iter().map(|e| &e.payload).collect();
    let ats: Vec<Option<DateTime<Utc>>> = events.iter().map(|e| e.at).collect();
    client
        .execute_typed(
            "INSERT INTO datasource_events (datasource_id, type, version, payload, created_at)
             SELECT id, type, version, payload, coalesce(at, clock_timestamp())
             FROM unnest($1::uuid[], $2::text[], $3::int[], $4::jsonb[], $5::timestamptz[])
                  AS e(id, type, version, payload, at)",
            &typed::params(&[&ids, &kinds, &versions, &payloads, &ats]),
        )
        .await?;
    Ok(())
}

/// Filters for [`list`].
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this datasource.
    pub datasource_id: Option<Uuid>,
    /// Only these types (empty: all).
    pub kinds: Vec<String>,
    /// Only ids greater than this.
    pub after_id: Option<i64>,
    /// Only ids up to this one.
    pub through_id: Option<i64>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    /// Only events of datasources of this organisation (registry-wide events excluded).
    pub org: Option<String>,
    /// Only events of datasources of these projects (registry-wide events excluded).
    pub projects: Option<Vec<String>>,
    /// Page size.
    pub limit: i64,
}

/// A page of history and the bounds of the snapshot that read it.
#[derive(Debug)]
pub struct HistoryPage {
    /// The events, by id.
    pub events: Vec<Event>,
    /// The snapshot's `xmin`: every transaction below it had finished.
    pub xmin: i64,
    /// Every transaction that had an xid when the page was read has one below this
    /// ([`SNAPSHOT_BOUNDS`]).
    pub xid_bound: i64,
}

/// History in id order, with the bounds of the snapshot that read it (one statement).
///
/// # Errors
/// The query failed.
pub async fn list(client: &impl GenericClient, filter: &EventFilter) -> Result<HistoryPage, Error> {
    let page = list_scoped(client, filter).await?;
    Ok(HistoryPage {
        events: page.events.into_iter().map(|s| s.event).collect(),
        xmin: page.xmin,
        xid_bound: page.xid_bound,
    })
}

/// An event with the tenant of its datasource (`None` for registry-wide events and events
/// of datasources that no longer exist).
#[derive(Debug, Clone, PartialEq)]
pub struct ScopedEvent {
    /// The event.
    pub event: Event,
    /// Its datasource's organisation.
    pub org: Option<String>,
    /// Its datasource's project.
    pub project: Option<String>,
}

impl ScopedEvent {
    /// Whether `filter`'s datasource, types and tenant admit this event (its id bounds and
    /// times are not looked at): the same rule as [`list`]'s query, for events already read.
    pub fn matches(&self, filter: &EventFilter) -> bool {
        let e = &self.event;
        filter
            .datasource_id
            .is_none_or(|id| e.datasource_id == Some(id))
            && (filter.kinds.is_empty() || filter.kinds.contains(&e.kind))
            && filter
                .org
                .as_ref()
                .is_none_or(|org| self.org.as_ref() == Some(org))
            && filter
                .projects
                .as_ref()
                .is_none_or(|projects| self.project.as_ref().is_some_and(|p| projects.contains(p)))
            && ((filter.org.is_none() && filter.projects.is_none()) || self.org.is_some())
    }
}

/// [`HistoryPage`] with each event's tenant.
#[derive(Debug)]
pub struct ScopedPage {
    /// The events, by id.
    pub events: Vec<ScopedEvent>,
    /// The snapshot's `xmin`: every transaction below it had finished.
    pub xmin: i64,
    /// Every transaction that had an xid when the page was read has one below this
    /// ([`SNAPSHOT_BOUNDS`]).
    pub xid_bound: i64,
    /// The server, and the history of it, that answered.
    pub server: ServerIdentity,
}

/// [`list`] with each event's tenant.
///
/// # Errors
/// The query failed.
pub async fn list_scoped(
    client: &impl GenericClient,
    filter: &EventFilter,
) -> Result<ScopedPage, Error> {
    let rows = client
        .query_typed(
            &format!(
                "WITH snap AS ({SNAPSHOT_BOUNDS})
                 SELECT snap.snap_xmin, snap.xid_bound, {IDENTITY}, e.* FROM snap LEFT JOIN LATERAL (
                     SELECT {EV_COLUMNS}, d.org AS ds_org, d.project AS ds_project
                     FROM datasource_events ev LEFT JOIN datasources d ON d.id = ev.datasource_id
                     WHERE ($1::uuid IS NULL OR ev.datasource_id = $1)
                       AND (cardinality($2::text[]) = 0 OR ev.type = ANY($2))
                       AND ($3::bigint IS NULL OR ev.id > $3)
                       AND ($4::timestamptz IS NULL OR ev.created_at >= $4)
                       AND ($5::timestamptz IS NULL OR ev.created_at < $5)
                       AND ($7::bigint IS NULL OR ev.id <= $7)
                       AND (($8::text IS NULL AND $9::text[] IS NULL) OR (d.id IS NOT NULL
                               AND ($8::text IS NULL OR d.org = $8)
                               AND ($9::text[] IS NULL OR d.project = ANY($9))))
                     ORDER BY ev.id
                     LIMIT $6
                 ) e ON true"
            ),
            &typed::params(&[
                &filter.datasource_id,
                &filter.kinds,
                &filter.after_id,
                &filter.since,
                &filter.until,
                &filter.limit,
                &filter.through_id,
                &filter.org,
                &filter.projects,
            ]),
        )
        .await?;
    let Some(first) = rows.first() else {
        return Err(Error::Unavailable(
            "the history query returned no snapshot row".to_owned(),
        ));
    };
    let (xmin, xid_bound) = (first.get("snap_xmin"), first.get("xid_bound"));
    let server = identity_of(first);
    let events = rows
        .iter()
        .filter(|r| r.get::<_, Option<i64>>("id").is_some())
        .map(|r| ScopedEvent {
            event: Event::from_row(r),
            org: r.get("ds_org"),
            project: r.get("ds_project"),
        })
        .collect();
    Ok(ScopedPage {
        events,
        xmin,
        xid_bound,
        server,
    })
}

/// Which server, and which history of it, answered a statement: a promoted standby keeps its
/// primary's system identifier but starts a new timeline; a cluster restored from a dump has
/// a new identifier. Transaction ids are only comparable between reads of the same identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    /// `pg_control_system().system_identifier`; `None` where an operator revoked the function
    /// from the registry's role (the timeline and the horizon still tell histories apart).
    pub system_identifier: Option<i64>,
    /// The timeline WAL is written on now; `None` on a server in recovery (it writes none).
    pub timeline: Option<String>,
}

impl std::fmt::Display for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.system_identifier {
            Some(id) => write!(f, "system {id}")?,
            None => write!(f, "system ?")?,
        }
        match &self.timeline {
            Some(tl) => write!(f, " timeline {tl}"),
            None => write!(f, " (in recovery)"),
        }
    }
}

/// The history an outbox reader inherits when it starts on a server: rows whose ids were
/// taken before it started (`id <= last_id`) while their xid is at or above `next_xid`, an
/// xid not yet assigned at that moment. No transaction of this server can have written such a
/// row (a writer takes its xid before its id), so they are rows restored from another
/// cluster, whose xids mean nothing here, and the reader never reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    /// The newest event id taken before `next_xid` was.
    pub last_id: i64,
    /// An xid assigned after `last_id` was read.
    pub next_xid: i64,
}

/// Where an outbox reader starts on the server it is connected to.
#[derive(Debug, Clone)]
pub struct Anchor {
    /// The snapshot horizon to read from.
    pub horizon: i64,
    /// Rows inherited from another cluster, never to be read.
    pub fence: Fence,
    /// The server.
    pub server: ServerIdentity,
}

/// Reads where a new outbox reader starts: the newest id first, then an xid (one is
/// consumed), then the horizon and the server's identity; three short statements.
///
/// # Errors
/// The query failed.
pub async fn anchor(client: &impl GenericClient) -> Result<Anchor, Error> {
    // The order matters: every id up to `last_id` was taken by a transaction holding its xid
    // already, so below the xid assigned afterwards.
    let last_id = last_id(client).await?;
    let next_xid: i64 = client
        .query_typed_one("SELECT pg_current_xact_id()::text::bigint", &[])
        .await?
        .get(0);
    let row = client
        .query_typed_one(
            &format!(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon, {IDENTITY}"
            ),
            &[],
        )
        .await?;
    Ok(Anchor {
        horizon: row.get("horizon"),
        fence: Fence { last_id, next_xid },
        server: identity_of(&row),
    })
}

/// Columns `system_identifier` and `timeline` naming the server (see [`ServerIdentity`]);
/// `pg_current_wal_lsn()` fails during recovery and `pg_control_system()` where it was revoked,
/// hence the guards.
/// The newest event id taken on this server (0 when none), as an SQL expression.
const IDS_TAKEN: &str =
    "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM datasource_events_id_seq)";

const IDENTITY: &str =
    "CASE WHEN has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')
          THEN (pg_control_system()).system_identifier END AS system_identifier,
     CASE WHEN pg_is_in_recovery() THEN NULL
          ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END AS timeline";

fn identity_of(row: &Row) -> ServerIdentity {
    ServerIdentity {
        system_identifier: row.get("system_identifier"),
        timeline: row.get("timeline"),
    }
}

/// One page of the outbox query.
#[derive(Debug)]
pub struct SafePage {
    /// Committed events from transactions at or after the horizon asked for, by id.
    pub events: Vec<Event>,
    /// The statement snapshot's `xmin`: every transaction below it had finished when the
    /// page was read, so none can add rows below it any more.
    pub horizon: i64,
    /// The server that answered.
    pub server: ServerIdentity,
    /// The newest event id taken on that server when the page was read (by any writer, read
    /// by this reader or not).
    pub ids_taken: i64,
}

/// Reads committed events written by transactions at or after `horizon`, with ids greater
/// than `after_id`, up to `limit` (only those that call for a reconcile when `wakes_only`),
/// leaving out the rows behind `fence`; and the snapshot horizon and server of that same
/// statement.
///
/// # Errors
/// The query failed.
pub async fn read_safe(
    client: &impl GenericClient,
    horizon: i64,
    fence: Fence,
    after_id: i64,
    limit: i64,
    wakes_only: bool,
) -> Result<SafePage, Error> {
    // One statement, one snapshot: the events and the horizon are consistent with each other.
    // The two ranges (xids below the fence's, ids above it) are what the xid index and the
    // primary key each answer, so fenced rows are never visited.
    let rows = client
        .query_typed(
            &format!(
                "WITH snap AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon,
                                      {IDS_TAKEN} AS ids_taken, {IDENTITY})
                 SELECT snap.*, e.* FROM snap LEFT JOIN LATERAL (
                     SELECT {COLUMNS} FROM datasource_events
                     WHERE ((xid >= $1::text::xid8 AND xid < $5::text::xid8)
                            OR (id > $6 AND xid >= $1::text::xid8))
                       AND id > $2 AND (NOT $4 OR dsreg_event_wakes(type))
                     ORDER BY id LIMIT $3
                 ) e ON true"
            ),
            &typed::params(&[
                &horizon.to_string(),
                &after_id,
                &limit,
                &wakes_only,
                &fence.next_xid.to_string(),
                &fence.last_id,
            ]),
        )
        .await?;
    let Some(first) = rows.first() else {
        return Err(Error::Unavailable(
            "the outbox query returned no snapshot row".to_owned(),
        ));
    };
    let horizon = first.get::<_, i64>("horizon");
    let ids_taken = first.get::<_, i64>("ids_taken");
    let server = identity_of(first);
    let events = rows
        .iter()
        .filter(|r| r.get::<_, Option<i64>>("id").is_some())
        .map(Event::from_row)
        .collect();
    Ok(SafePage {
        events,
        horizon,
        server,
        ids_taken,
    })
}

/// The oldest transaction holding the outbox horizon back (the one with the oldest
/// transaction id still running, in any database of the server): its backend pid and how long
/// it has been open. `None` when no writing transaction is open.
///
/// # Errors
/// The query failed.
pub async fn horizon_holder(client: &impl GenericClient) -> Result<Option<(i32, f64)>, Error> {
    let row = client
        .query_typed_opt(
            "SELECT pid, extract(epoch FROM clock_timestamp() - xact_start)::float8
             FROM pg_stat_activity
             WHERE backend_xid IS NOT NULL AND xact_start IS NOT NULL
             ORDER BY age(backend_xid) DESC LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map(|r| (r.get(0), r.get::<_, f64>(1).max(0.0))))
}

/// The current snapshot horizon (where a new reader starts).
///
/// # Errors
/// The query failed.
pub async fn current_horizon(client: &impl GenericClient) -> Result<i64, Error> {
    let row = client
        .query_typed_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Where the server answering stands: its snapshot's `xmin`, a bound every transaction
/// holding an xid now has its xid below ([`SNAPSHOT_BOUNDS`]), and which server that is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    /// Every transaction below it had finished.
    pub xmin: i64,
    /// Every transaction holding an xid has one below it.
    pub xid_bound: i64,
    /// The server, and its history, the xids belong to.
    pub server: ServerIdentity,
}

/// The current [`Bounds`].
///
/// # Errors
/// The query failed.
pub async fn snapshot_bounds(client: &impl GenericClient) -> Result<Bounds, Error> {
    let row = client
        .query_typed_one(
            &format!("SELECT snap_xmin, xid_bound, {IDENTITY} FROM ({SNAPSHOT_BOUNDS}) snap"),
            &[],
        )
        .await?;
    Ok(Bounds {
        xmin: row.get("snap_xmin"),
        xid_bound: row.get("xid_bound"),
        server: identity_of(&row),
    })
}

/// A snapshot's `xmin` (`snap_xmin`: every transaction below it had finished) and
/// the xid bound (`xid_bound`), as a query of one row.
///
/// A snapshot's `xmax` is not such a bound: it is one past the newest *finished* xid, and a
/// transaction that took its xid after that one was taken, and is still running, has an xid
/// at or above it (`xmin == xmax` then, with that transaction running). So the xids of the
/// transactions running on the server (every database; `backend_xid` is shown to every role)
/// raise it: each is read as the 64-bit xid nearest the snapshot's `xmax` with the same low 32
/// bits.
const SNAPSHOT_BOUNDS: &str = "SELECT pg_snapshot_xmin(s)::text::bigint AS snap_xmin,
            greatest(pg_snapshot_xmax(s)::text::bigint,
                     (SELECT max(pg_snapshot_xmax(s)::text::bigint
                                 + (a.backend_xid::text::bigint
                                    - pg_snapshot_xmax(s)::text::bigint % 4294967296
                                    + 6442450944) % 4294967296
                                 - 2147483648 + 1)
                      FROM pg_stat_activity a WHERE a.backend_xid IS NOT NULL)) AS xid_bound
     FROM pg_current_snapshot() s";

/// The newest id taken so far (0 when none): where a watch of only new events starts.
///
/// # Errors
/// The query failed.
pub async fn last_id(client: &impl GenericClient) -> Result<i64, Error> {
    let row = client
        .query_typed_one(&format!("SELECT {IDS_TAKEN}"), &[])
        .await?;
    Ok(row.get(0))
}

/// Moves the event id sequence past `id` when it is behind it (a history that lost its
/// advances); never backwards. Returns whether it moved.
///
/// # Errors
/// The statement failed.
pub async fn advance_ids_past(client: &impl GenericClient, id: i64) -> Result<bool, Error> {
    let moved = client
        .query_typed(
            &format!(
                "SELECT setval('datasource_events_id_seq', $1::bigint) WHERE $1::bigint > {IDS_TAKEN}"
            ),
            &typed::params(&[&id]),
        )
        .await?;
    Ok(!moved.is_empty())
}

/// The oldest open transaction holding an xid, anywhere on the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// Its backend's pid (`pg_stat_activity.pid`).
    pub pid: i32,
    /// The database it is connected to.
    pub database: Option<String>,
    /// How long its transaction has been open, in seconds.
    pub age_seconds: f64,
}

/// What holds the outbox back, read in one statement.
#[derive(Debug, Clone, PartialEq)]
pub struct Pressure {
    /// The transaction holding the outbox horizon back (events of later transactions are
    /// final only once it ends); `None` when no transaction holds an xid. Transactions of
    /// other roles are seen only with `pg_read_all_stats` (or `pg_monitor`).
    pub holder: Option<Holder>,
    /// `pg_notification_queue_usage()`: the share of the server's NOTIFY queue in use, 0 to 1.
    pub queue_usage: f64,
}

/// Reads [`Pressure`].
///
/// # Errors
/// The query failed.
pub async fn pressure(client: &impl GenericClient) -> Result<Pressure, Error> {
    let row = client
        .query_typed_one(
            "SELECT pg_notification_queue_usage() AS queue, h.pid, h.datname, h.age
             FROM (SELECT 1) one LEFT JOIN LATERAL (
                 SELECT pid, datname::text AS datname,
                        extract(epoch FROM clock_timestamp() - xact_start)::float8 AS age
                 FROM pg_stat_activity
                 WHERE backend_xid IS NOT NULL AND xact_start IS NOT NULL
                 ORDER BY age(backend_xid) DESC LIMIT 1
             ) h ON true",
            &[],
        )
        .await?;
    let holder = row.get::<_, Option<i32>>("pid").map(|pid| Holder {
        pid,
        database: row.get("datname"),
        age_seconds: row.get::<_, Option<f64>>("age").unwrap_or(0.0).max(0.0),
    });
    Ok(Pressure {
        holder,
        queue_usage: row.get("queue"),
    })
}
