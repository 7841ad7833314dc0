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
//!
//! And the other sites' SuperNodes (#18 item 3), whose keys the controller hands the
//! SuperLink as a signed `FL_SITE_NODE_KEYS` (its OneGate cannot see another zone):
//! - a `flower-supernode` started by hand (no VM of the service) is refused;
//! - a key set a peer writes through OneGate, unsigned or signed with its own key, is
//!   ignored (the key is not registered);
//! - once the controller (planner and apply, in-process on the same code path as `run`)
//!   writes the signed set carrying its key, it is registered, the node joins and a
//!   2-round run needing both it and the service's SuperNode completes;
//! - dropped from the controller's set, the key is unregistered and refused again.
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

/// `flower-supernode` with private key `key` against the SuperLink at `endpoint` (trusting
/// `ca`), its log in `work/NAME.log`; `extra`: more arguments.
fn start_supernode(
    key: &Path,
    ca: &Path,
    endpoint: &str,
    work: &Path,
    name: &str,
    extra: &[&str],
) -> (std::process::Child, PathBuf) {
    let (mut cmd, log) =
        common::flower_command(&common::flower_venv(), "flower-supernode", work, name);
    let child = cmd
        .arg("--root-certificates")
        .arg(ca)
        .args(["--superlink", endpoint, "--auth-supernode-private-key"])
        .arg(key)
        .args(extra)
        .arg("--clientappio-api-address")
        .arg(format!("127.0.0.1:{}", common::lab::free_port()))
        .spawn()
        .expect("flower-supernode");
    (child, log)
}

