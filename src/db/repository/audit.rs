//! The `audit_log` table: every mutating call and every denied one, with its outcome.
//! Diff summaries name fields, never secret values.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::GenericClient;
use super::typed;
use crate::db::Error;

/// The result of an audited call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused by authentication or RBAC.
    Denied,
    /// Failed.
    Error,
}

impl Outcome {
    /// Its name in the table: `ok`, `denied`, `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

/// One audit row.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Who (the token's subject, or `anonymous`).
    pub actor: String,
    /// The action (`PublishVersion`, `keys.rotate`, ...).
    pub action: String,
    /// The resource (`datasource/<id>`).
    pub resource: String,
    /// Tenant organisation.
    pub org: Option<String>,
    /// Tenant project.
    pub project: Option<String>,
    /// The version concerned.
    pub version: Option<i32>,
    /// The outcome.
    pub outcome: Outcome,
    /// Why it was denied or failed.
    pub reason: Option<String>,
    /// What changed (field names and non-secret values).
    pub diff: Option<serde_json::Value>,
    /// The request's trace id.
    pub trace_id: Option<String>,
}

/// What an audit row says beyond [`AuditEntry`]: the caller's tenant, the target's id, the
/// reason class and how the request came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditContext {
    /// The caller's organisation (`*` for every one); `None` when the caller is unknown.
    pub caller_org: Option<String>,
    /// The caller's projects, when limited.
    pub caller_projects: Option<Vec<String>>,
    /// The datasource the request names.
    pub target_id: Option<Uuid>,
    /// The class of the reason (`UNAUTHENTICATED`, `NOT_FOUND`, ...), for outcomes other than
    /// ok.
    pub reason_class: Option<String>,
    /// How the request came in: `grpc`, `http`, `dsreg` (the registry's own work).
    pub via: &'static str,
}

impl Default for AuditContext {
    fn default() -> Self {
        Self {
            caller_org: None,
            caller_projects: None,
            target_id: None,
            reason_class: None,
            via: "dsreg",
        }
    }
}

/// Writes one audit row.
///
/// # Errors
/// The query failed.
pub async fn record(client: &impl GenericClient, entry: &AuditEntry) -> Result<(), Error> {
    record_in(client, entry, &AuditContext::default()).await
}

/// Writes one audit row with its context.
///
/// # Errors
/// The query failed.
pub async fn record_in(
    client: &impl GenericClient,
    entry: &AuditEntry,
    context: &AuditContext,
) -> Result<(), Error> {
    client
        .execute_typed(
            "INSERT INTO audit_log (actor, action, resource, org, project, version, outcome, reason,
                                    diff, trace_id, caller_org, caller_projects, target_id,
                                    reason_class, via)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            &typed::params(&[
                &entry.actor,
                &entry.action,
                &entry.resource,
                &entry.org,
                &entry.project,
                &entry.version,
                &entry.outcome.as_str(),
                &entry.reason,
                &entry.diff,
                &entry.trace_id,
                &context.caller_org,
                &context.caller_projects,
                &context.target_id,
                &context.reason_class,
                &context.via,
            ]),
        )
        .await?;
    Ok(())
}

/// Adds `count` denials to the aggregated row of their caller, action, reason and the current
/// minute (created by the first): a flood of denials grows the table by one row per minute.
///
/// # Errors
/// The query failed.
pub async fn record_denials(
    client: &impl GenericClient,
    entry: &AuditEntry,
    context: &AuditContext,
    count: i32,
) -> Result<(), Error> {
    client
        .execute_typed(
            "INSERT INTO audit_log (actor, action, resource, org, project, version, outcome, reason,
                                    diff, trace_id, caller_org, caller_projects, target_id,
                                    reason_class, via, count, last_at, window_start)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                     now(), date_trunc('minute', now()))
             ON CONFLICT (actor, action, reason, window_start) WHERE window_start IS NOT NULL
             DO UPDATE SET count = audit_log.count + EXCLUDED.count, last_at = EXCLUDED.last_at",
            &typed::params(&[
                &entry.actor,
                &entry.action,
                &entry.resource,
                &entry.org,
                &entry.project,
                &entry.version,
                &entry.outcome.as_str(),
                &entry.reason,
                &entry.diff,
                &entry.trace_id,
                &context.caller_org,
                &context.caller_projects,
                &context.target_id,
                &context.reason_class,
                &context.via,
                &count,
            ]),
        )
        .await?;
    Ok(())
}

