//! The `Lifecycle` service: start, stop, restart, reload and backfill write the tables (the
//! owning instance applies them through the normal path), then wait for the worker to reach
//! the asked-for state within the call's deadline; status reads and watches.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::call::{self, Call};
use super::datasources::{Check, admit, on_datasource, visible};
use super::status;
use super::{Ctx, convert, pb};
use crate::db::repository::datasources::Datasource;
use crate::db::repository::state::{self, State, WorkerOutcome};
use crate::domain::{DatasourceStatus, DesiredState, WorkerStatus};
use crate::supervisor::ops::{self, Op};

/// How often a wait re-reads the state when nothing wakes it (a worker owned by another
/// instance).
const POLL: Duration = Duration::from_millis(100);

/// The service.
#[derive(Clone)]
pub struct LifecycleService(pub Arc<Ctx>);

/// What a lifecycle call waits for.
#[derive(Debug, Clone, Copy)]
enum Goal {
    /// Running the published version (when there is one to run); with `after`, a start of the
    /// worker recorded after that event (the request's own), so what an earlier run did never
    /// answers for this request.
    Running { after: Option<i64> },
    /// Not running.
    Stopped,
}

/// Where a wait stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reached {
    /// The state the call asked for.
    Yes,
    /// Not yet: keep waiting.
    NotYet,
    /// The request ended otherwise (the restart was refused, or the worker failed): the
    /// answer is the state it produced, not settled.
    Failed,
}

fn reached(goal: Goal, ds: &Datasource, s: &State, outcome: Option<WorkerOutcome>) -> Reached {
    let can_run = ds.status == DatasourceStatus::Active
        && s.desired == DesiredState::Running
        && ds.current_version.is_some();
    let running =
        s.worker_status == WorkerStatus::Running && s.running_version == ds.current_version;
    match goal {
        Goal::Running { .. } if !can_run => Reached::Yes,
        Goal::Running { after: None } if running => Reached::Yes,
        Goal::Running { after: None } => Reached::NotYet,
        Goal::Running { after: Some(_) } => match outcome {
            Some(WorkerOutcome::Failed) => Reached::Failed,
            Some(WorkerOutcome::Running) if running => Reached::Yes,
            _ => Reached::NotYet,
        },
        Goal::Stopped if matches!(s.worker_status, WorkerStatus::Stopped | WorkerStatus::Init) => {
            Reached::Yes
        }
        Goal::Stopped => Reached::NotYet,
    }
}

impl LifecycleService {
    /// Reads the datasource and its state until `goal` is reached or the budget is spent.
    async fn wait(&self, call: &Call, id: Uuid, goal: Goal) -> Result<pb::WorkerState, Status> {
        let mut wake = self.0.activity.subscribe_to(id);
        let until = tokio::time::Instant::now() + call.wait_budget();
        loop {
            let (ds, s) = read(&self.0, call, id).await?;
            let outcome = match goal {
                Goal::Running { after: Some(mark) } => {
                    let client = call::client(&self.0.pool).await?;
                    state::outcome_since(&**client, id, mark)
                        .await
                        .map_err(status::db)?
                }
                _ => None,
            };
            let reached = reached(goal, &ds, &s, outcome);
            if reached != Reached::NotYet || tokio::time::Instant::now() >= until {
                return Ok(convert::worker_state(&ds, s, reached == Reached::Yes));
            }
            let _ = tokio::time::timeout_at(
                until.min(tokio::time::Instant::now() + POLL),
                wake.changed(),
            )
            .await;
        }
    }

    /// Runs one lifecycle operation in an audited transaction (after `check` admits the
    /// datasource), then waits for `goal`.
    async fn act(
        &self,
        call: Call,
        op: Op,
        goal: Goal,
        check: impl FnOnce(&Datasource) -> Result<(), Status>,
    ) -> Result<Response<pb::WorkerState>, Status> {
        let id = match &op {
            Op::Start(id) | Op::Stop(id) | Op::Restart(id) | Op::Backfill(id, _) => *id,
            Op::Reload(id) => {
                id.ok_or_else(|| Status::invalid_argument("datasource_id is required"))?
            }
        };
        let applied = on_datasource(&self.0.pool, &call, id, async |tx, ds, _| {
            check(&ds)?;
            ops::write(tx, &op).await.map_err(status::db)
        })
        .await?;
        let goal = match goal {
            Goal::Running { .. } => Goal::Running {
                after: applied.mark,
            },
            other => other,
        };
        Ok(Response::new(self.wait(&call, id, goal).await?))
    }
}

