//! OneGate: per-VM token authentication (X-ONEGATE-TOKEN checked against X-ONEGATE-VMID),
//! GET/PUT /vm, GET/PUT /vms/:id, GET /service, PUT /service/role/:role, and the catch-all 400.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State as AxState;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Map, Value};

use crate::flow;
use crate::state::{State, Vm};
use crate::template::Template;
use crate::Sim;

const NIC_KEYS: &[&str] = &[
    "IP",
    "IP6_LINK",
    "IP6_SITE",
    "IP6_GLOBAL",
    "NETWORK",
    "MAC",
    "NAME",
    "PARENT",
    "EXTERNAL",
    "EXTERNAL_IP",
];

fn resp(status: u16, body: String) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [(header::CONTENT_TYPE, "application/json;charset=utf-8")],
        body,
    )
        .into_response()
}

type GR = Result<(u16, String), (u16, String)>;

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new().fallback(handle).with_state(sim)
}

/// The VM hash OneGate returns for `GET /vm` and `GET /vms/:id`.
pub fn vm_json(vm: &Vm) -> Value {
    let mut ut = vm.user_template.to_json(&["SCHED_MESSAGE"]);
    if ut.is_null() {
        ut = json!({});
    }
    let nics = |name: &str| -> Vec<Value> {
        vm.template
            .vecs(name)
            .map(|v| {
                let mut m = Map::new();
                for k in NIC_KEYS {
                    if let Some(x) = crate::template::vec_get(v, k) {
                        m.insert((*k).to_string(), json!(x));
                    }
                }
                Value::Object(m)
            })
            .collect()
    };
    json!({"VM": {
        "NAME": vm.name, "ID": vm.id.to_string(), "STATE": vm.state.to_string(), "LCM_STATE": vm.lcm.to_string(),
        "USER_TEMPLATE": ut,
        "TEMPLATE": {"NIC": nics("NIC"), "NIC_ALIAS": nics("NIC_ALIAS")}
    }})
}

/// The complete `one.vm.info` hash (`?extended=true`).
fn vm_full_json(vm: &Vm) -> Value {
    let mut xml = String::new();
    crate::render::vm_full(&mut xml, vm);
    match crate::xml::parse(&xml) {
        Ok(e) => json!({"VM": crate::xml::to_json(&e)}),
        Err(_) => Value::Null,
    }
}

