//! `flower-reconcile run --git … --verify-commits` as a process against onesim: a signed
//! revision is applied, an unsigned one is refused and held (status, `/metrics` and the log
//! say which revision and why; OpenNebula sees no change), a signed one after it is
//! applied; a force-push back to an older revision is held and reported, and applied by a
//! controller restarted with `--allow-rollback`. Then everything the run emitted — its log, its OTLP spans, `plan`, `status`
//! (text and JSON), `/metrics` — is scanned for the secrets it was given: the `ONE_AUTH`
//! password, the spec's provided TLS private key and the VMs' OneGate tokens.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flower_reconcile::one::{ApiBudget, ApiStats, OnedClient};
use serde_json::{json, Value};

use common::onesim_env::{fixtures, reconcile_command, start_onesim, supernode_cardinality};
use common::otlp::receiver;
use common::secrets::SecretScan;

const PASSWORD: &str = "verified-commits-pw-7f3a";
const CONTROLLER: &str = "ctl-verified";

/// A spec with provided TLS material (the example certificates, copied into the
/// repository beside it).
fn spec(count: u32) -> String {
    format!(
        "apiVersion: {}\nkind: {}\nmetadata:\n  name: alpha\nspec:\n  opennebula:\n    \
         templates:\n      superlink: flower-superlink\n      supernode: flower-supernode\n    \
         network: private\n  tls:\n    enabled: true\n    mode: provided\n    provided:\n      \
         caCert:\n        file: certs/ca.crt\n      cert:\n        file: certs/superlink.crt\n      \
         key:\n        file: certs/superlink.key\n  supernodes:\n    count: {count}\n",
        flower_reconcile::api::API_VERSION,
        flower_reconcile::api::KIND
    )
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/examples/certs")
}

struct Repo {
    dir: PathBuf,
    key: PathBuf,
}

impl Repo {
    fn commit(&self, count: u32, signed: bool) -> String {
        std::fs::write(self.dir.join("clusters/alpha.yaml"), spec(count)).expect("spec");
        common::git(&self.dir, &["add", "-A"]);
        let signing = format!("user.signingkey={}", self.key.display());
        let mut args = vec!["-c", "gpg.format=ssh", "-c", &signing, "commit", "-q"];
        if signed {
            args.push("-S");
        }
        let message = format!("alpha × {count}");
        args.extend(["-m", &message]);
        common::git(&self.dir, &args);
        common::git(&self.dir, &["rev-parse", "HEAD"])
    }
}

async fn get(url: &str) -> Option<String> {
    let r = reqwest::get(url).await.ok()?;
    r.status().is_success().then_some(())?;
    r.text().await.ok()
}

