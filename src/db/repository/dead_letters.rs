//! Reading, replaying, purging and pruning `datasource_dead_letters` (the sink appends them,
//! in [`super::records`]). A replay settles its rows in the caller's transaction: what passed
//! is written to `datasource_records` and deleted, what failed keeps its row with the new
//! reason, so a replay committed once is never applied twice.

use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use uuid::Uuid;

use super::{GenericClient, typed};
use crate::db::Error;

const COLUMNS: &str = "d.id, d.datasource_id, d.version, d.record, d.error_code, d.error, d.at, d.replays, d.replayed_at";

/// One dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its id (ascending in arrival order).
    pub id: i64,
    /// The datasource whose worker refused it.
    pub datasource_id: Uuid,
    /// The version that refused it last.
    pub version: i32,
    /// The input record.
    pub record: serde_json::Value,
    /// Short machine-readable reason (`script_error`, `nul_character`, …).
    pub code: String,
    /// The reason.
    pub error: String,
    /// When it was first refused.
    pub at: DateTime<Utc>,
    /// Replays that refused it again.
    pub replays: i32,
    /// When it was last replayed.
    pub replayed_at: Option<DateTime<Utc>>,
}

impl DeadLetter {
    fn from_row(row: &Row) -> Self {
        Self {
            id: row.get(0),
            datasource_id: row.get(1),
            version: row.get(2),
            record: row.get(3),
            code: row.get(4),
            error: row.get(5),
            at: row.get(6),
            replays: row.get(7),
            replayed_at: row.get(8),
        }
    }
}

/// Which dead letters a list, replay or purge concerns.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this datasource.
    pub datasource_id: Option<Uuid>,
    /// Only datasources of this organisation.
    pub org: Option<String>,
    /// Only datasources of these projects.
    pub projects: Option<Vec<String>>,
    /// Refused at or after.
    pub since: Option<DateTime<Utc>>,
    /// Refused before.
    pub until: Option<DateTime<Utc>>,
    /// Only this reason code.
    pub code: Option<String>,
    /// Only these ids (empty: any).
    pub ids: Vec<i64>,
    /// Only ids below this one (the previous page's last).
    pub before_id: Option<i64>,
    /// At most this many.
    pub limit: i64,
}

impl Filter {
    /// The parameters of [`WHERE`] (`$1`–`$8`) and the limit (`$9`).
    fn params(&self) -> [&dyn typed::Param; 9] {
        [
            &self.datasource_id,
            &self.org,
            &self.projects,
            &self.since,
            &self.until,
            &self.code,
            &self.ids,
            &self.before_id,
            &self.limit,
        ]
    }
}

/// The `WHERE` clause of `filter` over `datasource_dead_letters d JOIN datasources s`, with its
/// parameters numbered from 1.
const WHERE: &str = "($1::uuid IS NULL OR d.datasource_id = $1)
     AND ($2::text IS NULL OR s.org = $2)
     AND ($3::text[] IS NULL OR s.project = ANY($3))
     AND ($4::timestamptz IS NULL OR d.at >= $4)
     AND ($5::timestamptz IS NULL OR d.at < $5)
     AND ($6::text IS NULL OR d.error_code = $6)
     AND (cardinality($7::bigint[]) = 0 OR d.id = ANY($7))
     AND ($8::bigint IS NULL OR d.id < $8)";

/// Dead letters matching `filter`, newest first.
///
/// # Errors
/// The query failed.
pub async fn list(client: &impl GenericClient, filter: &Filter) -> Result<Vec<DeadLetter>, Error> {
    let rows = client
        .query_typed(
            &format!(
                "SELECT {COLUMNS} FROM datasource_dead_letters d
                 JOIN datasources s ON s.id = d.datasource_id
                 WHERE {WHERE} ORDER BY d.id DESC LIMIT $9"
            ),
            &typed::params(&filter.params()),
        )
        .await?;
    Ok(rows.iter().map(DeadLetter::from_row).collect())
}

/// Dead letters matching `filter`, oldest first, locked for a replay in `client`'s transaction;
/// rows another replay holds are skipped (that replay settles them).
///
/// # Errors
/// The query failed.
pub async fn lock_for_replay(
    client: &impl GenericClient,
    filter: &Filter,
) -> Result<Vec<DeadLetter>, Error> {
    let rows = client
        .query_typed(
            &format!(
                "SELECT {COLUMNS} FROM datasource_dead_letters d
                 JOIN datasources s ON s.id = d.datasource_id
                 WHERE {WHERE} ORDER BY d.id LIMIT $9
                 FOR UPDATE OF d SKIP LOCKED"
            ),
            &typed::params(&filter.params()),
        )
        .await?;
    Ok(rows.iter().map(DeadLetter::from_row).collect())
}

