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
    /// Restart the worker on its current version.
    Restart {
        /// The datasource id.
        datasource_id: String,
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
            WorkerCommand::Restart { datasource_id } => {
                let call = lifecycle
                    .restart_worker(client.request(pb::LifecycleRequest { datasource_id }));
                (client.unary(call).await?, "restarted")
            }
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
        ("restarts", state.restart_count.to_string()),
        (
            "dead letters",
            state
                .dead_letters
                .map_or_else(String::new, |n| n.to_string()),
        ),
        ("error", error),
        ("owner instance", state.owner_instance.clone()),
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

/// One worker state as a line of `status watch`.
pub fn watch_line(state: &pb::WorkerState) -> String {
    let mut line = format!(
        "{}  {:<10}  running v{} / published v{}  desired {}  restarts {}",
        table::time(state.updated_at.as_ref()),
        worker_status(state.status),
        state.running_version,
        state.published_version,
        if state.desired_running {
            "running"
        } else {
            "stopped"
        },
        state.restart_count,
    );
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
        ("restarts", metrics.restart_count.to_string()),
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
            settled: true,
            ..Default::default()
        };
        let text = detail(&state);
        assert!(text.contains("status:            error\n"), "{text}");
        assert!(
            text.contains("error:             config: bad url\n"),
            "{text}"
        );
        assert_eq!(
            watch_line(&state),
            "  error       running v2 / published v3  desired running  restarts 4  error config: bad url"
        );
    }
}
