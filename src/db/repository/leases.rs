//! The `dsreg_instances` and `datasource_leases` tables: which registry instances are alive,
//! and which one runs each datasource's worker.
//!
//! A lease has an owner and a fencing epoch, and holds while its owner is live: each instance
//! records until when its leases hold (`dsreg_instances.leases_until`), and one renewal
//! extends that single row, however many leases the instance holds. Claiming a free lease, or
//! one whose owner is no longer live, raises its epoch; only the owner releases it. An
//! instance that was not live when it renews gets none of its old leases back: they are let
//! go, to be claimed again under new epochs. Writes made on a worker's behalf carry its epoch
//! and are checked against the lease in the same statement ([`fence`]), so an instance that
//! lost a lease (frozen, cut off) cannot write as its owner any more.

use super::typed;
use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_postgres::{Client, Transaction};
use uuid::Uuid;

use super::events::{self, NewEvent};
use super::{GenericClient, WriteContext};
use crate::db::Error;

/// The condition on a `dsreg_instances` row that it is live: its leases hold now.
const LIVE: &str = "stopped_at IS NULL AND leases_until > now()";

/// The SQL condition that instance `instance` (an SQL expression) is live, looked up by its id:
/// per row a primary-key probe, where [`held_by`]'s `IN` may be planned as a scan of every live
/// instance's leases.
pub fn is_live(instance: &str) -> String {
    format!("EXISTS (SELECT 1 FROM dsreg_instances WHERE id = {instance} AND {LIVE})")
}

/// The ids of the live instances, as a subquery.
fn live_ids() -> String {
    format!("SELECT id FROM dsreg_instances WHERE {LIVE}")
}

/// The condition that the lease row `l` (`datasource_leases`) is held by the SQL expression
/// `owner`: it owns the row and is live.
pub fn held_by(owner: &str) -> String {
    format!("l.owner = {owner} AND l.owner IN ({})", live_ids())
}

/// The condition a fenced write puts on the lease row `l`: held by the SQL expression `owner`
/// (as [`held_by`]) under `epoch`. The repositories write it into their statements.
pub fn fence(owner: &str, epoch: &str) -> String {
    format!("l.epoch = {epoch} AND {}", held_by(owner))
}

/// Of the (datasource, epoch) `pairs`, those whose lease `owner` holds now under that epoch.
///
/// # Errors
/// The query failed.
pub async fn holding(
    client: &impl GenericClient,
    owner: &str,
    pairs: &[(Uuid, i64)],
) -> Result<Vec<(Uuid, i64)>, Error> {
    let ids: Vec<Uuid> = pairs.iter().map(|(id, _)| *id).collect();
    let epochs: Vec<i64> = pairs.iter().map(|(_, e)| *e).collect();
    let rows = client
        .query_typed(
            &format!(
                "SELECT q.id, q.epoch FROM unnest($2::uuid[], $3::bigint[]) AS q(id, epoch)
                 JOIN datasource_leases l ON l.datasource_id = q.id AND {}",
                fence("$1", "q.epoch")
            ),
            &typed::params(&[&owner, &ids, &epochs]),
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// What an instance says of itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Its id (unique per process).
    pub id: String,
    /// Where its gRPC API is served.
    pub address: String,
    /// Its software version.
    pub version: String,
}

/// A registered instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Its id.
    pub id: String,
    /// Where its gRPC API is served.
    pub address: String,
    /// Its software version.
    pub version: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub heartbeat_at: DateTime<Utc>,
    /// When it stopped cleanly, if it did.
    pub stopped_at: Option<DateTime<Utc>>,
    /// Whether it counts as alive (its leases hold, it has not stopped).
    pub live: bool,
    /// Leases it holds (none unless it is live).
    pub leases: i64,
}

fn millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// Registers `me` (again, after a restart of the same id) and records a heartbeat. It is not
/// live, and holds no lease, until its first renewal.
///
/// # Errors
/// The statement failed.
pub async fn register(client: &impl GenericClient, me: &InstanceInfo) -> Result<(), Error> {
    client
        .execute_typed(
            "INSERT INTO dsreg_instances (id, address, version) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET address = $2, version = $3, heartbeat_at = now(),
                                            stopped_at = NULL",
            &typed::params(&[&me.id, &me.address, &me.version]),
        )
        .await?;
    Ok(())
}

