//! `flower-reconcile demo`: the whole system on one machine, in one command.
//!
//! Owns: the lab (onesim in-process with the process runtime, or with the image runtime
//! booting the appliance images; the templates, network and images an administrator would
//! create), the pinned Flower virtualenv (`flwr` on the host; the process runtime's Flower),
//! and the demo flow: plan → apply → follow to Ready → one real training run → teardown.
//!
//! Guarantees: the demo follows the cluster with the converge loop
//! ([`crate::reconciler::converge`]), so "Ready" is `plan::ready`'s; with `--keep` it
//! prints `status`, `plan` and `submit` commands that work as printed, the controller id
//! included (`keep_instructions`); each step prints how long it took. On the image runtime,
//! a missing prerequisite (root, systemd-nspawn, an image) stops it before anything starts,
//! saying how to get it; Ctrl-C leaves no machine, mount, namespace, link or loop device
//! (`tests/demo_flower.rs`, `flower_demo_on_the_images_interrupted_leaves_nothing_behind`).
//!
//! Must not: do anything a real controller would do differently. The demo drives the same
//! observe/plan/apply code as `flower-reconcile run`, against the simulator's real APIs.

pub mod lab;
pub mod venv;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::plan::{self, TextOptions};
use crate::reconciler::converge::{allow_all, converge, ConvergeOptions, Hooks, Pass};
use crate::reconciler::{self, Context, ReconcileOptions};
use crate::source::DirSource;

/// The spec the demo applies when none is given: manifests/examples/basic.yaml.
pub const EMBEDDED_SPEC: &str = include_str!("../../manifests/examples/basic.yaml");

/// The Flower app the demo trains with (e2e/apps/fedlinreg), embedded so the demo works
/// from any directory.
pub const EMBEDDED_APP: &[(&str, &str)] = &[
    (
        "pyproject.toml",
        include_str!("../../e2e/apps/fedlinreg/pyproject.toml"),
    ),
    (
        "fedlinreg/__init__.py",
        include_str!("../../e2e/apps/fedlinreg/fedlinreg/__init__.py"),
    ),
    (
        "fedlinreg/task.py",
        include_str!("../../e2e/apps/fedlinreg/fedlinreg/task.py"),
    ),
    (
        "fedlinreg/client_app.py",
        include_str!("../../e2e/apps/fedlinreg/fedlinreg/client_app.py"),
    ),
    (
        "fedlinreg/server_app.py",
        include_str!("../../e2e/apps/fedlinreg/fedlinreg/server_app.py"),
    ),
];

/// How the demo's VMs run.
#[derive(Debug, Clone)]
pub enum DemoRuntime {
    /// Each VM is a `flower-agent` process running Flower from the virtualenv (the default:
    /// fast, no root).
    Process,
    /// Each VM boots its appliance image as a systemd-nspawn machine (root only).
    Image {
        /// Holds `flower-superlink.qcow2` and `flower-supernode.qcow2`.
        images: PathBuf,
        /// Raw copies of the images, kept between runs.
        cache_dir: PathBuf,
    },
}

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the VMs run.
    pub runtime: DemoRuntime,
    /// Leave everything running and print how to use it.
    pub keep: bool,
    /// A spec file instead of the embedded basic.yaml.
    pub spec: Option<PathBuf>,
    /// Working directory (default: a fresh temporary directory).
    pub workdir: Option<PathBuf>,
    /// The Flower virtualenv (default: `target/flower-venv`).
    pub venv: Option<PathBuf>,
    /// Give up when the cluster is not Ready after this long.
    pub ready_timeout: Duration,
    /// argv prefix that runs `flower-agent` inside the simulated VMs.
    pub agent: Vec<String>,
}

/// Writes the demo's progress: one line per step, with elapsed time, and how long each
/// step took when the next one starts.
struct Progress {
    start: Instant,
    /// The step under way and when it began.
    current: std::sync::Mutex<Option<(String, Instant)>>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            start: Instant::now(),
            current: std::sync::Mutex::new(None),
        }
    }

    fn step(&self, text: &str) {
        self.end_step();
        println!("\n==> {text}");
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((text.to_string(), Instant::now()));
    }

    /// Print how long the step under way took: `    (<step>: 12.3s)`.
    fn end_step(&self) {
        if let Some((text, t)) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let name = text.split(" (").next().unwrap_or(&text);
            println!("    ({name}: {:.1}s)", t.elapsed().as_secs_f64());
        }
    }

    fn note(&self, text: &str) {
        println!("    [{:>6.1}s] {text}", self.start.elapsed().as_secs_f64());
        let _ = std::io::stdout().flush();
    }
}