/// A datasource the caller may see and its state, read with whatever other status reads are
/// queued at the same time (see [`super::reads`]).
async fn read(ctx: &Ctx, call: &Call, id: Uuid) -> Result<(Datasource, State), Status> {
    let (ds, s) = ctx.reads.read(id).await?;
    Ok((admit(ds, call, Check::Read(&ctx.auditor)).await?, s))
}

fn datasource_id<T>(request: &Request<T>, value: impl Fn(&T) -> &str) -> Result<Uuid, Status> {
    convert::id("datasource_id", value(request.get_ref()))
}

type StateStream = Pin<Box<dyn Stream<Item = Result<pb::WorkerState, Status>> + Send>>;

#[tonic::async_trait]
impl pb::lifecycle_server::Lifecycle for LifecycleService {
    async fn start_worker(
        &self,
        request: Request<pb::LifecycleRequest>,
    ) -> Result<Response<pb::WorkerState>, Status> {
        let call = Call::of(&request, "StartWorker")?;
        let id = datasource_id(&request, |r| &r.datasource_id)?;
        let goal = Goal::Running { after: None };
        self.act(call, Op::Start(id), goal, |_| Ok(())).await
    }

    async fn stop_worker(
        &self,
        request: Request<pb::LifecycleRequest>,
    ) -> Result<Response<pb::WorkerState>, Status> {
        let call = Call::of(&request, "StopWorker")?;
        let id = datasource_id(&request, |r| &r.datasource_id)?;
        self.act(call, Op::Stop(id), Goal::Stopped, |_| Ok(()))
            .await
    }

    async fn restart_worker(
        &self,
        request: Request<pb::LifecycleRequest>,
    ) -> Result<Response<pb::WorkerState>, Status> {
        let call = Call::of(&request, "RestartWorker")?;
        let id = datasource_id(&request, |r| &r.datasource_id)?;
        let goal = Goal::Running { after: None };
        self.act(call, Op::Restart(id), goal, |_| Ok(())).await
    }

    async fn reload_worker(
        &self,
        request: Request<pb::LifecycleRequest>,
    ) -> Result<Response<pb::WorkerState>, Status> {
        let call = Call::of(&request, "ReloadWorker")?;
        let id = datasource_id(&request, |r| &r.datasource_id)?;
        let goal = Goal::Running { after: None };
        self.act(call, Op::Reload(Some(id)), goal, |_| Ok(())).await
    }

