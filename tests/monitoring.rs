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

/// `manifests/monitoring/` and a file under it.
fn monitoring(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/monitoring")
        .join(path)
}

/// `promtool ARGS` in `manifests/monitoring/prometheus`; its output, or a panic with it.
fn promtool(args: &[&str]) -> String {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(monitoring("prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e} (install Debian's `prometheus` package, as e2e/test-all.sh does)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_prometheus_configuration_and_alert_rules_pass_promtool_and_their_unit_tests() {
    let config = promtool(&["check", "config", "prometheus.yml"]);
    assert!(config.contains("SUCCESS: 8 rules found"), "{config}");
    let rules = promtool(&["check", "rules", "alerts.yml"]);
    assert!(rules.contains("SUCCESS: 8 rules found"), "{rules}");
    let tests = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(tests.contains("SUCCESS"), "{tests}");
    println!("promtool: configuration, 8 alert rules and their unit tests pass");
}

/// The training metrics the SuperLink agent is to serve (issue #16), with the series
/// names Prometheus stores (`_total` for counters, `_bucket`/`_sum`/`_count` for the
/// histogram).
const FL_SERIES: &[&str] = &[
    "fl_round_current",
    "fl_round_total",
    "fl_round_duration_seconds_bucket",
    "fl_round_duration_seconds_sum",
    "fl_round_duration_seconds_count",
    "fl_aggregated_loss",
    "fl_aggregated_accuracy",
    "fl_clients_connected",
    "fl_clients_selected",
    "fl_clients_responded",
    "fl_clients_failed_total",
    "fl_checkpoint_saved_total",
    "fl_training_status",
];

/// What NVIDIA's DCGM exporter serves and the GPU dashboard and alerts use.
const DCGM_SERIES: &[&str] = &[
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_XID_ERRORS",
];

/// The series the controller's /metrics holds (every family, with its suffixes).
fn controller_series() -> std::collections::BTreeSet<String> {
    let m = flower_reconcile::telemetry::metrics::Metrics::new();
    m.reconciled(true, Duration::from_millis(1), None);
    m.error("observe");
    m.safety_hold("stale_view");
    m.set_revision("dir", "r");
    let stats = flower_reconcile::one::ApiStats::new();
    stats.record(
        "GET /service",
        flower_reconcile::one::Outcome::Ok,
        Duration::from_millis(1),
    );
    m.sync_api(&stats);
    m.encode()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn dashboards_and_alerts_query_only_series_that_exist_and_show_every_controller_metric() {
    let controller = controller_series();
    let known: std::collections::BTreeSet<String> = FL_SERIES
        .iter()
        .chain(DCGM_SERIES)
        .map(|s| s.to_string())
        .chain(controller.iter().cloned())
        .collect();
    let series = regex::Regex::new(r"\b(fl_[a-z_]+|DCGM_FI_[A-Z_]+|flower_reconcile_[a-z_]+)\b")
        .expect("regex");
    let mut unknown = Vec::new();
    let mut check = |file: &str, expr: &str| {
        for m in series.find_iter(expr) {
            if !known.contains(m.as_str()) {
                unknown.push(format!("{file}: {}", m.as_str()));
            }
        }
    };
    let alerts = std::fs::read_to_string(monitoring("prometheus/alerts.yml")).expect("alerts");
    for l in alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
    {
        check("alerts.yml", l);
    }
    let mut dashboards = 0;
    let mut on_controller_dashboard = String::new();
    for entry in std::fs::read_dir(monitoring("grafana/dashboards")).expect("dashboards") {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(d["uid"].is_string() && d["title"].is_string(), "{name}");
        let panels = d["panels"].as_array().expect("panels");
        assert!(!panels.is_empty(), "{name}");
        for p in panels {
            assert_eq!(
                p["datasource"]["uid"], "prometheus",
                "{name}: {}",
                p["title"]
            );
            for t in p["targets"].as_array().expect("targets") {
                let expr = t["expr"].as_str().expect("expr");
                check(&name, expr);
                if name == "flower-reconcile-controller.json" {
                    on_controller_dashboard += expr;
                }
            }
        }
        dashboards += 1;
    }
    assert_eq!(dashboards, 4, "training, clients, GPU and controller");
    assert_eq!(unknown, Vec::<String>::new(), "series nothing serves");
    // Every controller family (a histogram by its buckets) is on its dashboard.
    let missing: Vec<_> = controller
        .iter()
        .filter(|s| !s.ends_with("_sum") && !s.ends_with("_count"))
        .filter(|s| !on_controller_dashboard.contains(s.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "not on the controller dashboard: {missing:?}"
    );
    let provisioning = std::fs::read_to_string(monitoring(
        "grafana/provisioning/dashboards/dashboards.yaml",
    ))
    .expect("provisioning");
    let compose = std::fs::read_to_string(monitoring("docker-compose.yml")).expect("compose");
    let path = "/var/lib/grafana/dashboards";
    assert!(
        provisioning.contains(path) && compose.contains(&format!("./grafana/dashboards:{path}"))
    );
}
