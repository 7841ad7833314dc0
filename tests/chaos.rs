//! The chaos suite (issue #17 item 2): seeded random schedules of faults against real
//! `flower-reconcile run --leader-elect` processes (two instances, one Git repository) and
//! onesim, with simulated agents heartbeating through OneGate (no real Flower, so an
//! iteration takes seconds). Each iteration draws its faults from the seed — API errors
//! and latency, a OneGate outage, a crashed SuperNode VM, kill -9 and restart of a
//! controller, a leader change (kill -9 of the leader), an onesim restart on its state
//! file, a spec commit — lets them act, stops them, waits for convergence and checks the
//! invariants from onesim's event log and state:
//!
//! - never two services for one cluster (each cluster has one service id, ever);
//! - never a healthy node terminated (only VMs the schedule crashed are terminated, and
//!   OneFlow's scale-downs stay within what spec commits took away);
//! - never a destroy no spec asked for (service deletes only for clusters a commit
//!   removed; scale targets only counts a commit asked for);
//! - convergence within [`CONVERGE_BOUND`] once the faults stop;
//! - no panic (the controllers' logs, this process, which runs onesim) and no controller
//!   exiting on its own.
//!
//! `CHAOS_SEED=<n>` replays a schedule; `CHAOS_SECONDS` (default 60) bounds the time spent
//! starting iterations. The figures are printed, never asserted.
//!
//! Caveats: the schedule (which faults, when, on what) is reproducible from the seed;
//! what the processes do in between depends on timing, so a replay is the same schedule,
//! not the same interleaving. onesim runs in this process and its restart is a stop and a
//! start on the same ports and state file (its state is saved on stop; OpenNebula commits
//! every change to its database, so a kill -9 losing the last half second of state would
//! not be faithful). A crash is what OpenNebula shows when a VM's guest dies: its agent
//! falls silent, and half the time the monitor also sees the VM gone (POWEROFF).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flower_reconcile::render::ownership::Ownership;
use serde_json::{json, Value};

use common::onesim_env::{admin_oned, fixtures, ready_with, spec_yaml, SimAgents};

const PASSWORD: &str = "chaos-pw";
const CONTROLLER_ID: &str = "ctl-chaos";
/// The bound on convergence once the faults stop: a lease (4 s) and a retry for a new
/// leader, a grace period (4 s) for a silent node, source and poll intervals (0.5 s),
/// the controllers' backoff (at most 2 s) and OneFlow's cooldown, with room for a loaded
/// two-core machine.
const CONVERGE_BOUND: Duration = Duration::from_secs(60);
/// Heartbeats every second; a node silent for 4 s (3 beats and a poll) has failed.
const POLICY: &str = "    failurePolicy:\n      gracePeriod: 4s\n      heartbeatInterval: 1s\n  deletionPolicy: Delete\n";
const MAX_CLUSTERS: usize = 3;
/// `one.vm.action` (and OneFlow role/service) actions that stop or destroy a VM.
const DESTRUCTIVE_VM: [&str; 7] = [
    "terminate",
    "undeploy",
    "poweroff",
    "stop",
    "suspend",
    "reboot",
    "resched",
];

/// Panics anywhere in this process (onesim's tasks included).
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// splitmix64: a small, seedable generator; the schedule is a function of the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> Option<&'a T> {
        (!xs.is_empty()).then(|| &xs[self.below(xs.len() as u64) as usize])
    }
}

/// The kinds of fault a schedule mixes (the names the figures print).
const KINDS: [&str; 7] = [
    "api-errors",
    "api-latency",
    "onegate-outage",
    "vm-crash",
    "controller-kill",
    "leader-change",
    "onesim-restart",
];

/// What the monitor saw of onesim's state, sampled every 100 ms.
#[derive(Default)]
struct Seen {
    /// Service document id → its cluster (from the ownership marker).
    services: BTreeMap<i64, String>,
    /// VM id → (service id, role) as last seen, and whether it was ever seen done.
    vms: BTreeMap<i64, (Option<i64>, String, bool)>,
    /// Samples where one cluster had two services not yet done.
    two_live: Vec<String>,
}

