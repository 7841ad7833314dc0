//! Checked access to untrusted JSON: every failure names the field path.

use serde_json::{Map, Value};

/// A JSON field that is missing or has the wrong type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub(crate) field: String,
    pub(crate) reason: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub(crate) type FieldResult<T> = Result<T, FieldError>;

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn as_object<'a>(v: &'a Value, path: &str) -> FieldResult<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| FieldError::new(path, format!("expected an object, found {}", type_name(v))))
}

pub(crate) fn field<'a>(
    obj: &'a Map<String, Value>,
    path: &str,
    key: &str,
) -> FieldResult<&'a Value> {
    obj.get(key)
        .ok_or_else(|| FieldError::new(format!("{path}.{key}"), "missing"))
}

pub(crate) fn string(v: &Value, path: &str) -> FieldResult<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(FieldError::new(
            path,
            format!("expected a string, found {}", type_name(other)),
        )),
    }
}

/// A non-negative integer given as a JSON number or a numeric string (OpenNebula mixes
/// both: XML-derived scalars are strings, body values are numbers).
pub(crate) fn uint(v: &Value, path: &str) -> FieldResult<u64> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| {
            FieldError::new(path, format!("expected a non-negative integer, found {n}"))
        }),
        Value::String(s) => s.trim().parse::<u64>().map_err(|_| {
            FieldError::new(
                path,
                format!("expected a non-negative integer, found {:?}", shorten(s)),
            )
        }),
        other => Err(FieldError::new(
            path,
            format!("expected an integer, found {}", type_name(other)),
        )),
    }
}

/// A signed integer given as a number or a numeric string.
pub(crate) fn int(v: &Value, path: &str) -> FieldResult<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| FieldError::new(path, format!("expected an integer, found {n}"))),
        Value::String(s) => s.trim().parse::<i64>().map_err(|_| {
            FieldError::new(path, format!("expected an integer, found {:?}", shorten(s)))
        }),
        other => Err(FieldError::new(
            path,
            format!("expected an integer, found {}", type_name(other)),
        )),
    }
}

pub(crate) fn array<'a>(v: &'a Value, path: &str) -> FieldResult<&'a Vec<Value>> {
    v.as_array()
        .ok_or_else(|| FieldError::new(path, format!("expected an array, found {}", type_name(v))))
}

/// At most 60 characters of untrusted text, for error messages.
pub(crate) fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(60).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}