/// Writes audit rows in one statement, whatever their number.
///
/// # Errors
/// The query failed.
pub async fn record_many(client: &impl GenericClient, entries: &[AuditEntry]) -> Result<(), Error> {
    if entries.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&AuditEntry) -> Option<String>| -> Vec<Option<String>> {
        entries.iter().map(f).collect()
    };
    let actors = column(|e| Some(e.actor.clone()));
    let actions = column(|e| Some(e.action.clone()));
    let resources = column(|e| Some(e.resource.clone()));
    let orgs = column(|e| e.org.clone());
    let projects = column(|e| e.project.clone());
    let outcomes = column(|e| Some(e.outcome.as_str().to_owned()));
    let reasons = column(|e| e.reason.clone());
    let traces = column(|e| e.trace_id.clone());
    let versions: Vec<Option<i32>> = entries.iter().map(|e| e.version).collect();
    let diffs: Vec<Option<&serde_json::Value>> = entries.iter().map(|e| e.diff.as_ref()).collect();
    client
        .execute_typed(
            "INSERT INTO audit_log (actor, action, resource, org, project, version, outcome, reason, diff, trace_id)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::int[], $7::text[], $8::text[], $9::jsonb[], $10::text[])",
            &typed::params(&[
                &actors, &actions, &resources, &orgs, &projects, &versions, &outcomes, &reasons,
                &diffs, &traces,
            ]),)
        .await?;
    Ok(())
}

/// The newest audit rows for a resource (all resources when `None`), newest first.
///
/// # Errors
/// The query failed.
pub async fn recent(
    client: &impl GenericClient,
    resource: Option<&str>,
    limit: i64,
) -> Result<Vec<(DateTime<Utc>, AuditEntry)>, Error> {
    let rows = client
        .query_typed(
            "SELECT at, actor, action, resource, org, project, version, outcome, reason, diff, trace_id
             FROM audit_log WHERE ($1::text IS NULL OR resource = $1) ORDER BY id DESC LIMIT $2",
            &typed::params(&[&resource, &limit]),)
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let outcome = match r.get::<_, &str>("outcome") {
                "ok" => Outcome::Ok,
                "denied" => Outcome::Denied,
                _ => Outcome::Error,
            };
            (
                r.get("at"),
                AuditEntry {
                    actor: r.get("actor"),
                    action: r.get("action"),
                    resource: r.get("resource"),
                    org: r.get("org"),
                    project: r.get("project"),
                    version: r.get("version"),
                    outcome,
                    reason: r.get("reason"),
                    diff: r.get("diff"),
                    trace_id: r.get("trace_id"),
                },
            )
        })
        .collect())
}

/// Filters of [`list`].
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only rows of targets in this organisation (and, without `projects`, rows of callers
    /// of it); `None`: every row.
    pub org: Option<String>,
    /// Only rows of targets in these projects.
    pub projects: Option<Vec<String>>,
    /// Only rows about this datasource.
    pub target_id: Option<Uuid>,
    /// Only rows with this outcome.
    pub outcome: Option<String>,
    /// Only rows older than this id (the page's keyset position).
    pub before_id: Option<i64>,
    /// Page size.
    pub limit: i64,
}

/// One row as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    /// Its id.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// The row.
    pub entry: AuditEntry,
    /// Its context.
    pub caller_org: Option<String>,
    /// The target datasource.
    pub target_id: Option<Uuid>,
    /// The reason class.
    pub reason_class: Option<String>,
    /// How it came in.
    pub via: String,
    /// The database role that wrote it.
    pub db_role: String,
    /// Calls it counts.
    pub count: i32,
}

/// Audit rows, newest first.
///
/// # Errors
/// The query failed.
pub async fn list(
    client: &impl GenericClient,
    filter: &AuditFilter,
) -> Result<Vec<AuditRow>, Error> {
    let rows = client
        .query_typed(
            "SELECT id, at, actor, action, resource, org, project, version, outcome, reason, diff,
                    trace_id, caller_org, target_id, reason_class, via, db_role, count
             FROM audit_log
             WHERE ($1::text IS NULL
                    OR (org = $1 AND ($2::text[] IS NULL OR project = ANY($2)))
                    OR ($2::text[] IS NULL AND caller_org = $1))
               AND ($3::uuid IS NULL OR target_id = $3)
               AND ($4::text IS NULL OR outcome = $4)
               AND ($5::bigint IS NULL OR id < $5)
             ORDER BY id DESC LIMIT $6",
            &typed::params(&[
                &filter.org,
                &filter.projects,
                &filter.target_id,
                &filter.outcome,
                &filter.before_id,
                &filter.limit,
            ]),
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| AuditRow {
            id: r.get("id"),
            at: r.get("at"),
            entry: AuditEntry {
                actor: r.get("actor"),
                action: r.get("action"),
                resource: r.get("resource"),
                org: r.get("org"),
                project: r.get("project"),
                version: r.get("version"),
                outcome: match r.get::<_, &str>("outcome") {
                    "ok" => Outcome::Ok,
                    "denied" => Outcome::Denied,
                    _ => Outcome::Error,
                },
                reason: r.get("reason"),
                diff: r.get("diff"),
                trace_id: r.get("trace_id"),
            },
            caller_org: r.get("caller_org"),
            target_id: r.get("target_id"),
            reason_class: r.get("reason_class"),
            via: r.get("via"),
            db_role: r.get("db_role"),
            count: r.get("count"),
        })
        .collect())
}
