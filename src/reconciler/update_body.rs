//! The body of an in-place update (`PUT /service/:id`): the live service body, re-read
//! right before the update, with the planned rendering's mutable parts put in. Pure.
//!
//! Guarantees: keys OneFlow refuses to change on a running service (`deployment`,
//! `ready_status_gate`, networks, inputs, a role's template, parents and cardinality)
//! keep their live values; a key the new rendering drops is dropped. When a role's new
//! `min_vms`/`max_vms` exclude its live cardinality, the bounds are widened to it and the
//! old applied-spec record is kept, so the next reconcile (after the scale) applies the
//! exact bounds (`tests::bounds_excluding_the_live_cardinality_are_widened_and_the_old_record_kept`).
//! Assumptions: the merge is made against the body as OneFlow holds it now, never an
//! observation's copy: OneFlow's own bookkeeping (nodes, cardinality) must survive.

use serde_json::{json, Value};

use crate::plan::AppliedSpec;

/// Service keys OneFlow refuses to change in `PUT /service/:id` (`Service::IMMUTABLE_ATTRS`,
/// plus the 6.x names of the inputs).
const SERVICE_IMMUTABLE: &[&str] = &[
    "name",
    "deployment",
    "ready_status_gate",
    "networks",
    "networks_values",
    "user_inputs",
    "user_inputs_values",
    "custom_attrs",
    "custom_attrs_values",
    "state",
    "start_time",
    "log",
];

/// Role keys OneFlow refuses to change (`Role::IMMUTABLE_ATTRS`, 6.x `vm_template`), or
/// keeps as its own bookkeeping.
const ROLE_KEPT: &[&str] = &[
    "name",
    "cardinality",
    "last_vmname",
    "nodes",
    "parents",
    "state",
    "template_id",
    "vm_template",
    "type",
    "scale_way",
    "on_hold",
];

/// Role keys the renderer owns: dropped when the new rendering no longer has them.
const ROLE_RENDERED: &[&str] = &[
    "min_vms",
    "max_vms",
    "cooldown",
    "shutdown_action",
    "elasticity_policies",
    "scheduled_policies",
    "template_contents",
    "vm_template_contents",
    "user_inputs",
    "user_inputs_values",
];

/// The body of a `PUT /service/:id` and whether role bounds had to be widened.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceUpdate {
    /// The full service body to send.
    pub body: Value,
    /// A role's new bounds excluded its live cardinality (the old record is kept).
    pub widened: bool,
}

/// The live service body with the rendered (mutable) parts put in: top-level keys except
/// the immutable ones, and per role (matched by name) the rendered keys except the kept
/// ones. Pure. Fails when the roles differ (a change OneFlow cannot make in place).
pub fn service_update_body(current: &Value, rendered: &Value) -> Result<ServiceUpdate, String> {
    let (Some(cur), Some(new)) = (current.as_object(), rendered.as_object()) else {
        return Err("service or rendered body is not a JSON object".into());
    };
    let mut body = cur.clone();
    for (k, v) in new {
        if k != "roles" && !SERVICE_IMMUTABLE.contains(&k.as_str()) {
            body.insert(k.clone(), v.clone());
        }
    }
    let role_name = |r: &Value| r.get("name").and_then(Value::as_str).map(str::to_string);
    let empty = Vec::new();
    let cur_roles = cur.get("roles").and_then(Value::as_array).unwrap_or(&empty);
    let new_roles = new.get("roles").and_then(Value::as_array).unwrap_or(&empty);
    let mut names: Vec<Option<String>> = cur_roles.iter().map(role_name).collect();
    let mut wanted: Vec<Option<String>> = new_roles.iter().map(role_name).collect();
    names.sort();
    wanted.sort();
    if names != wanted {
        return Err(format!(
            "the live roles {names:?} differ from the rendered roles {wanted:?}; OneFlow cannot change roles in place"
        ));
    }
    let mut widened = false;
    let mut roles = Vec::with_capacity(cur_roles.len());
    for live in cur_roles {
        let name = role_name(live);
        let Some(r) = new_roles.iter().find(|r| role_name(r) == name) else {
            continue;
        };
        let mut role = live.as_object().cloned().unwrap_or_default();
        for k in ROLE_RENDERED {
            if r.get(k).is_none() {
                role.remove(*k);
            }
        }
        for (k, v) in r.as_object().into_iter().flatten() {
            if !ROLE_KEPT.contains(&k.as_str()) {
                role.insert(k.clone(), v.clone());
            }
        }
        widened |= widen_bounds(&mut role);
        roles.push(Value::Object(role));
    }
    body.insert("roles".into(), Value::Array(roles));
    if widened {
        match cur.get(AppliedSpec::BODY_KEY) {
            Some(old) => body.insert(AppliedSpec::BODY_KEY.into(), old.clone()),
            None => body.remove(AppliedSpec::BODY_KEY),
        };
    }
    Ok(ServiceUpdate {
        body: Value::Object(body),
        widened,
    })
}

