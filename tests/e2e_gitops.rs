//! End to end, the GitOps way: a FlowerCluster committed to a Git repository becomes a real
//! Flower federation on onesim, and keeps training through scaling, certificate rotation, a
//! crashed SuperNode and a controller restart, until the spec is deleted. One harness, one
//! method per step, run on each of onesim's runtimes:
//! - process: VMs run `flower-agent`, which runs real `flower-superlink` /
//!   `flower-supernode` from the pinned virtualenv;
//! - image: VMs boot the appliance images as systemd-nspawn machines (root; the images from
//!   `make -C packer image ROLE=…`), where the image's own lifecycle, agent and Flower run.
//!
//! The controller is the real `flower-reconcile run --git file://…` process; training runs go
//! through the real `flower-reconcile submit` over TLS with the CA the SuperLink published.
//! Each step prints its timing (`e2e timing: …`) so regressions show in the test output.
//! Both end by checking that nothing of the lab is left on the host.
//! Needs `FLOWER_VENV` (created by e2e/test-all.sh; `flwr` for `submit`); without it the
//! tests fail.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::lab::{LabSpec, RunController, Runtime};
use flower_reconcile::api::{ConditionStatus, ConditionType};
use flower_reconcile::demo::lab::Lab;
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
    /// The edge profile's `offlineGrace`, when the SuperNodes use it.
    edge: Option<&'static str>,
}

impl Spec {
    fn yaml(self) -> String {
        let (validity, renew) = self.tls;
        let edge = self
            .edge
            .map(|g| format!("    edge:\n      offlineGrace: {g}\n      maxBackoff: 5s\n"))
            .unwrap_or_default();
        LabSpec {
            name: CLUSTER,
            count: self.count,
            max: 4,
            tls: format!("    validity: {validity}\n    renewBefore: {renew}\n"),
            supernodes: format!(
                "    failurePolicy:\n      gracePeriod: 10s\n      heartbeatInterval: 2s\n{edge}"
            ),
            rounds: self.rounds,
            min_clients: self.count,
        }
        .yaml()
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

/// Everything the harness needs at hand; each step of the scenario is one method, so every
/// runtime runs the same steps.
struct Harness {
    runtime: Runtime,
    lab: Lab,
    repo: Repo,
    work: PathBuf,
    app: PathBuf,
    start: Instant,
    /// The running `flower-reconcile run` (none only between a kill and its restart).
    ctl: Option<RunController>,
    /// The cluster's one service, once created.
    service_id: Option<u64>,
    /// What of the host names the lab right after it started ([`Lab::host_marks`]): only
    /// what appears later must be gone at the end.
    traces_before: BTreeSet<String>,
    /// The OTLP receiver the controller (and, on the process runtime, the agents) export
    /// their spans to: its URL and what it got, for the secrets scan.
    otlp: (String, common::otlp::Received),
}

const LONG_TLS: (&str, &str) = ("8760h", "720h");

impl Harness {
    /// A lab on `runtime`, the embedded Flower app, a fresh repository and a controller
    /// following it.
    async fn start(runtime: Runtime, work: &Path) -> Harness {
        let lab = common::lab::start(work, runtime, Duration::from_millis(200)).await;
        let app = common::lab::write_app(work);
        let traces_before = common::lab::host_traces(&lab.host_marks());
        let otlp = common::otlp::receiver().await;
        let mut h = Harness {
            runtime,
            repo: Repo::init(work.join("repo")),
            lab,
            work: work.to_path_buf(),
            app,
            start: Instant::now(),
            ctl: None,
            service_id: None,
            traces_before,
            otlp,
        };
        h.ctl = Some(h.controller());
        h
    }

    fn timing(&self, what: &str, d: Duration) {
        println!(
            "e2e timing: {what}: {:.1}s (at {:.1}s)",
            d.as_secs_f64(),
            self.start.elapsed().as_secs_f64()
        );
    }

    /// How much longer than the process runtime a step may take: a machine boots a whole
    /// system (17–24 s to READY here) where a process starts in a second.
    fn patience(&self, d: Duration) -> Duration {
        match self.runtime {
            Runtime::Process => d,
            Runtime::Image => d * 3,
        }
    }

    fn ctl(&self) -> &RunController {
        self.ctl.as_ref().expect("a controller runs")
    }

    fn log_tail(&self) -> String {
        common::lab::log_tail(&self.work.join("controller.log"), 60)
    }

    /// `flower-reconcile run` following the repository's `clusters/` on `main`.
    fn controller(&self) -> RunController {
        let url = self.repo.url();
        let source = ["--git", &url, "--branch", "main", "--path", "clusters"];
        let otlp = self.otlp.0.clone();
        let agents_export = self.runtime == Runtime::Process;
        RunController::start_with(&self.lab, &source, &self.work, |cmd| {
            cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp);
            // A machine on the image runtime cannot reach the host's loopback.
            if agents_export {
                cmd.env("FLOWER_RECONCILE_VM_OTLP_ENDPOINT", &otlp);
            }
        })
    }

    /// Poll `check` every 250 ms until it returns `Some`; fail with the controller's log
    /// (and, on the image runtime, any machine's error).
    async fn wait<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let timeout = self.patience(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            let errors: Vec<String> = self
                .vms()
                .await
                .iter()
                .filter_map(|v| {
                    let e = v["machine"]["error"].as_str()?;
                    Some(format!("VM {}: {e}", v["id"]))
                })
                .collect();
            assert!(errors.is_empty(), "a machine failed: {errors:#?}");
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}\n--- controller log (tail) ---\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn wait_ready(&self, sha: &str, nodes: u32) -> ClusterView {
        let what = format!("{CLUSTER} Ready at {sha} with {nodes} SuperNodes");
        let ctl = self.ctl();
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
        let out = common::lab::submit(
            &self.lab,
            CLUSTER,
            &self.app,
            &self.repo.dir.join(SPEC_FILE),
        )
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
            &format!(
                "training run ({label}, {rounds} round{})",
                if rounds == 1 { "" } else { "s" }
            ),
            t.elapsed(),
        );
        losses
    }

