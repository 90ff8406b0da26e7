//! The `Harness` service: one sandboxed test run of a stored version or an unsaved config.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::json;
use tokio_postgres::GenericClient;
use tonic::{Request, Response, Status};

use super::call::{Audit, Call};
use super::convert::{self, MAX_CONFIG_BYTES};
use super::datasources::{Check, visible};
use super::status::{self, invalid};
use super::{Ctx, call, pb};
use crate::db::repository::datasources::Datasource;
use crate::db::repository::versions;
use crate::harness::{self, destinations, destinations::Refusal};
use crate::secrets::{self, SecretString};

/// Most sample documents per run.
const MAX_SAMPLES: usize = 64;
/// Largest sample document.
const MAX_SAMPLE_BYTES: usize = 1024 * 1024;

/// Most test credentials per run.
const MAX_TEST_SECRETS: usize = 64;

/// The service.
#[derive(Clone)]
pub struct HarnessService(pub Arc<Ctx>);

/// The caller's test credentials, checked like stored secrets (`None`: none given).
fn test_secrets(
    given: HashMap<String, String>,
) -> Result<Option<BTreeMap<String, SecretString>>, Status> {
    if given.is_empty() {
        return Ok(None);
    }
    if given.len() > MAX_TEST_SECRETS {
        return Err(invalid(
            "test_secrets",
            format!("{} entries; at most {MAX_TEST_SECRETS}", given.len()),
        ));
    }
    let mut out = BTreeMap::new();
    for (name, value) in given {
        secrets::validate_name(&name).map_err(|e| invalid("test_secrets", e.to_string()))?;
        let value = SecretString::new(value)
            .map_err(|e| invalid(&format!("test_secrets.{name}"), e.to_string()))?;
        out.insert(name, value);
    }
    Ok(Some(out))
}

impl HarnessService {
    /// Opens the stored secrets `config` needs for a test run of datasource `ds`, after the
    /// rule that stored secrets follow saved destinations (see
    /// [`harness::destinations`]); `version` is the stored version tried, `None` for an
    /// unsaved config. Audited: the secrets' names and destinations, or the refusal.
    async fn stored_secrets(
        &self,
        client: &impl GenericClient,
        call: &Call,
        ds: &Datasource,
        config: &serde_json::Value,
        version: Option<i32>,
    ) -> Result<BTreeMap<String, SecretString>, Status> {
        let Some(connector) = self.0.catalog.get(&ds.kind) else {
            // The run reports the unknown kind.
            return Ok(BTreeMap::new());
        };
        let required = connector.required_secrets(config);
        if required.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut audit = Audit::datasource(ds);
        audit.version = version;
        let saved = versions::list(client, ds.id).await.map_err(status::db)?;
        let destinations = match destinations::check(
            connector.as_ref(),
            config,
            saved.iter().map(|v| &v.config),
        ) {
            Ok(found) => found,
            Err(Refusal::Config(e)) => return Err(status::harness(harness::Error::Config(e))),
            Err(refusal @ Refusal::Unsaved { .. }) => {
                let refused = Status::permission_denied(refusal.to_string());
                audit.denied = true;
                audit.diff = Some(json!({
                    "secrets": required,
                    "config": if version.is_some() { "saved" } else { "unsaved" },
                }));
                call::record_failure(&self.0.pool, call, &audit, &refused).await;
                return Err(refused);
            }
        };
        audit.diff = Some(json!({
            "secrets": required,
            "destinations": destinations.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "config": if version.is_some() { "saved" } else { "unsaved" },
        }));
        let Some(service) = &self.0.secrets else {
            return Err(Status::failed_precondition(format!(
                "secrets.{}: no master key is configured, so stored secrets cannot be opened; \
                 configure one, or pass test_secrets",
                required[0]
            )));
        };
        let mut opened = service
            .open_all(client, ds.id)
            .await
            .map_err(status::secrets)?;
        let mut chosen = BTreeMap::new();
        for name in required {
            let value = opened.remove(&name).ok_or_else(|| {
                Status::failed_precondition(format!(
                    "secrets.{name}: the datasource has no secret {name:?}; put it, or pass test_secrets"
                ))
            })?;
            chosen.insert(name, value);
        }
        call::record(&self.0.pool, call, &audit).await?;
        Ok(chosen)
    }
}

#[tonic::async_trait]
impl pb::harness_server::Harness for HarnessService {
    async fn run_test(
        &self,
        request: Request<pb::RunTestRequest>,
    ) -> Result<Response<pb::RunTestResponse>, Status> {
        let call = Call::of(&request, "RunTest")?;
        // A slot first: a refused run costs no database work.
        let slot = self.0.harness_slots.take().map_err(status::harness)?;
        let r = request.into_inner();
        let id = convert::id("datasource_id", &r.datasource_id)?;
        if r.samples_json.len() > MAX_SAMPLES {
            return Err(invalid(
                "samples_json",
                format!("{} samples; at most {MAX_SAMPLES}", r.samples_json.len()),
            ));
        }
        let samples = r
            .samples_json
            .iter()
            .enumerate()
            .map(|(i, s)| {
                convert::json_document(&format!("samples_json[{i}]"), s, MAX_SAMPLE_BYTES)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let test_secrets = test_secrets(r.test_secrets)?;
        let client = call::client(&self.0.pool).await?;
        let ds = visible(&**client, &call, id, Check::Read(&self.0.auditor)).await?;
        let (config, version) = if !r.config_json.is_empty() {
            (
                convert::json_object("config_json", &r.config_json, MAX_CONFIG_BYTES)?,
                None,
            )
        } else if r.version > 0 {
            let v = versions::get(&**client, id, r.version)
                .await
                .map_err(status::db)?;
            (v.config, Some(v.version))
        } else {
            let v = versions::published(&**client, id)
                .await
                .map_err(status::db)?
                .ok_or_else(|| Status::failed_precondition("the datasource has no published version; name a version or give config_json"))?;
            (v.config, Some(v.version))
        };
        // Secrets are used only to fetch a real sample: the caller's test credentials, else
        // the stored ones the config needs, if they may go where the config sends them.
        let secrets = match (r.fetch_sample && samples.is_empty(), test_secrets) {
            (false, _) => BTreeMap::new(),
            (true, Some(given)) => given,
            (true, None) => {
                self.stored_secrets(&**client, &call, &ds, &config, version)
                    .await?
            }
        };
        drop(client);
        let report = harness::run(
            &self.0.catalog,
            slot,
            harness::Request {
                kind: ds.kind,
                config,
                samples,
                fetch_sample: r.fetch_sample,
                secrets: Arc::new(secrets),
            },
            &self.0.limits,
            call.timeout,
        )
        .await
        .map_err(status::harness)?;
        Ok(Response::new(pb::RunTestResponse {
            inputs: u32::try_from(report.inputs).unwrap_or(u32::MAX),
            outputs_json: report.outputs.iter().map(ToString::to_string).collect(),
            rejected: report
                .rejected
                .into_iter()
                .map(|x| pb::RejectedRecord {
                    sample: u32::try_from(x.sample).unwrap_or(u32::MAX),
                    index: u32::try_from(x.index).unwrap_or(u32::MAX),
                    code: x.code.to_owned(),
                    message: x.message,
                })
                .collect(),
            logs: report.logs,
            warnings: report.warnings,
            compile_micros: u64::try_from(report.compile.as_micros()).unwrap_or(u64::MAX),
            run_micros: u64::try_from(report.run.as_micros()).unwrap_or(u64::MAX),
        }))
    }
}
