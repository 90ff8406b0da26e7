//! YAML in and out, as JSON values. Reading keeps the line of every mapping key and sequence
//! item (so a problem found in `config.template.x` is reported at its line); writing emits the
//! subset of YAML that reading turns back into the same value.
//!
//! Scalars follow the YAML 1.2 core schema: plain `null`/`~`/empty, `true`/`false`, integers
//! (decimal, `0o` octal, `0x` hex) and floats are typed; quoted and block scalars are strings.
//! Anchors and aliases, tags other than `!!str`, complex keys, duplicate keys, nesting deeper
//! than [`MAX_DEPTH`] and values JSON cannot hold (`.inf`, `.nan`) are refused with their line.

use std::collections::HashMap;

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::{Yaml, YamlEmitter};

/// Deepest nesting of mappings and sequences accepted.
pub const MAX_DEPTH: usize = 64;

/// A problem in a YAML text, at a 1-based line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// The line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// One YAML document as JSON, with the lines of its parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The document's value (`Null` for an empty document).
    pub value: Value,
    /// The line where the value starts.
    pub line: usize,
    /// Lines by path: `key.sub` for mapping entries (the key's line), `list.0` for sequence
    /// items (the item's line); `""` is the document's value.
    pub lines: HashMap<String, usize>,
    /// The first line of each literal or folded block scalar, by path (the line after its
    /// key's), so a position inside the text maps to a line of the file.
    pub blocks: HashMap<String, usize>,
}

impl Document {
    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line_of(&self, path: &str) -> usize {
        let mut path = path;
        loop {
            if let Some(line) = self.lines.get(path) {
                return *line;
            }
            match path.rfind('.') {
                Some(dot) => path = &path[..dot],
                None if !path.is_empty() => path = "",
                None => return self.line,
            }
        }
    }
}

/// Parses every document of `text`.
///
/// # Errors
/// The first problem found, with its line.
pub fn parse(text: &str) -> Result<Vec<Document>, YamlError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(YamlError {
            line: e.marker().line(),
            message: format!("not valid YAML: {}", e.info()),
        });
    }
    match builder.error {
        Some(e) => Err(e),
        None => Ok(builder.documents),
    }
}

/// A node being built: a mapping (with the key waiting for its value) or a sequence.
enum Open {
    Mapping {
        map: Map<String, Value>,
        path: String,
        key: Option<String>,
    },
    Sequence {
        items: Vec<Value>,
        path: String,
    },
}

#[derive(Default)]
struct Builder {
    documents: Vec<Document>,
    stack: Vec<Open>,
    current: Option<Document>,
    error: Option<YamlError>,
}

