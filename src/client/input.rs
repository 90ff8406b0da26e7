//! What commands read besides flags: config JSON and samples from files or stdin, secret
//! values (stdin or a file, never argv), durations and times.

use std::io::{IsTerminal, Read};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use zeroize::Zeroizing;

use super::error::usage;
use crate::secrets::MAX_SECRET_BYTES;

/// The path that means stdin.
pub const STDIN: &str = "-";

fn describe(path: &str) -> String {
    if path == STDIN {
        "stdin".to_owned()
    } else {
        path.to_owned()
    }
}

fn read_text(path: &str) -> anyhow::Result<String> {
    if path == STDIN {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
    }
}

/// A version config from `path` (`-`: stdin): checked to be a JSON object, returned as read
/// (the server keeps and checks it against the kind's schema).
///
/// # Errors
/// Unreadable, not JSON, or not an object.
pub fn read_config(path: &str) -> anyhow::Result<String> {
    let text = read_text(path)?;
    check_config(&text).with_context(|| describe(path))?;
    Ok(text.trim().to_owned())
}

/// Checks that `text` is a JSON object.
///
/// # Errors
/// Not JSON (with line and column), or not an object.
pub fn check_config(text: &str) -> anyhow::Result<()> {
    let value: serde_json::Value = serde_json::from_str(text).context("not valid JSON")?;
    if !value.is_object() {
        bail!("a config is a JSON object ({{...}})");
    }
    Ok(())
}

/// A sample payload from `path` (`-`: stdin): one JSON document, returned as read.
///
/// # Errors
/// Unreadable or not JSON.
pub fn read_sample(path: &str) -> anyhow::Result<String> {
    let text = read_text(path)?;
    sample_of(&text).with_context(|| {
        format!(
            "{}: a sample is one JSON document, or NDJSON (one per line)",
            describe(path)
        )
    })
}

/// A sample's text as the harness takes it: one JSON document as written, or NDJSON (one
/// document per line, as a webhook body may be) as the JSON array of its documents, which
/// every kind reads as the same records.
fn sample_of(text: &str) -> anyhow::Result<String> {
    let one = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(_) => return Ok(text.trim().to_owned()),
        Err(e) => e,
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() < 2 {
        return Err(one.into());
    }
    let documents = lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str::<serde_json::Value>(line)
                .with_context(|| format!("line {}", i + 1))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(serde_json::Value::Array(documents).to_string())
}

/// Where a secret value comes from. There is deliberately no argv variant: a value on the
/// command line shows in `ps`, shell history and audit logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Stdin, one trailing newline stripped (so `echo value |` works).
    Stdin,
    /// A file, byte for byte.
    File(std::path::PathBuf),
}

/// Reads a secret value, wiped from memory when dropped.
///
/// # Errors
/// Stdin is a terminal (a [`UsageError`](super::UsageError): typing would echo the value);
/// unreadable; empty; larger than [`MAX_SECRET_BYTES`].
pub fn read_secret(source: &SecretSource) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    match source {
        SecretSource::Stdin => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                return Err(usage(
                    "the secret value is read from stdin, and stdin is a terminal (typing \
                     would show the value): pipe it in, as in `dsreg secret put ID NAME < \
                     value.txt`, or use --from-file PATH",
                ));
            }
            read_secret_from(stdin.lock(), true).context("reading the secret value from stdin")
        }
        SecretSource::File(path) => read_secret_file(path),
    }
}

fn read_secret_file(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    read_secret_from(file, false).with_context(|| format!("reading {}", path.display()))
}

/// Reads a secret value from `reader`: at most [`MAX_SECRET_BYTES`], not empty; with
/// `strip_newline`, one trailing `\n` (or `\r\n`) is removed.
///
/// # Errors
/// A read failure; empty; too large. The messages never include the value.
pub fn read_secret_from(
    reader: impl Read,
    strip_newline: bool,
) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    // Allocated once at full size: a growing Vec would leave copies of the value in memory
    // it freed on the way, out of reach of the zeroize on drop.
    let limit = MAX_SECRET_BYTES + 2;
    let mut value = Zeroizing::new(Vec::with_capacity(limit + 1));
    reader.take(limit as u64 + 1).read_to_end(&mut value)?;
    if strip_newline && value.last() == Some(&b'\n') {
        value.pop();
        if value.last() == Some(&b'\r') {
            value.pop();
        }
    }
    if value.len() > MAX_SECRET_BYTES {
        bail!("the secret value is over {MAX_SECRET_BYTES} bytes, the limit");
    }
    if value.is_empty() {
        bail!("the secret value is empty");
    }
    Ok(value)
}

