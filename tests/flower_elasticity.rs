//! Elasticity that works (#18 item 5), end to end on real Flower: a cluster whose SuperNode
//! role carries the example's kind of policy (`FL_CLIENT_STATUS > 1.5` up, `< 1.2` down) is
//! created by the real `flower-reconcile run`; a training run through `submit` makes the
//! SuperNode's agent publish `FL_CLIENT_STATUS=2`, onesim's OneFlow autoscaler scales the
//! role up; after the run the SuperNodes go idle and it scales back down — and the
//! controller makes no mutation in between (onesim's event log names every caller).
//!
//! Prints the figures `elasticity timing: training start → scale-up` (from the first
//! `FL_CLIENT_STATUS=2` PUT) and `training end → scale-down` (from the SuperLink's
//! `FL_TRAINING_ACTIVE=0`; it includes the agent's 10 s idle grace). Kept short for the test
//! command: 1 s autoscaler interval and periods, 2 s cooldown, 4 tiny rounds (about 50 s).
//! Needs `FLOWER_VENV` (e2e/test-all.sh creates it) runnable by the Flower user (UID 49999);
//! fails without it.

mod common;

use std::time::{Duration, Instant};

use common::lab::{LabSpec, RunController};
use flower_reconcile::api::{ConditionStatus, ConditionType};
use flower_reconcile::demo::lab::Lab;
use flower_reconcile::runtime::status::ClusterView;
use serde_json::Value;

const CLUSTER: &str = "elastic";

/// Up `FL_CLIENT_STATUS > 1.5` (1 s period), down `< 1.2` (2 periods), 2 s cooldown.
fn spec_yaml() -> String {
    LabSpec {
        name: CLUSTER,
        count: 1,
        max: 2,
        tls: String::new(),
        supernodes: "    elasticity:
      cooldown: 2s
      policies:
        - type: CHANGE
          adjust: 1
          expression: \"FL_CLIENT_STATUS > 1.5\"
          periodNumber: 1
          period: 1s
        - type: CHANGE
          adjust: -1
          expression: \"FL_CLIENT_STATUS < 1.2\"
          periodNumber: 2
          period: 1s
    failurePolicy:
      heartbeatInterval: 2s
"
        .into(),
        rounds: 4,
        min_clients: 1,
    }
    .yaml()
}

async fn events(lab: &Lab, since: u64) -> Vec<Value> {
    let v = common::onesim_get(&lab.urls.control, &format!("/events?since={since}")).await;
    v["events"].as_array().cloned().unwrap_or_default()
}

