//! One request's context: who calls (the [`Principal`] the auth layer attached), its trace
//! context, peer and deadline; tenant checks; and the audit rows of mutating calls, written in
//! the same transaction as the change.

use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use tokio_postgres::Transaction;
use tonic::{Request, Status};

use super::principal::Principal;
use super::status;
use crate::db::repository::audit::{self, AuditContext, AuditEntry, Outcome};
use crate::db::repository::datasources::Datasource;
use crate::db::repository::{self as repo, WriteContext};

/// The longest a lifecycle call waits for its worker.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// How long a lifecycle call waits when the caller sets no deadline.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// One call's context.
#[derive(Debug, Clone)]
pub struct Call {
    /// The caller.
    pub principal: Principal,
    /// The method (`PublishVersion`).
    pub method: &'static str,
    /// The incoming W3C `traceparent`, when well formed, in the form this service writes.
    pub incoming_trace: Option<String>,
    /// The context of the RPC span the call runs in, when spans are exported.
    pub span: Option<opentelemetry::trace::SpanContext>,
    /// The peer's address.
    pub peer: Option<String>,
    /// The caller's deadline (`grpc-timeout`), if set.
    pub timeout: Option<Duration>,
}

impl Call {
    /// The context of `request` to `method`.
    ///
    /// # Errors
    /// UNAUTHENTICATED when no principal is attached (the auth layer did not run).
    pub fn of<T>(request: &Request<T>, method: &'static str) -> Result<Self, Status> {
        let principal = request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated(super::auth::UNAUTHENTICATED_MESSAGE))?;
        let metadata = request.metadata();
        let incoming_trace = metadata
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::telemetry::normalized_traceparent);
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        Ok(Self {
            principal,
            method,
            incoming_trace,
            span: crate::telemetry::current_span_context(),
            peer: request.remote_addr().map(|a| a.to_string()),
            timeout,
        })
    }

    /// How long a lifecycle call may wait: a little under the caller's deadline, at most
    /// [`MAX_WAIT`].
    pub fn wait_budget(&self) -> Duration {
        self.timeout
            .map_or(DEFAULT_WAIT, |t| {
                t.saturating_sub(t / 10 + Duration::from_millis(5))
            })
            .min(MAX_WAIT)
    }

    /// The writer context for the triggers: actor and trace context.
    pub fn write_ctx(&self) -> WriteContext {
        WriteContext {
            actor: self.principal.subject.clone(),
            traceparent: self.traceparent(),
        }
    }

    /// The call's W3C trace context: its RPC span's when spans are exported (so the events
    /// the call writes continue from it), else the caller's. Worked out when asked for: most
    /// calls write nothing.
    pub fn traceparent(&self) -> Option<String> {
        self.span
            .as_ref()
            .map(crate::telemetry::traceparent)
            .or_else(|| self.incoming_trace.clone())
    }

    /// The trace id of the call's trace context.
    pub fn trace_id(&self) -> Option<String> {
        self.traceparent()
            .as_deref()
            .and_then(|t| t.split('-').nth(1))
            .map(str::to_owned)
    }

    /// Whether the caller may see `datasource`.
    pub fn sees(&self, datasource: &Datasource) -> bool {
        self.principal
            .tenant
            .allows(&datasource.org, &datasource.project)
    }
}

/// Parses a `grpc-timeout` header (`100m`, `5S`, ...).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// What an audit row says of a call, filled in as the call goes.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// `datasource/<id>` or another resource name.
    pub resource: String,
    /// Tenant organisation.
    pub org: Option<String>,
    /// Tenant project.
    pub project: Option<String>,
    /// The version concerned.
    pub version: Option<i32>,
    /// What changed (names, never secret values).
    pub diff: Option<serde_json::Value>,
    /// The call was refused because the datasource is outside the caller's tenant.
    pub denied: bool,
    /// The datasource the request names.
    pub target: Option<uuid::Uuid>,
}

impl Audit {
    /// An audit of a datasource.
    pub fn datasource(ds: &Datasource) -> Self {
        Self {
            resource: format!("datasource/{}", ds.id),
            org: Some(ds.org.clone()),
            project: Some(ds.project.clone()),
            target: Some(ds.id),
            ..Self::default()
        }
    }