/// Deletes the rows of instances that stopped, or went silent, more than `retention` ago
/// (never a live one); returns how many went. Their leases are already free: a lease holds
/// only while its owner is live.
///
/// # Errors
/// The statement failed.
pub async fn prune_dead(client: &impl GenericClient, retention: Duration) -> Result<u64, Error> {
    Ok(client
        .execute_typed(
            &format!(
                "DELETE FROM dsreg_instances
                 WHERE NOT ({LIVE})
                   AND greatest(stopped_at, heartbeat_at)
                       < now() - $1::bigint * interval '1 millisecond'"
            ),
            &typed::params(&[&millis(retention)]),
        )
        .await?)
}

/// What one renewal saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Renewed {
    /// The leases `me` still holds, with their epochs.
    pub held: Vec<(Uuid, i64)>,
    /// The live instances (as [`live_instances`]), sorted.
    pub live: Vec<String>,
    /// Live datasources whose lease no one holds (new, released, or expired).
    pub free: i64,
}

/// How long an instance registered as `id` stays live without another renewal: `None` when
/// it is not live (never renewed, stopped cleanly, or not renewed within its lease time).
///
/// # Errors
/// The query failed.
pub async fn live_for(client: &impl GenericClient, id: &str) -> Result<Option<Duration>, Error> {
    let row = client
        .query_typed_opt(
            &format!(
                "SELECT (extract(epoch FROM leases_until - now()) * 1000)::bigint
                 FROM dsreg_instances WHERE id = $1 AND {LIVE}"
            ),
            &typed::params(&[&id]),
        )
        .await?;
    Ok(row.map(|r| Duration::from_millis(u64::try_from(r.get::<_, i64>(0)).unwrap_or(0))))
}

/// The live instances and the unheld datasources, as rows tagged `live` and `free` (the tail
/// of [`renew`]'s statement, and all of [`look`]'s; `$1` is the instance asking).
fn seen_sql() -> String {
    format!(
        "SELECT 'live', NULL::uuid, NULL::bigint, id FROM dsreg_instances WHERE id = $1 OR ({LIVE})
         UNION ALL
         SELECT 'free', NULL, count(*), NULL
         FROM datasources d LEFT JOIN datasource_leases l ON l.datasource_id = d.id
         WHERE d.status <> 'archived' AND (l.owner IS NULL OR l.owner NOT IN ({}))",
        live_ids()
    )
}

fn seen(rows: &[tokio_postgres::Row]) -> Renewed {
    let mut seen = Renewed::default();
    for row in rows {
        match row.get::<_, &str>(0) {
            "held" => seen.held.push((row.get(1), row.get(2))),
            "live" => seen.live.push(row.get(3)),
            _ => seen.free = row.get(2),
        }
    }
    seen.live.sort_unstable();
    seen.live.dedup();
    seen
}

/// One statement per renewal, one row written however many leases `me` holds: its heartbeat,
/// its leases extended to hold `ttl` from now, the leases it holds with their epochs, the
/// live instances and the number of datasources no one holds.
///
/// An instance that was not live (never renewed, or not within its lease time: frozen, cut
/// off) gets none of its old leases back: they are let go in the same statement, to be claimed
/// again under new epochs, and `held` is empty.
///
/// # Errors
/// The statement failed; nothing was renewed.
pub async fn renew(
    client: &impl GenericClient,
    me: &InstanceInfo,
    ttl: Duration,
) -> Result<Renewed, Error> {
    let rows = client
        .query_typed(
            &format!(
                "WITH was AS (
                    SELECT coalesce((SELECT {LIVE} FROM dsreg_instances WHERE id = $1), false) AS live
                 ), beat AS (
                    INSERT INTO dsreg_instances AS i (id, address, version, leases_until)
                    VALUES ($1, $3, $4, now() + $2::bigint * interval '1 millisecond')
                    ON CONFLICT (id) DO UPDATE
                        SET heartbeat_at = now(), stopped_at = NULL, leases_until = excluded.leases_until
                 ), lapsed AS (
                    -- Locked in datasource order, as claims and releases lock: never a deadlock.
                    SELECT datasource_id FROM datasource_leases
                    WHERE owner = $1 AND NOT (SELECT live FROM was)
                    ORDER BY datasource_id FOR UPDATE
                 ), let_go AS (
                    UPDATE datasource_leases l SET owner = NULL
                    FROM lapsed WHERE l.datasource_id = lapsed.datasource_id
                 )
                 SELECT 'held', datasource_id, epoch, NULL FROM datasource_leases
                 WHERE owner = $1 AND (SELECT live FROM was)
                 UNION ALL
                 {}",
                seen_sql()
            ),
            &typed::params(&[&me.id, &millis(ttl), &me.address, &me.version]),)
        .await?;
    Ok(seen(&rows))
}

