//! What tells an edit from a reformat: a hash of a definition's content, and config
//! equality with numbers compared by value.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// SHA-256 of `value` as JSON with every object's keys sorted, in hex.
pub fn hash(value: &Value) -> String {
    fn write(out: &mut Vec<u8>, value: &Value) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push(b'{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend(Value::String(k.clone()).to_string().as_bytes());
                    out.push(b':');
                    write(out, &map[k]);
                }
                out.push(b'}');
            }
            Value::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(out, item);
                }
                out.push(b']');
            }
            scalar => out.extend(scalar.to_string().as_bytes()),
        }
    }
    let mut bytes = Vec::new();
    write(&mut bytes, value);
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether two configs say the same: equal, with numbers compared by value (the database
/// may give `1000` back for a file's `1e3`).
pub fn same_config(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || matches!((x.as_f64(), y.as_f64()), (Some(x), Some(y)) if x == y)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_config(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_config(v, w)))
        }
        _ => a == b,
    }
}
