//! The datasource file format: what a file may say, how it is read into [`Definition`]s and
//! checked exactly as an API publish is, and how a published datasource is written back.
//!
//! ```yaml
//! org: acme
//! project: shop
//! name: orders
//! kind: http_poll
//! status: active            # or disabled; optional
//! owner: team-orders        # optional
//! tags: [orders, eu]        # optional
//! description: Orders feed  # optional
//! config:                   # the kind's config
//!   url: https://orders.example/api
//!   bearer_secret: orders_token
//! transform: |              # optional Rhai script
//!   record.source = "orders"; record
//! output_schema: {type: object}   # optional
//! secrets: [orders_token]   # names only; values go in with `dsreg secret put`
//! ```
//!
//! A file holds one such mapping, a list of them, or several YAML documents. Optional fields
//! left out are not managed by the file: a new datasource gets the default, an existing one
//! keeps what it has.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::Problem;
use super::yaml::{self, Document};
use crate::connectors::{Catalog, VERSION_KEYS};
use crate::domain::{self, DatasourceStatus, MAX_CONFIG_BYTES, MAX_OWNER, MAX_TEXT, Name};
use crate::transform::Limits;

/// The fields a datasource file may hold, in the order export writes them.
pub const FIELDS: &[&str] = &[
    "org",
    "project",
    "name",
    "kind",
    "status",
    "owner",
    "tags",
    "description",
    "config",
    "transform",
    "output_schema",
    "kind_version",
    "secrets",
];

/// A datasource's identity: organisation, project and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Organisation.
    pub org: String,
    /// Project.
    pub project: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.org, self.project, self.name)
    }
}

/// One datasource as a file defines it, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    /// The file, as found.
    pub path: PathBuf,
    /// The file's absolute path, as the database records it.
    pub file: String,
    /// Where the definition starts in it.
    pub line: usize,
    /// Where its `kind` is.
    pub kind_line: usize,
    /// Its identity.
    pub key: Key,
    /// The connector kind.
    pub kind: String,
    /// Active or disabled, when the file says.
    pub status: Option<DatasourceStatus>,
    /// Owner, when the file says.
    pub owner: Option<String>,
    /// Tags, when the file says.
    pub tags: Option<Vec<String>>,
    /// Description, when the file says.
    pub description: Option<String>,
    /// The version config: `config` with `transform`, `output_schema` and `kind_version`.
    pub config: Value,
    /// The secrets it uses, by name, sorted.
    pub secrets: Vec<String>,
    /// A hash of everything above but the file's place: what tells an edit from a reformat.
    pub hash: String,
}

/// Reads every datasource in `text` (the contents of `path`, absolute path `file`), each
/// checked against `catalog` as a publish is; returns the good ones and every problem, each
/// with its line.
pub fn read(
    path: &Path,
    file: &str,
    text: &str,
    catalog: &Catalog,
    limits: &Limits,
) -> (Vec<Definition>, Vec<Problem>) {
    let documents = match yaml::parse(text) {
        Ok(documents) => documents,
        Err(e) => {
            return (
                Vec::new(),
                vec![Problem::new(path, e.line, None, e.message)],
            );
        }
    };
    let mut definitions = Vec::new();
    let mut problems = Vec::new();
    for doc in &documents {
        let mut one = |prefix: String, value: &Value| {
            let Some(map) = value.as_object() else {
                problems.push(Problem::new(
                    path,
                    doc.line_of(prefix.trim_end_matches('.')),
                    None,
                    "each entry must be a datasource: a mapping with org, project, name, kind and config",
                ));
                return;
            };
            let mut reader = Reader {
                path,
                file,
                doc,
                prefix,
                problems: Vec::new(),
            };
            let definition = reader.definition(map, catalog, limits);
            problems.append(&mut reader.problems);
            definitions.extend(definition);
        };
        match &doc.value {
            Value::Null => {}
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    one(format!("{i}."), item);
                }
            }
            value => one(String::new(), value),
        }
    }
    (definitions, problems)
}

/// Reads one definition, collecting its problems.
struct Reader<'a> {
    path: &'a Path,
    file: &'a str,
    doc: &'a Document,
    /// `""`, or `"3."` for the fourth item of a list.
    prefix: String,
    problems: Vec<Problem>,
}