    /// 1. Commit a cluster; the controller creates it and follows it to Ready; a 3-round run
    ///    over TLS trains with decreasing loss.
    async fn commit_and_train(&mut self) {
        let seq = self.last_seq().await;
        let committed = now_ms();
        let sha = self.repo.commit(
            Some(Spec {
                count: 2,
                rounds: 3,
                tls: LONG_TLS,
                edge: None,
            }),
            "add cluster e2e",
        );
        let first = self
            .first_event(seq, "the first mutation", is_mutation)
            .await;
        self.timing("commit → first API call", since_ms(committed, &first));
        let view = self.wait_ready(&sha, 2).await;
        self.timing(
            "commit → Ready (2 SuperNodes)",
            Duration::from_millis(now_ms() - committed),
        );
        assert!(view.status.superlink_endpoint.is_some(), "{view:?}");
        self.service_id = Some(view.status.service_id.expect("service id"));
        self.submit("2 SuperNodes", 3);
    }

    /// 2. Scale 2 → 3, killing the controller (SIGKILL) right after its scale request and
    ///    starting a new one: the third SuperNode joins, no second service appears.
    async fn scale_to_3_through_a_controller_crash(&mut self) {
        let seq = self.last_seq().await;
        let committed = now_ms();
        let sha = self.repo.commit(
            Some(Spec {
                count: 3,
                // Each run after the first shows the change trains; the first run shows the
                // loss decreasing over three rounds. One round is ~10 s on the images.
                rounds: 1,
                tls: LONG_TLS,
                edge: None,
            }),
            "scale to 3",
        );
        let scale = self.first_event(seq, "the scale request", is_scale).await;
        self.timing(
            "commit → first API call (scale)",
            since_ms(committed, &scale),
        );
        self.ctl.take().expect("a controller runs").kill9();
        self.ctl = Some(self.controller());
        let view = self.wait_ready(&sha, 3).await;
        self.timing(
            "scale commit → third SuperNode joined (controller restarted)",
            Duration::from_millis(now_ms() - committed),
        );
        assert_eq!(view.status.service_id, self.service_id, "same service");
        let scales: Vec<Value> = self
            .events(seq)
            .await
            .into_iter()
            .filter(is_scale)
            .collect();
        assert!(
            scales.iter().all(|e| e["args"].to_string().contains('3')),
            "scale requests only ever ask for 3: {scales:?}"
        );
        if self.runtime == Runtime::Image {
            self.print_cluster_memory().await;
        }
        self.submit("3 SuperNodes (minAvailableClients 3)", 1);
    }