/// Run the demo. Ctrl-C at any point tears everything down.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let p = Progress::new();
    let temp = match &opts.workdir {
        Some(_) => None,
        // Searchable (nothing listed): the VMs' Flower runs as its own user (#17 item 5).
        None => Some(
            tempfile::Builder::new()
                .prefix("flower-demo-")
                .permissions(std::fs::Permissions::from_mode(0o711))
                .tempdir()?,
        ),
    };
    let workdir = opts.workdir.clone().unwrap_or_else(|| {
        temp.as_ref()
            .map(|t| t.path().to_path_buf())
            .unwrap_or_default()
    });
    if let DemoRuntime::Image { images, .. } = &opts.runtime {
        // Before the virtualenv: a missing prerequisite is said at once.
        lab::check_image_runtime(images).map_err(|e| anyhow::anyhow!("--runtime image: {e}"))?;
    }
    std::fs::create_dir_all(&workdir)?;

    p.step("Flower virtualenv");
    let venv_dir = opts.venv.clone().unwrap_or_else(venv::default_location);
    let venv = venv::ensure(&venv_dir, |m| p.note(m)).await?;

    let (runtime, what) = match &opts.runtime {
        DemoRuntime::Process => (
            lab::LabRuntime::Process {
                agent: opts.agent.clone(),
                venv: venv.clone(),
            },
            "VMs run flower-agent",
        ),
        DemoRuntime::Image { images, cache_dir } => (
            lab::LabRuntime::Image {
                images: images.clone(),
                cache_dir: cache_dir.clone(),
            },
            "VMs boot the appliance images as systemd-nspawn machines",
        ),
    };
    p.step(&format!(
        "Starting onesim (oned XML-RPC, OneFlow, OneGate; {what})"
    ));
    let lab = lab::Lab::start(lab::LabConfig {
        base_dir: workdir.join("lab"),
        runtime,
        heartbeat_secs: 5,
        vm_step: Duration::from_millis(300),
        onegate: Default::default(),
        autoscaler_interval: lab::DEFAULT_AUTOSCALER_INTERVAL,
    })
    .await?;
    p.note(&format!("oned     {}", lab.urls.xmlrpc));
    p.note(&format!("OneFlow  {}", lab.urls.oneflow));
    p.note(&format!("OneGate  {}", lab.urls.onegate));
    let images = match &opts.runtime {
        DemoRuntime::Process => String::new(),
        DemoRuntime::Image { .. } => format!(
            ", images {:?} and {:?} (from the QCOW2 files)",
            lab::SUPERLINK_TEMPLATE,
            lab::SUPERNODE_TEMPLATE
        ),
    };
    p.note(&format!(
        "templates {:?}, {:?}{images} and network {:?} created as an administrator would",
        lab::SUPERLINK_TEMPLATE,
        lab::SUPERNODE_TEMPLATE,
        lab::NETWORK
    ));
    if let Some(net) = lab.bridged_net() {
        p.note(&format!(
            "machines on bridge {} (gateway {}); on the host they are named after: {}",
            net.bridge,
            net.gateway,
            lab.host_marks().join(" ")
        ));
    }

    let body = async {
        let outcome = drive(&opts, &p, &lab, &workdir, &venv).await;
        if let (Ok(kept), true) = (&outcome, opts.keep) {
            print!("{}", keep_instructions(&lab, kept, &venv));
            let _ = std::io::stdout().flush();
            tokio::signal::ctrl_c().await?;
        }
        outcome.map(drop)
    };
    let result = tokio::select! {
        r = body => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };

    p.step("Tearing down");
    lab.shutdown().await;
    p.note(match opts.runtime {
        DemoRuntime::Process => "every VM process stopped, simulator closed",
        DemoRuntime::Image { .. } => {
            "every machine stopped, its mounts, namespace and links removed, simulator closed"
        }
    });
    p.end_step();
    drop(temp);
    result
}

/// The id the demo's controller writes into its services' ownership marker: the printed
/// commands export it, or `status` and `plan` would not see the demo's cluster as theirs.
pub const CONTROLLER_ID: &str = "flower-reconcile-demo";

/// What the demo left running, for the `--keep` commands.
struct DemoCluster {
    name: String,
    specs: PathBuf,
    spec_file: PathBuf,
    app: PathBuf,
}

