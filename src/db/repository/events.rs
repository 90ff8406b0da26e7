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
    /// The snapshot's `xmax`: every transaction at or above it started after the read.
    pub xmax: i64,
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
        xmax: page.xmax,
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
    /// The snapshot's `xmax`: every transaction at or above it started after the read.
    pub xmax: i64,
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
                "WITH snap AS (
                     SELECT pg_snapshot_xmin(s)::text::bigint AS snap_xmin,
                            pg_snapshot_xmax(s)::text::bigint AS snap_xmax
                     FROM pg_current_snapshot() s)
                 SELECT snap.snap_xmin, snap.snap_xmax, e.* FROM snap LEFT JOIN LATERAL (
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
    let (xmin, xmax) = rows
        .first()
        .map_or((0, 0), |r| (r.get("snap_xmin"), r.get("snap_xmax")));
    let events = rows
        .iter()
        .filter(|r| r.get::<_, Option<i64>>("id").is_some())
        .map(|r| ScopedEvent {
            event: Event::from_row(r),
            org: r.get("ds_org"),
            project: r.get("ds_project"),
        })
        .collect();
    Ok(ScopedPage { events, xmin, xmax })
}

/// One page of the outbox query.
#[derive(Debug)]
pub struct SafePage {
    /// Committed events from transactions at or after the horizon asked for, by id.
    pub events: Vec<Event>,
    /// The statement snapshot's `xmin`: every transaction below it had finished when the
    /// page was read, so none can add rows below it any more.
    pub horizon: i64,
}

/// Reads committed events written by transactions at or after `horizon`, with ids greater
/// than `after_id`, up to `limit` (only those that call for a reconcile when `wakes_only`);
/// and the snapshot horizon of that same statement.
///
/// # Errors
/// The query failed.
pub async fn read_safe(
    client: &impl GenericClient,
    horizon: i64,
    after_id: i64,
    limit: i64,
    wakes_only: bool,
) -> Result<SafePage, Error> {
    // One statement, one snapshot: the events and the horizon are consistent with each other.
    let rows = client
        .query_typed(
            &format!(
                "WITH snap AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon)
                 SELECT snap.horizon, e.* FROM snap LEFT JOIN LATERAL (
                     SELECT {COLUMNS} FROM datasource_events
                     WHERE xid >= $1::text::xid8 AND id > $2 AND (NOT $4 OR dsreg_event_wakes(type))
                     ORDER BY id LIMIT $3
                 ) e ON true"
            ),
            &typed::params(&[&horizon.to_string(), &after_id, &limit, &wakes_only]),
        )
        .await?;
    let horizon = rows.first().map_or(horizon, |r| r.get::<_, i64>("horizon"));
    let events = rows
        .iter()
        .filter(|r| r.get::<_, Option<i64>>("id").is_some())
        .map(Event::from_row)
        .collect();
    Ok(SafePage { events, horizon })
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

/// The current snapshot's `xmin` and `xmax`.
///
/// # Errors
/// The query failed.
pub async fn snapshot_bounds(client: &impl GenericClient) -> Result<(i64, i64), Error> {
    let row = client
        .query_typed_one(
            "SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint
             FROM pg_current_snapshot() s",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// The newest id taken so far (0 when none): where a watch of only new events starts.
///
/// # Errors
/// The query failed.
pub async fn last_id(client: &impl GenericClient) -> Result<i64, Error> {
    let row = client
        .query_typed_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM datasource_events_id_seq",
            &[],
        )
        .await?;
    Ok(row.get(0))
}
