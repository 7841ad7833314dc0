//! The controller as Prometheus' source of targets, against onesim: `/api/v1/sd` lists
//! the agents' metrics endpoints of the observed clusters (oned's NIC addresses, the
//! applied spec's port), and `/metrics` is OpenMetrics with trace-id exemplars.

mod common;

use std::sync::Arc;
use std::time::Duration;

use flower_reconcile::one::ClientsBackend;
use flower_reconcile::reconciler::{Context, ReconcileOptions};
use flower_reconcile::service::config::RunSettings;
use flower_reconcile::source::SourceArgs;
use serde_json::{json, Value};

use common::onesim_env::{fixtures, publish_agent_attributes, spec_yaml, start_onesim, Served};

const PASSWORD: &str = "monitoring-pw";

#[tokio::test]
async fn service_discovery_lists_the_superlink_metrics_endpoint_from_the_observation() {
    // As `run` sets it up: every reconcile gets a trace id, exported or not.
    let _telemetry = flower_reconcile::telemetry::init(
        "flower-reconcile",
        flower_reconcile::telemetry::LogFormat::Text,
        "warn",
        flower_reconcile::telemetry::Traces::Always,
    )
    .expect("telemetry");
    let (sim, one) = start_onesim(PASSWORD, |_| {}).await;
    let backend = Arc::new(ClientsBackend::new(&one).expect("clients"));
    fixtures(&backend.oned).await;
    let ctx = Context::connect(backend.clone(), "ctl-sd", ReconcileOptions::default())
        .await
        .expect("context");
    let specs = tempfile::tempdir().expect("specs");
    // `metrics` on: a target per SuperLink; `plain` has none.
    let metrics = "  superlink:\n    metrics:\n      enabled: true\n      port: 9200\n";
    std::fs::write(
        specs.path().join("watched.yaml"),
        spec_yaml("watched", 2) + metrics,
    )
    .expect("spec");
    std::fs::write(specs.path().join("plain.yaml"), spec_yaml("plain", 1)).expect("spec");
    let svc = Served::start(
        &ctx,
        RunSettings {
            source: SourceArgs {
                specs: Some(specs.path().to_path_buf()),
                ..SourceArgs::default()
            },
            ..RunSettings::default()
        },
    )
    .await;

    let mut sd = Value::Null;
    for _ in 0..300 {
        let beat = chrono::Utc::now().to_rfc3339();
        sim.sim.with(|st| publish_agent_attributes(st, &beat));
        let (code, body) = svc.get("/api/v1/sd").await;
        if code == 200 {
            sd = serde_json::from_str(&body).expect("http_sd JSON");
            if sd.as_array().is_some_and(|a| !a.is_empty()) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // What oned says: the SuperLink VM of `watched`'s service and its NIC address.
    let (service_id, superlink_vm) = sim.sim.with(|st| {
        let doc = st
            .docs
            .values()
            .find(|d| d.name == "watched" && d.doc_type == onesim::flow::SERVICE)
            .expect("the service");
        let vm = st
            .vms
            .values()
            .find(|v| {
                v.user_template.get("SERVICE_ID") == Some(doc.id.to_string().as_str())
                    && v.user_template.get("ROLE_NAME") == Some("superlink")
            })
            .expect("the SuperLink VM");
        (doc.id, vm.id)
    });
    let vm = backend.oned.vm_info(superlink_vm).await.expect("vm info");
    let ip = vm.addresses().first().copied().expect("a NIC address");
    assert_eq!(
        sd,
        json!([{
            "targets": [format!("{ip}:9200")],
            "labels": {
                "cluster": "watched",
                "role": "superlink",
                "service_id": service_id.to_string(),
                "vm_id": superlink_vm.to_string(),
            }
        }])
    );

    // Every reconcile's duration sample leads to its trace.
    let (_, text) = svc.get("/metrics").await;
    assert!(
        text.lines().any(
            |l| l.starts_with("flower_reconcile_reconcile_duration_seconds_bucket")
                && l.contains(" # {trace_id=\"")
        ),
        "{text}"
    );
    svc.stop().await;
}
