//! Training across two sites with the controller managing both (#18 item 3, the site
//! parts): two onesim instances are two clouds, each with its own oned, OneFlow and
//! OneGate. One `flower-reconcile run` is configured with site B (`[sites.b]`, its
//! endpoints and credentials file) and reads one spec: the SuperLink and one SuperNode in
//! the home site A, one SuperNode in site B (`supernodes.sites`). The controller derives
//! site B's part from site A's published `FL_ENDPOINT`/`FL_CA_CERT`, creates it through
//! site B's OneFlow (a SuperNode-only service), and a run needing two clients trains over
//! TLS with both. The remote node dials the address in the certificate's extra names (a
//! forwarder standing in for the hub in front of site A, as in `flower_multisite.rs`).
//! Node authentication is on (TLS, process runtime, persistent state) and nobody registers
//! a key by hand: the controller reads the remote node's `FL_NODE_PUBKEY` in site B's
//! observation and writes it, signed, as `FL_SITE_NODE_KEYS` onto site A's SuperLink, whose
//! agent registers it with Flower.
//!
//! Then every call the controller makes to site B fails (onesim's fault rules): its part is
//! held (no mutation, the status names the site as unreachable, the remote key stays at
//! home), the home site is unaffected; once the calls work again the site is observed and
//! its part is Ready as before, not re-created. Last, site B's SuperNode is powered off: its
//! part replaces it there, and the home SuperLink trades the failed node's key for the
//! replacement's.
//!
//! Needs `FLOWER_VENV` (e2e/test-all.sh creates it); fails without it.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::lab::RunController;
use common::multisite::{assert_nothing_left, attr, forwarder, vm_named, wait_for};
use flower_reconcile::demo::lab::{Lab, NETWORK, SUPERNODE_TEMPLATE};
use flower_reconcile::protocol as p;
use serde_json::Value;

const CLUSTER: &str = "twosites";
const PART: &str = "twosites--b";

fn spec_yaml(hub: &SocketAddr) -> String {
    let ip = hub.ip();
    common::lab::LabSpec {
        name: CLUSTER,
        count: 1,
        max: 1,
        tls: format!("    extraNames: [\"{ip}\"]\n"),
        supernodes: format!(
            "    failurePolicy:\n      heartbeatInterval: 2s\n    sites:\n    - site: b\n      \
             count: 1\n      max: 1\n      templates:\n        supernode: {SUPERNODE_TEMPLATE}\n      \
             network: {NETWORK}\n      superlinkAddress: \"{hub}\"\n"
        ),
        rounds: 2,
        min_clients: 2,
    }
    .yaml()
}

/// `run`'s config naming `lab` as site `b`.
fn site_config(lab: &Lab) -> String {
    let env: std::collections::BTreeMap<String, String> = lab.env().into_iter().collect();
    format!(
        "[sites.b]\nxmlrpc = \"{}\"\noneflow = \"{}\"\nauth-file = \"{}\"\n",
        env["ONE_XMLRPC"], env["ONEFLOW_URL"], env["ONE_AUTH"]
    )
}

