//! Command-variable substitution.
//!
//! A variable is `$` followed by the longest run of `[A-Z_][A-Z0-9_]*`, and
//! is replaced only when that whole name is known. Upstream replaced plain
//! substrings, so `$DEVICE` clobbered the front of `$DEVICE_LIST`; matching
//! whole names makes the order of the variables irrelevant. An unknown
//! variable is left exactly as written (bash may still expand it).

use std::collections::BTreeMap;

/// Variables keyed by their full name, `$` included (as profiles'
/// `variableOverride` maps spell them).
pub type Vars = BTreeMap<String, String>;

pub fn substitute(text: &str, vars: &Vars) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut end = start;
        while end < bytes.len() {
            let c = bytes[end];
            let ok = c == b'_' || c.is_ascii_uppercase() || (end > start && c.is_ascii_digit());
            if !ok {
                break;
            }
            end += 1;
        }
        if end > start {
            if let Some(value) = vars.get(&text[i..end]) {
                out.push_str(&text[copied..i]);
                out.push_str(value);
                copied = end;
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn whole_names_only() {
        let v = vars(&[("$DEVICE", "/dev/x"), ("$DEVICE_LIST", "/dev/a /dev/b")]);
        assert_eq!(
            substitute("$DEVICE $DEVICE_LIST", &v),
            "/dev/x /dev/a /dev/b"
        );
        let v = vars(&[("$DEVICE", "/dev/x")]);
        assert_eq!(
            substitute("$DEVICE_LIST $DEVICE", &v),
            "$DEVICE_LIST /dev/x"
        );
    }

    #[test]
    fn adjacent_and_unknown() {
        let v = vars(&[("$VG_NAME", "vg"), ("$LV_NAME", "lv")]);
        assert_eq!(substitute("$VG_NAME/$LV_NAME", &v), "vg/lv");
        assert_eq!(
            substitute("$NOPE $ $1 $lower $VG_NAME", &v),
            "$NOPE $ $1 $lower vg"
        );
        assert_eq!(substitute("a$VG_NAME-b", &v), "avg-b");
        assert_eq!(substitute("", &v), "");
        assert_eq!(substitute("$", &v), "$");
        assert_eq!(substitute("é$VG_NAMEé", &v), "évgé");
        assert_eq!(substitute("é$VG_NAME é", &v), "évg é");
    }
}
