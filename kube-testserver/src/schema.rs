//! The structural-schema subset of OpenAPI v3 the real API server enforces on
//! custom resources: pruning of unknown fields, defaulting, validation.
//!
//! Hand-written rather than the `jsonschema` crate because Kubernetes
//! semantics differ from JSON Schema in the parts that matter here:
//! `nullable`, `x-kubernetes-preserve-unknown-fields`,
//! `x-kubernetes-int-or-string`, `x-kubernetes-embedded-resource`, pruning
//! instead of rejecting unknown fields, and the exact error wording.

use crate::util::{is_date_time, json_type_name};
use serde_json::{Map, Value};

/// One entry of a 422 Status's `details.causes`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Cause {
    pub reason: &'static str,
    pub message: String,
    pub field: String,
}

impl Cause {
    fn new(reason: &'static str, field: &str, message: String) -> Self {
        Cause {
            reason,
            message,
            field: field.to_string(),
        }
    }

    /// `field: message`, as it appears in the Status message.
    pub fn line(&self) -> String {
        if self.field.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.field, self.message)
        }
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

fn is_true(v: &Value) -> bool {
    v.as_bool() == Some(true)
}

/// Fields of the root (and of embedded resources) that the schema does not
/// govern: the server handles `metadata` itself and keeps type meta.
fn is_type_or_object_meta(key: &str) -> bool {
    matches!(key, "apiVersion" | "kind" | "metadata")
}

/// Removes every field the schema does not declare, recording each removed
/// path (the server reports them as warnings, or rejects with
/// `fieldValidation=Strict`).
pub(crate) fn prune(v: &mut Value, s: &Value, path: &str, root: bool, unknown: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            let preserve = is_true(&s["x-kubernetes-preserve-unknown-fields"]);
            let embedded = root || is_true(&s["x-kubernetes-embedded-resource"]);
            let props = s["properties"].as_object();
            let addl = &s["additionalProperties"];
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                if embedded && is_type_or_object_meta(&k) {
                    continue;
                }
                let p = child(path, &k);
                if let Some(ps) = props.and_then(|p| p.get(&k)) {
                    prune(map.get_mut(&k).expect("key listed"), ps, &p, false, unknown);
                } else if addl.is_object() {
                    prune(
                        map.get_mut(&k).expect("key listed"),
                        addl,
                        &p,
                        false,
                        unknown,
                    );
                } else if !(preserve || is_true(addl)) {
                    map.remove(&k);
                    unknown.push(p);
                }
            }
        }
        Value::Array(items) if s["items"].is_object() => {
            for (i, it) in items.iter_mut().enumerate() {
                prune(it, &s["items"], &index(path, i), false, unknown);
            }
        }
        _ => {}
    }
}

/// Applies `default`s top-down, so defaults nested inside a defaulted object
/// apply as well (what the real server does).
pub(crate) fn apply_defaults(v: &mut Value, s: &Value) {
    match v {
        Value::Object(map) => {
            if let Some(props) = s["properties"].as_object() {
                for (k, ps) in props {
                    let Some(d) = ps.get("default") else { continue };
                    let missing = match map.get(k) {
                        None => true,
                        Some(Value::Null) => !is_true(&ps["nullable"]),
                        Some(_) => false,
                    };
                    if missing {
                        map.insert(k.clone(), d.clone());
                    }
                }
            }
            let addl = &s["additionalProperties"];
            for (k, c) in map.iter_mut() {
                if let Some(ps) = s["properties"].get(k) {
                    apply_defaults(c, ps);
                } else if addl.is_object() {
                    apply_defaults(c, addl);
                }
            }
        }
        Value::Array(items) if s["items"].is_object() => {
            for it in items {
                apply_defaults(it, &s["items"]);
            }
        }
        _ => {}
    }
}

fn type_ok(v: &Value, t: &str) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        _ => true,
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        format!("{}...", s.chars().take(117).collect::<String>())
    } else {
        s
    }
}

