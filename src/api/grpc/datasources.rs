//! The `Datasources` service: datasources and their versions. Publishes and rollbacks go
//! through the same SQL functions SQL publishers use, with the caller's trace context stored
//! on the event.

use std::sync::Arc;

use tokio_postgres::Transaction;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::call::{self, Audit, Call};
use super::convert::{self, MAX_CONFIG_BYTES};
use super::status::{self, invalid};
use super::{Ctx, page, pb};
use crate::db::repository::datasources::{
    self, Datasource, DatasourcePatch, ListFilter, NewDatasource,
};
use crate::db::repository::{GenericClient, secrets as secret_rows, versions};
use crate::domain::{self, DatasourceStatus, MAX_OWNER, MAX_TEXT, Name};

/// The service.
#[derive(Clone)]
pub struct DatasourcesService(pub Arc<Ctx>);

/// How a tenant refusal is audited.
pub enum Check<'a> {
    /// A read: the refusal is audited off the answer's path, through this auditor.
    Read(&'a super::auditor::Auditor),
    /// A mutation: the refusal is marked on its audit, written when the call finishes.
    Write(&'a mut Audit),
}

/// Reads a datasource the caller may see; another tenant's is NOT_FOUND, like a missing one,
/// and the refusal is audited as denied.
///
/// # Errors
/// NOT_FOUND, UNAVAILABLE.
pub async fn visible(
    client: &impl GenericClient,
    call: &Call,
    id: Uuid,
    check: Check<'_>,
) -> Result<Datasource, Status> {
    let ds = datasources::get(client, id).await.map_err(status::db)?;
    admit(ds, call, check).await
}

/// Runs a mutation of datasource `id` in one audited transaction: the datasource is read and
/// checked against the caller's tenant (another tenant's is NOT_FOUND, audited as denied),
/// `work` runs with it and the audit it fills in, and the audit row is written with the
/// change (or on its own when the call fails).
///
/// # Errors
/// NOT_FOUND, UNAVAILABLE, or what `work` returns.
pub async fn on_datasource<T>(
    pool: &deadpool_postgres::Pool,
    call: &Call,
    id: Uuid,
    work: impl AsyncFnOnce(&Transaction<'_>, Datasource, &mut Audit) -> Result<T, Status>,
) -> Result<T, Status> {
    let mut audit = Audit {
        resource: format!("datasource/{id}"),
        target: Some(id),
        ..Audit::default()
    };
    let mut client = call::client(pool).await?;
    let tx = call::begin(&mut client, call).await?;
    let result = async {
        let ds = visible(&tx, call, id, Check::Write(&mut audit)).await?;
        work(&tx, ds, &mut audit).await
    }
    .await;
    call::finish(pool, tx, call, &audit, result).await
}

/// Refuses a change that only a live datasource takes (a publish, a secret): an archived one
/// is refused for that first, before anything about the request itself.
///
/// # Errors
/// FAILED_PRECONDITION for an archived datasource.
pub fn live(ds: &Datasource) -> Result<(), Status> {
    if ds.status == DatasourceStatus::Archived {
        return Err(status::db(crate::db::Error::DatasourceArchived(ds.id)));
    }
    Ok(())
}

/// The tenant check of [`visible`] on a datasource already read.
///
/// # Errors
/// NOT_FOUND when the caller may not see it.
pub async fn admit(ds: Datasource, call: &Call, check: Check<'_>) -> Result<Datasource, Status> {
    let id = ds.id;
    let seen = call.sees(&ds);
    match check {
        Check::Write(audit) => {
            // The target's tenant is recorded whether or not the caller may see it.
            let fresh = Audit::datasource(&ds);
            audit.resource = fresh.resource;
            audit.org = fresh.org;
            audit.project = fresh.project;
            audit.target = fresh.target;
            audit.denied = !seen;
        }
        Check::Read(auditor) if !seen => {
            let audit = Audit {
                denied: true,
                ..Audit::datasource(&ds)
            };
            let refused = status::datasource_not_found(id);
            let reason = format!("{:?}: {}", refused.code(), refused.message());
            auditor.deny(
                audit.entry(
                    call,
                    crate::db::repository::audit::Outcome::Denied,
                    Some(reason),
                ),
                audit.context(call, Some(&refused)),
            );
            return Err(refused);
        }
        Check::Read(_) => {}
    }
    if seen {
        Ok(ds)
    } else {
        Err(status::datasource_not_found(id))
    }
}

fn tags(values: Vec<String>) -> Result<Vec<String>, Status> {
    domain::check_tags(&values)?;
    Ok(values)
}

impl DatasourcesService {
    /// Checks a config against its kind: JSON Schema, the kind's own checks, the transform.
    /// Missing secrets are checked at publish, not here.
    /// The checks every publish runs, rollbacks included: the datasource is not archived,
    /// `version`'s config is valid for the datasource's kind and every secret it needs is
    /// stored.
    ///
    /// # Errors
    /// FAILED_PRECONDITION (archived first, then each config problem); NOT_FOUND for an
    /// unknown version.
    async fn check_publishable(
        &self,
        tx: &Transaction<'_>,
        ds: &Datasource,
        version: i32,
    ) -> Result<(), Status> {
        live(ds)?;
        let v = versions::get(tx, ds.id, version)
            .await
            .map_err(status::db)?;
        let secret_names: Vec<String> = secret_rows::list(tx, ds.id)
            .await
            .map_err(status::db)?
            .into_iter()
            .map(|m| m.name)
            .collect();
        self.check_config(&ds.kind, &v.config, Some(&secret_names))
            .map_err(|p| config_violations(tonic::Code::FailedPrecondition, p))
    }

    fn check_config(
        &self,
        kind: &str,
        config: &serde_json::Value,
        secrets: Option<&[String]>,
    ) -> Result<(), Vec<crate::connectors::ConfigError>> {
        let names: Vec<String> = secrets.map(<[String]>::to_vec).unwrap_or_default();
        match self.0.catalog.check(kind, config, &names, &self.0.limits) {
            Ok(()) => Ok(()),
            Err(problems) => {
                let problems: Vec<_> = problems
                    .into_iter()
                    .filter(|p| secrets.is_some() || p.missing_secret.is_none())
                    .collect();
                if problems.is_empty() {
                    Ok(())
                } else {
                    Err(problems)
                }
            }
        }
    }
}

fn config_violations(code: tonic::Code, problems: Vec<crate::connectors::ConfigError>) -> Status {
    let mut details = tonic_types::ErrorDetails::new();
    let path = |field: &str| match field {
        "" => "config_json".to_owned(),
        f => format!("config_json.{f}"),
    };
    let message = problems
        .iter()
        .map(|p| format!("{}: {}", path(&p.field), p.reason))
        .collect::<Vec<_>>()
        .join("; ");
    for p in problems {
        details.add_bad_request_violation(path(&p.field), p.reason);
    }
    <Status as tonic_types::StatusExt>::with_error_details(code, message, details)
}

#[tonic::async_trait]
impl pb::datasources_server::Datasources for DatasourcesService {
    async fn create_datasource(
        &self,
        request: Request<pb::CreateDatasourceRequest>,
    ) -> Result<Response<pb::Datasource>, Status> {
        let call = Call::of(&request, "CreateDatasource")?;
        let r = request.into_inner();
        let new = NewDatasource {
            org: Name::parse("org", &r.org)?,
            project: Name::parse("project", &r.project)?,
            name: Name::parse("name", &r.name)?,
            kind: r.kind,
            owner: r.owner,
            tags: tags(r.tags)?,
            description: r.description,
        };
        if self.0.catalog.get(&new.kind).is_none() {
            let known: Vec<&str> = self.0.catalog.kinds().map(|k| k.name).collect();
            return Err(invalid(
                "kind",
                format!(
                    "unknown connector kind {:?}; known kinds: {}",
                    new.kind,
                    known.join(", ")
                ),
            ));
        }
        convert::text("owner", &new.owner, MAX_OWNER)?;
        convert::text("description", &new.description, MAX_TEXT)?;
        let mut audit = Audit {
            resource: format!("datasource/{}/{}/{}", new.org, new.project, new.name),
            org: Some(new.org.to_string()),
            project: Some(new.project.to_string()),
            ..Audit::default()
        };
        if !call
            .principal
            .tenant
            .allows(new.org.as_str(), new.project.as_str())
        {
            let refused = Status::permission_denied(format!(
                "the caller may not create datasources in {}/{}",
                new.org, new.project
            ));
            audit.denied = true;
            call::record_failure(&self.0.pool, &call, &audit, &refused).await;
            return Err(refused);
        }
        let mut client = call::client(&self.0.pool).await?;
        let tx = call::begin(&mut client, &call).await?;
        let result = async {
            let ds = datasources::create(&tx, &new).await.map_err(status::db)?;
            audit.resource = format!("datasource/{}", ds.id);
            audit.diff =
                Some(serde_json::json!({ "created": { "name": ds.name, "kind": ds.kind } }));
            Ok(ds)
        }
        .await;
        let ds = call::finish(&self.0.pool, tx, &call, &audit, result).await?;
        Ok(Response::new(convert::datasource(ds)))
    }

    async fn get_datasource(
        &self,
        request: Request<pb::GetDatasourceRequest>,
    ) -> Result<Response<pb::Datasource>, Status> {
        let call = Call::of(&request, "GetDatasource")?;
        let id = convert::id("id", &request.get_ref().id)?;
        let client = call::client(&self.0.pool).await?;
        let ds = visible(&**client, &call, id, Check::Read(&self.0.auditor)).await?;
        Ok(Response::new(convert::datasource(ds)))
    }

    async fn list_datasources(
        &self,
        request: Request<pb::ListDatasourcesRequest>,
    ) -> Result<Response<pb::ListDatasourcesResponse>, Status> {
        let call = Call::of(&request, "ListDatasources")?;
        let r = request.into_inner();
        let limit = page::size(r.page_size, 100, 1000)?;
        let status = convert::datasource_status_from("status", r.status)?;
        let some = |s: String| (!s.is_empty()).then_some(s);
        let tenant = &call.principal.tenant;
        // Asking for another tenant's org or project lists nothing, as if it did not exist.
        let mut filter = ListFilter {
            org: some(r.org),
            project: some(r.project),
            projects: tenant.projects().map(<[String]>::to_vec),
            status,
            kind: some(r.kind),
            owner: some(r.owner),
            tag: some(r.tag),
            name_prefix: some(r.name_prefix),
            after: None,
            limit: limit + 1,
        };
        if let Some(org) = tenant.org() {
            if filter.org.as_deref().is_some_and(|o| o != org) {
                return Ok(Response::new(pb::ListDatasourcesResponse::default()));
            }
            filter.org = Some(org.to_owned());
        }
        let fingerprint = format!(
            "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}",
            filter.org,
            filter.project,
            filter.status.map(DatasourceStatus::as_str),
            filter.kind,
            filter.owner,
            filter.tag,
            filter.name_prefix,
            call.principal.subject
        );
        filter.after = self
            .0
            .page_key
            .decode::<(String, Uuid)>(&r.page_token, &fingerprint)?;
        let client = call::client(&self.0.pool).await?;
        let mut rows = datasources::list(&client, &filter)
            .await
            .map_err(status::db)?;
        let more = rows.len() as i64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_page_token = match rows.last() {
            Some(last) if more => self
                .0
                .page_key
                .encode(&(last.name.clone(), last.id), &fingerprint),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListDatasourcesResponse {
            datasources: rows.into_iter().map(convert::datasource).collect(),
            next_page_token,
        }))
    }

    async fn update_datasource(
        &self,
        request: Request<pb::UpdateDatasourceRequest>,
    ) -> Result<Response<pb::Datasource>, Status> {
        let call = Call::of(&request, "UpdateDatasource")?;
        let r = request.into_inner();
        let new = r
            .datasource
            .ok_or_else(|| invalid("datasource", "is required"))?;
        let id = convert::id("datasource.id", &new.id)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(invalid(
                "update_mask",
                "names no field; use owner, tags, description or status",
            ));
        }
        let expected = convert::revision("etag", &r.etag)?;
        let mut patch = DatasourcePatch::default();
        let mut changed = Vec::new();
        for path in &paths {
            match path.as_str() {
                "owner" => {
                    convert::text("datasource.owner", &new.owner, MAX_OWNER)?;
                    patch.owner = Some(new.owner.clone());
                }
                "tags" => patch.tags = Some(tags(new.tags.clone())?),
                "description" => {
                    convert::text("datasource.description", &new.description, MAX_TEXT)?;
                    patch.description = Some(new.description.clone());
                }
                "status" => match convert::datasource_status_from("datasource.status", new.status)?
                {
                    Some(s @ (DatasourceStatus::Active | DatasourceStatus::Disabled)) => {
                        patch.status = Some(s)
                    }
                    _ => {
                        return Err(invalid(
                            "datasource.status",
                            "must be ACTIVE or DISABLED; archive with ArchiveDatasource",
                        ));
                    }
                },
                other => {
                    return Err(invalid(
                        "update_mask",
                        format!(
                            "{other:?} cannot be updated; use owner, tags, description or status"
                        ),
                    ));
                }
            }
            changed.push(path.clone());
        }
        let ds = on_datasource(&self.0.pool, &call, id, async |tx, _ds, audit| {
            audit.diff = Some(serde_json::json!({ "changed": changed }));
            datasources::update(tx, id, &patch, expected)
                .await
                .map_err(status::db)
        })
        .await?;
        Ok(Response::new(convert::datasource(ds)))
    }

    async fn archive_datasource(
        &self,
        request: Request<pb::ArchiveDatasourceRequest>,
    ) -> Result<Response<pb::Datasource>, Status> {
        let call = Call::of(&request, "ArchiveDatasource")?;
        let r = request.into_inner();
        let id = convert::id("id", &r.id)?;
        let expected = convert::revision("etag", &r.etag)?;
        let ds = on_datasource(&self.0.pool, &call, id, async |tx, ds, audit| {
            if ds.status == DatasourceStatus::Archived {
                return Ok(ds);
            }
            audit.diff = Some(serde_json::json!({ "changed": ["status"], "status": "archived" }));
            let patch = DatasourcePatch {
                status: Some(DatasourceStatus::Archived),
                ..DatasourcePatch::default()
            };
            datasources::update(tx, id, &patch, expected)
                .await
                .map_err(status::db)
        })
        .await?;
        Ok(Response::new(convert::datasource(ds)))
    }

    async fn create_version(
        &self,
        request: Request<pb::CreateVersionRequest>,
    ) -> Result<Response<pb::Version>, Status> {
        let call = Call::of(&request, "CreateVersion")?;
        let r = request.into_inner();
        let id = convert::id("datasource_id", &r.datasource_id)?;
        let config = convert::json_object("config_json", &r.config_json, MAX_CONFIG_BYTES)?;
        convert::text("comment", &r.comment, MAX_TEXT)?;
        let v = on_datasource(&self.0.pool, &call, id, async |tx, ds, audit| {
            self.check_config(&ds.kind, &config, None)
                .map_err(|p| config_violations(tonic::Code::InvalidArgument, p))?;
            let v = versions::create_draft(tx, id, &config, &r.comment)
                .await
                .map_err(status::db)?;
            audit.version = Some(v.version);
            audit.diff = Some(serde_json::json!({ "config_keys": config_keys(&config) }));
            Ok(v)
        })
        .await?;
        Ok(Response::new(convert::version(v)))
    }

    async fn get_version(
        &self,
        request: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::Version>, Status> {
        let call = Call::of(&request, "GetVersion")?;
        let r = request.into_inner();
        let id = convert::id("datasource_id", &r.datasource_id)?;
        let client = call::client(&self.0.pool).await?;
        visible(&**client, &call, id, Check::Read(&self.0.auditor)).await?;
        let v = versions::get(&**client, id, r.version)
            .await
            .map_err(status::db)?;
        Ok(Response::new(convert::version(v)))
    }

    async fn list_versions(
        &self,
        request: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        let call = Call::of(&request, "ListVersions")?;
        let id = convert::id("datasource_id", &request.get_ref().datasource_id)?;
        let client = call::client(&self.0.pool).await?;
        visible(&**client, &call, id, Check::Read(&self.0.auditor)).await?;
        let all = versions::list(&**client, id).await.map_err(status::db)?;
        Ok(Response::new(pb::ListVersionsResponse {
            versions: all.into_iter().map(convert::version).collect(),
        }))
    }

    async fn update_version(
        &self,
        request: Request<pb::UpdateVersionRequest>,
    ) -> Result<Response<pb::Version>, Status> {
        let call = Call::of(&request, "UpdateVersion")?;
        let r = request.into_inner();
        let id = convert::id("datasource_id", &r.datasource_id)?;
        let config = convert::json_object("config_json", &r.config_json, MAX_CONFIG_BYTES)?;
        convert::text("comment", &r.comment, MAX_TEXT)?;
        let v = on_datasource(&self.0.pool, &call, id, async |tx, ds, audit| {
            audit.version = Some(r.version);
            self.check_config(&ds.kind, &config, None)
                .map_err(|p| config_violations(tonic::Code::InvalidArgument, p))?;
            let before = versions::get(tx, id, r.version).await.map_err(status::db)?;
            let v = versions::update_draft(tx, id, r.version, &config, &r.comment)
                .await
                .map_err(status::db)?;
            audit.diff = Some(
                serde_json::json!({ "config_keys_changed": domain::changed_keys(&before.config, &config) }),
            );
            Ok(v)
        })
        .await?;
        Ok(Response::new(convert::version(v)))
    }

    async fn publish_version(
        &self,
        request: Request<pb::PublishVersionRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let call = Call::of(&request, "PublishVersion")?;
        let r = request.into_inner();
        let id = convert::id("datasource_id", &r.datasource_id)?;
        if r.version < 1 {
            return Err(invalid("version", "must be 1 or more"));
        }
        let event = on_datasource(&self.0.pool, &call, id, async |tx, ds, audit| {
            audit.version = Some(r.version);
            self.check_publishable(tx, &ds, r.version).await?;
            let event = versions::publish(tx, id, r.version)
                .await
                .map_err(status::db)?;
            audit.diff =
                Some(serde_json::json!({ "published": r.version, "previous": ds.current_version }));
            Ok(event)
        })
        .await?;
        Ok(Response::new(pb::PublishResponse {
            datasource_id: id.to_string(),
            version: r.version,
            event_id: event.unwrap_or(0),
        }))
    }

    async fn rollback_version(
        &self,
        request: Request<pb::RollbackVersionRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let call = Call::of(&request, "RollbackVersion")?;
        let r = request.into_inner();
        let id = convert::id("datasource_id", &r.datasource_id)?;
        if r.to_version < 0 {
            return Err(invalid(
                "to_version",
                "must be 0 (the previous version) or a version number",
            ));
        }
        let to = (r.to_version > 0).then_some(r.to_version);
        let done = on_datasource(&self.0.pool, &call, id, async |tx, ds, audit| {
            audit.version = to;
            // The target is resolved by `dsreg_rollback`; its checks run inside the same
            // transaction, so a refused rollback leaves nothing behind.
            let done = versions::rollback(tx, id, to).await.map_err(status::db)?;
            audit.version = Some(done.version);
            self.check_publishable(tx, &ds, done.version).await?;
            audit.diff = Some(
                serde_json::json!({ "rolled_back_to": done.version, "previous": ds.current_version }),
            );
            Ok(done)
        })
        .await?;
        Ok(Response::new(pb::PublishResponse {
            datasource_id: id.to_string(),
            version: done.version,
            event_id: done.event.unwrap_or(0),
        }))
    }
}

/// The top-level keys of a config (values are never audited: they may hold credentials).
fn config_keys(config: &serde_json::Value) -> Vec<String> {
    config
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_diffs_name_keys_never_values() {
        let before = serde_json::json!({"url": "http://a", "token": "s3cret", "rate": 1});
        let after = serde_json::json!({"url": "http://b", "token": "s3cret", "extra": true});
        let changed = domain::changed_keys(&before, &after);
        assert_eq!(changed, vec!["extra", "rate", "url"]);
        assert!(!serde_json::to_string(&changed).unwrap().contains("s3cret"));
    }
}
