//! `dsreg position get|reset`: a datasource's source position (what its worker's next run
//! resumes from), on the `Lifecycle` service. The help lists every built-in kind's position
//! format, from the kinds themselves.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::api::grpc::pb;
use crate::connectors::Catalog;

use super::connect::ClientArgs;
use super::input::parse_json;
use super::json::{ToJson, embedded, worker_status};
use super::table::{self, Table};

/// `dsreg position …`.
#[derive(Debug, clap::Args)]
#[command(after_long_help = formats())]
pub struct PositionArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: PositionCommand,
}

#[derive(Debug, clap::Subcommand)]
enum PositionCommand {
    /// Show a datasource's source position, field by field with what each means (operator).
    Get {
        /// The datasource id.
        datasource_id: String,
    },
    /// Set or clear a datasource's source position while its worker is stopped (operator;
    /// stop it first with `dsreg worker stop`). The next start resumes from it.
    #[command(after_long_help = formats())]
    Reset {
        /// The datasource id.
        datasource_id: String,
        /// The new position: a JSON object of the kind's position fields (see below).
        #[arg(long, value_name = "JSON", value_parser = parse_json, required_unless_present = "clear", conflicts_with = "clear")]
        to: Option<String>,
        /// Clear the position: the next run reads from the start.
        #[arg(long)]
        clear: bool,
    },
}

/// Every built-in kind's position format, for the help.
fn formats() -> String {
    let catalog = Catalog::builtin();
    let mut text = String::from(
        "Position formats by kind (a JSON object; a field left out starts that part from the \
         beginning):\n",
    );
    for info in catalog.kinds() {
        let name = info.name;
        match catalog.get(name).and_then(|kind| kind.position()) {
            None => {
                let _ = writeln!(
                    text,
                    "\n  {name}: keeps no position (records are pushed to it)"
                );
            }
            Some(format) => {
                let _ = writeln!(text, "\n  {name}: {}", format.summary);
                for field in format.fields {
                    let _ = writeln!(
                        text,
                        "    {} ({}): {}",
                        field.name,
                        field.shape.describe(),
                        field.meaning
                    );
                }
            }
        }
    }
    text.push_str(
        "\nExamples:\n  dsreg position reset DS --to '{\"etag\": \"\\\"v7\\\"\", \"cursor\": 1042}'\n  \
         dsreg position reset DS --to '{\"seq\": 1000}'\n  dsreg position reset DS --clear\n",
    );
    text
}

impl PositionArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// The server could not be reached or refused the call.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        let client = self.client.connect().await?;
        let mut lifecycle = client.lifecycle();
        let answer = match self.command {
            PositionCommand::Get { datasource_id } => {
                let call = lifecycle.get_source_position(
                    client.request(pb::GetSourcePositionRequest { datasource_id }),
                );
                client.unary(call).await?
            }
            PositionCommand::Reset {
                datasource_id,
                to,
                clear,
            } => {
                let call = lifecycle.reset_source_position(client.request(
                    pb::ResetSourcePositionRequest {
                        datasource_id,
                        position_json: to.unwrap_or_default(),
                        clear,
                    },
                ));
                client.unary(call).await?
            }
        };
        printer.one(&answer, render)
    }
}

/// A position for people: the datasource, then a row per field of its kind's format.
pub fn render(p: &pb::SourcePosition) -> String {
    let mut text = table::fields(&[
        ("DATASOURCE", p.datasource_id.clone()),
        ("KIND", p.kind.clone()),
        ("WORKER", worker_status(p.worker_status)),
        (
            "POSITION",
            if p.position_json.is_empty() {
                "(none: the next run reads from the start)".to_owned()
            } else {
                table::clean(&p.position_json)
            },
        ),
        ("MEANING", p.summary.clone()),
    ]);
    if !p.fields.is_empty() {
        let mut fields = Table::new(["FIELD", "VALUE", "MEANING"]);
        for f in &p.fields {
            fields.row([
                f.name.clone(),
                if f.value_json.is_empty() {
                    "-".to_owned()
                } else {
                    table::truncate(&table::clean(&f.value_json), 60)
                },
                f.meaning.clone(),
            ]);
        }
        text.push('\n');
        text.push_str(&fields.render());
    }
    text
}

impl ToJson for pb::SourcePosition {
    fn to_json(&self) -> Value {
        json!({
            "datasource_id": self.datasource_id,
            "kind": self.kind,
            "supported": self.supported,
            "summary": self.summary,
            "position": embedded(&self.position_json),
            "fields": self.fields.iter().map(|f| json!({
                "name": f.name,
                "shape": f.shape,
                "meaning": f.meaning,
                "value": embedded(&f.value_json),
            })).collect::<Vec<_>>(),
            "worker_status": worker_status(self.worker_status),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_help_gives_every_kinds_position_format() {
        let help = formats();
        for info in Catalog::builtin().kinds() {
            assert!(help.contains(&format!("\n  {}: ", info.name)), "{help}");
        }
        for field in ["etag", "cursor", "seq"] {
            assert!(help.contains(&format!("    {field} (")), "{help}");
        }
        assert!(help.contains("webhook: keeps no position"), "{help}");
    }
}
