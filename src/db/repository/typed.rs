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

use chrono::{DateTime, Utc};
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Behind a transaction-mode pooler the statements of one client land on different server
    /// sessions, so a statement prepared by name in one is missing in the next: every
    /// statement goes out unnamed (`*_typed`, `simple_query`, `batch_execute`). This finds the
    /// calls that would prepare one by name: `query`, `query_one`, `query_opt` or `execute`
    /// given SQL text, and `prepare` / `prepare_cached`.
    #[test]
    fn no_statement_is_prepared_by_name() {
        fn visit(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    visit(&path, found);
                    continue;
                }
                if path.extension().is_none_or(|e| e != "rs") {
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
