//! Every structural error of a document at once: unknown, missing and wrongly typed fields.
//!
//! serde stops at the first error. So when a document fails to deserialize, we ask serde
//! again and again: after each error we repair the raw YAML value where serde pointed
//! (drop an unknown key; give a missing or mistyped required field a placeholder of its
//! schema type; drop a mistyped optional field so its default applies), and deserialize
//! once more, until it passes or we cannot repair. serde stays the only judge of what is
//! valid, so the errors are exactly the ones the typed loader would report one run at a
//! time, and the repaired document lets semantic validation run on everything else.
//!
//! Owns: the repair loop and the placeholders. Must not: decide validity (a document with
//! any error here is invalid; the repaired value is only for finding the other errors).
//!
//! Guarantees: never panics; at most [`MAX_STRUCTURAL_ERRORS`] rounds and
//! [`MAX_REREAD_BYTES`] of re-read text per document (then `truncated`); each
//! round re-reads YAML text (the repaired value written back out), so scalars are typed the
//! way the text loader types them (`epochs: 5` is a string where a string is expected).
//! Every repaired path is returned as *tainted*: a semantic issue at or under one, or
//! reading one, is not reported (its value is a placeholder, not the author's).
//! Tests: `tests/spec_validation.rs`
//! `a_document_with_four_independent_errors_gets_four_located_errors`, and the tests below.
//!
//! Caveats: a repair serde still rejects (a placeholder the type refuses) ends the loop;
//! the errors found so far are reported.

use std::sync::LazyLock;

use serde_json::Value as Json;
use serde_norway::{Mapping, Value};

use super::error::{FieldPath, PathSegment};
use super::explain;
use super::schema::json_schema;
use super::types::FlowerCluster;

/// Most structural errors reported for one document; the loop stops there.
pub const MAX_STRUCTURAL_ERRORS: usize = 64;
/// Most YAML text the loop re-reads for one document, over all rounds: a spec of a few KiB
/// gets every round, a document near the file cap a handful (each round parses it whole).
pub const MAX_REREAD_BYTES: usize = 2 * 1024 * 1024;

/// One structural error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    /// The field the error is about (for a missing field, the missing field's own path).
    pub path: FieldPath,
    /// serde's message, unprefixed.
    pub message: String,
    /// Point at the key naming this path rather than at a value (unknown and missing fields).
    pub key_of: Option<FieldPath>,
}

/// What the repair loop found.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    /// The errors, in the order serde met them.
    pub errors: Vec<Found>,
    /// Paths whose value is a repair, not the author's.
    pub tainted: Vec<FieldPath>,
    /// The repaired document, when every error could be repaired.
    pub repaired: Option<FlowerCluster>,
    /// The loop stopped at a cap: more errors may follow.
    pub truncated: bool,
}

/// Runs the repair loop on a document that the typed loader rejected.
pub(crate) fn collect(raw: &Value) -> Collected {
    let mut value = raw.clone();
    let mut out = Collected::default();
    let mut reread = 0;
    loop {
        let Ok(text) = serde_norway::to_string(&value) else {
            return out;
        };
        reread += text.len();
        if out.errors.len() >= MAX_STRUCTURAL_ERRORS || reread > MAX_REREAD_BYTES {
            out.truncated = true;
            return out;
        }
        let de = serde_norway::Deserializer::from_str(&text);
        let err = match serde_path_to_error::deserialize::<_, FlowerCluster>(de) {
            Ok(c) => {
                out.repaired = Some(c);
                return out;
            }
            Err(e) => e,
        };
        let path = super::load::convert_path(err.path());
        let message = super::load::bare_message(err.inner());
        // A repair serde did not accept: stop rather than loop or report an echo.
        if out.tainted.iter().any(|t| path.starts_with(t)) {
            return out;
        }
        let Some(found) = repair(&mut value, path, message) else {
            return out;
        };
        out.tainted.push(found.path.clone());
        out.errors.push(found);
    }
}

