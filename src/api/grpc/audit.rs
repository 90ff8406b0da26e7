//! The `Audit` service: the audit trail, read back by admins, scoped to their tenant, paged
//! newest first.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::call::{self, Call};
use super::status::{self, invalid};
use super::{Ctx, convert, page, pb};
use crate::db::repository::audit::{self, AuditFilter, AuditRow};

/// The service.
#[derive(Clone)]
pub struct AuditService(pub Arc<Ctx>);

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let call = Call::of(&request, "ListAudit")?;
        let r = request.into_inner();
        let limit = page::size(r.page_size, 100, 1000)?;
        let target_id = match r.datasource_id.as_str() {
            "" => None,
            id => Some(convert::id("datasource_id", id)?),
        };
        let outcome = match r.outcome.as_str() {
            "" => None,
            o @ ("ok" | "denied" | "error") => Some(o.to_owned()),
            other => {
                return Err(invalid(
                    "outcome",
                    format!("{other:?} is not an outcome; use ok, denied or error"),
                ));
            }
        };
        let tenant = &call.principal.tenant;
        let filters = format!("{target_id:?}|{outcome:?}|{}", call.principal.subject);
        let mut filter = AuditFilter {
            org: tenant.org().map(str::to_owned),
            projects: tenant.projects().map(<[String]>::to_vec),
            target_id,
            outcome,
            before_id: self.0.page_key.decode::<i64>(&r.page_token, &filters)?,
            limit: limit + 1,
        };
        let client = call::client(&self.0.pool).await?;
        let mut rows = audit::list(&**client, &filter).await.map_err(status::db)?;
        let more = rows.len() as i64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        filter.before_id = rows.last().map(|r| r.id);
        let next_page_token = match filter.before_id {
            Some(last) if more => self.0.page_key.encode(&last, &filters),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListAuditResponse {
            records: rows.into_iter().map(record).collect(),
            next_page_token,
        }))
    }
}

fn record(row: AuditRow) -> pb::AuditRecord {
    let e = row.entry;
    pb::AuditRecord {
        id: row.id,
        at: Some(convert::timestamp(row.at)),
        actor: e.actor,
        action: e.action,
        resource: e.resource,
        target_id: row.target_id.map(|id| id.to_string()).unwrap_or_default(),
        org: e.org.unwrap_or_default(),
        project: e.project.unwrap_or_default(),
        caller_org: row.caller_org.unwrap_or_default(),
        version: e.version.unwrap_or_default(),
        outcome: e.outcome.as_str().to_owned(),
        reason_class: row.reason_class.unwrap_or_default(),
        reason: e.reason.unwrap_or_default(),
        trace_id: e.trace_id.unwrap_or_default(),
        via: row.via,
        db_role: row.db_role,
        count: row.count,
    }
}
