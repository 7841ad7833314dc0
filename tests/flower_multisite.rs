//! Training across two sites, as docs/multi-site.md describes it today (#18 item 3, the part
//! that needs no site parts in the controller): two onesim instances are two clouds, each
//! with its own oned, OneFlow and OneGate. In site A the real `flower-reconcile run` manages a
//! cluster whose SuperLink certificate carries an extra name (`tls.extraNames`): the address
//! site B dials, a forwarder standing in for the WireGuard hub or NAT in front of site A. In
//! site B a SuperNode is a plain VM instantiated through oned with the documented inputs
//! only: `ONEAPP_FL_SUPERLINK_ADDRESS` (that address) and `ONEAPP_FL_SSL_CA_CERTFILE` (site
//! A's published `FL_CA_CERT`). A run that needs two clients trains over TLS with the home
//! SuperNode and the remote one, which the SuperLink lists online.
//!
//! Needs `FLOWER_VENV` (e2e/test-all.sh creates it); fails without it.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::lab::RunController;
use flower_reconcile::api::{ConditionStatus, ConditionType};
use flower_reconcile::demo::lab::{Lab, NETWORK, SUPERNODE_TEMPLATE};
use flower_reconcile::one::{ApiBudget, ApiStats, OnedClient};
use flower_reconcile::protocol::{self as p, context as ctx};
use serde_json::Value;

const CLUSTER: &str = "twosites";

fn spec_yaml(extra_name: &str) -> String {
    common::lab::LabSpec {
        name: CLUSTER,
        count: 1,
        max: 1,
        tls: format!("    extraNames: [\"{extra_name}\"]\n"),
        supernodes: "    failurePolicy:\n      heartbeatInterval: 2s\n".into(),
        rounds: 2,
        min_clients: 2,
    }
    .yaml()
}

/// A user-template attribute of a VM of `lab`'s simulator.
fn attr(lab: &Lab, vm: i64, key: &str) -> Option<String> {
    lab.sim().sim.with(|st| {
        st.vms
            .get(&vm)
            .and_then(|v| v.user_template.get(key).map(str::to_string))
    })
}

/// The id of `lab`'s VM whose name contains `part`.
fn vm_named(lab: &Lab, part: &str) -> Option<i64> {
    lab.sim().sim.with(|st| {
        st.vms
            .values()
            .find(|v| v.name.contains(part))
            .map(|v| v.id)
    })
}

/// Forwards every connection to `listen` on to `to`: the hub or NAT in front of site A.
async fn forwarder(listen: SocketAddr, to: SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .unwrap_or_else(|e| panic!("forwarder on {listen}: {e}"));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    })
}

async fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_two_sites_train_together_through_the_certificates_extra_name() {
    let work = tempfile::tempdir().expect("tempdir");
    let work = work.path();
    let (dir_a, dir_b) = (work.join("a"), work.join("b"));
    for d in [&dir_a, &dir_b] {
        std::fs::create_dir_all(d).expect("site dir");
    }
    let step = Duration::from_millis(200);
    let site_a = common::lab::start(&dir_a, common::lab::Runtime::Process, step).await;
    let site_b = common::lab::start(&dir_b, common::lab::Runtime::Process, step).await;
    // Site B reaches site A's SuperLink at an address of its own net (no VM leases
    // 127.<net>.200.x): what a WireGuard hub or a NAT address is to a real remote site.
    let hub: SocketAddr = format!("127.{}.200.1:9092", site_b.sim().loopback_net())
        .parse()
        .expect("hub address");

    let app = common::lab::write_app(work);
    let specs = work.join("specs");
    std::fs::create_dir_all(&specs).expect("specs dir");
    let spec = specs.join("twosites.yaml");
    std::fs::write(&spec, spec_yaml(&hub.ip().to_string())).expect("spec");
    let ctl = RunController::start(&site_a, &["--specs", specs.to_str().expect("utf-8")], work);
    let took = ctl
        .wait_cluster(CLUSTER, Duration::from_secs(180), |v| {
            v.status
                .conditions
                .iter()
                .any(|c| c.kind == ConditionType::Ready && c.status == ConditionStatus::True)
        })
        .await;
    println!("multisite timing: site A Ready: {:.1}s", took.as_secs_f64());

    // What an operator reads from site A's SuperLink VM (docs/multi-site.md step 2).
    let link = vm_named(&site_a, "superlink").expect("site A's SuperLink VM");
    let ca = attr(&site_a, link, p::FL_CA_CERT).expect("FL_CA_CERT published");
    let endpoint: SocketAddr = attr(&site_a, link, p::FL_ENDPOINT)
        .expect("FL_ENDPOINT published")
        .parse()
        .expect("FL_ENDPOINT is ip:port");
    let _hub = forwarder(hub, endpoint).await;

    // Site B: a SuperNode VM from the site's SuperNode template, with the documented inputs
    // (step 3); the rest of its CONTEXT is what the template's own holds in this lab.
    let venv_bin = common::flower_venv().join("bin");
    let context = [
        ("NETWORK", "YES".to_string()),
        ("TOKEN", "YES".to_string()),
        ("REPORT_READY", "YES".to_string()),
        (ctx::RUNTIME, "process".to_string()),
        (ctx::FLOWER_BIN_DIR, venv_bin.display().to_string()),
        (ctx::HEARTBEAT_INTERVAL, "2".to_string()),
        (ctx::ROLE, "supernode".to_string()),
        (ctx::FLOWER_VERSION, "1.25.0".to_string()),
        (ctx::TLS_ENABLED, "YES".to_string()),
        (ctx::SUPERLINK_ADDRESS, hub.to_string()),
        (ctx::SSL_CA_CERTFILE, ca),
        (
            ctx::NODE_CONFIG,
            "partition-id=1 num-partitions=2".to_string(),
        ),
    ]
    .iter()
    .map(|(k, v)| format!("{k} = \"{v}\""))
    .collect::<Vec<_>>()
    .join(", ");
    let extra = format!("CONTEXT = [ {context} ]\nNIC = [ NETWORK = \"{NETWORK}\" ]\n");
    let one = site_b.one_config().expect("site B's client config");
    let oned = OnedClient::new(
        &one,
        ApiBudget::new(one.requests_per_second),
        ApiStats::new(),
    )
    .expect("oned client");
    let template = site_b
        .sim()
        .sim
        .with(|st| {
            st.templates
                .values()
                .find(|t| t.name == SUPERNODE_TEMPLATE)
                .map(|t| t.id)
        })
        .expect("site B's SuperNode template");
    let remote = oned
        .template_instantiate(template, "remote-supernode", false, &extra, false)
        .await
        .expect("instantiate the remote SuperNode");
    // Site A's SuperLink admits only registered SuperNode keys, and its agent registers its
    // own service's alone: the operator registers the remote node's key through site A's
    // Control API (docs/multi-site.md step 4), read from site B's VM.
    let t = Instant::now();
    let remote_key = wait_for(
        "the remote SuperNode's FL_NODE_PUBKEY",
        Duration::from_secs(60),
        || attr(&site_b, remote, p::FL_NODE_PUBKEY),
    )
    .await;
    register_key(
        work,
        &venv_bin,
        link_control(&endpoint),
        &ca_pem(&site_a, link),
        &remote_key,
    );
    let remote_node: u64 = wait_for(
        "the remote SuperNode registered with site A's SuperLink",
        Duration::from_secs(120),
        || {
            (attr(&site_b, remote, p::FL_NODE_READY).as_deref() == Some("YES"))
                .then(|| attr(&site_b, remote, p::FL_FLOWER_NODE_ID))
                .flatten()
                .and_then(|id| id.parse().ok())
        },
    )
    .await;
    println!(
        "multisite timing: remote SuperNode instantiated → registered through the hub: {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // A run that needs both SuperNodes trains.
    let t = Instant::now();
    common::lab::submit_completed(&site_a, CLUSTER, &app, &spec, 2, String::new);
    println!(
        "multisite timing: a 2-round run over both sites: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // Site A's SuperLink holds the remote node online (its own list, published through
    // site A's OneGate), next to the home one.
    let online = attr(&site_a, link, p::FL_NODES_ONLINE).expect("FL_NODES_ONLINE");
    let online = p::nodes::NodesOnline::parse(&online).expect("FL_NODES_ONLINE parses");
    assert!(
        online.ids.contains(&remote_node),
        "site A's SuperLink lists the remote node {remote_node}: {online:?}"
    );
    assert_eq!(online.ids.len(), 2, "{online:?}");

    ctl.stop();
    site_b.shutdown().await;
    site_a.shutdown().await;
    assert_nothing_left(work);
}

/// Site A's Control API: the SuperLink VM's address (`controlApi: network`), port 9093.
fn link_control(fleet: &SocketAddr) -> SocketAddr {
    SocketAddr::new(fleet.ip(), 9093)
}

/// Site A's CA as PEM (its `FL_CA_CERT` is base64 of it).
fn ca_pem(lab: &Lab, link: i64) -> String {
    let b64 = attr(lab, link, p::FL_CA_CERT).expect("FL_CA_CERT");
    p::pem::decode(&b64).expect("FL_CA_CERT decodes")
}

/// `flwr supernode register` of `key` as an operator runs it: a project whose federation
/// is site A's Control API over TLS.
fn register_key(work: &Path, venv_bin: &Path, control: SocketAddr, ca: &str, key: &str) {
    let dir = work.join("operator");
    std::fs::create_dir_all(&dir).expect("operator dir");
    std::fs::write(dir.join("ca.crt"), ca).expect("ca");
    std::fs::write(dir.join("node.pub"), format!("{key}\n")).expect("key");
    std::fs::write(
        dir.join("pyproject.toml"),
        format!(
            "[project]\nname = \"operator\"\nversion = \"1.0.0\"\n\n[tool.flwr.app]\n\
             publisher = \"operator\"\n\n[tool.flwr.app.components]\nserverapp = \"none:app\"\n\
             clientapp = \"none:app\"\n\n[tool.flwr.federations]\ndefault = \"site-a\"\n\n\
             [tool.flwr.federations.site-a]\naddress = \"{control}\"\n\
             root-certificates = \"{}\"\n",
            dir.join("ca.crt").display()
        ),
    )
    .expect("pyproject");
    let out = std::process::Command::new(venv_bin.join("flwr"))
        .args(["supernode", "register", "node.pub", "."])
        .args(["site-a", "--format", "json"])
        .current_dir(&dir)
        .env("FLWR_HOME", dir.join("home"))
        .env("FLWR_TELEMETRY_ENABLED", "0")
        .output()
        .expect("flwr runs");
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "flwr supernode register: no JSON ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(answer["success"], true, "flwr supernode register: {answer}");
}

/// No Flower process of either site outlives its lab.
fn assert_nothing_left(work: &Path) {
    let needle = work.to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect();
    assert!(left.is_empty(), "processes left: {left:#?}");
}