/// The value a successful OneGate `PUT /vm` event set `key` to, if it set it. The event
/// carries the raw request body: the form `data=<template lines>&type=1` the agents send
/// (`one::onegate::OneGateClient::update_vm`), each line `KEY=VALUE` or `KEY="VALUE"`.
fn gate_value(e: &Value, key: &str) -> Option<String> {
    if e["api"] != "onegate" || e["result"] != "200" {
        return None;
    }
    let body = e["args"]["body"].as_str()?;
    let form: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    if !form.iter().any(|(k, v)| k == "type" && v == "1") {
        return None;
    }
    let (_, data) = form.iter().find(|(k, _)| k == "data")?;
    data.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

fn autoscaled_to(e: &Value, card: i64) -> bool {
    e["agent"] == onesim::AUTOSCALER_AGENT
        && e["result"] == "ok"
        && e["args"]["role_name"] == "supernode"
        && e["args"]["cardinality"] == card
}

fn is_controller_mutation(e: &Value) -> bool {
    e["agent"]
        .as_str()
        .is_some_and(|a| a.starts_with("flower-reconcile"))
        && ((e["api"] == "oneflow" && e["call"].as_str().is_some_and(|c| !c.starts_with("GET ")))
            || e["api"] == "xmlrpc")
}

fn ms(e: &Value) -> u64 {
    e["time_ms"].as_u64().expect("event time")
}

fn ready(v: &ClusterView) -> bool {
    v.status.nodes.ready >= 1
        && v.status
            .conditions
            .iter()
            .any(|c| c.kind == ConditionType::Ready && c.status == ConditionStatus::True)
}

async fn wait_event(
    lab: &Lab,
    since: u64,
    what: &str,
    limit: Duration,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(e) = events(lab, since).await.into_iter().find(|e| f(e)) {
            return e;
        }
        assert!(Instant::now() < deadline, "no {what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_elasticity_scales_up_on_training_and_down_after_without_the_controller() {
    let work = tempfile::tempdir().expect("tempdir");
    let work = work.path();
    let mut cfg = common::lab::config(
        work,
        common::lab::Runtime::Process,
        Duration::from_millis(200),
    );
    cfg.autoscaler_interval = Duration::from_secs(1);
    flower_reconcile::one::http::ensure_crypto_provider();
    let lab = Lab::start(cfg).await.expect("lab starts");
    let app = common::lab::write_app(work);
    let specs = work.join("specs");
    std::fs::create_dir_all(&specs).expect("specs dir");
    let spec = specs.join("elastic.yaml");
    std::fs::write(&spec, spec_yaml()).expect("spec");
    let ctl = RunController::start(&lab, &["--specs", specs.to_str().expect("utf-8")], work);

    let took = ctl
        .wait_cluster(CLUSTER, Duration::from_secs(180), ready)
        .await;
    println!(
        "elasticity timing: create → Ready: {:.1}s",
        took.as_secs_f64()
    );
    // Nothing scales while nothing trains: the policies see FL_CLIENT_STATUS 1.
    let before = common::onesim_get(&lab.urls.control, "/events?since=0").await["last_seq"]
        .as_u64()
        .unwrap_or(0);

    let mut cmd = common::lab::submit(&lab, CLUSTER, &app, &spec);
    let training = std::thread::spawn(move || cmd.output().expect("submit runs"));
    let up = wait_event(
        &lab,
        before,
        "scale-up by the autoscaler",
        Duration::from_secs(120),
        |e| autoscaled_to(e, 2),
    )
    .await;
    let out = tokio::task::spawn_blocking(move || training.join().expect("submit thread"))
        .await
        .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "submit failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("submit prints JSON");
    assert_eq!(report["status"], "completed", "{report}");

    let all = events(&lab, before).await;
    let started = all
        .iter()
        .find(|e| gate_value(e, "FL_CLIENT_STATUS").as_deref() == Some("2"))
        .expect("a SuperNode published FL_CLIENT_STATUS=2");
    assert!(ms(&up) >= ms(started), "the scale-up follows the training");
    let ended = wait_event(
        &lab,
        before,
        "FL_TRAINING_ACTIVE=0 after the run",
        Duration::from_secs(30),
        |e| ms(e) > ms(started) && gate_value(e, "FL_TRAINING_ACTIVE").as_deref() == Some("0"),
    )
    .await;
    // The status is stable across the run (a message in hand, or answered less than the
    // agent's idle grace ago): the SuperNode that started training did not report idle
    // before the run ended, which would have let the role scale down mid-run.
    let flapped: Vec<Value> = events(&lab, before)
        .await
        .into_iter()
        .filter(|e| e["args"]["vmid"] == started["args"]["vmid"])
        .filter(|e| ms(e) > ms(started) && ms(e) < ms(&ended))
        .filter(|e| gate_value(e, "FL_CLIENT_STATUS").as_deref() == Some("1"))
        .collect();
    assert!(
        flapped.is_empty(),
        "FL_CLIENT_STATUS flapped during the run: {flapped:#?}"
    );
    let down = wait_event(
        &lab,
        up["seq"].as_u64().unwrap_or(before),
        "scale-down by the autoscaler",
        Duration::from_secs(120),
        |e| autoscaled_to(e, 1),
    )
    .await;
    assert!(
        ms(&down) > ms(&ended),
        "the scale-down follows the end of training"
    );
    // The controller made no mutation from before the run to the scale-down.
    let between: Vec<Value> = events(&lab, before)
        .await
        .into_iter()
        .filter(|e| e["seq"].as_u64() <= down["seq"].as_u64())
        .filter(is_controller_mutation)
        .collect();
    assert!(between.is_empty(), "the controller mutated: {between:#?}");
    println!(
        "elasticity timing: training start → scale-up: {:.1}s",
        (ms(&up) - ms(started)) as f64 / 1000.0
    );
    println!(
        "elasticity timing: training end → scale-down: {:.1}s",
        (ms(&down) - ms(&ended)) as f64 / 1000.0
    );
    // And the controller still calls the cluster Ready with OneFlow's count.
    ctl.wait_cluster(CLUSTER, Duration::from_secs(120), ready)
        .await;
    ctl.stop();
    lab.shutdown().await;
}
