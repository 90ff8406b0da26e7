//! `dsreg status get|watch|metrics` and `dsreg worker start|stop|restart|reload|backfill`: the
//! `Lifecycle` service. A lifecycle call waits on the server for the state it asked for, up to
//! `--timeout` (its gRPC deadline); a worker that has not got there by then is reported with
//! exit code 1, its state printed first.

use std::time::Duration;

use anyhow::bail;

use crate::api::grpc::pb;

use super::connect::ClientArgs;
use super::events::{follow, until_ctrl_c};
use super::input::{parse_duration, parse_json};
use super::json::{ToJson, worker_status};
use super::table;

/// `dsreg status …`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: StatusCommand,
}

#[derive(Debug, clap::Subcommand)]
enum StatusCommand {
    /// Show a datasource's worker state now.
    Get {
        /// The datasource id.
        datasource_id: String,
    },
    /// Follow a datasource's worker state (the current one, then every change) until Ctrl-C.
    Watch {
        /// The datasource id.
        datasource_id: String,
    },
    /// Show a datasource's worker counters.
    Metrics {
        /// The datasource id.
        datasource_id: String,
    },
}

/// `dsreg worker …`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// How long to wait for the worker to get there (the call's deadline; the server waits
    /// at most 30 s).
    #[arg(long, global = true, value_parser = parse_duration, default_value = "30s")]
    timeout: Duration,
    #[command(subcommand)]
    command: WorkerCommand,
}

#[derive(Debug, clap::Subcommand)]
enum WorkerCommand {
    /// Want the worker running; waits until it runs.
    Start {
        /// The datasource id.
        datasource_id: String,
    },
    /// Want the worker stopped; waits until it stops.
    Stop {
        /// The datasource id.
        datasource_id: String,
    },
    /// Restart the worker on its current version; with filters instead of an id, every
    /// worker of an active datasource they all select (`--failed`: those in error,
    /// crash-looping or stalled), one row each with the state it reached.
    Restart {
        /// The datasource id (or select by the filters).
        #[arg(
            required_unless_present_any = ["failed", "status", "kind", "org", "project", "tag", "id"],
            conflicts_with_all = ["failed", "status", "kind", "org", "project", "tag", "id", "dry_run"]
        )]
        datasource_id: Option<String>,
        #[command(flatten)]
        filter: RestartFilter,
    },
    /// Re-read the datasource's tables and apply any difference.
    Reload {
        /// The datasource id.
        datasource_id: String,
    },
    /// Re-read the source from a position (pull kinds that can backfill).
    Backfill {
        /// The datasource id.
        datasource_id: String,
        /// The position to restart from, as the kind's cursor JSON (default: the start).
        #[arg(long, value_name = "JSON", value_parser = parse_json)]
        from_cursor: Option<String>,
    },
}

/// Which workers `worker restart` restarts when no id is given.
#[derive(Debug, Clone, clap::Args)]
struct RestartFilter {
    /// Every worker in error, crash-looping or stalled.
    #[arg(long)]
    failed: bool,
    /// Workers in this status (repeatable).
    #[arg(long, value_name = "STATUS", value_parser = ["error", "crash_loop", "stalled"])]
    status: Vec<String>,
    /// Datasources of this connector kind.
    #[arg(long)]
    kind: Option<String>,
    /// Datasources of this organisation.
    #[arg(long)]
    org: Option<String>,
    /// Datasources of this project.
    #[arg(long)]
    project: Option<String>,
    /// Datasources carrying this tag.
    #[arg(long)]
    tag: Option<String>,
    /// This datasource (repeatable).
    #[arg(long, value_name = "DATASOURCE_ID")]
    id: Vec<String>,
    /// List what would restart; restart nothing.
    #[arg(long)]
    dry_run: bool,
}

