//! Small helpers: randomness, timestamps and the `Status` objects the real
//! API server returns.

use serde_json::{json, Value};
use std::cell::Cell;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    // RandomState is seeded from the OS per process and per thread; mixing in
    // the clock keeps two servers in one test process from sharing names.
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() | 1
}

/// splitmix64: good enough for names and tokens that only need to be unique
/// and unguessable across tests, not cryptographically strong.
pub(crate) fn rand_u64() -> u64 {
    RNG.with(|s| {
        let mut z = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(z);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// The alphabet of apimachinery's `utilrand.String`: no vowels (no words),
/// no confusable characters.
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

pub(crate) fn generate_name_suffix() -> String {
    (0..5)
        .map(|_| NAME_ALPHABET[(rand_u64() % NAME_ALPHABET.len() as u64) as usize] as char)
        .collect()
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut s = String::with_capacity(bytes * 2);
    while s.len() < bytes * 2 {
        s.push_str(&format!("{:016x}", rand_u64()));
    }
    s.truncate(bytes * 2);
    s
}

pub(crate) fn new_uid() -> String {
    let h = random_hex(16);
    // Version 4 / variant 1 nibbles so it parses as a real UUID.
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

pub(crate) use daemon_common::time::rfc3339;

pub(crate) fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Loose RFC 3339 check for `format: date-time` (what kube-openapi's strfmt
/// accepts in practice: date, `T` or space, time, optional fraction, zone).
pub(crate) fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if !(digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't' || b[10] == b' ')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19))
    {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z'] | [b'z'] => true,
        [s, h1, h2, b':', m1, m2] if (*s == b'+' || *s == b'-') => {
            [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit())
        }
        _ => false,
    }
}

/// An API error: HTTP code plus the `Status` object the real server sends.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub status: Value,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.code,
            self.status["reason"].as_str().unwrap_or(""),
            self.status["message"].as_str().unwrap_or("")
        )
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        Self::with_details(code, reason, message, Value::Null)
    }

    pub(crate) fn with_details(
        code: u16,
        reason: &str,
        message: impl Into<String>,
        details: Value,
    ) -> Self {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message.into(),
            "reason": reason,
            "code": code,
        });
        if !details.is_null() {
            status["details"] = details;
        }
        ApiError { code, status }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn not_found(group: &str, plural: &str, name: &str) -> Self {
        Self::with_details(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(plural, group)),
            json!({"name": name, "group": group, "kind": plural}),
        )
    }

    pub(crate) fn plain_not_found() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub(crate) fn already_exists(group: &str, plural: &str, name: &str) -> Self {
        Self::with_details(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(plural, group)),
            json!({"name": name, "group": group, "kind": plural}),
        )
    }

    /// What the real server answers when every name it generated for a
    /// `generateName` create was taken (apimachinery's
    /// `NewGenerateNameConflict`, retry after 1 s).
    pub(crate) fn generate_name_conflict(group: &str, plural: &str, name: &str) -> Self {
        Self::with_details(
            409,
            "AlreadyExists",
            format!(
                "{} \"{name}\" already exists, the server was not able to generate a unique name for the object",
                qualified(plural, group)
            ),
            json!({"name": name, "group": group, "kind": plural, "retryAfterSeconds": 1}),
        )
    }

    pub(crate) fn conflict(group: &str, plural: &str, name: &str, why: &str) -> Self {
        Self::with_details(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                qualified(plural, group)
            ),
            json!({"name": name, "group": group, "kind": plural}),
        )
    }

    pub(crate) fn modified(group: &str, plural: &str, name: &str) -> Self {
        Self::conflict(
            group,
            plural,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub(crate) fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    /// Status for an injected failure: the reason the real server pairs with
    /// that code, so clients take the same branch as for a real one.
    pub(crate) fn injected(code: u16) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            409 => "Conflict",
            410 => "Expired",
            422 => "Invalid",
            429 => "TooManyRequests",
            500 => "InternalError",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "Unknown",
        };
        let message = match code {
            409 => "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again".to_string(),
            429 => "Too many requests, please try again later.".to_string(),
            _ => format!("injected failure ({code} {reason})"),
        };
        Self::new(code, reason, message)
    }
}

/// `<plural>.<group>`, or just `<plural>` for the core group.
pub(crate) fn qualified(plural: &str, group: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

pub(crate) fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_date_times() {
        assert!(is_date_time("2024-02-29T12:34:56Z"));
        assert!(is_date_time("2024-02-29T12:34:56.123456+02:00"));
        assert!(!is_date_time("2024-02-29"));
        assert!(!is_date_time("yesterday at noon, roughly"));
    }

    #[test]
    fn generates_names() {
        let s = generate_name_suffix();
        assert_eq!(s.len(), 5);
        assert!(s.bytes().all(|c| NAME_ALPHABET.contains(&c)));
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_ne!(new_uid(), u);
    }
}