/// Parses a duration the way people write one, with its unit (`500ms`, `2s`, `1m`, `1h 30m`;
/// humantime's grammar); positive. A bare number is refused: the server's flags count
/// milliseconds (`*_ms`) while a command line would mean seconds, so the unit is spelled out.
///
/// # Errors
/// A message for clap.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = humantime::parse_duration(text).map_err(|e| {
        format!("{text:?} is not a duration ({e}): give a unit, as in 500ms, 2s, 1m or 1h")
    })?;
    if duration.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(duration)
}

/// Parses a point in time: RFC 3339 (`2024-05-01T12:00:00Z`), or a duration meaning that long
/// ago (`15m`, `2h`).
///
/// # Errors
/// A message for clap.
pub fn parse_time(text: &str) -> Result<prost_types::Timestamp, String> {
    let at = if let Ok(t) = DateTime::parse_from_rfc3339(text.trim()) {
        t.with_timezone(&Utc)
    } else if let Ok(ago) = parse_duration(text) {
        let ago = chrono::Duration::from_std(ago).map_err(|e| e.to_string())?;
        Utc::now() - ago
    } else {
        return Err(format!(
            "{text:?} is not a time: use RFC 3339 (2024-05-01T12:00:00Z) or a duration ago (15m, 2h)"
        ));
    };
    Ok(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

/// Checks that an argument is JSON; returns it as given.
///
/// # Errors
/// A message for clap.
pub fn parse_json(text: &str) -> Result<String, String> {
    serde_json::from_str::<serde_json::Value>(text)
        .map(|_| text.to_owned())
        .map_err(|e| format!("not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_sample_is_one_document_or_ndjson() {
        assert_eq!(super::sample_of(" {\"a\": 1}\n").unwrap(), "{\"a\": 1}");
        assert_eq!(
            super::sample_of("{\"a\":1}\n\n{\"a\":2}\n").unwrap(),
            r#"[{"a":1},{"a":2}]"#
        );
        let bad = super::sample_of("{\"a\":1}\n{oops}\n").unwrap_err();
        assert!(format!("{bad:#}").contains("line 2"), "{bad:#}");
        assert!(super::sample_of("{oops").is_err());
    }

    use super::*;

    #[test]
    fn one_trailing_newline_is_stripped_from_stdin() {
        let read = |s: &str| read_secret_from(s.as_bytes(), true).map(|v| v.to_vec());
        assert_eq!(read("hunter2\n").unwrap(), b"hunter2");
        assert_eq!(read("hunter2\r\n").unwrap(), b"hunter2");
        assert_eq!(read("hunter2\n\n").unwrap(), b"hunter2\n");
        assert_eq!(read("hunter2").unwrap(), b"hunter2");
        assert_eq!(read(" spaced \n").unwrap(), b" spaced ");
    }

    #[test]
    fn a_file_value_is_kept_byte_for_byte() {
        let value = read_secret_from(&b"-----KEY-----\n"[..], false).unwrap();
        assert_eq!(value.as_slice(), b"-----KEY-----\n");
    }

    #[test]
    fn empty_and_oversized_values_are_refused_without_echoing_them() {
        let error = read_secret_from(&b"\n"[..], true).unwrap_err().to_string();
        assert!(error.contains("empty"), "{error}");
        let big = "x".repeat(MAX_SECRET_BYTES + 1);
        let error = read_secret_from(big.as_bytes(), true)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("limit") && !error.contains("xxxx"),
            "{error}"
        );
        let exact = "y".repeat(MAX_SECRET_BYTES) + "\n";
        assert_eq!(
            read_secret_from(exact.as_bytes(), true).unwrap().len(),
            MAX_SECRET_BYTES
        );
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("10").is_err(), "a bare number names no unit");
        assert!(
            parse_duration("1.5").is_err(),
            "a bare number names no unit"
        );
        assert!(parse_duration("+2s").is_err());
        assert!(parse_duration("-2s").is_err());
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3_600));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let t = parse_time("2024-05-01T12:00:03Z").unwrap();
        assert_eq!((t.seconds, t.nanos), (1_714_564_803, 0));
        let t = parse_time("2024-05-01T14:00:03+02:00").unwrap();
        assert_eq!(t.seconds, 1_714_564_803);
        let ago = parse_time("1h").unwrap();
        let now = Utc::now().timestamp();
        assert!((now - 3_600 - ago.seconds).abs() <= 5);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn configs_must_be_json_objects() {
        check_config(r#"{"rate_per_sec": 5}"#).unwrap();
        assert!(check_config("[1, 2]").is_err());
        assert!(check_config("{oops").is_err());
        assert!(parse_json(r#"{"cursor": 5}"#).is_ok());
        assert!(parse_json("{").is_err());
    }
}