impl RestartFilter {
    fn request(self) -> pb::RestartWorkersRequest {
        let mut names = self.status;
        if self.failed {
            names.extend(["error", "crash_loop", "stalled"].map(str::to_owned));
        }
        let mut statuses: Vec<i32> = names
            .iter()
            .map(|name| match name.as_str() {
                "error" => pb::WorkerStatus::Error,
                "crash_loop" => pb::WorkerStatus::CrashLoop,
                _ => pb::WorkerStatus::Stalled,
            } as i32)
            .collect();
        statuses.sort_unstable();
        statuses.dedup();
        pb::RestartWorkersRequest {
            statuses,
            kind: self.kind.unwrap_or_default(),
            org: self.org.unwrap_or_default(),
            project: self.project.unwrap_or_default(),
            tag: self.tag.unwrap_or_default(),
            datasource_ids: self.id,
            dry_run: self.dry_run,
        }
    }
}

/// `worker restart` by filter: a row per selected worker (a JSON line each with `-o json`);
/// fails when one has not reached RUNNING by the deadline.
async fn restart_many(
    client: &super::connect::Client,
    printer: &super::output::Printer,
    filter: RestartFilter,
) -> anyhow::Result<()> {
    let mut lifecycle = client.lifecycle();
    let call = lifecycle.restart_workers(client.request(filter.request()));
    let answer = client.unary(call).await?;
    if printer.is_json() {
        for worker in &answer.workers {
            printer.json(&worker.to_json())?;
        }
    } else {
        printer.text(&restarts_table(&answer))?;
    }
    if answer.dry_run {
        return Ok(());
    }
    let unsettled = answer.workers.iter().filter(|w| !w.settled).count();
    if unsettled > 0 {
        bail!(
            "{unsettled} of {} workers are not running again at the call's deadline; see \
             `dsreg status get ID`",
            answer.workers.len()
        );
    }
    Ok(())
}

/// The workers a `RestartWorkers` call selected, a row each.
pub fn restarts_table(answer: &pb::RestartWorkersResponse) -> String {
    let mut table = table::Table::new([
        "DATASOURCE",
        "STATUS",
        "RUNNING",
        "PUBLISHED",
        "RESTARTS REQUESTED",
        "FAILURES",
        if answer.dry_run {
            "WOULD RESTART"
        } else {
            "SETTLED"
        },
        "ERROR",
    ]);
    for w in &answer.workers {
        table.row([
            w.datasource_id.clone(),
            worker_status(w.status),
            table::version(w.running_version),
            table::version(w.published_version),
            w.restarts_requested.to_string(),
            w.failures_since_healthy.to_string(),
            table::yes(answer.dry_run || w.settled).to_owned(),
            table::truncate(&w.error_code, 40),
        ]);
    }
    let mut text = table.render();
    text.push_str(&format!(
        "{} {}\n",
        answer.workers.len(),
        if answer.dry_run {
            "would restart"
        } else {
            "restarted"
        }
    ));
    text
}

impl StatusArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// The server could not be reached or refused the call.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        let mut client = self.client.connect().await?;
        match self.command {
            StatusCommand::Get { datasource_id } => {
                let state = client
                    .unary(
                        client
                            .lifecycle()
                            .get_status(client.request(pb::GetStatusRequest { datasource_id })),
                    )
                    .await?;
                printer.one(&state, detail)
            }
            StatusCommand::Watch { datasource_id } => {
                let request = pb::GetStatusRequest {
                    datasource_id: datasource_id.clone(),
                };
                let watch = follow(
                    &mut client,
                    || format!("watching {datasource_id}"),
                    |client| {
                        let mut lifecycle = client.lifecycle();
                        let request = request.clone();
                        async move { lifecycle.watch_status(tonic::Request::new(request)).await }
                    },
                    |state: pb::WorkerState| {
                        if printer.is_json() {
                            printer.json(&state.to_json())
                        } else {
                            printer.text(&watch_line(&state))
                        }
                    },
                );
                until_ctrl_c(watch).await
            }
            StatusCommand::Metrics { datasource_id } => {
                let metrics = client
                    .unary(client.lifecycle().get_datasource_metrics(
                        client.request(pb::GetStatusRequest { datasource_id }),
                    ))
                    .await?;
                printer.one(&metrics, metrics_detail)
            }
        }
    }
}

