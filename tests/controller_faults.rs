//! Fault tests: the `run` service — `service::serve` with the production reconciler, the
//! code `flower-reconcile run` runs — against onesim with injected faults (random
//! errors, latency beyond the client timeout, a 60 s outage). They assert convergence
//! and, from onesim's event log, that no mutation was duplicated.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flower_reconcile::one::backend::{
    BackendFuture, Document, Identity, NameScope, OneBackend, VmRecord,
};
use flower_reconcile::one::ClientsBackend;
use flower_reconcile::one::{ApiStats, RetryPolicy};
use flower_reconcile::reconciler::driver::OneReconciler;
use flower_reconcile::reconciler::{Context, ReconcileOptions};
use flower_reconcile::runtime::backoff::BackoffPolicy;
use flower_reconcile::service::config::{RunConfig, RunSettings};
use flower_reconcile::service::serve;
use flower_reconcile::source::SourceArgs;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

mod common;
use common::onesim_env::{
    control, events, fixtures, publish_agent_attributes, ready_with, spec_yaml, start_onesim,
    supernode_cardinality,
};

const PASSWORD: &str = "faults-pw";

/// The clients, recording when each backend call started (one entry per logical call;
/// the clients' own read retries are inside it).
struct Recording {
    inner: ClientsBackend,
    calls: Mutex<Vec<(Instant, &'static str)>>,
}

impl Recording {
    fn note(&self, what: &'static str) {
        self.calls
            .lock()
            .expect("calls")
            .push((Instant::now(), what));
    }

    fn starts(&self, what: &str, from: Instant, to: Instant) -> Vec<Instant> {
        self.calls
            .lock()
            .expect("calls")
            .iter()
            .filter(|(t, w)| *w == what && *t >= from && *t < to)
            .map(|(t, _)| *t)
            .collect()
    }
}

impl OneBackend for Recording {
    fn system_version(&self) -> BackendFuture<'_, String> {
        self.note("version");
        self.inner.system_version()
    }
    fn whoami(&self) -> BackendFuture<'_, Identity> {
        self.note("whoami");
        self.inner.whoami()
    }
    fn list_services(&self) -> BackendFuture<'_, Vec<Document>> {
        self.note("list_services");
        self.inner.list_services()
    }
    fn list_vms(&self, page_size: u32) -> BackendFuture<'_, Vec<VmRecord>> {
        self.note("list_vms");
        self.inner.list_vms(page_size)
    }
    fn list_service_templates(&self) -> BackendFuture<'_, Vec<Document>> {
        self.note("list_service_templates");
        self.inner.list_service_templates()
    }
    fn create_service_template(&self, body: Value) -> BackendFuture<'_, u64> {
        self.note("create_service_template");
        self.inner.create_service_template(body)
    }
    fn update_service_template(&self, id: u64, body: Value) -> BackendFuture<'_, ()> {
        self.note("update_service_template");
        self.inner.update_service_template(id, body)
    }
    fn get_service(&self, id: u64) -> BackendFuture<'_, Document> {
        self.note("get_service");
        self.inner.get_service(id)
    }
    fn update_service(&self, id: u64, body: Value) -> BackendFuture<'_, ()> {
        self.note("update_service");
        self.inner.update_service(id, body)
    }
    fn instantiate(&self, template_id: u64, merge: Value) -> BackendFuture<'_, u64> {
        self.note("instantiate");
        self.inner.instantiate(template_id, merge)
    }
    fn scale(&self, service_id: u64, role: &str, cardinality: u32) -> BackendFuture<'_, ()> {
        self.note("scale");
        self.inner.scale(service_id, role, cardinality)
    }
    fn delete_service(&self, service_id: u64) -> BackendFuture<'_, ()> {
        self.note("delete_service");
        self.inner.delete_service(service_id)
    }
    fn vm_update_merge(&self, vm_id: u64, template: String) -> BackendFuture<'_, ()> {
        self.note("vm_update_merge");
        self.inner.vm_update_merge(vm_id, template)
    }
    fn vm_info(&self, vm_id: u64) -> BackendFuture<'_, VmRecord> {
        self.note("vm_info");
        self.inner.vm_info(vm_id)
    }
    fn vm_terminate_hard(&self, vm_id: u64) -> BackendFuture<'_, ()> {
        self.note("vm_terminate_hard");
        self.inner.vm_terminate_hard(vm_id)
    }
    fn vm_templates(&self, scope: NameScope) -> BackendFuture<'_, Vec<(u64, String)>> {
        self.note("vm_templates");
        self.inner.vm_templates(scope)
    }
    fn networks(&self, scope: NameScope) -> BackendFuture<'_, Vec<(u64, String)>> {
        self.note("networks");
        self.inner.networks(scope)
    }
    fn vm_template_name(&self, id: u64) -> BackendFuture<'_, String> {
        self.note("vm_template_name");
        self.inner.vm_template_name(id)
    }
    fn network_name(&self, id: u64) -> BackendFuture<'_, String> {
        self.note("network_name");
        self.inner.network_name(id)
    }
    fn api_stats(&self) -> Option<Arc<ApiStats>> {
        self.inner.api_stats()
    }
}