    /// The memory of the running machines as onesim measures it (summed RSS of each
    /// machine's processes): when each became READY, and now (after a training run), per VM
    /// and for the cluster.
    async fn print_cluster_memory(&self) {
        let (mut at_ready, mut now, mut machines) = (0, 0, 0);
        for v in self.vms().await {
            let Some(pid) = v["pid"].as_u64() else {
                continue;
            };
            let rss = onesim::machine::machine_rss(pid as u32);
            let ready = v["machine"]["memory_bytes"].as_u64().unwrap_or(0);
            println!(
                "e2e: VM {} ({}): boot → READY {:.1}s, memory {} MiB at READY, {} MiB now",
                v["id"],
                v["name"].as_str().unwrap_or("?"),
                v["machine"]["ready_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                ready >> 20,
                rss >> 20,
            );
            (at_ready, now, machines) = (at_ready + ready, now + rss, machines + 1);
        }
        println!(
            "e2e: memory of the 1+3 cluster ({machines} machines): {} MiB at READY, {} MiB now",
            at_ready >> 20,
            now >> 20
        );
    }

    /// 3. Shorten the certificate validity: one rotation (carrying the new validity), the
    ///    SuperLink restarts with a new certificate, SuperNodes reconnect, training works.
    async fn rotate_certificates(&mut self) {
        let seq = self.last_seq().await;
        let committed = now_ms();
        let short_tls = ("30m", "10m");
        let sha = self.repo.commit(
            Some(Spec {
                count: 3,
                rounds: 1,
                tls: short_tls,
                edge: None,
            }),
            "shorter certificates",
        );
        let rotate = self
            .first_event(seq, "the rotation request", is_rotate_request)
            .await;
        assert!(
            rotate["args"].to_string().contains("FL_ROTATE_VALIDITY"),
            "{rotate}"
        );
        self.timing("commit → rotation requested", since_ms(committed, &rotate));
        let (c, s) = (self.ctl(), sha.as_str());
        let view = self
            .wait(
                "a certificate valid ≤ 30m",
                Duration::from_secs(60),
                move || async move {
                    c.cluster(CLUSTER).await.filter(|v| {
                        v.status.certificate_not_after.is_some_and(|t| {
                            t <= chrono::Utc::now() + chrono::Duration::minutes(31)
                        }) && ready(v, s, 3)
                    })
                },
            )
            .await;
        self.timing(
            "rotation → new certificate, 3 SuperNodes reconnected",
            Duration::from_millis(now_ms() - committed),
        );
        assert_eq!(view.status.service_id, self.service_id);
        self.submit("after certificate rotation", 1);
        let rotations = self
            .events(seq)
            .await
            .into_iter()
            .filter(is_rotate_request)
            .count();
        assert_eq!(
            rotations, 1,
            "exactly one rotation request, no rotation loop"
        );
    }

    /// 4. Crash one SuperNode (its processes die, the VM stays RUNNING): the heartbeat goes
    ///    stale, and once the SuperLink no longer holds its Flower node online (Flower's
    ///    own timeout: up to 2 × 30 s after its last Flower heartbeat) the controller
    ///    terminates that VM and scales back; training works.
    async fn replace_a_crashed_supernode(&mut self) {
        let seq = self.last_seq().await;
        let before = self.vms().await;
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
            .post(format!("{}/vm/{victim_id}/crash", self.lab.urls.control))
            .send()
            .await
            .expect("crash");
        assert!(r.status().is_success(), "crash: {}", r.status());
        let term = self
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
        self.timing("crash → failed VM terminated", since_ms(crashed, &term));
        // Ready again only with a new SuperNode VM that registered with the SuperLink.
        let sha_now = self.repo.git(&["rev-parse", "HEAD"]);
        let (c, s, hr) = (self.ctl(), sha_now.as_str(), &*self);
        let oned = flower_reconcile::one::OnedClient::new(
            &self.lab.one_config().expect("lab config"),
            flower_reconcile::one::ApiBudget::default_shared(),
            flower_reconcile::one::ApiStats::new(),
        )
        .expect("oned client");
        let oned = &oned;
        let replacement = self
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
        self.timing(
            "crash → replacement Ready",
            Duration::from_millis(now_ms() - crashed),
        );
        let terminated: Vec<Value> = self
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
        self.submit("after SuperNode replacement", 1);
    }

    /// Edge (#18 item 4): commit a 1+2 cluster whose SuperNodes use the edge profile
    /// (`offlineGrace` 10m, `gracePeriod` 10s); cut one SuperNode's machine off the network
    /// (onesim's partition fault: every frame to and from it dropped at the bridge) for
    /// twice the grace period. The controller sees it offline (one node ready; `plan`
    /// says it is kept) and terminates nothing; healed, the node rejoins the same VM and a
    /// run needing both SuperNodes trains.
    async fn partition_an_edge_supernode_past_the_grace_period(&mut self) {
        let committed = now_ms();
        let sha = self.repo.commit(
            Some(Spec {
                count: 2,
                // One round shows both SuperNodes train after the heal; the test command's
                // budget pays ~20 s for each further round on the images.
                rounds: 1,
                tls: LONG_TLS,
                edge: Some("10m"),
            }),
            "add edge cluster e2e",
        );
        let view = self.wait_ready(&sha, 2).await;
        self.timing(
            "commit → Ready (2 edge SuperNodes)",
            Duration::from_millis(now_ms() - committed),
        );
        self.service_id = Some(view.status.service_id.expect("service id"));
        let seq = self.last_seq().await;
        let vms = self.vms().await;
        let victim = vms
            .iter()
            .find(|v| {
                v["name"].as_str().is_some_and(|n| n.contains("supernode"))
                    && v["state_name"].as_str() == Some("RUNNING")
            })
            .and_then(|v| v["id"].as_u64())
            .expect("a running SuperNode VM");
        let control = self.lab.urls.control.clone();
        let fault = |op: &'static str| {
            let url = format!("{control}/vm/{victim}/{op}");
            async move {
                let r = reqwest::Client::new().post(url).send().await.expect(op);
                assert!(r.status().is_success(), "{op}: {}", r.status());
            }
        };
        let cut = Instant::now();
        fault("partition").await;
        assert_eq!(
            self.vms()
                .await
                .iter()
                .find(|v| v["id"] == victim)
                .expect("victim")["machine"]["partitioned"],
            true
        );
        // The controller sees the node quiet past the grace period: not ready.
        let ctl = self.ctl();
        self.wait(
            "the partitioned SuperNode counted not ready",
            Duration::from_secs(60),
            move || async move {
                ctl.cluster(CLUSTER)
                    .await
                    .filter(|v| v.status.nodes.ready == 1)
            },
        )
        .await;
        self.timing("partition → node not ready", cut.elapsed());
        let url = self.repo.url();
        let plan = common::lab::reconcile(&self.lab)
            .arg("plan")
            .args(["--git", &url, "--branch", "main", "--path", "clusters"])
            .output()
            .expect("plan runs");
        let text = String::from_utf8_lossy(&plan.stdout);
        assert!(
            text.contains(&format!("edge SuperNode VM {victim}:"))
                && text.contains("edge.offlineGrace (10m)"),
            "plan says the offline edge node is kept:\n{text}\n{}",
            String::from_utf8_lossy(&plan.stderr)
        );
        let grace = Duration::from_secs(10);
        tokio::time::sleep((grace * 2).saturating_sub(cut.elapsed())).await;
        let mutations: Vec<Value> = self
            .events(seq)
            .await
            .into_iter()
            .filter(|e| is_terminate(e) || is_scale(e) || is_instantiate(e))
            .collect();
        assert!(
            mutations.is_empty(),
            "nothing is terminated, scaled or created while the edge node is offline: {mutations:?}"
        );
        let offline = cut.elapsed();
        fault("heal").await;
        let healed = Instant::now();
        let v = self.wait_ready(&sha, 2).await;
        assert_eq!(v.status.nodes.running, 2, "{v:?}");
        println!(
            "e2e: edge SuperNode VM {victim} offline {:.1}s (grace period 10s), not replaced",
            offline.as_secs_f64()
        );
        self.timing("heal → edge node ready again", healed.elapsed());
        self.submit("after the edge node rejoined (both SuperNodes)", 1);
        let after: Vec<Value> = self
            .events(seq)
            .await
            .into_iter()
            .filter(|e| is_terminate(e) || is_scale(e) || is_instantiate(e))
            .collect();
        assert!(after.is_empty(), "no replacement after the heal: {after:?}");
        assert!(
            self.vms()
                .await
                .iter()
                .any(|v| v["id"] == victim && v["state_name"].as_str() == Some("RUNNING")),
            "the partitioned VM itself is back"
        );
    }