impl Builder {
    fn fail(&mut self, line: usize, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(YamlError {
                line,
                message: message.into(),
            });
        }
    }

    /// The path the next value gets, and records its line. For a mapping waiting for a key,
    /// `None`: the next scalar is that key.
    fn next_path(&mut self, line: usize) -> Option<String> {
        let path = match self.stack.last() {
            None => String::new(),
            Some(Open::Mapping { key: None, .. }) => return None,
            Some(Open::Mapping {
                path,
                key: Some(key),
                ..
            }) => join(path, key),
            Some(Open::Sequence { items, path }) => join(path, &items.len().to_string()),
        };
        let doc = self.current.get_or_insert_with(|| Document {
            value: Value::Null,
            line,
            lines: HashMap::new(),
            blocks: HashMap::new(),
        });
        if path.is_empty() {
            doc.line = line;
        }
        // A mapping entry keeps its key's line (recorded with the key).
        doc.lines.entry(path.clone()).or_insert(line);
        Some(path)
    }

    /// Puts a finished value where it belongs.
    fn place(&mut self, value: Value) {
        match self.stack.last_mut() {
            None => {
                if let Some(doc) = self.current.as_mut() {
                    doc.value = value;
                }
            }
            Some(Open::Mapping { map, key, .. }) => {
                if let Some(key) = key.take() {
                    map.insert(key, value);
                }
            }
            Some(Open::Sequence { items, .. }) => items.push(value),
        }
    }

    fn open(&mut self, node: Open, line: usize) {
        if self.stack.len() >= MAX_DEPTH {
            self.fail(
                line,
                format!("nested deeper than {MAX_DEPTH} levels of mappings and sequences"),
            );
        }
        self.stack.push(node);
    }

    fn scalar(&mut self, text: String, style: TScalarStyle, tag: Option<&Tag>, line: usize) {
        // A key: a mapping is waiting for one.
        if let Some(Open::Mapping { map, path, key }) = self.stack.last_mut()
            && key.is_none()
        {
            let full = join(path, &text);
            if map.contains_key(&text) {
                let message = format!("duplicate key {text:?}");
                self.fail(line, message);
                return;
            }
            *key = Some(text);
            if let Some(doc) = self.current.as_mut() {
                doc.lines.insert(full, line);
            }
            return;
        }
        let Some(path) = self.next_path(line) else {
            return;
        };
        let value = match (tag, style) {
            (Some(tag), _) if !is_str_tag(tag) => {
                self.fail(
                    line,
                    format!(
                        "YAML tags are not supported (found {}{}); only !!str is",
                        tag.handle, tag.suffix
                    ),
                );
                return;
            }
            (Some(_), _) => Value::String(text),
            (None, TScalarStyle::Plain) => match resolve_plain(&text) {
                Ok(value) => value,
                Err(message) => {
                    self.fail(line, message);
                    return;
                }
            },
            (None, TScalarStyle::Literal | TScalarStyle::Folded) => {
                // The block's first line is the one after its indicator, which stands on the
                // line of its key or `-`.
                if let Some(doc) = self.current.as_mut() {
                    let start = doc.lines.get(&path).copied().unwrap_or(line) + 1;
                    doc.blocks.insert(path, start);
                }
                Value::String(text)
            }
            (None, _) => Value::String(text),
        };
        self.place(value);
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let line = mark.line();
        match event {
            Event::DocumentStart => {
                self.current = Some(Document {
                    value: Value::Null,
                    line,
                    lines: HashMap::new(),
                    blocks: HashMap::new(),
                });
            }
            Event::DocumentEnd => {
                if let Some(doc) = self.current.take() {
                    self.documents.push(doc);
                }
            }
            Event::Alias(_) => self.fail(
                line,
                "anchors and aliases (*name) are not supported; write the value out",
            ),
            Event::Scalar(text, style, _, tag) => self.scalar(text, style, tag.as_ref(), line),
            Event::SequenceStart(_, tag) | Event::MappingStart(_, tag) if tag.is_some() => {
                self.fail(
                    line,
                    "YAML tags are not supported on mappings and sequences",
                );
            }
            Event::SequenceStart(..) => match self.next_path(line) {
                Some(path) => self.open(
                    Open::Sequence {
                        items: Vec::new(),
                        path,
                    },
                    line,
                ),
                None => self.fail(line, "a mapping key must be a plain string, not a sequence"),
            },
            Event::MappingStart(..) => match self.next_path(line) {
                Some(path) => self.open(
                    Open::Mapping {
                        map: Map::new(),
                        path,
                        key: None,
                    },
                    line,
                ),
                None => self.fail(line, "a mapping key must be a plain string, not a mapping"),
            },
            Event::SequenceEnd => {
                if let Some(Open::Sequence { items, .. }) = self.stack.pop() {
                    self.place(Value::Array(items));
                }
            }
            Event::MappingEnd => {
                if let Some(Open::Mapping { map, .. }) = self.stack.pop() {
                    self.place(Value::Object(map));
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd => {}
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn is_str_tag(tag: &Tag) -> bool {
    tag.suffix == "str" && (tag.handle == "!!" || tag.handle == "tag:yaml.org,2002:")
}

/// The value of a plain scalar under the YAML 1.2 core schema.
fn resolve_plain(text: &str) -> Result<Value, String> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Ok(Value::Null),
        "true" | "True" | "TRUE" => return Ok(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Ok(Value::Bool(false)),
        _ => {}
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    if matches!(
        unsigned,
        ".inf" | ".Inf" | ".INF" | ".nan" | ".NaN" | ".NAN"
    ) {
        return Err(format!(
            "{text} has no JSON form; quote it to make it a string"
        ));
    }
    if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = text.parse::<i64>() {
            return Ok(Value::Number(n.into()));
        }
        if let Ok(n) = text.trim_start_matches('+').parse::<u64>() {
            return Ok(Value::Number(n.into()));
        }
        return float(text);
    }
    for (prefix, radix) in [("0o", 8), ("0x", 16)] {
        if let Some(digits) = text.strip_prefix(prefix)
            && !digits.is_empty()
            && digits.chars().all(|c| c.is_digit(radix))
        {
            return u64::from_str_radix(digits, radix)
                .map(|n| Value::Number(n.into()))
                .map_err(|_| format!("{text} is too large for a JSON integer"));
        }
    }
    if is_core_float(unsigned) {
        return float(text);
    }
    Ok(Value::String(text.to_owned()))
}

/// `(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`, the core schema's float without a sign.
fn is_core_float(text: &str) -> bool {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], Some(&text[at + 1..])),
        None => (text, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => digits(frac),
        Some((int, frac)) => digits(int) && (frac.is_empty() || digits(frac)),
        None => digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['-', '+']).unwrap_or(e)));
    mantissa_ok && exponent_ok
}

