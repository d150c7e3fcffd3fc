//! JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

use serde_json::Value;

pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let t = target.as_object_mut().expect("made an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Why a JSON patch failed: the real server answers a malformed document
/// with 400 and an operation that cannot apply with 422.
#[derive(Debug)]
pub(crate) enum PatchError {
    Malformed(String),
    Failed(String),
}

fn unescape(tok: &str) -> String {
    tok.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<Vec<String>, PatchError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| PatchError::Malformed(format!("invalid JSON pointer {path:?}")))?;
    Ok(rest.split('/').map(unescape).collect())
}

fn array_index(tok: &str, len: usize, allow_end: bool) -> Result<usize, PatchError> {
    if allow_end && tok == "-" {
        return Ok(len);
    }
    let ok = !tok.is_empty()
        && tok.bytes().all(|b| b.is_ascii_digit())
        && (tok == "0" || !tok.starts_with('0'));
    let i: usize = tok
        .parse()
        .ok()
        .filter(|_| ok)
        .ok_or_else(|| PatchError::Failed(format!("invalid array index {tok:?}")))?;
    let max = if allow_end {
        len
    } else {
        len.saturating_sub(1)
    };
    if i > max || (!allow_end && len == 0) {
        return Err(PatchError::Failed(format!("array index {i} out of bounds")));
    }
    Ok(i)
}

fn get_mut<'a>(doc: &'a mut Value, toks: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| PatchError::Failed(format!("path element {t:?} not found")))?,
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                &mut a[i]
            }
            _ => return Err(PatchError::Failed(format!("path element {t:?} not found"))),
        };
    }
    Ok(cur)
}

fn add(doc: &mut Value, toks: &[String], v: Value) -> Result<(), PatchError> {
    let Some((last, parent)) = toks.split_last() else {
        *doc = v;
        return Ok(());
    };
    match get_mut(doc, parent)? {
        Value::Object(m) => {
            m.insert(last.clone(), v);
        }
        Value::Array(a) => {
            let i = array_index(last, a.len(), true)?;
            a.insert(i, v);
        }
        _ => {
            return Err(PatchError::Failed(format!(
                "cannot add at {last:?}: parent is not a container"
            )))
        }
    }
    Ok(())
}

fn remove(doc: &mut Value, toks: &[String]) -> Result<Value, PatchError> {
    let Some((last, parent)) = toks.split_last() else {
        return Err(PatchError::Failed(
            "cannot remove the whole document".into(),
        ));
    };
    match get_mut(doc, parent)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| PatchError::Failed(format!("path element {last:?} not found"))),
        Value::Array(a) => {
            let i = array_index(last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => Err(PatchError::Failed(format!(
            "path element {last:?} not found"
        ))),
    }
}

pub(crate) fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), PatchError> {
    let ops = ops.as_array().ok_or_else(|| {
        PatchError::Malformed("a JSON patch must be an array of operations".into())
    })?;
    for op in ops {
        let name = op["op"]
            .as_str()
            .ok_or_else(|| PatchError::Malformed("operation without \"op\"".into()))?;
        let path = op["path"]
            .as_str()
            .ok_or_else(|| PatchError::Malformed(format!("{name} operation without \"path\"")))?;
        let toks = split_pointer(path)?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| PatchError::Malformed(format!("{name} operation without \"value\"")))
        };
        let from = || {
            op["from"]
                .as_str()
                .ok_or_else(|| PatchError::Malformed(format!("{name} operation without \"from\"")))
                .and_then(split_pointer)
        };
        match name {
            "add" => add(doc, &toks, value()?)?,
            "remove" => {
                remove(doc, &toks)?;
            }
            "replace" => {
                let v = value()?;
                *get_mut(doc, &toks)? = v;
            }
            "move" => {
                let f = from()?;
                let v = remove(doc, &f)?;
                add(doc, &toks, v)?;
            }
            "copy" => {
                let v = get_mut(doc, &from()?)?.clone();
                add(doc, &toks, v)?;
            }
            "test" => {
                let want = value()?;
                if *get_mut(doc, &toks)? != want {
                    return Err(PatchError::Failed(format!("testing value {path} failed")));
                }
            }
            other => return Err(PatchError::Malformed(format!("unexpected op {other:?}"))),
        }
    }
    Ok(())
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
