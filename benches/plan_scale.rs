//! Scale benchmark of observe and plan against onesim: 1,000 clusters / 20,000 VMs.
//!
//! onesim runs in a child process (this binary started again with `--onesim-child`), so the
//! figures are the controller's alone. Prints:
//! - the API requests one observation costs, counted by onesim itself (`GET /requests`),
//!   against the target of one service listing + ⌈VMs / 2000⌉ pool pages;
//! - the observation's wall time (HTTP + XML over loopback, median of 3);
//! - the plan time once the data has arrived (median of 5), converged and all drifted;
//! - the controller process's RSS (current and peak; target < 100 MiB), with the peak of
//!   each half of an observation;
//! - the shipped binary: `flower-reconcile plan --detailed-exitcode` over the same 1,000
//!   specs as files (exit 0: the converged state plans nothing), its time and peak RSS,
//!   with tracing off (the default) and on (`OTEL_EXPORTER_OTLP_ENDPOINT` set to an
//!   OTLP/HTTP sink in this process), and optionally an earlier build with tracing off
//!   (`PLAN_SCALE_BASELINE`), interleaved, median of 5 each with per-round ratios, and the
//!   bytes exported;
//! - the service: `flower-reconcile run` on those files, polling every 2 s, its RSS once
//!   every cluster was reconciled. It keeps up to three observations (the current one, one
//!   queued, one in progress) and glibc's per-thread arenas keep each worker's transient
//!   high-water mark resident, so it is measured twice: as is, and with the malloc
//!   settings of manifests/flower-reconcile.service (one arena).
//!
//! Run with `cargo bench --bench plan_scale`.
//!
//! Figures of 2026-12-03, quiet machine (2 cores), two whole bench runs, `plan` (the binary,
//! 1,000 spec files, 20,000 VMs), five interleaved rounds each, with
//! `PLAN_SCALE_BASELINE` = a release build of 35750fd (the commit before tracing came in):
//! baseline 2.31 s / 2.15 s, tracing off 2.03 s / 2.18 s, on 2.01 s / 2.18 s (medians);
//! per-round ratios off/baseline 0.86 / 0.93, on/off 0.98 / 0.99 — tracing off costs nothing
//! measurable against the build without it, and on costs nothing measurable either (the
//! plan makes 11 API calls: 7,156 bytes of spans per run); peak RSS 84–87 MiB in all three.
//! In-process plan converged 564 ms, drifted 639 ms; observation 952 ms; `run` RSS
//! 114–156 MiB across the two runs (103–106 MiB with one malloc arena).
//! Earlier (h4, loaded machine, median of 3, not interleaved): off 1.34 s, on 1.70 s.
//! The first run of the tracing cases found `plan` blocked for ever on its stderr pipe
//! (1,000 warnings, read only after exit): stderr and stdout are now read as it runs.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use flower_reconcile::api::load::spec_hash;
use flower_reconcile::api::FlowerCluster;
use flower_reconcile::one::ClientsBackend;
use flower_reconcile::one::{Credentials, OneConfig};
use flower_reconcile::plan::{plan, spec_fields, AppliedSpec, DesiredCluster, DesiredState};
use flower_reconcile::reconciler::{observe, Context, ReconcileOptions};
use serde_json::{json, Value};

const CLUSTERS: u64 = 1_000;
const NODES_PER_CLUSTER: u64 = 19; // + 1 SuperLink = 20 VMs per cluster
const PAGE: u64 = 2_000;
const CHILD_FLAG: &str = "--onesim-child";
const PASSWORD: &str = "bench-pw";
const CONTROLLER: &str = "bench";

fn cluster(i: u64) -> FlowerCluster {
    serde_json::from_value(json!({
        "apiVersion": flower_reconcile::api::API_VERSION,
        "kind": flower_reconcile::api::KIND,
        "metadata": {"name": format!("cluster-{i:04}")},
        "spec": {
            "opennebula": {"templates": {"superlink": 1, "supernode": 2}, "network": 0},
            "supernodes": {"count": NODES_PER_CLUSTER, "max": 40},
        }
    }))
    .expect("bench spec")
}

fn desired() -> DesiredState {
    let mut d = DesiredState {
        complete: true,
        ..DesiredState::default()
    };
    for i in 0..CLUSTERS {
        let c = cluster(i);
        d.clusters.insert(
            c.metadata.name.clone(),
            DesiredCluster {
                spec_hash: spec_hash(&c),
                cluster: c,
                revision: "bench".into(),
                site_node_keys: Default::default(),
            },
        );
    }
    d
}

