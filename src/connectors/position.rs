//! Source positions: the format of the position a pull kind saves in
//! `datasource_state.source_cursor` (what a restart resumes from), what each of its fields
//! means, and the check a position set by an operator must pass before it is stored.
//!
//! A kind that keeps a position describes it with a [`Format`] ([`super::Connector::position`]);
//! a kind without one (a push source such as `webhook`) keeps none, and a position cannot be
//! set for it. Pure data and checks: no I/O.

use serde_json::Value;

use super::ConfigError;

/// The longest text field of a position, in bytes.
pub const MAX_TEXT: usize = 4096;

/// What a field of a position holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Text that goes into an HTTP header: visible ASCII and spaces, at most [`MAX_TEXT`]
    /// bytes.
    HeaderText,
    /// A string (at most [`MAX_TEXT`] bytes, no control characters) or a number.
    TextOrNumber,
    /// A non-negative integer.
    Count,
    /// Kafka offsets: an object of `"<topic>:<partition>"` keys (a topic name of letters,
    /// digits, `.`, `_` and `-`, at most 249 bytes; a partition number) to non-negative
    /// integers, at most [`MAX_OFFSETS`] of them.
    Offsets,
    /// Where a Kafka consumer starts: `"earliest"`, `"latest"`, or a time as non-negative
    /// Unix milliseconds.
    StartPoint,
}

/// The most partitions a Kafka position may name.
pub const MAX_OFFSETS: usize = 10_000;

