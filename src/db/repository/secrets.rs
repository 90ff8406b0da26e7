//! The `datasource_secrets` table: ciphertext, nonce and key version per (datasource, name).
//! It stores and returns sealed bytes only; sealing and opening is the `secrets` module's.
//! A put or a delete bumps the datasource's `secrets_generation` and writes a
//! `secret_changed` event (names only), so the worker hot-reloads with the new credentials.

use chrono::{DateTime, Utc};
use tokio_postgres::{Row, Transaction};
use uuid::Uuid;

use super::GenericClient;
use super::events::{self, NewEvent};
use crate::db::Error;

/// A sealed secret as stored.
#[derive(Clone, PartialEq)]
pub struct SealedSecret {
    /// The datasource.
    pub datasource_id: Uuid,
    /// The secret's name.
    pub name: String,
    /// The master key version its data key derives from.
    pub key_version: i32,
    /// The 96-bit nonce.
    pub nonce: Vec<u8>,
    /// The ciphertext with its tag.
    pub ciphertext: Vec<u8>,
    /// The row's revision (bound into the associated data).
    pub revision: i64,
    /// A short fingerprint for operators (not derived from the plaintext alone).
    pub fingerprint: String,
}

impl std::fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSecret")
            .field("datasource_id", &self.datasource_id)
            .field("name", &self.name)
            .field("key_version", &self.key_version)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

/// What operators may see of a secret: never its value.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretMeta {
    /// The secret's name.
    pub name: String,
    /// The key version in use.
    pub key_version: i32,
    /// The row's revision.
    pub revision: i64,
    /// Short fingerprint.
    pub fingerprint: String,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: DateTime<Utc>,
    /// Who replaced it last.
    pub rotated_by: Option<String>,
    /// When.
    pub rotated_at: Option<DateTime<Utc>>,
}

fn sealed_from_row(row: &Row) -> SealedSecret {
    SealedSecret {
        datasource_id: row.get("datasource_id"),
        name: row.get("name"),
        key_version: row.get("key_version"),
        nonce: row.get("nonce"),
        ciphertext: row.get("ciphertext"),
        revision: row.get("revision"),
        fingerprint: row.get("fingerprint"),
    }
}

/// The revision the next write of (datasource, name) will carry: sealing binds it into the
/// associated data, so it is known before the write.
///
/// # Errors
/// The query failed.
pub async fn next_revision(
    tx: &Transaction<'_>,
    datasource: Uuid,
    name: &str,
) -> Result<i64, Error> {
    let row = tx
        .query_opt(
            "SELECT revision FROM datasource_secrets WHERE datasource_id = $1 AND name = $2 FOR UPDATE",
            &[&datasource, &name],
        )
        .await?;
    Ok(row.map_or(1, |r| r.get::<_, i64>(0) + 1))
}

/// Creates or replaces a sealed secret (its `revision` must come from [`next_revision`] in the
/// same transaction) and writes `secret_changed`.
///
/// # Errors
/// [`Error::DatasourceNotFound`], [`Error::Invalid`] for a bad name or oversized value.
pub async fn put(tx: &Transaction<'_>, secret: &SealedSecret) -> Result<(), Error> {
    tx.execute(
        "INSERT INTO datasource_secrets (datasource_id, name, key_version, nonce, ciphertext, revision, fingerprint, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, dsreg_actor())
         ON CONFLICT (datasource_id, name) DO UPDATE SET
            key_version = excluded.key_version, nonce = excluded.nonce, ciphertext = excluded.ciphertext,
            revision = excluded.revision, fingerprint = excluded.fingerprint,
            rotated_by = dsreg_actor(), rotated_at = now()",
        &[
            &secret.datasource_id,
            &secret.name,
            &secret.key_version,
            &secret.nonce,
            &secret.ciphertext,
            &secret.revision,
            &secret.fingerprint,
        ],
    )
    .await
    .map_err(|e| match crate::db::sqlstate(&e) {
        Some("23503") => Error::DatasourceNotFound(secret.datasource_id),
        _ => e.into(),
    })?;
    secret_changed(tx, secret.datasource_id, &secret.name, "put").await
}

/// Deletes a secret; returns whether it existed (a `secret_changed` event when it did).
///
/// # Errors
/// The query failed.
pub async fn delete(tx: &Transaction<'_>, datasource: Uuid, name: &str) -> Result<bool, Error> {
    let deleted = tx
        .execute(
            "DELETE FROM datasource_secrets WHERE datasource_id = $1 AND name = $2",
            &[&datasource, &name],
        )
        .await?
        > 0;
    if deleted {
        secret_changed(tx, datasource, name, "delete").await?;
    }
    Ok(deleted)
}

async fn secret_changed(
    tx: &Transaction<'_>,
    datasource: Uuid,
    name: &str,
    op: &str,
) -> Result<(), Error> {
    events::append(
        tx,
        &[NewEvent {
            at: None,
            datasource_id: Some(datasource),
            kind: "secret_changed".into(),
            version: None,
            payload: serde_json::json!({ "name": name, "operation": op }),
        }],
    )
    .await
}

/// Every sealed secret of a datasource (for the worker that needs them).
///
/// # Errors
/// The query failed.
pub async fn sealed(
    client: &impl GenericClient,
    datasource: Uuid,
) -> Result<Vec<SealedSecret>, Error> {
    let rows = client
        .query(
            "SELECT datasource_id, name, key_version, nonce, ciphertext, revision, fingerprint
             FROM datasource_secrets WHERE datasource_id = $1 ORDER BY name",
            &[&datasource],
        )
        .await?;
    Ok(rows.iter().map(sealed_from_row).collect())
}

/// Names and metadata of a datasource's secrets.
///
/// # Errors
/// The query failed.
pub async fn list(client: &impl GenericClient, datasource: Uuid) -> Result<Vec<SecretMeta>, Error> {
    let rows = client
        .query(
            "SELECT name, key_version, revision, fingerprint, created_by, created_at, rotated_by, rotated_at
             FROM datasource_secrets WHERE datasource_id = $1 ORDER BY name",
            &[&datasource],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| SecretMeta {
            name: r.get("name"),
            key_version: r.get("key_version"),
            revision: r.get("revision"),
            fingerprint: r.get("fingerprint"),
            created_by: r.get("created_by"),
            created_at: r.get("created_at"),
            rotated_by: r.get("rotated_by"),
            rotated_at: r.get("rotated_at"),
        })
        .collect())
}