/// `/api/v1/clusters` as JSON.
async fn clusters(ctl: &RunController) -> Option<Value> {
    reqwest::get(format!("{}/api/v1/clusters", ctl.base))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

fn is_ready(view: &Value) -> bool {
    view["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Site `site`'s view of part `name` in the API.
fn part_view<'a>(list: &'a Value, site: &str, name: &str) -> Option<&'a Value> {
    list["sites"][site]["clusters"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

async fn wait_api(
    ctl: &RunController,
    what: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Duration {
    let t = Instant::now();
    loop {
        if clusters(ctl).await.is_some_and(|l| done(&l)) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{what}: not within {limit:?}\n{:#}\n{}",
            clusters(ctl).await.unwrap_or_default(),
            ctl.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// onesim's control API of `lab`.
async fn control(lab: &Lab, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    common::onesim_env::control(lab.sim(), method, path, body).await
}

/// The controller's mutating calls (oned, OneFlow) in `lab`'s event log after `since`.
async fn controller_mutations(lab: &Lab, since: u64) -> Vec<String> {
    let log = control(lab, reqwest::Method::GET, "/events", None).await;
    log["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["seq"].as_u64().is_some_and(|s| s > since))
        .filter(|e| e["api"] != "onegate")
        .filter(|e| {
            e["agent"]
                .as_str()
                .is_some_and(|a| a.contains("flower-reconcile"))
        })
        .map(|e| format!("{} {} -> {}", e["api"], e["call"], e["result"]))
        .collect()
}

async fn last_seq(lab: &Lab) -> u64 {
    control(lab, reqwest::Method::GET, "/events", None).await["last_seq"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_the_controller_places_a_supernode_in_a_second_site_and_trains_across_both() {
    let work = tempfile::tempdir().expect("tempdir");
    let work = work.path();
    let (site_a, site_b, hub) = common::multisite::two_sites(work).await;
    let (app, specs, spec) = common::multisite::app_and_spec(work, &spec_yaml(&hub));
    let config = work.join("controller.toml");
    std::fs::write(&config, site_config(&site_b)).expect("config");
    let t0 = Instant::now();
    let ctl = RunController::start(
        &site_a,
        &[
            "--specs",
            specs.to_str().expect("utf-8"),
            "--config",
            config.to_str().expect("utf-8"),
        ],
        work,
    );
    // The hub forwards to wherever site A's SuperLink serves, once it says so.
    let t = Instant::now();
    let link = loop {
        if let Some(vm) = vm_named(&site_a, "superlink") {
            break vm;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "site A's SuperLink VM: not within 120 s\n{}",
            ctl.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let endpoint: SocketAddr = wait_for("site A's FL_ENDPOINT", Duration::from_secs(120), || {
        attr(&site_a, link, p::FL_ENDPOINT).and_then(|e| e.parse().ok())
    })
    .await;
    let _hub = forwarder(hub, endpoint).await;

    // Site B's part is created once site A's SuperLink serves: a SuperNode-only service.
    let remote = wait_for("site B's SuperNode VM", Duration::from_secs(180), || {
        vm_named(&site_b, "supernode")
    })
    .await;
    println!(
        "multisite timing: start → site B's SuperNode VM created: {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        vm_named(&site_b, "superlink").is_none(),
        "no SuperLink in site B"
    );
    // Node authentication: the controller hands the remote key to site A's SuperLink.
    let remote_key = wait_for(
        "the remote SuperNode's FL_NODE_PUBKEY",
        Duration::from_secs(60),
        || attr(&site_b, remote, p::FL_NODE_PUBKEY),
    )
    .await;
    let handed = Instant::now();
    wait_for(
        "the remote key in site A's SuperLink's FL_SITE_NODE_KEYS",
        Duration::from_secs(120),
        || {
            let set = attr(&site_a, link, p::FL_SITE_NODE_KEYS)?;
            let key = p::node_key::NodePublicKey::parse(&remote_key).ok()?;
            p::node_key::parse_set(&set)
                .ok()?
                .contains(&key)
                .then_some(())
        },
    )
    .await;
    println!(
        "multisite timing: remote key published → written onto the home SuperLink: {:.1}s",
        handed.elapsed().as_secs_f64()
    );
    let took = wait_api(
        &ctl,
        "home cluster and site B's part Ready",
        Duration::from_secs(240),
        |l| {
            let home = l["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["name"] == CLUSTER);
            home.is_some_and(is_ready) && part_view(l, "b", PART).is_some_and(is_ready)
        },
    )
    .await;
    println!(
        "multisite timing: start → home and site B's part Ready: {:.1}s (after the key: {:.1}s)",
        t0.elapsed().as_secs_f64(),
        took.as_secs_f64()
    );
    let remote_node: u64 = wait_for(
        "the remote SuperNode's Flower node id",
        Duration::from_secs(60),
        || attr(&site_b, remote, p::FL_FLOWER_NODE_ID).and_then(|id| id.parse().ok()),
    )
    .await;

    // A run that needs both SuperNodes trains.
    common::multisite::train_across(&site_a, CLUSTER, &app, &spec);
    let online = wait_for(
        "site A's SuperLink lists both nodes online",
        Duration::from_secs(30),
        || {
            let l = attr(&site_a, link, p::FL_NODES_ONLINE)?;
            let l = p::nodes::NodesOnline::parse(&l).ok()?;
            (l.ids.len() == 2).then_some(l)
        },
    )
    .await;
    assert!(online.ids.contains(&remote_node), "{online:?}");

    // Site B cannot be reached: every oned and OneFlow call fails (onesim's fault rules,
    // the controller's calls only; the VMs keep heartbeating to site B's OneGate). Its
    // part is held, the home site is unaffected.
    let since = last_seq(&site_b).await;
    for target in ["one.*", "system.*", "oneflow *"] {
        control(
            &site_b,
            reqwest::Method::POST,
            "/faults",
            Some(serde_json::json!({"target": target, "kind": "error", "message": "site B down", "status": 503})),
        )
        .await;
    }
    let took = wait_api(
        &ctl,
        "site B reported unreachable",
        Duration::from_secs(60),
        |l| l["sites"]["b"]["observeError"].is_string(),
    )
    .await;
    println!(
        "multisite timing: site B down → reported unreachable: {:.1}s",
        took.as_secs_f64()
    );
    // Several poll intervals (2 s) and a resync's worth of triggers.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let l = clusters(&ctl).await.expect("API");
    let home = l["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == CLUSTER)
        .expect("home cluster");
    assert!(is_ready(home), "the home site is unaffected: {home:#}");
    // The remote key is not revoked for a site the controller cannot see.
    let set = attr(&site_a, link, p::FL_SITE_NODE_KEYS).expect("FL_SITE_NODE_KEYS");
    let key = p::node_key::NodePublicKey::parse(&remote_key).expect("key");
    assert!(
        p::node_key::parse_set(&set).is_ok_and(|s| s.contains(&key)),
        "{set}"
    );
    assert!(
        l["clusters"].as_array().is_some_and(|c| c.len() == 1),
        "the home loop shows the home cluster only: {l:#}"
    );
    control(&site_b, reqwest::Method::DELETE, "/faults", None).await;
    let took = wait_api(
        &ctl,
        "site B observed again, its part Ready",
        Duration::from_secs(120),
        |l| {
            l["sites"]["b"]["observeError"].is_null()
                && part_view(l, "b", PART).is_some_and(is_ready)
        },
    )
    .await;
    println!(
        "multisite timing: site B back → part Ready: {:.1}s",
        took.as_secs_f64()
    );
    let changed = controller_mutations(&site_b, since).await;
    assert!(
        changed.is_empty(),
        "nothing was changed in site B while it was down or after it came back: {changed:#?}"
    );

    // Site B's SuperNode fails (oned reports it powered off): its part replaces it there,
    // the home SuperLink gets the new node's key, and the failed node's key goes from the
    // set once it has left the part — revoked, so a process started with it is refused.
    control(
        &site_b,
        reqwest::Method::POST,
        &format!("/vm/{remote}/state"),
        Some(serde_json::json!({"state": "POWEROFF"})),
    )
    .await;
    let t = Instant::now();
    let fresh = wait_for(
        "site B's replacement SuperNode VM",
        Duration::from_secs(120),
        || {
            site_b.sim().sim.with(|st| {
                st.vms
                    .values()
                    .find(|v| v.name.contains("supernode") && v.id != remote && v.is_running())
                    .map(|v| v.id)
            })
        },
    )
    .await;
    let fresh_key = wait_for(
        "the replacement's FL_NODE_PUBKEY",
        Duration::from_secs(60),
        || attr(&site_b, fresh, p::FL_NODE_PUBKEY),
    )
    .await;
    let (old, new) = (
        p::node_key::NodePublicKey::parse(&remote_key).expect("key"),
        p::node_key::NodePublicKey::parse(&fresh_key).expect("key"),
    );
    wait_for(
        "site A's SuperLink holds the new remote key and not the failed node's",
        Duration::from_secs(120),
        || {
            let set = p::node_key::parse_set(&attr(&site_a, link, p::FL_SITE_NODE_KEYS)?).ok()?;
            (set.contains(&new) && !set.contains(&old)).then_some(())
        },
    )
    .await;
    wait_api(
        &ctl,
        "site B's part Ready on its replacement",
        Duration::from_secs(120),
        |l| part_view(l, "b", PART).is_some_and(is_ready),
    )
    .await;
    println!(
        "multisite timing: site B's node powered off → replacement Ready with its key at home: {:.1}s",
        t.elapsed().as_secs_f64()
    );
    ctl.stop();
    site_b.shutdown().await;
    site_a.shutdown().await;
    assert_nothing_left(work);
}