async fn drive(
    opts: &DemoOptions,
    p: &Progress,
    lab: &lab::Lab,
    workdir: &Path,
    venv: &Path,
) -> anyhow::Result<DemoCluster> {
    let specs = workdir.join("specs");
    std::fs::create_dir_all(&specs)?;
    let spec_file = match &opts.spec {
        Some(file) => {
            let to = specs.join("cluster.yaml");
            std::fs::copy(file, &to)?;
            to
        }
        None => {
            let to = specs.join("basic.yaml");
            std::fs::write(&to, EMBEDDED_SPEC)?;
            to
        }
    };
    let snapshot = DirSource::new(&specs).load_once().await?;
    crate::telemetry::record_revision(&snapshot.revision);
    if let Some(e) = snapshot.errors.first() {
        anyhow::bail!("{e}");
    }
    let desired = reconciler::desired_from_snapshot(&snapshot);
    let Some((name, cluster)) = desired.clusters.iter().next() else {
        anyhow::bail!("the spec defines no cluster");
    };
    let name = name.clone();
    let training = cluster.cluster.spec.training.clone();

    let backend = crate::one::ClientsBackend::new(&lab.one_config()?)?;
    let ctx = Context::connect(
        std::sync::Arc::new(backend),
        CONTROLLER_ID,
        ReconcileOptions::default(),
    )
    .await?;

    p.step(&format!("Plan for cluster {name:?}"));
    let live = reconciler::observe(&ctx, Utc::now()).await?;
    let the_plan = plan::plan(&desired, &live, Utc::now());
    print!(
        "{}",
        plan::render_text(&the_plan, TextOptions { color: false })
    );

    p.step("Applying, then following the cluster to Ready");
    let converge_opts = ConvergeOptions {
        scope: Some([name.clone()].into()),
        timeout: opts.ready_timeout,
        poll: Duration::from_secs(1),
        allow: &allow_all,
    };
    let mut hooks = DemoProgress {
        p,
        name: &name,
        last: String::new(),
        last_action: String::new(),
    };
    converge(&ctx, &desired, &converge_opts, &mut hooks).await?;

    p.step("Submitting a training run (flower-reconcile submit)");
    let app = workdir.join("app");
    for (rel, text) in EMBEDDED_APP {
        let path = app.join(rel);
        std::fs::create_dir_all(path.parent().unwrap_or(&app))?;
        std::fs::write(path, text)?;
    }
    let target = crate::submit::discover_target(&ctx, &name, None).await?;
    p.note(&format!(
        "Control API {} ({})",
        target.control_address,
        if target.ca_pem.is_some() {
            "TLS, CA published by the SuperLink"
        } else {
            "insecure"
        }
    ));
    let opts_submit = crate::submit::SubmitOptions {
        flwr: Some(venv.join("bin/flwr")),
        timeout: Duration::from_secs(600),
        ..Default::default()
    };
    let mut on_line = |_: crate::submit::OutputStream, line: &str| {
        if !line.trim().is_empty() {
            println!("    | {line}");
        }
    };
    let outcome =
        crate::submit::submit(&target, Some(&training), &app, &opts_submit, &mut on_line).await?;
    p.step("Training metrics");
    print_metrics(&outcome);
    if !outcome.succeeded() {
        anyhow::bail!("the run did not complete: {:?}", outcome.status);
    }
    p.note(&format!(
        "run {} completed in {:.1}s",
        outcome.run_id.unwrap_or_default(),
        outcome.elapsed.as_secs_f64()
    ));
    Ok(DemoCluster {
        name,
        specs,
        spec_file,
        app,
    })
}

/// The demo's converge hooks: print each change of the cluster's observed state and each
/// new action line.
struct DemoProgress<'a> {
    p: &'a Progress,
    name: &'a str,
    last: String,
    last_action: String,
}

impl Hooks for DemoProgress<'_> {
    fn on_pass(&mut self, pass: &Pass) {
        let line = describe(pass, self.name);
        if line != self.last {
            self.p.note(&line);
            self.last = line;
        }
    }

    fn on_applied(&mut self, _: &str, lines: &[String]) {
        // Waits repeat every pass; print an action only when it differs from the last one.
        for a in lines {
            if *a != self.last_action {
                self.p.note(a);
                self.last_action.clone_from(a);
            }
        }
    }
}