/// Repairs `value` where serde reported `message` at `path`; `None` when it cannot.
fn repair(value: &mut Value, path: FieldPath, message: String) -> Option<Found> {
    if message.starts_with("unknown field `") {
        let (parent, key) = split_last_key(&path)?;
        let key = key_in(value, &parent, &key)?;
        node_mut(value, &parent)?.as_mapping_mut()?.remove(key);
        return Some(Found {
            key_of: Some(path.clone()),
            path,
            message,
        });
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.split('`').next()?.to_string();
        let target = path.key(&field);
        let placeholder = placeholder(&target)?;
        node_mut(value, &path)?
            .as_mapping_mut()?
            .insert(Value::String(field.clone()), placeholder);
        return Some(Found {
            key_of: Some(path),
            path: target,
            message: format!("missing required field `{field}`"),
        });
    }
    // A wrong type or value. An optional field is dropped (its default applies); anything
    // else (a required field, a list item, a map value) gets a placeholder.
    let optional = split_last_key(&path)
        .filter(|(parent, key)| is_optional_field(parent, key))
        .and_then(|(parent, key)| Some((key_in(value, &parent, &key)?, parent)));
    match optional {
        Some((key, parent)) => {
            node_mut(value, &parent)?.as_mapping_mut()?.remove(key);
        }
        None => *node_mut(value, &path)? = placeholder(&path)?,
    }
    Some(Found {
        path,
        message,
        key_of: None,
    })
}

fn split_last_key(path: &FieldPath) -> Option<(FieldPath, String)> {
    match path.segments().split_last()? {
        (PathSegment::Key(k), parent) => Some((FieldPath(parent.to_vec()), k.clone())),
        _ => None,
    }
}

/// The mapping key of `value` at `parent` that reads as `key` (keys may be numbers in YAML).
fn key_in(value: &Value, parent: &FieldPath, key: &str) -> Option<Value> {
    let mut node = value;
    for seg in parent.segments() {
        node = child(node, seg)?;
    }
    node.as_mapping()?
        .keys()
        .find(|k| key_text(k).as_deref() == Some(key))
        .cloned()
}

fn key_text(k: &Value) -> Option<String> {
    match k {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn child<'a>(node: &'a Value, seg: &PathSegment) -> Option<&'a Value> {
    match seg {
        PathSegment::Key(k) => node
            .as_mapping()?
            .iter()
            .find(|(key, _)| key_text(key).as_deref() == Some(k))
            .map(|(_, v)| v),
        PathSegment::Index(i) => node.as_sequence()?.get(*i),
    }
}

fn node_mut<'a>(value: &'a mut Value, path: &FieldPath) -> Option<&'a mut Value> {
    let mut node = value;
    for seg in path.segments() {
        node = match seg {
            PathSegment::Key(k) => {
                let m: &mut Mapping = node.as_mapping_mut()?;
                m.iter_mut()
                    .find(|(key, _)| key_text(key).as_deref() == Some(k))
                    .map(|(_, v)| v)?
            }
            PathSegment::Index(i) => node.as_sequence_mut()?.get_mut(*i)?,
        };
    }
    Some(node)
}

static SCHEMA: LazyLock<Json> = LazyLock::new(json_schema);

/// The schema of the field at `path`, and whether its parent object requires it.
fn schema_at(path: &FieldPath) -> Option<(&'static Json, bool)> {
    let mut node: &Json = &SCHEMA;
    let mut required = true;
    for seg in path.segments() {
        let n = explain::concrete(node);
        (node, required) = match seg {
            PathSegment::Key(k) => match explain::field(n, k) {
                Some(found) => found,
                // A map's value (nodeConfig, runConfig, labels).
                None => (
                    n.get("additionalProperties").filter(|a| a.is_object())?,
                    true,
                ),
            },
            PathSegment::Index(_) => (n.get("items")?, true),
        };
    }
    Some((node, required))
}

fn is_optional_field(parent: &FieldPath, key: &str) -> bool {
    let parent_is_struct =
        schema_at(parent).is_some_and(|(n, _)| explain::concrete(n).get("properties").is_some());
    parent_is_struct && schema_at(&parent.key(key)).is_some_and(|(_, required)| !required)
}

/// A value of the schema type at `path`: its default, const or first enum value, else an
/// empty or zero value of its type, objects with their required fields filled in.
fn placeholder(path: &FieldPath) -> Option<Value> {
    let (node, _) = schema_at(path)?;
    serde_norway::to_value(synthesize(node, 0)?).ok()
}

