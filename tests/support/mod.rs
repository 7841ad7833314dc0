//! A small in-process OneGate for the agent's tests (axum on 127.0.0.1:0): `GET /vm`,
//! `GET /vms/:id`, `PUT /vm` (merge and delete), `GET /service`, with switches for outages
//! and hostile answers.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Form, Router};
use serde_json::{json, Value};

/// One VM of the fake service.
#[derive(Debug, Clone)]
pub struct FakeVm {
    /// OneFlow role name.
    pub role: String,
    /// NIC IP.
    pub ip: String,
    /// USER_TEMPLATE (besides SERVICE_ID / ROLE_NAME).
    pub attrs: BTreeMap<String, String>,
}

/// Everything the fake OneGate serves.
#[derive(Debug, Default)]
pub struct GateState {
    /// VMs by id.
    pub vms: BTreeMap<u64, FakeVm>,
    /// 503 for every request while set.
    pub outage: bool,
    /// Replaces the `GET /service` body.
    pub raw_service: Option<String>,
    /// Replaces `GET /vms/:id` / `GET /vm` bodies.
    pub raw_vm: BTreeMap<u64, String>,
    /// Every PUT body received: (vm id, data).
    pub puts: Vec<(u64, String)>,
    /// Requests seen.
    pub requests: usize,
}

/// A running fake OneGate.
pub struct FakeGate {
    /// Shared state (tests mutate it).
    pub state: Arc<Mutex<GateState>>,
    /// Base URL.
    pub url: String,
}

impl FakeGate {
    /// Starts the server on a loopback port.
    pub async fn start() -> FakeGate {
        let state = Arc::new(Mutex::new(GateState::default()));
        let app = Router::new()
            .route("/vm", get(get_own_vm).put(put_vm))
            .route("/vms/{id}", get(get_vm))
            .route("/service", get(get_service))
            .route("/service/role/{role}", put(|| async { StatusCode::OK }))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGate { state, url }
    }

    /// Adds a VM.
    pub fn add_vm(&self, id: u64, role: &str, ip: &str) {
        self.state.lock().unwrap().vms.insert(
            id,
            FakeVm {
                role: role.into(),
                ip: ip.into(),
                attrs: BTreeMap::new(),
            },
        );
    }

    /// Moves a VM's NIC to `ip` (as oned would on a NIC change; OneGate cannot).
    pub fn set_ip(&self, id: u64, ip: &str) {
        self.state.lock().unwrap().vms.get_mut(&id).unwrap().ip = ip.into();
    }

    /// Sets one user-template attribute (as the controller or a peer would).
    pub fn set(&self, id: u64, key: &str, value: &str) {
        self.state
            .lock()
            .unwrap()
            .vms
            .get_mut(&id)
            .unwrap()
            .attrs
            .insert(key.into(), value.into());
    }

    /// Reads one user-template attribute.
    pub fn attr(&self, id: u64, key: &str) -> Option<String> {
        self.state
            .lock()
            .unwrap()
            .vms
            .get(&id)
            .and_then(|v| v.attrs.get(key).cloned())
    }

    /// A one_env file for VM `id`.
    pub fn one_env(&self, id: u64, extra: &[(&str, &str)]) -> String {
        let ip = self.state.lock().unwrap().vms[&id].ip.clone();
        let mut s = format!(
            "export TOKENTXT=\"dG9rZW4tZm9yLXZt\"\nexport VMID=\"{id}\"\nexport ONEGATE_ENDPOINT=\"{}\"\nexport ETH0_IP=\"{ip}\"\n",
            self.url
        );
        for (k, v) in extra {
            s.push_str(&format!("export {k}=\"{v}\"\n"));
        }
        s
    }
}

fn vm_json(id: u64, vm: &FakeVm) -> Value {
    let mut ut = serde_json::Map::new();
    for (k, v) in &vm.attrs {
        ut.insert(k.clone(), json!(v));
    }
    ut.insert("SERVICE_ID".into(), json!("5"));
    ut.insert("ROLE_NAME".into(), json!(vm.role));
    json!({"VM": {"NAME": format!("vm-{id}"), "ID": id.to_string(), "STATE": "3", "LCM_STATE": "3",
        "USER_TEMPLATE": ut,
        "TEMPLATE": {"NIC": [{"IP": vm.ip, "NAME": "NIC0", "NETWORK": "private"}], "NIC_ALIAS": []}}})
}

