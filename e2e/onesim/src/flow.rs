//! OneFlow: the REST server (HTTP Basic, JSON, DOCUMENT wrapper, plain-text errors, inverted
//! 401/403) and the service engine (lifecycle 0 → 11 → 1 → 2, straight deployment, ready gate,
//! scale with cooldown, watchdog, recover, undeploy children-first). Services are documents of
//! TYPE 100, service templates TYPE 101.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State as AxState;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::state::{
    epoch_s, is_failure, now_ms, Doc, Op, State, L_UNKNOWN, S_ACTIVE, S_DONE, S_POWEROFF,
};
use crate::template::{json_scalar, vec_set, Template, Val};
use crate::Sim;

pub const SERVICE: i64 = 100;
pub const TEMPLATE: i64 = 101;

// Service states.
pub const PENDING: i64 = 0;
pub const DEPLOYING: i64 = 1;
pub const RUNNING: i64 = 2;
pub const UNDEPLOYING: i64 = 3;
pub const WARNING: i64 = 4;
pub const FAILED_UNDEPLOYING: i64 = 6;
pub const FAILED_DEPLOYING: i64 = 7;
pub const SCALING: i64 = 8;
pub const FAILED_SCALING: i64 = 9;
pub const COOLDOWN: i64 = 10;
pub const DEPLOYING_NETS: i64 = 11;
pub const UNDEPLOYING_NETS: i64 = 12;
pub const HOLD: i64 = 15;
// Role states differing from the service's.
pub const ROLE_DONE: i64 = 5;
pub const ROLE_HOLD: i64 = 11;

const SERVICE_STATE_NAMES: [&str; 16] = [
    "PENDING",
    "DEPLOYING",
    "RUNNING",
    "UNDEPLOYING",
    "WARNING",
    "DONE",
    "FAILED_UNDEPLOYING",
    "FAILED_DEPLOYING",
    "SCALING",
    "FAILED_SCALING",
    "COOLDOWN",
    "DEPLOYING_NETS",
    "UNDEPLOYING_NETS",
    "FAILED_DEPLOYING_NETS",
    "FAILED_UNDEPLOYING_NETS",
    "HOLD",
];

const VM_BATCH_ACTIONS: &[&str] = &[
    "terminate",
    "terminate-hard",
    "undeploy",
    "undeploy-hard",
    "hold",
    "release",
    "stop",
    "suspend",
    "resume",
    "reboot",
    "reboot-hard",
    "poweroff",
    "poweroff-hard",
    "snapshot-create",
    "snapshot-revert",
    "snapshot-delete",
    "disk-snapshot-create",
    "disk-snapshot-revert",
    "disk-snapshot-delete",
];

/// An HTTP error with OneFlow's plain-text body.
#[derive(Debug)]
pub struct FlowErr(pub u16, pub String);

fn fe(code: u16, msg: impl Into<String>) -> FlowErr {
    FlowErr(code, msg.into())
}

type FR<T> = Result<T, FlowErr>;

// ---------------------------------------------------------------- validation

