//! Reading a datasource file into checked [`Definition`]s: the fields the format allows, each
//! value's shape, then the catalog's checks exactly as an API publish runs them; every
//! problem with its line.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value, json};

use super::hash::hash;
use super::{Definition, FIELDS, Key};
use crate::connectors::{Catalog, VERSION_KEYS};
use crate::domain::{self, DatasourceStatus, MAX_CONFIG_BYTES, MAX_OWNER, MAX_TEXT, Name};
use crate::files::Problem;
use crate::files::yaml::{self, Document};
use crate::transform::Limits;

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
