//! Fault injection and the event log, plus the control HTTP API (see README.md).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::state::{lcm_by_name, state_by_name, S_ACTIVE};
use crate::{Api, Sim};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FaultRule {
    #[serde(default)]
    pub id: u64,
    /// An XML-RPC method (`one.vm.action`) or `<api> <VERB> <path>` (`oneflow POST /service/*/scale`,
    /// `onegate PUT /vm`); `*` matches any run of characters.
    pub target: String,
    /// `error` or `delay`.
    pub kind: String,
    /// XML-RPC error code for `error` (default 0x2000 INTERNAL).
    #[serde(default)]
    pub code: Option<i32>,
    /// HTTP status for `error` on OneFlow/OneGate (default 500).
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// Fire with this probability (0..1); default 1.
    #[serde(default)]
    pub probability: Option<f64>,
    /// Fire for the next N matching calls only, then disappear.
    #[serde(default)]
    pub count: Option<u64>,
    /// OneGate only: fire only for calls made by this VM (`X-ONEGATE-VMID`), e.g. to cut
    /// one guest's path to OneGate while its peers still reach it.
    #[serde(default)]
    pub vm: Option<i64>,
    /// Fire only for calls whose `User-Agent` matches this glob, e.g. to cut one
    /// controller instance (`*(ctl-a)`) off from OpenNebula while the others reach it.
    #[serde(default)]
    pub agent: Option<String>,
}

/// What the matching rules decided for one call.
#[derive(Debug, Default)]
pub struct Decision {
    pub delay: Duration,
    pub error: Option<FaultRule>,
}

pub struct Faults {
    rules: Vec<FaultRule>,
    next: u64,
    /// Draws for `probability`; seeded for reproducible fault sequences.
    rng: StdRng,
}

impl Default for Faults {
    fn default() -> Self {
        Self::new(None)
    }
}

pub fn glob(pat: &str, s: &str) -> bool {
    let (p, s) = (pat.as_bytes(), s.as_bytes());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

impl Faults {
    /// No rules; `seed` fixes the sequence of probability draws (random when `None`).
    pub fn new(seed: Option<u64>) -> Self {
        Self {
            rules: Vec::new(),
            next: 0,
            rng: seed.map_or_else(StdRng::from_os_rng, StdRng::seed_from_u64),
        }
    }

    pub fn add(&mut self, mut r: FaultRule) -> Result<u64, String> {
        if r.kind != "error" && r.kind != "delay" {
            return Err(format!(
                "kind must be \"error\" or \"delay\", not {:?}",
                r.kind
            ));
        }
        if r.kind == "delay" && r.delay_ms.is_none() {
            return Err("delay rules need delay_ms".into());
        }
        if let Some(p) = r.probability {
            if !(0.0..=1.0).contains(&p) {
                return Err("probability must be within 0..1".into());
            }
        }
        self.next += 1;
        r.id = self.next;
        self.rules.push(r);
        Ok(self.next)
    }

    pub fn check(&mut self, target: &str) -> Decision {
        self.check_from(target, None, "")
    }

    /// [`Faults::check`] for a call made by VM `vm` (OneGate) with User-Agent `agent`;
    /// rules naming another VM (or any VM when `vm` is `None`), or an agent pattern
    /// `agent` does not match, do not fire.
    pub fn check_from(&mut self, target: &str, vm: Option<i64>, agent: &str) -> Decision {
        let mut d = Decision::default();
        for r in self.rules.iter_mut() {
            if !glob(&r.target, target)
                || r.vm.is_some_and(|want| Some(want) != vm)
                || r.agent.as_deref().is_some_and(|pat| !glob(pat, agent))
            {
                continue;
            }
            if let Some(p) = r.probability {
                if self.rng.random::<f64>() >= p {
                    continue;
                }
            }
            if let Some(c) = r.count.as_mut() {
                if *c == 0 {
                    continue;
                }
                *c -= 1;
            }
            if r.kind == "delay" {
                d.delay += Duration::from_millis(r.delay_ms.unwrap_or(0));
            } else if d.error.is_none() {
                d.error = Some(r.clone());
            }
        }
        self.rules.retain(|r| r.count != Some(0));
        d
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub seq: u64,
    /// Milliseconds since the epoch.
    pub time_ms: u64,
    pub time: String,
    /// `xmlrpc`, `oneflow` or `onegate`.
    pub api: String,
    /// Method name or `VERB /path`.
    pub call: String,
    /// The caller's `User-Agent` (empty when it sent none): who mutated.
    pub agent: String,
    pub args: Value,
    /// `ok`, or the error returned.
    pub result: String,
}

#[derive(Default)]
pub struct Events {
    list: Vec<Event>,
    next: u64,
}

const MAX_EVENTS: usize = 200_000;

impl Events {
    pub fn push(&mut self, api: &str, call: &str, agent: &str, args: Value, result: String) {
        self.next += 1;
        let ms = crate::state::now_ms();
        let time = chrono::DateTime::from_timestamp_millis(ms as i64)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
            .unwrap_or_default();
        self.list.push(Event {
            seq: self.next,
            time_ms: ms,
            time,
            api: api.into(),
            call: call.into(),
            agent: agent.into(),
            args,
            result,
        });
        if self.list.len() > MAX_EVENTS {
            self.list.drain(..MAX_EVENTS / 10);
        }
    }
}

type S = AxState<Arc<Sim>>;

fn bad(msg: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": msg.into()}))).into_response()
}

fn not_found(msg: impl Into<String>) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error": msg.into()}))).into_response()
}

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/events", get(events).delete(clear_events))
        .route("/requests", get(requests).delete(clear_requests))
        .route(
            "/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/faults/{id}", delete(del_fault))
        .route("/boot-failures", post(boot_failures))
        .route("/onegate/{op}", post(onegate_switch))
        .route("/frontend/{op}", post(frontend_switch))
        .route("/vms", get(vms))
        .route("/vm/{id}/state", post(set_vm_state))
        .route("/vm/{id}/{op}", post(vm_op))
        .fallback(|| async { not_found("no such control route") })
        .with_state(sim)
}