fn float(text: &str) -> Result<Value, String> {
    text.parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map(Value::Number)
        .ok_or_else(|| format!("{text} is not a number JSON can hold"))
}

/// Writes `value` as a YAML document (a mapping or sequence at the top, in block style) with
/// `yaml-rust2`'s emitter, such that [`parse`] gives `value` back, and so does a YAML 1.1
/// reader (PyYAML, yamllint, most Go tools): a string is left plain only when neither schema
/// types it (`yes`, `off`, `y`, `~`, `1_000`, `2024-01-31` are quoted), multi-line strings are
/// literal blocks when that reads back exactly, and floats carry the `.` and signed exponent
/// YAML 1.1 needs to see a number.
pub fn emit(value: &Value) -> String {
    let mut text = String::new();
    let mut emitter = YamlEmitter::new(&mut text);
    emitter.multiline_strings(true);
    // Invariant: the emitter fails only when its writer does, and a String never does.
    emitter
        .dump(&node(value))
        .expect("writing YAML to a String cannot fail");
    let mut out = text.strip_prefix("---\n").unwrap_or(&text).to_owned();
    out.push('\n');
    out
}

/// The emitter's node for `value`. A string the emitter would write plain although a YAML
/// reader types it goes in as [`Yaml::Real`], whose text the emitter writes as it is: the
/// only way to hand it a scalar already quoted.
fn node(value: &Value) -> Yaml {
    match value {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None if n.is_u64() => Yaml::Real(n.to_string()),
            None => Yaml::Real(yaml11_float(&n.to_string())),
        },
        Value::String(s) if plain(s) || literal_block(s) => Yaml::String(s.clone()),
        Value::String(s) => Yaml::Real(double_quoted(s)),
        Value::Array(items) => Yaml::Array(items.iter().map(node).collect()),
        Value::Object(map) => Yaml::Hash(
            map.iter()
                .map(|(k, v)| {
                    let key = if plain(k) {
                        Yaml::String(k.clone())
                    } else {
                        Yaml::Real(double_quoted(k))
                    };
                    (key, node(v))
                })
                .collect(),
        ),
    }
}

/// A JSON float's text as both schemas read it: YAML 1.1 wants a `.` in the mantissa and a
/// sign in the exponent (`1e300` is a string to it; `1.0e+300` a float to both).
fn yaml11_float(json: &str) -> String {
    let (mantissa, exponent) = match json.find(['e', 'E']) {
        Some(at) => (&json[..at], Some(&json[at + 1..])),
        None => (json, None),
    };
    let mut out = mantissa.to_owned();
    if !out.contains('.') {
        out.push_str(".0");
    }
    if let Some(exponent) = exponent {
        out.push('e');
        if !exponent.starts_with(['-', '+']) {
            out.push('+');
        }
        out.push_str(exponent);
    }
    out
}

/// The plain scalars YAML 1.1 reads as booleans or null, beside the core schema's.
const YAML11_WORDS: &[&str] = &[
    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
    "OFF",
];

/// Whether `s` may be written plain: it starts with a letter, `_` or `/` (so no number, date,
/// sexagesimal or `.inf` form of either schema), holds only letters, digits, `_-./+` and inner
/// spaces, and neither the core schema nor YAML 1.1 types it.
fn plain(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_' || c == '/')
        && !s.ends_with(' ')
        && s.chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | '+' | ' '))
        && !YAML11_WORDS.contains(&s)
        && resolve_plain(s) == Ok(Value::String(s.to_owned()))
}

/// Whether a character may stand as it is in a YAML document (`c-printable`), and is not one
/// YAML 1.1 takes for a line break or a byte order mark.
fn printable(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\u{20}'..='\u{7e}' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
        && !matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
}

/// Whether `s` reads back the same as the emitter's literal block (`|` or `|-`, one line per
/// line): several lines, at most one trailing newline, printable characters only, no carriage
/// return, a first line that is not empty and does not start with a space (which would need
/// an indentation indicator) and no line of only spaces.
fn literal_block(s: &str) -> bool {
    let body = s.strip_suffix('\n').unwrap_or(s);
    body.contains('\n')
        && !body.ends_with('\n')
        && !body.starts_with(['\n', ' ', '\t'])
        && s.chars().all(printable)
        && !body
            .split('\n')
            .any(|line| line.trim().is_empty() && !line.is_empty())
}

