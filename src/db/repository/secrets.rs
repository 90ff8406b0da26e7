//! The `datasource_secrets` table: ciphertext, nonce and key version per (datasource, name).
//! It stores and returns sealed bytes only; sealing and opening is the `secrets` module's.
//! A put or a delete bumps the datasource's `secrets_generation` and writes a
//! `secret_changed` event (names only), so the worker hot-reloads with the new credentials.

use chrono::{DateTime, Utc};
use tokio_postgres::{Row, Transaction};
use uuid::Uuid;

use super::GenericClient;
use super::events::{self, NewEvent};
use super::typed;
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

/// Bumps the datasource's `secrets_generation` (the running worker's key includes it, so the
/// supervisor rebuilds the worker with the new set) and writes `secret_changed`.
async fn secret_changed(
    tx: &Transaction<'_>,
    datasource: Uuid,
    name: &str,
    op: &str,
) -> Result<(), Error> {
    tx.execute(
        "UPDATE datasource_state SET secrets_generation = secrets_generation + 1
         WHERE datasource_id = $1",
        &[&datasource],
    )
    .await?;
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

/// The sealed secrets of each of `datasources`, in one query, by datasource then name.
///
/// # Errors
/// The query failed.
pub async fn sealed_many(
    client: &impl GenericClient,
    datasources: &[Uuid],
) -> Result<Vec<SealedSecret>, Error> {
    let rows = client
        .query(
            "SELECT datasource_id, name, key_version, nonce, ciphertext, revision, fingerprint
             FROM datasource_secrets WHERE datasource_id = ANY($1) ORDER BY datasource_id, name",
            &[&datasources],
        )
        .await?;
    Ok(rows.iter().map(sealed_from_row).collect())
}

/// The names of the secrets of each of `datasources`, sorted, by datasource.
///
/// # Errors
/// The query failed.
pub async fn names(
    client: &impl GenericClient,
    datasources: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, Vec<String>>, Error> {
    let rows = client
        .query(
            "SELECT datasource_id, name FROM datasource_secrets
             WHERE datasource_id = ANY($1) ORDER BY datasource_id, name",
            &[&datasources],
        )
        .await?;
    let mut names: std::collections::HashMap<Uuid, Vec<String>> = Default::default();
    for row in &rows {
        names.entry(row.get(0)).or_default().push(row.get(1));
    }
    Ok(names)
}

/// Names and metadata of a datasource's secrets.
///
/// # Errors
/// The query failed.
pub async fn list(client: &impl GenericClient, datasource: Uuid) -> Result<Vec<SecretMeta>, Error> {
    let rows = client
        .query_typed(
            "SELECT name, key_version, revision, fingerprint, created_by, created_at, rotated_by, rotated_at
             FROM datasource_secrets WHERE datasource_id = $1 ORDER BY name",
            &typed::params(&[&datasource]),
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

// Key rotation: rewrap re-seals the same value under another key, so unlike [`put`], its
// [`rewrite`] writes no `secret_changed` event: workers have nothing to reload.

/// A sealed row with its tenant, as rewrap and the key check read it.
#[derive(Clone)]
pub struct TenantSealed {
    /// The datasource.
    pub datasource_id: Uuid,
    /// Tenant: organisation.
    pub org: String,
    /// Tenant: project.
    pub project: String,
    /// The secret's name.
    pub name: String,
    /// The key version it is sealed under.
    pub key_version: i32,
    /// The nonce.
    pub nonce: Vec<u8>,
    /// Ciphertext and tag.
    pub ciphertext: Vec<u8>,
    /// The row's revision.
    pub revision: i64,
}

impl std::fmt::Debug for TenantSealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSealed")
            .field("datasource_id", &self.datasource_id)
            .field("name", &self.name)
            .field("key_version", &self.key_version)
            .field("revision", &self.revision)
            .finish_non_exhaustive()
    }
}

/// A row re-sealed by rewrap: it replaces the row at `revision - 1`.
#[derive(Clone)]
pub struct Resealed {
    /// The datasource.
    pub datasource_id: Uuid,
    /// The secret's name.
    pub name: String,
    /// The new key version.
    pub key_version: i32,
    /// The new nonce.
    pub nonce: Vec<u8>,
    /// The new ciphertext.
    pub ciphertext: Vec<u8>,
    /// The new revision (the locked row's plus one; bound into the new associated data).
    pub revision: i64,
}

const TENANT_SEALED: &str = "s.datasource_id, d.org, d.project, s.name, s.key_version, s.nonce, \
     s.ciphertext, s.revision";

fn tenant_sealed(row: &Row) -> TenantSealed {
    TenantSealed {
        datasource_id: row.get("datasource_id"),
        org: row.get("org"),
        project: row.get("project"),
        name: row.get("name"),
        key_version: row.get("key_version"),
        nonce: row.get("nonce"),
        ciphertext: row.get("ciphertext"),
        revision: row.get("revision"),
    }
}

/// Locks up to `limit` rows not on `active`, after `(datasource, name)` in primary-key order,
/// skipping rows other transactions hold (a concurrent put re-seals them under the active key
/// anyway). The cursor makes one run visit each row once, so a row that fails to open does not
/// come back in the next batch.
///
/// # Errors
/// The query failed.
pub async fn lock_batch(
    tx: &Transaction<'_>,
    active: i32,
    after: (Uuid, &str),
    limit: i64,
) -> Result<Vec<TenantSealed>, Error> {
    let rows = tx
        .query(
            // The batch is picked from the secrets' primary key alone, then joined: joined in
            // one query, the planner may drive from `datasources` and rescan every datasource
            // before the cursor (seconds per batch at 100,000 rows).
            &format!(
                "WITH s AS MATERIALIZED (
                     SELECT datasource_id, name, key_version, nonce, ciphertext, revision
                     FROM datasource_secrets
                     WHERE (datasource_id, name) > ($2, $3) AND key_version <> $1
                     ORDER BY datasource_id, name
                     LIMIT $4
                     FOR UPDATE SKIP LOCKED)
                 SELECT {TENANT_SEALED}
                 FROM s JOIN datasources d ON d.id = s.datasource_id
                 ORDER BY s.datasource_id, s.name"
            ),
            &[&active, &after.0, &after.1, &limit],
        )
        .await?;
    Ok(rows.iter().map(tenant_sealed).collect())
}

/// Lets this transaction's commit return before its WAL reaches disk. For rewrap only: a batch
/// lost to a server crash leaves its rows on the old key, which still opens them and which a
/// later run picks up; [`flush`] makes every earlier commit durable before rewrap reports done.
///
/// # Errors
/// The statement failed.
pub async fn relax_commit(tx: &Transaction<'_>) -> Result<(), Error> {
    Ok(tx
        .batch_execute("SET LOCAL synchronous_commit = off")
        .await?)
}

/// Commits one synchronous transaction that has an id, which flushes the WAL of every
/// transaction committed before it (those of [`relax_commit`] included).
///
/// # Errors
/// The statements failed.
pub async fn flush(client: &mut tokio_postgres::Client) -> Result<(), Error> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id()")
        .await?;
    Ok(tx.commit().await?)
}

