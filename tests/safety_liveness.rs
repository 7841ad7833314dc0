//! Safety scenarios of issue #12 ("never destroy a healthy node"): the `run` service —
//! `service::serve` with the production reconciler — against onesim, with agents that
//! heartbeat through OneGate (`PUT /vm` with their VM token) as the real ones do. Each test
//! reproduces a failure the security review found and asserts, from onesim's event log,
//! the exact mutations: above all, that no `one.vm.action terminate-hard` ever named a VM
//! whose agent was heartbeating.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use flower_reconcile::one::ClientsBackend;
use flower_reconcile::reconciler::{Context, ReconcileOptions};
use flower_reconcile::service::config::RunSettings;
use flower_reconcile::source::SourceArgs;
use serde_json::{json, Value};
use tokio::time::Instant;

mod common;
use common::onesim_env::{
    control, events, fixtures, ready_with, spec_yaml, start_onesim, Served, SimAgents,
};

const PASSWORD: &str = "safety-pw";
/// Short enough that every scenario outlasts it several times.
const GRACE: &str = "    failurePolicy:\n      gracePeriod: 3s\n      heartbeatInterval: 1s\n";

struct Env {
    sim: onesim::Handle,
    ctx: Context,
    specs: tempfile::TempDir,
}

async fn env() -> Env {
    let (sim, one) = start_onesim(PASSWORD, |_| {}).await;
    let backend = ClientsBackend::new(&one).expect("clients");
    fixtures(&backend.oned).await;
    let options = ReconcileOptions {
        requeue_after_change: Duration::from_millis(300),
        max_view_age: Duration::from_secs(1),
        ..ReconcileOptions::default()
    };
    let ctx = Context::connect(Arc::new(backend), "ctl-safety", options)
        .await
        .expect("context");
    Env {
        sim,
        ctx,
        specs: tempfile::tempdir().expect("specs"),
    }
}

impl Env {
    fn write_spec(&self, count: u32, tail: &str) {
        let text = spec_yaml("alpha", count) + GRACE + tail;
        std::fs::write(self.specs.path().join("alpha.yaml"), text).expect("spec");
    }

    async fn control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        control(&self.sim, method, path, body).await
    }

    /// Every call onesim executed: (api call, args), in order.
    async fn calls(&self) -> Vec<(String, String)> {
        events(&self.sim)
            .await
            .into_iter()
            .map(|(call, e)| (call, e["args"].to_string()))
            .collect()
    }

    /// VMs named by a `terminate-hard` in onesim's log.
    async fn terminated(&self) -> Vec<String> {
        self.calls()
            .await
            .into_iter()
            .filter(|(c, a)| c == "xmlrpc one.vm.action" && a.contains("terminate-hard"))
            .map(|(_, a)| a)
            .collect()
    }

    /// The exact-call assertion of every scenario: onesim's log holds no `terminate-hard`
    /// at all, and every VM in `before` still runs.
    async fn assert_nothing_terminated(&self, before: &BTreeSet<i64>) {
        assert_eq!(self.terminated().await, Vec::<String>::new());
        assert!(
            self.running().is_superset(before),
            "every VM that ran still runs: {before:?} → {:?}",
            self.running()
        );
    }

    /// Ids of the running VMs.
    fn running(&self) -> BTreeSet<i64> {
        self.sim.sim.with(|st| {
            st.vms
                .values()
                .filter(|v| v.is_running())
                .map(|v| v.id)
                .collect()
        })
    }

    /// Service documents: (id, state, body).
    fn services(&self) -> Vec<(i64, i64, Value)> {
        self.sim.sim.with(|st| {
            st.docs
                .values()
                .filter(|d| d.doc_type == onesim::flow::SERVICE)
                .map(|d| (d.id, d.body["state"].as_i64().unwrap_or(-1), d.body.clone()))
                .collect()
        })
    }
}

/// onesim, `alpha` with `count` SuperNodes written, its agents and the service, once
/// Ready; and the ids of the VMs running then.
async fn started(count: u32) -> (Env, SimAgents, Service, BTreeSet<i64>) {
    let env = env().await;
    env.write_spec(count, "");
    let agents = SimAgents::new(env.sim.sim.clone(), &env.sim.urls().onegate);
    let svc = Service::start(&env, &agents).await;
    svc.ready(count).await;
    let before = env.running();
    (env, agents, svc, before)
}

/// OneGate `PUT /vm` (own VM) or `PUT /vms/:target` (a peer's), merge.
async fn put_vm(
    http: &reqwest::Client,
    gate: &str,
    vmid: i64,
    token: &str,
    target: Option<i64>,
    data: &str,
) -> Result<reqwest::StatusCode, reqwest::Error> {
    let path = target.map_or("vm".to_string(), |t| format!("vms/{t}"));
    http.put(format!("{gate}/{path}"))
        .header("X-ONEGATE-TOKEN", token)
        .header("X-ONEGATE-VMID", vmid.to_string())
        .form(&[("data", data), ("type", "1")])
        .send()
        .await
        .map(|r| r.status())
}

/// A running `serve()` over the env's spec directory, and its agents.
struct Service {
    served: Served,
    agents: tokio::task::JoinHandle<()>,
}

impl Service {
    async fn start(env: &Env, agents: &SimAgents) -> Service {
        let settings = RunSettings {
            source: SourceArgs {
                specs: Some(env.specs.path().to_path_buf()),
                interval: Some("200ms".parse().expect("duration")),
                ..SourceArgs::default()
            },
            max_backoff: Some("1s".parse().expect("duration")),
            ..RunSettings::default()
        };
        Service {
            served: Served::start(&env.ctx, settings).await,
            agents: agents.spawn(Duration::from_millis(200)),
        }
    }