    /// The row of `call` with `outcome`.
    pub fn entry(&self, call: &Call, outcome: Outcome, reason: Option<String>) -> AuditEntry {
        let mut diff = self.diff.clone();
        if let Some(peer) = &call.peer {
            let d = diff.get_or_insert_with(|| serde_json::json!({}));
            if let Some(map) = d.as_object_mut() {
                map.insert("peer".into(), peer.clone().into());
            }
        }
        AuditEntry {
            actor: call.principal.subject.clone(),
            action: call.method.to_owned(),
            resource: self.resource.clone(),
            org: self.org.clone(),
            project: self.project.clone(),
            version: self.version,
            outcome,
            reason,
            diff,
            // A row with no trace id cannot be matched with anything: give it one.
            trace_id: call
                .trace_id()
                .or_else(|| Some(super::auditor::new_trace_id())),
        }
    }

    /// The rest of the row: the caller's tenant, the target, the reason class.
    pub fn context(&self, call: &Call, refused: Option<&Status>) -> AuditContext {
        let tenant = &call.principal.tenant;
        AuditContext {
            caller_org: Some(tenant.org().unwrap_or("*").to_owned()),
            caller_projects: tenant.projects().map(<[String]>::to_vec),
            target_id: self.target,
            reason_class: refused.map(|s| status::code_name(s.code()).to_owned()),
            via: "grpc",
        }
    }
}

/// A pooled connection.
///
/// # Errors
/// UNAVAILABLE when the database cannot be reached.
pub async fn client(pool: &Pool) -> Result<Object, Status> {
    pool.get().await.map_err(|e| status::db(e.into()))
}

/// Opens the transaction of a mutating call.
///
/// # Errors
/// UNAVAILABLE when the database cannot be reached.
pub async fn begin<'a>(client: &'a mut Object, call: &Call) -> Result<Transaction<'a>, Status> {
    repo::begin(client, &call.write_ctx())
        .await
        .map_err(status::db)
}

/// Ends a mutating call: on success its audit row is written in `tx` and `tx` commits; on
/// failure `tx` rolls back and the failure is audited on its own (a refusal because the
/// datasource is outside the caller's tenant counts as denied).
///
/// # Errors
/// The call's own error, or the commit's.
pub async fn finish<T>(
    pool: &Pool,
    tx: Transaction<'_>,
    call: &Call,
    audit: &Audit,
    result: Result<T, Status>,
) -> Result<T, Status> {
    match result {
        Ok(value) => {
            audit::record_in(
                &tx,
                &audit.entry(call, Outcome::Ok, None),
                &audit.context(call, None),
            )
            .await
            .map_err(status::db)?;
            crate::db::commit(tx).await.map_err(status::db)?;
            tracing::info!(
                action = call.method,
                actor = %call.principal.subject,
                resource = %audit.resource,
                version = audit.version,
                "change committed"
            );
            Ok(value)
        }
        Err(refused) => {
            drop(tx);
            record_failure(pool, call, audit, &refused).await;
            Err(refused)
        }
    }
}

/// Writes the audit row of a call that changes nothing but must be on record (a test run
/// that opens stored secrets), before the work it records.
///
/// # Errors
/// The row cannot be written (UNAVAILABLE, …): the work must not happen unrecorded.
pub async fn record(pool: &Pool, call: &Call, audit: &Audit) -> Result<(), Status> {
    let client = client(pool).await?;
    audit::record(&**client, &audit.entry(call, Outcome::Ok, None))
        .await
        .map_err(status::db)
}

/// Audits a refused or failed call outside any transaction (best effort: a database that is
/// down cannot take the row, and the caller gets the original error either way).
pub async fn record_failure(pool: &Pool, call: &Call, audit: &Audit, refused: &Status) {
    let outcome = if audit.denied {
        Outcome::Denied
    } else {
        Outcome::Error
    };
    let entry = audit.entry(
        call,
        outcome,
        Some(format!("{:?}: {}", refused.code(), refused.message())),
    );
    let context = audit.context(call, Some(refused));
    match pool.get().await {
        Ok(client) => {
            if let Err(e) = audit::record_in(&**client, &entry, &context).await {
                tracing::warn!(error = %e, action = call.method, "writing the audit row failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, action = call.method, "writing the audit row failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_nonsense_is_ignored() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789m"), None);
    }
}
