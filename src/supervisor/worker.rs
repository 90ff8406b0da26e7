//! One datasource's worker: a task that runs its connector, restarts it with backoff when it
//! fails (a panic counts as a failure; a source that refuses waits the long delay), swaps in a
//! new spec on hot reload once the new spec's preflight passed, and stops on its token —
//! cooperatively, then by abort after the stop deadline. Every transition goes to the state
//! writer with its event; `running` is written only once the connector reports it works.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::writer::WriterHandle;
use crate::backoff::{BackoffPolicy, Failures};
use crate::connectors::sink::Sink;
use crate::connectors::webhook::Ingress;
use crate::connectors::{
    Connector, CursorStore, Error, Health, LeaseCheck, Retry, RunContext, SecretMap,
};
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
    /// The source position read with the desired state, when that read is surely current
    /// (`Some(None)`: none saved); a fresh worker's first run starts from it without reading
    /// it again.
    pub cursor: Option<Option<serde_json::Value>>,
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

/// How long a new version's [`Connector::preflight`] may take before the reload is rejected.
const PREFLIGHT_BOUND: Duration = Duration::from_secs(5);

enum Next {
    Stop,
    /// A new spec that passed its preflight.
    Reload(Arc<Spec>),
    Exited(Result<Result<(), Error>, tokio::task::JoinError>),
}

/// What a run's wait ended with.
enum Woke {
    Stop,
    Changed,
    /// Time to check a rejected version again.
    Retry,
    Working,
    Exited(Result<Result<(), Error>, tokio::task::JoinError>),
}

