//! `submit` against real Flower 1.25 processes: a TLS SuperLink on a 127.0.x.y address and two
//! SuperNodes from `$FLOWER_VENV`, running the e2e app `fedlinreg` for three rounds with the
//! default run configuration a SuperLink publishes from the seed's training variables
//! (FedProx, checkpoints each round), then the CLI with a spec's `training` overriding it.
//!
//! Needs FLOWER_VENV (a virtualenv with the pinned flwr; `e2e/test-all.sh` creates one) and
//! fails, never skips, without it. Every Flower process runs in its own process group,
//! killed on drop, and the test checks that none is left.

use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

mod common;

use flower_reconcile::agent::context::{Config, Context};
use flower_reconcile::agent::node::published_run_config;
use flower_reconcile::agent::paths::Paths;
use flower_reconcile::protocol::context as ctx;
use flower_reconcile::submit::{submit, OutputStream, RunStatus, SubmitOptions, SubmitTarget};

/// A spawned Flower process (group), killed when dropped.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn venv() -> PathBuf {
    let venv = std::env::var_os("FLOWER_VENV").map(PathBuf::from).expect(
        "FLOWER_VENV is not set: point it at a virtualenv with the pinned flwr \
         (e2e/test-all.sh creates target/flower-venv)",
    );
    for bin in [
        "flower-superlink",
        "flower-supernode",
        "flower-superexec",
        "flwr",
    ] {
        assert!(
            venv.join("bin").join(bin).is_file(),
            "FLOWER_VENV={} has no bin/{bin}",
            venv.display()
        );
    }
    venv
}

fn spawn(name: &'static str, venv: &Path, work: &Path, exe: &str, args: &[String]) -> Proc {
    let (mut cmd, log) = common::flower_command(venv, exe, work, name);
    let child = cmd
        .args(args)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {exe}: {e}"));
    Proc { name, child, log }
}

fn free_port(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(what: &str, limit: Duration, procs: &mut [&mut Proc], mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        for p in procs.iter_mut() {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) while waiting for {what}:\n{}",
                    p.name,
                    tail(&p.log)
                );
            }
        }
        assert!(start.elapsed() < limit, "no {what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("[timing] {what}: {:.2}s", start.elapsed().as_secs_f64());
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn tls_files(dir: &Path, ip: Ipv4Addr) -> (String, [PathBuf; 3]) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "flower-submit test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let mut srv = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    srv.subject_alt_names = vec![rcgen::SanType::IpAddress(IpAddr::V4(ip))];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = srv.signed_by(&key, &ca).unwrap();
    let files = [
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    ];
    std::fs::write(&files[0], ca.pem()).unwrap();
    std::fs::write(&files[1], cert.pem()).unwrap();
    std::fs::write(&files[2], key.serialize_pem()).unwrap();
    (ca.pem(), files)
}

/// PIDs of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

