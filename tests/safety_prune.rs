//! Never prune by accident (issue #12, items 5 and 6), against onesim: the `plan` and
//! `apply` binaries and the `run` service (`service::serve`), asserting the OneFlow
//! deletions from onesim's event log.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flower_reconcile::one::ClientsBackend;
use flower_reconcile::reconciler::{Context, ReconcileOptions};
use flower_reconcile::service::config::RunSettings;
use flower_reconcile::source::{SourceArgs, ALLOW_DELETE_FILE};
use serde_json::Value;

use common::onesim_env::{fixtures, spec_yaml, start_onesim, Served};

const PASSWORD: &str = "prune-pw";
const CONTROLLER_ID: &str = "ctl-prune";

struct Env {
    sim: onesim::Handle,
    ctx: Context,
    /// ONE_AUTH file and HOME of the binaries.
    home: tempfile::TempDir,
}

async fn env() -> Env {
    use std::os::unix::fs::PermissionsExt;
    let (sim, one) = start_onesim(PASSWORD, |_| {}).await;
    let backend = Arc::new(ClientsBackend::new(&one).expect("clients"));
    fixtures(&backend.oned).await;
    let ctx = Context::connect(backend, CONTROLLER_ID, ReconcileOptions::default())
        .await
        .expect("context");
    let home = tempfile::tempdir().expect("home");
    let auth = home.path().join("one_auth");
    std::fs::write(&auth, format!("oneadmin:{PASSWORD}\n")).expect("auth file");
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    Env { sim, ctx, home }
}

/// A spec with `deletionPolicy: Delete`.
fn deletable(name: &str) -> String {
    spec_yaml(name, 1) + "  deletionPolicy: Delete\n"
}

/// `alpha.yaml` broken before `metadata.name`: no name is readable from it.
const BROKEN_BEFORE_NAME: &str =
    "apiVersion: flower.opennebula.io/v1alpha1\nkind: FlowerCluster\nmetadata: [\n  name: alpha\n";

/// Run the `flower-reconcile` binary with `args` against onesim; returns (exit code,
/// stdout, stderr).
async fn cli(env: &Env, args: &[&str], specs: &Path) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_flower-reconcile"))
        .args(args)
        .arg("--specs")
        .arg(specs)
        .args(["--controller-id", CONTROLLER_ID])
        .env("ONE_XMLRPC", &env.sim.urls().xmlrpc)
        .env("ONEFLOW_URL", &env.sim.urls().oneflow)
        .env("ONE_AUTH", env.home.path().join("one_auth"))
        .env("HOME", env.home.path())
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("binary runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `apply --auto-approve` that must succeed.
async fn apply(env: &Env, specs: &Path, extra: &[&str]) -> String {
    let mut args = vec!["apply", "--auto-approve"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = cli(env, &args, specs).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    stdout
}

/// onesim's OneFlow service deletions since `since`.
async fn deletes(env: &Env, since: u64) -> usize {
    let v = common::onesim_get(&env.sim.urls().control, &format!("/events?since={since}")).await;
    v["events"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| {
                    e["api"] == "oneflow"
                        && e["call"]
                            .as_str()
                            .is_some_and(|c| c.starts_with("DELETE /service/"))
                })
                .count()
        })
        .unwrap_or(0)
}

async fn last_seq(env: &Env) -> u64 {
    let v = common::onesim_get(&env.sim.urls().control, "/events?since=0").await;
    v["last_seq"].as_u64().unwrap_or(0)
}

/// Specs dir with `names` as Delete-policy clusters, applied; returns the dir.
async fn deployed(env: &Env, names: &[&str]) -> tempfile::TempDir {
    let specs = tempfile::tempdir().expect("specs");
    for n in names {
        std::fs::write(specs.path().join(format!("{n}.yaml")), deletable(n)).expect("spec");
    }
    let out = apply(env, specs.path(), &[]).await;
    assert!(
        out.contains(&format!("Plan: {} to create", names.len())),
        "{out}"
    );
    specs
}

/// The `run` service over `specs`, freshly started (nothing remembered).
async fn serve_specs(env: &Env, specs: &Path) -> Served {
    let settings = RunSettings {
        source: SourceArgs {
            specs: Some(specs.to_path_buf()),
            interval: Some("200ms".parse().expect("duration")),
            ..SourceArgs::default()
        },
        controller_id: Some(CONTROLLER_ID.into()),
        ..RunSettings::default()
    };
    Served::start(&env.ctx, settings).await
}