/// 1,000 services owned by [`CONTROLLER`], each with one SuperLink and 19 SuperNode VMs
/// RUNNING, with the agents' attributes published.
fn populate(st: &mut onesim::state::State) {
    use onesim::state::{L_RUNNING, S_ACTIVE};
    let tid = st
        .alloc_template("NAME=\"node\"\nCPU=\"1\"\nMEMORY=\"1024\"", 0)
        .expect("template");
    let beat = Utc::now().to_rfc3339();
    let not_after = (Utc::now() + chrono::Duration::days(300)).to_rfc3339();
    for i in 0..CLUSTERS {
        let c = cluster(i);
        let name = c.metadata.name.clone();
        let sid = st.alloc_doc(&name, onesim::flow::SERVICE, json!({}), 0);
        let mut roles = Vec::new();
        for (role, n) in [("superlink", 1), ("supernode", NODES_PER_CLUSTER)] {
            let mut nodes = Vec::new();
            for k in 0..n {
                let extra = format!("SERVICE_ID=\"{sid}\"\nROLE_NAME=\"{role}\"");
                let id = st
                    .instantiate(
                        tid,
                        &format!("{role}_{k}_(service_{sid})"),
                        false,
                        &extra,
                        0,
                    )
                    .expect("vm");
                st.set_state(id, S_ACTIVE, L_RUNNING);
                let vm = st.vms.get_mut(&id).expect("vm exists");
                vm.user_template.set("READY", "YES");
                vm.user_template.set("FL_HEARTBEAT", &beat);
                if role == "superlink" {
                    // The controller trusts FL_ENDPOINT only on one of the VM's own NIC
                    // addresses: give the SuperLink the NIC it would have.
                    let nic =
                        onesim::template::Template::parse("NIC=[IP=\"10.0.0.1\",NIC_ID=\"0\"]")
                            .expect("NIC");
                    vm.template.merge(&nic);
                    vm.user_template.set("FL_READY", "YES");
                    vm.user_template.set("FL_ENDPOINT", "10.0.0.1:9092");
                    vm.user_template.set("FL_CERT_NOT_AFTER", &not_after);
                } else {
                    vm.user_template.set("FL_NODE_READY", "YES");
                }
                nodes.push(json!({"deploy_id": id, "vm_info": {"VM": {"ID": id.to_string()}}}));
            }
            roles.push(json!({"name": role, "type": "vm", "template_id": tid,
                "cardinality": n, "state": 2, "nodes": nodes}));
        }
        let body = json!({
            "name": name,
            "state": 2,
            "flower_reconcile": {"cluster": name, "spec_hash": spec_hash(&c), "controller": CONTROLLER, "format": 1},
            AppliedSpec::BODY_KEY: AppliedSpec { format: AppliedSpec::FORMAT, fields: spec_fields(&c) },
            "roles": roles,
        });
        if let Some(d) = st.docs.get_mut(&sid) {
            d.body = body;
        }
    }
    st.effects.clear();
}

/// The child: onesim with the synthetic pools, until stdin closes.
fn child() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut cfg = onesim::Config::for_tests(PASSWORD);
        cfg.timings = onesim::Timings::default();
        let sim = onesim::start(cfg).await.expect("onesim starts");
        sim.sim.with(populate);
        let urls = sim.urls();
        println!(
            "{}",
            json!({"xmlrpc": urls.xmlrpc, "oneflow": urls.oneflow, "control": urls.control})
        );
        let _ = std::io::stdout().flush();
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
        sim.shutdown().await;
    });
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Reset VmHWM to the current RSS (Linux ≥ 4.0: `5` to /proc/self/clear_refs).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

async fn control(base: &str, method: reqwest::Method, path: &str) -> Value {
    let r = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .send()
        .await
        .expect("control API");
    r.json().await.unwrap_or(Value::Null)
}

