//! What the controller tests against onesim share: the VM templates and network their
//! specs name, a spec file, the agents' attributes, a role's cardinality, simulated agents
//! heartbeating through OneGate.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flower_reconcile::one::{
    ApiBudget, ApiStats, Credentials, OneConfig, OneFlowClient, OnedClient,
};
use serde_json::Value;

/// onesim for controller tests (`none` runtime, VMs ready after 50 ms; `adjust` may
/// change more) and a client configuration for its `oneadmin` (1,000 requests/s).
pub async fn start_onesim(
    password: &str,
    adjust: impl FnOnce(&mut onesim::Config),
) -> (onesim::Handle, OneConfig) {
    let mut cfg = onesim::Config::for_tests(password);
    cfg.runtime = onesim::Runtime::None {
        auto_ready: Some(std::time::Duration::from_millis(50)),
    };
    adjust(&mut cfg);
    let sim = onesim::start(cfg).await.expect("onesim starts");
    let one = one_config(&sim, "oneadmin", password);
    (sim, one)
}

/// An oned client as oneadmin on `sim` (e.g. for the [`fixtures`]).
pub fn admin_oned(sim: &onesim::Handle, password: &str) -> OnedClient {
    let one = one_config(sim, "oneadmin", password);
    OnedClient::new(
        &one,
        ApiBudget::new(one.requests_per_second),
        ApiStats::new(),
    )
    .expect("oned client")
}

/// onesim with the [`fixtures`], and a controller context over it: what every
/// controller-against-onesim test starts from.
pub struct ControllerEnv {
    /// The simulator.
    pub sim: onesim::Handle,
    /// The controller's context (its id as given).
    pub ctx: flower_reconcile::reconciler::Context,
    /// The clients the context uses.
    pub backend: std::sync::Arc<flower_reconcile::one::ClientsBackend>,
}

/// [`start_onesim`] (`adjust`ed), the [`fixtures`], and a context for `controller_id`.
pub async fn controller_env(
    password: &str,
    controller_id: &str,
    adjust: impl FnOnce(&mut onesim::Config),
) -> ControllerEnv {
    let (sim, one) = start_onesim(password, adjust).await;
    let backend =
        std::sync::Arc::new(flower_reconcile::one::ClientsBackend::new(&one).expect("clients"));
    fixtures(&backend.oned).await;
    let ctx = flower_reconcile::reconciler::Context::connect(
        backend.clone(),
        controller_id,
        flower_reconcile::reconciler::ReconcileOptions::default(),
    )
    .await
    .expect("context");
    ControllerEnv { sim, ctx, backend }
}

/// The two VM templates (`flower-superlink`, `flower-supernode`) and the network
/// (`private`) that [`spec_yaml`] names.
pub async fn fixtures(oned: &OnedClient) {
    for name in ["flower-superlink", "flower-supernode"] {
        oned.template_allocate(&format!(
            "NAME=\"{name}\"\nCPU=\"1\"\nMEMORY=\"512\"\nCONTEXT=[TOKEN=\"YES\"]"
        ))
        .await
        .expect("template");
    }
    oned.vn_allocate(
        "NAME=\"private\"\nVN_MAD=\"bridge\"\nBRIDGE=\"br0\"\nAR=[TYPE=\"IP4\",IP=\"10.0.0.10\",SIZE=\"250\"]",
        -1,
    )
    .await
    .expect("network");
}

/// A FlowerCluster spec file over [`fixtures`] with `count` SuperNodes.
pub fn spec_yaml(name: &str, count: u32) -> String {
    format!(
        "apiVersion: {}\nkind: {}\nmetadata:\n  name: {name}\nspec:\n  opennebula:\n    templates:\n      superlink: flower-superlink\n      supernode: flower-supernode\n    network: private\n  supernodes:\n    count: {count}\n",
        flower_reconcile::api::API_VERSION,
        flower_reconcile::api::KIND
    )
}