/// The service and its VMs in one line, then what the cluster waits for (or Ready).
fn describe(pass: &Pass, name: &str) -> String {
    let Some(svc) = pass.live.services(name).last() else {
        return "no service yet".into();
    };
    let link = svc
        .superlink
        .nodes
        .first()
        .map(|vm| format!("{:?}/{:?}", vm.state, vm.lcm_state))
        .unwrap_or_else(|| "-".into());
    let serving = match plan::superlink_serving(svc) {
        true => ", serving",
        false => "",
    };
    let verdict = match pass.clusters.get(name).and_then(|c| c.waiting()) {
        Some(why) => why,
        None => "Ready".into(),
    };
    format!(
        "service {} {:?} · superlink {link}{serving} · {} supernode VMs · {verdict}",
        svc.service_id,
        svc.state,
        svc.supernode.nodes.len(),
    )
}

fn print_metrics(outcome: &crate::submit::SubmitOutcome) {
    if outcome.rounds.is_empty() {
        println!("    (the app reported no per-round metrics)");
        return;
    }
    println!("    round  train loss    eval loss");
    for r in &outcome.rounds {
        let get = |m: &std::collections::BTreeMap<String, f64>| {
            m.iter()
                .find(|(k, _)| k.contains("loss"))
                .map_or("-".to_string(), |(_, v)| format!("{v:.6}"))
        };
        println!(
            "    {:>5}  {:>10}  {:>11}",
            r.round,
            get(&r.train),
            get(&r.evaluate)
        );
    }
}

/// The `--keep` block: an `export` line with what the CLI reads to reach the demo
/// (`ONE_XMLRPC`, `ONEFLOW_URL`, `ONE_AUTH`, `FLOWER_RECONCILE_CONTROLLER_ID`), then
/// `status`, `plan` and `submit` for the demo's cluster, each runnable as printed in a
/// POSIX shell (this executable by its absolute path, every value shell-quoted). Lines
/// starting with `#` are information. Shown by
/// `tests/demo_flower.rs::flower_demo_keep_prints_commands_that_work_as_printed`.
fn keep_instructions(lab: &lab::Lab, kept: &DemoCluster, venv: &Path) -> String {
    let exe = std::env::current_exe().unwrap_or_else(|_| "flower-reconcile".into());
    let q = |p: &Path| sh_quote(&p.display().to_string());
    let mut env = lab.env();
    env.push((
        "FLOWER_RECONCILE_CONTROLLER_ID".into(),
        CONTROLLER_ID.to_string(),
    ));
    let export: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{k}={}", sh_quote(v)))
        .collect();
    let (exe, name) = (q(&exe), sh_quote(&kept.name));
    let specs = q(&kept.specs);
    [
        String::new(),
        "==> Left running (--keep). Press Ctrl-C here to tear everything down.".into(),
        "# In another shell, these commands work as printed:".into(),
        format!("export {}", export.join(" ")),
        format!("{exe} status --direct --specs {specs} {name}"),
        format!("{exe} plan --specs {specs} --detailed-exitcode"),
        format!(
            "{exe} submit {name} {} --spec {} --flwr {}",
            q(&kept.app),
            q(&kept.spec_file),
            q(&venv.join("bin/flwr"))
        ),
        format!("# OneGate (the VMs report there): {}", lab.urls.onegate),
        format!(
            "# VM logs and context: {}",
            lab.base_dir.join("vms").display()
        ),
        String::new(),
    ]
    .join("\n")
}

/// `s` as one POSIX shell word: bare when it has only characters no shell treats
/// specially, else in single quotes (a `'` inside becomes `'\''`).
fn sh_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The argv prefix that runs the agent: the `flower-agent` next to this executable, or
/// this executable's hidden `agent` subcommand.
pub fn default_agent_argv() -> Vec<String> {
    let exe = std::env::current_exe().unwrap_or_default();
    let sibling = exe.with_file_name("flower-agent");
    if sibling.is_file() {
        vec![sibling.display().to_string()]
    } else {
        vec![exe.display().to_string(), "agent".to_string()]
    }
}

#[cfg(test)]
mod tests {
    use super::sh_quote;

    #[test]
    fn shell_quoting_keeps_plain_words_bare_and_quotes_the_rest() {
        assert_eq!(
            sh_quote("/tmp/flower-demo-x/specs"),
            "/tmp/flower-demo-x/specs"
        );
        assert_eq!(
            sh_quote("http://127.0.0.1:2633/RPC2"),
            "http://127.0.0.1:2633/RPC2"
        );
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's $HOME"), "'it'\\''s $HOME'");
        assert_eq!(sh_quote(""), "''");
    }
}
