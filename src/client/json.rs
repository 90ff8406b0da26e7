//! What scripts read with `-o json`: each API message as one JSON object.
//!
//! Field names are the proto's; enums are their short lower-case names (`active`, `draft`,
//! `crash_loop`); timestamps are RFC 3339 in UTC, `null` when unset; fields that carry JSON
//! as a string (`config_json`, `payload_json`, `outputs_json`, `config_schema_json`) are
//! embedded as JSON values under the name without `_json` (`config`, `payload`, …), `null`
//! when empty, and kept as a string only if the server sent something that does not parse.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use crate::api::grpc::pb;

/// An API message as a JSON value.
pub trait ToJson {
    /// The JSON object for this message.
    fn to_json(&self) -> Value;
}

/// A protobuf timestamp as a `DateTime`, if it is in range.
pub fn to_datetime(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(ts.nanos).ok()?;
    DateTime::from_timestamp(ts.seconds, nanos)
}

/// A timestamp as RFC 3339 (UTC, with the precision it has), or `null`.
pub fn timestamp(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.and_then(to_datetime).map_or(Value::Null, |t| {
        Value::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    })
}

/// A string holding JSON, as the JSON value: `null` when empty, the string itself when it
/// does not parse.
pub fn embedded(text: &str) -> Value {
    if text.trim().is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// The short name of a proto enum value: `DATASOURCE_STATUS_ACTIVE` → `active`.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// A datasource status's short name (`active`, `disabled`, `archived`); `unknown(n)` for a
/// value this client does not know.
pub fn datasource_status(value: i32) -> String {
    pb::DatasourceStatus::try_from(value).map_or_else(
        |_| format!("unknown({value})"),
        |s| short(s.as_str_name(), "DATASOURCE_STATUS_"),
    )
}

/// A version state's short name (`draft`, `published`, `archived`).
pub fn version_state(value: i32) -> String {
    pb::VersionState::try_from(value).map_or_else(
        |_| format!("unknown({value})"),
        |s| short(s.as_str_name(), "VERSION_STATE_"),
    )
}

/// A worker status's short name (`running`, `crash_loop`, …).
pub fn worker_status(value: i32) -> String {
    pb::WorkerStatus::try_from(value).map_or_else(
        |_| format!("unknown({value})"),
        |s| short(s.as_str_name(), "WORKER_STATUS_"),
    )
}

impl ToJson for pb::Datasource {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "org": self.org,
            "project": self.project,
            "name": self.name,
            "kind": self.kind,
            "status": datasource_status(self.status),
            "owner": self.owner,
            "tags": self.tags,
            "description": self.description,
            "current_version": self.current_version,
            "etag": self.etag,
            "created_by": self.created_by,
            "created_at": timestamp(self.created_at.as_ref()),
            "updated_by": self.updated_by,
            "updated_at": timestamp(self.updated_at.as_ref()),
        })
    }
}

impl ToJson for pb::Version {
    fn to_json(&self) -> Value {
        json!({
            "datasource_id": self.datasource_id,
            "version": self.version,
            "config": embedded(&self.config_json),
            "state": version_state(self.state),
            "comment": self.comment,
            "created_by": self.created_by,
            "created_at": timestamp(self.created_at.as_ref()),
            "published_at": timestamp(self.published_at.as_ref()),
            "published_by": self.published_by,
        })
    }
}

impl ToJson for pb::PublishResponse {
    fn to_json(&self) -> Value {
        json!({
            "datasource_id": self.datasource_id,
            "version": self.version,
            "event_id": self.event_id,
        })
    }
}

impl ToJson for pb::Event {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "datasource_id": self.datasource_id,
            "type": self.r#type,
            "version": self.version,
            "actor": self.actor,
            "payload": embedded(&self.payload_json),
            "traceparent": self.traceparent,
            "created_at": timestamp(self.created_at.as_ref()),
        })
    }
}