fn service_json(st: &State, sid: i64, extended: bool) -> Result<Value, (u16, String)> {
    let d = st
        .docs
        .get(&sid)
        .filter(|d| d.doc_type == flow::SERVICE)
        .ok_or((404, format!("Service {sid} not found")))?;
    let body = &d.body;
    let roles: Vec<Value> = body["roles"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    let nodes: Vec<Value> = r["nodes"]
                        .as_array()
                        .map(|ns| {
                            ns.iter()
                                .map(|n| {
                                    let id = n["deploy_id"].as_i64().unwrap_or(-1);
                                    let info = match (extended, st.vms.get(&id)) {
                                        (true, Some(vm)) => vm_full_json(vm),
                                        _ => n["vm_info"].clone(),
                                    };
                                    json!({"deploy_id": id, "running": null, "vm_info": info})
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    json!({"name": r["name"], "cardinality": r["cardinality"], "state": r["state"], "nodes": nodes})
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(
        json!({"SERVICE": {"name": d.name, "id": sid.to_string(), "state": body["state"], "roles": roles}}),
    )
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(v)) => {
                out.push(v);
                i += 2;
            }
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn form_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// OneGate's quoting of `PUT /vm` data: after each `=` not followed by `[` or `"`, the value is
/// quoted up to the next `,`, `]` or newline (so spaces after `=` stay in the value).
pub fn escape_data(data: &str) -> String {
    let data = data.replace("\\n", "\n");
    let mut out = String::with_capacity(data.len() + 8);
    let mut chars = data.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '=' && !matches!(chars.peek(), Some('[') | Some('"')) {
            out.push('"');
            while let Some(&n) = chars.peek() {
                if n == ',' || n == ']' || n == '\n' {
                    break;
                }
                out.push(n);
                chars.next();
            }
            out.push('"');
        }
    }
    out
}

fn authenticate(st: &State, headers: &HeaderMap) -> Result<i64, (u16, String)> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let unauth = || (401, "Not authorized".to_string());
    let id: i64 = h("x-onegate-vmid")
        .and_then(|v| v.parse().ok())
        .ok_or_else(unauth)?;
    let token = h("x-onegate-token").ok_or_else(unauth)?;
    let vm = st.vms.get(&id).ok_or_else(unauth)?;
    if vm.token.is_empty() || vm.token != token || vm.state == crate::state::S_DONE {
        return Err(unauth());
    }
    Ok(id)
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
        Err(_) => return resp(413, "Request body too large".into()),
    };
    let raw = String::from_utf8_lossy(&bytes).into_owned();
    let agent = crate::user_agent(&headers);
    let vmid = headers
        .get("x-onegate-vmid")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let r: GR = match sim
        .fault_from(&format!("onegate {call}"), vmid.parse().ok(), &agent)
        .await
    {
        Some(rule) => Err((
            rule.status.unwrap_or(500),
            rule.message.unwrap_or_else(|| "Injected fault".into()),
        )),
        None => route(
            &sim,
            &method,
            &path,
            uri.query().unwrap_or(""),
            &headers,
            &raw,
        ),
    };
    if method != Method::GET {
        let result = match &r {
            Ok((s, _)) => s.to_string(),
            Err((s, m)) => format!("{s} {m}"),
        };
        sim.log_event(
            "onegate",
            &call,
            &agent,
            json!({"vmid": vmid, "body": raw, "query": uri.query().unwrap_or("")}),
            result,
        );
    }
    match r {
        Ok((s, b)) | Err((s, b)) => resp(s, b),
    }
}

fn route(
    sim: &Sim,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    raw: &str,
) -> GR {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let unsupported = || {
        Err((
            400,
            "OneGate server doesn't support this feature".to_string(),
        ))
    };
    let known = matches!(
        (method.as_str(), segs.as_slice()),
        ("GET", [])
            | ("GET" | "PUT", ["vm"])
            | ("GET" | "PUT", ["vms", _])
            | ("POST", ["vms", _, "action"])
            | ("GET", ["service"])
            | ("PUT", ["service", "role", _])
    );
    if !known {
        return unsupported();
    }
    let me = {
        let st = sim.st.lock().unwrap_or_else(|e| e.into_inner());
        authenticate(&st, headers)?
    };
    let mut params = form_pairs(query);
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    if is_form {
        params.extend(form_pairs(raw));
    }
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let base = sim.urls.onegate.clone();
    match (method.as_str(), segs.as_slice()) {
        ("GET", []) => Ok((
            200,
            json!({"vm_info": format!("{base}/vm"), "service_info": format!("{base}/service")})
                .to_string(),
        )),
        ("GET", ["vm"]) => sim.with(|st| {
            Ok((
                200,
                vm_json(st.vm(me).map_err(|e| (404, e.msg))?).to_string(),
            ))
        }),
        ("PUT", ["vm"]) => put_vm(
            sim,
            me,
            param("data").unwrap_or_else(|| raw.to_string()),
            param("type"),
        ),
        ("GET", ["vms", id]) => sim.with(|st| {
            let id = peer(st, me, id)?;
            Ok((
                200,
                vm_json(st.vm(id).map_err(|e| (404, e.msg))?).to_string(),
            ))
        }),
        ("PUT", ["vms", id]) => {
            if !sim.cfg.onegate.update_by_id {
                return Err((
                    403,
                    "Action (update_by_id) on resource (vm) not supported".to_string(),
                ));
            }
            let id = sim.with(|st| peer(st, me, id))?;
            put_vm(
                sim,
                id,
                param("data").unwrap_or_else(|| raw.to_string()),
                param("type"),
            )
        }
        ("POST", ["vms", id, "action"]) => {
            let id = sim.with(|st| peer(st, me, id))?;
            let v: Value =
                serde_json::from_str(raw).map_err(|e| (400, format!("Error parsing JSON: {e}")))?;
            let perform = v["action"]["perform"]
                .as_str()
                .ok_or((400, "Missing action perform".to_string()))?
                .to_string();
            let hard = v["action"]["params"] == Value::Bool(true);
            if perform == "reboot" {
                return Err((403, "Action (reboot) not permitted".into()));
            }
            let action = if hard && ["terminate", "poweroff", "reboot"].contains(&perform.as_str())
            {
                format!("{perform}-hard")
            } else {
                perform
            };
            sim.with(|st| st.vm_action(&action, id))
                .map_err(|e| (500, e.msg))?;
            Ok((204, String::new()))
        }
        ("GET", ["service"]) => sim.with(|st| {
            let sid = service_id(st, me)?;
            let extended = param("extended").as_deref() == Some("true");
            Ok((200, service_json(st, sid, extended)?.to_string()))
        }),
        ("PUT", ["service", "role", role]) => {
            let v: Value =
                serde_json::from_str(raw).map_err(|e| (400, format!("Error parsing JSON: {e}")))?;
            let card = match &v["cardinality"] {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            }
            .ok_or((400, "Missing or invalid cardinality".to_string()))?;
            let role = role.to_string();
            sim.with(|st| {
                let sid = service_id(st, me)?;
                let uid = st.vms.get(&me).map(|v| v.own.uid).unwrap_or(0);
                flow::scale(st, sid, uid, &role, card, false).map_err(|flow::FlowErr(_, m)| {
                    (
                        400,
                        format!("Error performing action on service {sid}: {m}"),
                    )
                })?;
                Ok((200, String::new()))
            })
        }
        _ => unsupported(),
    }
}

fn service_id(st: &State, me: i64) -> Result<i64, (u16, String)> {
    st.vms
        .get(&me)
        .and_then(|v| v.user_template.get("SERVICE_ID"))
        .and_then(|s| s.trim().parse().ok())
        .ok_or((400, "Empty or invalid SERVICE_ID".to_string()))
}

/// A VM of the caller's service.
fn peer(st: &State, me: i64, id: &str) -> Result<i64, (u16, String)> {
    let sid = st.vms.get(&me).and_then(|v| v.user_template.get("SERVICE_ID")).and_then(|s| s.trim().parse::<i64>().ok()).ok_or((
        400,
        "This VM does not belong to any Virtual Router or Service, so it cannot retrieve information from other VMs".to_string(),
    ))?;
    let id: i64 = id
        .parse()
        .map_err(|_| (400, format!("Service {sid} does not contain VM {id}.")))?;
    let member = st.docs.get(&sid).is_some_and(|d| {
        d.body["roles"].as_array().is_some_and(|rs| {
            rs.iter().any(|r| {
                r["nodes"]
                    .as_array()
                    .is_some_and(|ns| ns.iter().any(|n| n["deploy_id"].as_i64() == Some(id)))
            })
        })
    });
    if !member {
        return Err((400, format!("Service {sid} does not contain VM {id}.")));
    }
    Ok(id)
}

fn put_vm(sim: &Sim, id: i64, data: String, kind: Option<String>) -> GR {
    let kind = kind.as_deref().map(str::trim).unwrap_or("1").to_string();
    let restricted = |name: &str| {
        sim.cfg
            .onegate
            .restricted_attrs
            .iter()
            .any(|r| r.eq_ignore_ascii_case(name))
    };
    sim.with(|st| {
        if kind == "1" {
            let escaped = escape_data(&data);
            let t = Template::parse(&escaped).map_err(|e| (500, e))?;
            if let Some(a) = t.attrs.iter().find(|a| restricted(&a.name)) {
                return Err((403, format!("Attribute ({}) cannot be modified", a.name)));
            }
            st.vm_update(id, &escaped, 1).map_err(|e| (500, e.msg))?;
        } else {
            let name = data.trim().to_ascii_uppercase();
            if restricted(&name) {
                return Err((403, format!("Attribute ({name}) cannot be deleted")));
            }
            let vm = st.vm_mut(id).map_err(|e| (404, e.msg))?;
            if !vm.user_template.remove(&name) {
                return Err((500, "attribute not found".into()));
            }
            st.dirty = true;
        }
        Ok((200, String::new()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_quirk() {
        assert_eq!(
            escape_data("READY=YES\\nAPP = 9.7"),
            "READY=\"YES\"\nAPP =\" 9.7\""
        );
        assert_eq!(escape_data("K=[A=1,B=2]"), "K=[A=\"1\",B=\"2\"]");
        assert_eq!(escape_data("Q=\"x\""), "Q=\"x\"");
        let t = Template::parse(&escape_data("APP_LOAD = 9.7")).unwrap();
        assert_eq!(t.get("APP_LOAD"), Some(" 9.7"));
    }

    #[test]
    fn form_decoding() {
        assert_eq!(
            form_pairs("data=READY%3DYES&type=1"),
            vec![
                ("data".into(), "READY=YES".into()),
                ("type".into(), "1".into())
            ]
        );
        assert_eq!(percent_decode("a+b%2"), "a b%2");
    }
}