    async fn cluster(&self) -> Value {
        self.served.cluster("alpha").await
    }

    /// Wait until `alpha` is Ready with `count` SuperNodes ready.
    async fn ready(&self, count: u32) {
        let t0 = Instant::now();
        loop {
            let c = self.cluster().await;
            if ready_with(&c, count) {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "not ready: {c}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every action line of the reconciles the status API remembers.
    async fn history(&self) -> String {
        self.cluster().await["status"]["lastReconciles"].to_string()
    }

    async fn stop(self) {
        self.agents.abort();
        self.served.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_vmpool_listing_never_terminates_a_heartbeating_node() {
    let (env, _agents, svc, before) = started(2).await;

    // Only the VM pool listing fails, for more than twice the grace period; OneGate and
    // the agents carry on. The controller keeps its last complete observation.
    env.control(
        reqwest::Method::POST,
        "/faults",
        Some(json!({"target": "one.vmpool.infoextended", "kind": "error"})),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let history = svc.history().await;
    env.control(reqwest::Method::DELETE, "/faults", None).await;
    svc.ready(2).await;
    svc.stop().await;

    env.assert_nothing_terminated(&before).await;
    assert!(
        !history.contains("terminated"),
        "nothing terminated while blind: {history}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_onegate_outage_terminates_no_supernode_and_is_reported() {
    let (env, _agents, svc, before) = started(4).await;

    // OneGate alone goes down (oned and OneFlow answer): every heartbeat stops for more
    // than twice the grace period.
    env.control(reqwest::Method::POST, "/onegate/down", None)
        .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let history = svc.history().await;
    let metrics = reqwest::get(format!("{}/metrics", svc.served.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    env.control(reqwest::Method::POST, "/onegate/up", None)
        .await;
    svc.ready(4).await;
    svc.stop().await;

    env.assert_nothing_terminated(&before).await;
    assert!(
        history.contains("most heartbeats are stale together"),
        "the outage is reported: {history}"
    );
    assert!(
        metrics.contains("flower_reconcile_safety_holds_total{reason=\"heartbeat_outage\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_rewritten_backwards_by_a_peer_is_ignored() {
    let (env, agents, svc, before) = started(2).await;
    let (victim, attacker, token) = env.sim.sim.with(|st| {
        let nodes: Vec<&onesim::state::Vm> = st
            .vms
            .values()
            .filter(|v| v.user_template.get("ROLE_NAME") == Some("supernode"))
            .collect();
        (nodes[0].id, nodes[1].id, nodes[1].token.clone())
    });
    // Past the grace period counted from boot: only heartbeats keep the nodes healthy.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // The victim's agent is between two heartbeats (it missed none the controller saw)
    // when a peer rewrites its FL_HEARTBEAT an hour back through OneGate's PUT /vms/:id.
    agents.silent.lock().expect("silent").insert(victim);
    let hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let status = put_vm(
        &reqwest::Client::new(),
        &env.sim.urls().onegate,
        attacker,
        &token,
        Some(victim),
        &format!("FL_HEARTBEAT=\"{hour_ago}\""),
    )
    .await
    .expect("PUT /vms/:id");
    assert!(status.is_success(), "{status}");
    // A spec change makes the controller reconcile (and observe) within the grace period
    // of the victim's last real heartbeat.
    env.write_spec(3, "");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    agents.silent.lock().expect("silent").remove(&victim);
    svc.ready(3).await;
    svc.stop().await;

    env.assert_nothing_terminated(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_version_churn_keeps_at_most_one_replacement_in_flight() {
    let (env, agents, svc, _) = started(2).await;
    let original = env.services()[0].0;
    // From now on no replacement ever becomes ready (its agents never say so).
    *agents.ready_services.lock().expect("ready") = Some([original].into());

    // OneFlow: 3 UNDEPLOYING, 5 DONE.
    let active = |env: &Env| {
        env.services()
            .iter()
            .filter(|(_, s, _)| !matches!(s, 3 | 5))
            .count()
    };
    let mut most = 0;
    for version in ["1.26.0", "1.27.0", "1.28.0"] {
        env.write_spec(2, &format!("  flowerVersion: {version}\n"));
        // Until a replacement for this version exists (the unready one before it gone).
        let t0 = Instant::now();
        loop {
            most = most.max(active(&env));
            let has = env.services().iter().any(|(_, s, b)| {
                !matches!(s, 3 | 5) && b.to_string().contains(&format!("\"{version}\""))
            });
            if has {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no replacement for {version}: {:?}",
                env.services()
                    .iter()
                    .map(|(i, s, _)| (*i, *s))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Let it settle for a while: nothing more is created.
    for _ in 0..50 {
        most = most.max(active(&env));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    svc.stop().await;

    assert_eq!(most, 2, "the serving service and one replacement at most");
    let calls = env.calls().await;
    let instantiated = calls
        .iter()
        .filter(|(c, _)| c.starts_with("oneflow POST /service_template/") && c.ends_with("/action"))
        .count();
    let undeployed: Vec<&String> = calls
        .iter()
        .filter(|(c, _)| c.starts_with("oneflow DELETE /service/"))
        .map(|(c, _)| c)
        .collect();
    // The original, then one replacement per version; the two unready ones undeployed.
    assert_eq!(instantiated, 4, "{calls:?}");
    assert_eq!(undeployed.len(), 2, "{undeployed:?}");
    assert!(
        !undeployed
            .iter()
            .any(|c| c.ends_with(&format!("/{original}"))),
        "the serving service stays: {undeployed:?}"
    );
    assert_eq!(env.terminated().await, Vec::<String>::new());
}
