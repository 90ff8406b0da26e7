//! The `datasource_versions` table and the publish path: [`publish`] and [`rollback`] call the
//! same SQL functions (`dsreg_publish`, `dsreg_rollback`) that SQL publishers use, so every
//! publisher gets the same checks and the same outbox event.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::{Row, Transaction};
use uuid::Uuid;

use super::GenericClient;
use super::typed;
use crate::db::{Error, sqlstate};
use crate::domain::VersionState;

const COLUMNS: &str = "datasource_id, version, config, state, comment, approval_status, created_by, created_at, \
     published_at, published_by";

/// One configuration version of a datasource.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    /// The datasource.
    pub datasource_id: Uuid,
    /// 1, 2, 3, ... per datasource.
    pub version: i32,
    /// The connector configuration (a JSON object).
    pub config: serde_json::Value,
    /// Draft, published or archived.
    pub state: VersionState,
    /// The author's comment.
    pub comment: String,
    /// Approval workflow status.
    pub approval_status: String,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: DateTime<Utc>,
    /// When it was last published.
    pub published_at: Option<DateTime<Utc>>,
    /// By whom.
    pub published_by: Option<String>,
}

impl Version {
    fn from_row(row: &Row) -> Result<Self, Error> {
        Ok(Self {
            datasource_id: row.get("datasource_id"),
            version: row.get("version"),
            config: row.get("config"),
            state: row
                .get::<_, &str>("state")
                .parse()
                .map_err(|e| Error::Invalid(format!("stored version state: {e}")))?,
            comment: row.get("comment"),
            approval_status: row.get("approval_status"),
            created_by: row.get("created_by"),
            created_at: row.get("created_at"),
            published_at: row.get("published_at"),
            published_by: row.get("published_by"),
        })
    }
}

/// Maps the schema's SQLSTATEs (`DSR01`..`DSR06`) to domain errors for `datasource`/`version`.
fn map_error(e: tokio_postgres::Error, datasource: Uuid, version: Option<i32>) -> Error {
    let version = version.unwrap_or_default();
    match sqlstate(&e) {
        Some("DSR01") => Error::DatasourceNotFound(datasource),
        Some("DSR02") => Error::VersionNotFound {
            datasource,
            version,
        },
        Some("DSR03") => Error::DatasourceArchived(datasource),
        Some("DSR04") => Error::NoEarlierVersion(datasource),
        Some("DSR05") => Error::VersionNotDraft {
            datasource,
            version,
            reason: e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_default(),
        },
        Some("DSR06") => Error::NeverPublished {
            datasource,
            version,
        },
        Some("23505") => Error::Conflict(format!(
            "datasource {datasource}: another publish of this datasource committed first"
        )),
        _ => e.into(),
    }
}

/// Adds a draft version (the next number) with `config`.
///
/// # Errors
/// [`Error::DatasourceNotFound`], [`Error::DatasourceArchived`], [`Error::Invalid`] for a
/// config that is not a JSON object or is over 1 MiB.
pub async fn create_draft(
    tx: &Transaction<'_>,
    datasource: Uuid,
    config: &serde_json::Value,
    comment: &str,
) -> Result<Version, Error> {
    // Locking the datasource row serialises version numbering per datasource.
    let status: String = tx
        .query_opt(
            "SELECT status FROM datasources WHERE id = $1 FOR UPDATE",
            &[&datasource],
        )
        .await?
        .ok_or(Error::DatasourceNotFound(datasource))?
        .get(0);
    if status == "archived" {
        return Err(Error::DatasourceArchived(datasource));
    }
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO datasource_versions (datasource_id, version, config, comment, created_by)
                 SELECT $1, coalesce(max(version), 0) + 1, $2, $3, dsreg_actor()
                 FROM datasource_versions WHERE datasource_id = $1
                 RETURNING {COLUMNS}"
            ),
            &[&datasource, config, &comment],
        )
        .await
        .map_err(|e| map_error(e, datasource, None))?;
    Version::from_row(&row)
}

/// Replaces a draft's config and comment.
///
/// # Errors
/// [`Error::VersionNotFound`], [`Error::VersionNotDraft`] for a published or archived version.
pub async fn update_draft(
    tx: &Transaction<'_>,
    datasource: Uuid,
    version: i32,
    config: &serde_json::Value,
    comment: &str,
) -> Result<Version, Error> {
    let row = tx
        .query_opt(
            &format!(
                "UPDATE datasource_versions SET config = $3, comment = $4
                 WHERE datasource_id = $1 AND version = $2 AND state = 'draft'
                 RETURNING {COLUMNS}"
            ),
            &[&datasource, &version, config, &comment],
        )
        .await
        .map_err(|e| map_error(e, datasource, Some(version)))?;
    match row {
        Some(row) => Version::from_row(&row),
        // Not a draft (its comment too is part of what was published), or not there at all.
        None => {
            let existing = get(tx, datasource, version).await?;
            Err(Error::VersionNotDraft {
                datasource,
                version,
                reason: format!(
                    "is {}; only a draft can be edited (create a new version instead)",
                    existing.state.as_str()
                ),
            })
        }
    }
}

