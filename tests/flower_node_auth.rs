//! #17 item 4, authenticated SuperNodes, with real Flower 1.25 on onesim's process runtime:
//! each SuperNode's agent makes its own key and publishes the public half
//! (`FL_NODE_PUBKEY`); the SuperLink runs with `--enable-supernode-auth` and its agent
//! registers exactly the keys of its service's SuperNodes. Shown here from the SuperLink's
//! own state (its SQLite `node` table) and from Flower's refusal:
//! - both SuperNodes join with their registered keys (Flower holds them online);
//! - a `flower-supernode` started by hand with a key of its own, pointed at the SuperLink
//!   with its CA, is refused (`No SuperNode found with the given public key.`);
//! - after a SuperNode is replaced (its VM crashed and powered off, the controller replaces
//!   it), its old key is unregistered and the replacement's registered, and a
//!   `flower-supernode` started with the old key is refused.
//!
//! Needs the pinned virtualenv (`FLOWER_VENV`); without it the test fails.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::lab::{vm_attr, vms_of_role, RunController, Runtime};
use common::wait_for;
use flower_reconcile::agent::node_auth;
use flower_reconcile::demo::lab::Lab;
use flower_reconcile::protocol as p;
use flower_reconcile::protocol::node_key::NodePublicKey;

const SPEC: &str = "apiVersion: flower.opennebula.io/v1alpha1
kind: FlowerCluster
metadata:
  name: nodeauth
spec:
  opennebula:
    templates:
      superlink: flower-superlink
      supernode: flower-supernode
    network: flower-net
  supernodes:
    count: 2
    failurePolicy:
      gracePeriod: 10s
      heartbeatInterval: 2s
";

/// The keys the SuperLink's Flower state holds registered (any status but unregistered).
fn registered(db: &Path) -> BTreeSet<NodePublicKey> {
    node_auth::registered(db)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.key)
        .collect()
}

/// The `FL_NODE_PUBKEY`s the SuperNode VMs publish now.
fn published(lab: &Lab) -> BTreeSet<NodePublicKey> {
    vms_of_role(lab, "supernode")
        .into_iter()
        .filter_map(|vm| vm_attr(lab, vm, p::FL_NODE_PUBKEY))
        .filter_map(|v| NodePublicKey::parse(&v).ok())
        .collect()
}

/// Starts `flower-supernode` with private key `key` against the SuperLink at `endpoint`
/// (trusting `ca`), with a single connection attempt; returns its log once it exited, and
/// fails if it still runs after 90 s (it was let in).
async fn rogue_supernode(key: &Path, ca: &Path, endpoint: &str, work: &Path, name: &str) -> String {
    let (key, ca, endpoint, work, name) = (
        key.to_path_buf(),
        ca.to_path_buf(),
        endpoint.to_string(),
        work.to_path_buf(),
        name.to_string(),
    );
    // It blocks: off the runtime, which serves the lab meanwhile.
    tokio::task::spawn_blocking(move || run_rogue(&key, &ca, &endpoint, &work, &name))
        .await
        .unwrap()
}