fn caller(headers: &HeaderMap) -> Option<u64> {
    headers.get("X-ONEGATE-VMID")?.to_str().ok()?.parse().ok()
}

type Shared = State<Arc<Mutex<GateState>>>;

fn gate_check(st: &mut GateState, headers: &HeaderMap) -> Result<u64, (StatusCode, &'static str)> {
    st.requests += 1;
    if st.outage {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "OneGate is down"));
    }
    if headers.get("X-ONEGATE-TOKEN").is_none() {
        return Err((StatusCode::UNAUTHORIZED, "Not authorized"));
    }
    caller(headers).ok_or((StatusCode::UNAUTHORIZED, "Not authorized"))
}

fn json_body(text: String) -> Response {
    ([("content-type", "application/json;charset=utf-8")], text).into_response()
}

async fn get_own_vm(State(s): Shared, headers: HeaderMap) -> Response {
    let mut st = s.lock().unwrap();
    let id = match gate_check(&mut st, &headers) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    vm_response(&st, id)
}

fn vm_response(st: &GateState, id: u64) -> Response {
    if let Some(raw) = st.raw_vm.get(&id) {
        return json_body(raw.clone());
    }
    match st.vms.get(&id) {
        Some(vm) => json_body(vm_json(id, vm).to_string()),
        None => (StatusCode::NOT_FOUND, format!("Error getting VM {id}")).into_response(),
    }
}

async fn get_vm(State(s): Shared, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    let mut st = s.lock().unwrap();
    if let Err(r) = gate_check(&mut st, &headers) {
        return r.into_response();
    }
    vm_response(&st, id)
}

async fn get_service(
    State(s): Shared,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    // `?extended=true`: each node's full VM document (with its user template), as OneGate
    // answers it; otherwise OneFlow's stored summary.
    let extended = q.get("extended").map(String::as_str) == Some("true");
    let mut st = s.lock().unwrap();
    if let Err(r) = gate_check(&mut st, &headers) {
        return r.into_response();
    }
    if let Some(raw) = &st.raw_service {
        return json_body(raw.clone());
    }
    let mut roles: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (id, vm) in &st.vms {
        let info = match extended {
            true => vm_json(*id, vm),
            false => {
                json!({"VM": {"ID": id.to_string(), "UID": "0", "GID": "0", "UNAME": "oneadmin", "GNAME": "oneadmin", "NAME": format!("vm-{id}")}})
            }
        };
        roles
            .entry(vm.role.clone())
            .or_default()
            .push(json!({"deploy_id": id, "running": null, "vm_info": info}));
    }
    let roles: Vec<Value> = roles
        .into_iter()
        .map(|(name, nodes)| json!({"name": name, "cardinality": nodes.len(), "state": 2, "nodes": nodes}))
        .collect();
    json_body(
        json!({"SERVICE": {"name": "flower", "id": "5", "state": 2, "roles": roles}}).to_string(),
    )
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\""),
        None => v.to_string(),
    }
}

async fn put_vm(
    State(s): Shared,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut st = s.lock().unwrap();
    let id = match gate_check(&mut st, &headers) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let data = form.get("data").cloned().unwrap_or_default();
    let kind = form.get("type").cloned().unwrap_or_else(|| "1".into());
    st.puts.push((id, data.clone()));
    let Some(vm) = st.vms.get_mut(&id) else {
        return (StatusCode::NOT_FOUND, "no such VM").into_response();
    };
    if kind == "1" {
        for line in data.lines() {
            if let Some((k, v)) = line.split_once('=') {
                vm.attrs.insert(k.to_string(), unquote(v));
            }
        }
        StatusCode::OK.into_response()
    } else if vm.attrs.remove(data.trim()).is_some() {
        StatusCode::OK.into_response()
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "attribute not found").into_response()
    }
}
