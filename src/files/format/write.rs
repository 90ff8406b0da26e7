//! Writing a published datasource back in the file format, for export.

use serde_json::{Map, Value, json};

use super::Key;
use crate::connectors::VERSION_KEYS;
use crate::domain::DatasourceStatus;
use crate::files::yaml;

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
