//! #12 item 4c with real Flower: a stale heartbeat is corroborated with the SuperLink's
//! own state before a SuperNode is replaced.
//!
//! The whole chain is real: onesim boots each VM as a `flower-agent run` process running
//! Flower 1.25 from `FLOWER_VENV` (the lab of the demo and the e2e), the controller is the
//! `flower-reconcile run` binary. SuperNode agents publish their Flower node id
//! (`FL_FLOWER_NODE_ID`), the SuperLink agent the ids its SQLite state holds online
//! (`FL_NODES_ONLINE`). Shown here, from onesim's event log:
//! - a SuperNode cut off from OneGate (its heartbeat goes stale, Flower still talks to it)
//!   is never terminated, and the hold is reported (`safety_holds{reason=flower_sees_online}`);
//! - a SuperNode whose processes die is terminated, and only after the SuperLink's list
//!   dropped it (Flower marks a silent node offline within 2 × its 30 s heartbeat).

mod common;

use std::time::{Duration, Instant};

use common::lab::{RunController, Runtime};
use common::wait_for;
use flower_reconcile::demo::lab::Lab;
use flower_reconcile::protocol as p;
use flower_reconcile::protocol::nodes::NodesOnline;
use serde_json::{json, Value};

const SPEC: &str = "apiVersion: flower.opennebula.io/v1alpha1
kind: FlowerCluster
metadata:
  name: corroborate
spec:
  opennebula:
    templates:
      superlink: flower-superlink
      supernode: flower-supernode
    network: flower-net
  tls:
    enabled: false
  supernodes:
    count: 3
    failurePolicy:
      gracePeriod: 10s
      heartbeatInterval: 2s
";

fn attr(lab: &Lab, vm: u64, key: &str) -> Option<String> {
    lab.sim().sim.with(|st| {
        st.vms
            .get(&(vm as i64))
            .and_then(|v| v.user_template.get(key).map(str::to_string))
    })
}

fn flower_id(lab: &Lab, vm: u64) -> Option<u64> {
    attr(lab, vm, p::FL_FLOWER_NODE_ID).and_then(|v| p::nodes::parse_node_id(&v).ok())
}

fn online_list(lab: &Lab, vm: u64) -> Option<NodesOnline> {
    attr(lab, vm, p::FL_NODES_ONLINE).and_then(|v| NodesOnline::parse(&v).ok())
}

/// The `FL_NODES_ONLINE` a OneGate `PUT /vm` event carried, if any.
fn list_in(e: &Value) -> Option<NodesOnline> {
    let body = e["args"]["body"].as_str()?;
    let data = url::form_urlencoded::parse(body.as_bytes())
        .find(|(k, _)| k == "data")?
        .1
        .into_owned();
    let value = data
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{}=", p::FL_NODES_ONLINE)))?;
    NodesOnline::parse(value.trim_matches('"')).ok()
}

async fn events(lab: &Lab, since: u64) -> Vec<Value> {
    let v = common::onesim_get(&lab.urls.control, &format!("/events?since={since}")).await;
    v["events"].as_array().cloned().unwrap_or_default()
}

fn is_terminate(e: &Value) -> bool {
    e["call"] == "one.vm.action" && e["args"].to_string().contains("terminate")
}

async fn control(lab: &Lab, method: reqwest::Method, path: &str, body: Option<Value>) {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", lab.urls.control));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("onesim control API");
    assert!(r.status().is_success(), "{path}: {}", r.status());
}

