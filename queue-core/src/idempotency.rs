//! Idempotency keys: a retried submission returns what the first one made.
//!
//! "The same body" means the same JSON value: key order and whitespace do
//! not matter. The body is written out canonically (object keys sorted,
//! no whitespace) and hashed with SHA-256; only the hash is stored.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Longest accepted `Idempotency-Key`.
pub const MAX_KEY_LEN: usize = 255;

/// A checked key with the fingerprint of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    pub fingerprint: [u8; 32],
}

impl IdempotencyKey {
    /// `route` is part of the fingerprint, so one key cannot match across
    /// endpoints. `None` if the key is empty, too long or not visible ASCII.
    pub fn new(key: &str, route: &str, body: &Value) -> Option<IdempotencyKey> {
        let ok = !key.is_empty()
            && key.len() <= MAX_KEY_LEN
            && key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        ok.then(|| IdempotencyKey {
            key: key.to_owned(),
            fingerprint: fingerprint(route, body),
        })
    }
}

pub fn fingerprint(route: &str, body: &Value) -> [u8; 32] {
    let mut canonical = Vec::with_capacity(256);
    canonical.extend_from_slice(route.as_bytes());
    canonical.push(b'\n');
    write_canonical(body, &mut canonical);
    Sha256::digest(&canonical).into()
}

/// Compact JSON with object keys sorted at every level, whatever map type
/// serde_json was built with.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                write_canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a: Value =
            serde_json::from_str(r#"{"model":"m","params":{"a":1,"b":[1,2]},"prompt":"x"}"#)
                .unwrap();
        let b: Value = serde_json::from_str(
            "{ \"prompt\" : \"x\",\n \"params\": {\"b\": [1, 2], \"a\": 1}, \"model\": \"m\" }",
        )
        .unwrap();
        assert_eq!(fingerprint("tasks", &a), fingerprint("tasks", &b));
    }

    #[test]
    fn different_values_or_routes_differ() {
        let a = serde_json::json!({"model": "m", "prompt": "x"});
        let b = serde_json::json!({"model": "m", "prompt": "y"});
        let c = serde_json::json!({"model": "m", "prompt": "x", "priority": "high"});
        assert_ne!(fingerprint("tasks", &a), fingerprint("tasks", &b));
        assert_ne!(fingerprint("tasks", &a), fingerprint("tasks", &c));
        assert_ne!(fingerprint("tasks", &a), fingerprint("batches", &a));
        // Array order is part of the value.
        let d = serde_json::json!([1, 2]);
        let e = serde_json::json!([2, 1]);
        assert_ne!(fingerprint("x", &d), fingerprint("x", &e));
    }

    #[test]
    fn keys_are_checked() {
        let v = serde_json::json!({});
        assert!(IdempotencyKey::new("order-42", "tasks", &v).is_some());
        assert!(IdempotencyKey::new("", "tasks", &v).is_none());
        assert!(IdempotencyKey::new(&"k".repeat(256), "tasks", &v).is_none());
        assert!(IdempotencyKey::new("tab\there", "tasks", &v).is_none());
    }
}
