//! One repository per aggregate. Reads take any [`GenericClient`]; writes take a
//! [`Transaction`] opened by [`begin`], which records who writes and the caller's trace
//! context for the schema's triggers (they put both on the events they insert).

pub mod audit;
pub mod datasources;
pub mod dead_letters;
pub mod deliveries;
pub mod events;
pub mod file_sync;
pub mod leases;
pub mod records;
pub mod secrets;
pub mod state;
pub mod typed;
pub mod versions;

use tokio_postgres::{Client, Transaction};

pub use tokio_postgres::GenericClient;

use super::Error;

/// Who is writing, and the W3C trace context of the request that writes.
#[derive(Debug, Clone, Default)]
pub struct WriteContext {
    /// The actor recorded on events and audit rows (a user, a service, `dsreg`).
    pub actor: String,
    /// A W3C `traceparent`; the triggers store it on the events only when it is well formed.
    pub traceparent: Option<String>,
}

impl WriteContext {
    /// A context for `actor` with no trace.
    pub fn actor(actor: impl Into<String>) -> Self {
        Self {
            actor: actor.into(),
            traceparent: None,
        }
    }
}

/// Opens a transaction whose triggers see `ctx` (`dsreg.actor`, `dsreg.traceparent`).
///
/// # Errors
/// The database is unreachable.
pub async fn begin<'a>(
    client: &'a mut Client,
    ctx: &WriteContext,
) -> Result<Transaction<'a>, Error> {
    let tx = client.transaction().await?;
    tx.execute_typed(
        // `dsreg.via` tells the audit trigger that dsreg audits this write itself.
        "SELECT set_config('dsreg.actor', $1, true), set_config('dsreg.traceparent', $2, true),
                set_config('dsreg.via', 'dsreg', true)",
        &typed::params(&[&ctx.actor, &ctx.traceparent.as_deref().unwrap_or_default()]),
    )
    .await?;
    Ok(tx)
}

/// Changes who the rest of `tx` writes as (events, `created_by`, `published_by`).
///
/// # Errors
/// The database is unreachable.
pub async fn set_actor(tx: &Transaction<'_>, actor: &str) -> Result<(), Error> {
    tx.execute_typed(
        "SELECT set_config('dsreg.actor', $1, true)",
        &typed::params(&[&actor]),
    )
    .await?;
    Ok(())
}
