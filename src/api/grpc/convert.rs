//! Conversions between the registry's types and the `dsreg.v1` messages, and the parsing of
//! request fields into them (ids, JSON documents, sizes).

use chrono::{DateTime, Utc};
use tonic::Status;
use uuid::Uuid;

use super::pb;
use super::status::invalid;
use crate::db::repository::datasources::Datasource;
use crate::db::repository::events::Event;
use crate::db::repository::state::State;
use crate::db::repository::versions::Version;
use crate::domain::{DatasourceStatus, VersionState, WorkerStatus};

/// The largest config document accepted (the schema's limit too).
pub use crate::domain::MAX_CONFIG_BYTES;

/// A timestamp message.
pub fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A timestamp message as a time.
///
/// # Errors
/// INVALID_ARGUMENT naming `field` when out of range.
pub fn from_timestamp(field: &str, ts: &prost_types::Timestamp) -> Result<DateTime<Utc>, Status> {
    u32::try_from(ts.nanos)
        .ok()
        .and_then(|n| DateTime::from_timestamp(ts.seconds, n))
        .ok_or_else(|| invalid(field, "not a valid timestamp"))
}

/// Parses a UUID field.
///
/// # Errors
/// INVALID_ARGUMENT naming `field`.
pub fn id(field: &str, value: &str) -> Result<Uuid, Status> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    Uuid::parse_str(value).map_err(|_| invalid(field, "is not a UUID"))
}

/// Parses a JSON object field of at most `max` bytes.
///
/// # Errors
/// INVALID_ARGUMENT naming `field`: too large, not JSON (with line and column), not an object.
pub fn json_object(field: &str, value: &str, max: usize) -> Result<serde_json::Value, Status> {
    let doc = json_document(field, value, max)?;
    if !doc.is_object() {
        return Err(invalid(field, "must be a JSON object"));
    }
    Ok(doc)
}

/// Parses a JSON document field of at most `max` bytes.
///
/// # Errors
/// INVALID_ARGUMENT naming `field`.
pub fn json_document(field: &str, value: &str, max: usize) -> Result<serde_json::Value, Status> {
    if value.len() > max {
        return Err(invalid(
            field,
            format!("is {} bytes; at most {max} allowed", value.len()),
        ));
    }
    if value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    let doc: serde_json::Value = serde_json::from_str(value).map_err(|e| {
        invalid(
            field,
            format!(
                "is not valid JSON (line {}, column {}): {}",
                e.line(),
                e.column(),
                e.classify_name()
            ),
        )
    })?;
    if let Some(path) = nul_at(&doc, &mut String::new()) {
        return Err(invalid(
            field,
            format!("holds a NUL character (\\u0000) at '{path}', which cannot be stored"),
        ));
    }
    Ok(doc)
}

/// The JSON Pointer of the first key or string in `value` holding a NUL character: Postgres
/// stores neither in `text` nor in `jsonb`.
fn nul_at(value: &serde_json::Value, path: &mut String) -> Option<String> {
    match value {
        serde_json::Value::String(s) if s.contains('\0') => Some(path.clone()),
        serde_json::Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("/{i}"));
            let found = nul_at(item, path);
            path.truncate(len);
            found
        }),
        serde_json::Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            let len = path.len();
            path.push('/');
            path.push_str(&key.replace('~', "~0").replace('/', "~1"));
            let found = if key.contains('\0') {
                Some(path.clone())
            } else {
                nul_at(item, path)
            };
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

/// Checks a free-text field's length, and that it holds no NUL character (Postgres text
/// cannot).
///
/// # Errors
/// INVALID_ARGUMENT naming `field`.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(invalid(
            field,
            format!("is {} bytes; at most {max} allowed", value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(invalid(
            field,
            "holds a NUL character, which cannot be stored",
        ));
    }
    Ok(())
}

trait Classify {
    fn classify_name(&self) -> &'static str;
}

impl Classify for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected data",
            serde_json::error::Category::Eof => "unexpected end",
        }
    }
}

/// The message enum of a datasource status.
pub fn datasource_status(s: DatasourceStatus) -> pb::DatasourceStatus {
    match s {
        DatasourceStatus::Active => pb::DatasourceStatus::Active,
        DatasourceStatus::Disabled => pb::DatasourceStatus::Disabled,
        DatasourceStatus::Archived => pb::DatasourceStatus::Archived,
    }
}

/// A datasource status from the message enum (`None` for UNSPECIFIED).
///
/// # Errors
/// INVALID_ARGUMENT naming `field` for an unknown value.
pub fn datasource_status_from(field: &str, value: i32) -> Result<Option<DatasourceStatus>, Status> {
    match pb::DatasourceStatus::try_from(value) {
        Ok(pb::DatasourceStatus::Unspecified) => Ok(None),
        Ok(pb::DatasourceStatus::Active) => Ok(Some(DatasourceStatus::Active)),
        Ok(pb::DatasourceStatus::Disabled) => Ok(Some(DatasourceStatus::Disabled)),
        Ok(pb::DatasourceStatus::Archived) => Ok(Some(DatasourceStatus::Archived)),
        Err(_) => Err(invalid(field, format!("unknown status {value}"))),
    }
}

/// The etag of a revision.
pub fn etag(revision: i64) -> String {
    format!("r{revision}")
}