    /// 5. Everything the run emitted so far — the controller's log, the agents' and
    ///    Flower's logs (on the image runtime the machines' consoles and journals), the
    ///    OTLP spans (the controller's, and on the process runtime the agents'), `plan` and
    ///    `status` (text and JSON), `/metrics` — holds none of the secrets in play: the
    ///    `ONE_AUTH` password, the OneGate tokens, the TLS private keys on the VMs (issue
    ///    #17 item 3).
    async fn scan_everything_for_secrets(&self) {
        let t = Instant::now();
        let mut scan = common::secrets::SecretScan::new();
        let auth = std::fs::read_to_string(&self.lab.auth_file).expect("ONE_AUTH file");
        let (user, password) = auth.trim().split_once(':').expect("user:password");
        scan.secret("the ONE_AUTH password", password, Some(user));
        let tokens: Vec<String> = self
            .lab
            .sim()
            .sim
            .with(|st| st.vms.values().map(|v| v.token.clone()).collect());
        for token in &tokens {
            scan.secret("a OneGate token", token, None);
        }
        let lab_dir = self.work.join("lab");
        let mut keys = 0;
        for f in common::files_under(&lab_dir) {
            if f.extension().is_none_or(|e| e != "key") {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            if text.contains("PRIVATE KEY") {
                scan.pem_key(&format!("the TLS key {}", f.display()), &text);
                keys += 1;
            }
        }
        assert!(keys > 0, "the VMs hold TLS private keys");

        let url = self.repo.url();
        let source = ["--git", &url, "--branch", "main", "--path", "clusters"];
        let t_collect = Instant::now();
        for output in [&[][..], &["--output", "json"][..]] {
            let plan = common::lab::reconcile(&self.lab)
                .args(output)
                .arg("plan")
                .args(source)
                .output()
                .expect("plan runs");
            assert!(plan.status.success(), "plan: {plan:?}");
            scan.scan_bytes(
                &format!("plan {output:?}"),
                &[plan.stdout, plan.stderr].concat(),
            );
            let status = common::lab::reconcile(&self.lab)
                .args(output)
                .args(["status", "--server", &self.ctl().base])
                .output()
                .expect("status runs");
            assert!(status.status.success(), "status: {status:?}");
            scan.scan_bytes(
                &format!("status {output:?}"),
                &[status.stdout, status.stderr].concat(),
            );
        }
        scan.scan("metrics", &self.ctl().metrics().await);
        let collected = t_collect.elapsed();
        scan.scan(
            "controller log",
            &std::fs::read_to_string(self.work.join("controller.log")).expect("log"),
        );
        scan.scan_files(&lab_dir, |p| {
            p.extension().is_some_and(|e| e == "log" || e == "journal")
        });
        let exports = self.otlp.1.lock().expect("spans").clone();
        for (i, (raw, _)) in exports.iter().enumerate() {
            scan.scan_bytes(&format!("OTLP export {i}"), raw);
        }
        println!("e2e: {}; {} OTLP exports", scan.summary(), exports.len());
        let agent_logs = lab_dir.display().to_string();
        println!(
            "e2e: secrets scan took {:.1}s ({:.1}s of it collecting plan, status and metrics)",
            t.elapsed().as_secs_f64(),
            collected.as_secs_f64()
        );
        scan.assert_clean(&[
            "plan",
            "status",
            "metrics",
            "controller log",
            "OTLP export",
            &agent_logs,
        ]);
        self.timing("secrets scan", t.elapsed());
    }

    /// 6. Delete the spec (deletionPolicy: Delete): the service is undeployed, every VM is
    ///    DONE with nothing running; over the whole life of the cluster one service was
    ///    instantiated. Then the controller stops, the lab shuts down, and nothing of the
    ///    lab is left on the host: no process, machine, mount, namespace, link or loop device.
    async fn delete_and_leave_nothing(mut self) {
        let instantiates = self
            .events(0)
            .await
            .into_iter()
            .filter(is_instantiate)
            .count();
        assert_eq!(instantiates, 1, "exactly one service was ever instantiated");
        let service_id = self.service_id.expect("a service");
        let seq = self.last_seq().await;
        let committed = now_ms();
        self.repo.commit(None, "remove cluster e2e");
        let del = self
            .first_event(seq, "the service delete", is_service_delete)
            .await;
        assert!(
            del["call"]
                .as_str()
                .is_some_and(|c| c.ends_with(&format!("/{service_id}"))),
            "{del}"
        );
        let hr = &self;
        self.wait(
            "every VM DONE, nothing running",
            Duration::from_secs(60),
            move || async move {
                let vms = hr.vms().await;
                vms.iter()
                    .all(|v| v["state_name"] == "DONE" && v["pid"].is_null())
                    .then_some(())
            },
        )
        .await;
        common::assert_no_process_mentioning(&self.work.join("lab").display().to_string());
        self.timing(
            "delete commit → service undeployed, nothing running",
            Duration::from_millis(now_ms() - committed),
        );
        self.ctl.take().expect("a controller runs").stop();
        let t = Instant::now();
        let Harness {
            lab,
            traces_before,
            runtime,
            work,
            start,
            ..
        } = self;
        let marks = lab.host_marks();
        lab.shutdown().await;
        // A loop device may outlive its detach for a while (the kernel frees it with the
        // last mount using it): allow a minute, print how long it took.
        let gone =
            common::assert_gone_within("left behind on the host", Duration::from_secs(60), || {
                common::lab::host_traces(&marks)
                    .difference(&traces_before)
                    .cloned()
                    .collect()
            });
        println!(
            "e2e timing: lab shut down: {:.1}s, then nothing left on the host after {:.1}s",
            (t.elapsed() - gone).as_secs_f64(),
            gone.as_secs_f64()
        );
        if runtime == Runtime::Process {
            println!(
                "e2e: largest Flower log of a VM: {} KiB",
                largest_flower_log(&work.join("lab")) / 1024
            );
        }
        println!(
            "e2e timing: whole scenario: {:.1}s",
            start.elapsed().as_secs_f64()
        );
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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

/// The e2e's working directory, kept when the test fails.
fn workdir(runtime: Runtime) -> KeepOnFailure {
    KeepOnFailure {
        dir: Some(
            tempfile::Builder::new()
                .prefix("fr-e2e-")
                .tempdir()
                .expect("tmp"),
        ),
        runtime,
    }
}

/// On onesim's process runtime: VMs are `flower-agent` processes running Flower from the
/// pinned virtualenv. The same steps as the image e2e below, in ~5 times less time: the
/// developer's loop. The test command (nextest's `ci` profile) runs only the image e2e,
/// which covers every step of this one on the real appliance images.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_gitops_trains_through_scale_rotation_failure_restart_and_delete() {
    flower_reconcile::one::http::ensure_crypto_provider();
    let tmp = workdir(Runtime::Process);
    let mut h = Harness::start(Runtime::Process, &tmp.path()).await;
    h.commit_and_train().await;
    h.scale_to_3_through_a_controller_crash().await;
    h.rotate_certificates().await;
    h.replace_a_crashed_supernode().await;
    h.scan_everything_for_secrets().await;
    h.delete_and_leave_nothing().await;
}

/// On onesim's image runtime: the images are allocated from the built QCOW2 files
/// (`ONESIM_TEST_IMAGES`, default `packer/build`), each VM boots its image as a
/// systemd-nspawn machine on the lab's bridge, and the image's own units, lifecycle
/// (`flower-agent context`, `appliance.sh`), `flower-agent` and Flower virtualenv do the rest. Prints
/// the memory of the 1+3 cluster. Needs root, systemd-nspawn and the images (fails naming
/// what is missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_gitops_on_the_appliance_images_trains_scales_rotates_replaces_a_crashed_node_and_deletes(
) {
    flower_reconcile::one::http::ensure_crypto_provider();
    let tmp = workdir(Runtime::Image);
    let mut h = Harness::start(Runtime::Image, &tmp.path()).await;
    h.commit_and_train().await;
    h.scale_to_3_through_a_controller_crash().await;
    h.rotate_certificates().await;
    h.replace_a_crashed_supernode().await;
    h.scan_everything_for_secrets().await;
    h.delete_and_leave_nothing().await;
}

/// #18 item 4 on the appliance images: an edge SuperNode cut off the network for twice
/// the grace period is kept, rejoins when healed, and trains (onesim's partition
/// fault needs the image runtime: process guests share the host's loopback).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn e2e_edge_supernode_partitioned_on_the_images_rejoins_without_replacement() {
    flower_reconcile::one::http::ensure_crypto_provider();
    let tmp = workdir(Runtime::Image);
    let mut h = Harness::start(Runtime::Image, &tmp.path()).await;
    h.partition_an_edge_supernode_past_the_grace_period().await;
    h.delete_and_leave_nothing().await;
}

