//! #12 item 11 against onesim: the code running inside a cluster (a ClientApp, or a
//! compromised SuperNode holding its OneGate token) rewrites other VMs' attributes through
//! OneGate's `PUT /vms/:id`, which OpenNebula allows by default between VMs of one service.
//!
//! The chain is real except Flower itself: onesim boots each VM as a `flower-agent run`
//! process (the lab of the demo and the e2e), the controller is the `flower-reconcile`
//! binary, and Flower is a small stand-in (a SuperLink that listens on its Fleet port, a
//! SuperNode that logs its registration), so the attacks and their effects are cheap to
//! observe. Guarantees shown here:
//! - a rotation request the controller did not sign is never acted on, and one it signed is;
//! - a SuperNode never follows `FL_ENDPOINT` to another VM, nor trusts a CA the pinned one
//!   did not sign;
//! - with OneGate's `update_by_id` disabled (what the README advises), the attack is refused
//!   and the cluster still works: the agents never need it.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::wait_for;
use flower_reconcile::demo::lab::{Lab, LabConfig};
use flower_reconcile::protocol as p;

const FAKE_SUPERLINK: &str = r#"#!/usr/bin/env python3
# Stand-in for flower-superlink: counts its runs, logs its argv, listens on the Fleet port.
import os, socket, sys
args = sys.argv[1:]
n = int(open("runs").read()) + 1 if os.path.exists("runs") else 1
open("runs", "w").write(str(n))
print("ARGS:", " ".join(args), flush=True)
host, port = args[args.index("--fleet-api-address") + 1].rsplit(":", 1)
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host.strip("[]"), int(port)))
s.listen(64)
while True:
    c, _ = s.accept()
    c.close()
"#;