/// Writes re-sealed rows (each only if still at `revision - 1`); no event. Returns how many
/// rows were written.
///
/// # Errors
/// The query failed.
pub async fn rewrite(tx: &Transaction<'_>, rows: &[Resealed]) -> Result<u64, Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.datasource_id).collect();
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    let versions: Vec<i32> = rows.iter().map(|r| r.key_version).collect();
    let nonces: Vec<&[u8]> = rows.iter().map(|r| r.nonce.as_slice()).collect();
    let ciphertexts: Vec<&[u8]> = rows.iter().map(|r| r.ciphertext.as_slice()).collect();
    let revisions: Vec<i64> = rows.iter().map(|r| r.revision).collect();
    Ok(tx
        .execute(
            "UPDATE datasource_secrets AS s
             SET key_version = u.key_version, nonce = u.nonce, ciphertext = u.ciphertext,
                 revision = u.revision
             FROM unnest($1::uuid[], $2::text[], $3::int[], $4::bytea[], $5::bytea[], $6::bigint[])
                  AS u(datasource_id, name, key_version, nonce, ciphertext, revision)
             WHERE s.datasource_id = u.datasource_id AND s.name = u.name
               AND s.revision = u.revision - 1",
            &[&ids, &names, &versions, &nonces, &ciphertexts, &revisions],
        )
        .await?)
}

/// How many rows are not on `version`.
///
/// # Errors
/// The query failed.
pub async fn count_not_on(client: &impl GenericClient, version: i32) -> Result<i64, Error> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM datasource_secrets WHERE key_version <> $1",
            &[&version],
        )
        .await?
        .get(0))
}

/// Rows per key version, ascending.
///
/// # Errors
/// The query failed.
pub async fn count_by_version(client: &impl GenericClient) -> Result<Vec<(i32, i64)>, Error> {
    let rows = client
        .query(
            "SELECT key_version, count(*) FROM datasource_secrets
             GROUP BY key_version ORDER BY key_version",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// One row sealed under `version`, if any (for the start-up key check).
///
/// # Errors
/// The query failed.
pub async fn sample(
    client: &impl GenericClient,
    version: i32,
) -> Result<Option<TenantSealed>, Error> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {TENANT_SEALED}
                 FROM datasource_secrets s JOIN datasources d ON d.id = s.datasource_id
                 WHERE s.key_version = $1
                 LIMIT 1"
            ),
            &[&version],
        )
        .await?;
    Ok(row.as_ref().map(tenant_sealed))
}
