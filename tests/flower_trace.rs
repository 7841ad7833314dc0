//! #16 acceptance: one trace for a cluster creation, from the controller's reconcile to
//! Flower serving in the VMs. `flower-reconcile run` exports its spans to an OTLP/HTTP
//! receiver in the test and hands the VMs `ONEAPP_FL_TRACEPARENT` and
//! `--vm-otlp-endpoint`; onesim's process runtime boots each VM as this build's real
//! `flower-agent` running real Flower, and the agents export their spans to the same
//! receiver. Under one trace id the receiver gets the reconcile root span, the OneFlow
//! instantiate call, and each agent's context, TLS and Flower-start spans under the
//! SuperLink's and the SuperNodes' service names. JSON log lines, the controller's and the
//! agents', carry the ids of the spans they were logged in.
//!
//! Needs the pinned virtualenv (`FLOWER_VENV`); without it the test fails rather than
//! passing vacuously.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::lab::{RunController, Runtime};
use common::otlp::{hex, receiver, spans, text};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;

fn spec() -> String {
    format!(
        "apiVersion: {}\nkind: {}\nmetadata:\n  name: traced\nspec:\n  opennebula:\n    templates:\n      superlink: flower-superlink\n      supernode: flower-supernode\n    network: flower-net\n  supernodes:\n    count: 2\n  logging:\n    format: json\n",
        flower_reconcile::api::API_VERSION,
        flower_reconcile::api::KIND,
    )
}