fn file_digest(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_submit_runs_fedlinreg_over_tls_with_decreasing_loss() {
    let venv = venv();
    let work = tempfile::tempdir().unwrap();
    // A per-process address, so concurrent test runs on one machine do not collide.
    let octet = 100 + (std::process::id() % 100) as u8;
    let link_ip = Ipv4Addr::new(127, 0, octet, 1);
    let (ca_pem, [ca, cert, key]) = tls_files(work.path(), link_ip);
    let [appio, fleet, control] = [(); 3].map(|_| free_port(link_ip));
    let addr = |port: u16| format!("{link_ip}:{port}");
    let s = |p: &Path| p.display().to_string();

    let started = Instant::now();
    let mut link = spawn(
        "superlink",
        &venv,
        work.path(),
        "flower-superlink",
        &[
            "--ssl-ca-certfile".into(),
            s(&ca),
            "--ssl-certfile".into(),
            s(&cert),
            "--ssl-keyfile".into(),
            s(&key),
            "--serverappio-api-address".into(),
            addr(appio),
            "--fleet-api-address".into(),
            addr(fleet),
            "--control-api-address".into(),
            addr(control),
            "--database".into(),
            s(&work.path().join("state.db")),
        ],
    );
    wait_for(
        "SuperLink Control API open",
        Duration::from_secs(60),
        &mut [&mut link],
        || TcpStream::connect((link_ip, control)).is_ok(),
    );
    let mut nodes: Vec<Proc> = (0..2u8)
        .map(|i| {
            let node_ip = Ipv4Addr::new(127, 0, octet, 2 + i);
            spawn(
                ["supernode-0", "supernode-1"][usize::from(i)],
                &venv,
                work.path(),
                "flower-supernode",
                &[
                    "--root-certificates".into(),
                    s(&ca),
                    "--superlink".into(),
                    addr(fleet),
                    "--clientappio-api-address".into(),
                    format!("{node_ip}:{}", free_port(node_ip)),
                    "--node-config".into(),
                    format!("partition-id={i} num-partitions=2"),
                ],
            )
        })
        .collect();
    let link_log = link.log.clone();
    {
        let mut all: Vec<&mut Proc> = std::iter::once(&mut link).chain(nodes.iter_mut()).collect();
        wait_for(
            "2 SuperNodes activated",
            Duration::from_secs(90),
            &mut all,
            || {
                std::fs::read_to_string(&link_log)
                    .unwrap_or_default()
                    .matches("[Fleet.ActivateNode] Activated node_id=")
                    .count()
                    >= 2
            },
        );
    }
    eprintln!(
        "[timing] federation up: {:.2}s",
        started.elapsed().as_secs_f64()
    );

    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/apps/fedlinreg");
    let before = file_digest(&app);
    // The published default run configuration of a SuperLink whose context uses only the
    // seed's variable names: what its agent puts in FL_RUN_CONFIG (process runtime under
    // `work`, so the checkpoint path is the one the ServerApp can write).
    let seed_context = Context::from_pairs([
        (ctx::RUNTIME, "process"),
        (ctx::NUM_ROUNDS, "3"),
        (ctx::STRATEGY, "FedProx"),
        (ctx::PROXIMAL_MU, "0.05"),
        (ctx::CHECKPOINT_ENABLED, "YES"),
        (ctx::CHECKPOINT_INTERVAL, "1"),
    ]);
    let cfg = Config::from_context(&seed_context).unwrap();
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    let published = published_run_config(&cfg, &Paths::new(work.path()));
    let checkpoints = work.path().join("opt/flower/checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap(); // the agent's configure does this
                                                    // Through the attribute codec, as the observation reads it back.
    let attribute = flower_reconcile::protocol::run_config::encode_attribute(&published);
    let target = SubmitTarget {
        cluster: "itest".into(),
        control_address: addr(control),
        ca_pem: Some(ca_pem),
        flower_version: "1.25.0".into(),
        default_run_config: Some(
            flower_reconcile::protocol::run_config::decode_attribute(&attribute).unwrap(),
        ),
    };
    let opts = SubmitOptions {
        timeout: Duration::from_secs(300),
        ..SubmitOptions::default()
    };
    let mut output = Vec::new();
    let result = submit(&target, None, &app, &opts, &mut |stream, line| {
        if stream == OutputStream::Stderr || line.contains("ROUND") {
            eprintln!("flwr: {line}");
        }
        output.push(line.to_string());
    })
    .await;
    let diagnostics = || {
        format!(
            "flwr output:\n{}\n--- superlink:\n{}\n--- supernode-0:\n{}",
            output.join("\n"),
            tail(&link.log),
            tail(&nodes[0].log)
        )
    };
    let outcome = result.unwrap_or_else(|e| panic!("submit failed: {e}\n{}", diagnostics()));
    eprintln!(
        "[timing] 3-round run: {:.2}s; run_config: {}",
        outcome.elapsed.as_secs_f64(),
        outcome.run_config
    );
    assert_eq!(outcome.status, RunStatus::Completed, "{}", diagnostics());
    // The published defaults reached the ServerApp: FedProx, three rounds, a checkpoint each.
    assert!(
        outcome.run_config.contains("strategy=\"FedProx\" ")
            && outcome.run_config.contains(" proximal-mu=0.05"),
        "{}",
        outcome.run_config
    );
    assert!(
        output
            .iter()
            .any(|l| l.contains("Starting FedProx strategy")),
        "{}",
        diagnostics()
    );
    let mut saved: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    saved.sort();
    assert_eq!(
        saved,
        [
            "checkpoint_round_1.npz",
            "checkpoint_round_2.npz",
            "checkpoint_round_3.npz"
        ],
        "{}",
        diagnostics()
    );
    assert!(outcome.run_id.is_some());
    assert_eq!(outcome.flwr_version.to_string(), "1.25.0");
    assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    let eval = outcome.series("eval_loss");
    let train = outcome.series("train_loss");
    eprintln!("eval_loss {eval:?}\ntrain_loss {train:?}");
    assert_eq!(
        eval.iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "{}",
        diagnostics()
    );
    assert_eq!(train.len(), 3);
    for series in [&eval, &train] {
        assert!(
            series.windows(2).all(|w| w[1].1 < w[0].1),
            "loss does not decrease: {series:?}"
        );
    }
    assert_eq!(
        file_digest(&app),
        before,
        "submit modified the user's app dir"
    );

    // The CLI against the same federation: 2 rounds from a spec file, JSON report.
    let spec = work.path().join("cluster.yaml");
    std::fs::write(
        &spec,
        "apiVersion: flower.opennebula.io/v1alpha1\nkind: FlowerCluster\nmetadata:\n  name: itest\n\
         spec:\n  flowerVersion: 1.25.0\n  opennebula:\n    templates: {superlink: a, supernode: b}\n\
         \x20   network: n\n  training:\n    numRounds: 2\n    strategy: {name: FedProx, proximalMu: 0.01}\n",
    )
    .unwrap();
    let ca_b64 = work.path().join("ca.b64");
    let ca_text = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        std::fs::read(&ca).unwrap(),
    );
    std::fs::write(&ca_b64, ca_text).unwrap();
    let cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_flower-reconcile"))
        .args(["submit", "itest"])
        .arg(&app)
        .arg("--spec")
        .arg(&spec)
        .args(["--address", &addr(control), "--output", "json", "--ca-file"])
        .arg(&ca_b64)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&cli.stdout);
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(
        cli.status.success(),
        "CLI failed ({}):\n{stdout}\n{stderr}",
        cli.status
    );
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let run_config = report["runConfig"].as_str().unwrap_or_default();
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(
        report["rounds"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    assert!(run_config.contains("strategy=\"FedProx\" "), "{report}");
    assert!(run_config.contains(" proximal-mu=0.01"), "{report}");
    assert!(stderr.contains("Starting FedProx strategy"), "{stderr}");
    eprintln!(
        "[timing] CLI 2-round FedProx run: {}s",
        report["elapsedSeconds"]
    );

    drop(nodes);
    drop(link);
    let needle = format!("127.0.{octet}.");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_mentioning(&needle).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        processes_mentioning(&needle),
        Vec::<String>::new(),
        "Flower processes left behind"
    );
}