impl Reader<'_> {
    fn line(&self, field: &str) -> usize {
        self.doc.line_of(&format!("{}{field}", self.prefix))
    }

    fn problem(&mut self, field: &str, datasource: Option<&Key>, message: impl Into<String>) {
        let line = self.line(field);
        let message = message.into();
        let message = if field.is_empty() {
            message
        } else {
            format!("{field}: {message}")
        };
        self.problems.push(Problem::new(
            self.path,
            line,
            datasource.map(Key::to_string),
            message,
        ));
    }

    fn string(&mut self, map: &Map<String, Value>, field: &str) -> Option<String> {
        match map.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.problem(field, None, "must be a string");
                None
            }
        }
    }

    fn name(&mut self, map: &Map<String, Value>, field: &'static str) -> Option<Name> {
        let Some(value) = self.string(map, field) else {
            if !map.contains_key(field) || map[field].is_null() {
                self.problem("", None, format!("{field} is required"));
            }
            return None;
        };
        Name::parse(field, &value)
            .map_err(|e| self.problem(field, None, e.reason))
            .ok()
    }

    fn definition(
        &mut self,
        map: &Map<String, Value>,
        catalog: &Catalog,
        limits: &Limits,
    ) -> Option<Definition> {
        let before = self.problems.len();
        for field in map.keys().filter(|k| !FIELDS.contains(&k.as_str())) {
            let message = format!("unknown field; a datasource file has {}", FIELDS.join(", "));
            self.problem(field, None, message);
        }
        let org = self.name(map, "org");
        let project = self.name(map, "project");
        let name = self.name(map, "name");
        let kind = self.string(map, "kind");
        if kind.is_none() && map.get("kind").is_none_or(Value::is_null) {
            self.problem("", None, "kind is required");
        }
        let (Some(org), Some(project), Some(name)) = (org, project, name) else {
            return None;
        };
        let key = Key {
            org: org.to_string(),
            project: project.to_string(),
            name: name.to_string(),
        };
        let status = self
            .string(map, "status")
            .and_then(|s| match s.parse::<DatasourceStatus>() {
                Ok(s @ (DatasourceStatus::Active | DatasourceStatus::Disabled)) => Some(s),
                Ok(DatasourceStatus::Archived) => {
                    self.problem(
                        "status",
                        Some(&key),
                        "must be active or disabled; to archive a datasource, delete it from its \
                         file and import or sync with --prune",
                    );
                    None
                }
                Err(_) => {
                    self.problem("status", Some(&key), "must be active or disabled");
                    None
                }
            });
        let owner = self.string(map, "owner");
        if let Some(Err(e)) = owner
            .as_deref()
            .map(|o| domain::check_text("owner", o, MAX_OWNER))
        {
            self.problem("owner", Some(&key), e.reason);
        }
        let description = self.string(map, "description");
        if let Some(Err(e)) = description
            .as_deref()
            .map(|d| domain::check_text("description", d, MAX_TEXT))
        {
            self.problem("description", Some(&key), e.reason);
        }
        let tags = self.tags(map, &key);
        let secrets = self.secrets(map, &key);
        let config = self.config(map, &key);
        let kind = kind?;
        let config = config?;
        if self.problems.len() > before {
            return None;
        }
        if let Err(problems) = catalog.check(&kind, &config, &secrets, limits) {
            for p in problems {
                let (field, line) = self.config_field(&p.field, p.line, map.contains_key("config"));
                let reason = if p.missing_secret.is_some() {
                    "this secret is required by the config: list it under secrets (and put its \
                     value with `dsreg secret put`)"
                        .to_owned()
                } else {
                    p.reason
                };
                self.problems.push(Problem::new(
                    self.path,
                    line,
                    Some(key.to_string()),
                    format!("{field}: {reason}"),
                ));
            }
            return None;
        }
        let kind_line = self.line("kind");
        let hash = hash(&json!({
            "key": [key.org, key.project, key.name],
            "kind": kind,
            "status": status.map(DatasourceStatus::as_str),
            "owner": owner,
            "tags": tags,
            "description": description,
            "config": config,
            "secrets": secrets,
        }));
        Some(Definition {
            path: self.path.to_owned(),
            file: self.file.to_owned(),
            line: self.line(""),
            kind_line,
            key,
            kind,
            status,
            owner,
            tags,
            description,
            config,
            secrets,
            hash,
        })
    }

    fn tags(&mut self, map: &Map<String, Value>, key: &Key) -> Option<Vec<String>> {
        let items = match map.get("tags") {
            None | Some(Value::Null) => return None,
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.problem("tags", Some(key), "must be a list of strings");
                return None;
            }
        };
        let tags: Vec<String> = items
            .iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
        if tags.len() != items.len() {
            self.problem("tags", Some(key), "must be a list of strings");
            return None;
        }
        if let Err(e) = domain::check_tags(&tags) {
            self.problem("tags", Some(key), e.reason);
        }
        Some(tags)
    }

    /// Secret names. Never echoes what it refuses: a value written here by mistake may be a
    /// credential.
    fn secrets(&mut self, map: &Map<String, Value>, key: &Key) -> Vec<String> {
        let items = match map.get("secrets") {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.problem(
                    "secrets",
                    Some(key),
                    "must be a list of secret names; values never go in files (put them with \
                     `dsreg secret put`)",
                );
                return Vec::new();
            }
        };
        let mut names = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(name) if valid_secret_name(name) => {
                    names.insert(name.to_owned());
                }
                _ => self.problem(
                    &format!("secrets.{i}"),
                    Some(key),
                    "must be a secret name (1 to 128 letters, digits, '_', '.', '-'); values \
                     never go in files (put them with `dsreg secret put`)",
                ),
            }
        }
        names.into_iter().collect()
    }

    /// `config` merged with the version keys written beside it.
    fn config(&mut self, map: &Map<String, Value>, key: &Key) -> Option<Value> {
        let mut config = match map.get("config") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(config)) => config.clone(),
            Some(_) => {
                self.problem("config", Some(key), "must be a mapping");
                return None;
            }
        };
        for field in VERSION_KEYS {
            if config.contains_key(*field) {
                self.problem(
                    &format!("config.{field}"),
                    Some(key),
                    format!("{field} goes at the top level of the file, beside config"),
                );
            }
            if let Some(value) = map.get(*field).filter(|v| !v.is_null()) {
                config.insert((*field).to_owned(), value.clone());
            }
        }
        let config = Value::Object(config);
        let size = config.to_string().len();
        if size > MAX_CONFIG_BYTES {
            self.problem(
                "config",
                Some(key),
                format!("the config is {size} bytes as JSON; at most {MAX_CONFIG_BYTES}"),
            );
            return None;
        }
        Some(config)
    }

    /// Where a catalog problem of `field` (a path within the version config) is in the file,
    /// and how the file names it.
    fn config_field(
        &self,
        field: &str,
        script_line: Option<usize>,
        has_config: bool,
    ) -> (String, usize) {
        let head = field.split('.').next().unwrap_or_default();
        if field == "kind" {
            return (field.to_owned(), self.line("kind"));
        }
        if head == "secrets" {
            let listed = self
                .doc
                .lines
                .contains_key(&format!("{}secrets", self.prefix));
            let line = self.line(if listed { "secrets" } else { "kind" });
            return (field.to_owned(), line);
        }
        if VERSION_KEYS.contains(&head) {
            let path = format!("{}{field}", self.prefix);
            let line = match (script_line, self.doc.blocks.get(&path)) {
                (Some(l), Some(start)) => start + l - 1,
                _ => self.line(field),
            };
            return (field.to_owned(), line);
        }
        let named = if field.is_empty() {
            "config".to_owned()
        } else {
            format!("config.{field}")
        };
        let line = if has_config {
            self.line(&named)
        } else {
            self.line("")
        };
        (named, line)
    }
}