/// Reads one version.
///
/// # Errors
/// [`Error::VersionNotFound`].
pub async fn get(
    client: &impl GenericClient,
    datasource: Uuid,
    version: i32,
) -> Result<Version, Error> {
    let row = client
        .query_typed_opt(
            &format!("SELECT {COLUMNS} FROM datasource_versions WHERE datasource_id = $1 AND version = $2"),
            &typed::params(&[&datasource, &version]),
        )
        .await?
        .ok_or(Error::VersionNotFound { datasource, version })?;
    Version::from_row(&row)
}

/// The published version of a datasource, if any.
///
/// # Errors
/// The query failed.
pub async fn published(
    client: &impl GenericClient,
    datasource: Uuid,
) -> Result<Option<Version>, Error> {
    client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM datasource_versions WHERE datasource_id = $1 AND state = 'published'"),
            &[&datasource],
        )
        .await?
        .as_ref()
        .map(Version::from_row)
        .transpose()
}

/// The published and the newest version of each of `datasources` (one version when they are
/// the same), by datasource.
///
/// # Errors
/// The query failed.
pub async fn heads(
    client: &impl GenericClient,
    datasources: &[Uuid],
) -> Result<HashMap<Uuid, Heads>, Error> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM datasource_versions
                 WHERE datasource_id = ANY($1)
                   AND (state = 'published' OR (datasource_id, version) IN (
                        SELECT datasource_id, max(version) FROM datasource_versions
                        WHERE datasource_id = ANY($1) GROUP BY datasource_id))
                 ORDER BY datasource_id, version"
            ),
            &[&datasources],
        )
        .await?;
    let mut heads: HashMap<Uuid, Heads> = HashMap::new();
    for row in &rows {
        let v = Version::from_row(row)?;
        let entry = heads.entry(v.datasource_id).or_default();
        if v.state == VersionState::Published {
            entry.published = Some(v.clone());
        }
        // Rows come oldest first: the last one is the newest.
        entry.newest = Some(v);
    }
    Ok(heads)
}

/// A datasource's published and newest versions.
#[derive(Debug, Clone, Default)]
pub struct Heads {
    /// The published version.
    pub published: Option<Version>,
    /// The newest version (a draft, or the published one).
    pub newest: Option<Version>,
}

/// Every version of a datasource, newest first.
///
/// # Errors
/// The query failed.
pub async fn list(client: &impl GenericClient, datasource: Uuid) -> Result<Vec<Version>, Error> {
    let rows = client
        .query(
            &format!("SELECT {COLUMNS} FROM datasource_versions WHERE datasource_id = $1 ORDER BY version DESC"),
            &[&datasource],
        )
        .await?;
    rows.iter().map(Version::from_row).collect()
}

/// Publishes `version` through `dsreg_publish`; returns the outbox event id, or `None` when
/// it was already the published version (nothing changes).
///
/// # Errors
/// [`Error::DatasourceNotFound`], [`Error::VersionNotFound`], [`Error::DatasourceArchived`],
/// [`Error::Conflict`] when a concurrent publish won under a stricter isolation level.
pub async fn publish(
    tx: &Transaction<'_>,
    datasource: Uuid,
    version: i32,
) -> Result<Option<i64>, Error> {
    let row = tx
        .query_typed_one(
            "SELECT dsreg_publish($1, $2)",
            &typed::params(&[&datasource, &version]),
        )
        .await
        .map_err(|e| map_error(e, datasource, Some(version)))?;
    Ok(row.get(0))
}

/// What a rollback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolledBack {
    /// The version now published.
    pub version: i32,
    /// The `rolled_back` outbox event, or `None` when the target already was the published
    /// version (nothing changed).
    pub event: Option<i64>,
}

/// Rolls back to `to` (or to the previous published version) through `dsreg_rollback`.
///
/// The publish triggers name the event by direction (`published` when the target is newer
/// than the current version, or when none is current); a rollback is a rollback whichever way
/// it goes, so the event this transaction wrote is named `rolled_back` before it commits.
/// Listeners read the type from the table (a notification is only a hint), so they see the
/// committed name.
///
/// # Errors
/// [`Error::NoEarlierVersion`], [`Error::NeverPublished`], and those of [`publish`].
pub async fn rollback(
    tx: &Transaction<'_>,
    datasource: Uuid,
    to: Option<i32>,
) -> Result<RolledBack, Error> {
    // Events this transaction already wrote for the datasource are not this rollback's.
    let before: i64 = tx
        .query_typed_one(
            "SELECT coalesce(max(id), 0) FROM datasource_events \
              WHERE datasource_id = $1 AND xid = pg_current_xact_id()",
            &typed::params(&[&datasource]),
        )
        .await?
        .get(0);
    let row = tx
        .query_typed_one(
            "SELECT dsreg_rollback($1, $2)",
            &typed::params(&[&datasource, &to]),
        )
        .await
        .map_err(|e| map_error(e, datasource, to))?;
    let version: i32 = row.get(0);
    let event = tx
        .query_typed_opt(
            "UPDATE datasource_events SET type = 'rolled_back' \
              WHERE id = (SELECT max(id) FROM datasource_events \
                           WHERE datasource_id = $1 AND xid = pg_current_xact_id() \
                             AND id > $3 AND type IN ('published', 'rolled_back') \
                             AND version = $2) \
             RETURNING id",
            &typed::params(&[&datasource, &version, &before]),
        )
        .await
        .map_err(|e| map_error(e, datasource, Some(version)))?
        .map(|row| row.get(0));
    Ok(RolledBack { version, event })
}
