//! The controller as Prometheus' source of targets, against onesim: `/api/v1/sd` lists
//! the agents' metrics endpoints of the observed clusters (oned's NIC addresses, the
//! applied spec's port), and `/metrics` is OpenMetrics with trace-id exemplars.

mod common;

use std::time::{Duration, Instant};

use flower_reconcile::service::config::RunSettings;
use flower_reconcile::source::SourceArgs;
use serde_json::{json, Value};

use common::lab::{RunController, Runtime};
use common::onesim_env::{
    controller_env, publish_agent_attributes, spec_yaml, ControllerEnv, Served,
};
use common::prometheus::{monitoring, promtool_check_metrics, render_config, Prometheus};

const PASSWORD: &str = "monitoring-pw";

#[tokio::test]
async fn service_discovery_lists_every_agent_metrics_endpoint_from_the_observation() {
    // As `run` sets it up: every reconcile gets a trace id, exported or not.
    let _telemetry = flower_reconcile::telemetry::init(
        "flower-reconcile",
        flower_reconcile::telemetry::LogFormat::Text,
        "warn",
        flower_reconcile::telemetry::Traces::Always,
    )
    .expect("telemetry");
    let ControllerEnv { sim, ctx, backend } = controller_env(PASSWORD, "ctl-sd", |_| {}).await;
    let specs = tempfile::tempdir().expect("specs");
    // `metrics` on for both roles: a target per VM, each role on its port, SuperNodes
    // marked for the DCGM job; `plain` has none.
    let metrics = "    gpu:\n      enabled: true\n      dcgmExporter: true\n\
                   \x20   metrics:\n      enabled: true\n      port: 9300\n\
                   \x20 superlink:\n    metrics:\n      enabled: true\n      port: 9200\n";
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
            if sd.as_array().is_some_and(|a| a.len() == 3) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // What oned says: the VMs of `watched`'s service, their roles and NIC addresses.
    let (service_id, vms) = sim.sim.with(|st| {
        let doc = st
            .docs
            .values()
            .find(|d| d.name == "watched" && d.doc_type == onesim::flow::SERVICE)
            .expect("the service");
        let vms: Vec<_> = st
            .vms
            .values()
            .filter(|v| v.user_template.get("SERVICE_ID") == Some(doc.id.to_string().as_str()))
            .map(|v| {
                (
                    v.id,
                    v.user_template.get("ROLE_NAME").unwrap_or("").to_string(),
                )
            })
            .collect();
        (doc.id, vms)
    });
    let mut expected = Vec::new();
    for (id, role) in vms {
        let vm = backend.oned.vm_info(id).await.expect("vm info");
        let ip = vm.addresses().first().copied().expect("a NIC address");
        let port = if role == "superlink" { 9200 } else { 9300 };
        let mut group = json!({
            "targets": [format!("{ip}:{port}")],
            "labels": {
                "cluster": "watched",
                "role": role,
                "service_id": service_id.to_string(),
                "vm_id": id.to_string(),
            }
        });
        if role == "supernode" {
            group["labels"]["dcgm"] = json!("true");
        }
        expected.push(group);
    }
    let key = |v: &Value| {
        v["labels"]["vm_id"]
            .as_str()
            .unwrap_or("")
            .parse::<i64>()
            .unwrap_or(0)
    };
    let mut got = sd.as_array().cloned().unwrap_or_default();
    got.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(expected.len(), 3, "a SuperLink and 2 SuperNodes");
    assert_eq!(got, expected);

    // Every reconcile's duration sample leads to its trace (in OpenMetrics, which
    // Prometheus asks for).
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", svc.base))
        .header("accept", "application/openmetrics-text;version=1.0.0")
        .send()
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("body");
    assert!(
        text.lines().any(
            |l| l.starts_with("flower_reconcile_reconcile_duration_seconds_bucket")
                && l.contains(" # {trace_id=\"")
        ),
        "{text}"
    );
    svc.stop().await;
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

/// The series the agents serve (every family, with its suffixes), from a SuperLink agent
/// with a run in progress and a SuperNode agent with a GPU.
fn agent_series() -> std::collections::BTreeSet<String> {
    use flower_reconcile::agent::context::Role;
    use flower_reconcile::agent::gpu;
    use flower_reconcile::agent::metrics::AgentMetrics;
    use flower_reconcile::agent::training::{RunLog, RunView, Status, TrainingView};
    let mut log = RunLog::default();
    log.feed(
        1.0,
        "[ROUND 1/2]\nconfigure_train: Sampled 2 nodes (out of 2)\n\
         aggregate_train: Received 2 results and 0 failures\n\
         configure_evaluate: Sampled 2 nodes (out of 2)\n\
         aggregate_evaluate: Received 2 results and 0 failures\n\
         └──> Aggregated MetricRecord: {'loss': 0.5, 'accuracy': 0.9}\n[ROUND 2/2]\n",
    );
    let link = AgentMetrics::new(Role::Superlink);
    link.update(|v| {
        v.cert_not_after = Some(chrono::Utc::now());
        v.training = Some(TrainingView {
            clients_connected: Some(2),
            nodes_online: None,
            runs: vec![RunView {
                run_id: 1,
                status: Status::Running,
                duration: None,
                settled: false,
                log: log.view().clone(),
            }],
        });
    });
    let node = AgentMetrics::new(Role::Supernode);
    node.update(|v| v.gpus = gpu::parse("0, Tesla T4, 35, 1024, 15360, 45, 27.50, 550.54.15\n"));
    [link.encode(), node.encode()]
        .iter()
        .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect()
}

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
    m.set_refused(Some(&flower_reconcile::source::SourceCondition {
        kind: flower_reconcile::source::SOURCE_VERIFIED.into(),
        status: flower_reconcile::api::ConditionStatus::False,
        reason: "Unsigned".into(),
        message: "commit r is not signed".into(),
        revision: "r".into(),
    }));
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
    let agents = agent_series();
    for family in [
        "fl_round_current",
        "fl_round_duration_seconds_bucket",
        "fl_clients_failed_total",
        "flower_agent_gpu_utilization_percent",
    ] {
        assert!(agents.contains(family), "{family} in {agents:?}");
    }
    let known: std::collections::BTreeSet<String> = DCGM_SERIES
        .iter()
        .map(|s| s.to_string())
        .chain(agents)
        .chain(controller.iter().cloned())
        .collect();
    let series = regex::Regex::new(
        r"\b(fl_[a-z_]+|DCGM_FI_[A-Z_]+|flower_reconcile_[a-z_]+|flower_agent_[a-z_]+)\b",
    )
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

/// The real-Prometheus spec: metrics on both roles, TLS on (so certificates have an
/// expiry), JSON logs (so the SuperLink agent logs the training events), a 3-round FedAvg
/// run over 2 SuperNodes.
fn prometheus_spec(name: &str) -> String {
    use flower_reconcile::demo::lab::{NETWORK, SUPERLINK_TEMPLATE, SUPERNODE_TEMPLATE};
    let head = common::lab::spec_head(name);
    format!(
        "{head}  opennebula:
    templates:
      superlink: {SUPERLINK_TEMPLATE}
      supernode: {SUPERNODE_TEMPLATE}
    network: {NETWORK}
  superlink:
    controlApi: network
    metrics:
      enabled: true
      port: 19101
  supernodes:
    count: 2
    failurePolicy:
      gracePeriod: 10s
      heartbeatInterval: 2s
    metrics:
      enabled: true
      port: 19102
  training:
    strategy:
      name: FedAvg
    numRounds: 3
    minFitClients: 2
    minEvaluateClients: 2
    minAvailableClients: 2
  logging:
    format: json
"
    )
}

/// The training events (`fields.event` set) of the SuperLink agent's JSON log, in order.
async fn training_events(control: &str) -> Vec<Value> {
    let dirs = common::vm_dirs(control).await;
    let logs = "var/log/one-appliance";
    let link = dirs
        .iter()
        .find(|(_, d)| d.join(logs).join("flower-superlink.log").exists())
        .expect("the SuperLink's VM");
    std::fs::read_to_string(link.1.join(logs).join("flower-agent.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["event"].is_string())
        .collect()
}

/// GET `url` as a scraper that does not ask for OpenMetrics (promtool's format).
async fn scrape_text(url: &str) -> String {
    reqwest::get(url)
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .text()
        .await
        .expect("body")
}

/// The round an agent's /metrics shows for its newest run (`None` before one started).
fn round_in(text: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("fl_round_current{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .reduce(f64::max)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// #16 item 6: Debian's real Prometheus, configured with manifests/monitoring's
/// prometheus.yml (pointed at this controller, 1 s intervals), discovers every agent of a
/// running cluster from the controller's `/api/v1/sd` and scrapes `fl_round_current`
/// advancing while a submitted run trains; `promtool check metrics` passes on the
/// controller's and both agents' scrapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_prometheus_discovers_every_agent_and_scrapes_the_rounds_of_a_run() {
    const NAME: &str = "watched";
    let dir = tempfile::Builder::new()
        .prefix("fr-prometheus-")
        .tempdir()
        .expect("tmp");
    let work = dir.path();
    let lab = common::lab::start(work, Runtime::Process, Duration::from_millis(100)).await;
    let specs = work.join("specs");
    std::fs::create_dir_all(&specs).expect("specs");
    let spec = specs.join(format!("{NAME}.yaml"));
    std::fs::write(&spec, prometheus_spec(NAME)).expect("spec");
    let ctl = RunController::start(&lab, &["--specs", specs.to_str().expect("utf-8")], work);
    let controller = ctl.base.trim_start_matches("http://").to_string();
    let prom = Prometheus::start(&work.join("prometheus"), &render_config(&controller));

    // Ready, and every agent's target discovered through the controller and up.
    let started = Instant::now();
    let mut targets = Vec::new();
    while started.elapsed() < Duration::from_secs(150) {
        targets = prom.targets("flower").await;
        let up = targets.iter().filter(|t| t["health"] == "up").count();
        if targets.len() == 3 && up == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let sd: Value =
        serde_json::from_str(&scrape_text(&format!("{}/api/v1/sd", ctl.base)).await).expect("sd");
    assert!(
        targets.len() == 3 && targets.iter().all(|t| t["health"] == "up"),
        "targets: {targets:#?}\nsd: {sd}\ncontroller:\n{}\nprometheus:\n{}",
        ctl.log_tail(30),
        prom.log_tail(30)
    );
    let mut discovered: Vec<(String, String)> = targets
        .iter()
        .map(|t| {
            let l = &t["labels"];
            assert_eq!(l["cluster"], NAME, "{t}");
            assert!(l["service_id"].is_string() && l["vm_id"].is_string(), "{t}");
            assert_eq!(
                l["deployment"], "flower-opennebula",
                "the manifest's relabelling"
            );
            (
                l["role"].as_str().unwrap_or("").to_string(),
                t["scrapeUrl"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    discovered.sort();
    let roles: Vec<&str> = discovered.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(roles, ["superlink", "supernode", "supernode"]);
    assert!(
        prom.targets("dcgm_gpu").await.is_empty(),
        "no DCGM exporter in the spec: the dcgm_gpu job keeps no target"
    );
    println!(
        "prometheus: {} targets discovered from /api/v1/sd and up {:.1} s after the controller started",
        targets.len(),
        started.elapsed().as_secs_f64()
    );

    // A 3-round run, submitted as a user would; meanwhile the SuperLink agent's round and
    // Prometheus' view of it.
    let app = common::lab::write_app(work);
    let mut submit = tokio::process::Command::from(common::lab::reconcile(&lab));
    submit
        .args(["--output", "json", "submit", NAME])
        .arg(&app)
        .arg("--spec")
        .arg(&spec)
        .arg("--flwr")
        .arg(common::flower_venv().join("bin/flwr"))
        .args(["--timeout", "180s"])
        .kill_on_drop(true);
    let submitted = Instant::now();
    let submit = submit.output();
    tokio::pin!(submit);
    let link_url = &discovered[0].1;
    let mut first_at_agent: std::collections::BTreeMap<u64, Instant> = Default::default();
    let mut first_in_prometheus: std::collections::BTreeMap<u64, Instant> = Default::default();
    let out = loop {
        tokio::select! {
            out = &mut submit => break out.expect("submit runs"),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        if let Some(r) = round_in(&scrape_text(link_url).await) {
            first_at_agent.entry(r as u64).or_insert_with(Instant::now);
        }
        let q = format!("max(fl_round_current{{cluster=\"{NAME}\"}})");
        if let Some((_, r)) = prom.query(&q).await.first() {
            first_in_prometheus
                .entry(*r as u64)
                .or_insert_with(Instant::now);
        }
    };
    let run_secs = submitted.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "submit failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The last round may finish after the last poll: wait for Prometheus to have it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !first_in_prometheus.contains_key(&3) && Instant::now() < deadline {
        let q = format!("max(fl_round_current{{cluster=\"{NAME}\"}})");
        if let Some((_, r)) = prom.query(&q).await.first() {
            first_in_prometheus
                .entry(*r as u64)
                .or_insert_with(Instant::now);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen: Vec<u64> = first_in_prometheus.keys().copied().collect();
    assert!(
        seen.len() >= 2 && seen.last() == Some(&3),
        "fl_round_current must advance to 3 in Prometheus; it showed {seen:?}"
    );
    let latencies: Vec<f64> = first_in_prometheus
        .iter()
        .filter_map(|(r, t)| {
            Some(
                t.saturating_duration_since(*first_at_agent.get(r)?)
                    .as_secs_f64(),
            )
        })
        .collect();
    println!(
        "prometheus: fl_round_current went through {seen:?} during the {run_secs:.1} s run; \
         agent /metrics → Prometheus query latency per round {:?} s, median {:.2} s \
         (1 s scrape interval, both polled every 0.2 s)",
        latencies
            .iter()
            .map(|l| (l * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        median(latencies.clone())
    );

    // What Prometheus stored of the run: completed, 3 rounds, a loss, 2 clients. The end
    // of the run reaches it after `submit` returned: Flower marks the run finished, the
    // agent reads that within 2 s, Prometheus scrapes within 1 s.
    let returned = Instant::now();
    let finished = "fl_training_status == 2 and on(run_id) fl_round_duration_seconds_count == 3";
    while prom.query(finished).await.is_empty() && returned.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "prometheus: the finished run (status 2, 3 round durations) queryable {:.1} s after submit returned",
        returned.elapsed().as_secs_f64()
    );
    let one = |q: &'static str| {
        let prom = &prom;
        async move {
            let v = prom.query(q).await;
            assert_eq!(v.len(), 1, "{q}: {v:?}");
            v[0].1
        }
    };
    assert_eq!(one("fl_training_status").await, 2.0, "complete");
    assert_eq!(one("fl_rounds_planned").await, 3.0);
    assert_eq!(one("fl_clients_connected").await, 2.0);
    assert_eq!(one("fl_clients_responded").await, 2.0);
    assert!(one("fl_aggregated_loss").await.is_finite());
    assert_eq!(one("fl_round_duration_seconds_count").await, 3.0);
    assert_eq!(one("sum(flower_agent_flower_healthy)").await, 3.0);
    let expiry = one("min(flower_agent_cert_expiry_seconds)").await;
    assert!(expiry > 86400.0, "{expiry}");

    // #16 item 7: the SuperLink agent's log told the run as the seed's events, one JSON
    // line each: start, three rounds ending in order with a loss, end. The end is told
    // once the finished run's whole log was read (one 2 s poll after Flower's last row).
    let report: Value = serde_json::from_slice(&out.stdout).expect("submit's JSON report");
    let run_id: u64 = report["runId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("run id in {report}"));
    let of_run = |events: &[Value], name: &str| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["fields"]["event"] == name && e["fields"]["data"]["run_id"] == run_id)
            .map(|e| e["fields"]["data"].clone())
            .collect()
    };
    let mut events = training_events(&lab.urls.control).await;
    while of_run(&events, "training_end").is_empty() && returned.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        events = training_events(&lab.urls.control).await;
    }
    let told_at = returned.elapsed().as_secs_f64();
    let names: Vec<&str> = events
        .iter()
        .filter_map(|e| e["fields"]["event"].as_str())
        .collect();
    assert_eq!(of_run(&events, "training_start").len(), 1, "{names:?}");
    let ends = of_run(&events, "round_end");
    let rounds: Vec<u64> = ends.iter().filter_map(|d| d["round"].as_u64()).collect();
    assert_eq!(rounds, [1, 2, 3], "{ends:?}");
    for d in &ends {
        let loss = d["aggregated_loss"].as_f64().unwrap_or(f64::NAN);
        assert!(loss.is_finite(), "{d}");
        assert!(d["round_duration_seconds"].as_f64().is_some(), "{d}");
    }
    let end = of_run(&events, "training_end");
    assert_eq!(end.len(), 1, "{names:?}");
    assert_eq!(end[0]["status"], "completed", "{}", end[0]);
    assert_eq!(end[0]["total_rounds"], 3, "{}", end[0]);
    let start = events
        .iter()
        .position(|e| e["fields"]["event"] == "training_start")
        .expect("start");
    let last = events
        .iter()
        .rposition(|e| e["fields"]["event"] == "round_end")
        .expect("round_end");
    let finish = events
        .iter()
        .position(|e| e["fields"]["event"] == "training_end")
        .expect("end");
    assert!(start < last && last < finish, "{names:?}");
    for e in &events {
        assert_eq!(e["fields"]["role"], "superlink", "{e}");
        assert!(e["fields"]["data"].is_object(), "{e}");
    }
    println!(
        "events: the SuperLink agent told {names:?}; training_end in its log {told_at:.1} s after submit returned"
    );

    // promtool reads the controller's and both roles' scrapes.
    for (what, url) in [
        ("controller", format!("{}/metrics", ctl.base)),
        ("superlink agent", discovered[0].1.clone()),
        ("supernode agent", discovered[1].1.clone()),
    ] {
        let text = scrape_text(&url).await;
        promtool_check_metrics(&text)
            .unwrap_or_else(|e| panic!("promtool check metrics, {what}:\n{e}\n{text}"));
    }
    println!("promtool check metrics: controller, SuperLink and SuperNode agents pass");
    drop(prom);
    ctl.stop();
}