fn synthesize(node: &Json, depth: usize) -> Option<Json> {
    if depth > 16 {
        return None;
    }
    if let Some(v) = node.get("default").or_else(|| node.get("const")) {
        return Some(v.clone());
    }
    if let Some(first) = node.get("enum").and_then(|e| e.get(0)) {
        return Some(first.clone());
    }
    if let Some(Json::Array(branches)) = node.get("anyOf").or_else(|| node.get("oneOf")) {
        return branches.iter().find_map(|b| synthesize(b, depth + 1));
    }
    let ty = match node.get("type")? {
        Json::String(t) => t.as_str(),
        Json::Array(ts) => ts.iter().filter_map(Json::as_str).find(|t| *t != "null")?,
        _ => return None,
    };
    Some(match ty {
        "object" => {
            let props = node.get("properties");
            let mut obj = serde_json::Map::new();
            for r in node
                .get("required")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                let name = r.as_str()?;
                obj.insert(name.into(), synthesize(props?.get(name)?, depth + 1)?);
            }
            Json::Object(obj)
        }
        "array" => Json::Array(Vec::new()),
        "string" => Json::String(String::new()),
        "integer" => node.get("minimum").cloned().unwrap_or(Json::from(0)),
        "number" => Json::from(0.0),
        "boolean" => Json::Bool(false),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(doc: &str) -> Collected {
        collect(&serde_norway::from_str(doc).expect("YAML"))
    }

    fn found(c: &Collected) -> Vec<(String, String)> {
        c.errors
            .iter()
            .map(|f| (f.path.to_string(), f.message.clone()))
            .collect()
    }

    const HEAD: &str =
        "apiVersion: flower.opennebula.io/v1alpha1\nkind: FlowerCluster\nmetadata: {name: x}\n";

    #[test]
    fn unknown_missing_and_mistyped_fields_all_come_out_and_the_rest_is_repaired() {
        let c = run(&format!(
            "{HEAD}spec:\n  supernodes: {{cuont: 3, count: three, min: 2}}\n  tls: {{mode: foo}}\n  training: {{runConfig: {{epochs: 5, lr: [1]}}}}\n"
        ));
        let f = found(&c);
        assert_eq!(
            f.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
            [
                "spec.supernodes.cuont",
                "spec.supernodes.count",
                "spec.tls.mode",
                "spec.training.runConfig.lr",
                "spec.opennebula",
            ],
            "{f:?}"
        );
        assert!(f[0].1.starts_with("unknown field `cuont`"), "{f:?}");
        assert!(f[1].1.contains("expected u32"), "{f:?}");
        assert_eq!(f[4].1, "missing required field `opennebula`");
        // Repaired: the mistyped optional count is defaulted, the rest is the author's.
        let r = c.repaired.expect("repaired");
        assert_eq!((r.spec.supernodes.count, r.spec.supernodes.min), (2, 2));
        assert_eq!(
            r.spec.training.run_config.get("epochs"),
            Some(&crate::api::ConfigValue::Int(5))
        );
        assert_eq!(c.tainted.len(), 5);
    }

    #[test]
    fn missing_required_fields_get_placeholders_of_their_schema_type() {
        let c = run("apiVersion: a\nspec:\n  opennebula: {templates: {superlink: 1}}\n  supernodes:\n    elasticity: {policies: [{adjust: 1}]}\n");
        let paths: Vec<String> = c.errors.iter().map(|f| f.path.to_string()).collect();
        assert_eq!(
            paths,
            [
                "spec.opennebula.templates.supernode",
                "spec.opennebula.network",
                "spec.supernodes.elasticity.policies[0].type",
                "spec.supernodes.elasticity.policies[0].expression",
                "kind",
                "metadata",
            ]
        );
        assert!(c.repaired.is_some());
    }

    #[test]
    fn scalars_keep_their_text_typing_across_repairs() {
        // `5` is a string where a string is expected, as in the text loader; `1: a` a key.
        let c = run(&format!(
            "{HEAD}spec:\n  bogus: 1\n  opennebula: {{templates: {{superlink: 1, supernode: 2}}, network: 0}}\n  supernodes: {{nodeConfig: {{epochs: 5, 1: a}}}}\n"
        ));
        assert_eq!(found(&c).len(), 1, "{:?}", found(&c));
        let r = c.repaired.expect("repaired");
        assert_eq!(r.spec.supernodes.node_config["epochs"], "5");
        assert_eq!(r.spec.supernodes.node_config["1"], "a");
    }

    #[test]
    fn garbage_ends_the_loop_without_panicking() {
        for doc in [
            "[1, 2]",
            "a: b",
            "spec: 3",
            "apiVersion: [x]\nspec: {opennebula: 1}",
        ] {
            let c = run(doc);
            assert!(!c.errors.is_empty() || c.repaired.is_some(), "{doc}");
            assert!(c.errors.len() <= MAX_STRUCTURAL_ERRORS);
        }
        let many: String = (0..200).map(|i| format!("f{i}: 1\n")).collect();
        let c = run(&many);
        assert_eq!(c.errors.len(), MAX_STRUCTURAL_ERRORS);
        assert!(c.truncated);
    }
}