/// OneFlow validates `min_vms ≤ cardinality ≤ max_vms`; the live cardinality is
/// immutable here, so bounds that exclude it are widened to it. True when widened.
fn widen_bounds(role: &mut serde_json::Map<String, Value>) -> bool {
    let num = |v: Option<&Value>| match v? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    let Some(card) = num(role.get("cardinality")) else {
        return false;
    };
    let mut widened = false;
    if num(role.get("min_vms")).is_some_and(|m| m > card) {
        role.insert("min_vms".into(), json!(card));
        widened = true;
    }
    if num(role.get("max_vms")).is_some_and(|m| m < card) {
        role.insert("max_vms".into(), json!(card));
        widened = true;
    }
    widened
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> Value {
        json!({
            "name": "alpha", "deployment": "straight", "ready_status_gate": true,
            "state": 2, "start_time": 1700000000, "log": [{"message": "RUNNING"}],
            "flower_reconcile": {"cluster": "alpha", "spec_hash": "old", "controller": "c", "format": 1},
            AppliedSpec::BODY_KEY: {"format": 1, "fields": {"spec.supernodes.memory": "1024"}},
            "roles": [
                {"name": "superlink", "type": "vm", "template_id": 3, "cardinality": 1,
                 "state": 2, "nodes": [{"deploy_id": 7}], "last_vmname": 1,
                 "min_vms": 1, "max_vms": 1, "template_contents": {"MEMORY": "1024"}},
                {"name": "supernode", "type": "vm", "template_id": 4, "cardinality": 3,
                 "state": 2, "nodes": [{"deploy_id": 8}, {"deploy_id": 9}, {"deploy_id": 10}],
                 "last_vmname": 3, "parents": ["superlink"], "cooldown": 300,
                 "min_vms": 1, "max_vms": 4, "template_contents": {"MEMORY": "1024"}}
            ]
        })
    }

    fn rendered(min: u64, max: u64) -> Value {
        json!({
            "name": "alpha", "deployment": "none", "ready_status_gate": false,
            "flower_reconcile": {"cluster": "alpha", "spec_hash": "new", "controller": "c", "format": 1},
            AppliedSpec::BODY_KEY: {"format": 1, "fields": {"spec.supernodes.memory": "2048"}},
            "roles": [
                {"name": "superlink", "type": "vm", "template_id": 3, "cardinality": 1,
                 "min_vms": 1, "max_vms": 1, "template_contents": {"MEMORY": "2048"}},
                {"name": "supernode", "type": "vm", "template_id": 4, "cardinality": 2,
                 "parents": ["superlink"], "min_vms": min, "max_vms": max,
                 "template_contents": {"MEMORY": "2048"}}
            ]
        })
    }

    #[test]
    fn update_keeps_immutable_keys_and_takes_the_rendered_role_contents() {
        let cur = live();
        let up = service_update_body(&cur, &rendered(1, 8)).unwrap();
        assert!(!up.widened);
        let b = &up.body;
        for k in SERVICE_IMMUTABLE {
            assert_eq!(
                b.get(*k),
                cur.get(*k),
                "service key {k} must stay as it is live"
            );
        }
        assert_eq!(b["flower_reconcile"]["spec_hash"], "new");
        assert_eq!(
            b[AppliedSpec::BODY_KEY]["fields"]["spec.supernodes.memory"],
            "2048"
        );
        let node = &b["roles"][1];
        for k in [
            "cardinality",
            "nodes",
            "last_vmname",
            "state",
            "template_id",
            "parents",
        ] {
            assert_eq!(
                node[k], cur["roles"][1][k],
                "role key {k} must stay as it is live"
            );
        }
        assert_eq!(node["template_contents"]["MEMORY"], "2048");
        assert_eq!(node["max_vms"], 8);
        assert!(
            node.get("cooldown").is_none(),
            "a rendered key the new rendering drops is dropped"
        );
    }

    #[test]
    fn bounds_excluding_the_live_cardinality_are_widened_and_the_old_record_kept() {
        let cur = live();
        // Live cardinality 3; the spec now says max 2 (the scale down comes after).
        let up = service_update_body(&cur, &rendered(1, 2)).unwrap();
        assert!(up.widened);
        assert_eq!(up.body["roles"][1]["max_vms"], 3);
        assert_eq!(
            up.body[AppliedSpec::BODY_KEY],
            cur[AppliedSpec::BODY_KEY],
            "the next reconcile must see the spec as not yet applied"
        );
    }

    #[test]
    fn different_roles_cannot_be_updated_in_place() {
        let mut r = rendered(1, 4);
        r["roles"][1]["name"] = json!("worker");
        let err = service_update_body(&live(), &r).unwrap_err();
        assert!(err.contains("roles"), "{err}");
    }
}
