//! Writing results to stdout: text for people, one JSON document per line for scripts. A
//! reader that goes away (`| head`) ends the command quietly instead of a panic.

use std::io::Write;

use serde_json::Value;

use super::error::StdoutClosed;
use super::json::ToJson;

/// How results are printed (`-o`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned tables and fields, for people.
    #[default]
    Table,
    /// One JSON document per item, one per line (JSON lines), for scripts.
    Json,
}

/// Writes results in one [`Output`] format.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    /// The format.
    pub output: Output,
}

impl Printer {
    /// A printer for `output`.
    pub fn new(output: Output) -> Self {
        Self { output }
    }

    /// Whether scripts are reading (`-o json`).
    pub fn is_json(&self) -> bool {
        self.output == Output::Json
    }

    /// Writes `text` as it is (a newline is added if it lacks one; nothing for empty text).
    ///
    /// # Errors
    /// [`StdoutClosed`] when the reader went away; other write failures.
    pub fn text(&self, text: &str) -> anyhow::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        let written = out.write_all(text.as_bytes()).and_then(|()| {
            if text.ends_with('\n') {
                Ok(())
            } else {
                out.write_all(b"\n")
            }
        });
        finish(written.and_then(|()| out.flush()))
    }

    /// Writes one JSON document on one line.
    ///
    /// # Errors
    /// As [`Printer::text`].
    pub fn json(&self, value: &Value) -> anyhow::Result<()> {
        self.text(&format!("{value}\n"))
    }

    /// Writes one message: as JSON with `-o json`, else as `table` renders it.
    ///
    /// # Errors
    /// As [`Printer::text`].
    pub fn one<T: ToJson>(&self, item: &T, table: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
        match self.output {
            Output::Json => self.json(&item.to_json()),
            Output::Table => self.text(&table(item)),
        }
    }
}

fn finish(result: std::io::Result<()>) -> anyhow::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to stdout")),
    }
}

/// A paged listing printed as it arrives: JSON lines at once, or one table when it ends.
pub struct Listing {
    printer: Printer,
    table: super::table::Table,
    all: bool,
}

impl Listing {
    /// A listing into `table` that follows every page when `all`, else stops after the first
    /// and says how to get the next.
    pub fn new(printer: Printer, table: super::table::Table, all: bool) -> Self {
        Self {
            printer,
            table,
            all,
        }
    }

    /// Prints one page; returns the token of the page to fetch next, or `None` when the
    /// listing is done (and printed).
    ///
    /// # Errors
    /// As [`Printer::text`].
    pub fn page<T: ToJson>(
        &mut self,
        items: &[T],
        next_page_token: String,
        row: impl Fn(&mut super::table::Table, &T),
    ) -> anyhow::Result<Option<String>> {
        for item in items {
            if self.printer.is_json() {
                self.printer.json(&item.to_json())?;
            } else {
                row(&mut self.table, item);
            }
        }
        let more = !next_page_token.is_empty();
        if more && self.all {
            return Ok(Some(next_page_token));
        }
        if !self.printer.is_json() {
            self.printer.text(&self.table.render())?;
        }
        if more {
            note(&format!(
                "more: --page-token {next_page_token} (or --all for every page)"
            ));
        }
        Ok(None)
    }
}

/// Writes a note for people to stderr (never data: scripts read stdout).
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}