fn main() {
    if std::env::args().any(|a| a == CHILD_FLAG) {
        return child();
    }
    let exe = std::env::current_exe().expect("own path");
    let mut sim = Command::new(exe)
        .arg(CHILD_FLAG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("onesim child starts");
    let mut line = String::new();
    BufReader::new(sim.stdout.take().expect("child stdout"))
        .read_line(&mut line)
        .expect("child URLs");
    let urls: Value = serde_json::from_str(&line).expect("child URLs JSON");
    let url = |k: &str| urls[k].as_str().expect("url").to_string();

    let rss_start = rss_kib("VmRSS:");
    let desired = desired();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut one = OneConfig::new(
            url("xmlrpc").parse().expect("url"),
            url("oneflow").parse().expect("url"),
            Credentials::new("oneadmin", PASSWORD).expect("credentials"),
        );
        one.requests_per_second = std::num::NonZeroU32::new(1000).expect("nonzero");
        one.timeout = Duration::from_secs(300);
        let backend = Arc::new(ClientsBackend::new(&one).expect("clients"));
        let ctx = Context::connect(backend, CONTROLLER, ReconcileOptions::default())
            .await
            .expect("context");
        let control_url = url("control");

        // Peak RSS of each half of an observation (VmHWM reset between them).
        let phase_peaks = {
            let mut peaks = vec![("state before observing", rss_kib("VmRSS:") / 1024)];
            reset_peak_rss();
            let services = ctx.backend.list_services().await.expect("services");
            peaks.push(("peak during the service listing alone", rss_kib("VmHWM:") / 1024));
            reset_peak_rss();
            let vms = ctx.backend.list_vms(PAGE as u32).await.expect("vms");
            peaks.push(("peak during the VM pool pages alone", rss_kib("VmHWM:") / 1024));
            drop((services, vms));
            peaks
        };

        // One observation, its requests counted by onesim.
        control(&control_url, reqwest::Method::DELETE, "/requests").await;
        let t = Instant::now();
        let live = observe(&ctx, Utc::now()).await.expect("observe");
        let mut observe_times = vec![t.elapsed()];
        let counted = control(&control_url, reqwest::Method::GET, "/requests").await;
        assert_eq!(live.clusters.len(), CLUSTERS as usize, "every cluster observed");
        let vm_count: u64 = live
            .clusters
            .values()
            .flatten()
            .map(|s| (s.superlink.nodes.len() + s.supernode.nodes.len()) as u64)
            .sum();
        for _ in 0..2 {
            let t = Instant::now();
            observe(&ctx, Utc::now()).await.expect("observe");
            observe_times.push(t.elapsed());
        }

        let now = Utc::now();
        let mut plan_times = Vec::new();
        let mut actions = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let p = plan(&desired, &live, now);
            plan_times.push(t.elapsed());
            actions = p.actions.len();
        }
        let mut drifted = desired.clone();
        for d in drifted.clusters.values_mut() {
            d.cluster.spec.supernodes.count += 2;
        }
        let mut drift_times = Vec::new();
        let mut drift_actions = 0;
        for _ in 0..5 {
            let t = Instant::now();
            drift_actions = plan(&drifted, &live, now).actions.len();
            drift_times.push(t.elapsed());
        }

        let requests = counted["total"].as_u64().unwrap_or(0);
        let expected = 1 + vm_count.div_ceil(PAGE);
        let by_target: BTreeMap<String, u64> = counted["requests"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        println!("plan_scale: {CLUSTERS} clusters, {vm_count} VMs in onesim (separate process)");
        println!(
            "  API requests for one observation (counted by onesim): {requests} {by_target:?}"
        );
        println!(
            "    target: 1 service listing + ceil({vm_count}/{PAGE}) pool pages = {expected}{}",
            if requests > expected { "; OVER TARGET" } else { "" }
        );
        println!(
            "  observation wall time (loopback HTTP + XML), median of 3: {:?}",
            median(observe_times)
        );
        println!(
            "  plan after the data arrived, converged ({actions} actions), median of 5: {:?} (target < 1 s)",
            median(plan_times)
        );
        println!(
            "  plan, every cluster drifted ({drift_actions} actions), median of 5: {:?}",
            median(drift_times)
        );
        println!(
            "  controller RSS: start {} MiB, now {} MiB, peak {} MiB (target < 100 MiB)",
            rss_start / 1024,
            rss_kib("VmRSS:") / 1024,
            // VmHWM was last reset before the VM pages; the listing's peak came before.
            phase_peaks
                .iter()
                .map(|(_, mib)| *mib)
                .fold(rss_kib("VmHWM:") / 1024, u64::max)
        );
        for (phase, mib) in &phase_peaks {
            println!("    {phase}: {mib} MiB");
        }
        assert_eq!(actions, 0, "a converged state must plan nothing");
        assert!(drift_actions >= CLUSTERS as usize);
    });
    let specs = spec_dir();
    cli_plan_traced(specs.path(), &url("xmlrpc"), &url("oneflow"));
    cli_run(specs.path(), &url("xmlrpc"), &url("oneflow"), &[]);
    cli_run(
        specs.path(),
        &url("xmlrpc"),
        &url("oneflow"),
        &unit_malloc_env(),
    );
    drop(sim.stdin.take());
    let _ = sim.wait();
}

