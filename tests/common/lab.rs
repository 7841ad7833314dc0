//! The real-Flower lab the e2e and the real-Flower tests stand on: onesim with the runtime a
//! test asks for, the appliance templates and network an administrator would create
//! (`flower_reconcile::demo::lab`), and the `flower-reconcile run` process driving it.
//! One start-up for every such test, so a variant on another runtime runs the same steps.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flower_reconcile::demo::lab::{
    Lab, LabConfig, LabRuntime, NETWORK, SUPERLINK_TEMPLATE, SUPERNODE_TEMPLATE,
};
use flower_reconcile::runtime::status::ClusterView;

/// Which onesim runtime the lab's VMs run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// Each VM is this build's `flower-agent` process running Flower from `FLOWER_VENV`.
    Process,
    /// Each VM boots its appliance image from `ONESIM_TEST_IMAGES` (default `packer/build`)
    /// as a systemd-nspawn machine (root only): the image's own agent and Flower.
    Image,
}

/// The lab's settings for `runtime`: agents heartbeat every 2 s, each VM transition takes
/// `vm_step`, OneGate as configured by default.
pub fn config(dir: &Path, runtime: Runtime, vm_step: Duration) -> LabConfig {
    searchable(dir);
    LabConfig {
        base_dir: dir.join("lab"),
        runtime: match runtime {
            Runtime::Process => process_runtime(super::flower_venv()),
            Runtime::Image => image_runtime(),
        },
        heartbeat_secs: 2,
        vm_step,
        onegate: onesim::GateConfig::default(),
        autoscaler_interval: flower_reconcile::demo::lab::DEFAULT_AUTOSCALER_INTERVAL,
    }
}

/// Makes a test's private directory searchable (0711: nothing listed), so the unprivileged
/// user the agents run Flower as (#17 item 5) reaches the VMs' files below it.
pub fn searchable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod 0711");
}

/// The process runtime with this build's agent and Flower from `venv`.
pub fn process_runtime(venv: PathBuf) -> LabRuntime {
    LabRuntime::Process {
        agent: vec![env!("CARGO_BIN_EXE_flower-agent").to_string()],
        venv,
    }
}

/// The image runtime on the appliance images in `ONESIM_TEST_IMAGES` (default
/// `packer/build`, where `make -C packer image ROLE=…` writes them; the lab says how to build
/// a missing one), their raw copies cached where onesim's image tests keep theirs.
pub fn image_runtime() -> LabRuntime {
    let images = std::env::var_os("ONESIM_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packer/build"));
    LabRuntime::Image {
        images,
        cache_dir: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("onesim-image-cache"),
    }
}

/// The lines every FlowerCluster file of the lab tests starts with, through `spec:`.
pub fn spec_head(name: &str) -> String {
    format!("apiVersion: flower.opennebula.io/v1alpha1\nkind: FlowerCluster\nmetadata:\n  name: {name}\nspec:\n")
}

/// A FlowerCluster on the lab's templates and network as the real-Flower e2e tests write
/// it: Flower 1.25.0, `deletionPolicy: Delete`, TLS `auto`, the Control API on the network,
/// SuperNodes `count` in [1, `max`], FedAvg over `rounds` rounds needing `min_clients`.
pub struct LabSpec {
    pub name: &'static str,
    pub count: u32,
    pub max: u32,
    /// More `tls:` lines (indented 4 spaces, each ending in a newline).
    pub tls: String,
    /// The `supernodes:` lines after `max` (indented 4 spaces, each ending in a newline).
    pub supernodes: String,
    pub rounds: u32,
    pub min_clients: u32,
}

impl LabSpec {
    pub fn yaml(&self) -> String {
        let LabSpec {
            name,
            count,
            max,
            tls,
            supernodes,
            rounds,
            min_clients: m,
        } = self;
        let head = spec_head(name);
        format!(
            "{head}  flowerVersion: 1.25.0
  deletionPolicy: Delete
  opennebula:
    templates:
      superlink: {SUPERLINK_TEMPLATE}
      supernode: {SUPERNODE_TEMPLATE}
    network: {NETWORK}
  tls:
    enabled: true
    mode: auto
{tls}  superlink:
    controlApi: network
  supernodes:
    count: {count}
    min: 1
    max: {max}
{supernodes}  training:
    strategy:
      name: FedAvg
    numRounds: {rounds}
    minFitClients: {m}
    minEvaluateClients: {m}
    minAvailableClients: {m}
"
        )
    }
}

/// Writes the demo's embedded Flower app (the numpy `fedlinreg`) to `dir/app`; returns it.
pub fn write_app(dir: &Path) -> PathBuf {
    let app = dir.join("app");
    for (rel, text) in flower_reconcile::demo::EMBEDDED_APP {
        let path = app.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("app dir");
        std::fs::write(path, text).expect("app file");
    }
    app
}

/// Start a lab under `dir/lab` ([`config`]).
pub async fn start(dir: &Path, runtime: Runtime, vm_step: Duration) -> Lab {
    flower_reconcile::one::http::ensure_crypto_provider();
    Lab::start(config(dir, runtime, vm_step))
        .await
        .expect("lab starts")
}

/// A lab in a new temporary directory (`fr-PREFIX…`, removed when the returned handle
/// drops) with `spec` written to `specs/NAME.yaml`; returns the directory, the lab and the
/// specs directory.
#[allow(dead_code)]
pub async fn start_with_spec(
    prefix: &str,
    runtime: Runtime,
    name: &str,
    spec: &str,
) -> (tempfile::TempDir, Lab, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("fr-{prefix}-"))
        .tempdir()
        .unwrap();
    let lab = start(dir.path(), runtime, Duration::from_millis(100)).await;
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(specs.join(format!("{name}.yaml")), spec).unwrap();
    (dir, lab, specs)
}