    async fn backfill(
        &self,
        request: Request<pb::BackfillRequest>,
    ) -> Result<Response<pb::WorkerState>, Status> {
        let call = Call::of(&request, "Backfill")?;
        let id = datasource_id(&request, |r| &r.datasource_id)?;
        let from = match request.get_ref().from_cursor_json.as_str() {
            "" => None,
            json => Some(convert::json_document("from_cursor_json", json, 64 * 1024)?),
        };
        let catalog = &self.0.catalog;
        let goal = Goal::Running { after: None };
        let checked = from.clone();
        self.act(call, Op::Backfill(id, from), goal, |ds| {
            let kind = catalog.get(&ds.kind);
            if kind.is_some_and(|c| c.info().can_backfill) {
                // The same check a position reset takes.
                match (kind.and_then(|c| c.position()), &checked) {
                    (Some(format), Some(from)) => {
                        super::positions::check(format, "from_cursor_json", from)
                    }
                    _ => Ok(()),
                }
            } else {
                Err(Status::failed_precondition(format!(
                    "connector kind {} cannot backfill",
                    ds.kind
                )))
            }
        })
        .await
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::WorkerState>, Status> {
        let call = Call::of(&request, "GetStatus")?;
        let id = datasource_id(&request, |r| &r.datasource_id)?;
        let (ds, s) = read(&self.0, &call, id).await?;
        Ok(Response::new(convert::worker_state(&ds, s, true)))
    }

    type WatchStatusStream = StateStream;

    async fn watch_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<StateStream>, Status> {
        let call = Call::of(&request, "WatchStatus")?;
        let id = datasource_id(&request, |r| &r.datasource_id)?;
        let slot = self.0.streams.open(&call.principal)?;
        let ctx = self.0.clone();
        // Checked before the stream starts, so an unknown id is an error, not an empty stream.
        {
            let client = call::client(&ctx.pool).await?;
            visible(&**client, &call, id, Check::Read(&ctx.auditor)).await?;
        }
        let (tx, rx) = mpsc::channel(16);
        let mut wake = ctx.activity.subscribe_to(id);
        // When nothing wakes it, the stream re-reads at the shared clock's ticks (a missed
        // notification; the heartbeat time, which wakes no one), together with every other
        // idle stream, so their reads share statements.
        let mut clock = ctx.reads.reread_clock();
        let shutdown = ctx.shutdown.clone();
        ctx.tracker.clone().spawn(async move {
            let _slot = slot;
            let mut last: Option<pb::WorkerState> = None;
            loop {
                let read = read(&ctx, &call, id)
                    .await
                    .map(|(ds, s)| convert::worker_state(&ds, s, true));
                match read {
                    Ok(state) if last.as_ref() != Some(&state) => {
                        last = Some(state.clone());
                        if tx.send(Ok(state)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    _ = wake.changed() => {}
                    _ = clock.changed() => {}
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream_from(rx))))
    }

    async fn get_datasource_metrics(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::DatasourceMetrics>, Status> {
        let call = Call::of(&request, "GetDatasourceMetrics")?;
        let id = datasource_id(&request, |r| &r.datasource_id)?;
        let (_, s) = read(&self.0, &call, id).await?;
        let count = |key: &str| {
            s.metrics
                .get(key)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        // A worker of this instance answers with its counters now; another instance's, with
        // the snapshot its last heartbeat wrote (snapshot_at says when).
        let live = (s.owner_instance.as_deref() == Some(self.0.instance_id.as_str()))
            .then(|| self.0.metrics.worker_figures(id))
            .flatten();
        let (records, dead_lettered, errors, restarts, progress, snapshot_at) = match &live {
            Some(h) => (
                h.records(),
                h.dead_lettered(),
                h.errors(),
                h.restarts(),
                chrono::DateTime::from_timestamp_millis(h.last_progress_ms())
                    .filter(|_| h.last_progress_ms() > 0),
                Utc::now(),
            ),
            None => (
                count("records_total"),
                count("dead_lettered_total"),
                count("errors_total"),
                count("restarts_total"),
                s.last_progress_at,
                s.updated_at,
            ),
        };
        let lag = progress.map_or(0.0, |t| {
            (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0
        });
        Ok(Response::new(pb::DatasourceMetrics {
            datasource_id: id.to_string(),
            records_total: records,
            dead_lettered_total: dead_lettered,
            errors_total: errors,
            restart_count: s.restart_count,
            failures_since_healthy: s.restart_count,
            restarts_requested: s.restart_generation,
            restarts_total: restarts,
            lag_seconds: lag,
            last_event_at: s.last_event_at.map(convert::timestamp),
            snapshot_at: Some(convert::timestamp(snapshot_at)),
        }))
    }

    async fn restart_workers(
        &self,
        request: Request<pb::RestartWorkersRequest>,
    ) -> Result<Response<pb::RestartWorkersResponse>, Status> {
        let call = Call::of(&request, "RestartWorkers")?;
        let r = request.into_inner();
        let dry_run = r.dry_run;
        let selection = selection(&call, r)?;
        let ids = {
            let client = call::client(&self.0.pool).await?;
            state::select(&**client, &selection)
                .await
                .map_err(status::db)?
        };
        if ids.len() > MAX_RESTARTS {
            return Err(Status::failed_precondition(format!(
                "more than {MAX_RESTARTS} datasources match; narrow the filter"
            )));
        }
        if dry_run {
            let mut found = {
                let client = call::client(&self.0.pool).await?;
                state::with_datasources(&client, &ids)
                    .await
                    .map_err(status::db)?
            };
            let workers = ids
                .iter()
                .filter_map(|id| found.remove(id))
                .map(|(ds, s)| convert::worker_state(&ds, s, false))
                .collect();
            return Ok(Response::new(pb::RestartWorkersResponse {
                workers,
                dry_run,
            }));
        }
        // Each restart is its own audited write, as RestartWorker's; the waits run together.
        let mut marks = Vec::with_capacity(ids.len());
        for id in ids {
            let op = Op::Restart(id);
            let written = on_datasource(&self.0.pool, &call, id, async |tx, _, _| {
                ops::write(tx, &op).await.map_err(status::db)
            })
            .await;
            match written {
                Ok(applied) => marks.push((id, applied.mark)),
                // Gone since it was selected: nothing to restart.
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let waits = marks
            .into_iter()
            .map(|(id, after)| self.wait(&call, id, Goal::Running { after }));
        let workers = futures_util::future::join_all(waits)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(pb::RestartWorkersResponse {
            workers,
            dry_run,
        }))
    }

    async fn get_source_position(
        &self,
        request: Request<pb::GetSourcePositionRequest>,
    ) -> Result<Response<pb::SourcePosition>, Status> {
        super::positions::get(&self.0, request).await
    }

    async fn reset_source_position(
        &self,
        request: Request<pb::ResetSourcePositionRequest>,
    ) -> Result<Response<pb::SourcePosition>, Status> {
        super::positions::reset(&self.0, request).await
    }
}

/// The most datasources one `RestartWorkers` call restarts.
const MAX_RESTARTS: usize = 1_000;

/// The longest filter value `RestartWorkers` takes.
const MAX_FILTER: usize = 256;

/// What a `RestartWorkers` request selects, within the caller's tenant.
fn selection(call: &Call, r: pb::RestartWorkersRequest) -> Result<state::Selection, Status> {
    let statuses = r
        .statuses
        .iter()
        .enumerate()
        .map(|(i, s)| match pb::WorkerStatus::try_from(*s) {
            Ok(pb::WorkerStatus::Error) => Ok(WorkerStatus::Error),
            Ok(pb::WorkerStatus::CrashLoop) => Ok(WorkerStatus::CrashLoop),
            Ok(pb::WorkerStatus::Stalled) => Ok(WorkerStatus::Stalled),
            _ => Err(status::invalid(
                &format!("statuses[{i}]"),
                "selects ERROR, CRASH_LOOP or STALLED workers only",
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if r.datasource_ids.len() > MAX_RESTARTS {
        return Err(status::invalid(
            "datasource_ids",
            format!("names more than {MAX_RESTARTS} datasources"),
        ));
    }
    let ids = r
        .datasource_ids
        .iter()
        .enumerate()
        .map(|(i, id)| convert::id(&format!("datasource_ids[{i}]"), id))
        .collect::<Result<Vec<_>, _>>()?;
    let text = |field: &str, value: String| {
        if value.len() > MAX_FILTER {
            return Err(status::invalid(
                field,
                format!("is longer than {MAX_FILTER} bytes"),
            ));
        }
        Ok((!value.is_empty()).then_some(value))
    };
    let kind = text("kind", r.kind)?;
    let org = text("org", r.org)?;
    let project = text("project", r.project)?;
    let tag = text("tag", r.tag)?;
    if statuses.is_empty()
        && ids.is_empty()
        && [&kind, &org, &project, &tag].iter().all(|f| f.is_none())
    {
        return Err(status::invalid(
            "statuses",
            "give at least one filter (statuses, kind, org, project, tag or datasource_ids)",
        ));
    }
    let tenant = &call.principal.tenant;
    Ok(state::Selection {
        statuses,
        kind,
        org,
        project,
        tag,
        ids: (!ids.is_empty()).then_some(ids),
        tenant_org: tenant.org().map(str::to_owned),
        tenant_projects: tenant.projects().map(<[String]>::to_vec),
        // One more than allowed, to tell a selection that is too big.
        limit: MAX_RESTARTS as i64 + 1,
    })
}

/// A stream of what a channel receives.
pub fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
