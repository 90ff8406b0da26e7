//! The `datasource_file_sync` table: for each datasource last written from a datasource file,
//! that file, the hash of the datasource's definition in it, and the datasource's published
//! version and revision right after the write. `files` compares them with the datasource now
//! to tell a file edit from a database change, and both at once (a conflict).

use super::typed;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::{Row, Transaction};
use uuid::Uuid;

use super::GenericClient;
use super::datasources::Datasource;
use crate::db::Error;

const COLUMNS: &str =
    "s.datasource_id, s.path, s.content_hash, s.synced_version, s.synced_revision, s.synced_at";

/// What the last sync from a file left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRow {
    /// The datasource.
    pub datasource_id: Uuid,
    /// The file (an absolute path).
    pub path: String,
    /// The hash of the datasource's definition in that file.
    pub content_hash: String,
    /// The datasource's published version right after.
    pub synced_version: Option<i32>,
    /// The datasource's revision (etag) right after.
    pub synced_revision: i64,
    /// When.
    pub synced_at: DateTime<Utc>,
}

impl SyncRow {
    fn from_row(row: &Row) -> Self {
        Self {
            datasource_id: row.get("datasource_id"),
            path: row.get("path"),
            content_hash: row.get("content_hash"),
            synced_version: row.get("synced_version"),
            synced_revision: row.get("synced_revision"),
            synced_at: row.get("synced_at"),
        }
    }
}

/// One datasource just written from a file.
#[derive(Debug, Clone)]
pub struct Synced<'a> {
    /// The datasource.
    pub datasource_id: Uuid,
    /// The file.
    pub path: &'a str,
    /// The hash of its definition.
    pub content_hash: &'a str,
}

/// The sync rows of `datasources`, by datasource.
///
/// # Errors
/// The query failed.
pub async fn get_many(
    client: &impl GenericClient,
    datasources: &[Uuid],
) -> Result<HashMap<Uuid, SyncRow>, Error> {
    let rows = client
        .query_typed(
            &format!(
                "SELECT {COLUMNS} FROM datasource_file_sync s WHERE s.datasource_id = ANY($1)"
            ),
            &typed::params(&[&datasources]),
        )
        .await?;
    Ok(rows
        .iter()
        .map(SyncRow::from_row)
        .map(|r| (r.datasource_id, r))
        .collect())
}

/// The live (not archived) datasources last written from a file under one of `folders`
/// (absolute paths, no trailing slash) or from one of `files`, with their sync rows.
///
/// # Errors
/// The query failed.
pub async fn live_under(
    client: &impl GenericClient,
    folders: &[String],
    files: &[String],
) -> Result<Vec<(SyncRow, Datasource)>, Error> {
    let prefixes: Vec<String> = folders
        .iter()
        .map(|f| {
            format!(
                "{}/%",
                f.replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            )
        })
        .collect();
    let rows = client
        .query_typed(
            &format!(
                "SELECT {COLUMNS}, {DATASOURCE} FROM datasource_file_sync s
                 JOIN datasources d ON d.id = s.datasource_id AND d.status <> 'archived'
                 WHERE s.path LIKE ANY($1) OR s.path = ANY($2)
                 ORDER BY s.path, s.datasource_id",
                DATASOURCE = super::datasources::COLUMNS,
            ),
            &typed::params(&[&prefixes, &files]),
        )
        .await?;
    rows.iter()
        .map(|r| Ok((SyncRow::from_row(r), Datasource::from_row(r)?)))
        .collect()
}

/// Records `synced` datasources as just written from their files, with the published
/// version and revision each has now (in this transaction), in one statement.
///
/// # Errors
/// The query failed.
pub async fn record(tx: &Transaction<'_>, synced: &[Synced<'_>]) -> Result<(), Error> {
    if synced.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = synced.iter().map(|s| s.datasource_id).collect();
    let paths: Vec<&str> = synced.iter().map(|s| s.path).collect();
    let hashes: Vec<&str> = synced.iter().map(|s| s.content_hash).collect();
    tx.execute_typed(
        "INSERT INTO datasource_file_sync (datasource_id, path, content_hash, synced_version, synced_revision)
         SELECT d.id, u.path, u.hash, d.current_version, d.revision
         FROM unnest($1::uuid[], $2::text[], $3::text[]) AS u(id, path, hash)
         JOIN datasources d ON d.id = u.id
         ON CONFLICT (datasource_id) DO UPDATE SET
            path = excluded.path, content_hash = excluded.content_hash,
            synced_version = excluded.synced_version, synced_revision = excluded.synced_revision,
            synced_at = now()",
        &typed::params(&[&ids, &paths, &hashes]),)
    .await?;
    Ok(())
}

/// Forgets the file of `datasources` (pruned: no file defines them any more).
///
/// # Errors
/// The query failed.
pub async fn forget(tx: &Transaction<'_>, datasources: &[Uuid]) -> Result<(), Error> {
    if datasources.is_empty() {
        return Ok(());
    }
    tx.execute_typed(
        "DELETE FROM datasource_file_sync WHERE datasource_id = ANY($1)",
        &typed::params(&[&datasources]),
    )
    .await?;
    Ok(())
}
