//! Progress on stderr for long commands (`keys rewrap`, `import`): a bar redrawn in place on
//! a terminal, a line every few seconds (and at the end) otherwise, so logs stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use super::output::note;
use super::table::thousands;

/// A progress display.
#[derive(Debug)]
pub struct Progress {
    label: String,
    unit: &'static str,
    terminal: bool,
    drawn: bool,
    last_line: Option<Instant>,
}

/// How often a non-terminal gets a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

impl Progress {
    /// Progress of `label` counted in `unit`s, as a bar when stderr is a terminal.
    pub fn new(label: impl Into<String>, unit: &'static str) -> Self {
        Self {
            label: label.into(),
            unit,
            terminal: std::io::stderr().is_terminal(),
            drawn: false,
            last_line: None,
        }
    }

    /// Shows `done` of `total`.
    pub fn update(&mut self, done: u64, total: u64) {
        if self.terminal {
            eprint!("\r{} {}", self.label, bar(done, total, 30, self.unit));
            self.drawn = true;
        } else if done >= total || self.last_line.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
            note(&format!(
                "{}: {}/{} {}",
                self.label,
                thousands(done),
                thousands(total),
                self.unit
            ));
            self.last_line = Some(Instant::now());
        }
    }

    /// Ends the bar's line, if one is drawn.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// `[#####.....] 12,345/100,000 rows`, `width` characters between the brackets.
pub fn bar(done: u64, total: u64, width: usize, unit: &str) -> String {
    let filled = if total == 0 {
        width
    } else {
        let ratio = done.min(total) as f64 / total as f64;
        (ratio * width as f64).floor() as usize
    };
    format!(
        "[{}{}] {}/{} {unit}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        thousands(done),
        thousands(total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_progress() {
        assert_eq!(bar(0, 100_000, 10, "rows"), "[..........] 0/100,000 rows");
        assert_eq!(
            bar(12_345, 100_000, 10, "rows"),
            "[#.........] 12,345/100,000 rows"
        );
        assert_eq!(bar(50, 100, 10, "files"), "[#####.....] 50/100 files");
        assert_eq!(bar(100, 100, 10, "rows"), "[##########] 100/100 rows");
        assert_eq!(bar(0, 0, 4, "rows"), "[####] 0/0 rows");
    }
}
