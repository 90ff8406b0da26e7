//! Writing a plan: every step in one transaction, each through the repositories an API call
//! uses (create, draft, `dsreg_publish`, status updates), written as `file:<path>` so events,
//! versions and audit rows name the file. Then, in the same transaction: one audit row per
//! changed datasource, the sync records, and a `sync_conflict` event per conflict (file,
//! versions and revisions; never config values).

use serde_json::json;
use tokio_postgres::Transaction;

use super::format::Definition;
use super::plan::{Action, Plan, Resolution, Step};
use super::{ConflictPolicy, Error};
use crate::db::repository::audit::{self, AuditEntry, Outcome};
use crate::db::repository::datasources::{self, DatasourcePatch, NewDatasource};
use crate::db::repository::events::{self, NewEvent};
use crate::db::repository::file_sync::{self, Synced};
use crate::db::repository::{self as repo, versions};
use crate::domain::{DatasourceStatus, Name};

/// Who applies, for audit rows and events.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// The audit action: `files.import` or `files.sync`.
    pub action: &'static str,
    /// The conflict policy in force (recorded on conflict events).
    pub policy: ConflictPolicy,
}

/// The actor a file writes as: `file:/abs/path.yaml`, or `http:https://host/path` for a
/// document of an HTTP source (its recorded name carries no credentials or query).
pub fn actor(file: &str) -> String {
    if file.starts_with("https://") || file.starts_with("http://") {
        format!("http:{file}")
    } else {
        format!("file:{file}")
    }
}