/// Poll `check` every 200 ms for up to 30 s; fail with the controller's log.
async fn wait_for<T, F, Fut>(what: &str, log: &Path, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n--- controller log ---\n{}",
            common::lab::log_tail(log, 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn cardinality(oneflow: &str) -> Option<u64> {
    let client = reqwest::Client::new();
    let list: Value = client
        .get(format!("{oneflow}/service"))
        .basic_auth("oneadmin", Some(PASSWORD))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let docs = list["DOCUMENT_POOL"]["DOCUMENT"].as_array()?.clone();
    let doc = docs.iter().find(|d| d["NAME"] == "alpha")?;
    Some(supernode_cardinality(&doc["TEMPLATE"]["BODY"]))
}

/// SIGTERM, and a clean exit (the spans are flushed then).
async fn stop(mut ctl: tokio::process::Child) {
    let pid = nix::unistd::Pid::from_raw(ctl.id().expect("pid") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let exit = ctl.wait().await.expect("run exits");
    assert!(exit.success(), "run exits cleanly on SIGTERM: {exit}");
}

/// `/api/v1/clusters` once its `source` satisfies `pred`.
async fn source_where(what: &str, base: &str, log: &Path, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, log, || async {
        let body = get(&format!("{base}/api/v1/clusters")).await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        pred(&v["source"]).then_some(v)
    })
    .await
}

/// Wait until the cluster's service has `n` SuperNodes.
async fn wait_cardinality(what: &str, oneflow: &str, log: &Path, n: u64) {
    wait_for(what, log, || async {
        (cardinality(oneflow).await == Some(n)).then_some(())
    })
    .await;
}

/// The source reports `FastForward=False reason=Rollback`, its message containing `says`.
fn assert_rollback(list: &Value, says: &str) {
    let ff = list["source"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "FastForward"))
        .unwrap_or_else(|| panic!("no FastForward condition: {list}"));
    assert_eq!(
        (&ff["status"], &ff["reason"]),
        (&json!("False"), &json!("Rollback")),
        "{list}"
    );
    assert!(ff["message"].as_str().unwrap_or("").contains(says), "{ff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_verify_commits_holds_an_unsigned_revision_and_a_rollback_and_emits_no_secret() {
    let (sim, one) = start_onesim(PASSWORD, |_| {}).await;
    let oned = OnedClient::new(
        &one,
        ApiBudget::new(one.requests_per_second),
        ApiStats::new(),
    )
    .expect("oned");
    fixtures(&oned).await;
    let (otlp, spans) = receiver().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).expect("home");

    // The repository, its signing key and the allowed signers.
    let dir = tmp.path().join("repo");
    std::fs::create_dir_all(dir.join("clusters/certs")).expect("repo");
    for f in ["ca.crt", "superlink.crt", "superlink.key"] {
        std::fs::copy(examples().join(f), dir.join("clusters/certs").join(f)).expect("cert");
    }
    common::git(&dir, &["init", "-q", "-b", "main"]);
    let key = tmp.path().join("signing");
    common::run_ok(
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "ci", "-f"])
            .arg(&key),
    );
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    let signers = tmp.path().join("allowed_signers");
    std::fs::write(&signers, format!("ci@example.org {}", public.trim())).expect("signers");
    let repo = Repo { dir, key };
    let sha1 = repo.commit(1, true);

    let url = format!("file://{}", repo.dir.display());
    let signers_arg = signers.display().to_string();
    let source = [
        "--git",
        &url,
        "--branch",
        "main",
        "--path",
        "clusters",
        "--verify-commits",
        "--allowed-signers",
        &signers_arg,
    ];
    let port = common::lab::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let log = tmp.path().join("controller.log");
    let start = |more: &[&str]| {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        reconcile_command(&sim, PASSWORD, &home)
            .args(["--log-level", "debug", "run"])
            .args(source)
            .args(more)
            .args(["--interval", "1s", "--poll-interval", "1s"])
            .args(["--max-backoff", "2s", "--controller-id", CONTROLLER])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            .env("FLWR_TELEMETRY_ENABLED", "0")
            .stdout(out.try_clone().expect("fd"))
            .stderr(out)
            .spawn()
            .expect("run starts")
    };
    let mut ctl = start(&[]);

    let oneflow = sim.urls().oneflow.clone();
    let t = Instant::now();
    wait_cardinality("the signed revision applied", &oneflow, &log, 1).await;
    println!(
        "verified: signed revision applied in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // Unsigned: refused and reported; the signed revision stays applied.
    let sha2 = repo.commit(3, false);
    let t = Instant::now();
    let list = source_where("the refusal in the status", &base, &log, |s| {
        s["refusedRevision"] == sha2.as_str()
    })
    .await;
    println!(
        "verified: unsigned revision refused in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let src = &list["source"];
    assert_eq!(
        src["revision"],
        sha1.as_str(),
        "the last good revision stays: {src}"
    );
    let cond = &src["conditions"][0];
    assert_eq!(cond["type"], "SourceVerified", "{src}");
    assert_eq!(cond["status"], "False", "{src}");
    assert_eq!(cond["reason"], "Unsigned", "{src}");
    assert_eq!(cond["revision"], sha2.as_str(), "{src}");
    let metrics = get(&format!("{base}/metrics")).await.expect("metrics");
    let refused_line = format!(
        "flower_reconcile_source_refused_revision_info{{revision=\"{sha2}\",check=\"SourceVerified\",reason=\"Unsigned\"}} 1"
    );
    assert!(metrics.contains(&refused_line), "{metrics}");
    let status = reconcile_command(&sim, PASSWORD, &home)
        .args(["status", "--server", &base])
        .output()
        .await
        .expect("status");
    let status_text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.status.success(), "{status_text}");
    assert!(
        status_text.contains(&format!("REFUSED revision {}", &sha2[..12]))
            && status_text.contains("reason=Unsigned"),
        "{status_text}"
    );
    // Several fetches later, OpenNebula still has the signed spec's one SuperNode.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cardinality(&oneflow).await,
        Some(1),
        "nothing of the unsigned spec applied"
    );
    let log_text = std::fs::read_to_string(&log).expect("log");
    assert!(
        log_text.contains("refused the fetched revision"),
        "{log_text}"
    );

    // `plan` refuses the unsigned HEAD too, naming it.
    let plan = reconcile_command(&sim, PASSWORD, &home)
        .args(["plan", "--controller-id", CONTROLLER])
        .args(source)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .output()
        .await
        .expect("plan");
    let plan_refused = String::from_utf8_lossy(&plan.stderr).into_owned();
    assert!(!plan.status.success(), "{plan_refused}");
    assert!(plan_refused.contains("reason=Unsigned"), "{plan_refused}");

    // Signed again: applied, the refusal gone.
    let sha3 = repo.commit(2, true);
    wait_cardinality("the next signed revision applied", &oneflow, &log, 2).await;
    let list = source_where("the refusal cleared", &base, &log, |s| {
        s["revision"] == sha3.as_str()
    })
    .await;
    assert!(list["source"].get("refusedRevision").is_none(), "{list}");
    assert_eq!(list["source"]["conditions"][0]["reason"], "Signed");

    // A force-push back to the first revision (signed, but older): held and reported.
    common::git(&repo.dir, &["reset", "-q", "--hard", &sha1]);
    let list = source_where("the rollback held", &base, &log, |s| {
        s["refusedRevision"] == sha1.as_str()
    })
    .await;
    assert_rollback(&list, "--allow-rollback");
    assert_eq!(list["source"]["revision"], sha3.as_str(), "{list}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        cardinality(&oneflow).await,
        Some(2),
        "the rollback is not applied"
    );

    // Restarted with --allow-rollback (the accepted revision is on disk): applied, and
    // still reported as a rollback.
    stop(ctl).await;
    ctl = start(&["--allow-rollback"]);
    wait_cardinality("the rollback applied", &oneflow, &log, 1).await;
    let list = source_where("the rollback reported", &base, &log, |s| {
        s["revision"] == sha1.as_str()
    })
    .await;
    assert_rollback(&list, "applied");
    assert!(list["source"].get("refusedRevision").is_none(), "{list}");

    // Collect what else a user would see, then stop the run (its spans flush on exit).
    let mut emitted: Vec<(String, String)> = vec![
        ("plan (refused)".into(), plan_refused),
        ("status (text)".into(), status_text),
        (
            "metrics".into(),
            get(&format!("{base}/metrics")).await.expect("metrics"),
        ),
    ];
    let status_json = reconcile_command(&sim, PASSWORD, &home)
        .args(["--output", "json", "status", "--server", &base])
        .output()
        .await
        .expect("status json");
    emitted.push((
        "status (JSON)".into(),
        String::from_utf8_lossy(&status_json.stdout).into(),
    ));
    for output in [&[][..], &["--output", "json"][..]] {
        let plan = reconcile_command(&sim, PASSWORD, &home)
            .args(output)
            .args(["plan", "--controller-id", CONTROLLER])
            .args(source)
            .output()
            .await
            .expect("plan");
        assert!(
            plan.status.success(),
            "{}",
            String::from_utf8_lossy(&plan.stderr)
        );
        emitted.push((
            format!("plan {output:?}"),
            String::from_utf8_lossy(&plan.stdout).into_owned()
                + &String::from_utf8_lossy(&plan.stderr),
        ));
    }
    stop(ctl).await;

    let mut scan = SecretScan::new();
    scan.secret("the ONE_AUTH password", PASSWORD, Some("oneadmin"));
    let key = std::fs::read_to_string(examples().join("superlink.key")).expect("key");
    scan.pem_key("the provided TLS key", &key);
    let tokens: Vec<String> = sim
        .sim
        .with(|st| st.vms.values().map(|v| v.token.clone()).collect());
    assert!(!tokens.is_empty(), "the cluster's VMs have OneGate tokens");
    for t in &tokens {
        scan.secret("a OneGate token", t, None);
    }
    scan.scan(
        "controller log",
        &std::fs::read_to_string(&log).expect("log"),
    );
    for (what, text) in &emitted {
        scan.scan(what, text);
    }
    let exports = spans.lock().expect("spans").clone();
    for (i, (raw, _)) in exports.iter().enumerate() {
        scan.scan_bytes(&format!("OTLP export {i}"), raw);
    }
    println!("{}; {} OTLP exports", scan.summary(), exports.len());
    scan.assert_clean(&[
        "controller log",
        "plan",
        "status (text)",
        "status (JSON)",
        "metrics",
        "OTLP export",
    ]);
}