/// Validates `v` against `s`, appending one cause per violation.
pub(crate) fn validate(v: &Value, s: &Value, path: &str, root: bool, errs: &mut Vec<Cause>) {
    let int_or_string = is_true(&s["x-kubernetes-int-or-string"]);
    if v.is_null() {
        if !is_true(&s["nullable"]) {
            if let Some(t) = s["type"].as_str() {
                errs.push(Cause::new(
                    "FieldValueTypeInvalid",
                    path,
                    format!(
                        "Invalid value: \"null\": {path} in body must be of type {t}: \"null\""
                    ),
                ));
            }
        }
        return;
    }
    if int_or_string {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            let got = json_type_name(v);
            errs.push(Cause::new(
                "FieldValueTypeInvalid",
                path,
                format!("Invalid value: \"{got}\": {path} in body must be of type integer,string: \"{got}\""),
            ));
            return;
        }
    } else if let Some(t) = s["type"].as_str() {
        if !type_ok(v, t) {
            let got = json_type_name(v);
            errs.push(Cause::new(
                "FieldValueTypeInvalid",
                path,
                format!("Invalid value: \"{got}\": {path} in body must be of type {t}: \"{got}\""),
            ));
            return;
        }
    }
    if let Some(en) = s["enum"].as_array() {
        if !en.contains(v) {
            let supported: Vec<String> = en.iter().map(|e| e.to_string()).collect();
            errs.push(Cause::new(
                "FieldValueNotSupported",
                path,
                format!(
                    "Unsupported value: {}: supported values: {}",
                    short(v),
                    supported.join(", ")
                ),
            ));
        }
    }
    match v {
        Value::String(st) => validate_string(st, s, path, errs),
        Value::Number(_) => validate_number(v, s, path, errs),
        Value::Array(items) => {
            let n = items.len() as u64;
            if let Some(min) = s["minItems"].as_u64().filter(|m| n < *m) {
                errs.push(Cause::new(
                    "FieldValueInvalid",
                    path,
                    format!("Invalid value: {n}: {path} in body should have at least {min} items"),
                ));
            }
            if let Some(max) = s["maxItems"].as_u64().filter(|m| n > *m) {
                errs.push(Cause::new(
                    "FieldValueTooMany",
                    path,
                    format!("Too many: {n}: must have at most {max} items"),
                ));
            }
            if s["items"].is_object() {
                for (i, it) in items.iter().enumerate() {
                    validate(it, &s["items"], &index(path, i), false, errs);
                }
            }
        }
        Value::Object(map) => validate_object(map, s, path, root, errs),
        _ => {}
    }
    for sub in s["allOf"].as_array().into_iter().flatten() {
        validate(v, sub, path, false, errs);
    }
    if let Some(any) = s["anyOf"].as_array().filter(|_| !int_or_string) {
        let ok = any.iter().any(|sub| {
            let mut e = Vec::new();
            validate(v, sub, path, false, &mut e);
            e.is_empty()
        });
        if !ok {
            errs.push(Cause::new(
                "FieldValueInvalid",
                path,
                format!(
                    "Invalid value: {}: {path} in body must match at least one schema in anyOf",
                    short(v)
                ),
            ));
        }
    }
    for rule in s["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let Some(expr) = rule["rule"].as_str() else {
            continue;
        };
        // Rules outside the small CEL subset we understand are skipped, not
        // failed: a false rejection would be worse than a missed one here.
        if cel::eval(expr, v) == Some(false) {
            let msg = rule["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("failed rule: {expr}"));
            errs.push(Cause::new(
                "FieldValueInvalid",
                path,
                format!("Invalid value: \"{}\": {msg}", json_type_name(v)),
            ));
        }
    }
}

