//! Schema migrations: the `V{n}__*.sql` scripts in `migrations/`, embedded in the binary and
//! applied with refinery, and their reverse scripts in `migrations/down/`, applied newest
//! first by [`migrate_down`] (refinery itself only goes forward).

use crate::db::repository::typed;
use tokio_postgres::Client;

use super::Error;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// A reverse script per migration, `(version, name, sql)`; every up migration has one (a
/// unit test checks it).
const DOWN: &[(i32, &str, &str)] = &[
    (
        1,
        "schema",
        include_str!("../../migrations/down/V1__schema.down.sql"),
    ),
    (
        2,
        "records",
        include_str!("../../migrations/down/V2__records.down.sql"),
    ),
    (
        3,
        "dead_letters",
        include_str!("../../migrations/down/V3__dead_letters.down.sql"),
    ),
    (
        4,
        "secrets_generation",
        include_str!("../../migrations/down/V4__secrets_generation.down.sql"),
    ),
    (
        5,
        "event_ids_after_xid",
        include_str!("../../migrations/down/V5__event_ids_after_xid.down.sql"),
    ),
    (
        6,
        "datasource_list_indexes",
        include_str!("../../migrations/down/V6__datasource_list_indexes.down.sql"),
    ),
    (
        7,
        "traced_notifications",
        include_str!("../../migrations/down/V7__traced_notifications.down.sql"),
    ),
    (
        8,
        "leases",
        include_str!("../../migrations/down/V8__leases.down.sql"),
    ),
    (
        9,
        "file_sync",
        include_str!("../../migrations/down/V9__file_sync.down.sql"),
    ),
    (
        10,
        "instance_leases",
        include_str!("../../migrations/down/V10__instance_leases.down.sql"),
    ),
    (
        12,
        "audit_trail",
        include_str!("../../migrations/down/V12__audit_trail.down.sql"),
    ),
    (
        13,
        "replay_ids_and_invalid_traceparents",
        include_str!("../../migrations/down/V13__replay_ids_and_invalid_traceparents.down.sql"),
    ),
    (
        15,
        "day2_operations",
        include_str!("../../migrations/down/V15__day2_operations.down.sql"),
    ),
];

/// The table refinery records applied migrations in.
const HISTORY_TABLE: &str = "refinery_schema_history";

/// Applies every pending migration; returns the versions applied now.
///
/// # Errors
/// [`Error::Migration`] naming the failing migration; the schema is left at the last one that
/// committed (each migration runs in its own transaction).
pub async fn migrate_up(client: &mut Client) -> Result<Vec<i32>, Error> {
    let report = embedded::migrations::runner()
        .set_migration_table_name(HISTORY_TABLE)
        .run_async(client)
        .await
        .map_err(|e| Error::Migration(e.to_string()))?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

/// The highest applied migration, 0 on an empty database.
///
/// # Errors
/// The query failed.
pub async fn current_version(client: &Client) -> Result<i32, Error> {
    // One statement in the common case (readiness asks every second); a database never
    // migrated has no history table.
    match client
        .query_typed_one(
            &format!("SELECT coalesce(max(version), 0) FROM {HISTORY_TABLE}"),
            &[],
        )
        .await
    {
        Ok(row) => Ok(row.get(0)),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// The highest migration this binary knows.
pub fn latest_known() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// Every migration this binary knows, oldest first (numbers may skip one reserved for a
/// change not merged yet).
pub fn known_versions() -> Vec<i32> {
    let mut versions: Vec<i32> = embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .collect();
    versions.sort_unstable();
    versions
}

/// Reverts applied migrations newer than `target`, newest first, each in its own transaction
/// together with its history row; returns the versions reverted.
///
/// # Errors
/// [`Error::Migration`] when a reverse script is missing or fails.
pub async fn migrate_down(client: &mut Client, target: i32) -> Result<Vec<i32>, Error> {
    let mut reverted = Vec::new();
    loop {
        let current = current_version(client).await?;
        if current <= target {
            return Ok(reverted);
        }
        let (_, name, sql) = DOWN.iter().find(|(v, _, _)| *v == current).ok_or_else(|| {
            Error::Migration(format!("migration {current} has no reverse script"))
        })?;
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .map_err(|e| Error::Migration(format!("reverting V{current}__{name}: {e}")))?;
        tx.execute_typed(
            &format!("DELETE FROM {HISTORY_TABLE} WHERE version = $1"),
            &typed::params(&[&current]),
        )
        .await?;
        tx.commit().await?;
        reverted.push(current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_has_a_reverse_script() {
        let runner = embedded::migrations::runner();
        let ups: Vec<(i32, String)> = runner
            .get_migrations()
            .iter()
            .map(|m| (m.version(), m.name().to_owned()))
            .collect();
        assert!(!ups.is_empty());
        for (version, name) in &ups {
            assert!(
                DOWN.iter().any(|(v, n, _)| v == version && n == name),
                "V{version}__{name} has no reverse script in DOWN"
            );
        }
        assert_eq!(
            ups.len(),
            DOWN.len(),
            "reverse scripts without an up migration"
        );
    }
}