/// Applies `plan` (made from `definitions`) in `tx`, filling in the datasource ids and the
/// versions written; `progress` gets (steps done, steps) as it goes. The caller commits.
///
/// # Errors
/// The database refused a write (a name taken meanwhile, an archived datasource...), or
/// failed; the transaction is then unusable and nothing of the plan is applied.
pub async fn apply(
    tx: &Transaction<'_>,
    plan: &mut Plan,
    definitions: &[Definition],
    ctx: Context,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<(), Error> {
    let count = plan.steps.len();
    let total = count as u64;
    let mut audits = Vec::new();
    let mut forget = Vec::new();
    for (done, step) in plan.steps.iter_mut().enumerate() {
        let def = step.definition.map(|i| &definitions[i]);
        if step.action.writes() {
            repo::set_actor(tx, &actor(&step.file)).await?;
            write(tx, step, def).await?;
            audits.push(audit_entry(step, ctx.action));
        }
        if step.action == Action::Archive {
            forget.extend(step.datasource);
        }
        if let (Action::Create, Some(conflict)) = (step.action, &step.conflict) {
            // The archived datasource the file used to manage hands its file over.
            forget.push(conflict.datasource);
        }
        if done % 64 == 0 || done + 1 == count {
            progress(done as u64 + 1, total);
        }
    }
    let synced: Vec<Synced<'_>> = plan
        .steps
        .iter()
        .filter(|s| s.record)
        .filter_map(|s| {
            let def = &definitions[s.definition?];
            Some(Synced {
                datasource_id: s.datasource?,
                path: &def.file,
                content_hash: &def.hash,
            })
        })
        .collect();
    file_sync::forget(tx, &forget).await?;
    file_sync::record(tx, &synced).await?;
    audit::record_many(tx, &audits).await?;
    record_conflicts(tx, &plan.steps, ctx.policy).await
}

/// Writes the `sync_conflict` event of each step with a conflict still to announce, each as
/// its file.
///
/// # Errors
/// The database failed.
pub async fn record_conflicts(
    tx: &Transaction<'_>,
    steps: &[Step],
    policy: ConflictPolicy,
) -> Result<(), Error> {
    for s in steps.iter().filter(|s| s.announce) {
        let Some(c) = s.conflict.as_ref() else {
            continue;
        };
        let file_version = (c.resolution == Resolution::FileWins)
            .then_some(s.version)
            .flatten();
        let event = NewEvent {
            datasource_id: Some(c.datasource),
            kind: "sync_conflict".to_owned(),
            version: c.database_version,
            payload: json!({
                "file": s.file,
                "line": s.line,
                "datasource": s.key.to_string(),
                "policy": policy.as_str(),
                "resolution": c.resolution.as_str(),
                "synced_version": c.synced_version,
                "database_version": c.database_version,
                "synced_revision": c.synced_revision,
                "database_revision": c.database_revision,
                "file_version": file_version,
                "changed": s.changes,
            }),
            at: None,
        };
        repo::set_actor(tx, &actor(&s.file)).await?;
        events::append(tx, &[event]).await?;
    }
    Ok(())
}

fn invalid(e: crate::domain::InvalidField) -> Error {
    Error::Db(crate::db::Error::Invalid(e.to_string()))
}

/// One step's writes.
async fn write(
    tx: &Transaction<'_>,
    step: &mut Step,
    def: Option<&Definition>,
) -> Result<(), Error> {
    let patch = def.map(|d| DatasourcePatch {
        owner: d.owner.clone().filter(|_| step.changes.contains(&"owner")),
        tags: d.tags.clone().filter(|_| step.changes.contains(&"tags")),
        description: d
            .description
            .clone()
            .filter(|_| step.changes.contains(&"description")),
        status: d.status.filter(|_| step.changes.contains(&"status")),
    });
    let comment = format!("from {}", step.file);
    match (step.action, def) {
        (Action::Create, Some(d)) => {
            let ds = datasources::create(
                tx,
                &NewDatasource {
                    org: Name::parse("org", &d.key.org).map_err(invalid)?,
                    project: Name::parse("project", &d.key.project).map_err(invalid)?,
                    name: Name::parse("name", &d.key.name).map_err(invalid)?,
                    kind: d.kind.clone(),
                    owner: d.owner.clone().unwrap_or_default(),
                    tags: d.tags.clone().unwrap_or_default(),
                    description: d.description.clone().unwrap_or_default(),
                },
            )
            .await?;
            step.datasource = Some(ds.id);
            if d.status == Some(DatasourceStatus::Disabled) {
                let disable = DatasourcePatch {
                    status: Some(DatasourceStatus::Disabled),
                    ..DatasourcePatch::default()
                };
                datasources::update(tx, ds.id, &disable, None).await?;
            }
            let v = versions::create_draft(tx, ds.id, &d.config, &comment).await?;
            step.version = Some(v.version);
            if step.waiting_for.is_empty() {
                versions::publish(tx, ds.id, v.version).await?;
            }
        }
        (Action::NewVersion | Action::Update, Some(d)) => {
            let id = step.datasource.ok_or(crate::db::Error::Invalid(
                "a change planned without its datasource".into(),
            ))?;
            if let Some(patch) = patch.filter(|p| {
                p.owner.is_some()
                    || p.tags.is_some()
                    || p.description.is_some()
                    || p.status.is_some()
            }) {
                datasources::update(tx, id, &patch, None).await?;
            }
            if step.action == Action::NewVersion {
                let version = match step.draft {
                    Some(draft) => draft,
                    None => {
                        versions::create_draft(tx, id, &d.config, &comment)
                            .await?
                            .version
                    }
                };
                step.version = Some(version);
                if step.waiting_for.is_empty() {
                    versions::publish(tx, id, version).await?;
                }
            }
        }
        (Action::Publish, _) => {
            if let (Some(id), Some(version)) = (step.datasource, step.version) {
                versions::publish(tx, id, version).await?;
            }
        }
        (Action::Archive, _) => {
            if let Some(id) = step.datasource {
                let archive = DatasourcePatch {
                    status: Some(DatasourceStatus::Archived),
                    ..DatasourcePatch::default()
                };
                datasources::update(tx, id, &archive, None).await?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn audit_entry(step: &Step, action: &'static str) -> AuditEntry {
    AuditEntry {
        actor: actor(&step.file),
        action: action.to_owned(),
        resource: step.datasource.map_or_else(
            || format!("datasource/{}", step.key),
            |id| format!("datasource/{id}"),
        ),
        org: Some(step.key.org.clone()),
        project: Some(step.key.project.clone()),
        version: step.version,
        outcome: Outcome::Ok,
        reason: None,
        diff: Some(json!({
            "file_action": step.action.as_str(),
            "changed": step.changes,
            "config_keys_changed": step.config_keys,
            "waiting_for_secrets": step.waiting_for,
            "previous": step.from_version,
            "conflict": step.conflict.as_ref().map(|c| c.resolution.as_str()),
        })),
        trace_id: None,
    }
}