/// The e2e's directory (the controller's log; the Git repository; the lab: on the process
/// runtime VM dirs with `guest.log` = the agent's log and each VM's Flower log under
/// `opt/flower`, on the image runtime each machine's `console.log` and its disk's files under
/// `disk/upper`): removed when the test passes, kept and its path printed when it fails (or
/// when `E2E_KEEP` is set).
struct KeepOnFailure {
    dir: Option<tempfile::TempDir>,
    runtime: Runtime,
}

impl KeepOnFailure {
    fn path(&self) -> PathBuf {
        self.dir.as_ref().expect("dir").path().to_path_buf()
    }
}

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if let Some(dir) = self.dir.take() {
            if failed || std::env::var_os("E2E_KEEP").is_some() {
                let path = dir.keep();
                let logs = match self.runtime {
                    Runtime::Process => {
                        "lab/vms/vm-*/guest.log are the agents' logs, Flower's are under \
                         lab/vms/vm-*/"
                    }
                    Runtime::Image => {
                        "lab/vms/vm-*/console.log are the machines' consoles, their files \
                         (var/log/one-appliance, the journal) under lab/vms/vm-*/disk/upper"
                    }
                };
                eprintln!(
                    "e2e: {} directory kept: {} (controller.log; {logs})",
                    if failed { "FAILED;" } else { "E2E_KEEP:" },
                    path.display()
                );
            }
        }
    }
}

/// Size of the largest `flower-*.log` under `dir`.
fn largest_flower_log(dir: &Path) -> u64 {
    common::files_under(dir)
        .iter()
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("flower-") && name.ends_with(".log")
        })
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .max()
        .unwrap_or(0)
}