/// One `flower-reconcile run --leader-elect` instance (restartable: same id, state dir,
/// HOME and listen address; its log appended across restarts).
struct Instance {
    id: String,
    addr: String,
    dir: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Instance {
    fn start(&mut self, urls: &onesim::Urls, repo: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let auth = self.dir.join("one_auth");
        std::fs::write(&auth, format!("oneadmin:{PASSWORD}\n")).expect("auth");
        std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .expect("log");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_flower-reconcile"))
            .env("ONE_XMLRPC", &urls.xmlrpc)
            .env("ONEFLOW_URL", &urls.oneflow)
            .env("ONE_AUTH", &auth)
            .env("HOME", &self.dir)
            .env("NO_COLOR", "1")
            .env("FLOWER_RECONCILE_LOG", "info")
            .args(["run", "--leader-elect", "--instance-id", &self.id])
            .args(["--lease-duration", "4s", "--renew-deadline", "2500ms"])
            .args(["--retry-period", "500ms", "--poll-interval", "500ms"])
            .args(["--interval", "500ms", "--max-backoff", "2s"])
            .args(["--controller-id", CONTROLLER_ID])
            .arg("--git")
            .arg(format!("file://{}", repo.display()))
            .args(["--branch", "main", "--path", "clusters"])
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--listen", &self.addr])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("run starts");
        self.child = Some(child);
    }

    async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Exited on its own (we only ever kill it through [`Instance::kill9`]).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("http");
        let Ok(r) = client
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
        else {
            return (0, String::new());
        };
        let code = r.status().as_u16();
        (code, r.text().await.unwrap_or_default())
    }

    async fn is_leader(&self) -> bool {
        let (code, body) = self.get("/metrics").await;
        code == 200
            && body
                .lines()
                .any(|l| l.trim() == "flower_reconcile_leader 1")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }
}

/// The test's world: onesim, the repository, the instances, the agents, what was done.
struct World {
    seed: u64,
    iteration: usize,
    _tmp: tempfile::TempDir,
    cfg: onesim::Config,
    handle: Option<onesim::Handle>,
    slot: Arc<Mutex<Arc<onesim::Sim>>>,
    urls: onesim::Urls,
    repo: PathBuf,
    head: String,
    instances: Vec<Instance>,
    /// VMs the schedule crashed: the only ones the controller may terminate.
    crashed: Arc<Mutex<BTreeSet<i64>>>,
    seen: Arc<Mutex<Seen>>,
    /// onesim's events (every restart starts a new log; harvested before each stop).
    events: Vec<Value>,
    cursor: u64,
    /// Live clusters and their counts (the HEAD commit).
    live: BTreeMap<String, u32>,
    /// Every count a commit gave each cluster.
    counts: BTreeMap<String, BTreeSet<u32>>,
    /// Clusters a commit removed.
    removed: BTreeSet<String>,
    /// SuperNodes commits took away (count decreases), per cluster.
    decreases: BTreeMap<String, u32>,
    next_cluster: u32,
    /// Active fault rules (re-added after an onesim restart) and OneGate's switch.
    rules: Vec<Value>,
    onegate_down: bool,
    injected: BTreeMap<&'static str, u32>,
    /// Convergence times after the faults stopped.
    converged: Vec<Duration>,
    /// Leader changes: kill -9 of the leader to another instance leading.
    takeovers: Vec<Duration>,
}