/// What the agents would publish on every running VM: readiness (the SuperLink's with its
/// `FL_ENDPOINT`) and the heartbeat `beat`
/// (a heartbeat set to `stale` by a test is left alone).
pub fn publish_agent_attributes(st: &mut onesim::state::State, beat: &str) {
    for vm in st.vms.values_mut().filter(|v| v.is_running()) {
        match vm
            .user_template
            .get("ROLE_NAME")
            .map(str::to_string)
            .as_deref()
        {
            Some("superlink") => {
                vm.user_template.set("FL_READY", "YES");
                let endpoint = format!("{}:9092", vm.ip);
                vm.user_template.set("FL_ENDPOINT", &endpoint);
            }
            Some("supernode") => vm.user_template.set("FL_NODE_READY", "YES"),
            _ => {}
        }
        if vm.user_template.get("FL_HEARTBEAT") != Some("stale") {
            vm.user_template.set("FL_HEARTBEAT", beat);
        }
    }
}

/// The `supernode` role's cardinality in a OneFlow service body (number or string).
pub fn supernode_cardinality(body: &Value) -> u64 {
    body["roles"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "supernode"))
        .and_then(|r| {
            r["cardinality"]
                .as_u64()
                .or_else(|| r["cardinality"].as_str()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Whether a cluster as the status API shows it (`/api/v1/clusters/NAME`) is Ready for a
/// spec wanting `count` SuperNodes: the Ready condition (plan::ready's verdict, against
/// the spec's target) is True, the status was computed for that target, and exactly
/// `count` SuperNodes are ready (a scale-down is done too).
pub fn ready_with(cluster: &Value, count: u32) -> bool {
    let status = &cluster["status"];
    let ready = status["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    ready && status["nodes"]["desired"] == count && status["nodes"]["ready"] == count
}

/// A running `service::serve()` with the production reconciler over `ctx`: its HTTP base
/// URL and how to stop it.
pub struct Served {
    pub base: String,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _state: tempfile::TempDir,
}

impl Served {
    /// Resolve `settings` with a fresh state dir and a 200 ms poll, then serve.
    pub async fn start(
        ctx: &flower_reconcile::reconciler::Context,
        settings: flower_reconcile::service::config::RunSettings,
    ) -> Served {
        use flower_reconcile::reconciler::driver::OneReconciler;
        use std::sync::Arc;
        use std::time::Duration;
        let state = tempfile::tempdir().expect("state dir");
        let mut cfg = flower_reconcile::service::config::RunSettings {
            state_dir: Some(state.path().to_path_buf()),
            poll_interval: Some("200ms".parse().expect("duration")),
            ..settings
        }
        .resolve()
        .expect("settings");
        cfg.runtime.debounce = Duration::from_millis(20);
        cfg.runtime.min_observe_gap = Duration::from_millis(100);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let source = cfg.source.build(&state.path().join("git")).expect("source");
        let ctx = Arc::new(ctx.clone());
        let stats = ctx.api_stats();
        assert!(stats.is_some(), "the clients expose their call statistics");
        let reconciler = Arc::new(OneReconciler::new(ctx).with_prune_policy(cfg.prune.clone()));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            flower_reconcile::service::serve(
                reconciler, source, &cfg, listener, stats, None, None, stop,
            )
            .await
        });
        Served {
            base,
            shutdown,
            task,
            _state: state,
        }
    }

    /// GET `path`: status code and body (0 and empty when the server is not up yet).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let Ok(r) = reqwest::get(format!("{}{path}", self.base)).await else {
            return (0, String::new());
        };
        let code = r.status().as_u16();
        (code, r.text().await.unwrap_or_default())
    }

    /// `/api/v1/clusters/NAME` as JSON (Null when not served).
    pub async fn cluster(&self, name: &str) -> Value {
        let (code, body) = self.get(&format!("/api/v1/clusters/{name}")).await;
        if code != 200 {
            return Value::Null;
        }
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// Graceful stop; the service must have exited cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("serve");
    }
}

