//! One datasource's worker: a task that runs its connector, restarts it with backoff when it
//! fails (a panic counts as a failure), swaps in a new spec on hot reload, and stops on its
//! token — cooperatively, then by abort after the stop deadline. Every transition goes to
//! the state writer with its event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::backoff::{BackoffPolicy, Failures};
use super::writer::WriterHandle;
use crate::connectors::sink::Sink;
use crate::connectors::webhook::Ingress;
use crate::connectors::{Connector, CursorStore, Error, Health, RunContext, SecretMap};
use crate::db::repository::events::NewEvent;
use crate::db::repository::state::Transition;
use crate::domain::WorkerStatus;
use crate::transform::Transform;

/// Worker failure log lines, across all workers: at most this many a second, each with the
/// count held back (a thousand workers failing together must not flood the log).
static FAILURE_LINES: crate::telemetry::throttle::Throttle =
    crate::telemetry::throttle::Throttle::new(20);

/// What a worker runs: a validated version of a datasource.
#[derive(Clone)]
pub struct Spec {
    /// The datasource.
    pub datasource_id: Uuid,
    /// The published version.
    pub version: i32,
    /// The restart generation it was built for.
    pub generation: i64,
    /// The lease epoch it runs under: everything it writes carries it.
    pub epoch: i64,
    /// The version's config.
    pub config: Arc<serde_json::Value>,
    /// The kind.
    pub connector: Arc<dyn Connector>,
    /// The version's compiled transform.
    pub transform: Transform,
    /// The datasource's secrets, opened for this run.
    pub secrets: SecretMap,
    /// The trace context of the reconcile that asked for it: the worker's start and stop
    /// spans are its children (a context, not the span, so the reconcile span can close).
    pub trace: opentelemetry::Context,
}

/// A worker's start, reported to observers (benchmarks and tests).
#[derive(Debug, Clone, Copy)]
pub struct Started {
    /// The datasource.
    pub datasource_id: Uuid,
    /// The version now running.
    pub version: i32,
    /// When its connector was spawned.
    pub at: Instant,
}

/// What every worker shares.
#[derive(Clone)]
pub struct WorkerEnv {
    /// Where records go.
    pub sink: Sink,
    /// Where transitions go.
    pub writer: WriterHandle,
    /// Restart pacing.
    pub backoff: BackoffPolicy,
    /// How long a stopping connector gets before it is aborted.
    pub stop_deadline: Duration,
    /// The instance the workers run on (whose leases fence their writes).
    pub instance: String,
    /// Start observer.
    pub started: Option<mpsc::UnboundedSender<Started>>,
    /// For the pull sources' cursors (bounded slots on the shared pool).
    pub pool: crate::connectors::CursorDb,
    /// The push sources' inboxes.
    pub ingress: Ingress,
}

/// A transition to `status` on `version`, recorded by an `event` with `payload`.
pub(super) fn transition(
    id: Uuid,
    epoch: i64,
    status: WorkerStatus,
    version: i32,
    event: &str,
    payload: serde_json::Value,
) -> Transition {
    Transition {
        datasource_id: id,
        epoch,
        status: Some(status),
        running_version: Some(version),
        error: None,
        restart_count: None,
        event: Some(NewEvent {
            at: None,
            datasource_id: Some(id),
            kind: event.to_owned(),
            version: Some(version),
            payload,
        }),
    }
}

enum Next {
    Stop,
    Reload,
    Exited(Result<Result<(), Error>, tokio::task::JoinError>),
}