#[derive(Deserialize)]
struct Since {
    since: Option<u64>,
    api: Option<String>,
    /// Only events whose User-Agent matches this glob.
    agent: Option<String>,
}

async fn events(AxState(sim): S, Query(q): Query<Since>) -> Response {
    let ev = sim.events.lock().unwrap_or_else(|e| e.into_inner());
    let list: Vec<&Event> = ev
        .list
        .iter()
        .filter(|e| {
            e.seq > q.since.unwrap_or(0)
                && q.api.as_ref().is_none_or(|a| *a == e.api)
                && q.agent.as_deref().is_none_or(|pat| glob(pat, &e.agent))
        })
        .collect();
    Json(json!({"events": list, "last_seq": ev.next})).into_response()
}

async fn clear_events(AxState(sim): S) -> StatusCode {
    sim.events
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .list
        .clear();
    StatusCode::NO_CONTENT
}

async fn requests(AxState(sim): S) -> Response {
    let r = sim.requests.lock().unwrap_or_else(|e| e.into_inner());
    let total: u64 = r.values().sum();
    Json(json!({"requests": *r, "total": total})).into_response()
}

async fn clear_requests(AxState(sim): S) -> StatusCode {
    sim.requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    StatusCode::NO_CONTENT
}

async fn list_faults(AxState(sim): S) -> Response {
    let f = sim.faults.lock().unwrap_or_else(|e| e.into_inner());
    Json(json!({"faults": f.rules})).into_response()
}

async fn add_fault(AxState(sim): S, body: axum::body::Bytes) -> Response {
    let rule: FaultRule = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("invalid fault rule: {e}")),
    };
    match sim
        .faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .add(rule)
    {
        Ok(id) => (StatusCode::CREATED, Json(json!({"id": id}))).into_response(),
        Err(e) => bad(e),
    }
}

async fn clear_faults(AxState(sim): S) -> StatusCode {
    sim.faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .rules
        .clear();
    StatusCode::NO_CONTENT
}