/// The `Stalled` condition of `name` (Null until the cluster is shown).
async fn stalled(svc: &Served, name: &str) -> Value {
    svc.cluster(name).await["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|x| x["type"] == "Stalled"))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Wait until `name` is reported `Stalled/DeletionBlocked` with a message containing
/// `needle`; returns the message.
async fn deletion_blocked(svc: &Served, name: &str, needle: &str) -> String {
    for _ in 0..300 {
        let s = stalled(svc, name).await;
        let message = s["message"].as_str().unwrap_or_default();
        if s["reason"] == "DeletionBlocked" && s["status"] == "True" && message.contains(needle) {
            return message.to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{name} never reported DeletionBlocked ({needle}): {}",
        stalled(svc, name).await
    );
}

/// Wait until the service shows `name` (it has observed it).
async fn shown(svc: &Served, name: &str) {
    for _ in 0..300 {
        if !svc.cluster(name).await.is_null() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} never shown");
}

/// Wait until onesim saw `n` service deletions since `since`.
async fn wait_deletes(env: &Env, since: u64, n: usize) {
    for _ in 0..300 {
        if deletes(env, since).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "expected {n} DELETE /service, saw {}",
        deletes(env, since).await
    );
}

#[tokio::test]
async fn a_typo_before_metadata_name_never_prunes_in_plan_apply_or_run() {
    let env = env().await;
    let specs = deployed(&env, &["alpha", "beta"]).await;
    let seq = last_seq(&env).await;
    std::fs::write(specs.path().join("alpha.yaml"), BROKEN_BEFORE_NAME).expect("typo");

    // plan: no destroy, and it says why.
    let (code, stdout, stderr) = cli(&env, &["plan"], specs.path()).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("0 to destroy"), "{stdout}");
    assert!(stderr.contains("alpha.yaml"), "{stderr}");
    assert!(stdout.contains("a spec file fails to load"), "{stdout}");

    // apply: nothing to do, no DELETE.
    let out = apply(&env, specs.path(), &[]).await;
    assert!(out.contains("0 to destroy"), "{out}");
    assert_eq!(deletes(&env, seq).await, 0);

    // run, freshly started (no memory of alpha.yaml): alpha is reported blocked after a
    // reconcile decided about it, and still no DELETE.
    let svc = serve_specs(&env, specs.path()).await;
    deletion_blocked(&svc, "alpha", "fails to load").await;
    assert_eq!(deletes(&env, seq).await, 0);
    let (_, metrics) = svc.get("/metrics").await;
    assert!(
        metrics.contains("flower_reconcile_deletions_blocked_clusters 1"),
        "{metrics}"
    );

    // Fixed by deleting the broken file on purpose: now alpha's removal goes through.
    std::fs::remove_file(specs.path().join("alpha.yaml")).expect("rm");
    wait_deletes(&env, seq, 1).await;
    svc.stop().await;
}

#[tokio::test]
async fn an_empty_source_deletes_nothing_unless_apply_is_told_so_explicitly() {
    let env = env().await;
    let specs = deployed(&env, &["alpha", "beta", "gamma"]).await;
    let seq = last_seq(&env).await;
    // Empty but readable (an unmounted share, a wrong --specs).
    for n in ["alpha", "beta", "gamma"] {
        std::fs::remove_file(specs.path().join(format!("{n}.yaml"))).expect("rm");
    }
    let (code, stdout, stderr) = cli(&env, &["plan"], specs.path()).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("0 to destroy"), "{stdout}");
    assert!(
        stdout.contains("mass delete blocked: the specs of 3 of 3 managed clusters (all)"),
        "{stdout}"
    );
    let out = apply(&env, specs.path(), &[]).await;
    assert!(out.contains("0 to destroy"), "{out}");
    assert_eq!(deletes(&env, seq).await, 0);

    // Removing 1 of 3 is not a mass delete: applied.
    std::fs::write(specs.path().join("alpha.yaml"), deletable("alpha")).expect("spec");
    std::fs::write(specs.path().join("beta.yaml"), deletable("beta")).expect("spec");
    let out = apply(&env, specs.path(), &[]).await;
    assert!(out.contains("1 to destroy"), "{out}");
    wait_deletes(&env, seq, 1).await;

    // Both remaining ones (2 of 2): only with the flag, for this one apply.
    std::fs::remove_file(specs.path().join("alpha.yaml")).expect("rm");
    std::fs::remove_file(specs.path().join("beta.yaml")).expect("rm");
    let seq = last_seq(&env).await;
    let out = apply(&env, specs.path(), &[]).await;
    assert!(out.contains("0 to destroy"), "{out}");
    let out = apply(&env, specs.path(), &["--allow-mass-delete"]).await;
    assert!(out.contains("2 to destroy"), "{out}");
    wait_deletes(&env, seq, 2).await;
}

#[tokio::test]
async fn run_blocks_a_mass_delete_until_a_marker_names_every_removed_cluster() {
    let env = env().await;
    let specs = deployed(&env, &["alpha", "beta", "gamma"]).await;
    let svc = serve_specs(&env, specs.path()).await;
    shown(&svc, "gamma").await;
    let seq = last_seq(&env).await;
    for n in ["alpha", "beta", "gamma"] {
        std::fs::remove_file(specs.path().join(format!("{n}.yaml"))).expect("rm");
    }
    let why = deletion_blocked(&svc, "gamma", "mass delete blocked").await;
    assert!(why.contains(ALLOW_DELETE_FILE), "{why}");
    // A marker that does not name every removed cluster does not unlock it.
    std::fs::write(specs.path().join(ALLOW_DELETE_FILE), "alpha\nbeta\n").expect("marker");
    deletion_blocked(&svc, "gamma", "does not name: gamma").await;
    let (_, metrics) = svc.get("/metrics").await;
    assert!(
        metrics.contains("flower_reconcile_deletions_blocked_clusters 3"),
        "{metrics}"
    );
    assert_eq!(deletes(&env, seq).await, 0);
    // Naming all three does.
    std::fs::write(
        specs.path().join(ALLOW_DELETE_FILE),
        "# removing the pilot clusters\nalpha\nbeta\ngamma\n",
    )
    .expect("marker");
    wait_deletes(&env, seq, 3).await;
    svc.stop().await;
}

#[tokio::test]
async fn run_deletes_a_removed_cluster_only_after_a_second_fetch_of_the_commit() {
    let env = env().await;
    // Deployed from a directory, then followed from a Git repository with the same specs.
    let specs = deployed(&env, &["alpha", "beta", "gamma"]).await;
    let repo = tempfile::tempdir().expect("repo");
    std::fs::create_dir(repo.path().join("clusters")).expect("dir");
    for n in ["alpha", "beta", "gamma"] {
        let f = format!("{n}.yaml");
        std::fs::copy(specs.path().join(&f), repo.path().join("clusters").join(&f)).expect("cp");
    }
    common::git(repo.path(), &["init", "-q", "--initial-branch=main"]);
    common::git(repo.path(), &["add", "-A"]);
    common::git(repo.path(), &["commit", "-q", "-m", "three clusters"]);
    let settings = RunSettings {
        source: SourceArgs {
            git: Some(format!("file://{}", repo.path().display())),
            branch: Some("main".into()),
            git_path: Some("clusters".into()),
            interval: Some("1s".parse().expect("duration")),
            ..SourceArgs::default()
        },
        controller_id: Some(CONTROLLER_ID.into()),
        ..RunSettings::default()
    };
    let svc = Served::start(&env.ctx, settings).await;
    shown(&svc, "gamma").await;
    let seq = last_seq(&env).await;
    // Removing one of three is no mass delete, but the first read of the commit only
    // reports the removal; the next fetch of the same sha carries it out.
    common::git(repo.path(), &["rm", "-q", "clusters/gamma.yaml"]);
    common::git(repo.path(), &["commit", "-q", "-m", "remove gamma"]);
    let why = deletion_blocked(&svc, "gamma", "second read").await;
    assert!(why.contains("second read of the source"), "{why}");
    assert_eq!(
        deletes(&env, seq).await,
        0,
        "nothing deleted on the first read"
    );
    wait_deletes(&env, seq, 1).await;
    svc.stop().await;
}

/// `run` warns when no controller id is configured (#12 item 6: two controllers sharing
/// the default id prune each other), and does not when one is: the warning is logged
/// before `run` connects to OpenNebula, so an unreachable front-end is enough here.
#[test]
fn run_warns_when_the_controller_id_is_the_default() {
    let dir = tempfile::tempdir().expect("dir");
    let specs = dir.path().join("specs");
    std::fs::create_dir(&specs).expect("specs");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flower-reconcile"))
            .args(["run", "--specs"])
            .arg(&specs)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(extra)
            .env_clear()
            .env("HOME", dir.path())
            .env("ONE_AUTH", dir.path().join("no-such-auth-file"))
            .env("ONE_XMLRPC", "http://127.0.0.1:9/RPC2")
            .output()
            .expect("run starts");
        assert!(!out.status.success(), "run cannot reach OpenNebula here");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let defaulted = run(&[]);
    assert!(
        defaulted.contains("no controller id configured"),
        "{defaulted}"
    );
    let explicit = run(&["--controller-id", "ctl-explicit"]);
    assert!(
        !explicit.contains("no controller id configured"),
        "{explicit}"
    );
}