impl WorkerArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// The server could not be reached or refused the call, or the worker did not reach the
    /// wanted state within `--timeout`.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        let client = self.client.connect().await?.with_timeout(self.timeout);
        let mut lifecycle = client.lifecycle();
        let (state, wanted) = match self.command {
            WorkerCommand::Start { datasource_id } => {
                let call =
                    lifecycle.start_worker(client.request(pb::LifecycleRequest { datasource_id }));
                (client.unary(call).await?, "running")
            }
            WorkerCommand::Stop { datasource_id } => {
                let call =
                    lifecycle.stop_worker(client.request(pb::LifecycleRequest { datasource_id }));
                (client.unary(call).await?, "stopped")
            }
            WorkerCommand::Restart {
                datasource_id: Some(datasource_id),
                ..
            } => {
                let call = lifecycle
                    .restart_worker(client.request(pb::LifecycleRequest { datasource_id }));
                (client.unary(call).await?, "restarted")
            }
            WorkerCommand::Restart {
                datasource_id: None,
                filter,
            } => return restart_many(&client, &printer, filter).await,
            WorkerCommand::Reload { datasource_id } => {
                let call =
                    lifecycle.reload_worker(client.request(pb::LifecycleRequest { datasource_id }));
                (client.unary(call).await?, "reloaded")
            }
            WorkerCommand::Backfill {
                datasource_id,
                from_cursor,
            } => {
                let call = lifecycle.backfill(client.request(pb::BackfillRequest {
                    datasource_id,
                    from_cursor_json: from_cursor.unwrap_or_default(),
                }));
                (client.unary(call).await?, "backfilling")
            }
        };
        printer.one(&state, detail)?;
        if !state.settled && !state.error_code.is_empty() {
            bail!(
                "the worker of {} is not {wanted}: {} (status {}); see `dsreg status get {}`",
                state.datasource_id,
                state.error_code,
                worker_status(state.status),
                state.datasource_id
            );
        }
        if !state.settled {
            bail!(
                "the worker of {} is not {wanted} yet (status {}) at the call's deadline; follow \
                 it with `dsreg status watch {}`",
                state.datasource_id,
                worker_status(state.status),
                state.datasource_id
            );
        }
        Ok(())
    }
}

/// A worker state, field by field.
pub fn detail(state: &pb::WorkerState) -> String {
    let error = match (state.error_code.is_empty(), state.error_message.is_empty()) {
        (true, true) => String::new(),
        (false, true) => state.error_code.clone(),
        (true, false) => state.error_message.clone(),
        (false, false) => format!("{}: {}", state.error_code, state.error_message),
    };
    table::fields(&[
        ("datasource", state.datasource_id.clone()),
        ("status", worker_status(state.status)),
        (
            "desired",
            if state.desired_running {
                "running"
            } else {
                "stopped"
            }
            .to_owned(),
        ),
        ("running version", table::version(state.running_version)),
        ("published version", table::version(state.published_version)),
        ("restarts requested", state.restarts_requested.to_string()),
        ("failures", state.failures_since_healthy.to_string()),
        ("failing since", table::time(state.failing_since.as_ref())),
        (
            "dead letters",
            state
                .dead_letters
                .map_or_else(String::new, |n| n.to_string()),
        ),
        ("error", error),
        ("owner instance", owner(state)),
        ("lease epoch", state.lease_epoch.to_string()),
        (
            "last heartbeat",
            table::time(state.last_heartbeat_at.as_ref()),
        ),
        (
            "last progress",
            table::time(state.last_progress_at.as_ref()),
        ),
        ("updated", table::time(state.updated_at.as_ref())),
    ])
}

/// The owner instance, said to be gone when it is no longer alive (its workers do not run).
fn owner(state: &pb::WorkerState) -> String {
    match (state.owner_instance.as_str(), state.owner_live) {
        ("", _) => String::new(),
        (id, true) => id.to_owned(),
        (id, false) => format!("{id} (gone: awaiting takeover)"),
    }
}