/// Client configuration for `user` on `sim`, with a budget tests never wait on.
pub fn one_config(sim: &onesim::Handle, user: &str, password: &str) -> OneConfig {
    let url = |s: &str| url::Url::parse(s).expect("url");
    let mut one = OneConfig::new(
        url(&sim.urls().xmlrpc),
        url(&sim.urls().oneflow),
        Credentials::new(user, password).expect("credentials"),
    );
    one.requests_per_second = std::num::NonZeroU32::new(1000).expect("nonzero");
    one
}

/// Another user of the same cloud (a tenant, in group `users`) and its own clients.
pub struct Tenant {
    /// The tenant's user id.
    pub uid: i64,
    /// Its client configuration (to build a controller acting as this user).
    pub config: OneConfig,
    /// oned as the tenant.
    pub oned: OnedClient,
    /// OneFlow as the tenant.
    pub oneflow: OneFlowClient,
}

/// Allocate user `name` (password `NAME-pw`) in onesim, as `one.user.allocate` does,
/// and connect as it.
pub fn tenant(sim: &onesim::Handle, name: &str) -> Tenant {
    let password = format!("{name}-pw");
    let uid = sim
        .sim
        .with(|st| st.alloc_user(name, &password, "core"))
        .expect("user allocated");
    let cfg = one_config(sim, name, &password);
    let (budget, stats) = (ApiBudget::new(cfg.requests_per_second), ApiStats::new());
    Tenant {
        uid,
        oned: OnedClient::new(&cfg, budget.clone(), stats.clone()).expect("oned client"),
        oneflow: OneFlowClient::new(&cfg, budget, stats).expect("oneflow client"),
        config: cfg,
    }
}

/// Stand-in agents for the converge loop: before each observation every running VM
/// publishes readiness and a fresh heartbeat, as the agents would.
pub struct StandInAgents<'a>(pub &'a onesim::Handle);

impl flower_reconcile::reconciler::converge::Hooks for StandInAgents<'_> {
    fn before_observe(&mut self) {
        let beat = chrono::Utc::now().to_rfc3339();
        self.0.sim.with(|st| publish_agent_attributes(st, &beat));
    }
}

/// Simulated agents as the real ones behave, over OneGate's HTTP API: every `every`, each
/// running VM with a OneGate token publishes `FL_HEARTBEAT` with its own token — so a
/// OneGate outage silences them — and its readiness (`FL_READY` and `FL_ENDPOINT` on the
/// SuperLink, `FL_NODE_READY` on a SuperNode). The VMs' PUTs go out concurrently (1 s
/// timeout each); a failed one is what a real agent logs and retries.
#[derive(Clone)]
pub struct SimAgents {
    /// The simulator whose VMs speak: a slot, so a test that restarts onesim swaps it.
    pub sim: Arc<Mutex<Arc<onesim::Sim>>>,
    /// OneGate's base URL.
    pub gate: String,
    /// VMs that publish nothing (muted, or crashed).
    pub silent: Arc<Mutex<BTreeSet<i64>>>,
    /// When set, VMs of services outside it publish a heartbeat but never readiness.
    pub ready_services: Arc<Mutex<Option<BTreeSet<i64>>>>,
}

impl SimAgents {
    /// Agents for every VM of `sim`, speaking to OneGate at `gate`.
    pub fn new(sim: Arc<onesim::Sim>, gate: &str) -> SimAgents {
        SimAgents {
            sim: Arc::new(Mutex::new(sim)),
            gate: gate.to_string(),
            silent: Arc::default(),
            ready_services: Arc::default(),
        }
    }