async fn del_fault(AxState(sim): S, Path(id): Path<u64>) -> Response {
    let mut f = sim.faults.lock().unwrap_or_else(|e| e.into_inner());
    let n = f.rules.len();
    f.rules.retain(|r| r.id != id);
    if f.rules.len() == n {
        return not_found(format!("no fault {id}"));
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn boot_failures(AxState(sim): S, body: axum::body::Bytes) -> Response {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad(format!("invalid JSON: {e}")),
    };
    let Some(n) = v.get("count").and_then(Value::as_u64) else {
        return bad("need {\"count\": N}");
    };
    sim.with(|st| st.boot_failures = n as u32);
    StatusCode::NO_CONTENT.into_response()
}

async fn onegate_switch(AxState(sim): S, Path(op): Path<String>) -> Response {
    match op.as_str() {
        "down" => sim.onegate_down().await,
        "up" => match sim.onegate_up().await {
            Ok(()) => {}
            Err(e) => {
                return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e})))
                    .into_response()
            }
        },
        _ => return not_found("use /onegate/down or /onegate/up"),
    }
    StatusCode::NO_CONTENT.into_response()
}

/// The whole front-end (oned, OneFlow, OneGate listeners) down or up.
async fn frontend_switch(AxState(sim): S, Path(op): Path<String>) -> Response {
    match op.as_str() {
        "down" => {
            for api in Api::ALL {
                sim.api_down(api).await;
            }
        }
        "up" => {
            for api in Api::ALL {
                if let Err(e) = sim.api_up(api).await {
                    return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e})))
                        .into_response();
                }
            }
        }
        _ => return not_found("use /frontend/down or /frontend/up"),
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Liveness, and the loopback net this simulator reserved (`127.<net>.0.0/16`): where an
/// administrator puts the address ranges of networks for the process runtime.
async fn health(AxState(sim): S) -> Response {
    let net = sim
        .st
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .knobs
        .loopback_net;
    Json(json!({"ok": true, "loopback_net": net})).into_response()
}

async fn vms(AxState(sim): S) -> Response {
    let st = sim.st.lock().unwrap_or_else(|e| e.into_inner());
    let list: Vec<Value> = st
        .vms
        .values()
        .map(|v| {
            let mut j = json!({"id": v.id, "name": v.name, "state": v.state, "lcm_state": v.lcm, "state_name": v.state_name(),
                   "ip": v.ip, "token": v.token, "pid": sim.guests.as_ref().and_then(|g| g.pid(v.id)),
                   "vm_dir": sim.guests.as_ref().map(|g| g.vm_dir(v.id))});
            if let Some(m) = &sim.machines {
                let s = m.status(v.id).unwrap_or_default();
                j["pid"] = json!(s.pid);
                j["vm_dir"] = json!(m.vm_dir(v.id));
                j["machine"] = json!({
                    "ready_ms": s.ready_after.map(|d| d.as_millis() as u64),
                    "memory_bytes": s.memory_bytes,
                    "error": s.error,
                    "partitioned": m.partitioned(v.id),
                });
            }
            j
        })
        .collect();
    Json(json!({"vms": list})).into_response()
}

async fn set_vm_state(AxState(sim): S, Path(id): Path<i64>, body: axum::body::Bytes) -> Response {
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad(format!("invalid JSON: {e}")),
    };
    let name = v.get("state").and_then(Value::as_str).unwrap_or("");
    let target = if let Some(l) = lcm_by_name(name).filter(|_| name != "INIT") {
        (S_ACTIVE, l)
    } else if let Some(s) = state_by_name(name) {
        (s, 0)
    } else {
        return bad(format!("unknown state {name:?}: use an LCM name (BOOT_FAILURE, UNKNOWN, …) or a VM state (POWEROFF, …)"));
    };
    let ok = sim.with(|st| {
        if !st.vms.contains_key(&id) {
            return false;
        }
        st.set_state(id, target.0, target.1);
        true
    });
    if !ok {
        return not_found(format!("no VM {id}"));
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn vm_op(AxState(sim): S, Path((id, op)): Path<(i64, String)>) -> Response {
    if !sim
        .st
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .vms
        .contains_key(&id)
    {
        return not_found(format!("no VM {id}"));
    }
    if let cut @ ("partition" | "heal") = op.as_str() {
        return partition(&sim, id, cut == "partition").await;
    }
    let sig = match op.as_str() {
        "crash" => Signal::SIGKILL,
        "freeze" => Signal::SIGSTOP,
        "thaw" => Signal::SIGCONT,
        _ => return not_found("use crash, freeze, thaw, partition or heal"),
    };
    let done = match (&sim.guests, &sim.machines) {
        (Some(g), _) if sig == Signal::SIGKILL => g.crash(id),
        (Some(g), _) => g.signal(id, sig),
        (None, Some(m)) => {
            let sim = sim.clone();
            // A machine's worker may be busy booting: wait for it off the runtime.
            let done = tokio::task::spawn_blocking(move || {
                let Some(m) = &sim.machines else { return false };
                if sig == Signal::SIGKILL {
                    m.crash(id)
                } else {
                    m.signal(id, sig)
                }
            })
            .await;
            let _ = m;
            done.unwrap_or(false)
        }
        (None, None) => return bad("the none runtime has no guest processes"),
    };
    if !done {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("VM {id} has no running guest")})),
        )
            .into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