struct Env {
    sim: onesim::Handle,
    backend: Arc<Recording>,
    ctx: Context,
}

/// onesim (seeded faults) with the two VM templates and the network the specs name, and
/// a controller context whose requests time out after `timeout`.
async fn env(seed: u64, timeout: Duration, ambiguous_hold: Duration) -> Env {
    let (sim, mut one) = start_onesim(PASSWORD, |cfg| cfg.fault_seed = Some(seed)).await;
    one.timeout = timeout;
    one.retry = RetryPolicy {
        max_retries: 3,
        min_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    };
    let inner = ClientsBackend::new(&one).expect("clients");
    fixtures(&inner.oned).await;
    let backend = Arc::new(Recording {
        inner,
        calls: Mutex::default(),
    });
    let options = ReconcileOptions {
        requeue_after_change: Duration::from_millis(300),
        ambiguous_hold,
        ..ReconcileOptions::default()
    };
    let ctx = Context::connect(backend.clone(), "ctl-faults", options)
        .await
        .expect("context");
    Env { sim, backend, ctx }
}

impl Env {
    async fn control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        control(&self.sim, method, path, body).await
    }

    async fn fault(&self, rule: Value) {
        self.control(reqwest::Method::POST, "/faults", Some(rule))
            .await;
    }

    async fn clear_faults(&self) {
        self.control(reqwest::Method::DELETE, "/faults", None).await;
    }

    /// Mutations in onesim's log: (call with numbers as N, result, args).
    async fn mutations(&self) -> Vec<(String, String, Value)> {
        let n = regex::Regex::new(r"\d+").expect("regex");
        events(&self.sim)
            .await
            .into_iter()
            .map(|(call, e)| {
                (
                    n.replace_all(&call, "N").into_owned(),
                    e["result"].as_str().unwrap_or("").to_string(),
                    e["args"].clone(),
                )
            })
            .collect()
    }

    /// OneFlow documents of `doc_type` straight from onesim's state (no faults there).
    fn docs(&self, doc_type: i64) -> Vec<Value> {
        self.sim.sim.with(|st| {
            st.docs
                .values()
                .filter(|d| d.doc_type == doc_type)
                .map(|d| d.body.clone())
                .collect()
        })
    }

    fn services(&self) -> Vec<Value> {
        self.docs(onesim::flow::SERVICE)
    }

    /// (id, state) of every VM onesim holds (DONE ones included until it drops them).
    fn vm_states(&self) -> Vec<(i64, u32)> {
        self.sim
            .sim
            .with(|st| st.vms.values().map(|v| (v.id, v.state)).collect())
    }
}

fn successful(mutations: &[(String, String, Value)], call: &str) -> usize {
    mutations
        .iter()
        .filter(|(c, r, _)| c == call && (r.starts_with('2') || r == "ok"))
        .count()
}

