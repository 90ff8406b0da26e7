//! [`Secrets`]: the operations the API, the workers and `dsreg keys …` call. Writes run in
//! the caller's transaction (opened with `repository::begin`, so events carry the actor);
//! rewrap opens its own, one per batch.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_postgres::{GenericClient, Transaction};
use uuid::Uuid;

use super::cipher::{self, Binding};
use super::integrity::{self, IntegrityAudit};
use super::{Error, KeyProvider, MAX_SECRET_BYTES, SecretString, validate_name};
use crate::db::repository::secrets::{
    self as repo, Resealed, SealedSecret, SecretMeta, TenantSealed,
};
use crate::db::repository::{self, WriteContext, datasources};

/// The actor recorded on rewrap's transactions.
pub const REWRAP_ACTOR: &str = "dsreg keys rewrap";

/// Seals, opens and re-seals secrets with the keys of one [`KeyProvider`]. Cheap to clone.
#[derive(Clone)]
pub struct Secrets {
    keys: Arc<dyn KeyProvider>,
    integrity: Arc<IntegrityAudit>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("versions", &self.keys.versions())
            .field("active", &self.keys.active_version())
            .finish()
    }
}

/// The outcome of [`Secrets::rewrap`].
#[derive(Debug)]
pub struct RewrapReport {
    /// The version rows were moved to.
    pub active_version: u32,
    /// Rows on other versions when the run started.
    pub total: u64,
    /// Rows re-sealed under the active version.
    pub rewrapped: u64,
    /// Rows that could not be opened (left as they are; the run went on past them).
    pub failed: Vec<RewrapFailure>,
    /// Whether the progress callback stopped the run early (a later run continues).
    pub stopped: bool,
    /// Rows still not on the active version at the end: failed ones, ones locked by a
    /// concurrent writer, ones written under an old key meanwhile. Zero means done.
    pub remaining: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// A row rewrap could not re-seal.
#[derive(Debug)]
pub struct RewrapFailure {
    /// The datasource.
    pub datasource: Uuid,
    /// The secret's name.
    pub name: String,
    /// Why ([`Error::Decrypt`] or [`Error::RowKeyNotLoaded`]).
    pub error: Error,
}

/// Rows per master key version, for `dsreg keys status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// The version.
    pub key_version: u32,
    /// Rows sealed under it.
    pub secrets: i64,
    /// Whether new writes use it.
    pub active: bool,
    /// Whether the provider has it (rows on a version it lacks cannot be opened).
    pub loaded: bool,
}

fn version_u32(v: i32) -> Option<u32> {
    u32::try_from(v).ok().filter(|v| *v > 0)
}

fn version_i32(v: u32) -> Result<i32, Error> {
    i32::try_from(v).map_err(|_| Error::UnknownKeyVersion(v))
}

impl Secrets {
    /// Uses the keys of `keys`.
    pub fn new(keys: Arc<dyn KeyProvider>) -> Self {
        Self {
            keys,
            integrity: Arc::new(IntegrityAudit::new(integrity::DEFAULT_INTERVAL)),
        }
    }

    /// Audits integrity failures at most once per datasource per `interval` (a minute by
    /// default).
    #[must_use]
    pub fn with_integrity_audit_interval(mut self, interval: Duration) -> Self {
        self.integrity = Arc::new(IntegrityAudit::new(interval));
        self
    }

    /// The key provider.
    pub fn keys(&self) -> &Arc<dyn KeyProvider> {
        &self.keys
    }