/// The malloc settings of the shipped systemd unit, to measure `run` as it is deployed.
fn unit_malloc_env() -> Vec<(String, String)> {
    let unit = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/manifests/flower-reconcile.service"
    );
    std::fs::read_to_string(unit)
        .expect("systemd unit")
        .lines()
        .filter_map(|l| l.strip_prefix("Environment=MALLOC_"))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (format!("MALLOC_{k}"), v.to_string()))
        .collect()
}

/// 1,000 spec files and an owner-only ONE_AUTH file, for the shipped binary.
fn spec_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let specs = dir.path().join("clusters");
    std::fs::create_dir(&specs).expect("specs dir");
    for i in 0..CLUSTERS {
        let c = cluster(i);
        // JSON is YAML: the loader reads these like any spec file.
        let text = serde_json::to_string_pretty(&c).expect("spec as JSON");
        std::fs::write(specs.join(format!("{}.yaml", c.metadata.name)), text).expect("spec");
    }
    let auth = dir.path().join("one_auth");
    std::fs::write(&auth, format!("oneadmin:{PASSWORD}")).expect("auth file");
    // The client refuses an auth file other users can read.
    let owner_only = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&auth, owner_only).expect("chmod 600");
    dir
}

fn binary(dir: &std::path::Path, xmlrpc: &str, oneflow: &str, args: &[&str]) -> Command {
    binary_at(
        std::path::Path::new(env!("CARGO_BIN_EXE_flower-reconcile")),
        dir,
        xmlrpc,
        oneflow,
        args,
    )
}

fn binary_at(
    exe: &std::path::Path,
    dir: &std::path::Path,
    xmlrpc: &str,
    oneflow: &str,
    args: &[&str],
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .args(["--controller-id", CONTROLLER, "--specs"])
        .arg(dir.join("clusters"))
        .env("ONE_XMLRPC", xmlrpc)
        .env("ONEFLOW_URL", oneflow)
        .env("ONE_AUTH", dir.join("one_auth"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The shipped binary: `flower-reconcile plan` over the same 1,000 specs as files, with
/// `env`; its wall time and peak RSS (sampled from /proc while it runs: the last sample
/// before it exits).
fn cli_plan(
    exe: &std::path::Path,
    dir: &std::path::Path,
    xmlrpc: &str,
    oneflow: &str,
    env: &[(&str, &str)],
) -> (Duration, u64) {
    let t = Instant::now();
    let mut child = binary_at(exe, dir, xmlrpc, oneflow, &["plan", "--detailed-exitcode"])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .expect("flower-reconcile plan starts");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let out_reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    // Read stderr while it runs: a warning per cluster fills a pipe (64 KiB) long before
    // the end, and the child would block on it for ever.
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = stderr.read_to_string(&mut err);
        err
    });
    let mut peak_kib = 0;
    let code = loop {
        peak_kib = status_kib(child.id(), "VmHWM:").map_or(peak_kib, |k| k.max(peak_kib));
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = t.elapsed();
    let err = reader.join().unwrap_or_default();
    let last: Vec<&str> = err.lines().rev().take(5).collect();
    let out = out_reader.join().unwrap_or_default();
    let plan: Vec<&str> = out.lines().take(20).collect();
    assert_eq!(
        code,
        Some(0),
        "a converged state plans nothing: {plan:#?} {last:#?}"
    );
    (took, peak_kib)
}

/// `plan` with tracing off (the default) and on, five rounds, the cases interleaved in each
/// round so that a drift of the machine's speed hits them alike; with
/// `PLAN_SCALE_BASELINE=/path/to/flower-reconcile` (a build of an earlier commit, e.g. the
/// one before tracing came in) that binary runs first in each round, with the same specs
/// and onesim, and the ratios to it are printed too. Ratios are per round, then the median.
fn cli_plan_traced(dir: &std::path::Path, xmlrpc: &str, oneflow: &str) {
    const ROUNDS: usize = 5;
    let (endpoint, exported) = otlp_sink();
    let ours = std::path::PathBuf::from(env!("CARGO_BIN_EXE_flower-reconcile"));
    // (label, binary, environment)
    type Case<'a> = (String, std::path::PathBuf, Vec<(&'a str, &'a str)>);
    let mut cases: Vec<Case> = Vec::new();
    if let Some(base) = std::env::var_os("PLAN_SCALE_BASELINE") {
        cases.push((
            "baseline (PLAN_SCALE_BASELINE), tracing off".into(),
            base.into(),
            vec![],
        ));
    }
    cases.push(("tracing off".into(), ours.clone(), vec![]));
    cases.push((
        "tracing on (OTLP/HTTP)".into(),
        ours,
        vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())],
    ));
    let mut runs: Vec<Vec<(Duration, u64)>> = vec![Vec::new(); cases.len()];
    let mut bytes = vec![0u64; cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, exe, env)) in cases.iter().enumerate() {
            exported.store(0, Ordering::Relaxed);
            runs[i].push(cli_plan(exe, dir, xmlrpc, oneflow, env));
            bytes[i] += exported.load(Ordering::Relaxed);
        }
    }
    let secs = |i: usize, r: usize| runs[i][r].0.as_secs_f64();
    for (i, (label, _, _)) in cases.iter().enumerate() {
        let peak = runs[i].iter().map(|r| r.1).max().unwrap_or(0);
        let took = median(runs[i].iter().map(|r| r.0).collect());
        println!(
            "  `flower-reconcile plan` (the binary, {CLUSTERS} spec files), {label}: median of {ROUNDS} {took:?}, peak RSS {} MiB (target < 100 MiB), {} bytes of spans exported per run",
            peak / 1024,
            bytes[i] / ROUNDS as u64
        );
    }
    let ratio = |a: usize, b: usize| {
        let mut r: Vec<f64> = (0..ROUNDS).map(|k| secs(a, k) / secs(b, k)).collect();
        r.sort_by(f64::total_cmp);
        (r[0], r[ROUNDS / 2], r[ROUNDS - 1])
    };
    let (off, on) = (cases.len() - 2, cases.len() - 1);
    let (lo, med, hi) = ratio(on, off);
    println!("  tracing on / off, per round: median {med:.3} (min {lo:.3}, max {hi:.3})");
    if cases.len() == 3 {
        let (lo, med, hi) = ratio(off, 0);
        println!("  tracing off / baseline, per round: median {med:.3} (min {lo:.3}, max {hi:.3})");
    }
}

