//! Lifecycle operations (start, stop, restart, reload, backfill): the one path every caller
//! takes — the gRPC `Lifecycle` handlers inside their audited transaction ([`write`]), other
//! callers through [`apply`], which opens one. Each is an idempotent write to the tables plus
//! an event; whichever instance owns the worker applies it through the normal path. They
//! never touch a worker directly.

use deadpool_postgres::Pool;
use tokio_postgres::Transaction;
use uuid::Uuid;

use crate::db::Error;
use crate::db::repository::state::{self, Outcome};
use crate::db::repository::{self as repo, WriteContext};
use crate::domain::DesiredState;

/// A lifecycle operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Want the worker running (a no-op when it already is wanted).
    Start(Uuid),
    /// Want the worker stopped (a no-op when it already is).
    Stop(Uuid),
    /// Restart the worker on its current version.
    Restart(Uuid),
    /// Have the owner re-read the datasource's tables (`None`: every datasource) and apply
    /// any difference; nothing restarts that has not changed.
    Reload(Option<Uuid>),
    /// Restart the worker reading its source from a position (`None`: from the start).
    Backfill(Uuid, Option<serde_json::Value>),
}

/// What an operation wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Whether anything changed (a restart, a reload and a backfill always write).
    pub outcome: Outcome,
    /// For a restart or a backfill: the last event the request wrote, after which the
    /// worker's answer to it is recorded (see [`state::outcome_since`]).
    pub mark: Option<i64>,
}

impl Applied {
    fn changed(mark: Option<i64>) -> Self {
        Self {
            outcome: Outcome::Changed,
            mark,
        }
    }
}

/// Writes `op` in `tx` (the caller commits).
///
/// # Errors
/// [`Error::DatasourceNotFound`], or the database is unavailable.
pub async fn write(tx: &Transaction<'_>, op: &Op) -> Result<Applied, Error> {
    match op {
        Op::Start(id) => Ok(Applied {
            outcome: state::set_desired(tx, *id, DesiredState::Running).await?,
            mark: None,
        }),
        Op::Stop(id) => Ok(Applied {
            outcome: state::set_desired(tx, *id, DesiredState::Stopped).await?,
            mark: None,
        }),
        Op::Restart(id) => {
            state::request_restart(tx, *id).await?;
            Ok(Applied::changed(Some(state::request_mark(tx, *id).await?)))
        }
        Op::Reload(id) => {
            state::request_reload(tx, *id).await?;
            Ok(Applied::changed(None))
        }
        Op::Backfill(id, from) => {
            state::request_backfill(tx, *id, from.as_ref()).await?;
            Ok(Applied::changed(Some(state::request_mark(tx, *id).await?)))
        }
    }
}

/// Writes `op` in a transaction of its own, as `ctx` says.
///
/// # Errors
/// As [`write`].
pub async fn apply(pool: &Pool, ctx: &WriteContext, op: &Op) -> Result<Applied, Error> {
    let mut client = pool.get().await?;
    let tx = repo::begin(&mut client, ctx).await?;
    let applied = write(&tx, op).await?;
    tx.commit().await?;
    Ok(applied)
}
