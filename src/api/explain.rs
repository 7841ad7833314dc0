//! `kubectl explain`-style field documentation, read from the generated JSON Schema
//! (whose descriptions are the doc comments of the types).

use serde_json::Value;

use super::schema::json_schema;

/// What `explain` shows about one field.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FieldDoc {
    /// Field path, e.g. `spec.supernodes.gpu`.
    pub path: String,
    /// Type, e.g. `object`, `integer`, `string (one of: auto, provided)`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Default value, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    /// Description (the doc comment).
    pub description: String,
    /// Whether the field must be given.
    pub required: bool,
    /// Child fields: (name, type, first sentence of the description).
    pub fields: Vec<ChildDoc>,
}

/// One child field in a [`FieldDoc`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChildDoc {
    /// Name.
    pub name: String,
    /// Type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Required?
    pub required: bool,
    /// Description.
    pub description: String,
}

/// The schema node that actually holds properties/items (unwraps nullable unions).
pub(crate) fn concrete(node: &Value) -> &Value {
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(bs)) = node.get(key) {
            let non_null: Vec<&Value> = bs
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) != Some("null"))
                .collect();
            if let [only] = non_null.as_slice() {
                return only;
            }
        }
    }
    node
}

/// A short type name of a schema node.
pub fn type_name(node: &Value) -> String {
    let n = concrete(node);
    if let Some(Value::Array(bs)) = n.get("oneOf").or_else(|| n.get("anyOf")) {
        let consts: Vec<String> = bs
            .iter()
            .filter_map(|b| {
                b.get("const")
                    .or_else(|| b.get("enum").and_then(|e| e.get(0)))
            })
            .map(|c| c.as_str().map_or(c.to_string(), str::to_string))
            .collect();
        if consts.len() == bs.len() {
            return format!("string (one of: {})", consts.join(", "));
        }
        let parts: Vec<String> = bs.iter().map(type_name).collect();
        return parts.join(" | ");
    }
    if let Some(Value::Array(e)) = n.get("enum") {
        let vals: Vec<String> = e
            .iter()
            .map(|c| c.as_str().map_or(c.to_string(), str::to_string))
            .collect();
        return format!("string (one of: {})", vals.join(", "));
    }
    if let Some(c) = n.get("const") {
        return format!("string (always {c})");
    }
    let t = match n.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" | "),
        _ => "any".into(),
    };
    match t.as_str() {
        "array" => format!("[]{}", n.get("items").map_or("any".into(), type_name)),
        "object" if n.get("properties").is_none() => match n.get("additionalProperties") {
            Some(v @ Value::Object(_)) => format!("map[string]{}", type_name(v)),
            _ => "object".into(),
        },
        _ => t,
    }
}

