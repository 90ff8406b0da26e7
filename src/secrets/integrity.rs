//! Integrity failures on record: a sealed row that does not open (tampered, copied from
//! another row, put back over a newer write, sealed under another key) or that needs a key
//! version that is not loaded is written to `audit_log`, where security teams look, as actor
//! `system` with the datasource, the secret's name and the reason class; never a value or
//! key material. At most one row per datasource per interval, so a worker retrying a bad row
//! cannot flood the log; the next row counts the failures it stands for.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::Error;
use crate::db::repository::audit::{self, AuditEntry, Outcome};
use crate::db::repository::datasources::Datasource;

/// The actor of integrity audit rows.
pub const ACTOR: &str = "system";
/// The action of integrity audit rows.
pub const ACTION: &str = "secret.integrity_failure";
/// The default: at most one row per datasource a minute.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);

/// The reason class of an integrity failure, or `None` for other errors.
pub fn reason_class(error: &Error) -> Option<&'static str> {
    match error {
        Error::Decrypt { key_version, .. } if *key_version <= 0 => Some("invalid_key_version"),
        Error::Decrypt { .. } => Some("decrypt_failed"),
        Error::RowKeyNotLoaded { .. } => Some("key_version_not_loaded"),
        _ => None,
    }
}

/// Per-datasource rate limiting of integrity audit rows.
#[derive(Debug)]
pub struct IntegrityAudit {
    interval: Duration,
    /// Per datasource: when its last row was written, and failures since then not written.
    last: Mutex<HashMap<Uuid, (Instant, u64)>>,
}

impl IntegrityAudit {
    /// At most one row per datasource per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Records `error` for `ds` if it is an integrity failure and the datasource's interval
    /// has passed (else counts it for the next row). Best effort: a row that cannot be
    /// written is logged, and the caller's error stands either way.
    pub async fn record(&self, client: &impl GenericClient, ds: &Datasource, error: &Error) {
        let Some(class) = reason_class(error) else {
            return;
        };
        let (name, key_version) = match error {
            Error::Decrypt {
                name, key_version, ..
            } => (name.as_str(), *key_version),
            Error::RowKeyNotLoaded {
                name, key_version, ..
            } => (name.as_str(), i64::from(*key_version)),
            _ => return,
        };
        let suppressed = {
            let Ok(mut last) = self.last.lock() else {
                return;
            };
            let now = Instant::now();
            last.retain(|_, (at, _)| now.duration_since(*at) < self.interval * 2);
            match last.get_mut(&ds.id) {
                Some((at, count)) if now.duration_since(*at) < self.interval => {
                    *count += 1;
                    return;
                }
                Some((at, count)) => {
                    *at = now;
                    std::mem::take(count)
                }
                None => {
                    last.insert(ds.id, (now, 0));
                    0
                }
            }
        };
        tracing::warn!(datasource = %ds.id, secret = name, reason = class, "a sealed secret failed its integrity check");
        let entry = AuditEntry {
            actor: ACTOR.to_owned(),
            action: ACTION.to_owned(),
            resource: format!("datasource/{}", ds.id),
            org: Some(ds.org.clone()),
            project: Some(ds.project.clone()),
            version: None,
            outcome: Outcome::Error,
            reason: Some(class.to_owned()),
            diff: Some(serde_json::json!({
                "secret": name,
                "key_version": key_version,
                "suppressed_since_last": suppressed,
            })),
            trace_id: None,
        };
        if let Err(e) = audit::record(client, &entry).await {
            tracing::warn!(datasource = %ds.id, error = %e, "writing the integrity audit row failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classed_and_other_errors_are_not_integrity_failures() {
        let decrypt = |key_version| Error::Decrypt {
            datasource: Uuid::nil(),
            name: "x".into(),
            key_version,
        };
        assert_eq!(reason_class(&decrypt(1)), Some("decrypt_failed"));
        assert_eq!(reason_class(&decrypt(-1)), Some("invalid_key_version"));
        assert_eq!(
            reason_class(&Error::RowKeyNotLoaded {
                datasource: Uuid::nil(),
                name: "x".into(),
                key_version: 3
            }),
            Some("key_version_not_loaded")
        );
        assert_eq!(reason_class(&Error::InvalidName("x".into())), None);
    }
}
