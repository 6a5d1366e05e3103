//! PATCH bodies: JSON merge patch (RFC 7386, also used for strategic merge and server-side
//! apply, whose list-merge rules the fake does not model) and JSON patch (RFC 6902).
use serde_json::Value;

/// Applies an RFC 7386 merge patch in place: `null` deletes, objects merge, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Why a JSON patch could not be applied; the text follows kube-apiserver's messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonPatchError {
    #[error("the JSON patch is not a list of operations: {0}")]
    Shape(String),
    #[error("unknown patch operation {0:?}")]
    UnknownOp(String),
    #[error("the path {0:?} does not exist")]
    Missing(String),
    #[error("testing value {0:?} failed")]
    TestFailed(String),
    #[error("invalid JSON pointer {0:?}")]
    BadPointer(String),
}

/// Applies an RFC 6902 JSON patch; on error the target is left unchanged.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), JsonPatchError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| JsonPatchError::Shape("expected an array".into()))?;
    let mut doc = target.clone();
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| JsonPatchError::Shape("operation without a path".into()))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| JsonPatchError::Shape(format!("{name} without a value")))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| JsonPatchError::Shape(format!("{name} without from")))
        };
        match name {
            "add" => add(&mut doc, path, value()?)?,
            "remove" => {
                remove(&mut doc, path)?;
            }
            "replace" => {
                remove(&mut doc, path)?;
                add(&mut doc, path, value()?)?;
            }
            "move" => {
                let v = remove(&mut doc, from()?)?;
                add(&mut doc, path, v)?;
            }
            "copy" => {
                let v = doc
                    .pointer(from()?)
                    .cloned()
                    .ok_or_else(|| JsonPatchError::Missing(from().unwrap_or_default().into()))?;
                add(&mut doc, path, v)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(JsonPatchError::TestFailed(path.into()));
                }
            }
            other => return Err(JsonPatchError::UnknownOp(other.into())),
        }
    }
    *target = doc;
    Ok(())
}

/// Splits `/a/b~1c` into its parent pointer and unescaped last token.
fn split(path: &str) -> Result<(&str, String), JsonPatchError> {
    if !path.starts_with('/') {
        return Err(JsonPatchError::BadPointer(path.into()));
    }
    let idx = path.rfind('/').unwrap_or(0);
    Ok((&path[..idx], path[idx + 1..].replace("~1", "/").replace("~0", "~")))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), JsonPatchError> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.insert(last, value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| JsonPatchError::BadPointer(path.into()))?
            };
            if i > a.len() {
                return Err(JsonPatchError::Missing(path.into()));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(JsonPatchError::Missing(path.into())),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, JsonPatchError> {
    let (parent, last) = split(path)?;
    let missing = || JsonPatchError::Missing(path.into());
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&last).ok_or_else(missing),
        Some(Value::Array(a)) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() { Ok(a.remove(i)) } else { Err(missing()) }
        }
        _ => Err(missing()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge(&mut t, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut t = json!({"metadata": {"labels": {"a": "1"}}, "l": [1, 2]});
        json_patch(
            &mut t,
            &json!([
                {"op": "add", "path": "/metadata/labels/b~1c", "value": "2"},
                {"op": "remove", "path": "/metadata/labels/a"},
                {"op": "add", "path": "/l/-", "value": 3},
                {"op": "replace", "path": "/l/0", "value": 0},
                {"op": "copy", "from": "/l/2", "path": "/x"},
                {"op": "move", "from": "/x", "path": "/y"},
                {"op": "test", "path": "/y", "value": 3}
            ]),
        )
        .unwrap();
        assert_eq!(t, json!({"metadata": {"labels": {"b/c": "2"}}, "l": [0, 2, 3], "y": 3}));
        let before = t.clone();
        let err = json_patch(
            &mut t,
            &json!([{"op": "add", "path": "/q", "value": 1}, {"op": "test", "path": "/y", "value": 4}]),
        );
        assert!(err.is_err());
        assert_eq!(t, before, "a failed patch changes nothing");
    }
}