    /// Starts them; they speak until the task is aborted.
    pub fn spawn(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .build()
                .expect("http");
            loop {
                let sim = me.sim.lock().expect("sim slot").clone();
                let silent = me.silent.lock().expect("silent").clone();
                let ready_services = me.ready_services.lock().expect("ready").clone();
                let vms: Vec<(i64, String, String, Option<i64>, String)> = sim.with(|st| {
                    st.vms
                        .values()
                        .filter(|v| v.is_running() && !v.token.is_empty())
                        .filter(|v| !silent.contains(&v.id))
                        .map(|v| {
                            let tpl = |k| v.user_template.get(k).map(str::to_string);
                            (
                                v.id,
                                v.token.clone(),
                                tpl("ROLE_NAME").unwrap_or_default(),
                                tpl("SERVICE_ID").and_then(|s| s.parse().ok()),
                                v.ip.clone(),
                            )
                        })
                        .collect()
                });
                let mut set = tokio::task::JoinSet::new();
                for (id, token, role, service, ip) in vms {
                    let mut data = format!("FL_HEARTBEAT=\"{}\"", chrono::Utc::now().to_rfc3339());
                    let ready = ready_services
                        .as_ref()
                        .is_none_or(|s| service.is_some_and(|x| s.contains(&x)));
                    if ready && role == "superlink" {
                        data.push_str(&format!("\nFL_READY=\"YES\"\nFL_ENDPOINT=\"{ip}:9092\""));
                    } else if ready {
                        data.push_str("\nFL_NODE_READY=\"YES\"");
                    }
                    let req = http
                        .put(format!("{}/vm", me.gate))
                        .header("X-ONEGATE-TOKEN", token)
                        .header("X-ONEGATE-VMID", id.to_string())
                        .form(&[("data", data.as_str()), ("type", "1")]);
                    set.spawn(async move {
                        let _ = req.send().await;
                    });
                }
                while set.join_next().await.is_some() {}
                tokio::time::sleep(every).await;
            }
        })
    }
}

/// The converge loop over every cluster, every action allowed, with stand-in agents:
/// returns once every cluster is Ready (plan::ready) with an empty plan; panics with
/// what is not ready after 60 s.
pub async fn converge(
    ctx: &flower_reconcile::reconciler::Context,
    sim: &onesim::Handle,
    d: &flower_reconcile::plan::DesiredState,
) {
    use flower_reconcile::reconciler::converge::{self as c, ConvergeOptions};
    let opts = ConvergeOptions {
        scope: None,
        timeout: std::time::Duration::from_secs(60),
        poll: std::time::Duration::from_millis(50),
        allow: &c::allow_all,
    };
    if let Err(e) = c::converge(ctx, d, &opts, &mut StandInAgents(sim)).await {
        panic!("{:#}", anyhow::Error::from(e));
    }
}

/// `flower-reconcile ARGS` (the built binary) as oneadmin on `sim`: `ONE_AUTH` is a
/// private file under `home`, which is also `HOME`.
pub fn reconcile_command(
    sim: &onesim::Handle,
    password: &str,
    home: &std::path::Path,
) -> tokio::process::Command {
    use std::os::unix::fs::PermissionsExt;
    let auth = home.join("one_auth");
    std::fs::write(&auth, format!("oneadmin:{password}\n")).expect("auth file");
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_flower-reconcile"));
    cmd.env("ONE_XMLRPC", &sim.urls().xmlrpc)
        .env("ONEFLOW_URL", &sim.urls().oneflow)
        .env("ONE_AUTH", &auth)
        .env("NO_COLOR", "1")
        .env("HOME", home)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A call to onesim's control API (faults, switches, the event log); panics unless 2xx.
pub async fn control(
    sim: &onesim::Handle,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", sim.urls().control));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("control API");
    assert!(resp.status().is_success(), "{path}: {}", resp.status());
    resp.json().await.unwrap_or(Value::Null)
}

/// onesim's whole event log, oldest first, each with its `"<api> <call>"`.
pub async fn events(sim: &onesim::Handle) -> Vec<(String, Value)> {
    let v = control(sim, reqwest::Method::GET, "/events?since=0", None).await;
    v["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            let call = format!(
                "{} {}",
                e["api"].as_str().unwrap_or(""),
                e["call"].as_str().unwrap_or("")
            );
            (call, e)
        })
        .collect()
}
