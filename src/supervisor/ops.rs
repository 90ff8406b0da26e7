//! Lifecycle operations (start, stop, restart, reload, reload all). Each is an idempotent
//! write to the tables plus an event; whichever instance owns the worker applies it through
//! the normal path. They never touch a worker directly.

use deadpool_postgres::Pool;
use uuid::Uuid;

use crate::db::Error;
use crate::db::repository::state::{self, Outcome};
use crate::db::repository::{self as repo, WriteContext};
use crate::domain::DesiredState;

/// Wants the worker running (a no-op when it already is wanted).
///
/// # Errors
/// [`Error::DatasourceNotFound`], or the database is unavailable.
pub async fn start(pool: &Pool, ctx: &WriteContext, id: Uuid) -> Result<Outcome, Error> {
    set_desired(pool, ctx, id, DesiredState::Running).await
}

/// Wants the worker stopped (a no-op when it already is).
///
/// # Errors
/// As [`start`].
pub async fn stop(pool: &Pool, ctx: &WriteContext, id: Uuid) -> Result<Outcome, Error> {
    set_desired(pool, ctx, id, DesiredState::Stopped).await
}

async fn set_desired(
    pool: &Pool,
    ctx: &WriteContext,
    id: Uuid,
    desired: DesiredState,
) -> Result<Outcome, Error> {
    let mut client = pool.get().await?;
    let tx = repo::begin(&mut client, ctx).await?;
    let outcome = state::set_desired(&tx, id, desired).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Restarts the worker with its current version; returns the new restart generation.
///
/// # Errors
/// As [`start`].
pub async fn restart(pool: &Pool, ctx: &WriteContext, id: Uuid) -> Result<i64, Error> {
    let mut client = pool.get().await?;
    let tx = repo::begin(&mut client, ctx).await?;
    let generation = state::request_restart(&tx, id).await?;
    tx.commit().await?;
    Ok(generation)
}

/// Has the owner re-read the datasource's tables (`None`: every datasource) and apply any
/// difference; nothing restarts that has not changed.
///
/// # Errors
/// As [`start`].
pub async fn reload(pool: &Pool, ctx: &WriteContext, id: Option<Uuid>) -> Result<(), Error> {
    let mut client = pool.get().await?;
    let tx = repo::begin(&mut client, ctx).await?;
    state::request_reload(&tx, id).await?;
    tx.commit().await?;
    Ok(())
}