fn run_rogue(key: &Path, ca: &Path, endpoint: &str, work: &Path, name: &str) -> String {
    let (mut cmd, log) =
        common::flower_command(&common::flower_venv(), "flower-supernode", work, name);
    let mut child = cmd
        .arg("--root-certificates")
        .arg(ca)
        .args(["--superlink", endpoint, "--auth-supernode-private-key"])
        .arg(key)
        .args(["--max-retries", "1", "--max-wait-time", "20"])
        .arg("--clientappio-api-address")
        .arg(format!("127.0.0.1:{}", common::lab::free_port()))
        .spawn()
        .expect("flower-supernode");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let pg = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            panic!(
                "{name}: still running after 90 s, so the SuperLink let it in:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // SuperExec and other children of the group, if any.
    let pg = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{name} exited successfully:\n{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_only_registered_supernode_keys_join_and_a_replaced_nodes_key_stops_working() {
    let (dir, lab, specs) =
        common::lab::start_with_spec("nodeauth", Runtime::Process, "nodeauth", SPEC).await;
    let t0 = Instant::now();
    let out = common::lab::reconcile(&lab)
        .args([
            "apply",
            "--specs",
            specs.to_str().unwrap(),
            "--auto-approve",
        ])
        .args(["--wait", "--wait-timeout", "240s"])
        .output()
        .unwrap();
    if !out.status.success() {
        let mut logs = String::new();
        for (id, d) in common::vm_dirs(&lab.urls.control).await {
            for f in [
                "guest.log",
                "var/log/one-appliance/flower-superlink.log",
                "var/log/one-appliance/flower-supernode.log",
            ] {
                let tail = common::lab::log_tail(&d.join(f), 40);
                logs.push_str(&format!("--- VM {id} {f}:\n{tail}\n"));
            }
        }
        panic!(
            "apply --wait failed:\n{}{}\n{logs}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("node auth: apply → Ready in {:?}", t0.elapsed());

    let link = vms_of_role(&lab, "superlink")[0];
    let dirs: std::collections::BTreeMap<u64, PathBuf> = common::vm_dirs(&lab.urls.control)
        .await
        .into_iter()
        .collect();
    let link_dir = &dirs[&link];
    let db = link_dir.join("opt/flower/state/state.db");
    let ca = link_dir.join("opt/flower/certs/ca.crt");
    let endpoint = vm_attr(&lab, link, p::FL_ENDPOINT).expect("the SuperLink's FL_ENDPOINT");
    let nodes = vms_of_role(&lab, "supernode");
    assert_eq!(nodes.len(), 2);

    // 1. Both SuperNodes published a key, exactly those are registered, and both joined:
    //    Flower holds two nodes online (a node can only be online after activating with a
    //    registered key, since Fleet registration is off).
    let keys = published(&lab);
    assert_eq!(keys.len(), 2, "each SuperNode publishes its own key");
    let joined = wait_for(
        "the SuperNodes' keys registered and both nodes online",
        Duration::from_secs(120),
        || {
            let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
            registered(&db) == keys
                && flower_reconcile::agent::linkstate::online_nodes(&db, now)
                    .is_ok_and(|ids| ids.len() == 2)
        },
    )
    .await;
    println!("node auth: both SuperNodes online with registered keys ({joined:?} after Ready)");

    // 2. A SuperNode with a key nobody registered is refused.
    let (rogue_pub, rogue_key) = node_auth::generate().unwrap();
    let rogue = dir.path().join("rogue.key");
    std::fs::write(&rogue, rogue_key).unwrap();
    let log = rogue_supernode(&rogue, &ca, &endpoint, dir.path(), "rogue").await;
    assert!(
        log.contains(node_auth::REFUSED),
        "the rogue SuperNode's log:\n{log}"
    );
    assert!(!registered(&db).contains(&rogue_pub));

    // 3. A SuperNode is replaced: its old key is unregistered, the replacement's registered.
    let gone = nodes[0];
    let old_key_file = dir.path().join("old.key");
    std::fs::copy(
        dirs[&gone].join("opt/flower/certs/supernode.key"),
        &old_key_file,
    )
    .unwrap();
    let old_pub = NodePublicKey::parse(&vm_attr(&lab, gone, p::FL_NODE_PUBKEY).unwrap()).unwrap();
    let ctl = RunController::start(
        &lab,
        &["--specs", specs.to_str().expect("utf-8 path")],
        dir.path(),
    );
    let client = reqwest::Client::new();
    let control = &lab.urls.control;
    for (path, body) in [
        (format!("/vm/{gone}/crash"), None),
        (
            format!("/vm/{gone}/state"),
            Some(serde_json::json!({"state": "POWEROFF"})),
        ),
    ] {
        let mut req = client.post(format!("{control}{path}"));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("onesim control API");
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    let crashed = Instant::now();
    let mut replaced = false;
    while !replaced {
        assert!(
            crashed.elapsed() < Duration::from_secs(240),
            "the old key is still registered or the replacement's is not; registered {:?}, \
             published {:?}; controller log:\n{}",
            registered(&db),
            published(&lab),
            ctl.log_tail(100)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now_nodes = vms_of_role(&lab, "supernode");
        let held = registered(&db);
        replaced = !now_nodes.contains(&gone)
            && now_nodes.len() == 2
            && !held.contains(&old_pub)
            && held == published(&lab)
            && held.len() == 2;
    }
    println!(
        "node auth: crash → old key unregistered, replacement registered in {:?}",
        crashed.elapsed()
    );
    ctl.stop();

    // 4. The old key no longer gets in.
    std::fs::set_permissions(
        &old_key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let log = rogue_supernode(&old_key_file, &ca, &endpoint, dir.path(), "old-key").await;
    assert!(
        log.contains(node_auth::REFUSED),
        "the old key's SuperNode log:\n{log}"
    );
    lab.shutdown().await;
}
