//! The `datasource_records` table: what the `postgres` sink writes.

use uuid::Uuid;

use super::GenericClient;
use crate::db::Error;

/// Records of many workers, column by column.
#[derive(Debug, Default)]
pub struct RecordColumns<'a> {
    /// Datasource of each record.
    pub datasource_ids: Vec<Uuid>,
    /// Version that produced it.
    pub versions: Vec<i32>,
    /// The writer's fencing epoch.
    pub epochs: Vec<i64>,
    /// The record.
    pub records: Vec<&'a serde_json::Value>,
}

/// Appends records in one statement.
///
/// # Errors
/// The statement failed; nothing was written.
pub async fn append(client: &impl GenericClient, rows: &RecordColumns<'_>) -> Result<(), Error> {
    client
        .execute(
            "INSERT INTO datasource_records (datasource_id, version, epoch, record)
             SELECT * FROM unnest($1::uuid[], $2::int[], $3::bigint[], $4::jsonb[])",
            &[
                &rows.datasource_ids,
                &rows.versions,
                &rows.epochs,
                &rows.records,
            ],
        )
        .await?;
    Ok(())
}
