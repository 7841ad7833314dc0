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
use std::time::{Duration, Instant};

use common::lab::RunController;
use common::multisite::{assert_nothing_left, attr, forwarder, vm_named, wait_for};
use flower_reconcile::api::{ConditionStatus, ConditionType};
use flower_reconcile::demo::lab::{NETWORK, SUPERNODE_TEMPLATE};
use flower_reconcile::one::{ApiBudget, ApiStats, OnedClient};
use flower_reconcile::protocol::{self as p, context as ctx};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_two_sites_train_together_through_the_certificates_extra_name() {
    let work = tempfile::tempdir().expect("tempdir");
    let work = work.path();
    let (site_a, site_b, hub) = common::multisite::two_sites(work).await;
    let (app, specs, spec) =
        common::multisite::app_and_spec(work, &spec_yaml(&hub.ip().to_string()));
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
    common::multisite::register_remote_key(work, &site_a, link, &endpoint, &site_b, remote).await;
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
    common::multisite::train_across(&site_a, CLUSTER, &app, &spec);
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