/// Kills `child`'s process group (SuperExec and other children of the group, if any).
fn kill_group(child: &mut std::process::Child) {
    let pg = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

fn run_rogue(key: &Path, ca: &Path, endpoint: &str, work: &Path, name: &str) -> String {
    let (mut child, log) = start_supernode(
        key,
        ca,
        endpoint,
        work,
        name,
        &["--max-retries", "1", "--max-wait-time", "20"],
    );
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(90) {
            kill_group(&mut child);
            panic!(
                "{name}: still running after 90 s, so the SuperLink let it in:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    kill_group(&mut child);
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

/// What the controller does for a cluster whose SuperNodes in other sites have `keys`:
/// observe, plan and apply once, in-process (`reconcile_one`, as `run` does), with the
/// desired state of the specs directory plus those keys. Returns what it applied.
async fn controller_hands_over(
    lab: &Lab,
    specs: &Path,
    keys: BTreeSet<NodePublicKey>,
) -> Vec<String> {
    use flower_reconcile::reconciler::{self as r, context::context_for};
    let ctx = context_for(
        lab.one_config().expect("the lab's client config"),
        flower_reconcile::service::config::DEFAULT_CONTROLLER_ID,
        None,
        Default::default(),
    )
    .await
    .expect("controller context");
    let snapshot = flower_reconcile::source::DirSource::new(specs)
        .load_once()
        .await
        .expect("specs");
    let mut desired = r::desired_from_snapshot(&snapshot);
    desired
        .clusters
        .get_mut(SITE_CLUSTER)
        .expect("the cluster's spec")
        .site_node_keys = keys;
    let now = chrono::Utc::now();
    let live = r::observe(&ctx, now).await.expect("observe");
    r::reconcile_one(&ctx, &desired, &live, SITE_CLUSTER, now)
        .await
        .expect("reconcile")
        .applied
}

const SITE_CLUSTER: &str = "sitekeys";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_site_keys_signed_by_the_controller_let_a_remote_supernode_in_and_forged_ones_do_not(
) {
    let spec = common::lab::LabSpec {
        name: SITE_CLUSTER,
        count: 1,
        max: 1,
        tls: String::new(),
        supernodes: "    failurePolicy:\n      heartbeatInterval: 2s\n".into(),
        rounds: 2,
        min_clients: 2,
    }
    .yaml();
    let (dir, lab, specs) =
        common::lab::start_with_spec("sitekeys", Runtime::Process, SITE_CLUSTER, &spec).await;
    let work = dir.path();
    let t0 = Instant::now();
    common::apply_and_wait(lab.env(), &specs, "240s");
    println!(
        "site keys: apply → Ready in {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    let link = vms_of_role(&lab, "superlink")[0];
    let node = vms_of_role(&lab, "supernode")[0];
    let listed = common::onesim_get(&lab.urls.control, "/vms").await;
    let vm_of = |id: u64| {
        listed["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"].as_u64() == Some(id))
            .cloned()
            .expect("the VM in onesim's list")
    };
    let link_dir = PathBuf::from(vm_of(link)["vm_dir"].as_str().unwrap());
    let node_token = vm_of(node)["token"].as_str().unwrap().to_string();
    let db = link_dir.join("opt/flower/state/state.db");
    let ca = link_dir.join("opt/flower/certs/ca.crt");
    let endpoint = vm_attr(&lab, link, p::FL_ENDPOINT).expect("the SuperLink's FL_ENDPOINT");
    let agent_log = || std::fs::read_to_string(link_dir.join("guest.log")).unwrap_or_default();
    let own = published(&lab);
    wait_for(
        "the service's SuperNode key registered",
        Duration::from_secs(120),
        || registered(&db) == own,
    )
    .await;

    // 1. A SuperNode of "another site", started by hand with its own key: refused.
    let (remote_pub, remote_key) = node_auth::generate().unwrap();
    let remote = work.join("remote.key");
    std::fs::write(&remote, remote_key).unwrap();
    std::fs::set_permissions(&remote, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let log = rogue_supernode(&remote, &ca, &endpoint, work, "remote-refused").await;
    assert!(
        log.contains(node_auth::REFUSED),
        "the remote SuperNode's log:\n{log}"
    );

    // 2. The service's SuperNode, as a compromised peer, writes a key set carrying that key
    //    onto the SuperLink's VM through OneGate: unsigned, then signed with its own key.
    let set: BTreeSet<NodePublicKey> = [remote_pub.clone()].into();
    let peer = flower_reconcile::protocol::signing::SigningSeed::generate().unwrap();
    let writes = [
        (
            format!("{}={}", p::FL_SITE_NODE_KEYS, p::node_key::encode_set(&set)),
            "FL_SITE_NODE_KEYS_SIG is missing",
        ),
        (
            format!(
                "{}={}\n{}={}",
                p::FL_SITE_NODE_KEYS,
                p::node_key::encode_set(&set),
                p::FL_SITE_NODE_KEYS_SIG,
                peer.sign_site_keys(link, &set)
            ),
            "FL_SITE_NODE_KEYS_SIG is not the controller's signature",
        ),
    ];
    for (forged, reason) in writes {
        let status = reqwest::Client::new()
            .put(format!("{}/vms/{link}", lab.urls.onegate))
            .header("X-ONEGATE-TOKEN", &node_token)
            .header("X-ONEGATE-VMID", node.to_string())
            .body(forged)
            .send()
            .await
            .unwrap()
            .status();
        assert!(
            status.is_success(),
            "OneGate accepts the peer's write: {status}"
        );
        wait_for(
            "the SuperLink's agent to ignore the forged set",
            Duration::from_secs(60),
            || agent_log().contains(reason),
        )
        .await;
        assert!(
            !registered(&db).contains(&remote_pub),
            "a forged set registered its key"
        );
    }
    // 3. The controller hands the key over, signed: registered; the node joins and trains.
    let t = Instant::now();
    let applied = controller_hands_over(&lab, &specs, set.clone()).await;
    assert!(
        applied
            .iter()
            .any(|l| l.contains("wrote 1 SuperNode key(s) of other sites")),
        "{applied:?}"
    );
    assert!(vm_attr(&lab, link, p::FL_SITE_NODE_KEYS_SIG).is_some());
    wait_for("the remote key registered", Duration::from_secs(60), || {
        registered(&db).contains(&remote_pub)
    })
    .await;
    println!(
        "site keys: signed set written → remote key registered in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let (mut remote_node, remote_log) = start_supernode(
        &remote,
        &ca,
        &endpoint,
        work,
        "remote",
        &["--node-config", "partition-id=1 num-partitions=2"],
    );
    wait_for("both SuperNodes online", Duration::from_secs(90), || {
        let now = chrono::Utc::now().timestamp_micros() as f64 / 1e6;
        flower_reconcile::agent::linkstate::online_nodes(&db, now).is_ok_and(|ids| ids.len() == 2)
    })
    .await;
    let app = common::lab::write_app(work);
    let t = Instant::now();
    common::lab::submit_completed(
        &lab,
        SITE_CLUSTER,
        &app,
        &specs.join(format!("{SITE_CLUSTER}.yaml")),
        2,
        || {
            format!(
                "remote SuperNode:\n{}",
                common::lab::log_tail(&remote_log, 40)
            )
        },
    );
    println!(
        "site keys: a 2-round run with the remote SuperNode: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    kill_group(&mut remote_node);

    // 4. The controller drops the key: the SuperLink's agent unregisters it (it registered
    //    it), the service's own stays, and the key is refused again.
    let t = Instant::now();
    let applied = controller_hands_over(&lab, &specs, BTreeSet::new()).await;
    assert!(
        applied
            .iter()
            .any(|l| l.contains("wrote 0 SuperNode key(s) of other sites")),
        "{applied:?}"
    );
    wait_for(
        "the remote key unregistered",
        Duration::from_secs(60),
        || {
            let held = registered(&db);
            !held.contains(&remote_pub) && held == own
        },
    )
    .await;
    println!(
        "site keys: key dropped → unregistered in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let log = rogue_supernode(&remote, &ca, &endpoint, work, "remote-dropped").await;
    assert!(
        log.contains(node_auth::REFUSED),
        "the dropped key's SuperNode log:\n{log}"
    );
    // Converged: the controller has nothing more to write.
    assert!(controller_hands_over(&lab, &specs, BTreeSet::new())
        .await
        .iter()
        .all(|l| !l.contains("other sites")));
    lab.shutdown().await;
}
