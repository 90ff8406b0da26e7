//! The sink tables: `datasource_records` (what the `postgres` sink writes) and
//! `datasource_dead_letters` (inputs the transform refused).

use uuid::Uuid;

use super::GenericClient;
use super::typed;
use crate::db::Error;

/// Records and dead letters of many workers, column by column.
#[derive(Debug, Default)]
pub struct SinkColumns<'a> {
    /// Datasource of each record.
    pub datasource_ids: Vec<Uuid>,
    /// Version that produced it.
    pub versions: Vec<i32>,
    /// The writer's fencing epoch.
    pub epochs: Vec<i64>,
    /// The record.
    pub records: Vec<&'a serde_json::Value>,
    /// Dead letters: datasource.
    pub dead_datasource_ids: Vec<Uuid>,
    /// Dead letters: version.
    pub dead_versions: Vec<i32>,
    /// Dead letters: epoch.
    pub dead_epochs: Vec<i64>,
    /// Dead letters: the input record.
    pub dead_records: Vec<&'a serde_json::Value>,
    /// Dead letters: error code.
    pub dead_codes: Vec<&'a str>,
    /// Dead letters: error message.
    pub dead_errors: Vec<&'a str>,
}

/// Appends records and dead letters in one statement (one transaction), fenced: only those of
/// (datasource, epoch) pairs whose lease `instance` still holds under that epoch are written.
/// Returns the pairs that were accepted; the rows of every other pair are refused.
///
/// # Errors
/// The statement failed; nothing was written.
pub async fn append(
    client: &impl GenericClient,
    rows: &SinkColumns<'_>,
    instance: &str,
) -> Result<Vec<(Uuid, i64)>, Error> {
    let accepted = client
        .query_typed(
            &format!(
                "WITH q AS (
                    SELECT DISTINCT * FROM unnest($1::uuid[] || $5::uuid[], $3::bigint[] || $7::bigint[])
                        AS q(id, epoch)
                 ), ok AS (
                    SELECT q.id, q.epoch FROM q JOIN datasource_leases l ON l.datasource_id = q.id AND {}
                 ), dead AS (
                    INSERT INTO datasource_dead_letters (datasource_id, version, epoch, record, error_code, error)
                    SELECT * FROM unnest($5::uuid[], $6::int[], $7::bigint[], $8::jsonb[], $9::text[], $10::text[])
                        AS d(id, version, epoch, record, code, error)
                    WHERE (d.id, d.epoch) IN (SELECT id, epoch FROM ok)
                 ), kept AS (
                    INSERT INTO datasource_records (datasource_id, version, epoch, record)
                    SELECT * FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::jsonb[])
                        AS r(id, version, epoch, record)
                    WHERE (r.id, r.epoch) IN (SELECT id, epoch FROM ok)
                 )
                 SELECT id, epoch FROM ok",
                super::leases::fence("$11", "q.epoch")
            ),
            &typed::params(&[
                &rows.datasource_ids,
                &rows.versions,
                &rows.epochs,
                &rows.records,
                &rows.dead_datasource_ids,
                &rows.dead_versions,
                &rows.dead_epochs,
                &rows.dead_records,
                &rows.dead_codes,
                &rows.dead_errors,
                &instance,
            ]),
        )
        .await?;
    Ok(accepted.iter().map(|r| (r.get(0), r.get(1))).collect())
}