/// Runs a worker until `cancel` fires. `previous` is the datasource's former worker, still
/// stopping: this one starts only after it has finished, so a datasource never runs twice.
/// `lease` (the parent of `cancel`) fires when the instance's leases ran out: the connector
/// is then aborted at once rather than given the stop deadline; `check` says, before every
/// external action of the connector, whether the leases still surely hold.
///
/// The state it writes is the truth: `starting` from the spawn until the connector reports
/// that it works, then `running` (which clears the last error); a failure shows until then.
/// A new version replaces a running one only once its preflight passed (make before break);
/// otherwise the old one keeps running, the reload is rejected, and the new version is checked
/// again with growing delays (the backoff's base up to its cap) until it passes or another
/// version comes. A new version that reaches the same endpoints as a running version that
/// works needs no preflight: the running one shows they can be reached.
pub async fn run(
    mut spec_rx: watch::Receiver<Arc<Spec>>,
    previous: Option<JoinHandle<()>>,
    env: WorkerEnv,
    health: Health,
    cancel: CancellationToken,
    lease: CancellationToken,
    check: LeaseCheck,
) {
    // A former worker may have saved a position after the supervisor read it: then the
    // first run reads it too.
    let ran_before = previous.is_some();
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    let mut spec = spec_rx.borrow_and_update().clone();
    let id = spec.datasource_id;
    // What every run of this worker knows of the source position: first the one read with
    // the spec, then what each run read or saved, so a reload or a restart starts without
    // reading it again.
    let cursor =
        CursorStore::new(env.pool.clone(), id, writer_of(&env, &spec)).with_known(if ran_before {
            None
        } else {
            spec.cursor.clone()
        });
    let mut failures = Failures::new(env.backoff.clone());
    let mut reloaded = false;
    // A new version that failed its preflight, how many times it was checked again, and when
    // it is checked next: it stays pending through restarts of the running version, until it
    // passes or another version comes.
    let mut rejected: Option<(Arc<Spec>, u32, tokio::time::Instant)> = None;
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
            sink: env
                .sink
                .handle(
                    id,
                    spec.version,
                    spec.epoch,
                    spec.transform.clone(),
                    health.clone(),
                )
                .fenced(check.clone()),
            cursor: cursor.for_writer(writer_of(&env, &spec)),
            ingress: env.ingress.clone(),
            cancel: run_cancel.clone(),
            health: health.clone(),
            lease: check.clone(),
        };
        // Before the spawn: the new run starts out not working.
        health.set_running(true);
        // A connector runs in a task of its own (its `run` called there too), so a panic is
        // caught here, not in the registry.
        let connector = spec.connector.clone();
        let mut run = tokio::spawn(crate::telemetry::panics::scoped(id, async move {
            connector.run(ctx).await
        }));
        if let Some(observer) = &env.started {
            let _ = observer.send(Started {
                datasource_id: id,
                version: spec.version,
                at: Instant::now(),
            });
        }
        // The start is done: the span closes (and is exported) now, not when the worker ends.
        drop(start_span);

        let mut working_since: Option<Instant> = None;
        let next = loop {
            let retry_at = rejected.as_ref().map(|(_, _, at)| *at);
            let woke = tokio::select! {
                biased;
                () = cancel.cancelled() => Woke::Stop,
                changed = spec_rx.changed() => if changed.is_ok() { Woke::Changed } else { Woke::Stop },
                r = &mut run => Woke::Exited(r),
                () = health.until_working(), if working_since.is_none() => Woke::Working,
                () = sleep_until(retry_at), if retry_at.is_some() => Woke::Retry,
            };
            match woke {
                Woke::Stop => break Next::Stop,
                Woke::Exited(r) => break Next::Exited(r),
                Woke::Working => {
                    working_since = Some(Instant::now());
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
                        json!({ "failures_since_healthy": failures.count() }),
                    );
                    running.restart_count = Some(failures.count() as i32);
                    // The connector works: the last failure is over, and so is a rejection
                    // unless a rejected version is still waiting.
                    if rejected.is_none() {
                        running.error = Some(None);
                    }
                    env.writer.send(running);
                }
                Woke::Changed | Woke::Retry => {
                    let (candidate, tries) = match woke {
                        Woke::Changed => (spec_rx.borrow_and_update().clone(), 0),
                        _ => match rejected.take() {
                            Some((candidate, tries, _)) => (candidate, tries + 1),
                            None => continue,
                        },
                    };
                    let checked = if health.is_working() && same_reach(&spec, &candidate) {
                        // The running version works against the very endpoints the new one
                        // names: they are reachable, and another connection shows nothing
                        // more.
                        Ok(())
                    } else {
                        tokio::select! {
                            biased;
                            () = cancel.cancelled() => break Next::Stop,
                            checked = preflight(&candidate) => checked,
                        }
                    };
                    match checked {
                        Ok(()) => break Next::Reload(candidate),
                        Err(reason) => {
                            if tries == 0 {
                                reject(&env, &spec, &candidate, reason);
                            } else {
                                tracing::debug!(datasource_id = %id, version = candidate.version, tries, reason, "the rejected version still cannot start");
                            }
                            // Checked again later (a resolver or network blip passes); the
                            // running version stays meanwhile.
                            let delay = env.backoff.exponential().ceiling(tries + 1);
                            rejected =
                                Some((candidate, tries, tokio::time::Instant::now() + delay));
                        }
                    }
                }
            }
        };
        let worked = working_since.is_some_and(|at| at.elapsed() >= env.backoff.window);
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
            Next::Reload(next) => {
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
                adopt(&cursor, &spec, &next);
                spec = next;
                rejected = None;
                failures.reset();
                reloaded = true;
                continue;
            }
            Next::Exited(outcome) => outcome,
        };
        reloaded = false;
        if worked {
            // It worked for a whole window: this failure starts a new count.
            failures.reset();
        }
        let (code, message, retry) = match outcome {
            Ok(Ok(())) => {
                // The connector finished its work (a bounded generator): stopped until a
                // new version or a stop.
                stopped(&env, &spec, false, "completed");
                if wait_for_change(&mut spec_rx, &cancel).await {
                    let next = spec_rx.borrow_and_update().clone();
                    adopt(&cursor, &spec, &next);
                    spec = next;
                    rejected = None;
                    failures.reset();
                    reloaded = true;
                    continue;
                }
                return;
            }
            Ok(Err(e)) => (e.code(), e.to_string(), e.retry()),
            Err(join) if join.is_panic() => (
                "connector_panicked",
                "the connector panicked".to_owned(),
                Retry::Backoff,
            ),
            Err(_) => (
                "connector_aborted",
                "the connector was aborted".to_owned(),
                Retry::Backoff,
            ),
        };
        let jitter = rand::random::<f64>();
        let verdict = match retry {
            Retry::Permanent => failures.refused(jitter),
            Retry::NotBefore(after) => {
                let mut verdict = failures.record(Instant::now(), jitter);
                verdict.delay = verdict.delay.max(after);
                verdict
            }
            Retry::Backoff | Retry::Never => failures.record(Instant::now(), jitter),
        };
        let retryable = retry != Retry::Never;
        if let Some(suppressed) = FAILURE_LINES.admit() {
            tracing::warn!(
                datasource_id = %id,
                version = spec.version,
                code,
                message = %message,
                failures_since_healthy = verdict.failures,
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
                "failures_since_healthy": verdict.failures,
                "retry_in_ms": retryable.then_some(verdict.delay.as_millis() as u64),
                "crash_loop": verdict.crash_loop,
                "permanent": retry == Retry::Permanent,
            }),
        );
        failed.error = Some(Some((code.to_owned(), message)));
        failed.restart_count = Some(verdict.failures as i32);
        env.writer.send(failed);
        if !retryable {
            // Only a new version can help.
            if wait_for_change(&mut spec_rx, &cancel).await {
                let next = spec_rx.borrow_and_update().clone();
                adopt(&cursor, &spec, &next);
                spec = next;
                rejected = None;
                failures.reset();
                reloaded = true;
                continue;
            }
            stopped(&env, &spec, false, "stopped");
            return;
        }
        tokio::select! {
            biased;
            () = cancel.cancelled() => {
                stopped(&env, &spec, false, "stopped");
                return;
            }
            changed = spec_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let next = spec_rx.borrow_and_update().clone();
                adopt(&cursor, &spec, &next);
                spec = next;
                rejected = None;
                failures.reset();
                reloaded = true;
            }
            () = tokio::time::sleep(verdict.delay) => {}
        }
    }
}