/// `flower-reconcile ARGS` with the lab's credentials in its environment.
pub fn reconcile(lab: &Lab) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flower-reconcile"));
    cmd.envs(lab.env())
        .env("FLWR_TELEMETRY_ENABLED", "0")
        .stdin(Stdio::null());
    cmd
}

/// `flower-reconcile --output json submit CLUSTER APP --spec SPEC` with the pinned `flwr`
/// and a 180 s limit: a training run as the real-Flower tests submit it.
pub fn submit(lab: &Lab, cluster: &str, app: &Path, spec: &Path) -> Command {
    let mut cmd = reconcile(lab);
    cmd.args(["--output", "json", "submit", cluster])
        .arg(app)
        .arg("--spec")
        .arg(spec)
        .arg("--flwr")
        .arg(super::flower_venv().join("bin/flwr"))
        .args(["--timeout", "180s"]);
    cmd
}

/// Runs [`submit`] and checks the run completed with `rounds` rounds; `more` adds to the
/// failure message (e.g. a hand-started SuperNode's log). Returns the JSON report.
#[allow(dead_code)]
pub fn submit_completed(
    lab: &Lab,
    cluster: &str,
    app: &Path,
    spec: &Path,
    rounds: usize,
    more: impl Fn() -> String,
) -> serde_json::Value {
    let out = submit(lab, cluster, app, spec)
        .output()
        .expect("submit runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "submit failed: {}\n{stdout}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        more()
    );
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim()).expect("submit prints JSON");
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(
        report["rounds"].as_array().map(Vec::len),
        Some(rounds),
        "{report}"
    );
    report
}

/// The `flower-reconcile run` process over a lab, fast-paced for tests (source read every
/// second, OpenNebula polled every 2 s, backoff at most 5 s), its HTTP API on a free
/// loopback port, its log appended to `work/controller.log`, its state in `work/state`
/// (a restarted controller takes over the same state). Killed when dropped.
pub struct RunController {
    child: Child,
    /// `http://127.0.0.1:PORT` of its HTTP API.
    pub base: String,
    log: PathBuf,
}

impl RunController {
    /// Start `run SOURCE…` (e.g. `--specs DIR`, or `--git URL --branch B --path P`).
    pub fn start(lab: &Lab, source: &[&str], work: &Path) -> RunController {
        Self::start_with(lab, source, work, |_| {})
    }

    /// [`RunController::start`] with `more` adding to the command (variables, flags
    /// before `run`'s own).
    pub fn start_with(
        lab: &Lab,
        source: &[&str],
        work: &Path,
        more: impl FnOnce(&mut Command),
    ) -> RunController {
        let port = free_port();
        let log_path = work.join("controller.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("controller log");
        let mut cmd = reconcile(lab);
        more(&mut cmd);
        let child = cmd
            .args(["--log-level", "info", "run"])
            .args(source)
            .args(["--interval", "1s", "--poll-interval", "2s"])
            .args(["--max-backoff", "5s"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(work.join("state"))
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("flower-reconcile run starts");
        RunController {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log: log_path,
        }
    }

    /// `/api/v1/clusters/NAME`, `None` while not served.
    pub async fn cluster(&self, name: &str) -> Option<ClusterView> {
        let r = reqwest::get(format!("{}/api/v1/clusters/{name}", self.base))
            .await
            .ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.json().await.ok()
    }

    /// Polls `/api/v1/clusters/NAME` until `done` holds; panics after `limit` with the
    /// controller's log tail. Returns how long it took.
    pub async fn wait_cluster(
        &self,
        name: &str,
        limit: Duration,
        done: impl Fn(&ClusterView) -> bool,
    ) -> Duration {
        let t = std::time::Instant::now();
        loop {
            if self.cluster(name).await.is_some_and(|v| done(&v)) {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < limit,
                "cluster {name}: not as awaited within {limit:?}\n{}",
                self.log_tail(60)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `/metrics` (empty while not served).
    pub async fn metrics(&self) -> String {
        match reqwest::get(format!("{}/metrics", self.base)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The last `n` lines of its log (and of any controller before it in the same `work`).
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// SIGKILL: a controller crash.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    /// SIGTERM; the controller must exit cleanly.
    pub fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = self.child.wait().expect("reaped");
        assert!(
            status.success(),
            "controller exited with {status} on SIGTERM"
        );
    }
}

impl Drop for RunController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of the text file at `path` (empty when unreadable).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// What of the host names one of `marks` ([`Lab::host_marks`]): processes, mounts, links,
/// network namespaces, loop devices ([`onesim::machine::host_traces`]).
pub fn host_traces(marks: &[String]) -> std::collections::BTreeSet<String> {
    let marks: Vec<&str> = marks.iter().map(String::as_str).collect();
    onesim::machine::host_traces(&marks)
}

/// A user-template attribute of VM `vm` as onesim holds it now.
#[allow(dead_code)] // each test binary compiles the helpers it does not use too
pub fn vm_attr(lab: &Lab, vm: u64, key: &str) -> Option<String> {
    lab.sim().sim.with(|st| {
        st.vms
            .get(&(vm as i64))
            .and_then(|v| v.user_template.get(key).map(str::to_string))
    })
}

/// The ids of the VMs of OneFlow role `role` (`ROLE_NAME`) not yet DONE, ascending.
#[allow(dead_code)]
pub fn vms_of_role(lab: &Lab, role: &str) -> Vec<u64> {
    lab.sim().sim.with(|st| {
        st.vms
            .iter()
            .filter(|(_, v)| v.state != onesim::state::S_DONE)
            .filter(|(_, v)| v.user_template.get("ROLE_NAME") == Some(role))
            .map(|(id, _)| *id as u64)
            .collect()
    })
}
