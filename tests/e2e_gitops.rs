//! End to end, the GitOps way: a FlowerCluster committed to a Git repository becomes a real
//! Flower federation on onesim (process runtime: VMs run `flower-agent`, which runs real
//! `flower-superlink` / `flower-supernode` from the pinned virtualenv), and keeps training
//! through scaling, certificate rotation, a crashed SuperNode and a controller restart, until
//! the spec is deleted.
//!
//! The controller is the real `flower-reconcile run --git file://…` process; training runs go
//! through the real `flower-reconcile submit` over TLS with the CA the SuperLink published.
//! Each step prints its timing (`e2e timing: …`) so regressions show in the test output.
//! Needs `FLOWER_VENV` (created by e2e/test-all.sh); without it the test fails.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::lab::{RunController, Runtime};
use flower_reconcile::api::{ConditionStatus, ConditionType};
use flower_reconcile::demo::lab::{Lab, NETWORK, SUPERLINK_TEMPLATE, SUPERNODE_TEMPLATE};
use flower_reconcile::runtime::status::ClusterView;
use serde_json::Value;

const CLUSTER: &str = "e2e";
const SPEC_FILE: &str = "clusters/e2e.yaml";

/// The spec, as a user would commit it.
#[derive(Clone, Copy)]
struct Spec {
    count: u32,
    rounds: u32,
    /// (validity, renewBefore)
    tls: (&'static str, &'static str),
}

impl Spec {
    fn yaml(self) -> String {
        let (validity, renew) = self.tls;
        let (n, rounds) = (self.count, self.rounds);
        format!(
            "apiVersion: flower.opennebula.io/v1alpha1
kind: FlowerCluster
metadata:
  name: {CLUSTER}
spec:
  flowerVersion: 1.25.0
  deletionPolicy: Delete
  opennebula:
    templates:
      superlink: {SUPERLINK_TEMPLATE}
      supernode: {SUPERNODE_TEMPLATE}
    network: {NETWORK}
  tls:
    enabled: true
    mode: auto
    validity: {validity}
    renewBefore: {renew}
  superlink:
    controlApi: network
  supernodes:
    count: {n}
    min: 1
    max: 4
    failurePolicy:
      gracePeriod: 10s
      heartbeatInterval: 2s
  training:
    strategy:
      name: FedAvg
    numRounds: {rounds}
    minFitClients: {n}
    minEvaluateClients: {n}
    minAvailableClients: {n}
"
        )
    }
}

/// A throwaway Git repository, driven with the git CLI (argv only).
struct Repo {
    dir: PathBuf,
}

impl Repo {
    fn init(dir: PathBuf) -> Repo {
        std::fs::create_dir_all(dir.join("clusters")).expect("repo dir");
        let r = Repo { dir };
        r.git(&["init", "-q", "-b", "main"]);
        std::fs::write(
            r.dir.join("README.md"),
            "clusters managed by flower-reconcile\n",
        )
        .expect("readme");
        // Git drops empty directories: the placeholder keeps `clusters/` when its last spec
        // is removed (a vanished path is an error the controller never prunes on).
        std::fs::write(r.dir.join("clusters/.gitkeep"), "").expect("gitkeep");
        r.git(&["add", "README.md", "clusters/.gitkeep"]);
        r.git(&["commit", "-q", "-m", "init"]);
        r
    }

    fn git(&self, args: &[&str]) -> String {
        common::git(&self.dir, args)
    }