/// Whose cursor saves a run of `spec` makes.
fn writer_of(env: &WorkerEnv, spec: &Spec) -> crate::db::repository::state::Writer {
    crate::db::repository::state::Writer {
        generation: spec.generation,
        instance: env.instance.clone(),
        epoch: spec.epoch,
    }
}

/// A new spec under another restart generation or lease epoch (a restart or backfill asked
/// for, a lease taken again) starts from the position read with it: what the runs before
/// knew may have been replaced by the backfill.
fn adopt(cursor: &CursorStore, old: &Spec, new: &Spec) {
    if (old.generation, old.epoch) != (new.generation, new.epoch) {
        cursor.reset(new.cursor.clone());
    }
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether `candidate` reaches exactly the endpoints `running` does (same kind, the same
/// non-empty [`Connector::destinations`]): then a running version that works shows they can
/// be reached. The kind's code runs contained: a panic is "not known to be the same".
fn same_reach(running: &Spec, candidate: &Spec) -> bool {
    if running.connector.info().name != candidate.connector.info().name {
        return false;
    }
    let of = |spec: &Spec| {
        crate::connectors::contain::contain("destinations", || {
            spec.connector.destinations(&spec.config)
        })
        .ok()
        .and_then(Result::ok)
    };
    matches!((of(running), of(candidate)), (Some(a), Some(b)) if !a.is_empty() && a == b)
}

/// Make before break: whether `candidate` can start, bounded by [`PREFLIGHT_BOUND`].
async fn preflight(candidate: &Spec) -> Result<(), String> {
    let span = tracing::info_span!(
        "worker.preflight",
        datasource = %candidate.datasource_id,
        version = candidate.version,
    );
    let check = candidate
        .connector
        .preflight(&candidate.config, PREFLIGHT_BOUND);
    match tokio::time::timeout(PREFLIGHT_BOUND, check)
        .instrument(span)
        .await
    {
        Ok(result) => result,
        Err(_) => Err(format!(
            "the new version could not show within {} ms that it can start",
            PREFLIGHT_BOUND.as_millis()
        )),
    }
}

/// The new version failed its preflight: the running one stays, the rejection is on record.
fn reject(env: &WorkerEnv, running: &Spec, candidate: &Spec, reason: String) {
    tracing::info!(
        datasource_id = %running.datasource_id,
        version = candidate.version,
        running_version = running.version,
        reason,
        "reload rejected: the new version cannot start; the running one stays"
    );
    env.writer.send(Transition {
        datasource_id: running.datasource_id,
        epoch: running.epoch,
        status: None,
        running_version: None,
        error: Some(Some(("reload_rejected".into(), reason.clone()))),
        restart_count: None,
        event: Some(NewEvent {
            at: None,
            datasource_id: Some(running.datasource_id),
            kind: "reload_rejected".into(),
            version: Some(candidate.version),
            payload: json!({
                "code": "preflight_failed",
                "reason": reason,
                "running_version": running.version,
            }),
        }),
    });
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
