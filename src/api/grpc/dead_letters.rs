//! The `DeadLetters` service: list, replay and purge the records workers could not store,
//! within the caller's tenant. A replay runs the records through the datasource's published
//! version with the sink's own edge (the NUL checks and the transform, under the workers'
//! limits) and settles them in one transaction with its audit row and event, so it is applied
//! once: what passed is written to `datasource_records` and removed, what failed stays with
//! the new reason.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::call::{self, Call};
use super::datasources::{Check, live, on_datasource, visible};
use super::status::{self, invalid};
use super::{Ctx, convert, page, pb};
use crate::connectors::sink::{Target, edge};
use crate::db::repository::dead_letters::{self, DeadLetter, Filter, Settled};
use crate::db::repository::events::{self, NewEvent};
use crate::db::repository::versions;
use crate::transform::Transform;

/// Most dead letters one replay takes.
pub const MAX_REPLAY: i64 = 10_000;
/// Dead letters one replay takes when the request does not say.
const DEFAULT_REPLAY: i64 = 1_000;
/// Longest reason code a filter takes.
const MAX_CODE: usize = 64;

/// The service.
#[derive(Clone)]
pub struct DeadLettersService(pub Arc<Ctx>);

/// The filters every call shares: time range, reason code and ids.
fn filter_of(
    since: Option<&prost_types::Timestamp>,
    until: Option<&prost_types::Timestamp>,
    code: &str,
    ids: Vec<i64>,
) -> Result<Filter, Status> {
    convert::text("reason_code", code, MAX_CODE)?;
    if ids.len() > usize::try_from(MAX_REPLAY).unwrap_or(usize::MAX) {
        return Err(invalid(
            "ids",
            format!("lists {} ids; at most {MAX_REPLAY}", ids.len()),
        ));
    }
    Ok(Filter {
        since: since
            .map(|t| convert::from_timestamp("since", t))
            .transpose()?,
        until: until
            .map(|t| convert::from_timestamp("until", t))
            .transpose()?,
        code: (!code.is_empty()).then(|| code.to_owned()),
        ids,
        ..Filter::default()
    })
}

fn message(d: DeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        id: d.id,
        datasource_id: d.datasource_id.to_string(),
        version: d.version,
        record_json: d.record.to_string(),
        reason_code: d.code,
        reason: d.error,
        at: Some(convert::timestamp(d.at)),
        replays: d.replays,
        replayed_at: d.replayed_at.map(convert::timestamp),
    }
}

/// Runs each record through `transform` as the sink's edge does: its outputs, or why not.
fn replay_each(
    records: Vec<serde_json::Value>,
    transform: &Transform,
) -> Vec<Result<Vec<serde_json::Value>, crate::connectors::sink::DeadLetter>> {
    records
        .into_iter()
        .map(|record| {
            let (out, mut dead) = edge(vec![record], Some(transform));
            match dead.pop() {
                Some(refused) => Err(refused),
                None => Ok(out),
            }
        })
        .collect()
}