/// An OTLP/HTTP receiver on loopback that answers every export with 200 and counts the
/// bytes of the bodies it got; returns its base URL.
fn otlp_sink() -> (String, Arc<AtomicU64>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let url = format!("http://{}", listener.local_addr().expect("local addr"));
    let bytes = Arc::new(AtomicU64::new(0));
    let count = bytes.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let count = count.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn);
                loop {
                    let mut len = 0u64;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0; len as usize];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    count.fetch_add(len, Ordering::Relaxed);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if r.get_mut().write_all(ok).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, bytes)
}

/// The service: `flower-reconcile run` until every cluster has been reconciled once,
/// then through `SETTLE` more observations; its RSS then and at its peak.
fn cli_run(dir: &std::path::Path, xmlrpc: &str, oneflow: &str, env: &[(String, String)]) {
    const SETTLE: Duration = Duration::from_secs(10);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let state = dir.join("state");
    let t = Instant::now();
    let mut child = binary(
        dir,
        xmlrpc,
        oneflow,
        &["run", "--poll-interval", "2s", "--listen", &listen],
    )
    .arg("--state-dir")
    .arg(&state)
    .envs(env.iter().cloned())
    .spawn()
    .expect("flower-reconcile run starts");
    let reconciled = || -> u64 {
        // Plain HTTP/1.1 on loopback: enough for a metrics scrape.
        let mut text = String::new();
        let scraped = std::net::TcpStream::connect(&listen).and_then(|mut c| {
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
            c.read_to_string(&mut text)
        });
        if scraped.is_err() {
            return 0;
        }
        text.lines()
            .filter(|l| l.starts_with("flower_reconcile_reconciles_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let mut all_done = None;
    while t.elapsed() < Duration::from_secs(300) {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if all_done.is_none() && reconciled() >= CLUSTERS {
            all_done = Some(t.elapsed());
        }
        if all_done.is_some_and(|d| t.elapsed() > d + SETTLE) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = child.id();
    let (now, peak) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let code = child.wait().expect("run exits").code();
    let mut err = String::new();
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
    let all_done = all_done.unwrap_or_else(|| panic!("run never reconciled every cluster: {err}"));
    println!(
        "  `flower-reconcile run` (the service, {CLUSTERS} spec files, environment {env:?}): every cluster reconciled after {all_done:?}; RSS {} MiB {SETTLE:?} later, peak {} MiB; exit {code:?} on SIGTERM",
        now.unwrap_or(0) / 1024,
        peak.unwrap_or(0) / 1024
    );
}
