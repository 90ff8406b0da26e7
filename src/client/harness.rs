//! `dsreg test`: the `Harness` service. Tries a stored version or an unsaved config on sample
//! payloads, sandboxed on the server, and prints what would come out; exit code 1 when any
//! input would be dead-lettered, so a script or CI step can gate on it.

use std::time::Duration;

use anyhow::bail;

use crate::api::grpc::pb;

use super::connect::ClientArgs;
use super::error::usage;
use super::input::{STDIN, parse_duration, read_config, read_sample};
use super::table::{self, Table};

/// Reads one `--test-secret NAME=PATH`.
fn read_test_secret(arg: &str) -> anyhow::Result<(String, String)> {
    let Some((name, path)) = arg.split_once('=') else {
        return Err(usage(format!(
            "--test-secret {arg:?}: give NAME=PATH (the value is read from the file)"
        )));
    };
    let mut value = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--test-secret {name}: reading {path}: {e}"))?;
    if value.ends_with('\n') {
        value.pop();
    }
    Ok((name.to_owned(), value))
}

/// The most samples one run takes.
pub const MAX_SAMPLES: usize = 64;

/// `dsreg test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The datasource whose kind and secrets are used.
    datasource_id: String,
    /// The stored version to try (default: the published one).
    #[arg(long, conflicts_with = "config_file")]
    version: Option<i32>,
    /// An unsaved config to try instead, a JSON object: a file, or `-` for stdin.
    #[arg(long, value_name = "PATH|-")]
    config_file: Option<String>,
    /// A sample payload as the source would deliver it, one JSON document or NDJSON: a file, or `-`
    /// for stdin (repeat for several, at most 64).
    #[arg(long = "sample-file", value_name = "PATH|-")]
    sample_files: Vec<String>,
    /// With no samples, let a pull kind fetch one real sample from its source.
    #[arg(long, conflicts_with = "sample_files")]
    fetch_sample: bool,
    /// A credential for the fetch instead of the stored secrets, as `NAME=PATH`: the value
    /// is read from the file byte for byte (one trailing newline stripped), never given on
    /// the command line. Stored secrets only go to destinations of a saved version; test
    /// credentials may go anywhere. Repeat for several.
    #[arg(
        long = "test-secret",
        value_name = "NAME=PATH",
        requires = "fetch_sample"
    )]
    test_secrets: Vec<String>,
    /// The run's deadline, sent as the call's deadline (default: the server's own, 2 s; the
    /// server allows at most 30 s).
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
}

impl TestArgs {
    /// Runs the command.
    ///
    /// # Errors
    /// Unreadable inputs; the server could not be reached or refused the call; rejected
    /// records.
    pub async fn run(self) -> anyhow::Result<()> {
        let printer = self.client.printer();
        let stdin_uses = self
            .sample_files
            .iter()
            .chain(&self.config_file)
            .filter(|p| *p == STDIN)
            .count();
        if stdin_uses > 1 {
            return Err(usage(
                "only one of --config-file and --sample-file can be `-` (stdin)",
            ));
        }
        if self.sample_files.len() > MAX_SAMPLES {
            return Err(usage(format!(
                "{} samples given; a run takes at most {MAX_SAMPLES}",
                self.sample_files.len()
            )));
        }
        let config_json = self.config_file.as_deref().map(read_config).transpose()?;
        let samples_json = self
            .sample_files
            .iter()
            .map(|path| read_sample(path))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let test_secrets = self
            .test_secrets
            .iter()
            .map(|arg| read_test_secret(arg))
            .collect::<anyhow::Result<_>>()?;
        let request = pb::RunTestRequest {
            datasource_id: self.datasource_id,
            version: self.version.unwrap_or(0),
            config_json: config_json.unwrap_or_default(),
            samples_json,
            fetch_sample: self.fetch_sample,
            test_secrets,
        };
        let client = self.client.connect().await?;
        let report = match self.timeout {
            Some(timeout) => {
                let client = client.with_timeout(timeout);
                client
                    .unary(client.harness().run_test(client.request(request)))
                    .await?
            }
            // No deadline header: the server applies its default run deadline.
            None => {
                client
                    .unary(client.harness().run_test(tonic::Request::new(request)))
                    .await?
            }
        };
        printer.one(&report, render)?;
        if !report.rejected.is_empty() {
            bail!(
                "{} of {} input records would be dead-lettered",
                report.rejected.len(),
                report.inputs
            );
        }
        Ok(())
    }
}

/// A test report for people: a summary line, then outputs, rejected records, logs and
/// warnings, each section only when it has something.
pub fn render(report: &pb::RunTestResponse) -> String {
    let mut text = format!(
        "inputs {}, outputs {}, rejected {}; compile {}, run {}\n",
        report.inputs,
        report.outputs_json.len(),
        report.rejected.len(),
        micros(report.compile_micros),
        micros(report.run_micros),
    );
    if !report.outputs_json.is_empty() {
        text.push_str("\noutputs:\n");
        for output in &report.outputs_json {
            let line = serde_json::from_str::<serde_json::Value>(output)
                .map_or_else(|_| output.clone(), |v| v.to_string());
            text.push_str(&format!("  {}\n", table::clean(&line)));
        }
    }
    if !report.rejected.is_empty() {
        text.push_str("\nrejected:\n");
        let mut rejected = Table::new(["SAMPLE", "INDEX", "CODE", "MESSAGE"]);
        for r in &report.rejected {
            rejected.row([
                r.sample.to_string(),
                r.index.to_string(),
                r.code.clone(),
                r.message.clone(),
            ]);
        }
        for line in rejected.render().lines() {
            text.push_str(&format!("  {line}\n"));
        }
    }
    for (title, lines) in [("logs", &report.logs), ("warnings", &report.warnings)] {
        if !lines.is_empty() {
            text.push_str(&format!("\n{title}:\n"));
            for line in lines {
                text.push_str(&format!("  {}\n", table::clean(line)));
            }
        }
    }
    text
}

fn micros(us: u64) -> String {
    if us >= 1_000 {
        format!("{:.1} ms", us as f64 / 1_000.0)
    } else {
        format!("{us} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_lists_outputs_rejections_and_logs() {
        let text = render(&pb::RunTestResponse {
            inputs: 3,
            outputs_json: vec!["{\n \"id\": 1\n}".into(), r#"{"id":2}"#.into()],
            rejected: vec![pb::RejectedRecord {
                sample: 0,
                index: 2,
                code: "schema".into(),
                message: "missing id".into(),
            }],
            logs: vec!["hello".into()],
            warnings: vec![],
            compile_micros: 1_300,
            run_micros: 80,
        });
        assert_eq!(
            text,
            "inputs 3, outputs 2, rejected 1; compile 1.3 ms, run 80 µs\n\
             \n\
             outputs:\n  {\"id\":1}\n  {\"id\":2}\n\
             \n\
             rejected:\n  SAMPLE  INDEX  CODE    MESSAGE\n  0       2      schema  missing id\n\
             \n\
             logs:\n  hello\n"
        );
    }
}