/// What the agents would publish on every running VM, every 100 ms: readiness and a
/// fresh heartbeat (written into onesim's state directly, so OneGate faults are moot),
/// except while `silent` (their OneGate is down).
fn agents(sim: &onesim::Handle, silent: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let sim = sim.sim.clone();
    tokio::spawn(async move {
        loop {
            let beat = chrono::Utc::now().to_rfc3339();
            if !silent.load(Ordering::SeqCst) {
                sim.with(|st| publish_agent_attributes(st, &beat));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// A running `serve()` over a spec directory.
struct Service {
    base: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    agents: tokio::task::JoinHandle<()>,
    /// Agents publish nothing while set.
    silent: Arc<AtomicBool>,
}

/// Runtime settings that keep the tests short: fast poll, backoff 100 ms → `max`.
fn run_config(specs: &Path, state: &Path, max_backoff: Duration) -> RunConfig {
    let mut cfg = RunSettings {
        source: SourceArgs {
            specs: Some(specs.to_path_buf()),
            interval: Some("200ms".parse().expect("duration")),
            ..SourceArgs::default()
        },
        state_dir: Some(state.to_path_buf()),
        poll_interval: Some("200ms".parse().expect("duration")),
        ..RunSettings::default()
    }
    .resolve()
    .expect("settings");
    cfg.runtime.debounce = Duration::from_millis(20);
    cfg.runtime.min_observe_gap = Duration::from_millis(50);
    cfg.runtime.history = 50;
    cfg.runtime.backoff = BackoffPolicy {
        initial: Duration::from_millis(100),
        max: max_backoff,
        factor: 2,
        jitter: 0.0,
    };
    cfg
}

/// A spec directory holding `alpha.yaml` (rewritten by [`Specs::set`]) and a state dir.
struct Specs {
    dir: tempfile::TempDir,
    state: tempfile::TempDir,
    /// Appended to the `supernodes` section.
    supernodes_tail: &'static str,
}

impl Specs {
    fn new(count: u32) -> Specs {
        Self::with_tail(count, "")
    }

    fn with_tail(count: u32, supernodes_tail: &'static str) -> Specs {
        let s = Specs {
            dir: tempfile::tempdir().expect("specs"),
            state: tempfile::tempdir().expect("state"),
            supernodes_tail,
        };
        s.set(count);
        s
    }

    fn set(&self, count: u32) {
        let text = spec_yaml("alpha", count) + self.supernodes_tail;
        std::fs::write(self.dir.path().join("alpha.yaml"), text).expect("spec");
    }

    fn config(&self, max_backoff: Duration) -> RunConfig {
        run_config(self.dir.path(), self.state.path(), max_backoff)
    }
}

impl Service {
    async fn start(env: &Env, cfg: RunConfig) -> Service {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let source = cfg
            .source
            .build(&cfg.state_dir.join("git"))
            .expect("source");
        let ctx = Arc::new(env.ctx.clone());
        let stats = ctx.api_stats();
        let reconciler = Arc::new(OneReconciler::new(ctx));
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let silent = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(async move {
            serve(reconciler, source, &cfg, listener, stats, None, None, stop).await
        });
        Service {
            base,
            shutdown,
            task,
            agents: agents(&env.sim, silent.clone()),
            silent,
        }
    }

    async fn cluster(&self, name: &str) -> Value {
        let Ok(r) = reqwest::get(format!("{}/api/v1/clusters/{name}", self.base)).await else {
            return Value::Null;
        };
        if !r.status().is_success() {
            return Value::Null;
        }
        r.json().await.unwrap_or(Value::Null)
    }

    async fn stop(self) {
        self.agents.abort();
        self.shutdown.cancel();
        self.task.await.expect("join").expect("serve");
    }
}

/// Ready with `count` SuperNodes ready, and OneFlow's role at `count`.
async fn converged(env: &Env, svc: &Service, name: &str, count: u32) -> bool {
    let c = svc.cluster(name).await;
    let services = env.services();
    ready_with(&c, count)
        && c["status"]["nodes"]["running"] == count
        && services.len() == 1
        && supernode_cardinality(&services[0]) == u64::from(count)
}

/// Wait until converged; returns how long it took.
async fn wait_converged(
    env: &Env,
    svc: &Service,
    name: &str,
    count: u32,
    limit: Duration,
) -> Duration {
    let t0 = Instant::now();
    while !converged(env, svc, name, count).await {
        assert!(
            t0.elapsed() < limit,
            "{name} not converged to {count} within {limit:?}: {}\nservices: {:?}",
            svc.cluster(name).await,
            env.services()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t0.elapsed()
}

/// What every fault test asserts about the log: one template, one service, scale requests
/// never beyond `max_count`, nothing terminated or undeployed.
fn assert_no_duplicated_mutation(log: &[(String, String, Value)], max_count: u64) {
    let calls: Vec<&str> = log.iter().map(|(c, _, _)| c.as_str()).collect();
    assert_eq!(
        successful(log, "oneflow POST /service_template"),
        1,
        "exactly one service template created: {log:#?}"
    );
    assert_eq!(
        successful(log, "oneflow POST /service_template/N/action"),
        1,
        "exactly one service instantiated: {log:#?}"
    );
    for (call, _, args) in log
        .iter()
        .filter(|(c, _, _)| c == "oneflow POST /service/N/scale")
    {
        let to = args["cardinality"]
            .as_u64()
            .or_else(|| args["cardinality"].as_str()?.parse().ok())
            .unwrap_or(u64::MAX);
        assert!(to <= max_count, "{call} overshoots: {args}");
    }
    for forbidden in ["oneflow DELETE /service/N", "xmlrpc one.vm.action"] {
        assert!(!calls.contains(&forbidden), "{forbidden} in {calls:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_of_calls_failing_still_converge_without_duplicates() {
    let env = env(7, Duration::from_secs(2), Duration::from_millis(500)).await;
    // The first attempt of each mutation fails for sure (500, or 503: outcome unknown).
    for (target, status) in [
        ("oneflow POST /service_template", 500),
        ("oneflow POST /service_template/*/action", 503),
        ("oneflow POST /service/*/scale", 500),
    ] {
        env.fault(json!({"target": target, "kind": "error", "status": status, "count": 1}))
            .await;
    }
    // 30 % of every oned call fails with INTERNAL; 30 % of every OneFlow call with a
    // 500 (15 %) or a 503 (15 % of the rest: 0.15 + 0.85 · 0.18 ≈ 0.30).
    env.fault(json!({"target": "one.*", "kind": "error", "probability": 0.3, "message": "injected INTERNAL"}))
        .await;
    env.fault(json!({"target": "oneflow *", "kind": "error", "status": 500, "probability": 0.15}))
        .await;
    env.fault(json!({"target": "oneflow *", "kind": "error", "status": 503, "probability": 0.18}))
        .await;
    let specs = Specs::new(2);
    let svc = Service::start(&env, specs.config(Duration::from_secs(1))).await;

    let created = wait_converged(&env, &svc, "alpha", 2, Duration::from_secs(60)).await;
    specs.set(4);
    let scaled = wait_converged(&env, &svc, "alpha", 4, Duration::from_secs(60)).await;
    eprintln!("converged under 30 % faults: created in {created:?}, scaled 2 → 4 in {scaled:?}");
    let c = svc.cluster("alpha").await;
    svc.stop().await;
    env.clear_faults().await;

    let log = env.mutations().await;
    for call in [
        "oneflow POST /service_template",
        "oneflow POST /service_template/N/action",
        "oneflow POST /service/N/scale",
    ] {
        assert!(
            log.iter().any(|(c, r, _)| c == call && r.starts_with('5')),
            "{call} failed at least once: {log:#?}"
        );
    }
    let stats = env.ctx.api_stats().expect("stats").snapshot();
    let total: u64 = stats.iter().map(|e| e.calls).sum();
    let failed: u64 = stats
        .iter()
        .filter(|e| e.outcome != flower_reconcile::one::Outcome::Ok)
        .map(|e| e.calls)
        .sum();
    eprintln!("API calls: {total}, failed: {failed}");
    let rate = failed as f64 / total as f64;
    assert!(
        (0.15..0.45).contains(&rate),
        "{failed}/{total} calls failed"
    );
    assert_no_duplicated_mutation(&log, 4);
    assert_eq!(
        successful(&log, "oneflow POST /service/N/scale"),
        1,
        "one successful scale to 4: {log:#?}"
    );
    let history = c["status"]["lastReconciles"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let errors = history
        .iter()
        .filter(|r| {
            r["outcome"]
                .as_str()
                .is_some_and(|o| o.starts_with("error"))
        })
        .count();
    eprintln!("reconciles: {} recorded, {errors} failed", history.len());
    assert!(errors >= 3, "the failed mutations show in the history: {c}");
    assert_eq!(env.docs(onesim::flow::TEMPLATE).len(), 1);
    assert!(
        env.vm_states().iter().all(|(_, s)| *s != 6),
        "no VM terminated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_beyond_the_client_timeout_creates_one_service_and_scales_once() {
    // Requests time out after 500 ms; after an unknown outcome the cluster is left alone
    // for twice that.
    let env = env(11, Duration::from_millis(500), Duration::from_secs(1)).await;
    // Mutations held up beyond the timeout: OneFlow carries them out after the client
    // gave up, 400–700 ms later.
    for (target, ms) in [
        ("oneflow POST /service_template", 900),
        ("oneflow POST /service_template/*/action", 1200),
        ("oneflow POST /service/*/scale", 1200),
    ] {
        env.fault(json!({"target": target, "kind": "delay", "delay_ms": ms, "count": 1}))
            .await;
    }
    // Reads: one in five held up beyond the timeout (the clients retry reads).
    for target in ["oneflow GET /service", "one.vmpool.infoextended"] {
        env.fault(json!({"target": target, "kind": "delay", "delay_ms": 700, "probability": 0.2}))
            .await;
    }
    let specs = Specs::new(2);
    let svc = Service::start(&env, specs.config(Duration::from_secs(1))).await;
    let created = wait_converged(&env, &svc, "alpha", 2, Duration::from_secs(30)).await;
    let mid = svc.cluster("alpha").await;
    specs.set(3);
    let scaled = wait_converged(&env, &svc, "alpha", 3, Duration::from_secs(30)).await;
    eprintln!("converged with latency spikes: created in {created:?}, scaled 2 → 3 in {scaled:?}");
    let end = svc.cluster("alpha").await;
    svc.stop().await;
    env.clear_faults().await;

    let log = env.mutations().await;
    assert_no_duplicated_mutation(&log, 3);
    assert_eq!(
        successful(&log, "oneflow POST /service/N/scale"),
        1,
        "the timed-out scale happened; it was not sent again: {log:#?}"
    );
    assert_eq!(env.docs(onesim::flow::TEMPLATE).len(), 1);
    // The controller did see the timeouts (unknown outcomes), before and after the scale.
    for c in [&mid, &end] {
        let unknown = c["status"]["lastReconciles"].as_array().is_some_and(|h| {
            h.iter().any(|r| {
                r["outcome"]
                    .as_str()
                    .is_some_and(|o| o.contains("outcome unknown"))
            })
        });
        assert!(unknown, "no timed-out mutation in the history: {c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_second_outage_backs_off_destroys_nothing_and_converges_after() {
    let env = env(3, Duration::from_secs(1), Duration::from_secs(2)).await;
    // A grace period shorter than the outage: OneGate is down with the rest, so the agents'
    // heartbeats stop for 60 s; they must not count as failed SuperNodes afterwards.
    let specs = Specs::with_tail(
        2,
        "    failurePolicy:\n      gracePeriod: 20s\n      heartbeatInterval: 5s\n",
    );
    let cap = Duration::from_secs(8);
    let cfg = specs.config(cap);
    let poll = cfg.runtime.poll_interval;
    let svc = Service::start(&env, cfg).await;
    wait_converged(&env, &svc, "alpha", 2, Duration::from_secs(30)).await;
    let before: Vec<(i64, u32)> = env.vm_states();
    let seq = env.mutations().await.len();

    // The front-end goes down (oned, OneFlow and OneGate refuse connections) and a
    // change arrives.
    env.control(reqwest::Method::POST, "/frontend/down", None)
        .await;
    svc.silent.store(true, Ordering::SeqCst);
    let down = Instant::now();
    specs.set(3);
    tokio::time::sleep(Duration::from_secs(60)).await;
    env.control(reqwest::Method::POST, "/frontend/up", None)
        .await;
    let up = Instant::now();
    // The agents resume one second after the controller's first look (agents heartbeat
    // every few seconds; the controller must not act on the gap in between).
    while env
        .backend
        .starts("list_vms", up, Instant::now())
        .is_empty()
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    svc.silent.store(false, Ordering::SeqCst);
    wait_converged(&env, &svc, "alpha", 3, Duration::from_secs(30)).await;
    let took = up.elapsed();
    let c = svc.cluster("alpha").await;
    svc.stop().await;

    // Backoff: observation attempts spaced 2× further each time up to the cap, instead of
    // one per poll (300 in 60 s); the pending scale tried once, not once per trigger.
    let observations = env.backend.starts("list_services", down, up);
    let gaps: Vec<Duration> = observations.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!(
        "outage: {} observation attempts, gaps {:?}; converged {took:?} after recovery",
        observations.len(),
        gaps.iter().map(|g| g.as_millis()).collect::<Vec<_>>()
    );
    assert!(
        observations.len() <= 16,
        "{} observation attempts in 60 s: {gaps:?}",
        observations.len()
    );
    for w in gaps.windows(2) {
        assert!(
            w[1] + Duration::from_millis(150) >= w[0],
            "the spacing never shrinks while down: {gaps:?}"
        );
    }
    assert!(
        gaps.iter().rev().take(3).all(|g| *g >= cap),
        "the cap is reached: {gaps:?}"
    );
    let scales_down = env.backend.starts("scale", down, up);
    assert!(
        scales_down.len() <= 2,
        "{} scale attempts while down",
        scales_down.len()
    );

    // Nothing destroyed: one scale to 3 went through, nothing else; every VM that ran
    // before still runs.
    let log = env.mutations().await;
    assert_no_duplicated_mutation(&log, 3);
    let after: Vec<(String, String, Value)> = log[seq..]
        .iter()
        .filter(|(_, r, _)| r.starts_with('2') || r == "ok")
        .cloned()
        .collect();
    let calls: Vec<&str> = after.iter().map(|(c, _, _)| c.as_str()).collect();
    assert_eq!(calls, ["oneflow POST /service/N/scale"]);
    let now = env.vm_states();
    for (id, state) in before.iter().filter(|(_, s)| *s == 3) {
        assert!(
            now.contains(&(*id, *state)),
            "VM {id} was running and is no more: {now:?}"
        );
    }
    // Recovery: the next observation comes within the cap, the scale right after it.
    let first_scale = env.backend.starts("scale", up, Instant::now())[0];
    assert!(
        first_scale - up <= cap + poll + Duration::from_secs(1),
        "first scale {:?} after recovery",
        first_scale - up
    );
    assert!(
        took <= cap + poll + Duration::from_secs(10),
        "converged {took:?} after recovery"
    );

    assert!(ready_with(&c, 3), "{c}");
}

/// `run` started while OpenNebula fails its first calls (an oned restarting or
/// overloaded) waits them out with backoff instead of exiting: the chaos suite found a
/// restarted instance that exited on one failed `one.system.version`. It becomes ready
/// once OpenNebula answers, and the process never exits in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_started_while_opennebula_fails_waits_it_out_instead_of_exiting() {
    let (sim, one) = start_onesim(PASSWORD, |_| {}).await;
    fixtures(&common::onesim_env::admin_oned(&sim, PASSWORD)).await;
    drop(one);
    // oned's INTERNAL answer is not one the clients retry: each failed connect is one call.
    control(
        &sim,
        reqwest::Method::POST,
        "/faults",
        Some(json!({"target": "one.system.version", "kind": "error", "count": 3})),
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::create_dir_all(dir.path().join("specs")).expect("specs");
    let log = std::fs::File::create(dir.path().join("log")).expect("log");
    let addr = format!("127.{}.253.9:9464", sim.loopback_net());
    let mut child = common::onesim_env::reconcile_command(&sim, PASSWORD, dir.path())
        .args(["run", "--controller-id", "ctl-start", "--specs"])
        .arg(dir.path().join("specs"))
        .args(["--poll-interval", "500ms", "--max-backoff", "1s"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", &addr])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("run starts");
    let t0 = Instant::now();
    let ready = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!(
                "run exited ({status}):\n{}",
                std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
            );
        }
        let ok = match reqwest::get(format!("http://{addr}/readyz")).await {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        };
        if ok {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not ready after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    let retries = text
        .matches("connecting to OpenNebula failed; retrying")
        .count();
    println!(
        "figures: ready {:.1} s after start, through {retries} failed connects",
        ready.as_secs_f64()
    );
    assert_eq!(retries, 3, "each failed connect is logged:\n{text}");
    let _ = child.start_kill();
}