/// A replay's outcome for rows locked by [`lock_for_replay`].
#[derive(Debug, Default)]
pub struct Settled<'a> {
    /// Rows whose record passed: deleted.
    pub passed: Vec<i64>,
    /// The records they became, written to `datasource_records`.
    pub records: Vec<&'a serde_json::Value>,
    /// Rows refused again: their ids, codes and reasons.
    pub failed: Vec<(i64, &'a str, &'a str)>,
}

/// Settles a replay of `datasource_id` through `version` in one statement: records written
/// (under the datasource's current lease epoch), passed rows deleted, failed rows updated.
///
/// # Errors
/// The statement failed; nothing was changed.
pub async fn settle(
    client: &impl GenericClient,
    datasource_id: Uuid,
    version: i32,
    settled: &Settled<'_>,
) -> Result<(), Error> {
    let failed_ids: Vec<i64> = settled.failed.iter().map(|f| f.0).collect();
    let failed_codes: Vec<&str> = settled.failed.iter().map(|f| f.1).collect();
    let failed_errors: Vec<&str> = settled.failed.iter().map(|f| f.2).collect();
    client
        .execute_typed(
            "WITH gone AS (
                DELETE FROM datasource_dead_letters WHERE datasource_id = $1 AND id = ANY($3)
             ), kept AS (
                INSERT INTO datasource_records (datasource_id, version, epoch, record)
                SELECT $1, $2,
                       coalesce((SELECT epoch FROM datasource_leases WHERE datasource_id = $1), 0),
                       r
                FROM unnest($4::jsonb[]) AS r
             )
             UPDATE datasource_dead_letters d
                SET version = $2, error_code = f.code, error = f.error,
                    replays = d.replays + 1, replayed_at = now()
               FROM unnest($5::bigint[], $6::text[], $7::text[]) AS f(id, code, error)
              WHERE d.datasource_id = $1 AND d.id = f.id",
            &typed::params(&[
                &datasource_id,
                &version,
                &settled.passed,
                &settled.records,
                &failed_ids,
                &failed_codes,
                &failed_errors,
            ]),
        )
        .await?;
    Ok(())
}

/// Deletes the dead letters matching `filter` (its limit and page position ignored); returns
/// how many.
///
/// # Errors
/// The statement failed.
pub async fn purge(client: &impl GenericClient, filter: &Filter) -> Result<u64, Error> {
    let deleted = client
        .execute_typed(
            &format!(
                "DELETE FROM datasource_dead_letters d USING datasources s
                 WHERE s.id = d.datasource_id AND {WHERE}"
            ),
            &typed::params(&[
                &filter.datasource_id,
                &filter.org,
                &filter.projects,
                &filter.since,
                &filter.until,
                &filter.code,
                &filter.ids,
                &None::<i64>,
            ]),
        )
        .await?;
    Ok(deleted)
}

/// Deletes dead letters older than `max_age`, and each datasource's beyond its newest
/// `max_per_datasource`; returns how many. `None` leaves that bound off.
///
/// # Errors
/// The statement failed.
pub async fn prune(
    client: &impl GenericClient,
    max_age: Option<std::time::Duration>,
    max_per_datasource: Option<i64>,
) -> Result<u64, Error> {
    let mut pruned = 0;
    if let Some(age) = max_age {
        let seconds = age.as_secs_f64();
        pruned += client
            .execute_typed(
                "DELETE FROM datasource_dead_letters
                 WHERE at < now() - make_interval(secs => $1::float8)",
                &typed::params(&[&seconds]),
            )
            .await?;
    }
    if let Some(keep) = max_per_datasource {
        pruned += client
            .execute_typed(
                "DELETE FROM datasource_dead_letters d USING (
                    SELECT id FROM (
                        SELECT id, row_number() OVER (PARTITION BY datasource_id ORDER BY id DESC) AS n
                        FROM datasource_dead_letters
                    ) ranked WHERE n > $1
                 ) old WHERE d.id = old.id",
                &typed::params(&[&keep]),
            )
            .await?;
    }
    Ok(pruned)
}

/// The `limit` datasources with the most dead letters, with their counts, most first, and the
/// number of dead letters of all the others together.
///
/// # Errors
/// The query failed.
pub async fn top_counts(
    client: &impl GenericClient,
    limit: i64,
) -> Result<(Vec<(Uuid, i64)>, i64), Error> {
    let rows = client
        .query_typed(
            "SELECT datasource_id, count(*) AS n FROM datasource_dead_letters
             GROUP BY datasource_id ORDER BY n DESC, datasource_id",
            &typed::params(&[]),
        )
        .await?;
    let mut top = Vec::new();
    let mut rest = 0;
    for (i, row) in rows.iter().enumerate() {
        let pair: (Uuid, i64) = (row.get(0), row.get(1));
        if i64::try_from(i).unwrap_or(i64::MAX) < limit {
            top.push(pair);
        } else {
            rest += pair.1;
        }
    }
    Ok((top, rest))
}
