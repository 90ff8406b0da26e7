//! The `Harness` service: one sandboxed test run of a stored version or an unsaved config.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::call::Call;
use super::convert::{self, MAX_CONFIG_BYTES};
use super::datasources::{Check, visible};
use super::status::{self, invalid};
use super::{Ctx, call, pb};
use crate::db::repository::versions;
use crate::harness;

/// Most sample documents per run.
const MAX_SAMPLES: usize = 64;
/// Largest sample document.
const MAX_SAMPLE_BYTES: usize = 1024 * 1024;

/// The service.
#[derive(Clone)]
pub struct HarnessService(pub Arc<Ctx>);

#[tonic::async_trait]
impl pb::harness_server::Harness for HarnessService {
    async fn run_test(
        &self,
        request: Request<pb::RunTestRequest>,
    ) -> Result<Response<pb::RunTestResponse>, Status> {
        let call = Call::of(&request, "RunTest")?;
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
        let client = call::client(&self.0.pool).await?;
        let ds = visible(&**client, &call, id, Check::Read(&self.0.auditor)).await?;
        let config = if !r.config_json.is_empty() {
            convert::json_object("config_json", &r.config_json, MAX_CONFIG_BYTES)?
        } else if r.version > 0 {
            versions::get(&**client, id, r.version)
                .await
                .map_err(status::db)?
                .config
        } else {
            versions::published(&**client, id)
                .await
                .map_err(status::db)?
                .ok_or_else(|| Status::failed_precondition("the datasource has no published version; name a version or give config_json"))?
                .config
        };
        // Secrets are opened only to fetch a real sample.
        let secrets = match (&self.0.secrets, r.fetch_sample && samples.is_empty()) {
            (Some(s), true) => s.open_all(&**client, id).await.map_err(status::secrets)?,
            _ => Default::default(),
        };
        drop(client);
        let report = harness::run(
            &self.0.catalog,
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