fn to_int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Validates a service template body in place (numeric strings → integers, defaults added).
pub fn validate(body: &mut Value) -> FR<()> {
    let obj = body
        .as_object_mut()
        .ok_or_else(|| fe(400, "Service template must be a JSON object"))?;
    match obj.get("name") {
        Some(Value::String(_)) => {}
        Some(_) => return Err(fe(400, "Key 'name' must be a string")),
        None => {
            return Err(fe(
                400,
                "Mandatory document key 'name (string)' is missing from service template",
            ))
        }
    }
    for k in ["ready_status_gate", "automatic_deletion", "on_hold"] {
        if obj.get(k).is_some_and(|v| !v.is_boolean()) {
            return Err(fe(400, format!("Key '{k}' must be a boolean")));
        }
    }
    match obj.get("deployment").and_then(Value::as_str) {
        None if obj.contains_key("deployment") => {
            return Err(fe(400, "Key 'deployment' must be a string"))
        }
        Some(d) if d != "none" && d != "straight" => {
            return Err(fe(
                400,
                format!("Key 'deployment' must be one of none, straight, not '{d}'"),
            ))
        }
        _ => {}
    }
    if let Some(s) = obj.get("shutdown_action").and_then(Value::as_str) {
        if !["terminate", "terminate-hard", "shutdown", "shutdown-hard"].contains(&s) {
            return Err(fe(
                400,
                format!("Key 'shutdown_action' has an invalid value '{s}'"),
            ));
        }
    }
    if !obj.contains_key("description") {
        obj.insert("description".into(), json!(""));
    }
    if !obj.contains_key("deployment") {
        obj.insert("deployment".into(), json!("none"));
    }
    let roles = match obj.get_mut("roles") {
        Some(Value::Array(r)) => r,
        Some(_) => return Err(fe(400, "Key 'roles' must be an array")),
        None => {
            return Err(fe(
                400,
                "Mandatory document key 'roles (array)' is missing from service template",
            ))
        }
    };
    let mut names: Vec<String> = Vec::new();
    for (i, r) in roles.iter_mut().enumerate() {
        let r = r
            .as_object_mut()
            .ok_or_else(|| fe(400, format!("Role {i} must be a JSON object")))?;
        let name = match r.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => {
                return Err(fe(
                    400,
                    format!("Mandatory document key 'name (string)' is missing from role {i}"),
                ))
            }
        };
        if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
            return Err(fe(
                400,
                format!("Role name '{name}' does not match regular expression ^\\w+$"),
            ));
        }
        if names.contains(&name) {
            return Err(fe(400, format!("Role name '{name}' is repeated")));
        }
        if let Some(t) = r.get("type").and_then(Value::as_str) {
            if t != "vm" {
                return Err(fe(
                    400,
                    format!("Role '{name}': type '{t}' is not supported by onesim (only vm)"),
                ));
            }
        }
        let tkey = if r.contains_key("template_id") {
            "template_id"
        } else if r.contains_key("vm_template") {
            "vm_template"
        } else {
            return Err(fe(
                400,
                format!(
                    "Mandatory document key 'template_id (integer)' is missing from role '{name}'"
                ),
            ));
        };
        let tid = to_int(&r[tkey]).ok_or_else(|| {
            fe(
                400,
                format!("Role '{name}': key '{tkey}' must be an integer"),
            )
        })?;
        r.insert(tkey.into(), json!(tid));
        for k in ["cardinality", "min_vms", "max_vms", "cooldown"] {
            if let Some(v) = r.get(k) {
                let n = to_int(v).filter(|n| *n >= 0).ok_or_else(|| {
                    fe(
                        400,
                        format!("Role '{name}': key '{k}' must be a non-negative integer"),
                    )
                })?;
                r.insert(k.into(), json!(n));
            }
        }
        let card = r.get("cardinality").and_then(Value::as_i64).unwrap_or(0);
        r.insert("cardinality".into(), json!(card));
        if let Some(min) = r.get("min_vms").and_then(Value::as_i64) {
            if card < min {
                return Err(fe(
                    400,
                    format!("Role '{name}': cardinality {card} is lower than min_vms {min}"),
                ));
            }
        }
        if let Some(max) = r.get("max_vms").and_then(Value::as_i64) {
            if card > max {
                return Err(fe(
                    400,
                    format!("Role '{name}': cardinality {card} is greater than max_vms {max}"),
                ));
            }
        }
        crate::elastic::validate_role(&name, r).map_err(|e| fe(400, e))?;
        if r.get("on_hold").is_some_and(|v| !v.is_boolean()) {
            return Err(fe(
                400,
                format!("Role '{name}': key 'on_hold' must be a boolean"),
            ));
        }
        if let Some(tc) = r.get("template_contents") {
            if !tc.is_object() {
                return Err(fe(
                    400,
                    format!("Role '{name}': key 'template_contents' must be an object"),
                ));
            }
        }
        if let Some(tc) = r.get("vm_template_contents") {
            if !tc.is_string() {
                return Err(fe(
                    400,
                    format!("Role '{name}': key 'vm_template_contents' must be a string"),
                ));
            }
        }
        names.push(name);
    }
    for r in roles.iter() {
        if let Some(ps) = r.get("parents") {
            let ps = ps
                .as_array()
                .ok_or_else(|| fe(400, "Key 'parents' must be an array"))?;
            for p in ps {
                let p = p
                    .as_str()
                    .ok_or_else(|| fe(400, "Parents must be role names"))?;
                if !names.iter().any(|n| n == p) {
                    return Err(fe(
                        400,
                        format!(
                            "Parent role '{p}' of role '{}' does not exist",
                            r["name"].as_str().unwrap_or("")
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `Hash#deep_merge` as OneFlow uses it: objects merge recursively, other values replace.
/// Transient and failed service states, in which OneFlow refuses `PUT /service/:id`.
const SERVICE_NO_UPDATE_STATES: [i64; 11] = [1, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14];

/// `Service::IMMUTABLE_ATTRS` (7.x).
const SERVICE_IMMUTABLE: [&str; 10] = [
    "user_inputs",
    "user_inputs_values",
    "deployment",
    "log",
    "name",
    "networks",
    "networks_values",
    "ready_status_gate",
    "state",
    "start_time",
];

/// `Role::IMMUTABLE_ATTRS` (7.x; `vm_template` for 6.x bodies).
const ROLE_IMMUTABLE: [&str; 7] = [
    "cardinality",
    "last_vmname",
    "nodes",
    "parents",
    "state",
    "template_id",
    "vm_template",
];

fn service_state_name(state: i64) -> &'static str {
    usize::try_from(state)
        .ok()
        .and_then(|i| SERVICE_STATE_NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// `Service#check_new_template`: same roles (by name), immutable keys unchanged; with
/// append, immutable keys must be absent.
fn check_service_update(cur: &Value, new: &Value, append: bool) -> FR<()> {
    let immutable = |attr: &str| {
        if attr == "name" {
            fe(500, "To change `service/name` use rename operation")
        } else {
            fe(500, format!("Immutable value: `{attr}` can not be changed"))
        }
    };
    if append {
        if let Some(k) = SERVICE_IMMUTABLE.iter().find(|k| new.get(**k).is_some()) {
            return Err(immutable(&format!("service/{k}")));
        }
        return Ok(());
    }
    let empty = Vec::new();
    let cur_roles = cur["roles"].as_array().unwrap_or(&empty);
    let new_roles = new["roles"].as_array().unwrap_or(&empty);
    if cur_roles.len() != new_roles.len() {
        return Err(immutable("service/roles size"));
    }
    if let Some(k) = SERVICE_IMMUTABLE
        .iter()
        .find(|k| cur.get(**k) != new.get(**k))
    {
        return Err(immutable(&format!("service/{k}")));
    }
    for role in new_roles {
        let live = cur_roles
            .iter()
            .find(|r| r.get("name") == role.get("name"))
            .ok_or_else(|| immutable("name"))?;
        if let Some(k) = ROLE_IMMUTABLE
            .iter()
            .find(|k| live.get(**k) != role.get(**k))
        {
            return Err(immutable(&format!("role/{k}")));
        }
    }
    Ok(())
}

fn deep_merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(bv) if bv.is_object() && v.is_object() => deep_merge(bv, v),
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

/// Merges `merge_template` into a template body: 7.x matches roles by name, 6.x by index.
pub fn merge_template(body: &mut Value, merge: &Value) -> FR<()> {
    let Some(m) = merge.as_object() else {
        return Err(fe(400, "merge_template must be a JSON object"));
    };
    let mut m = m.clone();
    let roles_over = m.remove("roles");
    // 6.x names, still accepted by 7.x.
    if let Some(v) = m.remove("custom_attrs_values") {
        m.entry("user_inputs_values").or_insert(v);
    }
    deep_merge(body, &Value::Object(m));
    if let (Some(Value::Array(over)), Some(Value::Array(roles))) =
        (roles_over, body.get_mut("roles"))
    {
        let six = roles.iter().any(|r| r.get("vm_template").is_some());
        for (i, o) in over.iter().enumerate() {
            let target = if six {
                roles.get_mut(i)
            } else {
                let name = o.get("name").and_then(Value::as_str);
                roles
                    .iter_mut()
                    .find(|r| r.get("name").and_then(Value::as_str) == name)
            };
            match target {
                Some(t) => deep_merge(t, o),
                None if six => roles.push(o.clone()),
                None => {}
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- JSON views

fn doc_json(d: &Doc) -> Value {
    let f = d.own.perm_flags();
    let p = |i: usize| json!(f[i].to_string());
    json!({"DOCUMENT": {
        "ID": d.id.to_string(), "UID": d.own.uid.to_string(), "GID": d.own.gid.to_string(),
        "UNAME": d.own.uname, "GNAME": d.own.gname, "NAME": d.name, "TYPE": d.doc_type.to_string(),
        "PERMISSIONS": {"OWNER_U": p(0), "OWNER_M": p(1), "OWNER_A": p(2), "GROUP_U": p(3), "GROUP_M": p(4),
                        "GROUP_A": p(5), "OTHER_U": p(6), "OTHER_M": p(7), "OTHER_A": p(8)},
        "TEMPLATE": {"BODY": d.body}
    }})
}

fn pool_json(st: &State, ty: i64, uid: i64) -> Value {
    let docs: Vec<Value> = st
        .docs
        .values()
        .filter(|d| d.doc_type == ty && st.visible(uid, -2, &d.own))
        .map(|d| doc_json(d)["DOCUMENT"].clone())
        .collect();
    if docs.is_empty() {
        json!({"DOCUMENT_POOL": {}})
    } else {
        json!({"DOCUMENT_POOL": {"DOCUMENT": docs}})
    }
}

/// The document, when `uid` may read it; [`get_doc_to`] for a change.
fn get_doc(st: &State, id: i64, ty: i64, uid: i64) -> FR<&Doc> {
    get_doc_to(st, id, ty, uid, Op::Use)
}

/// The document, when `uid` may do `op` on it (oned's document authorization).
fn get_doc_to(st: &State, id: i64, ty: i64, uid: i64, op: Op) -> FR<&Doc> {
    let d = st
        .docs
        .get(&id)
        .filter(|d| d.doc_type == ty)
        .ok_or_else(|| fe(404, format!("Error getting document [{id}].")))?;
    if !st.may(uid, &d.own, op) {
        return Err(fe(
            401,
            format!("User [{uid}] not authorized to perform action on document."),
        ));
    }
    Ok(d)
}

fn push_log(body: &mut Value, sev: &str, msg: impl Into<String>) {
    if !body.get("log").is_some_and(Value::is_array) {
        body["log"] = json!([]);
    }
    if let Some(log) = body["log"].as_array_mut() {
        log.push(json!({"timestamp": epoch_s(), "severity": sev, "message": msg.into()}));
        if log.len() > 50 {
            let n = log.len() - 50;
            log.drain(..n);
        }
    }
}

fn state_of(v: &Value) -> i64 {
    v.get("state").and_then(Value::as_i64).unwrap_or(0)
}

fn set_service_state(body: &mut Value, s: i64) {
    if state_of(body) != s {
        body["state"] = json!(s);
        push_log(
            body,
            "I",
            format!(
                "New state: {}",
                SERVICE_STATE_NAMES.get(s as usize).unwrap_or(&"?")
            ),
        );
    }
}

fn role_name(r: &Value) -> String {
    r.get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn node_ids(r: &Value) -> Vec<i64> {
    r.get("nodes")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|n| n.get("deploy_id").and_then(Value::as_i64))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- engine

#[derive(Debug, PartialEq, Clone, Copy)]
enum NodeSt {
    Gone,
    Failed,
    Warn,
    Running,
    Ready,
    Busy,
}

fn node_st(st: &State, id: i64, gate: bool) -> NodeSt {
    let Some(vm) = st.vms.get(&id) else {
        return NodeSt::Gone;
    };
    if vm.state == S_DONE {
        NodeSt::Gone
    } else if is_failure(vm.state, vm.lcm) {
        NodeSt::Failed
    } else if vm.state == S_POWEROFF || (vm.state == S_ACTIVE && vm.lcm == L_UNKNOWN) {
        NodeSt::Warn
    } else if vm.is_running() {
        let ready = vm
            .user_template
            .get("READY")
            .is_some_and(|r| r.trim() == "YES");
        if !gate || ready {
            NodeSt::Ready
        } else {
            NodeSt::Running
        }
    } else {
        NodeSt::Busy
    }
}

/// Instantiates one VM for a role and appends its node. Errors are the oned message.
fn create_node(st: &mut State, sid: i64, svc: &Value, ri: usize, uid: i64) -> Result<i64, String> {
    let role = &svc["roles"][ri];
    let rname = role_name(role);
    let tid = role
        .get("template_id")
        .or_else(|| role.get("vm_template"))
        .and_then(Value::as_i64)
        .unwrap_or(-1);
    let tmpl = st
        .templates
        .get(&tid)
        .ok_or_else(|| format!("Error getting virtual machine template [{tid}]."))?;
    let mut t = tmpl.template.clone();
    let nets = network_ids(svc);
    let resolve = |s: &str| -> String {
        let mut out = s.to_string();
        for (n, id) in &nets {
            out = out.replace(&format!("${n}"), id);
        }
        out
    };
    if let Some(tc) = role.get("template_contents") {
        // Deep merge: a single vector over a single vector merges sub-keys, anything else
        // replaces every same-named attribute.
        let over = Template::from_json(tc)?;
        let mut names: Vec<&str> = over.attrs.iter().map(|a| a.name.as_str()).collect();
        names.dedup();
        for name in names {
            let new: Vec<_> = over.attrs.iter().filter(|a| a.name == name).collect();
            let cur = t.attrs.iter().filter(|a| a.name == name).count();
            if let ([one], 1, Some(cur_v)) = (new.as_slice(), cur, t.get_vec_mut(name)) {
                if let Val::V(nv) = &one.val {
                    for (k, v) in nv {
                        vec_set(cur_v, k, v);
                    }
                    continue;
                }
            }
            t.remove(name);
            for a in new {
                t.push(a.clone());
            }
        }
    }
    if let Some(s) = role.get("vm_template_contents").and_then(Value::as_str) {
        let over =
            Template::parse(&resolve(s)).map_err(|e| format!("vm_template_contents: {e}"))?;
        t.merge(&over);
    }
    // Network placeholders in NICs.
    for a in t.attrs.iter_mut() {
        if let Val::V(v) = &mut a.val {
            for (_, x) in v.iter_mut() {
                if x.starts_with('$') {
                    *x = resolve(x);
                }
            }
        }
    }
    // User inputs: KEY=value and CONTEXT/KEY.
    let mut inputs: Vec<(String, String)> = Vec::new();
    for src in [
        svc.get("user_inputs_values"),
        role.get("user_inputs_values"),
        role.get("custom_attrs_values"),
    ] {
        if let Some(Value::Object(m)) = src {
            for (k, v) in m {
                inputs.retain(|(x, _)| x != k);
                inputs.push((k.clone(), json_scalar(v)));
            }
        }
    }
    for (k, v) in &inputs {
        t.set(&k.to_ascii_uppercase(), v);
        if let Some(ctx) = t.get_vec_mut("CONTEXT") {
            vec_set(ctx, &k.to_ascii_uppercase(), v);
        }
    }
    t.set("SERVICE_ID", &sid.to_string());
    t.set("ROLE_NAME", &rname);
    let n = role.get("last_vmname").and_then(Value::as_i64).unwrap_or(0);
    let name = format!("{rname}_{n}_(service_{sid})");
    let hold = role
        .get("on_hold")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || svc.get("on_hold").and_then(Value::as_bool).unwrap_or(false);
    st.instantiate(tid, &name, hold, &t.to_text(), uid)
        .map_err(|e| e.msg)
}

/// Network name → vnet id from `networks_values`, else the spec default `id:N`.
fn network_ids(svc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(Value::Object(nets)) = svc.get("networks") {
        for (name, spec) in nets {
            let def = spec
                .as_str()
                .and_then(|s| s.split('|').nth(4))
                .and_then(|d| d.strip_prefix("id:"))
                .map(str::to_string);
            if let Some(d) = def {
                out.push((name.clone(), d));
            }
        }
    }
    if let Some(Value::Array(vals)) = svc.get("networks_values") {
        for v in vals {
            if let Some(m) = v.as_object() {
                for (name, x) in m {
                    if let Some(id) = x.get("id") {
                        out.retain(|(n, _)| n != name);
                        out.push((name.clone(), json_scalar(id)));
                    }
                }
            }
        }
    }
    // Longest names first so `$net10` is not hit by `$net1`.
    out.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    out
}

fn add_nodes(
    st: &mut State,
    sid: i64,
    svc: &mut Value,
    ri: usize,
    count: i64,
    uid: i64,
) -> Result<(), String> {
    for _ in 0..count.max(0) {
        let id = create_node(st, sid, svc, ri, uid)?;
        let vm = &st.vms[&id];
        let node = json!({"deploy_id": id, "vm_info": {"VM": {
            "ID": id.to_string(), "UID": vm.own.uid.to_string(), "GID": vm.own.gid.to_string(),
            "UNAME": vm.own.uname, "GNAME": vm.own.gname, "NAME": vm.name}}});
        let role = &mut svc["roles"][ri];
        let n = role.get("last_vmname").and_then(Value::as_i64).unwrap_or(0);
        role["last_vmname"] = json!(n + 1);
        if !role.get("nodes").is_some_and(Value::is_array) {
            role["nodes"] = json!([]);
        }
        if let Some(a) = role["nodes"].as_array_mut() {
            a.push(node);
        }
    }
    Ok(())
}

fn terminate(st: &mut State, id: i64, action: &str) {
    if st.vm_action(action, id).is_err() && st.vm_action("terminate-hard", id).is_err() {
        let _ = st.vm_recover(id, 3);
    }
}

fn shutdown_action(svc: &Value, role: &Value) -> &'static str {
    let a = role
        .get("shutdown_action")
        .or_else(|| svc.get("shutdown_action"))
        .and_then(Value::as_str);
    if a == Some("terminate-hard") {
        "terminate-hard"
    } else {
        "terminate"
    }
}

/// One OneFlow evaluation of every service.
pub fn step(st: &mut State, default_cooldown: Duration) {
    let ids: Vec<i64> = st
        .docs
        .values()
        .filter(|d| d.doc_type == SERVICE)
        .map(|d| d.id)
        .collect();
    for id in ids {
        let Some(doc) = st.docs.get_mut(&id) else {
            continue;
        };
        let mut body = doc.body.take();
        let uid = doc.own.uid;
        let before = body.clone();
        let keep = step_service(st, id, &mut body, uid, default_cooldown);
        if !keep {
            st.docs.remove(&id);
            st.dirty = true;
            continue;
        }
        if body != before {
            st.dirty = true;
        }
        if let Some(doc) = st.docs.get_mut(&id) {
            doc.body = body;
        }
    }
}

fn roles_len(svc: &Value) -> usize {
    svc.get("roles")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

fn step_service(
    st: &mut State,
    sid: i64,
    svc: &mut Value,
    uid: i64,
    default_cooldown: Duration,
) -> bool {
    let gate = svc
        .get("ready_status_gate")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let straight = svc.get("deployment").and_then(Value::as_str) == Some("straight");
    match state_of(svc) {
        PENDING => set_service_state(svc, DEPLOYING_NETS),
        DEPLOYING_NETS => {
            let hold = svc.get("on_hold").and_then(Value::as_bool).unwrap_or(false);
            set_service_state(svc, if hold { HOLD } else { DEPLOYING });
        }
        DEPLOYING => {
            for ri in 0..roles_len(svc) {
                let role = &svc["roles"][ri];
                if state_of(role) != PENDING {
                    continue;
                }
                if straight {
                    let parents: Vec<String> = role
                        .get("parents")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default();
                    let ready = parents.iter().all(|p| {
                        svc["roles"].as_array().is_some_and(|rs| {
                            rs.iter()
                                .any(|r| role_name(r) == *p && state_of(r) == RUNNING)
                        })
                    });
                    if !ready {
                        continue;
                    }
                }
                let want = role.get("cardinality").and_then(Value::as_i64).unwrap_or(0)
                    - node_ids(role).len() as i64;
                let name = role_name(role);
                svc["roles"][ri]["state"] = json!(DEPLOYING);
                push_log(svc, "I", format!("Role {name} deploying {want} VMs"));
                if let Err(e) = add_nodes(st, sid, svc, ri, want, uid) {
                    svc["roles"][ri]["state"] = json!(FAILED_DEPLOYING);
                    push_log(svc, "E", format!("Role {name} : {e}"));
                }
            }
            let mut failed = false;
            for ri in 0..roles_len(svc) {
                let role = &svc["roles"][ri];
                let rs = state_of(role);
                if rs == FAILED_DEPLOYING {
                    failed = true;
                    continue;
                }
                if rs != DEPLOYING {
                    continue;
                }
                let sts: Vec<NodeSt> = node_ids(role)
                    .iter()
                    .map(|&i| node_st(st, i, gate))
                    .collect();
                if sts
                    .iter()
                    .any(|s| matches!(s, NodeSt::Failed | NodeSt::Gone))
                {
                    let name = role_name(role);
                    svc["roles"][ri]["state"] = json!(FAILED_DEPLOYING);
                    push_log(svc, "E", format!("Role {name} : a VM failed to deploy"));
                    failed = true;
                } else if sts.iter().all(|s| *s == NodeSt::Ready) {
                    svc["roles"][ri]["state"] = json!(RUNNING);
                }
            }
            if failed {
                set_service_state(svc, FAILED_DEPLOYING);
            } else if svc["roles"]
                .as_array()
                .is_some_and(|rs| rs.iter().all(|r| state_of(r) == RUNNING))
            {
                set_service_state(svc, RUNNING);
            }
        }
        RUNNING | WARNING => watchdog(st, svc),
        SCALING => {
            let mut failed = false;
            let mut all_done = true;
            for ri in 0..roles_len(svc) {
                let role = &svc["roles"][ri];
                if state_of(role) != SCALING {
                    continue;
                }
                let disposed: Vec<i64> = role
                    .get("disposed_nodes")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_i64).collect())
                    .unwrap_or_default();
                let ids = node_ids(role);
                let sts: Vec<NodeSt> = ids.iter().map(|&i| node_st(st, i, gate)).collect();
                let disposed_done = disposed
                    .iter()
                    .all(|&i| node_st(st, i, false) == NodeSt::Gone);
                if sts.contains(&NodeSt::Failed) {
                    svc["roles"][ri]["state"] = json!(FAILED_SCALING);
                    failed = true;
                } else if disposed_done && sts.iter().all(|s| *s == NodeSt::Ready) {
                    let cd = role
                        .get("cooldown")
                        .and_then(Value::as_i64)
                        .map(|s| Duration::from_secs(s as u64))
                        .unwrap_or(default_cooldown);
                    let r = &mut svc["roles"][ri];
                    if let Some(o) = r.as_object_mut() {
                        o.remove("disposed_nodes");
                        o.remove("scale_way");
                    }
                    r["state"] = json!(COOLDOWN);
                    r["cooldown_end"] = json!((now_ms() + cd.as_millis() as u64) as f64 / 1000.0);
                } else {
                    all_done = false;
                }
            }
            if failed {
                set_service_state(svc, FAILED_SCALING);
            } else if all_done {
                set_service_state(svc, COOLDOWN);
            }
        }
        COOLDOWN => {
            let now = now_ms() as f64 / 1000.0;
            let mut all = true;
            for ri in 0..roles_len(svc) {
                let r = &mut svc["roles"][ri];
                if state_of(r) != COOLDOWN {
                    continue;
                }
                if r.get("cooldown_end")
                    .and_then(Value::as_f64)
                    .is_none_or(|e| e <= now)
                {
                    r["state"] = json!(RUNNING);
                    if let Some(o) = r.as_object_mut() {
                        o.remove("cooldown_end");
                    }
                } else {
                    all = false;
                }
            }
            if all {
                set_service_state(svc, RUNNING);
                watchdog(st, svc);
            }
        }
        UNDEPLOYING => {
            let names_alive: Vec<(String, Vec<String>)> = svc["roles"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .filter(|r| state_of(r) != ROLE_DONE)
                        .map(|r| {
                            (
                                role_name(r),
                                r.get("parents")
                                    .and_then(Value::as_array)
                                    .map(|a| {
                                        a.iter()
                                            .filter_map(Value::as_str)
                                            .map(str::to_string)
                                            .collect()
                                    })
                                    .unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            for ri in 0..roles_len(svc) {
                let role = &svc["roles"][ri];
                let rs = state_of(role);
                if rs == ROLE_DONE {
                    continue;
                }
                let name = role_name(role);
                if straight
                    && names_alive
                        .iter()
                        .any(|(n, ps)| *n != name && ps.contains(&name))
                {
                    continue;
                }
                let ids = node_ids(role);
                if rs != UNDEPLOYING {
                    let action = shutdown_action(svc, role);
                    for &i in &ids {
                        if node_st(st, i, false) != NodeSt::Gone {
                            terminate(st, i, action);
                        }
                    }
                    svc["roles"][ri]["state"] = json!(UNDEPLOYING);
                } else if ids.iter().all(|&i| node_st(st, i, false) == NodeSt::Gone) {
                    svc["roles"][ri]["state"] = json!(ROLE_DONE);
                    svc["roles"][ri]["nodes"] = json!([]);
                }
            }
            if svc["roles"]
                .as_array()
                .is_some_and(|rs| rs.iter().all(|r| state_of(r) == ROLE_DONE))
            {
                set_service_state(svc, UNDEPLOYING_NETS);
            }
        }
        UNDEPLOYING_NETS => return false,
        _ => {}
    }
    true
}

/// RUNNING/WARNING: VMs gone outside OneFlow leave their role (cardinality decremented);
/// POWEROFF, UNKNOWN or *_FAILURE VMs put role and service in WARNING.
fn watchdog(st: &mut State, svc: &mut Value) {
    let mut any_warn = false;
    let mut emptied = false;
    for ri in 0..roles_len(svc) {
        let role = &svc["roles"][ri];
        let rs = state_of(role);
        if rs != RUNNING && rs != WARNING {
            continue;
        }
        let ids = node_ids(role);
        let gone: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|&i| node_st(st, i, false) == NodeSt::Gone)
            .collect();
        let warn = ids
            .iter()
            .any(|&i| matches!(node_st(st, i, false), NodeSt::Failed | NodeSt::Warn));
        let name = role_name(role);
        let r = &mut svc["roles"][ri];
        if !gone.is_empty() {
            if let Some(nodes) = r["nodes"].as_array_mut() {
                nodes.retain(|n| {
                    !n.get("deploy_id")
                        .and_then(Value::as_i64)
                        .is_some_and(|i| gone.contains(&i))
                });
                emptied |= nodes.is_empty();
            }
            let card = r.get("cardinality").and_then(Value::as_i64).unwrap_or(0);
            r["cardinality"] = json!((card - gone.len() as i64).max(0));
        }
        r["state"] = json!(if warn { WARNING } else { RUNNING });
        any_warn |= warn;
        for g in gone {
            push_log(
                svc,
                "I",
                format!("Node {g} of role {name} is gone, removing it"),
            );
        }
    }
    set_service_state(svc, if any_warn { WARNING } else { RUNNING });
    if emptied
        && svc
            .get("automatic_deletion")
            .and_then(Value::as_bool)
            .unwrap_or(false)
    {
        set_service_state(svc, UNDEPLOYING);
    }
}

/// `POST /service/:id/scale` (also OneGate's `PUT /service/role/:role`).
pub fn scale(st: &mut State, sid: i64, uid: i64, role: &str, card: i64, force: bool) -> FR<()> {
    let d = get_doc_to(st, sid, SERVICE, uid, Op::Manage)?;
    let mut svc = d.body.clone();
    let s = state_of(&svc);
    if s != RUNNING {
        return Err(fe(
            500,
            format!(
                "Service cannot be scaled in state: {}",
                SERVICE_STATE_NAMES.get(s as usize).unwrap_or(&"?")
            ),
        ));
    }
    let ri = svc["roles"]
        .as_array()
        .and_then(|rs| rs.iter().position(|r| role_name(r) == role))
        .ok_or_else(|| fe(500, format!("Role '{role}' not found")))?;
    let r = &svc["roles"][ri];
    let cur = r.get("cardinality").and_then(Value::as_i64).unwrap_or(0);
    if card == cur {
        return Err(fe(
            500,
            format!("Cardinality of {role} is already at {card}"),
        ));
    }
    if card < 0 {
        return Err(fe(400, "Cardinality must be a non-negative integer"));
    }
    if !force {
        if let Some(min) = r
            .get("min_vms")
            .and_then(Value::as_i64)
            .filter(|m| card < *m)
        {
            return Err(fe(
                500,
                format!("Can't scale service {sid}: Minimum cardinality is {min}"),
            ));
        }
        if let Some(max) = r
            .get("max_vms")
            .and_then(Value::as_i64)
            .filter(|m| card > *m)
        {
            return Err(fe(
                500,
                format!("Can't scale service {sid}: Maximum cardinality is {max}"),
            ));
        }
    }
    svc["roles"][ri]["cardinality"] = json!(card);
    svc["roles"][ri]["state"] = json!(SCALING);
    // `VMRole#state=` SCALING forgets every policy's consecutive true evaluations.
    if let Some(ps) = svc["roles"][ri]
        .get_mut("elasticity_policies")
        .and_then(Value::as_array_mut)
    {
        for p in ps.iter_mut().filter_map(Value::as_object_mut) {
            p.remove("true_evals");
        }
    }
    push_log(
        &mut svc,
        "I",
        format!("Role {role} scaling from {cur} to {card}"),
    );
    if card > cur {
        svc["roles"][ri]["scale_way"] = json!("UP");
        if let Err(e) = add_nodes(st, sid, &mut svc, ri, card - cur, uid) {
            svc["roles"][ri]["state"] = json!(FAILED_SCALING);
            push_log(&mut svc, "E", format!("Role {role} : {e}"));
            set_service_state(&mut svc, FAILED_SCALING);
        } else {
            set_service_state(&mut svc, SCALING);
        }
    } else {
        svc["roles"][ri]["scale_way"] = json!("DOWN");
        let action = shutdown_action(&svc, &svc["roles"][ri]);
        let n = (cur - card) as usize;
        let ids = node_ids(&svc["roles"][ri]);
        let victims: Vec<i64> = ids.into_iter().take(n).collect();
        for &v in &victims {
            terminate(st, v, action);
        }
        let r = &mut svc["roles"][ri];
        if let Some(nodes) = r["nodes"].as_array_mut() {
            nodes.retain(|x| {
                !x.get("deploy_id")
                    .and_then(Value::as_i64)
                    .is_some_and(|i| victims.contains(&i))
            });
        }
        r["disposed_nodes"] = json!(victims);
        set_service_state(&mut svc, SCALING);
    }
    if let Some(d) = st.docs.get_mut(&sid) {
        d.body = svc;
    }
    st.dirty = true;
    Ok(())
}

/// A VM as OneFlow's elasticity grammar reads it (`Role#info_nodes`: the vmpool entry
/// with the last monitoring record as MONITORING).
struct VmAttrs<'a>(&'a crate::state::Vm);

impl crate::elastic::VmView for VmAttrs<'_> {
    fn running(&self) -> bool {
        self.0.is_running()
    }
    fn lookup(&self, att: &str) -> Option<Option<String>> {
        let vm = self.0;
        let in_template = |t: &Template| {
            let mut found = t.attrs.iter().filter(|a| a.name == att);
            let first = found.next()?;
            // A vector or a repeated attribute becomes a Hash/Array in Ruby: no `to_f`.
            Some(match (&first.val, found.next()) {
                (Val::S(s), None) => Some(s.clone()),
                _ => None,
            })
        };
        if let Some(v) = in_template(&vm.user_template) {
            return Some(v);
        }
        if let Some((_, v)) = crate::render::monitoring_values(vm, false)
            .into_iter()
            .find(|(k, _)| *k == att)
        {
            return Some(Some(v));
        }
        if let Some(v) = in_template(&vm.template) {
            return Some(v);
        }
        let root = match att {
            "ID" => vm.id.to_string(),
            "UID" => vm.own.uid.to_string(),
            "GID" => vm.own.gid.to_string(),
            "NAME" => vm.name.clone(),
            "STATE" => vm.state.to_string(),
            "LCM_STATE" => vm.lcm.to_string(),
            "PREV_STATE" => vm.prev_state.to_string(),
            "PREV_LCM_STATE" => vm.prev_lcm.to_string(),
            "RESCHED" => vm.resched.to_string(),
            "STIME" => vm.stime.to_string(),
            "ETIME" => vm.etime.to_string(),
            "LAST_POLL" => vm.last_poll.to_string(),
            "DEPLOY_ID" => vm.deploy_id.clone(),
            _ => return None,
        };
        Some(Some(root))
    }
}

/// One pass of OneFlow's `ServiceAutoScaler`: for every RUNNING service, every role's
/// policies are evaluated (bookkeeping stored whatever the outcome); a role that must
/// change gets the decision's cooldown stored as its `cooldown` and is scaled as
/// `POST /service/:id/scale` would (not forced, so min/max hold). Once one role scales
/// the service is SCALING and later roles' scales fail, as in OneFlow. Returns
/// `(service, role, cardinality, result)` per scale attempted, for the event log.
pub fn autoscale(st: &mut State, default_cooldown: Duration) -> Vec<(i64, String, i64, String)> {
    let now = epoch_s();
    let ids: Vec<i64> = st
        .docs
        .values()
        .filter(|d| d.doc_type == SERVICE && state_of(&d.body) == RUNNING)
        .map(|d| d.id)
        .collect();
    let mut done = Vec::new();
    for sid in ids {
        let Some(doc) = st.docs.get(&sid) else {
            continue;
        };
        let (mut body, uid) = (doc.body.clone(), doc.own.uid);
        let mut scales = Vec::new();
        for ri in 0..roles_len(&body) {
            let role = &mut body["roles"][ri];
            let vms: Vec<VmAttrs> = node_ids(role)
                .iter()
                .filter_map(|i| st.vms.get(i))
                .map(VmAttrs)
                .collect();
            let views: Vec<&dyn crate::elastic::VmView> = vms
                .iter()
                .map(|v| v as &dyn crate::elastic::VmView)
                .collect();
            let d = crate::elastic::decide(role, &views, now, default_cooldown.as_secs() as i64);
            if d.diff != 0 {
                if let Some(c) = d.cooldown {
                    role["cooldown"] = json!(c);
                }
                let card = role.get("cardinality").and_then(Value::as_i64).unwrap_or(0);
                scales.push((role_name(role), card + d.diff));
            }
        }
        if let Some(doc) = st.docs.get_mut(&sid) {
            if doc.body != body {
                doc.body = body;
                st.dirty = true;
            }
        }
        for (role, card) in scales {
            let result = match scale(st, sid, uid, &role, card, false) {
                Ok(()) => "ok".to_string(),
                Err(FlowErr(code, msg)) => format!("{code} {msg}"),
            };
            done.push((sid, role, card, result));
        }
    }
    done
}

fn recover(st: &mut State, sid: i64, uid: i64, params: &Value) -> FR<()> {
    let d = get_doc_to(st, sid, SERVICE, uid, Op::Manage)?;
    let mut svc = d.body.clone();
    if params.get("delete").and_then(Value::as_bool) == Some(true) {
        for ri in 0..roles_len(&svc) {
            for i in node_ids(&svc["roles"][ri]) {
                let _ = st.vm_recover(i, 3);
            }
            svc["roles"][ri]["state"] = json!(ROLE_DONE);
            svc["roles"][ri]["nodes"] = json!([]);
        }
        set_service_state(&mut svc, UNDEPLOYING_NETS);
    } else {
        match state_of(&svc) {
            FAILED_DEPLOYING => {
                for ri in 0..roles_len(&svc) {
                    if state_of(&svc["roles"][ri]) != FAILED_DEPLOYING {
                        continue;
                    }
                    for i in node_ids(&svc["roles"][ri]) {
                        if node_st(st, i, false) == NodeSt::Failed {
                            let _ = st.vm_recover(i, 2);
                        }
                    }
                    let r = &mut svc["roles"][ri];
                    // Nodes that vanished are dropped and re-created by the deploy loop.
                    let gone: Vec<i64> = node_ids(r)
                        .into_iter()
                        .filter(|&i| node_st(st, i, false) == NodeSt::Gone)
                        .collect();
                    if let Some(nodes) = r["nodes"].as_array_mut() {
                        nodes.retain(|x| {
                            !x.get("deploy_id")
                                .and_then(Value::as_i64)
                                .is_some_and(|i| gone.contains(&i))
                        });
                    }
                    r["state"] = json!(if gone.is_empty() && !node_ids(r).is_empty() {
                        DEPLOYING
                    } else {
                        PENDING
                    });
                }
                set_service_state(&mut svc, DEPLOYING);
            }
            FAILED_SCALING => {
                for ri in 0..roles_len(&svc) {
                    if state_of(&svc["roles"][ri]) == FAILED_SCALING {
                        for i in node_ids(&svc["roles"][ri]) {
                            if node_st(st, i, false) == NodeSt::Failed {
                                let _ = st.vm_recover(i, 2);
                            }
                        }
                        svc["roles"][ri]["state"] = json!(SCALING);
                    }
                }
                set_service_state(&mut svc, SCALING);
            }
            FAILED_UNDEPLOYING => {
                for ri in 0..roles_len(&svc) {
                    if state_of(&svc["roles"][ri]) != ROLE_DONE {
                        svc["roles"][ri]["state"] = json!(RUNNING);
                    }
                }
                set_service_state(&mut svc, UNDEPLOYING);
            }
            s => {
                return Err(fe(
                    500,
                    format!(
                        "Service cannot be recovered in state: {}",
                        SERVICE_STATE_NAMES.get(s as usize).unwrap_or(&"?")
                    ),
                ))
            }
        }
    }
    if let Some(d) = st.docs.get_mut(&sid) {
        d.body = svc;
    }
    st.dirty = true;
    Ok(())
}

fn undeploy(st: &mut State, sid: i64, uid: i64) -> FR<()> {
    let d = get_doc_to(st, sid, SERVICE, uid, Op::Manage)?;
    let mut svc = d.body.clone();
    match state_of(&svc) {
        UNDEPLOYING | UNDEPLOYING_NETS => {}
        _ => {
            for ri in 0..roles_len(&svc) {
                if state_of(&svc["roles"][ri]) != ROLE_DONE
                    && state_of(&svc["roles"][ri]) == UNDEPLOYING
                {
                    svc["roles"][ri]["state"] = json!(RUNNING);
                }
            }
            set_service_state(&mut svc, UNDEPLOYING);
        }
    }
    if let Some(d) = st.docs.get_mut(&sid) {
        d.body = svc;
    }
    st.dirty = true;
    Ok(())
}

/// The `rename` action of templates and services.
fn rename(st: &mut State, id: i64, ty: i64, uid: i64, params: &Value) -> FR<(u16, Option<Value>)> {
    get_doc_to(st, id, ty, uid, Op::Manage)?;
    let name = params
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| fe(400, "rename needs params.name"))?
        .to_string();
    let d = st.docs.get_mut(&id).ok_or_else(|| fe(404, "gone"))?;
    d.body["name"] = json!(name);
    d.name = name;
    st.dirty = true;
    Ok((204, None))
}

/// `chmod` action (`params.octet`, e.g. `"604"`): OneFlow's `chmod_action` runs
/// `Document#chmod_octet` on the document only; role VMs keep their permissions.
fn chmod(st: &mut State, id: i64, ty: i64, uid: i64, params: &Value) -> FR<(u16, Option<Value>)> {
    let octet = match &params["octet"] {
        Value::String(o) => o.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(fe(400, "chmod needs params.octet")),
    };
    let perms = u16::from_str_radix(octet.trim(), 8)
        .ok()
        .filter(|p| *p <= 0o777)
        .ok_or_else(|| fe(400, format!("Invalid octet {octet:?}")))?;
    get_doc_to(st, id, ty, uid, Op::Manage)?;
    if let Some(d) = st.docs.get_mut(&id) {
        d.own.perms = perms;
    }
    st.dirty = true;
    Ok((204, None))
}

fn batch_action(st: &mut State, svc: &mut Value, role: Option<&str>, action: &str) {
    for ri in 0..roles_len(svc) {
        let name = role_name(&svc["roles"][ri]);
        if role.is_some_and(|r| r != name) {
            continue;
        }
        for i in node_ids(&svc["roles"][ri]) {
            if let Err(e) = st.vm_action(action, i) {
                push_log(svc, "E", format!("Role {name} : VM {i}: {}", e.msg));
            }
        }
    }
}

fn instantiate(
    st: &mut State,
    tid: i64,
    uid: i64,
    params: &Value,
    default_cooldown: Duration,
) -> FR<Value> {
    let d = get_doc(st, tid, TEMPLATE, uid)?;
    let mut body = d.body.clone();
    let tname = d.name.clone();
    if let Some(o) = body.as_object_mut() {
        o.remove("registration_time");
    }
    if let Some(m) = params.get("merge_template") {
        merge_template(&mut body, m)?;
    }
    validate(&mut body)?;
    check_inputs(&body)?;
    let name = params
        .get("merge_template")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or(tname);
    body["name"] = json!(name);
    body["state"] = json!(PENDING);
    body["start_time"] = json!(epoch_s());
    body["log"] = json!([]);
    if let Some(roles) = body["roles"].as_array_mut() {
        for r in roles {
            r["state"] = json!(PENDING);
            r["nodes"] = json!([]);
            r["last_vmname"] = json!(0);
            if r.get("on_hold").is_none() {
                r["on_hold"] = json!(false);
            }
            if r.get("cooldown").is_none() {
                r["cooldown"] = json!(default_cooldown.as_secs());
            }
        }
    }
    let id = st.alloc_doc(&name, SERVICE, body, uid);
    Ok(doc_json(&st.docs[&id]))
}

/// Every mandatory user input needs a value (or a default).
fn check_inputs(body: &Value) -> FR<()> {
    let vals = body.get("user_inputs_values").and_then(Value::as_object);
    for key in ["user_inputs", "custom_attrs"] {
        let Some(Value::Object(ui)) = body.get(key) else {
            continue;
        };
        for (k, spec) in ui {
            let s = spec.as_str().unwrap_or("");
            let mandatory = s.starts_with('M');
            let default = s.split('|').nth(4).unwrap_or("");
            let has = vals.is_some_and(|v| v.contains_key(k));
            if mandatory && !has && default.is_empty() {
                return Err(fe(400, format!("Missing mandatory user input value: {k}")));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- HTTP

fn text(status: u16, body: String) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [(header::CONTENT_TYPE, "text/html;charset=utf-8")],
        body,
    )
        .into_response()
}

fn json_resp(status: u16, v: &Value) -> Response {
    text(status, v.to_string())
}

/// Checks HTTP Basic credentials against the users table. Returns the uid.
pub fn basic_auth(sim: &Sim, headers: &HeaderMap) -> Result<i64, &'static str> {
    let missing = "A username and password must be provided";
    let h = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .ok_or(missing)?;
    let session = h
        .strip_prefix("Basic ")
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or(missing)?;
    let st = sim.st.lock().unwrap_or_else(|e| e.into_inner());
    st.auth(&session).ok_or("Invalid credentials")
}

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new().fallback(handle).with_state(sim)
}

fn body_json(bytes: &[u8]) -> FR<Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|e| fe(400, format!("Error parsing JSON: {e}")))
}

fn action_of(v: &Value) -> FR<(String, Value)> {
    let a = v
        .get("action")
        .ok_or_else(|| fe(400, "Missing 'action' in request body"))?;
    let perform = a
        .get("perform")
        .and_then(Value::as_str)
        .ok_or_else(|| fe(400, "Missing 'perform' in action"))?;
    Ok((
        perform.to_string(),
        a.get("params").cloned().unwrap_or(Value::Null),
    ))
}

async fn handle(
    AxState(sim): AxState<Arc<Sim>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = uri.path().to_string();
    let call = format!("{method} {path}");
    let bytes = match axum::body::to_bytes(body, crate::MAX_BODY).await {
        Ok(b) => b,
        Err(_) => return text(413, "Request body too large".into()),
    };
    let agent = crate::user_agent(&headers);
    let uid = match basic_auth(&sim, &headers) {
        Ok(u) => u,
        Err(msg) => {
            if method != Method::GET {
                sim.log_event(
                    "oneflow",
                    &call,
                    &agent,
                    Value::String(String::from_utf8_lossy(&bytes).into_owned()),
                    "401".into(),
                );
            }
            return text(401, msg.into());
        }
    };
    // Like OneFlow, finish the request even if the client hung up (see `detached`).
    let resp = crate::detached(async move {
        let resp = match sim.fault(&format!("oneflow {call}"), &agent).await {
            Some(rule) => Err(FlowErr(
                rule.status.unwrap_or(500),
                rule.message.unwrap_or_else(|| "Injected fault".into()),
            )),
            None => route(&sim, &method, &path, &bytes, uid),
        };
        if method != Method::GET {
            let args = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            let result = match &resp {
                Ok((s, _)) => s.to_string(),
                Err(FlowErr(s, m)) => format!("{s} {m}"),
            };
            sim.log_event("oneflow", &call, &agent, args, result);
        }
        resp
    })
    .await
    .unwrap_or_else(|| Err(FlowErr(500, "internal error".into())));
    match resp {
        Ok((status, Some(v))) => json_resp(status, &v),
        Ok((status, None)) => text(status, String::new()),
        Err(FlowErr(status, msg)) => text(status, msg),
    }
}

fn route(
    sim: &Sim,
    method: &Method,
    path: &str,
    bytes: &[u8],
    uid: i64,
) -> FR<(u16, Option<Value>)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let num = |s: &str| {
        s.parse::<i64>()
            .map_err(|_| fe(404, format!("Error getting document [{s}].")))
    };
    let cooldown = sim.cfg.timings.default_cooldown;
    let m = method.as_str();
    match (m, segs.as_slice()) {
        ("GET", ["service_template"]) => {
            Ok((200, Some(sim.with(|st| pool_json(st, TEMPLATE, uid)))))
        }
        ("POST", ["service_template"]) => {
            let mut body = body_json(bytes)?;
            validate(&mut body)?;
            body["registration_time"] = json!(epoch_s());
            let name = body["name"].as_str().unwrap_or("").to_string();
            Ok((
                201,
                Some(sim.with(|st| {
                    let id = st.alloc_doc(&name, TEMPLATE, body, uid);
                    doc_json(&st.docs[&id])
                })),
            ))
        }
        ("GET", ["service_template", id]) => {
            let id = num(id)?;
            sim.with(|st| Ok((200, Some(doc_json(get_doc(st, id, TEMPLATE, uid)?)))))
        }
        ("PUT", ["service_template", id]) => {
            let id = num(id)?;
            let mut body = body_json(bytes)?;
            validate(&mut body)?;
            sim.with(|st| {
                let reg = get_doc_to(st, id, TEMPLATE, uid, Op::Manage)?
                    .body
                    .get("registration_time")
                    .cloned()
                    .unwrap_or(json!(epoch_s()));
                body["registration_time"] = reg;
                let d = st.docs.get_mut(&id).ok_or_else(|| fe(404, "gone"))?;
                d.name = body["name"].as_str().unwrap_or("").to_string();
                d.body = body;
                st.dirty = true;
                Ok((200, Some(doc_json(&st.docs[&id]))))
            })
        }
        ("DELETE", ["service_template", id]) => {
            let id = num(id)?;
            let body = body_json(bytes)?;
            sim.with(|st| {
                let d = get_doc_to(st, id, TEMPLATE, uid, Op::Manage)?;
                let kind = body
                    .get("delete_type")
                    .and_then(Value::as_str)
                    .unwrap_or("none");
                if kind == "templates" || kind == "all" {
                    let tids: Vec<i64> = d.body["roles"]
                        .as_array()
                        .map(|rs| {
                            rs.iter()
                                .filter_map(|r| {
                                    r.get("template_id")
                                        .or_else(|| r.get("vm_template"))
                                        .and_then(Value::as_i64)
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    for t in tids {
                        st.templates.remove(&t);
                    }
                }
                st.docs.remove(&id);
                st.dirty = true;
                Ok((204, None))
            })
        }
        ("POST", ["service_template", id, "action"]) => {
            let id = num(id)?;
            let (perform, params) = action_of(&body_json(bytes)?)?;
            sim.with(|st| match perform.as_str() {
                "instantiate" => Ok((201, Some(instantiate(st, id, uid, &params, cooldown)?))),
                "clone" => {
                    let d = get_doc(st, id, TEMPLATE, uid)?;
                    let name = params
                        .get("name")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("{}-copy", d.name));
                    let mut body = d.body.clone();
                    body["name"] = json!(name);
                    body["registration_time"] = json!(epoch_s());
                    let nid = st.alloc_doc(&name, TEMPLATE, body, uid);
                    Ok((201, Some(doc_json(&st.docs[&nid]))))
                }
                "rename" => rename(st, id, TEMPLATE, uid, &params),
                "update" => {
                    let cur = get_doc_to(st, id, TEMPLATE, uid, Op::Manage)?.body.clone();
                    let raw = params
                        .get("template_json")
                        .and_then(Value::as_str)
                        .ok_or_else(|| fe(400, "update needs params.template_json"))?;
                    let new: Value = serde_json::from_str(raw)
                        .map_err(|e| fe(400, format!("Error parsing JSON: {e}")))?;
                    let mut body = if params.get("append").and_then(Value::as_bool) == Some(true) {
                        let mut b = cur.clone();
                        deep_merge(&mut b, &new);
                        b
                    } else {
                        new
                    };
                    validate(&mut body)?;
                    body["registration_time"] = cur
                        .get("registration_time")
                        .cloned()
                        .unwrap_or(json!(epoch_s()));
                    let d = st.docs.get_mut(&id).ok_or_else(|| fe(404, "gone"))?;
                    d.name = body["name"].as_str().unwrap_or("").to_string();
                    d.body = body;
                    st.dirty = true;
                    Ok((204, None))
                }
                "chmod" => chmod(st, id, TEMPLATE, uid, &params),
                "chown" | "chgrp" => {
                    get_doc_to(st, id, TEMPLATE, uid, Op::Manage)?;
                    Ok((204, None))
                }
                other => Err(fe(500, format!("Action {other} not supported"))),
            })
        }
        ("GET", ["service"]) => Ok((200, Some(sim.with(|st| pool_json(st, SERVICE, uid))))),
        ("GET", ["service", id]) => {
            let id = num(id)?;
            sim.with(|st| Ok((200, Some(doc_json(get_doc(st, id, SERVICE, uid)?)))))
        }
        ("PUT", ["service", id]) => {
            let id = num(id)?;
            let body = body_json(bytes)?;
            // As OneFlow: schema first (400), then state, then the immutable keys (500),
            // then the stored body is replaced (append: shallow merge, as Ruby's Hash#merge).
            let append = body.get("append").is_some();
            let new = if append {
                let raw = body
                    .get("template")
                    .and_then(Value::as_str)
                    .ok_or_else(|| fe(400, "Missing template to append"))?;
                serde_json::from_str::<Value>(raw)
                    .map_err(|e| fe(400, format!("Error parsing JSON: {e}")))?
            } else {
                let mut check = body.clone();
                validate(&mut check)?;
                body
            };
            sim.with(|st| {
                let cur = get_doc_to(st, id, SERVICE, uid, Op::Manage)?.body.clone();
                let state = cur.get("state").and_then(Value::as_i64).unwrap_or(0);
                if SERVICE_NO_UPDATE_STATES.contains(&state) {
                    return Err(fe(
                        500,
                        format!(
                            "Service cannot be updated in state: {}",
                            service_state_name(state)
                        ),
                    ));
                }
                check_service_update(&cur, &new, append)?;
                let stored = if append {
                    let mut b = cur.clone();
                    for (k, v) in new.as_object().into_iter().flatten() {
                        b[k] = v.clone();
                    }
                    b
                } else {
                    new
                };
                if let Some(d) = st.docs.get_mut(&id) {
                    d.body = stored;
                }
                st.dirty = true;
                Ok((204, None))
            })
        }
        ("DELETE", ["service", id]) => {
            let id = num(id)?;
            sim.with(|st| undeploy(st, id, uid).map(|_| (204, None)))
        }
        ("POST", ["service", id, "action"]) => {
            let id = num(id)?;
            let (perform, params) = action_of(&body_json(bytes)?)?;
            if params.is_null() && VM_BATCH_ACTIONS.contains(&perform.as_str()) {
                return Err(fe(500, "undefined method `[]=' for nil:NilClass"));
            }
            sim.with(|st| match perform.as_str() {
                "recover" => recover(st, id, uid, &params).map(|_| (204, None)),
                "rename" => rename(st, id, SERVICE, uid, &params),
                "chmod" => chmod(st, id, SERVICE, uid, &params),
                "chown" | "chgrp" | "release" => {
                    get_doc_to(st, id, SERVICE, uid, Op::Manage)?;
                    Ok((204, None))
                }
                a if VM_BATCH_ACTIONS.contains(&a) => {
                    let mut svc = get_doc_to(st, id, SERVICE, uid, Op::Manage)?.body.clone();
                    batch_action(st, &mut svc, None, a);
                    if let Some(d) = st.docs.get_mut(&id) {
                        d.body = svc;
                    }
                    Ok((204, None))
                }
                other => Err(fe(500, format!("Action {other} not supported"))),
            })
        }
        ("POST", ["service", id, "scale"]) => {
            let id = num(id)?;
            let body = body_json(bytes)?;
            let role = body
                .get("role_name")
                .and_then(Value::as_str)
                .ok_or_else(|| fe(400, "Missing role_name"))?
                .to_string();
            let card = body
                .get("cardinality")
                .and_then(to_int)
                .ok_or_else(|| fe(400, "Missing or invalid cardinality"))?;
            let force = body.get("force") == Some(&Value::Bool(true));
            sim.with(|st| scale(st, id, uid, &role, card, force).map(|_| (204, None)))
        }
        ("POST", ["service", id, "role", role, "action"]) => {
            let id = num(id)?;
            let (perform, params) = action_of(&body_json(bytes)?)?;
            if params.is_null() {
                return Err(fe(500, "undefined method `[]=' for nil:NilClass"));
            }
            if !VM_BATCH_ACTIONS.contains(&perform.as_str()) {
                return Err(fe(500, format!("Action {perform} not supported")));
            }
            let role = role.to_string();
            sim.with(|st| {
                let mut svc = get_doc_to(st, id, SERVICE, uid, Op::Manage)?.body.clone();
                if !svc["roles"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|r| role_name(r) == role))
                {
                    return Err(fe(500, format!("Role '{role}' not found")));
                }
                batch_action(st, &mut svc, Some(&role), &perform);
                if let Some(d) = st.docs.get_mut(&id) {
                    d.body = svc;
                }
                Ok((204, None))
            })
        }
        ("POST", ["service_pool", "purge_done"]) => Ok((204, None)),
        _ => Err(fe(404, "<h1>Not Found</h1>")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rules() {
        let mut ok = json!({"name": "s", "roles": [{"name": "a", "template_id": "3", "cardinality": "2"}, {"name": "b", "type": "vm", "template_id": 1, "parents": ["a"]}]});
        validate(&mut ok).unwrap();
        assert_eq!(ok["roles"][0]["template_id"], json!(3));
        assert_eq!(ok["roles"][0]["cardinality"], json!(2));
        assert_eq!(ok["roles"][1]["cardinality"], json!(0));
        assert_eq!(ok["deployment"], json!("none"));
        for bad in [
            json!({"roles": []}),
            json!({"name": "s"}),
            json!({"name": "s", "roles": [{"name": "a b", "template_id": 1}]}),
            json!({"name": "s", "roles": [{"name": "a"}]}),
            json!({"name": "s", "ready_status_gate": "yes", "roles": []}),
            json!({"name": "s", "roles": [{"name": "a", "template_id": 1, "parents": ["zz"]}]}),
            json!({"name": "s", "roles": [{"name": "a", "template_id": 1, "cardinality": 5, "max_vms": 2}]}),
        ] {
            let mut b = bad.clone();
            assert_eq!(validate(&mut b).unwrap_err().0, 400, "{bad}");
        }
    }

    #[test]
    fn merge_by_name_and_index() {
        let mut seven = json!({"name": "s", "roles": [{"name": "a", "template_id": 1}, {"name": "b", "template_id": 2}]});
        merge_template(&mut seven, &json!({"name": "x", "roles": [{"name": "b", "cardinality": 3, "extra_key": 1}], "custom_attrs_values": {"K": "v"}})).unwrap();
        assert_eq!(seven["roles"][1]["cardinality"], json!(3));
        assert_eq!(seven["roles"][1]["extra_key"], json!(1));
        assert_eq!(seven["user_inputs_values"]["K"], json!("v"));
        let mut six = json!({"name": "s", "roles": [{"name": "a", "vm_template": 1}, {"name": "b", "vm_template": 2}]});
        merge_template(&mut six, &json!({"roles": [{"cardinality": 4}]})).unwrap();
        assert_eq!(six["roles"][0]["cardinality"], json!(4));
    }
}
