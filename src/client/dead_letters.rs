//! `dsreg deadletters list|replay|purge`: the `DeadLetters` service. Lists what workers could
//! not store, replays it through the published version (with `--dry-run`, only shows what
//! would happen), and purges it.

use crate::api::grpc::pb;
use serde_json::{Value, json};

use super::connect::ClientArgs;
use super::input::parse_time;
use super::json::{ToJson, embedded, timestamp};
use super::output::Listing;
use super::table::{self, Table};

/// `dsreg deadletters …`.
#[derive(Debug, clap::Args)]
pub struct DeadLettersArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: DeadLettersCommand,
}

/// The filters every subcommand takes.
#[derive(Debug, Clone, clap::Args)]
struct Filters {
    /// Refused at or after (RFC 3339, or a duration ago: `15m`).
    #[arg(long, value_parser = parse_time)]
    since: Option<prost_types::Timestamp>,
    /// Refused before (RFC 3339, or a duration ago).
    #[arg(long, value_parser = parse_time)]
    until: Option<prost_types::Timestamp>,
    /// Only this reason code (`script_error`, `nul_character`, `unstorable`, …).
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum DeadLettersCommand {
    /// List dead letters, newest first: every datasource you may see, or one.
    List {
        /// Only this datasource's.
        #[arg(long, value_name = "DS")]
        datasource: Option<String>,
        #[command(flatten)]
        filters: Filters,
        /// Dead letters per page (1-1000; the server's default is 100).
        #[arg(long)]
        page_size: Option<i32>,
        /// Continue from a previous page.
        #[arg(long)]
        page_token: Option<String>,
        /// Follow page tokens to the last page.
        #[arg(long)]
        all: bool,
    },
    /// Run a datasource's dead letters, oldest first, through its published version: what
    /// passes is written and removed, what fails stays with the new reason. Exit 1 when any
    /// fails again.
    Replay {
        /// The datasource.
        datasource: String,
        #[command(flatten)]
        filters: Filters,
        /// Only this dead letter (repeat for several).
        #[arg(long = "id")]
        ids: Vec<i64>,
        /// At most this many (default 1000, at most 10000).
        #[arg(long)]
        limit: Option<i32>,
        /// Show what would happen; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete a datasource's dead letters matching the filters (admin).
    Purge {
        /// The datasource.
        datasource: String,
        #[command(flatten)]
        filters: Filters,
        /// Only this dead letter (repeat for several).
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
}

impl DeadLettersArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// The server could not be reached or refused the call; a replay left dead letters
    /// failing.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        let client = self.client.connect().await?;
        let mut svc = client.dead_letters();
        match self.command {
            DeadLettersCommand::List {
                datasource,
                filters,
                page_size,
                page_token,
                all,
            } => {
                let mut request = pb::ListDeadLettersRequest {
                    datasource_id: datasource.unwrap_or_default(),
                    since: filters.since,
                    until: filters.until,
                    reason_code: filters.reason.unwrap_or_default(),
                    page_size: page_size.unwrap_or(0),
                    page_token: page_token.unwrap_or_default(),
                };
                let mut listing = Listing::new(
                    printer,
                    Table::new([
                        "ID",
                        "DATASOURCE",
                        "VERSION",
                        "AT",
                        "REASON",
                        "REPLAYS",
                        "RECORD",
                    ]),
                    all,
                );
                loop {
                    let page = client
                        .unary(svc.list_dead_letters(client.request(request.clone())))
                        .await?;
                    match listing.page(&page.dead_letters, page.next_page_token, row)? {
                        Some(next) => request.page_token = next,
                        None => return Ok(()),
                    }
                }
            }
            DeadLettersCommand::Replay {
                datasource,
                filters,
                ids,
                limit,
                dry_run,
            } => {
                let answer = client
                    .unary(
                        svc.replay_dead_letters(client.request(pb::ReplayDeadLettersRequest {
                            datasource_id: datasource,
                            since: filters.since,
                            until: filters.until,
                            reason_code: filters.reason.unwrap_or_default(),
                            ids,
                            limit: limit.unwrap_or(0),
                            dry_run,
                        })),
                    )
                    .await?;
                printer.one(&answer, render_replay)?;
                if answer.failed > 0 {
                    anyhow::bail!(
                        "{} dead letter(s) failed again{}",
                        answer.failed,
                        if answer.dry_run { " (dry run)" } else { "" }
                    );
                }
                Ok(())
            }
            DeadLettersCommand::Purge {
                datasource,
                filters,
                ids,
            } => {
                let answer = client
                    .unary(
                        svc.purge_dead_letters(client.request(pb::PurgeDeadLettersRequest {
                            datasource_id: datasource,
                            since: filters.since,
                            until: filters.until,
                            reason_code: filters.reason.unwrap_or_default(),
                            ids,
                        })),
                    )
                    .await?;
                printer.one(&answer, |a| format!("purged {}\n", a.purged))
            }
        }
    }
}

fn row(table: &mut Table, d: &pb::DeadLetter) {
    let mut record = d.record_json.clone();
    if record.len() > 60 {
        let mut end = 57;
        while !record.is_char_boundary(end) {
            end -= 1;
        }
        record.truncate(end);
        record.push('…');
    }
    table.row([
        d.id.to_string(),
        d.datasource_id.clone(),
        d.version.to_string(),
        table::time(d.at.as_ref()),
        format!("{}: {}", d.reason_code, d.reason),
        d.replays.to_string(),
        record,
    ]);
}

/// A replay's outcome for people: a summary line, then the dead letters that failed again.
pub fn render_replay(answer: &pb::ReplayDeadLettersResponse) -> String {
    let mut text = format!(
        "{}through version {}: {} passed ({} records {}), {} failed again\n",
        if answer.dry_run { "dry run, " } else { "" },
        answer.version,
        answer.passed,
        answer.records_written,
        if answer.dry_run {
            "would be written"
        } else {
            "written"
        },
        answer.failed,
    );
    let failed: Vec<_> = answer.outcomes.iter().filter(|o| !o.passed).collect();
    if !failed.is_empty() {
        let mut table = Table::new(["ID", "REASON"]);
        for o in failed {
            table.row([o.id.to_string(), format!("{}: {}", o.reason_code, o.reason)]);
        }
        text.push('\n');
        text.push_str(&table.render());
    }
    text
}

impl ToJson for pb::DeadLetter {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "datasource_id": self.datasource_id,
            "version": self.version,
            "record": embedded(&self.record_json),
            "reason_code": self.reason_code,
            "reason": self.reason,
            "at": timestamp(self.at.as_ref()),
            "replays": self.replays,
            "replayed_at": timestamp(self.replayed_at.as_ref()),
        })
    }
}

impl ToJson for pb::ReplayDeadLettersResponse {
    fn to_json(&self) -> Value {
        json!({
            "version": self.version,
            "passed": self.passed,
            "records_written": self.records_written,
            "failed": self.failed,
            "dry_run": self.dry_run,
            "outcomes": self.outcomes.iter().map(|o| json!({
                "id": o.id,
                "passed": o.passed,
                "records": o.records,
                "reason_code": (!o.reason_code.is_empty()).then_some(&o.reason_code),
                "reason": (!o.reason.is_empty()).then_some(&o.reason),
            })).collect::<Vec<_>>(),
        })
    }
}

impl ToJson for pb::PurgeDeadLettersResponse {
    fn to_json(&self) -> Value {
        json!({ "purged": self.purged })
    }
}
