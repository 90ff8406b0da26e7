//! Statements sent with their parameters' types, in one round trip.
//!
//! `client.query(sql, params)` with a string first prepares the statement (a round trip to
//! learn its parameter types) and then runs it (a second). [`params`] names each parameter's
//! type from its Rust type ([`Param`]), so that `query_typed` can send parse, bind and execute
//! together: half the round trips, for statements on the hot paths (every mutating
//! call's transaction, the reconcile pass, the outbox read, the state writer, the sink).
//!
//! A parameter's type must be what the statement expects, or castable to it by assignment
//! (text for a `text` or `varchar` column, `int4` for an `integer`); statements cast arrays
//! explicitly (`$1::uuid[]`).
//!
//! The statements run most often (the desired-state read of every reload, the state writer's
//! batches) can also be prepared once per pooled connection and reused by name ([`Pooled`]),
//! which spares the server parsing and planning them each time; only where the pool's
//! connections are sessions of their own: behind a transaction-mode pooler a name prepared on
//! one server session is missing, or means another statement, on the next.

use std::future::Future;

use chrono::{DateTime, Utc};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, Row};
use uuid::Uuid;

use super::GenericClient;

/// A Rust type sent as one Postgres type.
pub trait Typed {
    /// The Postgres type of a value.
    const TYPE: Type;
}

/// A type whose values can be array elements.
pub trait Element: Typed {
    /// The Postgres type of an array of such values.
    const ARRAY: Type;
}

macro_rules! typed {
    ($($rust:ty => $pg:ident, $array:ident;)*) => {
        $(
            impl Typed for $rust {
                const TYPE: Type = Type::$pg;
            }
            impl Element for $rust {
                const ARRAY: Type = Type::$array;
            }
        )*
    };
}

typed! {
    bool => BOOL, BOOL_ARRAY;
    i32 => INT4, INT4_ARRAY;
    i64 => INT8, INT8_ARRAY;
    str => TEXT, TEXT_ARRAY;
    String => TEXT, TEXT_ARRAY;
    Uuid => UUID, UUID_ARRAY;
    serde_json::Value => JSONB, JSONB_ARRAY;
    DateTime<Utc> => TIMESTAMPTZ, TIMESTAMPTZ_ARRAY;
    f64 => FLOAT8, FLOAT8_ARRAY;
}

// Bytes are `bytea`, not an array of anything.
impl Typed for [u8] {
    const TYPE: Type = Type::BYTEA;
}

impl Element for [u8] {
    const ARRAY: Type = Type::BYTEA_ARRAY;
}

impl Typed for Vec<u8> {
    const TYPE: Type = Type::BYTEA;
}

impl Element for Vec<u8> {
    const ARRAY: Type = Type::BYTEA_ARRAY;
}

impl<T: Typed + ?Sized> Typed for &T {
    const TYPE: Type = T::TYPE;
}

impl<T: Element + ?Sized> Element for &T {
    const ARRAY: Type = T::ARRAY;
}

impl<T: Typed> Typed for Option<T> {
    const TYPE: Type = T::TYPE;
}

impl<T: Element> Element for Option<T> {
    const ARRAY: Type = T::ARRAY;
}

impl<T: Element> Typed for Vec<T> {
    const TYPE: Type = T::ARRAY;
}

impl<T: Element> Typed for [T] {
    const TYPE: Type = T::ARRAY;
}

/// A statement parameter and the type it is sent as.
pub trait Param: ToSql + Sync {
    /// The Postgres type this value is sent as.
    fn pg_type(&self) -> Type;
}

impl<T: Typed + ToSql + Sync> Param for T {
    fn pg_type(&self) -> Type {
        T::TYPE
    }
}

/// The parameters of a `query_typed` call (or `execute_typed`, `query_typed_opt`, ...):
/// `client.query_typed_opt(sql, &typed::params(&[&id, &version]))`.
pub fn params<'a>(params: &'a [&'a dyn Param]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params
        .iter()
        .map(|p| (*p as &(dyn ToSql + Sync), p.pg_type()))
        .collect()
}

/// Runs a statement with typed parameters and returns its rows.
pub trait Run: Sync {
    /// The rows of `sql` with `params`.
    fn rows(
        &self,
        sql: &str,
        params: &[&dyn Param],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send;
}

/// Any client, transaction included: the statement goes out unnamed.
impl<C: GenericClient + Sync> Run for C {
    async fn rows(&self, sql: &str, values: &[&dyn Param]) -> Result<Vec<Row>, Error> {
        self.query_typed(sql, &params(values)).await
    }
}

/// A pooled connection, outside any transaction: with `prepared`, a statement is prepared on
/// its first use on the connection and run by name from then on; otherwise it goes unnamed.
pub struct Pooled<'a> {
    client: &'a deadpool_postgres::ClientWrapper,
    prepared: bool,
}

