//! Checks of `metadata` as the real server makes them: names, labels,
//! annotations, finalizers.

use super::*;

const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

pub(super) fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub(super) fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

pub(super) fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

pub(super) fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_label_name(name),
        None => is_label_name(s),
    }
}

pub(super) fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_label_name(s)
}

/// The ObjectMeta checks of apimachinery's `ValidateObjectMeta` that a client
/// can get wrong.
pub(super) fn validate_meta(obj: &Value, namespaced: bool, errs: &mut Vec<Cause>) {
    let m = &obj["metadata"];
    let mut bad = |field: &str, reason: &'static str, message: String| {
        errs.push(Cause {
            reason,
            message,
            field: field.to_string(),
        })
    };
    match m["name"].as_str() {
        Some(n) if !is_dns1123_subdomain(n) => bad(
            "metadata.name",
            "FieldValueInvalid",
            format!("Invalid value: {n:?}: {DNS1123_SUBDOMAIN_MSG}"),
        ),
        _ => {}
    }
    if namespaced {
        if let Some(ns) = m["namespace"].as_str().filter(|n| !is_dns1123_label(n)) {
            bad(
                "metadata.namespace",
                "FieldValueInvalid",
                format!("Invalid value: {ns:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"),
            );
        }
    }
    for (field, check_values) in [("labels", true), ("annotations", false)] {
        match &m[field] {
            Value::Null => {}
            Value::Object(map) => {
                for (k, v) in map {
                    if !is_qualified_name(k) {
                        bad(
                            &format!("metadata.{field}"),
                            "FieldValueInvalid",
                            format!("Invalid value: {k:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"),
                        );
                    }
                    match v.as_str() {
                        Some(s) if check_values && !is_label_value(s) => bad(
                            &format!("metadata.{field}"),
                            "FieldValueInvalid",
                            format!("Invalid value: {s:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"),
                        ),
                        Some(_) => {}
                        None => bad(
                            &format!("metadata.{field}.{k}"),
                            "FieldValueTypeInvalid",
                            "Invalid value: must be a string".to_string(),
                        ),
                    }
                }
            }
            _ => bad(
                &format!("metadata.{field}"),
                "FieldValueTypeInvalid",
                "Invalid value: must be a map of strings".to_string(),
            ),
        }
    }
    match &m["finalizers"] {
        Value::Null => {}
        Value::Array(a) => {
            for f in a {
                match f.as_str() {
                    Some(s) if is_qualified_name(s) => {}
                    _ => bad(
                        "metadata.finalizers",
                        "FieldValueInvalid",
                        format!("Invalid value: {f}: name part must consist of alphanumeric characters, '-', '_' or '.'"),
                    ),
                }
            }
        }
        _ => bad(
            "metadata.finalizers",
            "FieldValueTypeInvalid",
            "Invalid value: must be a list of strings".to_string(),
        ),
    }
}

pub(super) fn invalid(res: &ResourceDef, name: &str, causes: Vec<Cause>) -> ApiError {
    let lines: Vec<String> = causes.iter().map(Cause::line).collect();
    let body = if lines.len() == 1 {
        lines[0].clone()
    } else {
        format!("[{}]", lines.join(", "))
    };
    let causes: Vec<Value> = causes
        .iter()
        .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
        .collect();
    ApiError::with_details(
        422,
        "Invalid",
        format!("{}.{} \"{name}\" is invalid: {body}", res.kind, res.group),
        json!({"name": name, "group": res.group, "kind": res.kind, "causes": causes}),
    )
}

pub(super) fn finalizers(o: &Value) -> Vec<String> {
    o["metadata"]["finalizers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
