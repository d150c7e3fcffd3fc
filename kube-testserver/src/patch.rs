//! JSON merge patch (RFC 7386) and JSON patch (RFC 6902), by the
//! `json-patch` crate (what kube's own `Patch::Json` is built on).

use serde_json::Value;

pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    ::json_patch::merge(target, patch);
}

/// Why a JSON patch failed: the real server answers a malformed document
/// with 400 and an operation that cannot apply with 422.
#[derive(Debug)]
pub(crate) enum PatchError {
    Malformed(String),
    Failed(String),
}

/// Applies `ops` to `doc`, all or nothing.
pub(crate) fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), PatchError> {
    if !ops.is_array() {
        return Err(PatchError::Malformed(
            "a JSON patch must be an array of operations".into(),
        ));
    }
    let ops: ::json_patch::Patch = serde_json::from_value(ops.clone())
        .map_err(|e| PatchError::Malformed(format!("invalid JSON patch: {e}")))?;
    ::json_patch::patch(doc, &ops).map_err(|e| PatchError::Failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}, "n": [1]}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "n": [1]}));
    }

    #[test]
    fn json_patch_rfc6902() {
        let mut d = json!({"metadata": {"finalizers": ["a", "b"]}, "spec": {"x/y": 1}});
        json_patch(
            &mut d,
            &json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "a"},
                {"op": "remove", "path": "/metadata/finalizers/0"},
                {"op": "add", "path": "/metadata/finalizers/-", "value": "c"},
                {"op": "replace", "path": "/spec/x~1y", "value": 2},
                {"op": "copy", "from": "/spec/x~1y", "path": "/spec/z"},
                {"op": "move", "from": "/spec/z", "path": "/spec/w"}
            ]),
        )
        .unwrap();
        assert_eq!(
            d,
            json!({"metadata": {"finalizers": ["b", "c"]}, "spec": {"x/y": 2, "w": 2}})
        );
        assert!(matches!(
            json_patch(
                &mut d,
                &json!([{"op": "test", "path": "/spec/w", "value": 3}])
            ),
            Err(PatchError::Failed(_))
        ));
        assert!(matches!(
            json_patch(&mut d, &json!({"op": "add"})),
            Err(PatchError::Malformed(_))
        ));
        assert!(matches!(
            json_patch(
                &mut d,
                &json!([{"op": "replace", "path": "/metadata/finalizers/5", "value": 1}])
            ),
            Err(PatchError::Failed(_))
        ));
    }
}
