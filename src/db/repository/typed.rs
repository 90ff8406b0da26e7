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