/// `s` as a double-quoted scalar: `"` and `\` escaped, and every character that may not stand
/// as it is written as `\uXXXX` (or `\UXXXXXXXX`).
fn double_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if printable(c) => out.push(c),
            c if u32::from(c) <= 0xffff => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push_str(&format!("\\U{:08x}", u32::from(c))),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(text: &str) -> Document {
        let mut docs = parse(text).unwrap();
        assert_eq!(docs.len(), 1, "{text}");
        docs.remove(0)
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        let doc = one(
            "a: 1\nb: -7\nc: 0x1F\nd: 0o17\ne: 1.5\nf: 1e3\ng: true\nh: ~\ni:\nj: '1'\nk: \"true\"\n\
             l: hello world\nm: 1_000\nn: 18446744073709551615\no: .5\np: !!str 12\nq: yes\n",
        );
        assert_eq!(
            doc.value,
            json!({
                "a": 1, "b": -7, "c": 31, "d": 15, "e": 1.5, "f": 1000.0, "g": true, "h": null,
                "i": null, "j": "1", "k": "true", "l": "hello world", "m": "1_000",
                "n": 18446744073709551615u64, "o": 0.5, "p": "12", "q": "yes"
            })
        );
    }

    #[test]
    fn lines_are_kept_for_keys_and_items() {
        let doc = one(
            "# a comment\norg: acme\nconfig:\n  template:\n    x: 1\n  list:\n    - a\n    - b: 2\n",
        );
        assert_eq!(doc.line, 2);
        assert_eq!(doc.line_of("org"), 2);
        assert_eq!(doc.line_of("config"), 3);
        assert_eq!(doc.line_of("config.template.x"), 5);
        assert_eq!(doc.line_of("config.list.0"), 7);
        assert_eq!(doc.line_of("config.list.1.b"), 8);
        assert_eq!(doc.line_of("config.template.missing"), 4);
        assert_eq!(doc.line_of("nowhere.at.all"), 2);
    }

    #[test]
    fn several_documents_and_block_scalars() {
        let docs =
            parse("a: 1\n---\nscript: |\n  let x = 1;\n  x\nb: >-\n  folded\n  text\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].value["script"], "let x = 1;\nx\n");
        assert_eq!(docs[1].value["b"], "folded text");
        assert_eq!(docs[1].blocks["script"], 4);
        assert_eq!(docs[1].line, 3);
    }

    #[test]
    fn refusals_carry_their_line() {
        let cases = [
            ("a: 1\na: 2\n", 2, "duplicate key"),
            ("a: &x 1\nb: *x\n", 2, "aliases"),
            ("a: !!int 1\n", 1, "tags"),
            ("a: .inf\n", 1, "JSON"),
            ("a: 1\n  b: 2\n", 2, "not valid YAML"),
            ("? [a]\n: 1\n", 1, "key"),
        ];
        for (text, line, needle) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err:?}");
            assert!(err.message.contains(needle), "{text:?}: {err:?}");
        }
        let deep = format!(
            "{}1{}",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert!(parse(&deep).unwrap_err().message.contains("nested deeper"));
    }

    #[test]
    fn emitted_yaml_reads_back_as_the_same_value() {
        let value = json!({
            "plain": "hello world",
            "looks_typed": ["true", "null", "~", "1", "-2", "0x10", "0o7", "1e3", ".5", "+.inf",
                            ".nan", "1_000", "", " padded ", "yes", "3.0"],
            "punctuation": ["a: b", "#x", "x #y", "- a", "[a]", "{a}", "'q'", "\"dq\"", "a\\b",
                            "@at", "`tick", "%p", "*star", "&amp", "!bang", "|pipe", ">gt", "?q"],
            "control": ["tab\there", "cr\r\nlf", "\u{7}bell", "nul\u{0}", "line\u{2028}sep"],
            "unicode": "grüße 🚀",
            "multi": ["two\nlines", "trailing\n", "kept\n\n\n", "  indented\nfirst", "a\n\nb\n",
                      "ws\n  \nline", "\n", "x\n  indented\n"],
            "numbers": [0, -1, 1.5, 1e300, -2.5e-8, 18446744073709551615u64, i64::MIN],
            "nested": {"empty_map": {}, "empty_list": [], "deep": [[{"a": [1, {"b": null}]}]]},
            "needs quoting": {"1": "numeric key", "true": "bool key", "": "empty key"},
            "bools": [true, false, null]
        });
        let text = emit(&value);
        let back = one(&text);
        assert_eq!(back.value, value, "emitted:\n{text}");
        assert!(
            text.contains("multi:\n  - |-\n    two\n    lines\n"),
            "{text}"
        );
    }

    /// Values as a YAML 1.1 reader (PyYAML) reads `text`, as JSON.
    fn read_as_yaml11(text: &str) -> Value {
        use std::io::Write as _;
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin.read())))",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with PyYAML (Debian python3-yaml) reads the emitted YAML");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "PyYAML refused:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    #[test]
    fn words_yaml11_types_are_quoted() {
        let words = [
            "y",
            "Y",
            "yes",
            "Yes",
            "YES",
            "n",
            "N",
            "no",
            "No",
            "NO",
            "on",
            "On",
            "ON",
            "off",
            "Off",
            "OFF",
            "true",
            "True",
            "FALSE",
            "null",
            "Null",
            "~",
            "",
            "1_000",
            "0b101",
            "1:30",
            "2024-01-31",
            "0o17",
            "017",
            "+.inf",
            ".NaN",
            "=",
            "<<",
        ];
        let value = json!({ "words": &words[..], "y": "key y", "on": "key on" });
        let text = emit(&value);
        for word in words.iter().filter(|w| !w.is_empty()) {
            assert!(
                text.contains(&format!("- \"{word}\"\n")),
                "{word} is not quoted:\n{text}"
            );
        }
        assert!(text.contains("\"y\": key y\n"), "{text}");
        assert!(text.contains("\"on\": key on\n"), "{text}");
        assert_eq!(one(&text).value, value);
        assert_eq!(read_as_yaml11(&text), value, "{text}");
    }

    #[test]
    fn numbers_read_back_as_numbers_in_both_schemas() {
        let value = json!([
            0,
            -1,
            1.5,
            1e300,
            -2.5e-8,
            3.0,
            i64::MIN,
            18446744073709551615u64
        ]);
        let text = emit(&value);
        assert_eq!(one(&text).value, value, "{text}");
        let back = read_as_yaml11(&text);
        let back: Vec<f64> = back
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let expected: Vec<f64> = value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(back, expected, "{text}");
    }

    fn tricky_string() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            prop::sample::select(vec![
                "yes",
                "no",
                "on",
                "off",
                "y",
                "n",
                "Y",
                "N",
                "YES",
                "Off",
                "true",
                "False",
                "null",
                "~",
                "NULL",
                "",
                " ",
                "-",
                "- a",
                "? x",
                "#",
                "a #b",
                "a: b",
                "a:b",
                ":",
                "1",
                "-1",
                "007",
                "0x1f",
                "0o17",
                "0b11",
                "1_000",
                "1e3",
                "1.0",
                ".5",
                "+1",
                "1:20",
                "2024-01-31",
                ".inf",
                "-.Inf",
                ".nan",
                "=",
                "<<",
                "!tag",
                "&a",
                "*a",
                "%x",
                "@x",
                "`x",
                "|",
                ">",
                "'",
                "\"",
                "\\",
                "\t",
                "\n",
                "\r\n",
                "\u{85}",
                "\u{2028}",
                "\u{feff}",
                "\u{7f}",
                "\u{0}",
            ])
            .prop_map(str::to_owned),
            "[ a-z0-9:#\\-?'\"\\\\~.\n\t]{0,16}",
            "( ?[a-zA-Z0-9]{1,4}(: |\n| #|\n\n)?){1,4}\n{0,3}",
            any::<String>(),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Generated string values (and keys) come back unchanged through this reader and
        /// through a YAML 1.1 reader.
        #[test]
        fn strings_round_trip_through_both_readers(
            values in proptest::collection::vec(tricky_string(), 1..12),
            keys in proptest::collection::vec(tricky_string(), 0..4),
        ) {
            let mut map = Map::new();
            map.insert("list".to_owned(), json!(values));
            map.insert("nested".to_owned(), json!([{ "deep": { "x": values } }, values]));
            for (i, key) in keys.into_iter().enumerate() {
                map.insert(key, json!(values[i % values.len()]));
            }
            let value = Value::Object(map);
            let text = emit(&value);
            proptest::prop_assert_eq!(&one(&text).value, &value, "emitted:\n{}", text);
            proptest::prop_assert_eq!(&read_as_yaml11(&text), &value, "emitted:\n{}", text);
        }
    }
}
