//! Aligned text for people: a column table with a header row, a vertical list of fields, and
//! the small formatting helpers they share (times, counts, cleaning server text).

use chrono::SecondsFormat;

/// A table: a header row and rows of cells, rendered with every column padded to its widest
/// cell and two spaces between columns. Cells are cleaned of control characters (so a server
/// string cannot move the cursor or break a row) when added.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells are empty, extra cells are kept as unnamed columns.
    pub fn row<S: AsRef<str>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows
            .push(cells.into_iter().map(|c| clean(c.as_ref())).collect());
    }

    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row after the header, each ending in a newline; no
    /// trailing spaces.
    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            let mut text = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map_or("", String::as_str);
                if i > 0 {
                    text.push_str("  ");
                }
                text.push_str(cell);
                let pad = width - cell.chars().count();
                text.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Fields one per line, `name: value`, the values aligned. Values are cleaned like cells.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (name, value) in pairs {
        let label = format!("{name}:");
        let line = format!("{label:<w$} {}", clean(value), w = width + 1);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `text` with control characters (newlines, tabs, escapes) replaced by spaces, so text from
/// a server keeps to its cell and cannot drive the terminal.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// `text` cut to `max` characters, ending in `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `n` with thousands separators: `12,345`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A protobuf timestamp as `2024-05-01T12:00:03Z` (UTC, whole seconds); empty when unset.
pub fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(super::json::to_datetime)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// A version number, or empty for 0 (none).
pub fn version(v: i32) -> String {
    if v == 0 { String::new() } else { v.to_string() }
}

/// `yes` or empty.
pub fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_padded_to_their_widest_cell_without_trailing_spaces() {
        let mut table = Table::new(["ID", "NAME", "KIND"]);
        table.row(["1", "orders", "webhook"]);
        table.row(["12345", "x", ""]);
        assert_eq!(
            table.render(),
            "ID     NAME    KIND\n\
             1      orders  webhook\n\
             12345  x\n"
        );
    }

    #[test]
    fn widths_count_characters_not_bytes() {
        let mut table = Table::new(["NAME", "N"]);
        table.row(["ünïcødé", "1"]);
        table.row(["ab", "2"]);
        assert_eq!(table.render(), "NAME     N\nünïcødé  1\nab       2\n");
    }

    #[test]
    fn short_rows_are_filled_and_long_rows_keep_their_cells() {
        let mut table = Table::new(["A", "B"]);
        table.row(["1"]);
        table.row(["2", "two", "extra"]);
        assert_eq!(table.render(), "A  B\n1\n2  two  extra\n");
    }

    #[test]
    fn control_characters_cannot_break_a_row() {
        let mut table = Table::new(["MESSAGE"]);
        table.row(["line one\nline two\t\u{1b}[2Jend"]);
        assert_eq!(table.render(), "MESSAGE\nline one line two  [2Jend\n");
    }

    #[test]
    fn an_empty_table_is_its_header() {
        let table = Table::new(["A", "BB"]);
        assert!(table.is_empty());
        assert_eq!(table.render(), "A  BB\n");
    }

    #[test]
    fn fields_align_their_values() {
        assert_eq!(
            fields(&[
                ("id", "42".into()),
                ("name", "orders".into()),
                ("tags", String::new())
            ]),
            "id:   42\nname: orders\ntags:\n"
        );
    }

    #[test]
    fn helpers_format_counts_text_and_times() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(12_345), "12,345");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        let ts = prost_types::Timestamp {
            seconds: 1_714_564_803,
            nanos: 500_000_000,
        };
        assert_eq!(time(Some(&ts)), "2024-05-01T12:00:03Z");
        assert_eq!(time(None), "");
        assert_eq!(version(0), "");
        assert_eq!(version(3), "3");
    }
}