impl ToJson for pb::WorkerState {
    fn to_json(&self) -> Value {
        json!({
            "datasource_id": self.datasource_id,
            "desired_running": self.desired_running,
            "status": worker_status(self.status),
            "running_version": self.running_version,
            "published_version": self.published_version,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "restart_count": self.restart_count,
            "failures_since_healthy": self.failures_since_healthy,
            "restarts_requested": self.restarts_requested,
            "owner_instance": self.owner_instance,
            "owner_live": self.owner_live,
            "lease_epoch": self.lease_epoch,
            "last_heartbeat_at": timestamp(self.last_heartbeat_at.as_ref()),
            "last_progress_at": timestamp(self.last_progress_at.as_ref()),
            "updated_at": timestamp(self.updated_at.as_ref()),
            "settled": self.settled,
            "dead_letters": self.dead_letters,
            "failing_since": timestamp(self.failing_since.as_ref()),
        })
    }
}

impl ToJson for pb::DatasourceMetrics {
    fn to_json(&self) -> Value {
        json!({
            "datasource_id": self.datasource_id,
            "records_total": self.records_total,
            "dead_lettered_total": self.dead_lettered_total,
            "errors_total": self.errors_total,
            "restart_count": self.restart_count,
            "failures_since_healthy": self.failures_since_healthy,
            "restarts_requested": self.restarts_requested,
            "restarts_total": self.restarts_total,
            "lag_seconds": self.lag_seconds,
            "last_event_at": timestamp(self.last_event_at.as_ref()),
            "snapshot_at": timestamp(self.snapshot_at.as_ref()),
        })
    }
}

impl ToJson for pb::SecretMeta {
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "key_version": self.key_version,
            "fingerprint": self.fingerprint,
            "created_at": timestamp(self.created_at.as_ref()),
            "rotated_at": timestamp(self.rotated_at.as_ref()),
        })
    }
}

impl ToJson for pb::DeleteSecretResponse {
    fn to_json(&self) -> Value {
        json!({ "deleted": self.deleted, "warning": self.warning })
    }
}

impl ToJson for pb::Kind {
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "version": self.version,
            "summary": self.summary,
            "config_schema": embedded(&self.config_schema_json),
            "secrets": self.secrets,
            "push": self.push,
            "can_backfill": self.can_backfill,
        })
    }
}

impl ToJson for pb::KindHealth {
    fn to_json(&self) -> Value {
        json!({
            "kind": self.kind,
            "healthy": self.healthy,
            "detail": self.detail,
            "checked_at": timestamp(self.checked_at.as_ref()),
        })
    }
}

impl ToJson for pb::GetInfoResponse {
    fn to_json(&self) -> Value {
        json!({
            "version": self.version,
            "instance_id": self.instance_id,
            "schema_version": self.schema_version,
        })
    }
}

impl ToJson for pb::Instance {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "address": self.address,
            "version": self.version,
            "started_at": timestamp(self.started_at.as_ref()),
            "heartbeat_at": timestamp(self.heartbeat_at.as_ref()),
            "stopped_at": timestamp(self.stopped_at.as_ref()),
            "live": self.live,
            "leases": self.leases,
        })
    }
}

impl ToJson for pb::RejectedRecord {
    fn to_json(&self) -> Value {
        json!({
            "sample": self.sample,
            "index": self.index,
            "code": self.code,
            "message": self.message,
        })
    }
}