    /// Commit `spec` (or the removal of the file) and return the new HEAD.
    fn commit(&self, spec: Option<Spec>, message: &str) -> String {
        match spec {
            Some(s) => {
                std::fs::write(self.dir.join(SPEC_FILE), s.yaml()).expect("write spec");
                self.git(&["add", SPEC_FILE]);
            }
            None => {
                self.git(&["rm", "-q", SPEC_FILE]);
                // Removing the last cluster is a mass delete: the commit says it is meant.
                let marker = format!("clusters/{}", flower_reconcile::source::ALLOW_DELETE_FILE);
                std::fs::write(self.dir.join(&marker), format!("{CLUSTER}\n"))
                    .expect("write marker");
                self.git(&["add", &marker]);
            }
        }
        self.git(&["commit", "-q", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.display())
    }
}

fn ready(v: &ClusterView, sha: &str, nodes: u32) -> bool {
    v.status.observed_revision.as_deref() == Some(sha)
        && v.status.nodes.ready >= nodes
        && v.status
            .conditions
            .iter()
            .any(|c| c.kind == ConditionType::Ready && c.status == ConditionStatus::True)
}

/// Everything the harness needs at hand.
struct Harness {
    lab: Lab,
    repo: Repo,
    work: PathBuf,
    app: PathBuf,
    start: Instant,
}

impl Harness {
    fn timing(&self, what: &str, d: Duration) {
        println!(
            "e2e timing: {what}: {:.1}s (at {:.1}s)",
            d.as_secs_f64(),
            self.start.elapsed().as_secs_f64()
        );
    }

    fn log_tail(&self) -> String {
        common::lab::log_tail(&self.work.join("controller.log"), 60)
    }

    /// `flower-reconcile run` following the repository's `clusters/` on `main`.
    fn controller(&self) -> RunController {
        let url = self.repo.url();
        let source = ["--git", &url, "--branch", "main", "--path", "clusters"];
        RunController::start(&self.lab, &source, &self.work)
    }

    /// Poll `check` every 250 ms until it returns `Some`; fail with the controller's log.
    async fn wait<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}\n--- controller log (tail) ---\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_ready(&self, ctl: &RunController, sha: &str, nodes: u32) -> ClusterView {
        let what = format!("{CLUSTER} Ready at {sha} with {nodes} SuperNodes");
        self.wait(&what, Duration::from_secs(120), move || async move {
            ctl.cluster(CLUSTER).await.filter(|v| ready(v, sha, nodes))
        })
        .await
    }

    /// onesim's event log after `since`.
    async fn events(&self, since: u64) -> Vec<Value> {
        let path = format!("/events?since={since}");
        let v = common::onesim_get(&self.lab.urls.control, &path).await;
        v["events"].as_array().cloned().unwrap_or_default()
    }

    async fn last_seq(&self) -> u64 {
        let v = common::onesim_get(&self.lab.urls.control, "/events?since=0").await;
        v["last_seq"].as_u64().unwrap_or(0)
    }

    /// Wait for the first event after `since` matching `pred`; returns its time.
    async fn first_event(&self, since: u64, what: &str, pred: fn(&Value) -> bool) -> Value {
        self.first_event_within(since, what, Duration::from_secs(60), pred)
            .await
    }

    async fn first_event_within(
        &self,
        since: u64,
        what: &str,
        timeout: Duration,
        pred: fn(&Value) -> bool,
    ) -> Value {
        self.wait(what, timeout, move || async move {
            self.events(since).await.into_iter().find(pred)
        })
        .await
    }

    /// The onesim VMs (control API).
    async fn vms(&self) -> Vec<Value> {
        let v = common::onesim_get(&self.lab.urls.control, "/vms").await;
        v["vms"].as_array().cloned().unwrap_or_default()
    }