/// The names the schema allows for a secret.
fn valid_secret_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// SHA-256 of `value` as JSON with every object's keys sorted, in hex.
pub fn hash(value: &Value) -> String {
    fn write(out: &mut Vec<u8>, value: &Value) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push(b'{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend(Value::String(k.clone()).to_string().as_bytes());
                    out.push(b':');
                    write(out, &map[k]);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(out, item);
                }
                out.push(b']');
            }
            scalar => out.extend(scalar.to_string().as_bytes()),
        }
    }
    let mut bytes = Vec::new();
    write(&mut bytes, value);
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether two configs say the same: equal, with numbers compared by value (the database
/// may give `1000` back for a file's `1e3`).
pub fn same_config(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || matches!((x.as_f64(), y.as_f64()), (Some(x), Some(y)) if x == y)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_config(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_config(v, w)))
        }
        _ => a == b,
    }
}

/// What export writes of a datasource.
#[derive(Debug, Clone)]
pub struct Exported<'a> {
    /// Identity.
    pub key: &'a Key,
    /// Kind.
    pub kind: &'a str,
    /// Active or disabled.
    pub status: DatasourceStatus,
    /// Owner (written when not empty).
    pub owner: &'a str,
    /// Tags (written when any).
    pub tags: &'a [String],
    /// Description (written when not empty).
    pub description: &'a str,
    /// The published version's config.
    pub config: &'a Value,
    /// The names of its secrets.
    pub secrets: &'a [String],
}