const FAKE_SUPERNODE: &str = r#"#!/bin/sh
# Stand-in for flower-supernode: counts its runs, logs its argv and a registration line.
n=$(cat runs 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > runs
echo "ARGS: $*"
echo "INFO :      SuperNode ID: 77"
exec sleep 100000
"#;

struct Cluster {
    lab: Lab,
    dir: tempfile::TempDir,
    link: Vm,
    nodes: Vec<Vm>,
}

#[derive(Debug, Clone)]
struct Vm {
    id: u64,
    ip: String,
    token: String,
    dir: PathBuf,
}

impl Vm {
    fn file(&self, rel: &str) -> String {
        std::fs::read_to_string(self.dir.join(rel)).unwrap_or_default()
    }
    fn runs(&self) -> u32 {
        self.file("opt/flower/home/runs")
            .trim()
            .parse()
            .unwrap_or(0)
    }
    fn agent_log(&self) -> String {
        self.file("guest.log")
    }
    fn flower_log(&self, role: &str) -> String {
        self.file(&format!("var/log/one-appliance/flower-{role}.log"))
    }
}

fn spec(name: &str, tls: (&str, &str)) -> String {
    format!(
        "apiVersion: {}\nkind: {}\nmetadata:\n  name: {name}\nspec:\n  opennebula:\n    templates:\n      superlink: flower-superlink\n      supernode: flower-supernode\n    network: flower-net\n  supernodes:\n    count: 2\n  tls:\n    enabled: true\n    validity: {}\n    renewBefore: {}\n",
        flower_reconcile::api::API_VERSION,
        flower_reconcile::api::KIND,
        tls.0,
        tls.1,
    )
}

fn write_exe(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

async fn cluster(onegate: onesim::GateConfig) -> Cluster {
    flower_reconcile::one::http::ensure_crypto_provider();
    let dir = tempfile::Builder::new()
        .prefix("fr-peers-")
        .tempdir()
        .unwrap();
    common::lab::searchable(dir.path());
    let bin = dir.path().join("venv/bin");
    std::fs::create_dir_all(&bin).unwrap();
    write_exe(&bin.join("flower-superlink"), FAKE_SUPERLINK);
    write_exe(&bin.join("flower-supernode"), FAKE_SUPERNODE);
    let lab = Lab::start(LabConfig {
        base_dir: dir.path().join("lab"),
        runtime: common::lab::process_runtime(dir.path().join("venv")),
        heartbeat_secs: 1,
        vm_step: Duration::from_millis(100),
        onegate,
        autoscaler_interval: flower_reconcile::demo::lab::DEFAULT_AUTOSCALER_INTERVAL,
    })
    .await
    .unwrap();
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(specs.join("peers.yaml"), spec("peers", ("8760h", "720h"))).unwrap();
    common::apply_and_wait(lab.env(), &specs, "120s");

    let listed = common::onesim_get(&lab.urls.control, "/vms").await;
    let role_of = |id: u64| {
        lab.sim().sim.with(|st| {
            st.vms
                .get(&(id as i64))
                .and_then(|v| v.user_template.get("ROLE_NAME").map(str::to_string))
        })
    };
    let mut link = None;
    let mut nodes = Vec::new();
    for v in listed["vms"].as_array().unwrap() {
        let vm = Vm {
            id: v["id"].as_u64().unwrap(),
            ip: v["ip"].as_str().unwrap().to_string(),
            token: v["token"].as_str().unwrap().to_string(),
            dir: PathBuf::from(v["vm_dir"].as_str().unwrap()),
        };
        match role_of(vm.id).as_deref() {
            Some("superlink") => link = Some(vm),
            Some("supernode") => nodes.push(vm),
            other => panic!("VM {} has role {other:?}", vm.id),
        }
    }
    assert_eq!(nodes.len(), 2);
    let c = Cluster {
        lab,
        dir,
        link: link.expect("a SuperLink VM"),
        nodes,
    };
    wait_for(
        "both SuperNodes registered",
        Duration::from_secs(90),
        || {
            c.nodes
                .iter()
                .all(|n| c.attr(n, p::FL_NODE_READY).as_deref() == Some("YES"))
        },
    )
    .await;
    c
}

impl Cluster {
    fn attr(&self, vm: &Vm, key: &str) -> Option<String> {
        self.lab.sim().sim.with(|st| {
            st.vms
                .get(&(vm.id as i64))
                .and_then(|v| v.user_template.get(key).map(str::to_string))
        })
    }

    /// `PUT /vms/{target}` on OneGate as VM `from` would: with its own token.
    async fn peer_write(&self, from: &Vm, target: &Vm, data: &str) -> u16 {
        reqwest::Client::new()
            .put(format!("{}/vms/{}", self.lab.urls.onegate, target.id))
            .header("X-ONEGATE-TOKEN", &from.token)
            .header("X-ONEGATE-VMID", from.id.to_string())
            .body(data.to_string())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_cannot_forge_rotations_or_move_supernodes_and_signed_rotations_work() {
    let c = cluster(onesim::GateConfig::default()).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let link_runs = c.link.runs();
    assert!(link_runs >= 1);
    let cert = c
        .attr(&c.link, p::FL_CERT_NOT_AFTER)
        .expect("FL_CERT_NOT_AFTER");
    let ca = b.file("opt/flower/certs/ca.crt");
    assert!(ca.contains("BEGIN CERTIFICATE"));

    // 1. SuperNode A asks the SuperLink for a 1-minute certificate, unsigned, then with a
    //    signature of its own key. OneGate accepts both writes (OpenNebula's default).
    let refusals = || {
        c.link
            .agent_log()
            .matches("ignoring an unsigned rotation request")
            .count()
    };
    let forged = "FL_ROTATE_REQUEST=99\nFL_ROTATE_VALIDITY=1m";
    assert_eq!(c.peer_write(a, &c.link, forged).await, 200);
    wait_for(
        "the SuperLink to refuse it",
        Duration::from_secs(90),
        || refusals() >= 1,
    )
    .await;
    let mine = flower_reconcile::protocol::signing::SigningSeed::generate().unwrap();
    let sig = mine.sign_rotation(c.link.id, 100, Some("1m"));
    let forged = format!("FL_ROTATE_REQUEST=100\nFL_ROTATE_SIG={sig}");
    assert_eq!(c.peer_write(a, &c.link, &forged).await, 200);
    wait_for(
        "the SuperLink to refuse that too",
        Duration::from_secs(90),
        || refusals() >= 2,
    )
    .await;
    assert_eq!(c.attr(&c.link, p::FL_ROTATE_DONE), None);
    assert_eq!(c.link.runs(), link_runs, "the SuperLink did not restart");
    assert_eq!(c.attr(&c.link, p::FL_CERT_NOT_AFTER), Some(cert.clone()));

    // 2. A points the SuperLink's FL_ENDPOINT at itself and publishes its own CA.
    let (evil_ca, _) = {
        let ca = flower_reconcile::agent::tls::generate_ca(
            chrono::Utc::now(),
            Duration::from_secs(86400),
        )
        .unwrap();
        (
            base64::engine::general_purpose::STANDARD.encode(&ca.cert_pem),
            ca,
        )
    };
    let real_endpoint = c.attr(&c.link, p::FL_ENDPOINT).expect("FL_ENDPOINT");
    let hijack = format!("FL_ENDPOINT={}:9092\nFL_CA_CERT={evil_ca}", a.ip);
    assert_eq!(c.peer_write(a, &c.link, &hijack).await, 200);
    wait_for(
        "B to refuse the foreign endpoint",
        Duration::from_secs(90),
        || {
            b.agent_log()
                .contains("is not an address of that VM's NICs")
        },
    )
    .await;
    // 3. … then restores the endpoint and keeps its CA.
    let ca_only = format!("FL_ENDPOINT={real_endpoint}");
    assert_eq!(c.peer_write(a, &c.link, &ca_only).await, 200);
    wait_for("B to refuse the forged CA", Duration::from_secs(90), || {
        b.agent_log()
            .contains("ignoring a SuperLink CA change not signed by the pinned CA")
    })
    .await;
    assert!(
        !b.agent_log().contains("restarting Flower"),
        "B never restarted towards A"
    );
    assert!(!b
        .flower_log("supernode")
        .contains(&format!("--superlink {}:9092", a.ip)));
    assert_eq!(
        b.file("opt/flower/certs/ca.crt"),
        ca,
        "B still trusts the real CA"
    );

    // 4. The controller's own rotation (a shortened validity) is signed and carried out.
    let specs = c.dir.path().join("specs");
    std::fs::write(specs.join("peers.yaml"), spec("peers", ("30m", "10m"))).unwrap();
    common::apply_and_wait(c.lab.env(), &specs, "120s");
    let request = c
        .attr(&c.link, p::FL_ROTATE_REQUEST)
        .expect("a rotation request");
    assert!(c.attr(&c.link, p::FL_ROTATE_SIG).is_some());
    wait_for("the signed rotation done", Duration::from_secs(60), || {
        c.attr(&c.link, p::FL_ROTATE_DONE).as_deref() == Some(request.as_str())
    })
    .await;
    assert_ne!(c.attr(&c.link, p::FL_CERT_NOT_AFTER), Some(cert));
    assert_eq!(
        c.link.runs(),
        link_runs + 1,
        "one restart: the signed rotation"
    );
    c.lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_update_by_id_disabled_peers_are_refused_and_the_cluster_still_works() {
    let c = cluster(onesim::GateConfig {
        update_by_id: false,
        ..Default::default()
    })
    .await;
    let endpoint = c.attr(&c.link, p::FL_ENDPOINT);
    let status = c
        .peer_write(
            &c.nodes[0],
            &c.link,
            &format!("FL_ENDPOINT={}:9092", c.nodes[0].ip),
        )
        .await;
    assert_eq!(status, 403, "OneGate refuses PUT /vms/:id");
    assert_eq!(c.attr(&c.link, p::FL_ENDPOINT), endpoint);
    c.lab.shutdown().await;
}