fn description(node: &Value) -> String {
    node.get("description")
        .or_else(|| concrete(node).get("description"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn first_sentence(s: &str) -> String {
    let one_line = s.replace('\n', " ");
    match one_line.find(". ") {
        Some(i) => one_line[..=i].to_string(),
        None => one_line,
    }
}

fn children(node: &Value) -> Vec<ChildDoc> {
    let n = concrete(node);
    let props = n
        .get("properties")
        .or_else(|| {
            n.get("items")
                .map(concrete)
                .and_then(|i| i.get("properties"))
        })
        .and_then(Value::as_object);
    let required: Vec<&str> = n
        .get("required")
        .or_else(|| n.get("items").map(concrete).and_then(|i| i.get("required")))
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    props
        .map(|p| {
            p.iter()
                .map(|(k, v)| ChildDoc {
                    name: k.clone(),
                    kind: type_name(v),
                    required: required.contains(&k.as_str()),
                    description: first_sentence(&description(v)),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The schema of field `key` of the object schema `node`, and whether `node` requires it.
pub(crate) fn field<'a>(node: &'a Value, key: &str) -> Option<(&'a Value, bool)> {
    let child = node.get("properties")?.get(key)?;
    let required = node
        .get("required")
        .and_then(Value::as_array)
        .is_some_and(|r| r.iter().any(|x| x.as_str() == Some(key)));
    Some((child, required))
}

/// Documentation of the field at `path` (`spec.tls`, `spec.supernodes.elasticity.policies`),
/// or an error naming the first unknown segment and the fields available there.
pub fn explain(path: &str) -> Result<FieldDoc, String> {
    let schema = json_schema();
    let trimmed = path
        .trim()
        .trim_start_matches("FlowerCluster")
        .trim_start_matches("flowercluster")
        .trim_start_matches('.');
    let mut node = &schema;
    let mut required = true;
    let mut walked = Vec::new();
    for seg in trimmed.split('.').filter(|s| !s.is_empty()) {
        let seg = seg.split('[').next().unwrap_or(seg);
        let mut n = concrete(node);
        if n.get("properties").is_none() {
            if let Some(items) = n.get("items") {
                n = concrete(items);
            }
        }
        let Some((child, is_required)) = field(n, seg) else {
            let available: Vec<String> = children(node).into_iter().map(|c| c.name).collect();
            let best = available
                .iter()
                .map(|a| (strsim::jaro_winkler(seg, a), a))
                .filter(|(s, _)| *s >= 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, a)| format!("; did you mean `{a}`?"))
                .unwrap_or_default();
            let at = if walked.is_empty() {
                "FlowerCluster".to_string()
            } else {
                walked.join(".")
            };
            return Err(format!(
                "`{at}` has no field `{seg}`{best} (fields: {})",
                available.join(", ")
            ));
        };
        required = is_required;
        walked.push(seg.to_string());
        node = child;
    }
    Ok(FieldDoc {
        path: if walked.is_empty() {
            "FlowerCluster".into()
        } else {
            walked.join(".")
        },
        kind: type_name(node),
        default: node.get("default").cloned(),
        description: description(node),
        required,
        fields: children(node),
    })
}

impl FieldDoc {
    /// kubectl-explain style text.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "FIELD:    {} <{}>{}\n",
            self.path,
            self.kind,
            if self.required { " -required-" } else { "" }
        );
        if let Some(d) = self.default.as_ref().filter(|d| !d.is_object()) {
            s.push_str(&format!("DEFAULT:  {d}\n"));
        }
        s.push_str("\nDESCRIPTION:\n");
        for line in self.description.lines() {
            s.push_str(&format!("    {line}\n"));
        }
        if !self.fields.is_empty() {
            s.push_str("\nFIELDS:\n");
            for c in &self.fields {
                s.push_str(&format!(
                    "  {}\t<{}>{}\n    {}\n\n",
                    c.name,
                    c.kind,
                    if c.required { " -required-" } else { "" },
                    c.description
                ));
            }
        }
        s
    }
}

/// The Markdown field reference (`docs/flowercluster-reference.md`): one table per object.
pub fn reference_markdown() -> String {
    let mut out = String::from(
        "# FlowerCluster reference\n\n<!-- Generated by `flower-reconcile schema` from the doc comments in src/api/types.rs; do not edit. -->\n\n\
         `apiVersion: flower.opennebula.io/v1alpha1`, `kind: FlowerCluster`. Look up one field from the command line with\n\
         `flower-reconcile explain spec.supernodes.gpu`.\n",
    );
    out.push_str(&format!(
        "\nLimits of a spec file: at most {} KiB (a spec is a few KiB) and {} documents; flow \
         collections (`[ ]`, `{{ }}`) nested at most {} deep. TLS files named by \
         `tls.provided.*.file` must lie inside the spec directory, symbolic links are not \
         followed, and symlinked spec files are skipped.\n",
        super::load::MAX_FILE_BYTES / 1024,
        super::load::MAX_DOCUMENTS,
        super::load::MAX_FLOW_DEPTH
    ));
    let mut queue = vec!["metadata".to_string(), "spec".to_string()];
    while let Some(path) = queue.first().cloned() {
        queue.remove(0);
        let Ok(doc) = explain(&path) else { continue };
        if doc.fields.is_empty() {
            continue;
        }
        out.push_str(&format!(
            "\n## `{}`\n\n{}\n\n",
            doc.path,
            doc.description.replace('\n', " ")
        ));
        out.push_str("| Field | Type | Default | Description |\n|---|---|---|---|\n");
        let mut nested = Vec::new();
        for c in &doc.fields {
            let child = explain(&format!("{path}.{}", c.name)).ok();
            let default = child
                .as_ref()
                .and_then(|d| d.default.as_ref())
                .filter(|d| !d.is_object())
                .map(|d| format!("`{d}`"))
                .unwrap_or_else(|| {
                    if c.required {
                        "required".into()
                    } else {
                        String::new()
                    }
                });
            let desc = child
                .as_ref()
                .map_or(c.description.clone(), |d| d.description.replace('\n', " "));
            out.push_str(&format!(
                "| `{}` | {} | {} | {} |\n",
                c.name,
                c.kind.replace('|', "\\|"),
                default,
                desc.replace('|', "\\|")
            ));
            if child.is_some_and(|d| !d.fields.is_empty()) {
                nested.push(format!("{path}.{}", c.name));
            }
        }
        queue.splice(0..0, nested);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_fields_with_type_default_and_children() {
        let d = explain("spec.supernodes.gpu").unwrap();
        assert_eq!(d.kind, "object");
        assert!(d.description.contains("GPU"));
        assert!(d
            .fields
            .iter()
            .any(|c| c.name == "memoryFraction" && c.kind == "number"));
        let c = explain("spec.supernodes.count").unwrap();
        assert_eq!(c.default, Some(serde_json::json!(2)));
        assert_eq!(
            explain("spec.tls.mode").unwrap().kind,
            "string (one of: auto, provided)"
        );
        let p = explain("spec.supernodes.elasticity.policies").unwrap();
        assert!(
            p.fields
                .iter()
                .any(|c| c.name == "expression" && c.required),
            "{p:?}"
        );
        assert!(explain("spec.opennebula").unwrap().required);
    }

    #[test]
    fn unknown_fields_suggest_the_near_one() {
        let e = explain("spec.supernodes.cuont").unwrap_err();
        assert!(e.contains("did you mean `count`"), "{e}");
    }

    #[test]
    fn the_reference_covers_nested_objects() {
        let md = reference_markdown();
        for h in [
            "## `spec`",
            "## `spec.supernodes.gpu`",
            "## `spec.tls.provided`",
            "## `spec.supernodes.elasticity.policies`",
        ] {
            assert!(md.contains(h), "missing {h}");
        }
    }
}