/// Whether `name` is a Kafka topic name: 1 to 249 bytes of letters, digits, `.`, `_`, `-`
/// (and neither `.` nor `..`).
pub fn is_topic_name(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The topic and partition of an offsets key (`orders:3`), if it is one.
pub fn offsets_key(key: &str) -> Option<(&str, i32)> {
    let (topic, digits) = key.rsplit_once(':')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let partition: i32 = digits.parse().ok()?;
    is_topic_name(topic).then_some((topic, partition))
}

impl Shape {
    /// How the shape is named to people.
    pub fn describe(self) -> &'static str {
        match self {
            Shape::HeaderText => "a string of visible ASCII",
            Shape::TextOrNumber => "a string or a number",
            Shape::Count => "a non-negative integer",
            Shape::Offsets => "an object of \"<topic>:<partition>\" keys to non-negative integers",
            Shape::StartPoint => "\"earliest\", \"latest\" or Unix milliseconds",
        }
    }

    fn check(self, value: &Value) -> Result<(), String> {
        let text = |s: &str, allowed: fn(char) -> bool| {
            if s.len() > MAX_TEXT {
                return Err(format!("is {} bytes; at most {MAX_TEXT} allowed", s.len()));
            }
            match s.char_indices().find(|(_, c)| !allowed(*c)) {
                Some((at, c)) => Err(format!(
                    "holds the character U+{:04X} at byte {at}, which it may not",
                    u32::from(c)
                )),
                None => Ok(()),
            }
        };
        match (self, value) {
            (Shape::HeaderText, Value::String(s)) => text(s, |c| c == ' ' || c.is_ascii_graphic()),
            (Shape::TextOrNumber, Value::String(s)) => text(s, |c| !c.is_control()),
            (Shape::TextOrNumber, Value::Number(_)) => Ok(()),
            (Shape::Count, Value::Number(n)) if n.is_u64() => Ok(()),
            (Shape::Offsets, Value::Object(map)) => {
                if map.len() > MAX_OFFSETS {
                    return Err(format!(
                        "names {} partitions; at most {MAX_OFFSETS} allowed",
                        map.len()
                    ));
                }
                for (key, offset) in map {
                    if offsets_key(key).is_none() {
                        return Err(format!(
                            "has the key {key:?}, which is not \"<topic>:<partition>\""
                        ));
                    }
                    if !offset.is_u64() {
                        return Err(format!(
                            "holds {offset} at {key:?}; offsets are non-negative integers"
                        ));
                    }
                }
                Ok(())
            }
            (Shape::StartPoint, Value::String(s)) if s == "earliest" || s == "latest" => Ok(()),
            (Shape::StartPoint, Value::Number(n)) if n.is_u64() => Ok(()),
            (shape, other) => Err(format!(
                "must be {}, got {}",
                shape.describe(),
                kind_of(other)
            )),
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number of another kind",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One field of a position.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// Its key in the position object.
    pub name: &'static str,
    /// What it holds.
    pub shape: Shape,
    /// What it means to the kind: where the value comes from and how the next run uses it.
    pub meaning: &'static str,
}

/// The format of a kind's position: a JSON object of some of these fields (any may be
/// missing: the kind then starts that part from the beginning).
#[derive(Debug, Clone, Copy)]
pub struct Format {
    /// One sentence on what the position is.
    pub summary: &'static str,
    /// Its fields.
    pub fields: &'static [Field],
}

impl Format {
    /// The field named `name`, if the format has one.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Checks a position against the format: an object of known fields, each of its shape.
    /// The error names the field (`etag`), or is about the whole (`""`).
    ///
    /// # Errors
    /// The first field that does not fit.
    pub fn check(&self, position: &Value) -> Result<(), ConfigError> {
        let object = position.as_object().ok_or_else(|| {
            ConfigError::new(
                "",
                format!("must be a JSON object, got {}", kind_of(position)),
            )
        })?;
        for (name, value) in object {
            let field = self.field(name).ok_or_else(|| {
                ConfigError::new(
                    name.clone(),
                    format!(
                        "is not a field of this kind's position (known: {})",
                        self.fields
                            .iter()
                            .map(|f| f.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
            field
                .shape
                .check(value)
                .map_err(|reason| ConfigError::new(name.clone(), reason))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const FORMAT: Format = Format {
        summary: "test",
        fields: &[
            Field {
                name: "etag",
                shape: Shape::HeaderText,
                meaning: "",
            },
            Field {
                name: "cursor",
                shape: Shape::TextOrNumber,
                meaning: "",
            },
            Field {
                name: "seq",
                shape: Shape::Count,
                meaning: "",
            },
        ],
    };

    #[test]
    fn a_position_is_an_object_of_known_fields_each_of_its_shape() {
        assert!(FORMAT.check(&json!({})).is_ok());
        assert!(
            FORMAT
                .check(&json!({"etag": "\"v1\"", "cursor": 42, "seq": 7}))
                .is_ok()
        );
        assert!(FORMAT.check(&json!({"cursor": "2026-01-01"})).is_ok());
        let field = |v: Value| FORMAT.check(&v).unwrap_err().field;
        assert_eq!(field(json!([1])), "");
        assert_eq!(field(json!("x")), "");
        assert_eq!(field(json!({"bogus": 1})), "bogus");
        assert_eq!(field(json!({"etag": 5})), "etag");
        assert_eq!(field(json!({"etag": "a\nb"})), "etag");
        assert_eq!(field(json!({"etag": "é"})), "etag");
        assert_eq!(field(json!({"cursor": {"a": 1}})), "cursor");
        assert_eq!(field(json!({"cursor": "a\u{7}"})), "cursor");
        assert_eq!(field(json!({"cursor": "x".repeat(MAX_TEXT + 1)})), "cursor");
        assert_eq!(field(json!({"seq": -1})), "seq");
        assert_eq!(field(json!({"seq": 1.5})), "seq");
        assert_eq!(field(json!({"seq": "1"})), "seq");
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,20}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("etag".to_owned()),
                        Just("cursor".to_owned()),
                        Just("seq".to_owned()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever the shape, a position is accepted exactly when every field is known and
        /// fits, and a refusal names a field the position has (or the whole).
        #[test]
        fn every_refusal_names_a_field_of_the_position(v in any_json()) {
            let fits = v.as_object().is_some_and(|o| o.iter().all(|(k, x)| {
                FORMAT.field(k).is_some_and(|f| f.shape.check(x).is_ok())
            }));
            match FORMAT.check(&v) {
                Ok(()) => prop_assert!(fits),
                Err(e) => {
                    prop_assert!(!fits);
                    prop_assert!(!e.reason.is_empty());
                    prop_assert!(e.field.is_empty() || v.get(&e.field).is_some(), "{e:?}");
                }
            }
        }
    }
}