impl World {
    fn fail(&self, msg: impl std::fmt::Display) -> ! {
        let logs: String = self
            .instances
            .iter()
            .map(|i| {
                let log = i.log();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "--- {} (last 30 lines)\n{}\n",
                    i.id,
                    lines[lines.len().saturating_sub(30)..].join("\n")
                )
            })
            .collect();
        panic!(
            "chaos: invariant broken at iteration {} (seed {}; reproduce with CHAOS_SEED={}): {msg}\n{logs}",
            self.iteration, self.seed, self.seed
        );
    }

    async fn control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req =
            reqwest::Client::new().request(method, format!("{}{path}", self.urls.control));
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Value::Null),
            Ok(r) => self.fail(format!("onesim control {path}: {}", r.status())),
            Err(e) => self.fail(format!("onesim control {path}: {e}")),
        }
    }

    /// Appends onesim's new events to [`World::events`].
    async fn harvest(&mut self) {
        let v = self
            .control(
                reqwest::Method::GET,
                &format!("/events?since={}", self.cursor),
                None,
            )
            .await;
        if let Some(list) = v["events"].as_array() {
            self.events.extend(list.iter().cloned());
        }
        self.cursor = v["last_seq"].as_u64().unwrap_or(self.cursor);
    }

    async fn add_rule(&mut self, rule: Value) {
        self.control(reqwest::Method::POST, "/faults", Some(rule.clone()))
            .await;
        self.rules.push(rule);
    }

    /// Stop onesim (its listeners first, so that no call lands after the harvest) and
    /// start it again on the same ports and state file.
    async fn restart_onesim(&mut self) {
        self.control(reqwest::Method::POST, "/frontend/down", None)
            .await;
        self.harvest().await;
        let old = self.handle.take().expect("onesim runs");
        old.shutdown().await;
        let mut cfg = self.cfg.clone();
        cfg.fault_seed = Some(self.seed ^ self.iteration as u64);
        let handle = onesim::start(cfg).await.expect("onesim restarts");
        assert_eq!(handle.urls().xmlrpc, self.urls.xmlrpc, "same ports");
        *self.slot.lock().expect("slot") = handle.sim.clone();
        self.handle = Some(handle);
        self.cursor = 0;
        for r in self.rules.clone() {
            self.control(reqwest::Method::POST, "/faults", Some(r))
                .await;
        }
        if self.onegate_down {
            self.control(reqwest::Method::POST, "/onegate/down", None)
                .await;
        }
    }

    fn write_cluster(&self, name: &str, count: u32) {
        std::fs::write(
            self.repo.join(format!("clusters/{name}.yaml")),
            spec_yaml(name, count) + POLICY,
        )
        .expect("spec");
    }

    fn commit(&mut self, message: &str) {
        common::git(&self.repo, &["add", "-A"]);
        common::git(&self.repo, &["commit", "-q", "-m", message]);
        self.head = common::git(&self.repo, &["rev-parse", "HEAD"]);
    }

    fn add_cluster(&mut self, count: u32) -> String {
        self.next_cluster += 1;
        let name = format!("c{}", self.next_cluster);
        self.write_cluster(&name, count);
        self.live.insert(name.clone(), count);
        self.counts.entry(name.clone()).or_default().insert(count);
        name
    }

    /// A random spec commit: scale a cluster, add one, or remove one (never the last:
    /// that is a mass delete, which needs a marker and is covered by `safety_prune`).
    fn spec_commit(&mut self, rng: &mut Rng) -> String {
        let names: Vec<String> = self.live.keys().cloned().collect();
        let mut ops = vec!["scale"];
        if self.live.len() < MAX_CLUSTERS {
            ops.push("add");
        }
        if self.live.len() >= 2 {
            ops.push("remove");
        }
        match *rng.pick(&ops).expect("an op") {
            "add" => {
                let count = 1 + rng.below(2) as u32;
                let name = self.add_cluster(count);
                self.commit(&format!("add {name} with {count}"));
                format!("add {name} ({count})")
            }
            "remove" => {
                let name = rng.pick(&names).expect("a cluster").clone();
                std::fs::remove_file(self.repo.join(format!("clusters/{name}.yaml")))
                    .expect("rm spec");
                self.live.remove(&name);
                self.removed.insert(name.clone());
                self.commit(&format!("remove {name}"));
                format!("remove {name}")
            }
            _ => {
                let name = rng.pick(&names).expect("a cluster").clone();
                let from = self.live[&name];
                let to = [1, 2, 3]
                    .into_iter()
                    .filter(|c| *c != from)
                    .nth(rng.below(2) as usize)
                    .expect("another count");
                self.write_cluster(&name, to);
                self.live.insert(name.clone(), to);
                self.counts.entry(name.clone()).or_default().insert(to);
                *self.decreases.entry(name.clone()).or_default() += from.saturating_sub(to);
                self.commit(&format!("scale {name} {from} -> {to}"));
                format!("scale {name} {from}->{to}")
            }
        }
    }

    async fn leader(&self) -> Option<usize> {
        let mut leaders = vec![];
        for (i, inst) in self.instances.iter().enumerate() {
            if inst.child.is_some() && inst.is_leader().await {
                leaders.push(i);
            }
        }
        (leaders.len() == 1).then(|| leaders[0])
    }

    /// Running SuperNode VMs of live clusters, not crashed yet, sorted by id.
    fn crash_candidates(&self) -> Vec<(i64, String)> {
        let sim = self.slot.lock().expect("slot").clone();
        let crashed = self.crashed.lock().expect("crashed").clone();
        let seen = self.seen.lock().expect("seen");
        sim.with(|st| {
            st.vms
                .values()
                .filter(|v| v.is_running() && !crashed.contains(&v.id))
                .filter(|v| v.user_template.get("ROLE_NAME") == Some("supernode"))
                .filter_map(|v| {
                    let svc: i64 = v.user_template.get("SERVICE_ID")?.parse().ok()?;
                    let cluster = seen.services.get(&svc)?.clone();
                    self.live.contains_key(&cluster).then_some((v.id, cluster))
                })
                .collect()
        })
    }

    /// One iteration's faults, drawn from `rng`, applied over a few seconds.
    async fn inject(&mut self, rng: &mut Rng) -> Vec<String> {
        let mut kinds: Vec<&'static str> = KINDS.to_vec();
        let mut drawn = vec![];
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(kinds.len() as u64) as usize;
            drawn.push(kinds.remove(i));
        }
        let commit = rng.chance(0.6);
        let phase = Duration::from_millis(2000 + rng.below(3000));
        // Each fault at its own offset into the phase.
        let mut plan: Vec<(Duration, &'static str)> = drawn
            .iter()
            .map(|k| {
                (
                    Duration::from_millis(rng.below(phase.as_millis() as u64 / 2)),
                    *k,
                )
            })
            .collect();
        if commit {
            plan.push((
                Duration::from_millis(rng.below(phase.as_millis() as u64)),
                "spec-commit",
            ));
        }
        plan.sort();
        let t0 = Instant::now();
        let mut done = vec![];
        for (at, kind) in plan {
            if let Some(wait) = at.checked_sub(t0.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            if let Some(what) = self.apply(kind, rng).await {
                *self.injected.entry(kind).or_default() += 1;
                done.push(format!("{kind}: {what}"));
            }
        }
        if let Some(rest) = phase.checked_sub(t0.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        done
    }

    /// Apply one fault; what was done, or `None` when there was nothing to apply it to.
    async fn apply(&mut self, kind: &'static str, rng: &mut Rng) -> Option<String> {
        // Controllers' calls only: the agents' OneGate calls have their own fault.
        const TARGETS: [&str; 7] = [
            "one.*",
            "one.vm.action",
            "one.vmpool.infoextended",
            "one.document.*",
            "oneflow *",
            "oneflow POST /service*",
            "oneflow GET /service*",
        ];
        match kind {
            "api-errors" => {
                let target = *rng.pick(&TARGETS).expect("target");
                let p = 0.2 + rng.below(4) as f64 * 0.1;
                self.add_rule(json!({"target": target, "kind": "error", "probability": p, "message": "chaos"}))
                    .await;
                Some(format!("{target} p={p:.1}"))
            }
            "api-latency" => {
                let target = *rng.pick(&TARGETS).expect("target");
                let ms = 100 + rng.below(900);
                self.add_rule(
                    json!({"target": target, "kind": "delay", "delay_ms": ms, "probability": 0.5}),
                )
                .await;
                Some(format!("{target} +{ms} ms p=0.5"))
            }
            "onegate-outage" => {
                self.control(reqwest::Method::POST, "/onegate/down", None)
                    .await;
                self.onegate_down = true;
                Some("down".into())
            }
            "vm-crash" => {
                let cands = self.crash_candidates();
                let (vm, cluster) = rng.pick(&cands)?.clone();
                let gone = rng.chance(0.5);
                self.crashed.lock().expect("crashed").insert(vm);
                if gone {
                    self.control(
                        reqwest::Method::POST,
                        &format!("/vm/{vm}/state"),
                        Some(json!({"state": "POWEROFF"})),
                    )
                    .await;
                }
                Some(format!(
                    "VM {vm} of {cluster} ({})",
                    if gone { "POWEROFF" } else { "silent" }
                ))
            }
            "controller-kill" => {
                let i = rng.below(self.instances.len() as u64) as usize;
                let pause = Duration::from_millis(rng.below(1500));
                self.kill_and_restart(i, pause).await;
                Some(format!(
                    "{} restarted after {} ms",
                    self.instances[i].id,
                    pause.as_millis()
                ))
            }
            "leader-change" => {
                // Kept down until another instance leads: restarted at once with its id,
                // it would resume its own lease and no change would happen.
                let i = self.leader().await?;
                self.instances[i].kill9().await;
                let t = Instant::now();
                let mut by = None;
                while by.is_none() && t.elapsed() < Duration::from_secs(20) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    by = self.leader().await;
                }
                let took = t.elapsed();
                let pause = Duration::from_millis(rng.below(1000));
                tokio::time::sleep(pause).await;
                let (urls, repo) = (self.urls.clone(), self.repo.clone());
                self.instances[i].start(&urls, &repo);
                let Some(by) = by else {
                    self.fail(format!(
                        "no instance took over from {} within 20 s",
                        self.instances[i].id
                    ));
                };
                self.takeovers.push(took);
                Some(format!(
                    "leader {} killed, {} took over after {:.1} s",
                    self.instances[i].id,
                    self.instances[by].id,
                    took.as_secs_f64()
                ))
            }
            "onesim-restart" => {
                let t = Instant::now();
                self.restart_onesim().await;
                Some(format!("{} ms", t.elapsed().as_millis()))
            }
            "spec-commit" => Some(self.spec_commit(rng)),
            _ => None,
        }
    }

    /// kill -9 of instance `i`, and its restart (as systemd would) after `pause`.
    async fn kill_and_restart(&mut self, i: usize, pause: Duration) {
        self.instances[i].kill9().await;
        tokio::time::sleep(pause).await;
        let (urls, repo) = (self.urls.clone(), self.repo.clone());
        self.instances[i].start(&urls, &repo);
    }

    /// Stop every fault (crashed VMs stay dead).
    async fn calm(&mut self) {
        self.control(reqwest::Method::DELETE, "/faults", None).await;
        self.rules.clear();
        if self.onegate_down {
            self.control(reqwest::Method::POST, "/onegate/up", None)
                .await;
            self.onegate_down = false;
        }
    }

    /// Whether everything matches the HEAD commit: the leader's status says each live
    /// cluster is Ready at HEAD with its count, and onesim agrees — one running service
    /// per live cluster, none for a removed one, every crashed VM gone.
    async fn converged(&self) -> Result<(), String> {
        let Some(l) = self.leader().await else {
            return Err("no single leader".into());
        };
        for (name, count) in &self.live {
            let (code, body) = self.instances[l]
                .get(&format!("/api/v1/clusters/{name}"))
                .await;
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if code != 200
                || v["status"]["observedRevision"] != self.head.as_str()
                || !ready_with(&v, *count)
            {
                return Err(format!(
                    "{name} not ready with {count} at HEAD: {code} {}",
                    v["status"]
                ));
            }
        }
        let sim = self.slot.lock().expect("slot").clone();
        let crashed = self.crashed.lock().expect("crashed").clone();
        // (cluster, service state, its SuperNode VMs running with a live agent).
        let (services, lingering) = sim.with(|st| {
            let services: Vec<(String, i64, u32)> = st
                .docs
                .values()
                .filter(|d| d.doc_type == onesim::flow::SERVICE)
                .filter_map(|d| {
                    let state = d.body["state"].as_i64().unwrap_or(-1);
                    let o = Ownership::from_body(&d.body)?;
                    let id = d.id.to_string();
                    let nodes = st
                        .vms
                        .values()
                        .filter(|v| v.is_running() && !crashed.contains(&v.id))
                        .filter(|v| v.user_template.get("SERVICE_ID") == Some(id.as_str()))
                        .filter(|v| v.user_template.get("ROLE_NAME") == Some("supernode"))
                        .count() as u32;
                    Some((o.cluster, state, nodes))
                })
                .collect();
            let lingering: Vec<i64> = crashed
                .iter()
                .filter(|id| {
                    st.vms
                        .get(id)
                        .is_some_and(|v| v.state != onesim::state::S_DONE)
                })
                .copied()
                .collect();
            (services, lingering)
        });
        for (name, count) in &self.live {
            let mine: Vec<(i64, u32)> = services
                .iter()
                .filter(|(c, _, _)| c == name)
                .map(|(_, s, n)| (*s, *n))
                .collect();
            if mine != [(onesim::flow::RUNNING, *count)] {
                return Err(format!(
                    "{name}: services (state, live SuperNodes) {mine:?}, want one RUNNING with {count}"
                ));
            }
        }
        if let Some((c, _, _)) = services.iter().find(|(c, _, _)| self.removed.contains(c)) {
            return Err(format!("removed {c} still has a service"));
        }
        if !lingering.is_empty() {
            return Err(format!("crashed VMs not yet gone: {lingering:?}"));
        }
        Ok(())
    }

    /// Wait for convergence (bounded); returns how long it took.
    async fn settle(&mut self) -> Duration {
        let t0 = Instant::now();
        loop {
            self.check_processes();
            let why = match self.converged().await {
                Ok(()) => return t0.elapsed(),
                Err(why) => why,
            };
            if t0.elapsed() > CONVERGE_BOUND {
                self.fail(format!(
                    "not converged {} s after the faults stopped: {why}",
                    CONVERGE_BOUND.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// No controller exited on its own, none panicked, nothing in this process panicked.
    fn check_processes(&mut self) {
        let mut bad = vec![];
        for inst in self.instances.iter_mut() {
            if let Some(st) = inst.exited() {
                bad.push(format!("{} exited on its own: {st}", inst.id));
            }
            if inst.log().contains("panicked at") {
                bad.push(format!("{} panicked", inst.id));
            }
        }
        if PANICS.load(Ordering::SeqCst) > 0 {
            bad.push("a panic in the test process (onesim's tasks)".into());
        }
        if !bad.is_empty() {
            self.fail(bad.join("; "));
        }
    }

    /// The invariants over everything onesim logged and the monitor saw so far.
    async fn check_invariants(&mut self) {
        self.harvest().await;
        self.check_processes();
        let seen = self.seen.lock().expect("seen");
        let crashed = self.crashed.lock().expect("crashed").clone();
        let ok = |e: &Value| {
            let r = e["result"].as_str().unwrap_or("");
            r == "ok" || r.starts_with('2')
        };
        let ours = |e: &Value| {
            e["agent"]
                .as_str()
                .unwrap_or("")
                .starts_with("flower-reconcile")
        };
        let mut broken: Vec<String> = seen.two_live.clone();
        // Never two services for one cluster: one service id per cluster, ever, and every
        // successful instantiation is one the monitor saw.
        let mut per_cluster: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for (id, c) in &seen.services {
            per_cluster.entry(c).or_default().push(*id);
        }
        for (c, ids) in &per_cluster {
            if ids.len() > 1 {
                broken.push(format!("cluster {c} has had services {ids:?}"));
            }
        }
        let instantiated = self
            .events
            .iter()
            .filter(|e| {
                let call = e["call"].as_str().unwrap_or("");
                call.starts_with("POST /service_template/") && call.ends_with("/action") && ok(e)
            })
            .count();
        if instantiated != seen.services.len() {
            broken.push(format!(
                "{instantiated} instantiations for {} services seen",
                seen.services.len()
            ));
        }
        let cluster_of = |svc: &str| -> Option<&String> {
            svc.parse::<i64>()
                .ok()
                .and_then(|id| seen.services.get(&id))
        };
        for e in self.events.iter().filter(|e| ok(e) && ours(e)) {
            let call = e["call"].as_str().unwrap_or("");
            let args = &e["args"];
            // Never a healthy node terminated by the controller.
            if call == "one.vm.action" || call == "one.vm.recover" {
                let (vm, destructive) = if call == "one.vm.action" {
                    let action = args[0].as_str().unwrap_or("");
                    (
                        args[1].as_i64(),
                        DESTRUCTIVE_VM.iter().any(|a| action.starts_with(a)),
                    )
                } else {
                    // one.vm.recover: 3 delete, 4 delete-recreate, 5 delete-db.
                    (args[0].as_i64(), matches!(args[1].as_i64(), Some(3..=5)))
                };
                if destructive && !vm.is_some_and(|v| crashed.contains(&v)) {
                    broken.push(format!("{call} {args} on a VM that was not crashed"));
                }
            }
            // Never a destroy no spec asked for.
            let parts: Vec<&str> = call.split('/').collect();
            if parts.len() >= 3 && parts[1] == "service" {
                let svc = parts[2];
                let cluster = cluster_of(svc);
                let removed = cluster.is_some_and(|c| self.removed.contains(c));
                if call.starts_with("DELETE ") && !removed {
                    broken.push(format!(
                        "{call}: service of {cluster:?}, which no commit removed"
                    ));
                }
                let perform = args["action"]["perform"].as_str().unwrap_or("");
                let destroys = DESTRUCTIVE_VM
                    .iter()
                    .chain(["shutdown", "delete"].iter())
                    .any(|p| perform.starts_with(p));
                if call.ends_with("/action") && destroys && !removed {
                    broken.push(format!(
                        "{call} {perform}: service of {cluster:?}, which no commit removed"
                    ));
                }
                if call.ends_with("/scale") {
                    let to = args["cardinality"]
                        .as_u64()
                        .or_else(|| args["cardinality"].as_str()?.parse().ok());
                    let asked = cluster
                        .and_then(|c| self.counts.get(c))
                        .is_some_and(|cs| to.is_some_and(|t| cs.contains(&(t as u32))));
                    if !asked && args["role_name"] == "supernode" {
                        broken.push(format!(
                            "{call} {args}: a count no commit of {cluster:?} asked for"
                        ));
                    }
                }
            }
        }
        // Healthy VMs gone outside a removed cluster's service: at most what commits'
        // scale-downs took away from that cluster.
        let mut healthy_gone: BTreeMap<&str, u32> = BTreeMap::new();
        for (id, (svc, role, done)) in &seen.vms {
            let Some(cluster) = svc.and_then(|s| seen.services.get(&s)) else {
                continue;
            };
            if *done
                && role == "supernode"
                && !crashed.contains(id)
                && !self.removed.contains(cluster)
            {
                *healthy_gone.entry(cluster).or_default() += 1;
            }
            if *done && role == "superlink" && !self.removed.contains(cluster) {
                broken.push(format!("the SuperLink VM {id} of {cluster} was terminated"));
            }
        }
        for (c, n) in healthy_gone {
            let allowed = self.decreases.get(c).copied().unwrap_or(0);
            if n > allowed {
                broken.push(format!(
                    "{n} healthy SuperNode VM(s) of {c} terminated; commits took away {allowed}"
                ));
            }
        }
        drop(seen);
        if !broken.is_empty() {
            self.fail(broken.join("\n"));
        }
    }
}

/// Samples onesim's services and VMs every 100 ms into `seen`.
fn spawn_monitor(
    slot: Arc<Mutex<Arc<onesim::Sim>>>,
    seen: Arc<Mutex<Seen>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let sim = slot.lock().expect("slot").clone();
            let (services, vms) = sim.with(|st| {
                let services: Vec<(i64, String, i64)> = st
                    .docs
                    .values()
                    .filter(|d| d.doc_type == onesim::flow::SERVICE)
                    .filter_map(|d| {
                        let o = Ownership::from_body(&d.body)?;
                        Some((d.id, o.cluster, d.body["state"].as_i64().unwrap_or(-1)))
                    })
                    .collect();
                let vms: Vec<(i64, Option<i64>, String, bool)> = st
                    .vms
                    .values()
                    .map(|v| {
                        (
                            v.id,
                            v.user_template
                                .get("SERVICE_ID")
                                .and_then(|s| s.parse().ok()),
                            v.user_template.get("ROLE_NAME").unwrap_or("").to_string(),
                            v.state == onesim::state::S_DONE,
                        )
                    })
                    .collect();
                (services, vms)
            });
            {
                let mut s = seen.lock().expect("seen");
                let mut live: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
                for (id, cluster, state) in &services {
                    s.services.insert(*id, cluster.clone());
                    // OneFlow drops a service's document once it is done.
                    let _ = state;
                    live.entry(cluster).or_default().push(*id);
                }
                for (c, ids) in live {
                    if ids.len() > 1 {
                        s.two_live
                            .push(format!("cluster {c} had live services {ids:?} at once"));
                    }
                }
                for (id, svc, role, done) in vms {
                    let e = s.vms.entry(id).or_insert((svc, role.clone(), false));
                    if e.0.is_none() {
                        e.0 = svc;
                    }
                    if e.1.is_empty() {
                        e.1 = role;
                    }
                    e.2 |= done;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn median(xs: &[Duration]) -> Duration {
    let mut v = xs.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Seeded random schedules of faults (API errors and latency, OneGate outages, VM
/// crashes, controller kill -9, leader changes, onesim restarts, spec commits) against two
/// `run --leader-elect` instances on a Git repository: after each iteration the invariants
/// hold (see the module doc), and everything converges within [`CONVERGE_BOUND`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_seeded_schedules_keep_the_invariants() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        prev(info);
    }));
    let seed: u64 = match std::env::var("CHAOS_SEED") {
        Ok(s) => s.trim().parse().expect("CHAOS_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(60);
    println!("chaos: seed {seed} (reproduce with CHAOS_SEED={seed}), {seconds} s of iterations");
    let mut rng = Rng(seed);

    let tmp = tempfile::tempdir().expect("tmp");
    let mut cfg = onesim::Config::for_tests(PASSWORD);
    cfg.runtime = onesim::Runtime::None {
        auto_ready: Some(Duration::from_millis(50)),
    };
    cfg.state_file = Some(tmp.path().join("onesim.json"));
    cfg.fault_seed = Some(seed);
    let handle = onesim::start(cfg.clone()).await.expect("onesim starts");
    // A restart binds the same ports.
    let port = |u: &str| url::Url::parse(u).ok().and_then(|u| u.port()).unwrap_or(0);
    let urls = handle.urls().clone();
    cfg.ports = onesim::Ports {
        xmlrpc: port(&urls.xmlrpc),
        oneflow: port(&urls.oneflow),
        onegate: port(&urls.onegate),
        control: port(&urls.control),
    };
    fixtures(&admin_oned(&handle, PASSWORD)).await;

    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(repo.join("clusters")).expect("repo");
    common::git(&repo, &["init", "-q", "-b", "main"]);
    // Git keeps no empty directory: the placeholder keeps `clusters/`.
    std::fs::write(repo.join("clusters/.gitkeep"), "").expect("gitkeep");

    let slot = Arc::new(Mutex::new(handle.sim.clone()));
    let crashed: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let net = handle.loopback_net();
    let instances = ["ch-a", "ch-b"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let dir = tmp.path().join(id);
            std::fs::create_dir_all(&dir).expect("instance dir");
            Instance {
                id: (*id).into(),
                // In this simulator's own loopback net: no other test listens there.
                addr: format!("127.{net}.253.{}:9464", i + 1),
                dir,
                child: None,
            }
        })
        .collect();
    let mut w = World {
        seed,
        iteration: 0,
        _tmp: tmp,
        cfg,
        handle: Some(handle),
        slot: slot.clone(),
        urls: urls.clone(),
        repo: repo.clone(),
        head: String::new(),
        instances,
        crashed: crashed.clone(),
        seen: seen.clone(),
        events: vec![],
        cursor: 0,
        live: BTreeMap::new(),
        counts: BTreeMap::new(),
        removed: BTreeSet::new(),
        decreases: BTreeMap::new(),
        next_cluster: 0,
        rules: vec![],
        onegate_down: false,
        injected: BTreeMap::new(),
        converged: vec![],
        takeovers: vec![],
    };
    w.add_cluster(2);
    w.add_cluster(1);
    w.commit("two clusters");
    // The VMs heartbeat and say ready, except those the schedule crashed.
    let agents = SimAgents {
        sim: slot.clone(),
        gate: urls.onegate.clone(),
        silent: crashed.clone(),
        ready_services: Arc::default(),
    }
    .spawn(Duration::from_millis(300));
    let monitor = spawn_monitor(slot, seen);
    for inst in w.instances.iter_mut() {
        inst.start(&urls, &repo);
    }
    let first = w.settle().await;
    w.check_invariants().await;
    println!("chaos: initial convergence {:.1} s", first.as_secs_f64());

    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        w.iteration += 1;
        let done = w.inject(&mut rng).await;
        w.calm().await;
        let took = w.settle().await;
        w.converged.push(took);
        w.check_invariants().await;
        println!(
            "chaos: iteration {} converged in {:.1} s after [{}]",
            w.iteration,
            took.as_secs_f64(),
            done.join("; ")
        );
    }

    agents.abort();
    monitor.abort();
    for inst in w.instances.iter_mut() {
        inst.kill9().await;
    }
    let total: u32 = w.injected.values().sum();
    let kinds: Vec<String> = w.injected.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let worst = w.converged.iter().max().copied().unwrap_or_default();
    println!(
        "chaos figures: seed {seed}, {} iterations, {total} faults injected ({}); \
         convergence after the faults stopped: worst {:.1} s, median {:.1} s (bound {} s); \
         leader takeovers after kill -9 median {:.1} s (lease 4 s); {} VMs crashed, {} services created",
        w.iteration,
        kinds.join(", "),
        worst.as_secs_f64(),
        median(&w.converged).as_secs_f64(),
        CONVERGE_BOUND.as_secs(),
        median(&w.takeovers).as_secs_f64(),
        w.crashed.lock().expect("crashed").len(),
        w.seen.lock().expect("seen").services.len(),
    );
    assert!(w.iteration > 0, "no iteration ran");
    if let Some(h) = w.handle.take() {
        h.shutdown().await;
    }
}
