//! #13 acceptance: a spec whose `nodeConfig` uses the full value alphabet that `validate`
//! accepts (`:`, `/`, `+`, plain words, numbers) deploys on onesim's process runtime, and
//! its SuperNodes start: real `flower-agent` processes run real `flower-supernode`, which
//! reads `--node-config` as TOML at startup and exits on a value it cannot read (a bare
//! `data:/mnt/x+y` or `mnist` did exactly that before the values were quoted), so a
//! registered SuperNode shows Flower accepted the entries.
//!
//! The SuperLink runs without persistent state, so it does not authenticate SuperNodes
//! (`FL_NODE_AUTH=NO`): its SuperNodes, which have keys with TLS, must not present them, or
//! Flower 1.25 refuses them and none registers (as it did before `FL_NODE_AUTH`).
//!
//! Needs the pinned virtualenv (`FLOWER_VENV`); without it the test fails rather than
//! passing vacuously.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::lab::Runtime;
use common::wait_for;
use flower_reconcile::protocol as p;

const NODE_CONFIG: &[(&str, &str)] = &[
    ("data-path", "data:/mnt/x+y"),
    ("dataset", "mnist"),
    ("lr", "1e-3"),
    ("partition-id", "0"),
    ("num-partitions", "1"),
];

fn spec() -> String {
    let entries: String = NODE_CONFIG
        .iter()
        .map(|(k, v)| format!("      {k}: \"{v}\"\n"))
        .collect();
    format!(
        "apiVersion: {}\nkind: {}\nmetadata:\n  name: alphabet\nspec:\n  opennebula:\n    templates:\n      superlink: flower-superlink\n      supernode: flower-supernode\n    network: flower-net\n  superlink:\n    persistentState: false\n  supernodes:\n    count: 2\n    nodeConfig:\n{entries}",
        flower_reconcile::api::API_VERSION,
        flower_reconcile::api::KIND,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_supernodes_start_with_the_full_node_config_alphabet() {
    let dir = tempfile::Builder::new()
        .prefix("fr-alphabet-")
        .tempdir()
        .unwrap();
    let lab = common::lab::start(dir.path(), Runtime::Process, Duration::from_millis(100)).await;
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(specs.join("alphabet.yaml"), spec()).unwrap();
    let specs = specs.to_str().unwrap();

    common::run_ok(common::lab::reconcile(&lab).args(["validate", specs]));
    let out = common::lab::reconcile(&lab)
        .args(["apply", "--specs", specs, "--auto-approve"])
        .args(["--wait", "--wait-timeout", "180s"])
        .output()
        .unwrap();
    let vm_dirs = common::vm_dirs(&lab.urls.control).await;
    let logs = || {
        vm_dirs
            .iter()
            .map(|(id, d)| {
                let f = |rel: &str| std::fs::read_to_string(d.join(rel)).unwrap_or_default();
                format!(
                    "--- VM {id} agent:\n{}\n--- VM {id} flower:\n{}",
                    f("guest.log"),
                    f("var/log/one-appliance/flower-supernode.log")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        out.status.success(),
        "apply --wait failed:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        logs()
    );

    let attr = |id: u64, key: &str| {
        lab.sim().sim.with(|st| {
            st.vms
                .get(&(id as i64))
                .and_then(|v| v.user_template.get(key).map(str::to_string))
        })
    };
    let nodes: Vec<&(u64, PathBuf)> = vm_dirs
        .iter()
        .filter(|(id, _)| attr(*id, "ROLE_NAME").as_deref() == Some("supernode"))
        .collect();
    assert_eq!(nodes.len(), 2, "{vm_dirs:?}");
    wait_for(
        "both SuperNodes registered with the SuperLink",
        Duration::from_secs(120),
        || {
            nodes
                .iter()
                .all(|(id, _)| attr(*id, p::FL_NODE_READY).as_deref() == Some("YES"))
        },
    )
    .await;
    let want: std::collections::BTreeMap<&str, &str> = NODE_CONFIG.iter().copied().collect();
    for (id, d) in &nodes {
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.join("opt/flower/config/agent-state.json")).unwrap(),
        )
        .unwrap();
        let got = flower_reconcile::protocol::config_kv::NodeConfig::parse(
            state["node"]["node_config"].as_str().unwrap(),
        )
        .unwrap();
        let got: std::collections::BTreeMap<&str, &str> = got
            .entries()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(got, want, "VM {id}: the node config the agent resolved");
        let flower = std::fs::read_to_string(d.join("var/log/one-appliance/flower-supernode.log"))
            .unwrap_or_default();
        assert!(
            !flower.contains("invalid format"),
            "VM {id}: Flower refused the node config:\n{flower}"
        );
        assert_eq!(attr(*id, p::FL_ERROR), None, "VM {id}:\n{}", logs());
    }
    lab.shutdown().await;
    common::assert_no_process_mentioning(&dir.path().display().to_string());
}