fn validate_string(st: &str, s: &Value, path: &str, errs: &mut Vec<Cause>) {
    let n = st.chars().count() as u64;
    if let Some(min) = s["minLength"].as_u64().filter(|m| n < *m) {
        errs.push(Cause::new(
            "FieldValueInvalid",
            path,
            format!("Invalid value: {st:?}: {path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(max) = s["maxLength"].as_u64().filter(|m| n > *m) {
        errs.push(Cause::new(
            "FieldValueTooLong",
            path,
            format!("Too long: may not be more than {max} bytes"),
        ));
    }
    if let Some(p) = s["pattern"].as_str() {
        match regex_lite::Regex::new(p) {
            Ok(re) if !re.is_match(st) => errs.push(Cause::new(
                "FieldValueInvalid",
                path,
                format!("Invalid value: {st:?}: {path} in body should match '{p}'"),
            )),
            _ => {}
        }
    }
    if s["format"] == "date-time" && !is_date_time(st) {
        errs.push(Cause::new(
            "FieldValueInvalid",
            path,
            format!("Invalid value: {st:?}: {path} in body must be of type date-time: {st:?}"),
        ));
    }
}

fn validate_number(v: &Value, s: &Value, path: &str, errs: &mut Vec<Cause>) {
    let x = v.as_f64().unwrap_or(0.0);
    if let Some(min) = s["minimum"].as_f64() {
        let excl = is_true(&s["exclusiveMinimum"]);
        if x < min || (excl && x == min) {
            let rel = if excl {
                "greater than"
            } else {
                "greater than or equal to"
            };
            errs.push(Cause::new(
                "FieldValueInvalid",
                path,
                format!(
                    "Invalid value: {v}: {path} in body should be {rel} {}",
                    s["minimum"]
                ),
            ));
        }
    }
    if let Some(max) = s["maximum"].as_f64() {
        let excl = is_true(&s["exclusiveMaximum"]);
        if x > max || (excl && x == max) {
            let rel = if excl {
                "less than"
            } else {
                "less than or equal to"
            };
            errs.push(Cause::new(
                "FieldValueInvalid",
                path,
                format!(
                    "Invalid value: {v}: {path} in body should be {rel} {}",
                    s["maximum"]
                ),
            ));
        }
    }
    if s["format"] == "int32" {
        if let Some(i) = v.as_i64().filter(|i| i32::try_from(*i).is_err()) {
            errs.push(Cause::new(
                "FieldValueInvalid",
                path,
                format!("Invalid value: {i}: {path} in body must be of type int32: \"{i}\""),
            ));
        }
    }
}

fn validate_object(
    map: &Map<String, Value>,
    s: &Value,
    path: &str,
    root: bool,
    errs: &mut Vec<Cause>,
) {
    let embedded = root || is_true(&s["x-kubernetes-embedded-resource"]);
    for r in s["required"].as_array().into_iter().flatten() {
        let Some(r) = r.as_str() else { continue };
        if embedded && is_type_or_object_meta(r) {
            continue;
        }
        if !map.contains_key(r) {
            errs.push(Cause::new(
                "FieldValueRequired",
                &child(path, r),
                "Required value".to_string(),
            ));
        }
    }
    let n = map.len() as u64;
    if let Some(min) = s["minProperties"].as_u64().filter(|m| n < *m) {
        errs.push(Cause::new(
            "FieldValueInvalid",
            path,
            format!("Invalid value: {n}: {path} in body should have at least {min} properties"),
        ));
    }
    let addl = &s["additionalProperties"];
    for (k, c) in map {
        if embedded && is_type_or_object_meta(k) {
            continue;
        }
        if let Some(ps) = s["properties"].get(k) {
            validate(c, ps, &child(path, k), false, errs);
        } else if addl.is_object() {
            validate(c, addl, &child(path, k), false, errs);
        }
    }
}

/// Enough of CEL for the rules in the NNF CRDs: `self.contains("x")`,
/// `startsWith`, `endsWith`, `size(self)` comparisons, `!`, `&&`, `||`,
/// parentheses, `true`/`false`. Anything else evaluates to `None`.
mod cel;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "required": ["state"],
                    "properties": {
                        "state": {"type": "string", "enum": ["a", "b"]},
                        "count": {"type": "integer", "minimum": 0, "default": 3},
                        "size": {"type": "string", "pattern": "^\\d+(KiB|MiB)$"},
                        "nested": {
                            "type": "object",
                            "default": {},
                            "properties": {"flag": {"type": "boolean", "default": true}}
                        },
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "map": {"type": "object", "additionalProperties": {"type": "string"}},
                        "ios": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": true},
                        "opt": {"type": "string", "nullable": true}
                    }
                }
            }
        })
    }

    #[test]
    fn prunes_unknown_fields_but_keeps_metadata() {
        let mut v = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n", "labels": {"a": "b"}},
            "spec": {"state": "a", "bogus": 1, "free": {"anything": [1]}, "map": {"k": "v"}}, "extra": true});
        let mut unknown = Vec::new();
        prune(&mut v, &schema(), "", true, &mut unknown);
        assert_eq!(unknown, vec!["extra".to_string(), "spec.bogus".to_string()]);
        assert_eq!(v["metadata"]["labels"]["a"], "b");
        assert_eq!(v["spec"]["free"]["anything"], json!([1]));
        assert_eq!(v["spec"]["map"]["k"], "v");
    }

    #[test]
    fn defaults_nested_objects() {
        let mut v = json!({"spec": {"state": "a", "count": null}});
        apply_defaults(&mut v, &schema());
        assert_eq!(v["spec"]["count"], 3);
        assert_eq!(v["spec"]["nested"], json!({"flag": true}));
    }

    #[test]
    fn reports_each_violation() {
        let v = json!({"spec": {"count": -1, "size": "10XB", "ios": 1.5, "opt": null, "map": {"k": 1}}});
        let mut errs = Vec::new();
        validate(&v, &schema(), "", true, &mut errs);
        let lines: Vec<String> = errs.iter().map(Cause::line).collect();
        assert_eq!(
            lines,
            vec![
                "spec.state: Required value",
                "spec.count: Invalid value: -1: spec.count in body should be greater than or equal to 0",
                "spec.ios: Invalid value: \"number\": spec.ios in body must be of type integer,string: \"number\"",
                "spec.map.k: Invalid value: \"integer\": spec.map.k in body must be of type string: \"integer\"",
                "spec.size: Invalid value: \"10XB\": spec.size in body should match '^\\d+(KiB|MiB)$'",
            ]
        );
        let mut errs = Vec::new();
        validate(
            &json!({"spec": {"state": "c"}}),
            &schema(),
            "",
            true,
            &mut errs,
        );
        assert_eq!(
            errs[0].line(),
            "spec.state: Unsupported value: \"c\": supported values: \"a\", \"b\""
        );
        assert_eq!(errs[0].reason, "FieldValueNotSupported");
    }
}