/// Between renewals, a read: the live instances and the number of datasources no one holds
/// (`held` is left empty).
///
/// # Errors
/// The query failed.
pub async fn look(client: &impl GenericClient, me: &str) -> Result<Renewed, Error> {
    let rows = client
        .query_typed(&seen_sql(), &typed::params(&[&me]))
        .await?;
    Ok(seen(&rows))
}

/// The instances alive now: their leases hold, they have not stopped. Sorted by id.
///
/// # Errors
/// The query failed.
pub async fn live_instances(client: &impl GenericClient) -> Result<Vec<String>, Error> {
    let rows = client
        .query_typed(&format!("{} ORDER BY id", live_ids()), &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Every registered instance, live or not (those stopped or silent for more than a day are
/// left out), with the number of leases each holds.
///
/// # Errors
/// The query failed.
pub async fn instances(client: &impl GenericClient) -> Result<Vec<Instance>, Error> {
    let rows = client
        .query_typed(
            &format!(
                "SELECT i.id, i.address, i.version, i.started_at, i.heartbeat_at, i.stopped_at,
                        {LIVE},
                        CASE WHEN {LIVE}
                             THEN (SELECT count(*) FROM datasource_leases l WHERE l.owner = i.id)
                             ELSE 0 END
                 FROM dsreg_instances i
                 WHERE i.heartbeat_at > now() - interval '1 day'
                 ORDER BY i.started_at, i.id"
            ),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Instance {
            id: r.get(0),
            address: r.get(1),
            version: r.get(2),
            started_at: r.get(3),
            heartbeat_at: r.get(4),
            stopped_at: r.get(5),
            live: r.get(6),
            leases: r.get(7),
        })
        .collect())
}

/// A live datasource and its lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    /// The datasource.
    pub datasource_id: Uuid,
    /// The lease's owner, while it is live.
    pub owner: Option<String>,
}

/// Every live (not archived) datasource and who holds its lease now.
///
/// # Errors
/// The query failed.
pub async fn standings(client: &impl GenericClient) -> Result<Vec<Standing>, Error> {
    let rows = client
        .query_typed(
            &format!(
                "SELECT d.id, CASE WHEN l.owner IN ({}) THEN l.owner END
                 FROM datasources d LEFT JOIN datasource_leases l ON l.datasource_id = d.id
                 WHERE d.status <> 'archived'",
                live_ids()
            ),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Standing {
            datasource_id: r.get(0),
            owner: r.get(1),
        })
        .collect())
}

/// A lease just claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The datasource.
    pub datasource_id: Uuid,
    /// The new epoch.
    pub epoch: i64,
    /// Who held it before, if anyone did.
    pub previous: Option<String>,
}

/// Opens a transaction whose events name instance `me` as their actor.
async fn begin<'a>(client: &'a mut Client, me: &str) -> Result<Transaction<'a>, Error> {
    super::begin(client, &WriteContext::actor(format!("dsreg:{me}"))).await
}

/// Claims, for `me`, the leases of `ids` that are free or whose owner is no longer live (and
/// whose datasource still exists), each under a new epoch, with a `lease_acquired` event
/// each, in one transaction. They hold as long as `me`'s other leases do: until its renewals
/// stop. Leases another live instance holds are left alone; a datasource whose row a writer
/// holds locked (a publish in progress) is skipped rather than waited for, to be claimed at
/// the next look; and an instance that is not live itself (not renewed within its lease time)
/// claims nothing. Returns what was claimed.
///
/// # Errors
/// The statements failed; nothing was claimed.
pub async fn claim(client: &mut Client, me: &str, ids: &[Uuid]) -> Result<Vec<Claimed>, Error> {
    let tx = begin(client, me).await?;
    let rows = tx
        .query_typed(
            &format!(
                "WITH before AS (
                    SELECT datasource_id, owner FROM datasource_leases WHERE datasource_id = ANY($2)
                 ), claimed AS (
                    INSERT INTO datasource_leases AS l (datasource_id, owner, epoch, acquired_at)
                    SELECT d.id, $1, 1, now()
                    FROM datasources d
                    WHERE d.id = ANY($2)
                      AND EXISTS (SELECT 1 FROM dsreg_instances WHERE id = $1 AND {LIVE})
                    -- Rows are locked in one order by every instance: concurrent claims wait,
                    -- never deadlock. A datasource locked for a write (a publish holds it
                    -- FOR UPDATE until it commits) is not waited for: the claim would hold up
                    -- the reconcile loop for as long as the publisher's transaction stays open.
                    ORDER BY d.id
                    FOR KEY SHARE OF d SKIP LOCKED
                    ON CONFLICT (datasource_id) DO UPDATE
                        SET owner = $1, epoch = l.epoch + 1, acquired_at = now()
                        WHERE l.owner IS NULL OR l.owner NOT IN ({})
                    RETURNING l.datasource_id, l.epoch
                 )
                 SELECT c.datasource_id, c.epoch, b.owner
                 FROM claimed c LEFT JOIN before b USING (datasource_id)",
                live_ids()
            ),
            &typed::params(&[&me, &ids]),
        )
        .await?;
    let claimed: Vec<Claimed> = rows
        .iter()
        .map(|r| Claimed {
            datasource_id: r.get(0),
            epoch: r.get(1),
            previous: r.get(2),
        })
        .collect();
    let moves: Vec<NewEvent> = claimed
        .iter()
        .map(|c| NewEvent {
            at: None,
            datasource_id: Some(c.datasource_id),
            kind: "lease_acquired".into(),
            version: None,
            payload: json!({ "instance": me, "epoch": c.epoch, "from": c.previous }),
        })
        .collect();
    events::append(&tx, &moves).await?;
    tx.commit().await?;
    Ok(claimed)
}