    /// One training run through `flower-reconcile submit`; returns the eval losses.
    fn submit(&self, label: &str, rounds: usize) -> Vec<f64> {
        let t = Instant::now();
        let out = common::lab::reconcile(&self.lab)
            .args(["--output", "json", "submit", CLUSTER])
            .arg(&self.app)
            .arg("--spec")
            .arg(self.repo.dir.join(SPEC_FILE))
            .arg("--flwr")
            .arg(venv().join("bin/flwr"))
            .args(["--timeout", "180s"])
            .output()
            .expect("submit runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "submit ({label}) failed: {}\nstdout: {stdout}\nstderr (tail): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 40)
        );
        let report: Value = serde_json::from_str(stdout.trim()).expect("submit prints JSON");
        assert_eq!(report["status"], "completed", "{report}");
        let reported = report["rounds"].as_array().expect("rounds");
        assert_eq!(reported.len(), rounds, "every round reported: {report}");
        let losses: Vec<f64> = reported
            .iter()
            .map(|r| r["evaluate"]["eval_loss"].as_f64().expect("eval_loss"))
            .collect();
        assert!(
            losses.windows(2).all(|w| w[1] < w[0]),
            "eval loss must decrease ({label}): {losses:?}"
        );
        self.timing(
            &format!("training run ({label}, {rounds} rounds)"),
            t.elapsed(),
        );
        losses
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn venv() -> PathBuf {
    common::flower_venv()
}

fn is_instantiate(e: &Value) -> bool {
    e["api"] == "oneflow"
        && e["call"]
            .as_str()
            .is_some_and(|c| c.starts_with("POST /service_template/") && c.ends_with("/action"))
}

fn is_scale(e: &Value) -> bool {
    e["api"] == "oneflow" && e["call"].as_str().is_some_and(|c| c.ends_with("/scale"))
}

fn is_rotate_request(e: &Value) -> bool {
    e["call"] == "one.vm.update" && e["args"].to_string().contains("FL_ROTATE_REQUEST")
}

fn is_terminate(e: &Value) -> bool {
    e["call"] == "one.vm.action" && e["args"].to_string().contains("terminate")
}

fn is_service_delete(e: &Value) -> bool {
    e["api"] == "oneflow"
        && e["call"]
            .as_str()
            .is_some_and(|c| c.starts_with("DELETE /service/"))
}

fn is_mutation(e: &Value) -> bool {
    (e["api"] == "oneflow" && e["call"].as_str().is_some_and(|c| !c.starts_with("GET ")))
        || matches!(e["call"].as_str(), Some("one.vm.update" | "one.vm.action"))
}

fn event_ms(e: &Value) -> u64 {
    e["time_ms"].as_u64().expect("event time")
}

fn since_ms(start_ms: u64, e: &Value) -> Duration {
    Duration::from_millis(event_ms(e).saturating_sub(start_ms))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_gitops_trains_through_scale_rotation_failure_restart_and_delete() {
    flower_reconcile::one::http::ensure_crypto_provider();
    let tmp = KeepOnFailure(Some(
        tempfile::Builder::new()
            .prefix("fr-e2e-")
            .tempdir()
            .expect("tmp"),
    ));
    let work = tmp.path();
    let lab = common::lab::start(&work, Runtime::Process, Duration::from_millis(200)).await;
    let app = work.join("app");
    for (rel, text) in flower_reconcile::demo::EMBEDDED_APP {
        let path = app.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("app dir");
        std::fs::write(path, text).expect("app file");
    }
    let h = Harness {
        repo: Repo::init(work.join("repo")),
        lab,
        work: work.clone(),
        app,
        start: Instant::now(),
    };
    let long_tls = ("8760h", "720h");

    // 1. Commit a cluster; the controller creates it and follows it to Ready.
    let mut ctl = h.controller();
    let seq = h.last_seq().await;
    let committed = now_ms();
    let sha = h.repo.commit(
        Some(Spec {
            count: 2,
            rounds: 3,
            tls: long_tls,
        }),
        "add cluster e2e",
    );
    let first = h.first_event(seq, "the first mutation", is_mutation).await;
    h.timing("commit → first API call", since_ms(committed, &first));
    let view = h.wait_ready(&ctl, &sha, 2).await;
    h.timing(
        "commit → Ready (2 SuperNodes)",
        Duration::from_millis(now_ms() - committed),
    );
    assert!(view.status.superlink_endpoint.is_some(), "{view:?}");
    let service_id = view.status.service_id.expect("service id");
    h.submit("2 SuperNodes", 3);

    // 2. Scale 2 → 3, killing the controller (SIGKILL) right after its scale request and
    //    starting a new one: the third SuperNode joins, no second service appears.
    let seq = h.last_seq().await;
    let committed = now_ms();
    let sha = h.repo.commit(
        Some(Spec {
            count: 3,
            rounds: 2,
            tls: long_tls,
        }),
        "scale to 3",
    );
    let scale = h.first_event(seq, "the scale request", is_scale).await;
    h.timing(
        "commit → first API call (scale)",
        since_ms(committed, &scale),
    );
    ctl.kill9();
    ctl = h.controller();
    let view = h.wait_ready(&ctl, &sha, 3).await;
    h.timing(
        "scale commit → third SuperNode joined (controller restarted)",
        Duration::from_millis(now_ms() - committed),
    );
    assert_eq!(view.status.service_id, Some(service_id), "same service");
    let scales: Vec<Value> = h.events(seq).await.into_iter().filter(is_scale).collect();
    assert!(
        scales.iter().all(|e| e["args"].to_string().contains('3')),
        "scale requests only ever ask for 3: {scales:?}"
    );
    h.submit("3 SuperNodes (minAvailableClients 3)", 2);

    // 3. Shorten the certificate validity: one rotation (carrying the new validity), the
    //    SuperLink restarts with a new certificate, SuperNodes reconnect, training works.
    let seq = h.last_seq().await;
    let committed = now_ms();
    let short_tls = ("30m", "10m");
    let sha = h.repo.commit(
        Some(Spec {
            count: 3,
            rounds: 2,
            tls: short_tls,
        }),
        "shorter certificates",
    );
    let rotate = h
        .first_event(seq, "the rotation request", is_rotate_request)
        .await;
    assert!(
        rotate["args"].to_string().contains("FL_ROTATE_VALIDITY"),
        "{rotate}"
    );
    h.timing("commit → rotation requested", since_ms(committed, &rotate));
    let (c, s) = (&ctl, sha.as_str());
    let view = h
        .wait(
            "a certificate valid ≤ 30m",
            Duration::from_secs(60),
            move || async move {
                c.cluster(CLUSTER).await.filter(|v| {
                    v.status
                        .certificate_not_after
                        .is_some_and(|t| t <= chrono::Utc::now() + chrono::Duration::minutes(31))
                        && ready(v, s, 3)
                })
            },
        )
        .await;
    h.timing(
        "rotation → new certificate, 3 SuperNodes reconnected",
        Duration::from_millis(now_ms() - committed),
    );
    assert_eq!(view.status.service_id, Some(service_id));
    h.submit("after certificate rotation", 2);
    let rotations = h
        .events(seq)
        .await
        .into_iter()
        .filter(is_rotate_request)
        .count();
    assert_eq!(
        rotations, 1,
        "exactly one rotation request, no rotation loop"
    );

    // 4. Crash one SuperNode (its processes die, the VM stays RUNNING): the heartbeat goes
    //    stale, and once the SuperLink no longer holds its Flower node online (Flower's
    //    own timeout: up to 2 × 30 s after its last Flower heartbeat) the controller
    //    terminates that VM and scales back; training works.
    let seq = h.last_seq().await;
    let before = h.vms().await;
    let newest = before
        .iter()
        .filter_map(|v| v["id"].as_u64())
        .max()
        .unwrap_or(0);
    let victim = before
        .into_iter()
        .find(|v| {
            v["name"].as_str().is_some_and(|n| n.contains("supernode"))
                && v["state_name"].as_str() == Some("RUNNING")
        })
        .expect("a running SuperNode VM");
    let victim_id = victim["id"].as_u64().expect("vm id");
    let crashed = now_ms();
    let r = reqwest::Client::new()
        .post(format!("{}/vm/{victim_id}/crash", h.lab.urls.control))
        .send()
        .await
        .expect("crash");
    assert!(r.status().is_success(), "crash: {}", r.status());
    let term = h
        .first_event_within(
            seq,
            "terminate of the crashed VM",
            Duration::from_secs(150),
            is_terminate,
        )
        .await;
    assert!(
        term["args"].to_string().contains(&victim_id.to_string()),
        "the crashed VM is the one terminated: {term}"
    );
    h.timing("crash → failed VM terminated", since_ms(crashed, &term));
    // Ready again only with a new SuperNode VM that registered with the SuperLink.
    let sha_now = h.repo.git(&["rev-parse", "HEAD"]);
    let (c, s, hr) = (&ctl, sha_now.as_str(), &h);
    let oned = flower_reconcile::one::OnedClient::new(
        &h.lab.one_config().expect("lab config"),
        flower_reconcile::one::ApiBudget::default_shared(),
        flower_reconcile::one::ApiStats::new(),
    )
    .expect("oned client");
    let oned = &oned;
    let replacement = h
        .wait(
            "the replacement SuperNode registered",
            Duration::from_secs(90),
            move || async move {
                let fresh = hr.vms().await.into_iter().find(|v| {
                    v["id"].as_u64().is_some_and(|id| id > newest)
                        && v["name"].as_str().is_some_and(|n| n.contains("supernode"))
                        && v["state_name"] == "RUNNING"
                })?;
                let id = fresh["id"].as_u64()?;
                let vm = oned.vm_info(id as i64).await.ok()?;
                (vm.attr("FL_NODE_READY") == Some("YES")).then_some(())?;
                let v = c.cluster(CLUSTER).await?;
                (ready(&v, s, 3) && v.status.nodes.running == 3).then_some(id)
            },
        )
        .await;
    println!("e2e: SuperNode VM {victim_id} replaced by VM {replacement}");
    h.timing(
        "crash → replacement Ready",
        Duration::from_millis(now_ms() - crashed),
    );
    let terminated: Vec<Value> = h
        .events(seq)
        .await
        .into_iter()
        .filter(is_terminate)
        .collect();
    assert_eq!(
        terminated.len(),
        1,
        "only the crashed VM is terminated: {terminated:?}"
    );
    h.submit("after SuperNode replacement", 2);

    // Over the whole life of the cluster: one service, one instantiate.
    let instantiates = h.events(0).await.into_iter().filter(is_instantiate).count();
    assert_eq!(instantiates, 1, "exactly one service was ever instantiated");

    // 5. Delete the spec (deletionPolicy: Delete): the service is undeployed, no VM process
    //    is left.
    let seq = h.last_seq().await;
    let committed = now_ms();
    h.repo.commit(None, "remove cluster e2e");
    let del = h
        .first_event(seq, "the service delete", is_service_delete)
        .await;
    assert!(
        del["call"]
            .as_str()
            .is_some_and(|c| c.ends_with(&format!("/{service_id}"))),
        "{del}"
    );
    let hr = &h;
    h.wait(
        "every VM DONE, no guest process",
        Duration::from_secs(60),
        move || async move {
            let vms = hr.vms().await;
            vms.iter()
                .all(|v| v["state_name"] == "DONE" && v["pid"].is_null())
                .then_some(())
        },
    )
    .await;
    common::assert_no_process_mentioning(&work.join("lab").display().to_string());
    h.timing(
        "delete commit → service undeployed, no process left",
        Duration::from_millis(now_ms() - committed),
    );
    ctl.stop();
    h.lab.shutdown().await;
    println!(
        "e2e: largest Flower log of a VM: {} KiB",
        largest_flower_log(&work.join("lab")) / 1024
    );
    println!(
        "e2e timing: whole scenario: {:.1}s",
        h.start.elapsed().as_secs_f64()
    );
}

/// The e2e's directory (lab: VM dirs with `guest.log` = the agent's log, and each VM's
/// Flower log under `opt/flower`; the controller's log; the Git repository): removed when
/// the test passes, kept and its path printed when it fails (or when `E2E_KEEP` is set).
struct KeepOnFailure(Option<tempfile::TempDir>);

impl KeepOnFailure {
    fn path(&self) -> PathBuf {
        self.0.as_ref().expect("dir").path().to_path_buf()
    }
}

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if let Some(dir) = self.0.take() {
            if failed || std::env::var_os("E2E_KEEP").is_some() {
                let path = dir.keep();
                eprintln!(
                    "e2e: {} directory kept: {} (controller.log; lab/vms/vm-*/guest.log are the \
                     agents' logs, Flower's are under lab/vms/vm-*/)",
                    if failed { "FAILED;" } else { "E2E_KEEP:" },
                    path.display()
                );
            }
        }
    }
}

/// Size of the largest `flower-*.log` under `dir`.
fn largest_flower_log(dir: &Path) -> u64 {
    let mut largest = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with("flower-") && name.ends_with(".log") {
                        largest = largest.max(e.metadata().map_or(0, |m| m.len()));
                    }
                }
                _ => {}
            }
        }
    }
    largest
}