impl ToJson for pb::RunTestResponse {
    fn to_json(&self) -> Value {
        json!({
            "inputs": self.inputs,
            "outputs": self.outputs_json.iter().map(|o| embedded(o)).collect::<Vec<_>>(),
            "rejected": self.rejected.iter().map(ToJson::to_json).collect::<Vec<_>>(),
            "logs": self.logs,
            "warnings": self.warnings,
            "compile_micros": self.compile_micros,
            "run_micros": self.run_micros,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn a_datasource_has_named_enums_and_rfc3339_times() {
        let ds = pb::Datasource {
            id: "7f1c".into(),
            org: "acme".into(),
            project: "core".into(),
            name: "orders".into(),
            kind: "webhook".into(),
            status: pb::DatasourceStatus::Disabled as i32,
            owner: "team-a".into(),
            tags: vec!["a".into(), "b".into()],
            current_version: 3,
            etag: "e1".into(),
            created_at: ts(1_714_564_803, 0),
            updated_at: None,
            ..Default::default()
        };
        let json = ds.to_json();
        assert_eq!(json["status"], "disabled");
        assert_eq!(json["tags"], json!(["a", "b"]));
        assert_eq!(json["current_version"], 3);
        assert_eq!(json["created_at"], "2024-05-01T12:00:03Z");
        assert_eq!(json["updated_at"], Value::Null);
    }

    #[test]
    fn config_and_payload_are_embedded_as_json_values() {
        let version = pb::Version {
            datasource_id: "d".into(),
            version: 2,
            config_json: r#"{"rate_per_sec": 5, "template": {"a": [1, 2]}}"#.into(),
            state: pb::VersionState::Published as i32,
            published_at: ts(1_714_564_803, 250_000_000),
            ..Default::default()
        };
        let json = version.to_json();
        assert_eq!(
            json["config"],
            json!({"rate_per_sec": 5, "template": {"a": [1, 2]}})
        );
        assert_eq!(json["state"], "published");
        assert_eq!(json["published_at"], "2024-05-01T12:00:03.250Z");
        assert!(json.get("config_json").is_none());

        let event = pb::Event {
            id: 9,
            r#type: "published".into(),
            payload_json: r#"{"from": 1, "to": 2}"#.into(),
            ..Default::default()
        };
        let json = event.to_json();
        assert_eq!(json["payload"], json!({"from": 1, "to": 2}));
        assert_eq!(json["type"], "published");

        let empty = pb::Event::default().to_json();
        assert_eq!(empty["payload"], Value::Null);
    }

    #[test]
    fn json_that_does_not_parse_stays_a_string() {
        assert_eq!(embedded("{not json"), Value::String("{not json".into()));
        assert_eq!(embedded("  "), Value::Null);
        assert_eq!(embedded("[1]"), json!([1]));
    }

    #[test]
    fn unknown_enum_values_are_shown_by_number() {
        assert_eq!(
            worker_status(pb::WorkerStatus::CrashLoop as i32),
            "crash_loop"
        );
        assert_eq!(worker_status(99), "unknown(99)");
        assert_eq!(datasource_status(0), "unspecified");
        assert_eq!(version_state(pb::VersionState::Draft as i32), "draft");
    }

    #[test]
    fn a_test_report_embeds_its_outputs() {
        let report = pb::RunTestResponse {
            inputs: 2,
            outputs_json: vec![r#"{"id": 1}"#.into()],
            rejected: vec![pb::RejectedRecord {
                sample: 0,
                index: 1,
                code: "schema".into(),
                message: "missing id".into(),
            }],
            logs: vec!["hello".into()],
            ..Default::default()
        };
        let json = report.to_json();
        assert_eq!(json["outputs"], json!([{"id": 1}]));
        assert_eq!(json["rejected"][0]["code"], "schema");
        assert_eq!(json["logs"], json!(["hello"]));
    }

    #[test]
    fn a_kind_embeds_its_config_schema_and_secret_meta_has_no_value() {
        let kind = pb::Kind {
            name: "webhook".into(),
            config_schema_json: r#"{"type": "object"}"#.into(),
            secrets: vec!["webhook_secret".into()],
            push: true,
            ..Default::default()
        };
        assert_eq!(kind.to_json()["config_schema"], json!({"type": "object"}));
        let meta = pb::SecretMeta {
            name: "token".into(),
            key_version: 2,
            fingerprint: "ab12".into(),
            ..Default::default()
        };
        let json = meta.to_json();
        assert_eq!(json["key_version"], 2);
        assert_eq!(
            json.as_object().unwrap().keys().collect::<Vec<_>>(),
            [
                "created_at",
                "fingerprint",
                "key_version",
                "name",
                "rotated_at"
            ]
        );
    }
}