/// The JSON lines of `text` that carry `trace_id`.
fn traced_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("trace_id").is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_one_trace_from_the_reconcile_to_flower_serving_in_the_vms() {
    let dir = tempfile::Builder::new()
        .prefix("fr-trace-")
        .tempdir()
        .unwrap();
    let (otlp, got) = receiver().await;
    let lab = common::lab::start(dir.path(), Runtime::Process, Duration::from_millis(100)).await;
    let specs = dir.path().join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(specs.join("traced.yaml"), spec()).unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let t0 = std::time::Instant::now();
    let controller =
        RunController::start_with(&lab, &["--specs", specs.to_str().unwrap()], &work, |cmd| {
            cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
                .env("OTEL_BSP_SCHEDULE_DELAY", "200")
                .env("FLOWER_RECONCILE_VM_OTLP_ENDPOINT", &otlp)
                .env("FLOWER_RECONCILE_LOG_FORMAT", "json");
        });

    // Every agent span needed is in once both SuperNodes serve (their export is batched).
    let by_service = |name: &str| -> Vec<Span> {
        spans(&got)
            .into_iter()
            .filter(|(res, _)| text(res, "service.name").as_deref() == Some(name))
            .map(|(_, s)| s)
            .collect()
    };
    let count = |service: &str, span: &str| {
        by_service(service)
            .iter()
            .filter(|s| s.name == span)
            .count()
    };
    let waited = common::wait_for(
        "the SuperLink serving and both SuperNodes registered, in exported spans",
        Duration::from_secs(240),
        || {
            count("flower-superlink-agent", "superlink serving") == 1
                && count("flower-supernode-agent", "supernode registered") == 2
        },
    )
    .await;
    let all = spans(&got);
    let vm_dirs = common::vm_dirs(&lab.urls.control).await;
    let guest_logs = || {
        vm_dirs
            .iter()
            .map(|(id, d)| {
                let log = std::fs::read_to_string(d.join("guest.log")).unwrap_or_default();
                format!("--- VM {id} agent:\n{log}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    println!(
        "trace: {} spans received; Flower serving on every VM {:.1} s after the controller started ({:.1} s waited for the spans)",
        all.len(),
        t0.elapsed().as_secs_f64(),
        waited.as_secs_f64()
    );

    // The OneFlow instantiate call, and the trace it is in.
    let instantiate: Vec<&(Vec<KeyValue>, Span)> = all
        .iter()
        .filter(|(_, s)| s.name == "POST /service_template/:id/action")
        .collect();
    assert_eq!(
        instantiate.len(),
        1,
        "one instantiate\n{}",
        controller.log_tail(40)
    );
    let (ctl_res, inst) = instantiate[0];
    assert_eq!(
        text(ctl_res, "service.name").as_deref(),
        Some("flower-reconcile")
    );
    let trace = inst.trace_id.clone();
    let in_trace: Vec<&(Vec<KeyValue>, Span)> =
        all.iter().filter(|(_, s)| s.trace_id == trace).collect();
    let by_id: BTreeMap<Vec<u8>, &Span> = in_trace
        .iter()
        .map(|(_, s)| (s.span_id.clone(), s))
        .collect();
    // Up from the instantiate call to the root: the create's apply span, the reconcile.
    let mut chain = vec![inst.name.clone()];
    let mut at = inst;
    while !at.parent_span_id.is_empty() {
        at = by_id
            .get(&at.parent_span_id)
            .unwrap_or_else(|| panic!("{}: its parent was exported", at.name));
        chain.push(at.name.clone());
    }
    assert_eq!(
        chain,
        ["POST /service_template/:id/action", "apply", "reconcile"],
        "instantiate → apply → reconcile (root)"
    );
    let apply = by_id
        .values()
        .find(|s| s.name == "apply" && text(&s.attributes, "action").as_deref() == Some("create"))
        .expect("the create's apply span");
    assert_eq!(
        text(&at.attributes, "cluster").as_deref(),
        Some("traced"),
        "the reconcile root span names the cluster"
    );

    // Each agent's stages, in the same trace, children of the create (the span that sent
    // their context), under their role's service name.
    let agent_spans = |service: &str| -> BTreeMap<String, Vec<(String, Span)>> {
        let mut m: BTreeMap<String, Vec<(String, Span)>> = BTreeMap::new();
        for (res, s) in &all {
            if text(res, "service.name").as_deref() == Some(service) {
                let vm = text(res, "service.instance.id").expect("service.instance.id");
                m.entry(vm).or_default().push((s.name.clone(), s.clone()));
            }
        }
        m
    };
    let link = agent_spans("flower-superlink-agent");
    let nodes = agent_spans("flower-supernode-agent");
    assert_eq!(link.len(), 1, "one SuperLink VM: {:?}", link.keys());
    assert_eq!(nodes.len(), 2, "two SuperNode VMs: {:?}", nodes.keys());
    let want_link = [
        "agent context",
        "agent tls",
        "flower start",
        "superlink serving",
    ];
    let want_node = [
        "agent context",
        "agent discovery",
        "agent tls",
        "flower start",
        "supernode registered",
    ];
    for (vm, exported, want) in link
        .iter()
        .map(|(vm, s)| (vm, s, &want_link[..]))
        .chain(nodes.iter().map(|(vm, s)| (vm, s, &want_node[..])))
    {
        // The stages, and the OneGate calls made inside them: nothing else.
        let (stages, calls): (Vec<_>, Vec<_>) = exported
            .iter()
            .cloned()
            .partition(|(n, _)| flower_reconcile::agent::trace::STAGES.contains(&n.as_str()));
        let mut names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        let mut want = want.to_vec();
        want.sort_unstable();
        assert_eq!(names, want, "{vm}: its stages, once each");
        for (name, call) in &calls {
            assert!(
                text(&call.attributes, "url.template")
                    .is_some_and(|t| t.starts_with("/vm") || t.starts_with("/service")),
                "{vm}: {name} is a OneGate call"
            );
            assert!(
                stages.iter().any(|(_, s)| s.span_id == call.parent_span_id),
                "{vm}: {name} was made inside a stage"
            );
        }
        for (name, s) in &stages {
            assert_eq!(
                hex(&s.trace_id),
                hex(&trace),
                "{vm} {name}: the cluster's trace"
            );
            assert_eq!(
                hex(&s.parent_span_id),
                hex(&apply.span_id),
                "{vm} {name}: a child of the create"
            );
            assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
        }
        let start = |n: &str| {
            stages
                .iter()
                .find(|(name, _)| name == n)
                .map(|(_, s)| s.start_time_unix_nano)
                .unwrap()
        };
        assert!(
            start("agent context") <= start("flower start"),
            "{vm}: the context is read before Flower starts"
        );
        // The VM booted after the create was sent.
        assert!(start("agent context") >= inst.start_time_unix_nano, "{vm}");
    }
    let secs = |ns: u64| ns as f64 / 1e9;
    let serving = nodes
        .values()
        .flatten()
        .chain(link.values().flatten())
        .filter(|(n, _)| n.ends_with("serving") || n.ends_with("registered"))
        .map(|(_, s)| s.end_time_unix_nano)
        .max()
        .unwrap();
    println!(
        "trace {}: reconcile start → last agent stage done {:.1} s; agent context → Flower healthy on the SuperLink {:.1} s",
        hex(&trace),
        secs(serving - at.start_time_unix_nano),
        {
            let st = &link.values().next().unwrap();
            let f = |n: &str| st.iter().find(|(m, _)| m == n).unwrap().1.clone();
            secs(f("flower start").end_time_unix_nano - f("agent context").start_time_unix_nano)
        }
    );

    // JSON logs carry the ids: the controller's line about the instantiate, logged in the
    // create's apply span, and each agent's lines in its stages.
    let ctl_log = std::fs::read_to_string(work.join("controller.log")).unwrap();
    let instantiated = traced_lines(&ctl_log)
        .into_iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("instantiated service"))
        })
        .unwrap_or_else(|| panic!("the instantiate log line with a trace id:\n{ctl_log}"));
    assert_eq!(instantiated["trace_id"], hex(&trace).as_str());
    assert_eq!(instantiated["span_id"], hex(&apply.span_id).as_str());
    let logs = guest_logs();
    let agent_traced = traced_lines(&logs);
    assert!(
        agent_traced
            .iter()
            .any(|l| l["fields"]["message"] == "TLS material ready"),
        "the SuperLink's TLS line carries trace ids:\n{logs}"
    );
    for l in &agent_traced {
        assert_eq!(l["trace_id"], hex(&trace).as_str(), "{l}");
        let span = l["span_id"].as_str().unwrap();
        assert!(
            all.iter().any(|(_, s)| hex(&s.span_id) == span),
            "an agent line names an exported span: {l}"
        );
    }

    drop(controller);
    lab.shutdown().await;
    common::assert_no_process_mentioning(&dir.path().display().to_string());
}
