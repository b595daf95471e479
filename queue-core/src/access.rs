//! API keys, scopes, tenants and limits: what a request may do, and how
//! much of it. The API checks them; the store keeps key digests, limits and
//! the audit log; Redis counts the rate limits.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// What a key may do. `admin` is the operator's scope: the admin routes,
/// and every tenant's tasks on the read and cancel routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Submit,
    Read,
    Cancel,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Submit, Scope::Read, Scope::Cancel, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Submit => "submit",
            Scope::Read => "read",
            Scope::Cancel => "cancel",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Every key starts with this, so a leaked one is easy to recognise (and
/// for secret scanners to find).
pub const KEY_PREFIX: &str = "iq_";
/// Length of a key's public id (lowercase letters and digits).
const ID_LEN: usize = 12;
/// Random bytes in a key's secret part: 256 bits, as hex.
const SECRET_BYTES: usize = 32;

/// A key as made: the whole key is shown once; only its digest is kept.
pub struct NewKey {
    pub id: String,
    pub key: String,
    pub digest: [u8; 32],
}

impl std::fmt::Debug for NewKey {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NewKey({})", self.id)
    }
}

/// Makes a key `iq_<id>_<64 hex digits>` from the operating system's
/// random source.
pub fn generate_key() -> NewKey {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut random = [0u8; ID_LEN + SECRET_BYTES];
    getrandom::fill(&mut random).expect("the operating system's random source failed");
    // 252 = 7 × 36: rejecting bytes above it keeps the letters unbiased.
    let mut id = String::with_capacity(ID_LEN);
    let mut extra = [0u8; 1];
    for &b in &random[..ID_LEN] {
        let mut b = b;
        while b >= 252 {
            getrandom::fill(&mut extra).expect("the operating system's random source failed");
            b = extra[0];
        }
        id.push(ALPHABET[(b % 36) as usize] as char);
    }
    let secret: String = random[ID_LEN..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let key = format!("{KEY_PREFIX}{id}_{secret}");
    let digest = key_digest(&key);
    NewKey { id, key, digest }
}

/// The public id of something shaped like a key, or `None`.
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_at_checked(ID_LEN)?;
    let secret = secret.strip_prefix('_')?;
    let well_formed = id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && secret.len() == SECRET_BYTES * 2
        && secret.bytes().all(|b| b.is_ascii_hexdigit());
    well_formed.then_some(id)
}

/// What the store keeps of a key.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Compares without an early exit, so timing does not reveal how much of
/// a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Tenant names: 1 to 64 of lowercase letters, digits, `-`, `_` and `.`,
/// starting with a letter or digit (they appear in metrics and Redis keys).
pub fn valid_tenant(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// A tenant's limits. `None` takes the configured default; `Some(0)` is
/// no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Requests per second, for each of the tenant's keys.
    pub requests_per_second: Option<u32>,
    /// LLM tokens per minute (prompt estimate + `max_tokens`, corrected by
    /// the usage the backend reports).
    pub tokens_per_minute: Option<u64>,
    /// Unfinished (queued, scheduled, running) tasks at once.
    pub max_queued: Option<u64>,
}

impl Limits {
    /// These limits with every unset one taken from `defaults`.
    pub fn or(self, defaults: Limits) -> Limits {
        Limits {
            requests_per_second: self.requests_per_second.or(defaults.requests_per_second),
            tokens_per_minute: self.tokens_per_minute.or(defaults.tokens_per_minute),
            max_queued: self.max_queued.or(defaults.max_queued),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_recognised_by_shape_and_differ() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a.key, b.key);
        assert!(a.key.starts_with("iq_"));
        assert_eq!(a.key.len(), 3 + 12 + 1 + 64);
        assert_eq!(key_id(&a.key), Some(a.id.as_str()));
        assert_eq!(a.digest, key_digest(&a.key));
        // A key cut short, or with a character changed to one outside its
        // alphabet, is not a key.
        assert_eq!(key_id(&a.key[..a.key.len() - 1]), None);
        assert_eq!(key_id(&a.key.replace("iq_", "iq-")), None);
        assert_eq!(key_id(&format!("{}Z", &a.key[..a.key.len() - 1])), None);
        assert_eq!(key_id("Bearer"), None);
    }

    #[test]
    fn tenant_names() {
        for ok in ["default", "team-a", "a", "x.y_z", "0team"] {
            assert!(valid_tenant(ok), "{ok}");
        }
        for bad in ["", "Team", "-a", "a b", "a:b", &"a".repeat(65)] {
            assert!(!valid_tenant(bad), "{bad}");
        }
    }

    #[test]
    fn unset_limits_take_the_defaults() {
        let set = Limits {
            requests_per_second: Some(0),
            tokens_per_minute: None,
            max_queued: Some(5),
        };
        let defaults = Limits {
            requests_per_second: Some(10),
            tokens_per_minute: Some(1000),
            max_queued: Some(100),
        };
        assert_eq!(
            set.or(defaults),
            Limits {
                requests_per_second: Some(0),
                tokens_per_minute: Some(1000),
                max_queued: Some(5),
            }
        );
    }
}
