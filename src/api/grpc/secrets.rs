//! The `Secrets` service: values go in and are sealed at once; only names and metadata come
//! out. A put or delete writes `secret_changed`, so the worker reloads through the normal path.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::call::{self, Call};
use super::datasources::{Check, live, on_datasource, visible};
use super::status::{self, invalid};
use super::{Ctx, convert, pb};
use crate::db::repository::datasources::Datasource;
use crate::db::repository::secrets as repo;
use crate::db::repository::versions;
use crate::secrets::{MAX_SECRET_BYTES, SecretMeta, SecretString, Secrets};

/// The service.
#[derive(Clone)]
pub struct SecretsService(pub Arc<Ctx>);

impl SecretsService {
    fn secrets(&self) -> Result<&Arc<Secrets>, Status> {
        self.0.secrets.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "no master key is configured (DSREG_MASTER_KEYS or --master-key-file); secrets cannot be stored",
            )
        })
    }
}

fn meta(m: SecretMeta) -> pb::SecretMeta {
    pb::SecretMeta {
        name: m.name,
        key_version: u32::try_from(m.key_version).unwrap_or(0),
        fingerprint: m.fingerprint,
        created_at: Some(convert::timestamp(m.created_at)),
        rotated_at: m.rotated_at.map(convert::timestamp),
    }
}

/// A warning when the published version of `ds` still needs the secret `name` just deleted
/// (the kind's own check of its config against the secrets that are left), else empty.
async fn still_required(
    ctx: &Ctx,
    tx: &tokio_postgres::Transaction<'_>,
    ds: &Datasource,
    name: &str,
) -> Result<String, Status> {
    let Some(version) = ds.current_version else {
        return Ok(String::new());
    };
    let published = versions::get(tx, ds.id, version)
        .await
        .map_err(status::db)?;
    let left = repo::names(tx, &[ds.id])
        .await
        .map_err(status::db)?
        .remove(&ds.id)
        .unwrap_or_default();
    let needed = ctx
        .catalog
        .check(&ds.kind, &published.config, &left, &ctx.limits)
        .err()
        .is_some_and(|problems| {
            problems
                .iter()
                .any(|p| p.missing_secret.as_deref() == Some(name))
        });
    Ok(if needed {
        format!(
            "published version {version} needs secret {name}: its worker keeps the credentials it holds, \
             but cannot be restarted or reloaded until the secret is put back"
        )
    } else {
        String::new()
    })
}

#[tonic::async_trait]
impl pb::secrets_server::Secrets for SecretsService {
    async fn put_secret(
        &self,
        request: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::SecretMeta>, Status> {
        let call = Call::of(&request, "PutSecret")?;
        let r = request.into_inner();
        let id = convert::id("datasource_id", &r.datasource_id)?;
        let name = r.name;
        let value = Zeroizing::new(r.value);
        if value.len() > MAX_SECRET_BYTES {
            return Err(invalid(
                "value",
                format!(
                    "is {} bytes; at most {MAX_SECRET_BYTES} allowed",
                    value.len()
                ),
            ));
        }
        let value =
            SecretString::from_utf8(value).ok_or_else(|| invalid("value", "must be UTF-8 text"))?;
        let secrets = self.secrets()?.clone();
        let m = on_datasource(&self.0.pool, &call, id, async |tx, ds, audit| {
            live(&ds)?;
            audit.diff = Some(serde_json::json!({ "secret": name, "value": "changed" }));
            secrets
                .put(tx, id, &name, &value)
                .await
                .map_err(status::secrets)
        })
        .await?;
        Ok(Response::new(meta(m)))
    }

    async fn delete_secret(
        &self,
        request: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let call = Call::of(&request, "DeleteSecret")?;
        let r = request.into_inner();
        let id = convert::id("datasource_id", &r.datasource_id)?;
        let secrets = self.secrets()?.clone();
        let ctx = self.0.clone();
        let (deleted, warning) = on_datasource(&self.0.pool, &call, id, async |tx, ds, audit| {
            audit.diff = Some(serde_json::json!({ "secret": r.name, "value": "deleted" }));
            let deleted = secrets
                .delete(tx, id, &r.name)
                .await
                .map_err(status::secrets)?;
            let warning = if deleted {
                still_required(&ctx, tx, &ds, &r.name).await?
            } else {
                String::new()
            };
            Ok((deleted, warning))
        })
        .await?;
        Ok(Response::new(pb::DeleteSecretResponse { deleted, warning }))
    }

    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let call = Call::of(&request, "ListSecrets")?;
        let id = convert::id("datasource_id", &request.get_ref().datasource_id)?;
        let client = call::client(&self.0.pool).await?;
        visible(&**client, &call, id, Check::Read(&self.0.auditor)).await?;
        let rows = crate::db::repository::secrets::list(&**client, id)
            .await
            .map_err(status::db)?;
        Ok(Response::new(pb::ListSecretsResponse {
            secrets: rows.into_iter().map(meta).collect(),
        }))
    }
}
