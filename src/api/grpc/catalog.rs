//! The `Catalog` service: the connector kinds, their schemas and health.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::call::Call;
use super::status::invalid;
use super::{Ctx, convert, pb};
use crate::connectors::Mode;

/// How long a kind's health check is reused.
const HEALTH_MAX_AGE: Duration = Duration::from_secs(60);

/// The service.
#[derive(Clone)]
pub struct CatalogService(pub Arc<Ctx>);

#[tonic::async_trait]
impl pb::catalog_server::Catalog for CatalogService {
    async fn list_kinds(
        &self,
        request: Request<pb::ListKindsRequest>,
    ) -> Result<Response<pb::ListKindsResponse>, Status> {
        Call::of(&request, "ListKinds")?;
        let mut kinds: Vec<pb::Kind> = self
            .0
            .catalog
            .kinds()
            .map(|k| pb::Kind {
                name: k.name.to_owned(),
                version: k.version.to_owned(),
                summary: k.summary.to_owned(),
                config_schema_json: k.config_schema.to_string(),
                secrets: k.secrets.iter().map(|s| (*s).to_owned()).collect(),
                push: k.mode == Mode::Push,
                can_backfill: k.can_backfill,
            })
            .collect();
        kinds.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(pb::ListKindsResponse { kinds }))
    }

    async fn get_kind_health(
        &self,
        request: Request<pb::GetKindHealthRequest>,
    ) -> Result<Response<pb::KindHealth>, Status> {
        Call::of(&request, "GetKindHealth")?;
        let kind = request.into_inner().kind;
        let health = self
            .0
            .catalog
            .health(&kind, HEALTH_MAX_AGE)
            .await
            .ok_or_else(|| invalid("kind", format!("unknown connector kind {kind:?}")))?;
        let checked_at = chrono::Utc::now()
            - chrono::Duration::from_std(health.checked_at.elapsed()).unwrap_or_default();
        Ok(Response::new(pb::KindHealth {
            kind,
            healthy: health.healthy,
            detail: health.detail,
            checked_at: Some(convert::timestamp(checked_at)),
        }))
    }
}
