//! The `datasource_state` table: what operators want of a worker (`desired`,
//! `restart_generation`) and what it is doing (status, version, heartbeat, errors). The row is
//! created with its datasource by the schema's trigger.

use chrono::{DateTime, Utc};
use tokio_postgres::{Row, Transaction};
use uuid::Uuid;

use super::GenericClient;
use super::events::{self, NewEvent};
use crate::db::Error;
use crate::domain::{DesiredState, WorkerStatus};

const COLUMNS: &str = "datasource_id, desired, restart_generation, worker_status, running_version, owner_instance, \
     lease_epoch, last_heartbeat_at, last_progress_at, last_event_at, error_code, error_message, restart_count, \
     metrics, updated_at";

/// A datasource's runtime state.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// The datasource.
    pub datasource_id: Uuid,
    /// What operators want.
    pub desired: DesiredState,
    /// Bumped by every restart request.
    pub restart_generation: i64,
    /// What the worker is doing.
    pub worker_status: WorkerStatus,
    /// The version it runs.
    pub running_version: Option<i32>,
    /// The instance that owns the worker.
    pub owner_instance: Option<String>,
    /// The owner's fencing epoch.
    pub lease_epoch: i64,
    /// Last heartbeat.
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// Last time the worker made progress.
    pub last_progress_at: Option<DateTime<Utc>>,
    /// Last event the worker handled.
    pub last_event_at: Option<DateTime<Utc>>,
    /// Machine-readable error code.
    pub error_code: Option<String>,
    /// Human-readable error (never secret values).
    pub error_message: Option<String>,
    /// Restarts since the last healthy run.
    pub restart_count: i32,
    /// The latest metrics snapshot.
    pub metrics: serde_json::Value,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl State {
    fn from_row(row: &Row) -> Result<Self, Error> {
        let parse_err =
            |e: crate::domain::InvalidField| Error::Invalid(format!("stored state: {e}"));
        Ok(Self {
            datasource_id: row.get("datasource_id"),
            desired: row.get::<_, &str>("desired").parse().map_err(parse_err)?,
            restart_generation: row.get("restart_generation"),
            worker_status: row
                .get::<_, &str>("worker_status")
                .parse()
                .map_err(parse_err)?,
            running_version: row.get("running_version"),
            owner_instance: row.get("owner_instance"),
            lease_epoch: row.get("lease_epoch"),
            last_heartbeat_at: row.get("last_heartbeat_at"),
            last_progress_at: row.get("last_progress_at"),
            last_event_at: row.get("last_event_at"),
            error_code: row.get("error_code"),
            error_message: row.get("error_message"),
            restart_count: row.get("restart_count"),
            metrics: row.get("metrics"),
            updated_at: row.get("updated_at"),
        })
    }
}

/// Reads a datasource's runtime state.
///
/// # Errors
/// [`Error::DatasourceNotFound`].
pub async fn get(client: &impl GenericClient, datasource: Uuid) -> Result<State, Error> {
    let row = client
        .query_opt(
            &format!("SELECT {COLUMNS} FROM datasource_state WHERE datasource_id = $1"),
            &[&datasource],
        )
        .await?
        .ok_or(Error::DatasourceNotFound(datasource))?;
    State::from_row(&row)
}

/// Whether a request changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The row changed and an event was written.
    Changed,
    /// It already was so; nothing written.
    Unchanged,
}

/// Sets the desired state; a change writes a `desired_changed` event, which wakes the
/// instance that owns the worker.
///
/// # Errors
/// [`Error::DatasourceNotFound`].
pub async fn set_desired(
    tx: &Transaction<'_>,
    datasource: Uuid,
    desired: DesiredState,
) -> Result<Outcome, Error> {
    let changed = tx
        .query_opt(
            "UPDATE datasource_state SET desired = $2, updated_at = now()
             WHERE datasource_id = $1 AND desired <> $2 RETURNING 1",
            &[&datasource, &desired.as_str()],
        )
        .await?
        .is_some();
    if !changed {
        get(tx, datasource).await?;
        return Ok(Outcome::Unchanged);
    }
    events::append(
        tx,
        &[NewEvent {
            datasource_id: Some(datasource),
            kind: "desired_changed".into(),
            version: None,
            payload: serde_json::json!({ "desired": desired.as_str() }),
        }],
    )
    .await?;
    Ok(Outcome::Changed)
}

/// Asks for a restart of the worker (a new `restart_generation` and a `reload_requested`
/// event); returns the new generation.
///
/// # Errors
/// [`Error::DatasourceNotFound`].
pub async fn request_restart(tx: &Transaction<'_>, datasource: Uuid) -> Result<i64, Error> {
    let generation: i64 = tx
        .query_opt(
            "UPDATE datasource_state SET restart_generation = restart_generation + 1, updated_at = now()
             WHERE datasource_id = $1 RETURNING restart_generation",
            &[&datasource],
        )
        .await?
        .ok_or(Error::DatasourceNotFound(datasource))?
        .get(0);
    events::append(
        tx,
        &[NewEvent {
            datasource_id: Some(datasource),
            kind: "reload_requested".into(),
            version: None,
            payload: serde_json::json!({ "restart_generation": generation }),
        }],
    )
    .await?;
    Ok(generation)
}
