//! The `Catalog` service: the connector kinds, their schemas and health.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::call::{self, Call};
use super::convert::MAX_CONFIG_BYTES;
use super::datasources::{Check, visible};
use super::status::{self, invalid};
use super::{Ctx, convert, pb};
use crate::connectors::{ConfigError, Mode};
use crate::db::repository::secrets as secret_rows;

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

    async fn validate_config(
        &self,
        request: Request<pb::ValidateConfigRequest>,
    ) -> Result<Response<pb::ValidateConfigResponse>, Status> {
        let call = Call::of(&request, "ValidateConfig")?;
        let r = request.into_inner();
        let config = convert::json_object("config_json", &r.config_json, MAX_CONFIG_BYTES)?;
        // With a datasource, its kind and stored secret names; without, the kind named.
        let (kind, stored) = if r.datasource_id.is_empty() {
            (r.kind, None)
        } else {
            let id = convert::id("datasource_id", &r.datasource_id)?;
            let client = call::client(&self.0.pool).await?;
            let ds = visible(&**client, &call, id, Check::Read(&self.0.auditor)).await?;
            if !r.kind.is_empty() && r.kind != ds.kind {
                return Err(invalid(
                    "kind",
                    format!(
                        "is {:?}, but datasource {id} is of kind {:?}; leave it empty",
                        r.kind, ds.kind
                    ),
                ));
            }
            let names: Vec<String> = secret_rows::list(&**client, id)
                .await
                .map_err(status::db)?
                .into_iter()
                .map(|m| m.name)
                .collect();
            (ds.kind, Some(names))
        };
        if kind.is_empty() {
            return Err(invalid("kind", "must not be empty without datasource_id"));
        }
        if self.0.catalog.get(&kind).is_none() {
            let known: Vec<&str> = self.0.catalog.kinds().map(|k| k.name).collect();
            return Err(invalid(
                "kind",
                format!(
                    "unknown connector kind {kind:?}; known kinds: {}",
                    known.join(", ")
                ),
            ));
        }
        Ok(Response::new(validation(
            &self.0.catalog,
            &self.0.limits,
            &kind,
            &config,
            stored.as_deref(),
        )))
    }
}

/// Checks `config` for `kind` as a publish would; `stored`: the datasource's stored secret
/// names, when a datasource is named (a missing secret is then a problem; otherwise it is only
/// listed as missing).
fn validation(
    catalog: &crate::connectors::Catalog,
    limits: &crate::transform::Limits,
    kind: &str,
    config: &serde_json::Value,
    stored: Option<&[String]>,
) -> pb::ValidateConfigResponse {
    let names = stored.unwrap_or_default();
    let problems: Vec<ConfigError> = match catalog.check(kind, config, names, limits) {
        Ok(()) => Vec::new(),
        Err(problems) => problems
            .into_iter()
            .filter(|p| stored.is_some() || p.missing_secret.is_none())
            .collect(),
    };
    // A panic while listing secrets is among the problems already.
    let needed = catalog.secrets_needed(kind, config).unwrap_or_default();
    let missing = needed
        .iter()
        .filter(|n| !names.contains(n))
        .cloned()
        .collect();
    pb::ValidateConfigResponse {
        valid: problems.is_empty(),
        kind: kind.to_owned(),
        problems: problems
            .into_iter()
            .map(|p| pb::ConfigProblem {
                field: p.field,
                reason: p.reason,
                line: p.line.map_or(0, |l| u32::try_from(l).unwrap_or(u32::MAX)),
                missing_secret: p.missing_secret.unwrap_or_default(),
            })
            .collect(),
        secrets_needed: needed,
        secrets_missing: missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever the config's shape, a validation answers (never panics), is valid exactly
        /// when it lists no problem, and every problem says why.
        #[test]
        fn any_config_shape_is_validated_with_every_problem_explained(
            kind in prop::sample::select(vec!["generator", "http_poll", "webhook"]),
            keys in prop::collection::btree_map(
                prop_oneof![
                    Just("rate_per_sec".to_owned()), Just("template".to_owned()),
                    Just("url".to_owned()), Just("transform".to_owned()),
                    Just("interval_ms".to_owned()), "[a-z_]{1,8}",
                ],
                any_value(),
                0..5,
            ),
            datasource in any::<bool>(),
        ) {
            let catalog = crate::connectors::Catalog::builtin();
            let limits = crate::transform::Limits::default();
            let config = Value::Object(keys.into_iter().collect());
            let stored: Vec<String> = Vec::new();
            let answer = validation(
                &catalog,
                &limits,
                kind,
                &config,
                datasource.then_some(stored.as_slice()),
            );
            prop_assert_eq!(answer.valid, answer.problems.is_empty());
            prop_assert!(answer.problems.iter().all(|p| !p.reason.is_empty()));
            prop_assert!(answer.secrets_missing.iter().all(|s| answer.secrets_needed.contains(s)));
            if !datasource {
                prop_assert!(answer.problems.iter().all(|p| p.missing_secret.is_empty()));
            }
        }
    }

    #[test]
    fn a_valid_generator_config_has_no_problem() {
        let answer = validation(
            &crate::connectors::Catalog::builtin(),
            &crate::transform::Limits::default(),
            "generator",
            &json!({ "rate_per_sec": 0, "template": {} }),
            None,
        );
        assert!(answer.valid, "{answer:?}");
    }
}