impl<'a> Pooled<'a> {
    /// `client`, its statements prepared when `prepared` (the pool's connections are sessions).
    pub fn new(client: &'a deadpool_postgres::ClientWrapper, prepared: bool) -> Self {
        Self { client, prepared }
    }
}

impl Run for Pooled<'_> {
    async fn rows(&self, sql: &str, values: &[&dyn Param]) -> Result<Vec<Row>, Error> {
        if self.prepared {
            let types: Vec<Type> = values.iter().map(|p| p.pg_type()).collect();
            let run = async {
                let statement = self.client.prepare_typed_cached(sql, &types).await?;
                let bound: Vec<&(dyn ToSql + Sync)> =
                    values.iter().map(|p| *p as &(dyn ToSql + Sync)).collect();
                self.client.query(&statement, &bound).await
            };
            match run.await {
                Err(e) if lost_by_name(&e) => {
                    // The session does not hold the statement as prepared (a pooler between,
                    // or the schema changed under it): forgotten here, and run unnamed.
                    tracing::debug!(error = %e, "a prepared statement could not run; sent unnamed");
                    self.client.statement_cache.remove(sql, &types);
                }
                done => return done,
            }
        }
        self.client.query_typed(sql, &params(values)).await
    }
}

/// Whether `e` says a statement prepared by name is not (or no longer) what the session holds:
/// no such statement, one of that name already there, or a plan whose result changed.
fn lost_by_name(e: &Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|code| {
        [
            SqlState::INVALID_SQL_STATEMENT_NAME,
            SqlState::DUPLICATE_PSTATEMENT,
            SqlState::FEATURE_NOT_SUPPORTED,
            SqlState::PROTOCOL_VIOLATION,
        ]
        .contains(code)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Behind a transaction-mode pooler the statements of one client land on different server
    /// sessions, so a statement prepared by name in one is missing in the next: every
    /// statement goes out unnamed (`*_typed`, `simple_query`, `batch_execute`) but through
    /// [`Pooled`], which prepares only when told the connections are sessions. This finds the
    /// calls elsewhere that would prepare one by name: `query`, `query_one`, `query_opt` or
    /// `execute` given SQL text, and `prepare` / `prepare_cached`.
    #[test]
    fn no_statement_is_prepared_by_name() {
        fn visit(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    visit(&path, found);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") || path.ends_with(file!()) {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                // Code under test may prepare freely.
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                let flat: String = code.split_whitespace().collect::<Vec<_>>().join(" ");
                for call in [".query(", ".query_one(", ".query_opt(", ".execute("] {
                    for (at, _) in flat.match_indices(call) {
                        let rest = flat[at + call.len()..].trim_start();
                        if rest.starts_with('"') || rest.starts_with("&format!") {
                            found.push(format!(
                                "{}: {}",
                                path.display(),
                                &flat[at..(at + 80).min(flat.len())]
                            ));
                        }
                    }
                }
                for call in [".prepare(", ".prepare_cached(", ".prepare_typed("] {
                    if flat.contains(call) {
                        found.push(format!("{}: {call}", path.display()));
                    }
                }
            }
        }
        let mut found = Vec::new();
        visit(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut found,
        );
        assert!(found.is_empty(), "statements prepared by name: {found:#?}");
    }

    #[test]
    fn parameters_are_sent_as_the_types_of_their_rust_values() {
        let id = Uuid::nil();
        let ids = vec![id];
        let slice: &[Uuid] = &ids;
        let texts: Vec<Option<&str>> = vec![Some("a"), None];
        let missing: Option<String> = None;
        let json = serde_json::json!({});
        let payloads = vec![&json];
        let at: Option<DateTime<Utc>> = None;
        let bytes = vec![1u8, 2];
        let byte_rows: Vec<&[u8]> = vec![&bytes];
        let types: Vec<Type> = params(&[
            &bytes,
            &byte_rows,
            &id,
            &ids,
            &slice,
            &texts,
            &missing,
            &"x",
            &3i32,
            &Some(4i64),
            &true,
            &json,
            &payloads,
            &at,
        ])
        .into_iter()
        .map(|(_, t)| t)
        .collect();
        assert_eq!(
            types,
            [
                Type::BYTEA,
                Type::BYTEA_ARRAY,
                Type::UUID,
                Type::UUID_ARRAY,
                Type::UUID_ARRAY,
                Type::TEXT_ARRAY,
                Type::TEXT,
                Type::TEXT,
                Type::INT4,
                Type::INT8,
                Type::BOOL,
                Type::JSONB,
                Type::JSONB_ARRAY,
                Type::TIMESTAMPTZ,
            ]
        );
    }
}
