//! Source positions on the `Lifecycle` service (`GetSourcePosition`, `ResetSourcePosition`):
//! a datasource's stored position (`datasource_state.source_cursor`), explained with its
//! kind's format ([`crate::connectors::position`]), and set or cleared while its worker is
//! stopped, as one audited write with its event. The `Lifecycle` handlers call these.

use serde_json::{Value, json};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::call::{self, Call};
use super::datasources::{Check, live, on_datasource, visible};
use super::status::{self, invalid};
use super::{Ctx, convert, pb};
use crate::connectors::position::Format;
use crate::db::repository::datasources::Datasource;
use crate::db::repository::state::{self, Position};
use crate::domain::{DatasourceStatus, DesiredState, WorkerStatus};

/// The longest `position_json` taken.
pub const MAX_POSITION: usize = 16 * 1024;

/// `GetSourcePosition`.
///
/// # Errors
/// INVALID_ARGUMENT for a malformed id, NOT_FOUND, UNAVAILABLE.
pub async fn get(
    ctx: &Ctx,
    request: Request<pb::GetSourcePositionRequest>,
) -> Result<Response<pb::SourcePosition>, Status> {
    let call = Call::of(&request, "GetSourcePosition")?;
    let id = convert::id("datasource_id", &request.get_ref().datasource_id)?;
    let client = call::client(&ctx.pool).await?;
    let ds = visible(&**client, &call, id, Check::Read(&ctx.auditor)).await?;
    let position = state::position(&**client, id, false)
        .await
        .map_err(status::db)?;
    Ok(Response::new(answer(ctx, &ds, &position)))
}

/// `ResetSourcePosition`.
///
/// # Errors
/// NOT_FOUND; INVALID_ARGUMENT for a request or position that does not fit (naming the
/// field); FAILED_PRECONDITION for a kind that keeps no position, an archived datasource, or a
/// worker not stopped (naming its state); UNAVAILABLE.
pub async fn reset(
    ctx: &Ctx,
    request: Request<pb::ResetSourcePositionRequest>,
) -> Result<Response<pb::SourcePosition>, Status> {
    let call = Call::of(&request, "ResetSourcePosition")?;
    let r = request.into_inner();
    let id = convert::id("datasource_id", &r.datasource_id)?;
    let answered = on_datasource(&ctx.pool, &call, id, async |tx, ds, audit| {
        // The tenant is checked first (another tenant's datasource is NOT_FOUND whatever the
        // rest of the request), then the request, then the kind and the worker.
        let to = requested(&r)?;
        live(&ds)?;
        let format = ctx
            .catalog
            .get(&ds.kind)
            .and_then(|c| c.position())
            .ok_or_else(|| Status::failed_precondition(no_position(&ds.kind)))?;
        if let Some(to) = &to {
            check(format, "position_json", to)?;
        }
        let now = state::position(tx, id, true).await.map_err(status::db)?;
        stopped(&ds, &now)?;
        state::reset_position(tx, id, now.source_cursor.as_ref(), to.as_ref())
            .await
            .map_err(status::db)?;
        audit.diff = Some(json!({
            "source_position": { "from": now.source_cursor, "to": to },
        }));
        Ok(answer(
            ctx,
            &ds,
            &Position {
                source_cursor: to,
                ..now
            },
        ))
    })
    .await?;
    Ok(Response::new(answered))
}

/// Checks `position`, sent in request field `field`, against the kind's `format`.
///
/// # Errors
/// INVALID_ARGUMENT naming the field within the position (`position_json.etag`).
pub fn check(format: &Format, field: &str, position: &Value) -> Result<(), Status> {
    format.check(position).map_err(|e| {
        let field = if e.field.is_empty() {
            field.to_owned()
        } else {
            format!("{field}.{}", e.field)
        };
        invalid(&field, e.reason)
    })
}

/// The position a reset request asks for: `Some` to set, `None` to clear.
fn requested(r: &pb::ResetSourcePositionRequest) -> Result<Option<Value>, Status> {
    match (r.clear, r.position_json.is_empty()) {
        (true, true) => Ok(None),
        (true, false) => Err(invalid("position_json", "must be empty when clear is set")),
        (false, true) => Err(invalid(
            "position_json",
            "give the new position, or set clear to read from the start",
        )),
        (false, false) => {
            convert::json_document("position_json", &r.position_json, MAX_POSITION).map(Some)
        }
    }
}

/// Refuses unless the worker is stopped and nothing wants it running: a running worker owns
/// its position and would overwrite it, and a stopped one about to start would race the
/// reset.
fn stopped(ds: &Datasource, now: &Position) -> Result<(), Status> {
    let wanted = ds.status == DatasourceStatus::Active
        && now.desired == DesiredState::Running
        && ds.current_version.is_some();
    let idle = matches!(
        now.worker_status,
        WorkerStatus::Stopped | WorkerStatus::Init
    );
    if idle && !wanted {
        return Ok(());
    }
    let state = now.worker_status.as_str();
    let message = if idle {
        format!(
            "the worker is {state} but wanted running; stop it first (dsreg worker stop {})",
            ds.id
        )
    } else {
        format!(
            "the worker is {state}; a position is reset only while it is stopped (dsreg worker \
             stop {})",
            ds.id
        )
    };
    Err(Status::with_error_details(
        Code::FailedPrecondition,
        message,
        ErrorDetails::with_precondition_failure_violation(
            "WORKER_STATE",
            state,
            "stop the worker first",
        ),
    ))
}

/// What a kind without a position is told.
fn no_position(kind: &str) -> String {
    format!(
        "connector kind {kind} keeps no source position: records are pushed to it, there is \
         nothing to resume from"
    )
}

/// A datasource's position as the API answers it.
fn answer(ctx: &Ctx, ds: &Datasource, position: &Position) -> pb::SourcePosition {
    let format = ctx.catalog.get(&ds.kind).and_then(|c| c.position());
    let stored = position.source_cursor.as_ref();
    let summary = match format {
        Some(f) => f.summary.to_owned(),
        None => no_position(&ds.kind),
    };
    pb::SourcePosition {
        datasource_id: ds.id.to_string(),
        kind: ds.kind.clone(),
        supported: format.is_some(),
        summary,
        position_json: stored.map(Value::to_string).unwrap_or_default(),
        fields: format
            .map(|f| f.fields)
            .unwrap_or_default()
            .iter()
            .map(|f| pb::SourcePositionField {
                name: f.name.to_owned(),
                shape: f.shape.describe().to_owned(),
                meaning: f.meaning.to_owned(),
                value_json: stored
                    .and_then(|p| p.get(f.name))
                    .map(Value::to_string)
                    .unwrap_or_default(),
            })
            .collect(),
        worker_status: convert::worker_status(position.worker_status) as i32,
    }
}
