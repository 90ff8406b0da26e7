//! `dsreg validate`: the `Catalog` service's `ValidateConfig`. Checks a config for a kind (or
//! for an existing datasource, with its stored secrets) without saving anything, and lists
//! every problem at once; exit code 1 when there is any, so a script or CI step can gate on it.

use anyhow::bail;
use serde_json::{Value, json};

use crate::api::grpc::pb;

use super::connect::ClientArgs;
use super::error::usage;
use super::input::read_config;
use super::json::ToJson;
use super::table::{self, Table};

/// `dsreg validate`.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The connector kind (`dsreg kinds list`); optional with `--datasource`.
    #[arg(long)]
    kind: Option<String>,
    /// Check against this datasource: its kind and its stored secrets (a needed secret that
    /// is not stored is then a problem).
    #[arg(long, value_name = "ID")]
    datasource: Option<String>,
    /// The config, a JSON object as a version holds it: a file, or `-` for stdin.
    #[arg(long, value_name = "PATH|-")]
    config_file: String,
}

impl ValidateArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// An unreadable config; the server could not be reached or refused the call; a config
    /// with problems.
    pub async fn run(self) -> anyhow::Result<()> {
        if self.kind.is_none() && self.datasource.is_none() {
            return Err(usage("give --kind, --datasource, or both"));
        }
        let printer = self.client.printer();
        let config_json = read_config(&self.config_file)?;
        let client = self.client.connect().await?;
        let answer =
            client
                .unary(client.catalog().validate_config(client.request(
                    pb::ValidateConfigRequest {
                        kind: self.kind.unwrap_or_default(),
                        config_json,
                        datasource_id: self.datasource.unwrap_or_default(),
                    },
                )))
                .await?;
        printer.one(&answer, render)?;
        if !answer.valid {
            bail!(
                "the config has {} problem{}",
                answer.problems.len(),
                if answer.problems.len() == 1 { "" } else { "s" }
            );
        }
        Ok(())
    }
}

/// A validation for people: a summary line, the problems as a table, then the secrets.
pub fn render(answer: &pb::ValidateConfigResponse) -> String {
    let mut text = format!(
        "kind {}: {}\n",
        answer.kind,
        if answer.valid {
            "valid".to_owned()
        } else {
            format!("{} problem(s)", answer.problems.len())
        }
    );
    if !answer.problems.is_empty() {
        let mut problems = Table::new(["FIELD", "LINE", "REASON"]);
        for p in &answer.problems {
            problems.row([
                if p.field.is_empty() {
                    "(config)".to_owned()
                } else {
                    p.field.clone()
                },
                if p.line == 0 {
                    String::new()
                } else {
                    p.line.to_string()
                },
                p.reason.clone(),
            ]);
        }
        text.push('\n');
        text.push_str(&problems.render());
    }
    if !answer.secrets_needed.is_empty() {
        text.push_str(&format!(
            "\nsecrets needed: {}\n",
            table::clean(&answer.secrets_needed.join(", "))
        ));
        if !answer.secrets_missing.is_empty() {
            text.push_str(&format!(
                "secrets not stored: {}\n",
                table::clean(&answer.secrets_missing.join(", "))
            ));
        }
    }
    text
}

impl ToJson for pb::ValidateConfigResponse {
    fn to_json(&self) -> Value {
        json!({
            "valid": self.valid,
            "kind": self.kind,
            "problems": self.problems.iter().map(|p| json!({
                "field": p.field,
                "reason": p.reason,
                "line": (p.line != 0).then_some(p.line),
                "missing_secret": (!p.missing_secret.is_empty()).then_some(&p.missing_secret),
            })).collect::<Vec<_>>(),
            "secrets_needed": self.secrets_needed,
            "secrets_missing": self.secrets_missing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_validation_lists_each_problem_and_the_missing_secrets() {
        let text = render(&pb::ValidateConfigResponse {
            valid: false,
            kind: "http_poll".into(),
            problems: vec![
                pb::ConfigProblem {
                    field: "interval_ms".into(),
                    reason: "must be an integer".into(),
                    ..Default::default()
                },
                pb::ConfigProblem {
                    field: "transform".into(),
                    reason: "syntax error".into(),
                    line: 3,
                    ..Default::default()
                },
            ],
            secrets_needed: vec!["token".into()],
            secrets_missing: vec!["token".into()],
        });
        assert!(text.starts_with("kind http_poll: 2 problem(s)"), "{text}");
        assert!(text.contains("interval_ms"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().take(2).eq(["transform", "3"])),
            "{text}"
        );
        assert!(text.contains("secrets not stored: token"), "{text}");
    }
}