#[tonic::async_trait]
impl pb::dead_letters_server::DeadLetters for DeadLettersService {
    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let call = Call::of(&request, "ListDeadLetters")?;
        let r = request.into_inner();
        let limit = page::size(r.page_size, 100, 1000)?;
        let mut filter = filter_of(r.since.as_ref(), r.until.as_ref(), &r.reason_code, vec![])?;
        let client = call::client(&self.0.pool).await?;
        if r.datasource_id.is_empty() {
            let tenant = &call.principal.tenant;
            filter.org = tenant.org().map(str::to_owned);
            filter.projects = tenant.projects().map(<[String]>::to_vec);
        } else {
            let id = convert::id("datasource_id", &r.datasource_id)?;
            visible(&**client, &call, id, Check::Read(&self.0.auditor)).await?;
            filter.datasource_id = Some(id);
        }
        let fingerprint = format!(
            "dead_letters|{:?}|{:?}|{:?}|{:?}|{}",
            filter.datasource_id, filter.since, filter.until, filter.code, call.principal.subject
        );
        filter.before_id = self.0.page_key.decode::<i64>(&r.page_token, &fingerprint)?;
        filter.limit = limit + 1;
        let mut rows = dead_letters::list(&**client, &filter)
            .await
            .map_err(status::db)?;
        let more = rows.len() as i64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => self.0.page_key.encode(&last.id, &fingerprint),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: rows.into_iter().map(message).collect(),
            next_page_token,
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<Response<pb::ReplayDeadLettersResponse>, Status> {
        let call = Call::of(&request, "ReplayDeadLetters")?;
        let r = request.into_inner();
        let id = convert::id("datasource_id", &r.datasource_id)?;
        let mut filter = filter_of(r.since.as_ref(), r.until.as_ref(), &r.reason_code, r.ids)?;
        filter.datasource_id = Some(id);
        filter.limit = match i64::from(r.limit) {
            0 => DEFAULT_REPLAY,
            n if (1..=MAX_REPLAY).contains(&n) => n,
            n => return Err(invalid("limit", format!("is {n}; use 1 to {MAX_REPLAY}"))),
        };
        let dry_run = r.dry_run;
        let limits = self.0.limits.clone();
        let to_postgres = matches!(self.0.sink_target, Target::Postgres);
        let answer = on_datasource(&self.0.pool, &call, id, async |tx, ds, audit| {
            live(&ds)?;
            let Some(version) = ds.current_version else {
                return Err(Status::failed_precondition(format!(
                    "datasource {id} has no published version to replay through"
                )));
            };
            if !to_postgres && !dry_run {
                return Err(Status::failed_precondition(
                    "this registry's sink is `http`: replay writes to the `postgres` sink only; \
                     a dry run shows the outcome",
                ));
            }
            audit.version = Some(version);
            let config = versions::get(tx, id, version)
                .await
                .map_err(status::db)?
                .config;
            let transform = crate::connectors::contain::contain("transform", || {
                Transform::from_config(&config, &limits)
            })
            .map_err(|e| Status::failed_precondition(e.to_string()))?
            .map_err(|e| {
                Status::failed_precondition(format!(
                    "version {version}'s transform does not compile here: {e}"
                ))
            })?;
            let rows = dead_letters::lock_for_replay(tx, &filter)
                .await
                .map_err(status::db)?;
            let records: Vec<serde_json::Value> = rows.iter().map(|d| d.record.clone()).collect();
            // A slow record is bounded by the transform's deadline; it runs off the runtime.
            let results = tokio::task::spawn_blocking(move || replay_each(records, &transform))
                .await
                .map_err(|_| Status::unavailable("the registry is shutting down"))?;
            let mut settled = Settled::default();
            let mut outcomes = Vec::with_capacity(rows.len());
            for (row, result) in rows.iter().zip(&results) {
                match result {
                    Ok(outputs) => {
                        settled.passed.push(row.id);
                        settled.records.extend(outputs.iter());
                        outcomes.push(pb::ReplayOutcome {
                            id: row.id,
                            passed: true,
                            records: u32::try_from(outputs.len()).unwrap_or(u32::MAX),
                            ..Default::default()
                        });
                    }
                    Err(refused) => {
                        settled
                            .failed
                            .push((row.id, refused.code, refused.message.as_str()));
                        outcomes.push(pb::ReplayOutcome {
                            id: row.id,
                            passed: false,
                            records: 0,
                            reason_code: refused.code.to_owned(),
                            reason: refused.message.clone(),
                        });
                    }
                }
            }
            let answer = pb::ReplayDeadLettersResponse {
                version,
                passed: u32::try_from(settled.passed.len()).unwrap_or(u32::MAX),
                records_written: u32::try_from(settled.records.len()).unwrap_or(u32::MAX),
                failed: u32::try_from(settled.failed.len()).unwrap_or(u32::MAX),
                dry_run,
                outcomes,
            };
            let summary = serde_json::json!({
                "passed": answer.passed,
                "records_written": answer.records_written,
                "failed": answer.failed,
                "dry_run": dry_run,
            });
            audit.diff = Some(serde_json::json!({ "replayed": summary }));
            if !dry_run && !rows.is_empty() {
                dead_letters::settle(tx, id, version, &settled)
                    .await
                    .map_err(status::db)?;
                events::append(
                    tx,
                    &[NewEvent {
                        datasource_id: Some(id),
                        kind: "dead_letters_replayed".into(),
                        version: Some(version),
                        payload: summary,
                        at: None,
                    }],
                )
                .await
                .map_err(status::db)?;
            }
            Ok(answer)
        })
        .await?;
        Ok(Response::new(answer))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<pb::PurgeDeadLettersRequest>,
    ) -> Result<Response<pb::PurgeDeadLettersResponse>, Status> {
        let call = Call::of(&request, "PurgeDeadLetters")?;
        let r = request.into_inner();
        let id: Uuid = convert::id("datasource_id", &r.datasource_id)?;
        let mut filter = filter_of(r.since.as_ref(), r.until.as_ref(), &r.reason_code, r.ids)?;
        filter.datasource_id = Some(id);
        let purged = on_datasource(&self.0.pool, &call, id, async |tx, _ds, audit| {
            let purged = dead_letters::purge(tx, &filter).await.map_err(status::db)?;
            audit.diff = Some(serde_json::json!({ "purged_dead_letters": purged }));
            if purged > 0 {
                events::append(
                    tx,
                    &[NewEvent {
                        datasource_id: Some(id),
                        kind: "dead_letters_purged".into(),
                        version: None,
                        payload: serde_json::json!({ "purged": purged }),
                        at: None,
                    }],
                )
                .await
                .map_err(status::db)?;
            }
            Ok(purged)
        })
        .await?;
        Ok(Response::new(pb::PurgeDeadLettersResponse { purged }))
    }
}