/// Runs a worker until `cancel` fires. `previous` is the datasource's former worker, still
/// stopping: this one starts only after it has finished, so a datasource never runs twice.
/// `lease` (the parent of `cancel`) fires when the instance's leases ran out: the connector
/// is then aborted at once rather than given the stop deadline.
pub async fn run(
    mut spec_rx: watch::Receiver<Arc<Spec>>,
    previous: Option<JoinHandle<()>>,
    env: WorkerEnv,
    health: Health,
    cancel: CancellationToken,
    lease: CancellationToken,
) {
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    let mut spec = spec_rx.borrow_and_update().clone();
    let id = spec.datasource_id;
    let mut failures = Failures::new(env.backoff.clone());
    let mut reloaded = false;
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let start_span = tracing::info_span!(
            parent: None,
            "worker.start",
            datasource = %id,
            version = spec.version,
            reload = reloaded,
            trace_id = tracing::field::Empty,
        );
        crate::telemetry::child_of(&start_span, &spec.trace);
        env.writer.send(transition(
            id,
            spec.epoch,
            WorkerStatus::Starting,
            spec.version,
            "worker_starting",
            json!({}),
        ));
        let run_cancel = cancel.child_token();
        let ctx = RunContext {
            datasource_id: id,
            version: spec.version,
            config: spec.config.clone(),
            secrets: spec.secrets.clone(),
            sink: env.sink.handle(
                id,
                spec.version,
                spec.epoch,
                spec.transform.clone(),
                health.clone(),
            ),
            cursor: CursorStore::new(
                env.pool.clone(),
                id,
                crate::db::repository::state::Writer {
                    generation: spec.generation,
                    instance: env.instance.clone(),
                    epoch: spec.epoch,
                },
            ),
            ingress: env.ingress.clone(),
            cancel: run_cancel.clone(),
            health: health.clone(),
        };
        // A connector runs in a task of its own (its `run` called there too), so a panic is
        // caught here, not in the registry.
        let connector = spec.connector.clone();
        let mut run = tokio::spawn(crate::telemetry::panics::scoped(id, async move {
            connector.run(ctx).await
        }));
        health.set_running(true);
        if let Some(observer) = &env.started {
            let _ = observer.send(Started {
                datasource_id: id,
                version: spec.version,
                at: Instant::now(),
            });
        }
        let mut running = transition(
            id,
            spec.epoch,
            WorkerStatus::Running,
            spec.version,
            if reloaded {
                "reload_applied"
            } else {
                "worker_running"
            },
            json!({ "restart_count": failures.count() }),
        );
        running.restart_count = Some(failures.count() as i32);
        // A healthy start after a reload clears a previous rejection or failure.
        running.error = Some(None);
        env.writer.send(running);
        // The start is done: the span closes (and is exported) now, not when the worker ends.
        drop(start_span);

        // Biased: a stop wins over the connector's own return, which the same cancellation
        // causes (it would otherwise be recorded as `completed` about a third of the time).
        let next = tokio::select! {
            biased;
            () = cancel.cancelled() => Next::Stop,
            r = &mut run => Next::Exited(r),
            changed = spec_rx.changed() => if changed.is_ok() { Next::Reload } else { Next::Stop },
        };
        health.set_running(false);
        // The connector may have returned just as the stop came: still a stop (its task has
        // ended, so there is nothing left to wait for).
        if matches!(next, Next::Exited(_)) && cancel.is_cancelled() {
            stopped(&env, &spec, false, "stopped");
            return;
        }
        let outcome = match next {
            Next::Stop => {
                let stop_span =
                    tracing::info_span!("worker.stop", datasource = %id, version = spec.version);
                // With the leases gone there is no time to wait: abort now.
                let deadline = if lease.is_cancelled() {
                    Duration::ZERO
                } else {
                    env.stop_deadline
                };
                let aborted = stop_run(run, &run_cancel, deadline)
                    .instrument(stop_span)
                    .await;
                stopped(&env, &spec, aborted, "stopped");
                return;
            }
            Next::Reload => {
                let next = spec_rx.borrow_and_update().clone();
                let stop_span = tracing::info_span!(
                    parent: None,
                    "worker.stop",
                    datasource = %id,
                    version = spec.version,
                    reload = true,
                    trace_id = tracing::field::Empty,
                );
                crate::telemetry::child_of(&stop_span, &next.trace);
                let aborted = stop_run(run, &run_cancel, env.stop_deadline)
                    .instrument(stop_span)
                    .await;
                if aborted {
                    stopped(&env, &spec, true, "reload");
                }
                spec = next;
                failures.reset();
                reloaded = true;
                continue;
            }
            Next::Exited(outcome) => outcome,
        };
        reloaded = false;
        let (code, message, retryable) = match outcome {
            Ok(Ok(())) => {
                // The connector finished its work (a bounded generator): stopped until a
                // new version or a stop.
                stopped(&env, &spec, false, "completed");
                if wait_for_change(&mut spec_rx, &cancel).await {
                    spec = spec_rx.borrow_and_update().clone();
                    failures.reset();
                    reloaded = true;
                    continue;
                }
                return;
            }
            Ok(Err(e)) => (e.code(), e.to_string(), e.is_retryable()),
            Err(join) if join.is_panic() => (
                "connector_panicked",
                "the connector panicked".to_owned(),
                true,
            ),
            Err(_) => (
                "connector_aborted",
                "the connector was aborted".to_owned(),
                true,
            ),
        };
        let verdict = failures.record(Instant::now(), rand::random::<f64>());
        if let Some(suppressed) = FAILURE_LINES.admit() {
            tracing::warn!(
                datasource_id = %id,
                version = spec.version,
                code,
                message = %message,
                restart_count = verdict.failures,
                crash_loop = verdict.crash_loop,
                suppressed,
                "worker failed"
            );
        }
        let status = if verdict.crash_loop {
            WorkerStatus::CrashLoop
        } else {
            WorkerStatus::Error
        };
        let mut failed = transition(
            id,
            spec.epoch,
            status,
            spec.version,
            "worker_error",
            json!({
                "code": code,
                "message": message,
                "restart_count": verdict.failures,
                "retry_in_ms": retryable.then_some(verdict.delay.as_millis() as u64),
                "crash_loop": verdict.crash_loop,
            }),
        );
        failed.error = Some(Some((code.to_owned(), message)));
        failed.restart_count = Some(verdict.failures as i32);
        env.writer.send(failed);
        if !retryable {
            // Only a new version can help.
            if wait_for_change(&mut spec_rx, &cancel).await {
                spec = spec_rx.borrow_and_update().clone();
                failures.reset();
                reloaded = true;
                continue;
            }
            stopped(&env, &spec, false, "stopped");
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(verdict.delay) => {}
            () = cancel.cancelled() => {
                stopped(&env, &spec, false, "stopped");
                return;
            }
            changed = spec_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                spec = spec_rx.borrow_and_update().clone();
                failures.reset();
                reloaded = true;
            }
        }
    }
}

/// Waits for a new spec (true) or cancellation (false).
async fn wait_for_change(
    spec_rx: &mut watch::Receiver<Arc<Spec>>,
    cancel: &CancellationToken,
) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        changed = spec_rx.changed() => changed.is_ok(),
    }
}

/// Cancels a run and waits up to `deadline` for it; aborts it after that. Returns whether it
/// had to be aborted.
async fn stop_run(
    mut run: JoinHandle<Result<(), Error>>,
    run_cancel: &CancellationToken,
    deadline: Duration,
) -> bool {
    run_cancel.cancel();
    match tokio::time::timeout(deadline, &mut run).await {
        Ok(_) => false,
        Err(_) => {
            run.abort();
            let _ = run.await;
            true
        }
    }
}

fn stopped(env: &WorkerEnv, spec: &Spec, aborted: bool, reason: &str) {
    env.writer.send(transition(
        spec.datasource_id,
        spec.epoch,
        WorkerStatus::Stopped,
        spec.version,
        "worker_stopped",
        json!({ "reason": reason, "aborted": aborted }),
    ));
}