/// The revision an etag names.
///
/// # Errors
/// INVALID_ARGUMENT naming `field` when it is not an etag this registry issued.
pub fn revision(field: &str, etag: &str) -> Result<Option<i64>, Status> {
    if etag.is_empty() {
        return Ok(None);
    }
    etag.strip_prefix('r')
        .and_then(|n| n.parse().ok())
        .map(Some)
        .ok_or_else(|| invalid(field, "is not an etag issued by this registry"))
}

/// A datasource message.
pub fn datasource(d: Datasource) -> pb::Datasource {
    pb::Datasource {
        id: d.id.to_string(),
        org: d.org,
        project: d.project,
        name: d.name,
        kind: d.kind,
        status: datasource_status(d.status).into(),
        owner: d.owner,
        tags: d.tags,
        description: d.description,
        current_version: d.current_version.unwrap_or(0),
        etag: etag(d.revision),
        created_by: d.created_by,
        created_at: Some(timestamp(d.created_at)),
        updated_by: d.updated_by,
        updated_at: Some(timestamp(d.updated_at)),
    }
}

/// A version message.
pub fn version(v: Version) -> pb::Version {
    pb::Version {
        datasource_id: v.datasource_id.to_string(),
        version: v.version,
        config_json: v.config.to_string(),
        state: match v.state {
            VersionState::Draft => pb::VersionState::Draft,
            VersionState::Published => pb::VersionState::Published,
            VersionState::Archived => pb::VersionState::Archived,
        }
        .into(),
        comment: v.comment,
        created_by: v.created_by,
        created_at: Some(timestamp(v.created_at)),
        published_at: v.published_at.map(timestamp),
        published_by: v.published_by.unwrap_or_default(),
    }
}

/// The message enum of a worker status.
pub fn worker_status(s: WorkerStatus) -> pb::WorkerStatus {
    match s {
        WorkerStatus::Init => pb::WorkerStatus::Init,
        WorkerStatus::Starting => pb::WorkerStatus::Starting,
        WorkerStatus::Running => pb::WorkerStatus::Running,
        WorkerStatus::Error => pb::WorkerStatus::Error,
        WorkerStatus::Stopped => pb::WorkerStatus::Stopped,
        WorkerStatus::CrashLoop => pb::WorkerStatus::CrashLoop,
        WorkerStatus::Stalled => pb::WorkerStatus::Stalled,
    }
}

/// A worker state message.
pub fn worker_state(ds: &Datasource, s: State, settled: bool) -> pb::WorkerState {
    pb::WorkerState {
        datasource_id: s.datasource_id.to_string(),
        desired_running: s.desired == crate::domain::DesiredState::Running
            && ds.status == DatasourceStatus::Active,
        status: worker_status(s.worker_status).into(),
        running_version: s.running_version.unwrap_or(0),
        published_version: ds.current_version.unwrap_or(0),
        error_code: s.error_code.unwrap_or_default(),
        error_message: s.error_message.unwrap_or_default(),
        restart_count: s.restart_count,
        failures_since_healthy: s.restart_count,
        restarts_requested: s.restart_generation,
        owner_live: s.owner_live.unwrap_or(false),
        owner_instance: s.owner_instance.unwrap_or_default(),
        last_heartbeat_at: s.last_heartbeat_at.map(timestamp),
        last_progress_at: s.last_progress_at.map(timestamp),
        updated_at: Some(timestamp(s.updated_at)),
        settled,
        lease_epoch: s.lease_epoch,
        dead_letters: s.dead_letters,
        failing_since: s.failing_since.map(timestamp),
    }
}

/// An instance message.
pub fn instance(i: crate::db::repository::leases::Instance) -> pb::Instance {
    pb::Instance {
        id: i.id,
        address: i.address,
        version: i.version,
        started_at: Some(timestamp(i.started_at)),
        heartbeat_at: Some(timestamp(i.heartbeat_at)),
        stopped_at: i.stopped_at.map(timestamp),
        live: i.live,
        leases: i.leases,
    }
}

/// An event message.
pub fn event(e: Event) -> pb::Event {
    pb::Event {
        id: e.id,
        datasource_id: e.datasource_id.map(|id| id.to_string()).unwrap_or_default(),
        r#type: e.kind,
        version: e.version.unwrap_or(0),
        actor: e.actor,
        payload_json: e.payload.to_string(),
        traceparent: e.traceparent.unwrap_or_default(),
        created_at: Some(timestamp(e.created_at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_say_what_is_wrong() {
        let too_big = json_object("config_json", &"x".repeat(20), 10).unwrap_err();
        assert!(too_big.message().contains("at most 10"));
        let broken = json_object("config_json", "{\"a\": }", 100).unwrap_err();
        assert!(broken.message().contains("line 1"), "{}", broken.message());
        let array = json_object("config_json", "[1]", 100).unwrap_err();
        assert!(array.message().contains("JSON object"));
        assert!(json_object("config_json", "{\"a\": 1}", 100).is_ok());
    }

    #[test]
    fn etags_round_trip_and_foreign_ones_are_refused() {
        assert_eq!(revision("etag", &etag(42)).unwrap(), Some(42));
        assert_eq!(revision("etag", "").unwrap(), None);
        assert!(revision("etag", "W/\"abc\"").is_err());
    }

    #[test]
    fn ids_must_be_uuids() {
        assert!(id("id", "").unwrap_err().message().contains("empty"));
        assert!(id("id", "42").unwrap_err().message().contains("UUID"));
    }
}