/// The scan finds a secret in each form it claims to: as is, base64, a Basic header, a
/// line of a PEM key, and a key carried base64-encoded inside other text.
#[test]
fn the_secrets_scan_finds_each_form_of_a_secret() {
    use base64::Engine as _;
    let key = std::fs::read_to_string(examples().join("superlink.key")).expect("key");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let leaks = [
        format!("auth failed for oneadmin:{PASSWORD}"),
        format!(
            "Authorization: Basic {}",
            b64(&format!("oneadmin:{PASSWORD}"))
        ),
        format!("token={}", b64(PASSWORD)),
        format!("key line {}", key.lines().nth(2).expect("a body line")),
        format!("CONTEXT=[ FL_TLS_KEY=\"{}\" ]", b64(&key)),
    ];
    for leak in &leaks {
        let mut scan = SecretScan::new();
        scan.secret("the password", PASSWORD, Some("oneadmin"));
        scan.pem_key("the key", &key);
        scan.scan("output", leak);
        assert!(!scan.leaks().is_empty(), "not caught: {leak}");
    }
    let mut scan = SecretScan::new();
    scan.secret("the password", PASSWORD, Some("oneadmin"));
    scan.pem_key("the key", &key);
    scan.scan("output", "oneadmin <redacted> FL_TLS_KEY=<redacted>");
    scan.assert_clean(&["output"]);
}