/// One worker state as a line of `status watch`.
pub fn watch_line(state: &pb::WorkerState) -> String {
    let mut line = format!(
        "{}  {:<10}  running v{} / published v{}  desired {}  restarts requested {}  failures {}",
        table::time(state.updated_at.as_ref()),
        worker_status(state.status),
        state.running_version,
        state.published_version,
        if state.desired_running {
            "running"
        } else {
            "stopped"
        },
        state.restarts_requested,
        state.failures_since_healthy,
    );
    if !state.owner_instance.is_empty() && !state.owner_live {
        line.push_str(&format!("  owner {} gone", state.owner_instance));
    }
    if !state.error_code.is_empty() || !state.error_message.is_empty() {
        line.push_str(&format!(
            "  error {}: {}",
            state.error_code, state.error_message
        ));
    }
    table::clean(&line)
}

/// Worker counters, field by field.
pub fn metrics_detail(metrics: &pb::DatasourceMetrics) -> String {
    table::fields(&[
        ("datasource", metrics.datasource_id.clone()),
        ("records", table::thousands(metrics.records_total)),
        (
            "dead-lettered",
            table::thousands(metrics.dead_lettered_total),
        ),
        ("errors", table::thousands(metrics.errors_total)),
        ("restarts", metrics.restarts_total.to_string()),
        ("restarts requested", metrics.restarts_requested.to_string()),
        ("failures", metrics.failures_since_healthy.to_string()),
        ("lag", format!("{:.1} s", metrics.lag_seconds)),
        ("last event", table::time(metrics.last_event_at.as_ref())),
        ("snapshot", table::time(metrics.snapshot_at.as_ref())),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_state_reads_as_fields_and_as_a_line() {
        let state = pb::WorkerState {
            datasource_id: "d1".into(),
            desired_running: true,
            status: pb::WorkerStatus::Error as i32,
            running_version: 2,
            published_version: 3,
            error_code: "config".into(),
            error_message: "bad url".into(),
            restart_count: 4,
            failures_since_healthy: 4,
            restarts_requested: 1,
            settled: true,
            ..Default::default()
        };
        let text = detail(&state);
        assert!(text.contains("status:             error\n"), "{text}");
        assert!(
            text.contains("error:              config: bad url\n"),
            "{text}"
        );
        assert_eq!(
            watch_line(&state),
            "  error       running v2 / published v3  desired running  restarts requested 1  failures 4  error config: bad url"
        );
    }

    #[test]
    fn a_bulk_restart_reads_as_a_row_per_worker_and_a_count() {
        let answer = pb::RestartWorkersResponse {
            workers: vec![
                pb::WorkerState {
                    datasource_id: "d1".into(),
                    status: pb::WorkerStatus::Running as i32,
                    running_version: 2,
                    published_version: 2,
                    restarts_requested: 3,
                    settled: true,
                    ..Default::default()
                },
                pb::WorkerState {
                    datasource_id: "d2".into(),
                    status: pb::WorkerStatus::Error as i32,
                    published_version: 1,
                    restarts_requested: 1,
                    failures_since_healthy: 2,
                    error_code: "invalid_transform".into(),
                    ..Default::default()
                },
            ],
            dry_run: false,
        };
        let text = restarts_table(&answer);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("DATASOURCE"), "{text}");
        assert!(
            lines[1].starts_with("d1") && lines[1].contains("yes"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("d2") && lines[2].ends_with("invalid_transform"),
            "{text}"
        );
        assert_eq!(lines[3], "2 restarted");
        let dry = restarts_table(&pb::RestartWorkersResponse {
            dry_run: true,
            ..answer
        });
        assert!(
            dry.contains("WOULD RESTART") && dry.ends_with("2 would restart\n"),
            "{dry}"
        );
    }

    #[test]
    fn failed_selects_every_failing_status_once() {
        let filter = RestartFilter {
            failed: true,
            status: vec!["error".into()],
            kind: Some("generator".into()),
            org: None,
            project: None,
            tag: None,
            id: vec![],
            dry_run: true,
        };
        let request = filter.request();
        assert_eq!(
            request.statuses,
            vec![
                pb::WorkerStatus::Error as i32,
                pb::WorkerStatus::CrashLoop as i32,
                pb::WorkerStatus::Stalled as i32
            ]
        );
        assert_eq!(request.kind, "generator");
        assert!(request.dry_run);
    }
}
