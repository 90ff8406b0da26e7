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
//!
//! This module is the schema ([`FIELDS`], [`Key`], [`Definition`]); `read` checks a file into
//! definitions, `hash` tells an edit from a reformat, `write` is the export writer.

use std::fmt;
use std::path::PathBuf;

use serde_json::Value;

use crate::domain::DatasourceStatus;

mod hash;
mod read;
mod write;

pub use hash::{hash, same_config};
pub use read::read;
pub use write::{Exported, write};

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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::connectors::Catalog;
    use crate::files::Problem;
    use crate::transform::Limits;

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
