//! JSON Schema and Kubernetes CRD of the FlowerCluster resource, generated from the types.
//!
//! The checked-in copies (`crds/flowercluster.schema.json`, `crds/flowercluster.yaml`,
//! `docs/flowercluster-reference.md`) are written by `flower-reconcile schema` and a test
//! fails when they drift from the code.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use super::types::{FlowerCluster, FlowerClusterSpec, API_VERSION, KIND};
use super::FlowerClusterStatus;

/// CRD group.
pub const GROUP: &str = "flower.opennebula.io";
/// CRD version.
pub const VERSION: &str = "v1alpha1";
/// Path of the JSON Schema, relative to the repository root.
pub const JSON_SCHEMA_PATH: &str = "crds/flowercluster.schema.json";
/// Path of the CRD, relative to the repository root.
pub const CRD_PATH: &str = "crds/flowercluster.yaml";
/// Path of the field reference, relative to the repository root.
pub const REFERENCE_PATH: &str = "docs/flowercluster-reference.md";

fn inlined<T: JsonSchema>(settings: SchemaSettings) -> Value {
    settings
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// The JSON Schema (draft 2020-12) of a FlowerCluster file, for editors and CI.
pub fn json_schema() -> Value {
    let mut v = inlined::<FlowerCluster>(SchemaSettings::draft2020_12());
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "$id".into(),
            json!("https://flower.opennebula.io/schemas/flowercluster.schema.json"),
        );
        if let Some(props) = o.get_mut("properties").and_then(Value::as_object_mut) {
            props.insert("apiVersion".into(), json!({"const": API_VERSION, "description": "Always `flower.opennebula.io/v1alpha1`."}));
            props.insert(
                "kind".into(),
                json!({"const": KIND, "description": "Always `FlowerCluster`."}),
            );
        }
    }
    v
}

/// The JSON Schema text as checked in.
pub fn json_schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&json_schema()).unwrap_or_default();
    s.push('\n');
    s
}

/// An OpenAPI v3 schema of `T` made structural for Kubernetes.
fn structural<T: JsonSchema>() -> Value {
    let mut v = inlined::<T>(SchemaSettings::openapi3());
    make_structural(&mut v);
    if let Some(o) = v.as_object_mut() {
        o.remove("$schema");
        o.remove("title");
    }
    v
}

/// Kubernetes structural-schema rules: no `additionalProperties: false` next to
/// `properties`, no `oneOf`/`anyOf` of different types (int-or-string has its own flag,
/// other unions keep unknown fields), string enums as `enum`, known formats only.
fn make_structural(v: &mut Value) {
    match v {
        Value::Array(a) => a.iter_mut().for_each(make_structural),
        Value::Object(o) => {
            for key in ["oneOf", "anyOf"] {
                if let Some(Value::Array(branches)) = o.remove(key) {
                    let replacement = union(&branches);
                    for (k, val) in replacement {
                        o.entry(k).or_insert(val);
                    }
                }
            }
            if o.get("additionalProperties") == Some(&Value::Bool(false)) {
                o.remove("additionalProperties");
            }
            if let Some(Value::String(f)) = o.get("format") {
                if !["int32", "int64", "float", "double", "date-time", "byte"].contains(&f.as_str())
                {
                    o.remove("format");
                }
            }
            o.remove("const")
                .map(|c| o.insert("enum".into(), json!([c])));
            o.values_mut().for_each(make_structural);
        }
        _ => {}
    }
}

fn branch_type(b: &Value) -> Option<&str> {
    b.get("type").and_then(Value::as_str)
}

fn union(branches: &[Value]) -> Map<String, Value> {
    let non_null: Vec<&Value> = branches
        .iter()
        .filter(|b| branch_type(b) != Some("null"))
        .collect();
    let nullable = non_null.len() != branches.len();
    let mut out = Map::new();
    let types: Vec<Option<&str>> = non_null.iter().map(|b| branch_type(b)).collect();
    if non_null.len() == 1 {
        if let Some(o) = non_null[0].as_object() {
            out.extend(o.clone());
        }
    } else if types.iter().all(|t| *t == Some("string"))
        && non_null
            .iter()
            .all(|b| b.get("const").is_some() || b.get("enum").is_some())
    {
        let values: Vec<Value> = non_null
            .iter()
            .flat_map(|b| match (b.get("const"), b.get("enum")) {
                (Some(c), _) => vec![c.clone()],
                (_, Some(Value::Array(e))) => e.clone(),
                _ => vec![],
            })
            .collect();
        out.insert("type".into(), json!("string"));
        out.insert("enum".into(), Value::Array(values));
    } else if types.len() == 2
        && types.contains(&Some("integer"))
        && types.contains(&Some("string"))
    {
        out.insert("x-kubernetes-int-or-string".into(), json!(true));
    } else {
        out.insert("x-kubernetes-preserve-unknown-fields".into(), json!(true));
    }
    if nullable {
        out.insert("nullable".into(), json!(true));
    }
    out
}

/// The Kubernetes CustomResourceDefinition, as a value.
pub fn crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("flowerclusters.{GROUP}")},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": "FlowerClusterList",
                "plural": "flowerclusters",
                "singular": "flowercluster",
                "shortNames": ["fc"],
            },
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.supernodes.count"},
                    {"name": "Flower", "type": "string", "jsonPath": ".spec.flowerVersion"},
                    {"name": "Service", "type": "integer", "jsonPath": ".status.serviceId"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A Flower federated-learning cluster on OpenNebula.",
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": structural::<FlowerClusterSpec>(),
                        "status": structural::<FlowerClusterStatus>(),
                    },
                    "required": ["spec"],
                }},
            }],
        },
    })
}

/// The CRD text as checked in.
pub fn crd_text() -> String {
    let body = serde_norway::to_string(&crd()).unwrap_or_default();
    format!("# Generated by `flower-reconcile schema` from src/api/types.rs; do not edit.\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk<'a>(v: &'a Value, out: &mut Vec<&'a Map<String, Value>>) {
        match v {
            Value::Object(o) => {
                out.push(o);
                o.values().for_each(|c| walk(c, out));
            }
            Value::Array(a) => a.iter().for_each(|c| walk(c, out)),
            _ => {}
        }
    }

    #[test]
    fn the_crd_schema_is_structural() {
        let crd = crd();
        let mut nodes = Vec::new();
        walk(&crd, &mut nodes);
        for o in nodes {
            assert!(
                !o.contains_key("oneOf") && !o.contains_key("anyOf") && !o.contains_key("$ref"),
                "{o:?}"
            );
            assert!(
                !(o.contains_key("properties")
                    && o.get("additionalProperties") == Some(&Value::Bool(false)))
            );
        }
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["properties"]["opennebula"]["properties"]["network"]["x-kubernetes-int-or-string"],
            true
        );
        assert_eq!(
            spec["properties"]["deletionPolicy"]["enum"],
            json!(["Retain", "Delete"])
        );
    }

    #[test]
    fn the_json_schema_describes_every_top_level_field() {
        let s = json_schema();
        for k in ["apiVersion", "kind", "metadata", "spec"] {
            assert!(s["properties"].get(k).is_some(), "{k}");
        }
        assert!(s["properties"].get("status").is_none());
        assert_eq!(
            s["properties"]["spec"]["properties"]["supernodes"]["properties"]["count"]["default"],
            2
        );
    }
}