/// Why leases are given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Moving to another instance.
    Rebalance,
    /// The datasource is archived or gone.
    Retired,
    /// The instance is stopping.
    Shutdown,
}

impl Release {
    fn as_str(self) -> &'static str {
        match self {
            Self::Rebalance => "rebalance",
            Self::Retired => "retired",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Gives up `me`'s leases of `moves` (datasource, the instance it moves to: a rebalance; none:
/// `otherwise`), each with a `lease_released` event (which wakes every instance, so the next
/// owner claims it at once), in one transaction. Leases `me` no longer holds are skipped.
/// Returns the datasources released.
///
/// # Errors
/// The statements failed; nothing was released.
pub async fn release(
    client: &mut Client,
    me: &str,
    moves: &[(Uuid, Option<String>)],
    otherwise: Release,
) -> Result<Vec<Uuid>, Error> {
    let tx = begin(client, me).await?;
    let released = release_in(&tx, me, moves, otherwise).await?;
    tx.commit().await?;
    Ok(released)
}

async fn release_in(
    tx: &Transaction<'_>,
    me: &str,
    moves: &[(Uuid, Option<String>)],
    otherwise: Release,
) -> Result<Vec<Uuid>, Error> {
    let ids: Vec<Uuid> = moves.iter().map(|(id, _)| *id).collect();
    let rows = tx
        .query_typed(
            "WITH mine AS (
                SELECT datasource_id FROM datasource_leases
                WHERE owner = $1 AND datasource_id = ANY($2)
                ORDER BY datasource_id FOR UPDATE
             )
             UPDATE datasource_leases l SET owner = NULL
             FROM mine WHERE l.datasource_id = mine.datasource_id
             RETURNING l.datasource_id, l.epoch",
            &typed::params(&[&me, &ids]),
        )
        .await?;
    let released: Vec<(Uuid, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // A shutdown releases every lease at once: look the targets up, never scan for them.
    let targets: HashMap<&Uuid, &Option<String>> = moves.iter().map(|(id, to)| (id, to)).collect();
    let moves: Vec<NewEvent> = released
        .iter()
        .map(|(id, epoch)| {
            let to = targets.get(id).and_then(|to| (*to).clone());
            let why = if to.is_some() { Release::Rebalance } else { otherwise };
            NewEvent {
                at: None,
                datasource_id: Some(*id),
                kind: "lease_released".into(),
                version: None,
                payload: json!({ "instance": me, "epoch": epoch, "to": to, "reason": why.as_str() }),
            }
        })
        .collect();
    events::append(tx, &moves).await?;
    Ok(released.into_iter().map(|(id, _)| id).collect())
}

/// `me` stops: every lease it holds is released (as [`release`]) and it is marked stopped, in
/// one transaction.
///
/// # Errors
/// The statements failed.
pub async fn sign_off(client: &mut Client, me: &str) -> Result<usize, Error> {
    let tx = begin(client, me).await?;
    let held: Vec<(Uuid, Option<String>)> = tx
        .query_typed(
            "SELECT datasource_id FROM datasource_leases WHERE owner = $1",
            &typed::params(&[&me]),
        )
        .await?
        .iter()
        .map(|r| (r.get(0), None))
        .collect();
    let released = release_in(&tx, me, &held, Release::Shutdown).await?;
    tx.execute_typed(
        "UPDATE dsreg_instances SET stopped_at = now(), leases_until = '-infinity' WHERE id = $1",
        &typed::params(&[&me]),
    )
    .await?;
    tx.commit().await?;
    Ok(released.len())
}