    /// Creates or replaces secret `name` of `datasource` with `value`, sealed under the active
    /// key at the row's next revision, and writes `secret_changed` (name only) so the worker
    /// reloads. Commit `tx` to make both visible.
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::TooLarge`], [`Error::UnknownKeyVersion`] when the active
    /// key is missing, [`Error::Db`] (`DatasourceNotFound`, …).
    #[tracing::instrument(name = "secrets.put", skip_all, fields(datasource = %datasource, name = %name))]
    pub async fn put(
        &self,
        tx: &Transaction<'_>,
        datasource: Uuid,
        name: &str,
        value: &SecretString,
    ) -> Result<SecretMeta, Error> {
        validate_name(name)?;
        if value.len() > MAX_SECRET_BYTES {
            return Err(Error::TooLarge {
                bytes: value.len(),
                limit: MAX_SECRET_BYTES,
            });
        }
        let key = self.keys.key(self.keys.active_version())?;
        let key_version = version_i32(key.version())?;
        let ds = datasources::get(tx, datasource).await?;
        let revision = repo::next_revision(tx, datasource, name).await?;
        let binding = Binding {
            org: &ds.org,
            project: &ds.project,
            datasource,
            name,
            revision,
        };
        let sealed = cipher::seal(&key, &binding, value.expose().as_bytes())?;
        let fingerprint = cipher::fingerprint(&key, &binding, value.expose().as_bytes());
        repo::put(
            tx,
            &SealedSecret {
                datasource_id: datasource,
                name: name.to_owned(),
                key_version,
                nonce: sealed.nonce.to_vec(),
                ciphertext: sealed.ciphertext,
                revision,
                fingerprint,
            },
        )
        .await?;
        tracing::debug!(key_version, revision, "secret sealed");
        repo::list(tx, datasource)
            .await?
            .into_iter()
            .find(|m| m.name == name)
            // The row was written in this transaction a moment ago.
            .ok_or(Error::Db(crate::db::Error::Invalid(format!(
                "secret {name:?} vanished after its write"
            ))))
    }

    /// Deletes secret `name` of `datasource`; returns whether it existed (and then writes
    /// `secret_changed`).
    ///
    /// # Errors
    /// [`Error::InvalidName`], [`Error::Db`].
    #[tracing::instrument(name = "secrets.delete", skip_all, fields(datasource = %datasource, name = %name))]
    pub async fn delete(
        &self,
        tx: &Transaction<'_>,
        datasource: Uuid,
        name: &str,
    ) -> Result<bool, Error> {
        validate_name(name)?;
        Ok(repo::delete(tx, datasource, name).await?)
    }

    /// Names and metadata of the secrets of `datasource` (never values).
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn list(
        &self,
        client: &impl GenericClient,
        datasource: Uuid,
    ) -> Result<Vec<SecretMeta>, Error> {
        Ok(repo::list(client, datasource).await?)
    }

    /// Opens every secret of `datasource`, for the worker or test run that needs them. All or
    /// nothing: the first row that does not open fails the call, and is audited as an
    /// integrity failure (see [`integrity`](super::integrity)).
    ///
    /// # Errors
    /// [`Error::Decrypt`] naming the secret; [`Error::RowKeyNotLoaded`] naming the secret and
    /// the version it needs; [`Error::Db`] (`DatasourceNotFound`, …).
    #[tracing::instrument(name = "secrets.open_all", skip_all, fields(datasource = %datasource))]
    pub async fn open_all(
        &self,
        client: &impl GenericClient,
        datasource: Uuid,
    ) -> Result<BTreeMap<String, SecretString>, Error> {
        let ds = datasources::get(client, datasource).await?;
        let mut out = BTreeMap::new();
        for row in repo::sealed(client, datasource).await? {
            let opened = self.open_row(
                &ds.org,
                &ds.project,
                datasource,
                &row.name,
                row.key_version,
                row.revision,
                &row.nonce,
                &row.ciphertext,
            );
            match opened {
                Ok(value) => out.insert(row.name, value),
                Err(e) => {
                    self.integrity.record(client, &ds, &e).await;
                    return Err(e);
                }
            };
        }
        Ok(out)
    }

    /// Opens every secret of each of `datasources` (id, org, project) with one query. A
    /// datasource with a secret that does not open is opened again alone by
    /// [`Secrets::open_all`], which records the failure for the integrity audit and returns it.
    #[tracing::instrument(name = "secrets.open_many", skip_all, fields(datasources = datasources.len()))]
    pub async fn open_many(
        &self,
        client: &impl GenericClient,
        datasources: &[(Uuid, &str, &str)],
    ) -> std::collections::HashMap<Uuid, Result<BTreeMap<String, SecretString>, Error>> {
        let ids: Vec<Uuid> = datasources.iter().map(|(id, _, _)| *id).collect();
        // A query that failed leaves every datasource to be opened alone (and to say why).
        let sealed = repo::sealed_many(client, &ids).await.unwrap_or_default();
        let tenants: std::collections::HashMap<Uuid, (&str, &str)> = datasources
            .iter()
            .map(|(id, org, project)| (*id, (*org, *project)))
            .collect();
        let found: std::collections::HashSet<Uuid> =
            sealed.iter().map(|row| row.datasource_id).collect();
        // A datasource with no row here is opened alone: none stored, or the query failed.
        let mut opened: std::collections::HashMap<Uuid, Option<BTreeMap<String, SecretString>>> =
            ids.iter()
                .map(|id| (*id, found.contains(id).then(BTreeMap::new)))
                .collect();
        for row in sealed {
            let (Some(&(org, project)), Some(Some(out))) = (
                tenants.get(&row.datasource_id),
                opened.get_mut(&row.datasource_id),
            ) else {
                continue;
            };
            let value = self.open_row(
                org,
                project,
                row.datasource_id,
                &row.name,
                row.key_version,
                row.revision,
                &row.nonce,
                &row.ciphertext,
            );
            match value {
                Ok(value) => {
                    out.insert(row.name, value);
                }
                // Dropped here (zeroized), opened again alone below.
                Err(_) => {
                    opened.insert(row.datasource_id, None);
                }
            }
        }
        let mut out = std::collections::HashMap::with_capacity(opened.len());
        for (id, secrets) in opened {
            let result = match secrets {
                Some(secrets) => Ok(secrets),
                None => self.open_all(client, id).await,
            };
            out.insert(id, result);
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn open_row(
        &self,
        org: &str,
        project: &str,
        datasource: Uuid,
        name: &str,
        key_version: i32,
        revision: i64,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<SecretString, Error> {
        // The schema keeps versions positive; a row that says otherwise does not open.
        let version = version_u32(key_version).ok_or_else(|| Error::Decrypt {
            datasource,
            name: name.to_owned(),
            key_version: i64::from(key_version),
        })?;
        let key = self.keys.key(version).map_err(|e| match e {
            Error::UnknownKeyVersion(_) => Error::RowKeyNotLoaded {
                datasource,
                name: name.to_owned(),
                key_version: version,
            },
            other => other,
        })?;
        let binding = Binding {
            org,
            project,
            datasource,
            name,
            revision,
        };
        cipher::open(&key, &binding, nonce, ciphertext)
    }

    fn open_tenant_row(&self, row: &TenantSealed) -> Result<SecretString, Error> {
        self.open_row(
            &row.org,
            &row.project,
            row.datasource_id,
            &row.name,
            row.key_version,
            row.revision,
            &row.nonce,
            &row.ciphertext,
        )
    }

    /// Re-seals every row not on the active key version under it, `batch_size` rows per
    /// transaction (rows locked `FOR UPDATE SKIP LOCKED`, revision bumped, no `secret_changed`
    /// event: the values do not change). Batches commit without waiting for the disk (a lost
    /// one leaves its rows on the old key, still valid); one synchronous commit at the end
    /// makes them durable before the report is returned. Online: workers keep opening rows meanwhile (they
    /// see the old or the new row, both open while the old key is loaded), and a concurrent
    /// put waits for the batch holding its row. After each committed batch `progress(done,
    /// total)` is called; `ControlFlow::Break` stops the run there. Resumable: a stopped or
    /// interrupted run loses at most the uncommitted batch, and the next run selects what is
    /// still on old versions. A row that does not open is reported in
    /// [`RewrapReport::failed`] and left as it is.
    ///
    /// Runs the crypto on the calling task, which suits the CLI; keep `batch_size` moderate
    /// (a few hundred to a few thousand) when calling it from a serving runtime.
    ///
    /// # Errors
    /// [`Error::UnknownKeyVersion`] when the active key is missing; [`Error::Db`] (batches
    /// committed before it stay done).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future rolls back the open batch only.
    #[tracing::instrument(name = "secrets.rewrap", skip_all, fields(batch_size = batch_size))]
    pub async fn rewrap(
        &self,
        pool: &Pool,
        batch_size: usize,
        mut progress: impl FnMut(u64, u64) -> ControlFlow<()>,
    ) -> Result<RewrapReport, Error> {
        let started = Instant::now();
        let active = self.keys.active_version();
        let active_key = self.keys.key(active)?;
        let active_i32 = version_i32(active)?;
        let limit = i64::try_from(batch_size.max(1)).unwrap_or(i64::MAX);
        let total = {
            let client = pool.get().await?;
            repo::count_not_on(&**client, active_i32).await?
        };
        let mut report = RewrapReport {
            active_version: active,
            total: u64::try_from(total).unwrap_or(0),
            rewrapped: 0,
            failed: Vec::new(),
            stopped: false,
            remaining: 0,
            elapsed: Duration::ZERO,
        };
        let mut cursor = (Uuid::nil(), String::new());
        let mut done = 0u64;
        loop {
            let mut client = pool.get().await?;
            let tx = repository::begin(&mut client, &WriteContext::actor(REWRAP_ACTOR)).await?;
            repo::relax_commit(&tx).await?;
            let rows = repo::lock_batch(&tx, active_i32, (cursor.0, &cursor.1), limit).await?;
            let Some(last) = rows.last() else {
                break;
            };
            cursor = (last.datasource_id, last.name.clone());
            let mut resealed = Vec::with_capacity(rows.len());
            for row in &rows {
                let opened = self.open_tenant_row(row).and_then(|value| {
                    let binding = Binding {
                        org: &row.org,
                        project: &row.project,
                        datasource: row.datasource_id,
                        name: &row.name,
                        revision: row.revision + 1,
                    };
                    cipher::seal(&active_key, &binding, value.expose().as_bytes())
                });
                match opened {
                    Ok(sealed) => resealed.push(Resealed {
                        datasource_id: row.datasource_id,
                        name: row.name.clone(),
                        key_version: active_i32,
                        nonce: sealed.nonce.to_vec(),
                        ciphertext: sealed.ciphertext,
                        revision: row.revision + 1,
                    }),
                    Err(error) => report.failed.push(RewrapFailure {
                        datasource: row.datasource_id,
                        name: row.name.clone(),
                        error,
                    }),
                }
            }
            let written = repo::rewrite(&tx, &resealed).await?;
            tx.commit().await?;
            report.rewrapped += written;
            done += rows.len() as u64;
            tracing::debug!(rows = rows.len(), written, done, "rewrap batch committed");
            if progress(done, report.total.max(done)).is_break() {
                report.stopped = true;
                break;
            }
        }
        let mut client = pool.get().await?;
        // Batches commit asynchronously; this makes them all durable before the report says
        // they are done (and an operator retires the old key).
        repo::flush(&mut client).await?;
        report.remaining =
            u64::try_from(repo::count_not_on(&**client, active_i32).await?).unwrap_or(0);
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Rows per key version, with every loaded version listed (zero rows included).
    ///
    /// # Errors
    /// [`Error::Db`].
    pub async fn status(&self, client: &impl GenericClient) -> Result<Vec<KeyStatus>, Error> {
        let active = self.keys.active_version();
        let loaded = self.keys.versions();
        let mut by_version: BTreeMap<u32, i64> = loaded.iter().map(|v| (*v, 0)).collect();
        for (version, count) in repo::count_by_version(client).await? {
            if let Some(v) = version_u32(version) {
                by_version.insert(v, count);
            }
        }
        Ok(by_version
            .into_iter()
            .map(|(key_version, secrets)| KeyStatus {
                key_version,
                secrets,
                active: key_version == active,
                loaded: loaded.contains(&key_version),
            })
            .collect())
    }

    /// The start-up check: the active key is loaded, every version some row uses is loaded,
    /// and one row per version opens (a wrong key under a right version number shows here,
    /// not at the first worker start).
    ///
    /// # Errors
    /// [`Error::UnknownKeyVersion`] naming a missing version; [`Error::Decrypt`] naming the
    /// row that did not open; [`Error::Db`].
    pub async fn check(&self, client: &impl GenericClient) -> Result<(), Error> {
        self.keys.key(self.keys.active_version())?;
        for status in self.status(client).await? {
            if status.secrets == 0 {
                continue;
            }
            if !status.loaded {
                return Err(Error::UnknownKeyVersion(status.key_version));
            }
            if let Some(row) = repo::sample(client, version_i32(status.key_version)?).await? {
                self.open_tenant_row(&row)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_whether_a_retry_can_help() {
        assert!(Error::Db(crate::db::Error::Unavailable("down".into())).is_retryable());
        assert!(!Error::UnknownKeyVersion(3).is_retryable());
        assert!(
            !Error::Decrypt {
                datasource: Uuid::nil(),
                name: "x".into(),
                key_version: 1
            }
            .is_retryable()
        );
    }

    #[test]
    fn a_row_with_a_negative_key_version_is_reported_as_it_is() {
        let keys = crate::secrets::EnvKeyProvider::parse(
            "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            None,
        )
        .unwrap();
        let secrets = Secrets::new(Arc::new(keys));
        let ds = Uuid::from_u128(7);
        let err = secrets
            .open_row("o", "p", ds, "token", -1, 1, &[0; 12], &[0; 32])
            .unwrap_err();
        assert!(
            matches!(&err, Error::Decrypt { key_version: -1, name, datasource } if name == "token" && *datasource == ds),
            "{err:?}"
        );
        assert!(err.to_string().contains("key version -1"), "{err}");
    }

    #[test]
    fn a_row_under_a_version_not_loaded_names_the_datasource_and_secret() {
        let keys = crate::secrets::EnvKeyProvider::parse(
            "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            None,
        )
        .unwrap();
        let secrets = Secrets::new(Arc::new(keys));
        let ds = Uuid::from_u128(7);
        let err = secrets
            .open_row("o", "p", ds, "token", 4, 1, &[0; 12], &[0; 32])
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains(&ds.to_string())
                && message.contains("\"token\"")
                && message.contains("version 4"),
            "{message}"
        );
    }

    #[test]
    fn secret_names_follow_the_table_rule() {
        for ok in ["a", "db.password", "API_KEY-2", &"x".repeat(128)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "with space", "slash/y", "ünï", &"x".repeat(129)] {
            assert!(
                matches!(validate_name(bad), Err(Error::InvalidName(_))),
                "{bad}"
            );
        }
    }
}