/// A datasource in the file format, fields in the documented order; reading it back gives
/// the same datasource.
pub fn write(d: &Exported<'_>) -> String {
    let mut config = d.config.as_object().cloned().unwrap_or_default();
    let mut fields: Vec<(&str, Value)> = vec![
        ("org", json!(d.key.org)),
        ("project", json!(d.key.project)),
        ("name", json!(d.key.name)),
        ("kind", json!(d.kind)),
        ("status", json!(d.status.as_str())),
    ];
    if !d.owner.is_empty() {
        fields.push(("owner", json!(d.owner)));
    }
    if !d.tags.is_empty() {
        fields.push(("tags", json!(d.tags)));
    }
    if !d.description.is_empty() {
        fields.push(("description", json!(d.description)));
    }
    let version_keys: Vec<(&str, Value)> = VERSION_KEYS
        .iter()
        .filter_map(|k| config.remove(*k).map(|v| (*k, v)))
        .collect();
    fields.push(("config", Value::Object(config)));
    fields.extend(version_keys);
    if !d.secrets.is_empty() {
        fields.push(("secrets", json!(d.secrets)));
    }
    fields
        .into_iter()
        .map(|(field, value)| {
            let mut one = Map::new();
            one.insert(field.to_owned(), value);
            yaml::emit(&Value::Object(one))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_str(text: &str) -> (Vec<Definition>, Vec<Problem>) {
        read(
            Path::new("ds.yaml"),
            "/files/ds.yaml",
            text,
            &Catalog::builtin(),
            &Limits::default(),
        )
    }

    fn problems(text: &str) -> Vec<String> {
        let (defs, problems) = read_str(text);
        assert!(defs.is_empty() || !problems.is_empty(), "{defs:?}");
        problems.iter().map(ToString::to_string).collect()
    }

    const ORDERS: &str = "org: acme\nproject: shop\nname: orders\nkind: generator\n\
        config:\n  rate_per_sec: 5\n  template:\n    source: orders\n\
        transform: |\n  record.seen = true;\n  record\nsecrets: [b, a]\n";

    #[test]
    fn a_file_reads_into_a_checked_definition() {
        let (defs, problems) = read_str(ORDERS);
        assert!(problems.is_empty(), "{problems:?}");
        let d = &defs[0];
        assert_eq!(d.key.to_string(), "acme/shop/orders");
        assert_eq!(d.kind_line, 4);
        assert_eq!(
            d.config,
            json!({"rate_per_sec": 5, "template": {"source": "orders"},
                   "transform": "record.seen = true;\nrecord\n"})
        );
        assert_eq!(d.secrets, ["a", "b"]);
        assert_eq!(d.status, None);
        assert_eq!(d.owner, None);
    }

    #[test]
    fn lists_and_documents_hold_several_datasources() {
        let text = "- {org: a, project: p, name: one, kind: generator}\n\
                    - {org: a, project: p, name: two, kind: generator}\n---\n\
                    org: a\nproject: p\nname: three\nkind: generator\n";
        let (defs, problems) = read_str(text);
        assert!(problems.is_empty(), "{problems:?}");
        let names: Vec<_> = defs.iter().map(|d| (d.key.name.as_str(), d.line)).collect();
        assert_eq!(names, [("one", 1), ("two", 2), ("three", 4)]);
    }

    #[test]
    fn every_problem_is_reported_at_its_line() {
        let text = "org: acme\nproject: shop\nname: orders\nkind: generator\nconfg: {}\n\
                    config:\n  rate_per_sec: fast\n  transform: x\ntags: [1]\nstatus: archived\n";
        assert_eq!(
            problems(text),
            [
                "ds.yaml:5: confg: unknown field; a datasource file has org, project, name, kind, \
                 status, owner, tags, description, config, transform, output_schema, kind_version, secrets",
                "ds.yaml:10: acme/shop/orders: status: must be active or disabled; to archive a \
                 datasource, delete it from its file and import or sync with --prune",
                "ds.yaml:9: acme/shop/orders: tags: must be a list of strings",
                "ds.yaml:8: acme/shop/orders: config.transform: transform goes at the top level \
                 of the file, beside config",
            ]
        );
        let schema = problems(
            "org: acme\nproject: shop\nname: orders\nkind: generator\nconfig:\n  template: {}\n  rate_per_sec: fast\n",
        );
        assert_eq!(schema.len(), 1);
        assert!(
            schema[0].starts_with("ds.yaml:7: acme/shop/orders: config.rate_per_sec: "),
            "{schema:?}"
        );
        let missing = problems("org: acme\nproject: a b\nkind: 3\n");
        assert_eq!(
            missing,
            [
                "ds.yaml:2: project: contains ' '; only letters, digits, '_', '-' and '.' are allowed",
                "ds.yaml:1: name is required",
                "ds.yaml:3: kind: must be a string",
            ]
        );
    }

    #[test]
    fn script_errors_point_into_the_script() {
        let text =
            "org: a\nproject: p\nname: n\nkind: generator\ntransform: |\n  let x = 1;\n  let = ;\n";
        let problems = problems(text);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0]
                .starts_with("ds.yaml:7: a/p/n: transform: transform syntax error at line 2"),
            "{problems:?}"
        );
    }

    #[test]
    fn secret_problems_never_echo_what_was_written() {
        let canary = "sk_live_canary-value";
        let text = format!(
            "org: a\nproject: p\nname: n\nkind: webhook\nsecrets:\n  webhook_secret: {canary}\n"
        );
        let found = problems(&text);
        assert!(found.iter().all(|p| !p.contains(canary)), "{found:?}");
        assert!(found[0].starts_with("ds.yaml:5: a/p/n: secrets: must be a list"));
        let listed = problems_of_list(&format!("[{canary} value]"));
        assert!(listed.iter().all(|p| !p.contains(canary)), "{listed:?}");
        let needed = problems("org: a\nproject: p\nname: n\nkind: webhook\n");
        assert_eq!(needed.len(), 1);
        assert!(
            needed[0]
                .starts_with("ds.yaml:4: a/p/n: secrets.webhook_secret: this secret is required"),
            "{needed:?}"
        );
    }

    fn problems_of_list(secrets: &str) -> Vec<String> {
        problems(&format!(
            "org: a\nproject: p\nname: n\nkind: webhook\nsecrets: {secrets}\n"
        ))
    }

    #[test]
    fn the_hash_ignores_layout_and_follows_content() {
        let (a, _) = read_str(ORDERS);
        let reordered = "# comment\nkind: generator\nname: orders\nproject: shop\norg: acme\n\
            secrets: [a, b]\ntransform: \"record.seen = true;\\nrecord\\n\"\n\
            config: {template: {source: orders}, rate_per_sec: 5}\n";
        let (b, problems) = read_str(reordered);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(a[0].hash, b[0].hash);
        let (c, _) = read_str(&ORDERS.replace("rate_per_sec: 5", "rate_per_sec: 6"));
        assert_ne!(a[0].hash, c[0].hash);
    }

    #[test]
    fn written_files_read_back_the_same() {
        let key = Key {
            org: "acme".into(),
            project: "shop".into(),
            name: "orders".into(),
        };
        let config = json!({
            "url": "http://x", "bearer_secret": "token", "headers": {"x-a": "1"},
            "transform": "let x = record;\nx\n", "output_schema": {"type": "object"}
        });
        let secrets = vec!["token".to_owned()];
        let tags = vec!["a".to_owned(), "true".to_owned()];
        let text = write(&Exported {
            key: &key,
            kind: "http_poll",
            status: DatasourceStatus::Disabled,
            owner: "team: orders",
            tags: &tags,
            description: "",
            config: &config,
            secrets: &secrets,
        });
        assert!(
            text.starts_with("org: acme\nproject: shop\nname: orders\nkind: http_poll\n"),
            "{text}"
        );
        let (defs, problems) = read_str(&text);
        assert!(problems.is_empty(), "{problems:?}\n{text}");
        let d = &defs[0];
        assert_eq!(d.config, config);
        assert_eq!(d.status, Some(DatasourceStatus::Disabled));
        assert_eq!(d.owner.as_deref(), Some("team: orders"));
        assert_eq!(d.tags.as_deref(), Some(&tags[..]));
        assert_eq!(d.secrets, secrets);
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(same_config(&json!({"a": [1000.0]}), &json!({"a": [1000]})));
        assert!(!same_config(&json!({"a": 1}), &json!({"a": 2})));
        assert!(!same_config(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
    }
}