/// How many reconciles held a replacement because Flower holds the node online.
async fn flower_holds(ctl: &RunController) -> u64 {
    ctl.metrics()
        .await
        .lines()
        .find_map(|l| {
            l.strip_prefix("flower_reconcile_safety_holds_total{reason=\"flower_sees_online\"} ")
        })
        .and_then(|n| n.trim().parse::<f64>().ok())
        .map_or(0, |n| n as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_corroborates_stale_heartbeats_a_cut_off_supernode_stays_a_dead_one_goes() {
    let dir = tempfile::Builder::new()
        .prefix("fr-corroborate-")
        .tempdir()
        .unwrap();
    let lab = common::lab::start(dir.path(), Runtime::Process, Duration::from_millis(100)).await;
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(specs.join("corroborate.yaml"), SPEC).unwrap();
    common::apply_and_wait(lab.env(), &specs, "180s");

    let (mut link, mut nodes) = (None, Vec::new());
    for (id, role) in lab.sim().sim.with(|st| {
        st.vms
            .iter()
            .map(|(id, v)| {
                (
                    *id as u64,
                    v.user_template.get("ROLE_NAME").map(str::to_string),
                )
            })
            .collect::<Vec<_>>()
    }) {
        match role.as_deref() {
            Some("superlink") => link = Some(id),
            Some("supernode") => nodes.push(id),
            other => panic!("VM {id} has role {other:?}"),
        }
    }
    let link = link.expect("a SuperLink VM");
    assert_eq!(nodes.len(), 3);

    // Real Flower: every SuperNode publishes the id the SuperLink gave it, and the
    // SuperLink's state holds exactly those online.
    wait_for(
        "each SuperNode's Flower node id online in the SuperLink's list",
        Duration::from_secs(120),
        || {
            let ids: Option<Vec<u64>> = nodes.iter().map(|n| flower_id(&lab, *n)).collect();
            match (ids, online_list(&lab, link)) {
                (Some(ids), Some(list)) => list.ids == ids.into_iter().collect(),
                _ => false,
            }
        },
    )
    .await;
    let (cut, dead) = (nodes[0], nodes[1]);
    let dead_id = flower_id(&lab, dead).unwrap();

    let ctl = RunController::start(
        &lab,
        &["--specs", specs.to_str().expect("utf-8 path")],
        dir.path(),
    );
    let seq0 = common::onesim_get(&lab.urls.control, "/events?since=0").await["last_seq"]
        .as_u64()
        .unwrap_or(0);

    // 1. One SuperNode loses OneGate (its heartbeat PUTs fail) while Flower still talks
    //    to it. Wait until the controller held its replacement three times for that
    //    reason (its heartbeat is then past the 10 s grace, and it was looked at again).
    control(
        &lab,
        reqwest::Method::POST,
        "/faults",
        Some(json!({"target": "onegate PUT /vm", "kind": "error", "status": 503, "vm": cut})),
    )
    .await;
    let started = Instant::now();
    let mut holds = 0;
    while holds < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no corroboration hold reported; controller log:\n{}",
            ctl.log_tail(200)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        holds = flower_holds(&ctl).await;
    }
    println!(
        "corroboration: cut-off SuperNode held {holds} times within {:?}",
        started.elapsed()
    );
    let terminated: Vec<Value> = events(&lab, seq0)
        .await
        .into_iter()
        .filter(is_terminate)
        .collect();
    assert!(
        terminated.is_empty(),
        "a SuperNode Flower holds online was terminated: {terminated:?}"
    );
    control(&lab, reqwest::Method::DELETE, "/faults", None).await;

    // 2. Another SuperNode really dies (its processes are killed, the VM stays RUNNING).
    let seq1 = common::onesim_get(&lab.urls.control, "/events?since=0").await["last_seq"]
        .as_u64()
        .unwrap_or(0);
    let crashed = Instant::now();
    control(
        &lab,
        reqwest::Method::POST,
        &format!("/vm/{dead}/crash"),
        None,
    )
    .await;
    let mut term = None;
    while term.is_none() {
        assert!(
            crashed.elapsed() < Duration::from_secs(180),
            "the dead SuperNode was never terminated; controller log:\n{}",
            ctl.log_tail(200)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        term = events(&lab, seq1).await.into_iter().find(is_terminate);
    }
    let term = term.unwrap();
    println!(
        "corroboration: crash → terminated after {:?}",
        crashed.elapsed()
    );
    assert!(
        term["args"].to_string().contains(&format!("{dead}")),
        "the dead VM is the one terminated: {term}"
    );
    let all: Vec<Value> = events(&lab, seq0).await;
    let terminates: Vec<&Value> = all.iter().filter(|e| is_terminate(e)).collect();
    assert_eq!(
        terminates.len(),
        1,
        "only the dead VM is terminated: {terminates:?}"
    );
    // The SuperLink's lists after the crash: Flower held the dead node online for a while,
    // and the terminate came only after a list without it.
    let link_vmid = link.to_string();
    let link_lists: Vec<(u64, NodesOnline)> = all
        .iter()
        .filter(|e| {
            e["seq"].as_u64() > Some(seq1)
                && e["call"] == "PUT /vm"
                && e["args"]["vmid"].as_str() == Some(link_vmid.as_str())
        })
        .filter_map(|e| Some((e["seq"].as_u64()?, list_in(e)?)))
        .collect();
    let dropped = link_lists
        .iter()
        .find(|(_, l)| !l.ids.contains(&dead_id))
        .map(|(seq, _)| *seq)
        .expect("the SuperLink's list dropped the dead node");
    let term_seq = term["seq"].as_u64().unwrap();
    assert!(
        dropped < term_seq,
        "terminated (event {term_seq}) before Flower dropped the node (event {dropped})"
    );
    let held = link_lists
        .iter()
        .filter(|(seq, l)| *seq < dropped && l.ids.contains(&dead_id))
        .count();
    println!("corroboration: the SuperLink listed the dead node online in {held} heartbeat(s) after the crash");
    lab.shutdown().await;
}