/// `POST /vm/:id/partition` and `/heal`: the network-partition fault of the image runtime
/// ([`crate::machine::Machines::partition`]).
async fn partition(sim: &Arc<Sim>, id: i64, cut: bool) -> Response {
    let Some(_) = &sim.machines else {
        return bad(
            "the partition fault needs the image runtime: the process runtime's guests share \
             the host's loopback network, so their traffic cannot be told apart",
        );
    };
    let sim = sim.clone();
    let done = tokio::task::spawn_blocking(move || match &sim.machines {
        Some(m) => m.partition(id, cut),
        None => Ok(false),
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match done {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("VM {id} has no running machine")})),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e}))).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches() {
        assert!(glob("one.vm.*", "one.vm.action"));
        assert!(glob(
            "oneflow POST /service/*/scale",
            "oneflow POST /service/12/scale"
        ));
        assert!(!glob(
            "oneflow POST /service/*/scale",
            "oneflow POST /service/12/action"
        ));
        assert!(glob("*", "x"));
        assert!(!glob("a", "ab"));
    }

    #[test]
    fn count_rules_expire() {
        let mut f = Faults::default();
        f.add(FaultRule {
            id: 0,
            target: "one.vm.action".into(),
            kind: "error".into(),
            code: None,
            status: None,
            message: None,
            delay_ms: None,
            probability: None,
            count: Some(2),
            vm: None,
            agent: None,
        })
        .unwrap();
        assert!(f.check("one.vm.action").error.is_some());
        assert!(f.check("one.vm.info").error.is_none());
        assert!(f.check("one.vm.action").error.is_some());
        assert!(f.check("one.vm.action").error.is_none());
        assert!(f.rules.is_empty());
    }

    #[test]
    fn a_rule_naming_a_vm_fires_for_that_vm_only() {
        let mut f = Faults::new(Some(1));
        f.add(FaultRule {
            id: 0,
            target: "onegate PUT /vm".into(),
            kind: "error".into(),
            code: None,
            status: Some(503),
            message: None,
            delay_ms: None,
            probability: None,
            count: None,
            vm: Some(7),
            agent: None,
        })
        .unwrap();
        assert!(f.check_from("onegate PUT /vm", Some(7), "").error.is_some());
        assert!(f.check_from("onegate PUT /vm", Some(8), "").error.is_none());
        assert!(f.check_from("onegate GET /vm", Some(7), "").error.is_none());
        assert!(f.check("onegate PUT /vm").error.is_none());
    }

    /// A rule naming a User-Agent pattern cuts that client off only (one controller
    /// instance among several).
    #[test]
    fn a_rule_naming_an_agent_fires_for_that_client_only() {
        let mut f = Faults::new(Some(1));
        f.add(FaultRule {
            target: "one.document.*".into(),
            kind: "error".into(),
            agent: Some("*(ctl-a)".into()),
            ..FaultRule::default()
        })
        .unwrap();
        let a = "flower-reconcile/0.1.0 (ctl-a)";
        assert!(f.check_from("one.document.lock", None, a).error.is_some());
        let b = "flower-reconcile/0.1.0 (ctl-b)";
        assert!(f.check_from("one.document.lock", None, b).error.is_none());
        assert!(f.check_from("one.vm.action", None, a).error.is_none());
        assert!(f.check("one.document.lock").error.is_none());
    }
}
