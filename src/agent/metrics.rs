//! The agent's Prometheus endpoint (#16 item 3), on `ONEAPP_FL_METRICS_PORT` of the VM
//! address when `ONEAPP_FL_METRICS_ENABLED=YES`: on both roles the supervisor's phase,
//! Flower's health and the certificate's remaining lifetime; on the SuperLink the seed's
//! training metrics ([`super::training`]); on a SuperNode with a GPU, `nvidia-smi`'s
//! figures ([`super::gpu`]). Every metric and its source: docs/metrics.md. The same
//! refresh logs the SuperLink's training events when they are on ([`super::events`]).
//!
//! Owns: the view the metrics are encoded from, its encoding (prometheus-client, one
//! collector, OpenMetrics or the text format by `Accept`: [`crate::exposition`]), the
//! HTTP routes (served by [`crate::http_server`] with its limits), and the task that refreshes the view from Flower's state, the certificate
//! and `nvidia-smi`.
//! Must not: fail or slow the supervisor (a port that cannot be bound is a warning, reads
//! run on blocking threads), or show a value no source stated (absent, not zero).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::{DateTime, Utc};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::context::Role;
use super::events::{self, Emitter};
use super::gpu::{self, GpuSample};
use super::supervisor::Phase;
use super::training::{self, TrainingView, DURATION_BUCKETS};

/// What the agent knows now; encoded at each scrape.
#[derive(Debug, Clone)]
pub struct AgentView {
    /// The node's role.
    pub role: Role,
    /// The supervisor's phase (one of [`Phase::NAMES`]).
    pub phase: &'static str,
    /// Flower serves: the SuperLink's Fleet API answers, a SuperNode is registered.
    pub healthy: bool,
    /// End of validity of the SuperLink's server certificate, or of the CA a SuperNode
    /// trusts; `None` without TLS material.
    pub cert_not_after: Option<DateTime<Utc>>,
    /// SuperLink: the training view; `None` until Flower's state was read.
    pub training: Option<TrainingView>,
    /// SuperNode: the GPUs `nvidia-smi` reported at the last sample.
    pub gpus: Vec<GpuSample>,
}

/// The agent's metrics: a shared view and the registry encoding it.
#[derive(Debug, Clone)]
pub struct AgentMetrics {
    view: Arc<Mutex<AgentView>>,
    registry: Arc<Registry>,
}

impl AgentMetrics {
    /// Metrics of a `role` agent, in phase `down`.
    pub fn new(role: Role) -> Self {
        let view = Arc::new(Mutex::new(AgentView {
            role,
            phase: Phase::NAMES[0],
            healthy: false,
            cert_not_after: None,
            training: None,
            gpus: Vec::new(),
        }));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ViewCollector(view.clone())));
        Self {
            view,
            registry: Arc::new(registry),
        }
    }

    /// Changes the view.
    pub fn update(&self, f: impl FnOnce(&mut AgentView)) {
        f(&mut self.view.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// OpenMetrics text of the current view.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct ViewCollector(Arc<Mutex<AgentView>>);

/// One gauge family; nothing (not even its description) when it has no sample.
fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: Vec<(Labels, f64)>,
) -> std::fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(labels, v)] = samples.as_slice() {
        if labels.is_empty() {
            return ConstGauge::new(*v).encode(m);
        }
    }
    for (labels, v) in &samples {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn run_label(id: u64) -> Labels {
    vec![("run_id".to_string(), id.to_string())]
}

impl Collector for ViewCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let e = &mut enc;
        let phases = Phase::NAMES
            .iter()
            .map(|p| {
                let on = f64::from(u8::from(*p == v.phase));
                (vec![("phase".to_string(), (*p).to_string())], on)
            })
            .collect();
        gauges(
            e,
            "flower_agent_phase",
            "The agent's supervisor phase (1 for the current one)",
            phases,
        )?;
        gauges(
            e,
            "flower_agent_flower_healthy",
            "1 when Flower serves: the SuperLink's Fleet API answers, the SuperNode is registered",
            vec![(vec![], f64::from(u8::from(v.healthy)))],
        )?;
        let cert = match v.role {
            Role::Superlink => "server",
            Role::Supernode => "ca",
        };
        gauges(
            e,
            "flower_agent_cert_expiry_seconds",
            "Seconds until the SuperLink's server certificate (cert=server) or the CA a SuperNode trusts (cert=ca) expires",
            v.cert_not_after
                .map(|t| {
                    let left = (t - Utc::now()).num_milliseconds() as f64 / 1000.0;
                    (vec![("cert".to_string(), cert.to_string())], left)
                })
                .into_iter()
                .collect(),
        )?;
        if let Some(t) = &v.training {
            encode_training(e, t)?;
        }
        encode_gpus(e, &v.gpus)
    }
}

/// A per-run gauge: name, help, value (`None`: absent).
type RunGauge = (
    &'static str,
    &'static str,
    fn(&training::RunView) -> Option<f64>,
);

/// The seed's per-run gauges (docs/metrics.md).
const RUN_GAUGES: &[RunGauge] = &[
    (
        "fl_round_current",
        "The round the run is in or finished last",
        |r| r.log.round_current.map(|x| x as f64),
    ),
    (
        "fl_rounds_planned",
        "Rounds the run's strategy was started with",
        |r| r.log.round_total.map(|x| x as f64),
    ),
    (
        "fl_aggregated_loss",
        "Loss of the run's last aggregated evaluation",
        |r| r.log.loss,
    ),
    (
        "fl_aggregated_accuracy",
        "Accuracy of the run's last aggregated evaluation",
        |r| r.log.accuracy,
    ),
    (
        "fl_clients_selected",
        "SuperNodes sampled for the run's last training round",
        |r| r.log.selected.map(|x| x as f64),
    ),
    (
        "fl_clients_responded",
        "Training results received in the run's last training round",
        |r| r.log.responded.map(|x| x as f64),
    ),
    (
        "fl_training_status",
        "The run's status: 0 idle (submitted), 1 running, 2 complete, 3 failed or stopped",
        |r| Some(r.status as u8 as f64),
    ),
];

fn encode_training(e: &mut DescriptorEncoder, t: &TrainingView) -> std::fmt::Result {
    for (name, help, value) in RUN_GAUGES {
        let samples = t
            .runs
            .iter()
            .filter_map(|r| Some((run_label(r.run_id), value(r)?)))
            .collect();
        gauges(e, name, help, samples)?;
    }
    gauges(
        e,
        "fl_clients_connected",
        "SuperNodes the SuperLink holds online",
        t.clients_connected
            .map(|n| (vec![], n as f64))
            .into_iter()
            .collect(),
    )?;
    if t.runs.is_empty() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(
        "fl_round_duration_seconds",
        "Duration of the run's finished rounds",
        None,
        MetricType::Histogram,
    )?;
    for r in &t.runs {
        let d = &r.log.durations;
        let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(d.buckets.iter().copied())
            .collect();
        let labels = run_label(r.run_id);
        m.encode_family(&labels)?.encode_histogram(
            d.sum,
            d.count,
            &buckets,
            None::<&HashMap<usize, Exemplar<Labels, f64>>>,
        )?;
    }
    let mut m = e.encode_descriptor(
        "fl_clients_failed",
        "Failed replies (training and evaluation) over the run",
        None,
        MetricType::Counter,
    )?;
    for r in &t.runs {
        let labels = run_label(r.run_id);
        ConstCounter::new(r.log.failed).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A per-GPU gauge: name, help, value (`None`: not reported).
type GpuGauge = (&'static str, &'static str, fn(&GpuSample) -> Option<f64>);

const GPU_GAUGES: &[GpuGauge] = &[
    (
        "flower_agent_gpu_utilization_percent",
        "GPU utilisation (nvidia-smi)",
        |g| g.utilization_percent,
    ),
    (
        "flower_agent_gpu_memory_used_bytes",
        "GPU memory used (nvidia-smi)",
        |g| g.memory_used_bytes,
    ),
    (
        "flower_agent_gpu_memory_total_bytes",
        "GPU memory (nvidia-smi)",
        |g| g.memory_total_bytes,
    ),
    (
        "flower_agent_gpu_temperature_celsius",
        "GPU temperature (nvidia-smi)",
        |g| g.temperature_celsius,
    ),
    (
        "flower_agent_gpu_power_watts",
        "GPU power draw (nvidia-smi)",
        |g| g.power_watts,
    ),
];

fn encode_gpus(e: &mut DescriptorEncoder, gpus: &[GpuSample]) -> std::fmt::Result {
    for (name, help, value) in GPU_GAUGES {
        let samples = gpus
            .iter()
            .filter_map(|g| {
                let labels = vec![
                    ("gpu".to_string(), g.index.to_string()),
                    ("name".to_string(), g.name.clone()),
                ];
                Some((labels, value(g)?))
            })
            .collect();
        gauges(e, name, help, samples)?;
    }
    Ok(())
}

async fn metrics_handler(State(m): State<AgentMetrics>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = crate::exposition::negotiate(m.encode(), accept);
    ([(header::CONTENT_TYPE, content_type)], body)
}

/// What the refresh task reads.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// SuperLink: Flower's state database (persistent state only).
    pub database: Option<PathBuf>,
    /// The certificate whose expiry is shown.
    pub cert: Option<PathBuf>,
    /// SuperNode: sample `nvidia-smi`.
    pub gpu: bool,
    /// SuperLink: log the training events derived from the database ([`super::events`]).
    pub events: bool,
    /// SuperLink: where each training view's [`TrainingView::activity`] goes (the
    /// supervisor publishes it as `FL_TRAINING_ACTIVE` / `FL_ROUND_NUMBER`).
    pub activity: Option<ActivityTx>,
}

/// Where the refresh sends [`TrainingView::activity`] (`None` until Flower's state was read).
pub type ActivityTx = Arc<watch::Sender<Option<(bool, u64)>>>;
/// The supervisor's end of [`ActivityTx`].
pub type ActivityRx = watch::Receiver<Option<(bool, u64)>>;

/// Serves `metrics` on `addr` and refreshes them from `sources` until `stop`. A port that
/// cannot be bound is logged and leaves the agent without metrics.
pub async fn start(
    addr: SocketAddr,
    metrics: AgentMetrics,
    sources: Sources,
    stop: CancellationToken,
) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%addr, problem = %e, "cannot serve metrics");
            return;
        }
    };
    tracing::info!(%addr, "serving metrics");
    let app = axum::Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(metrics.clone());
    // The controller's limits: header-read timeout, connection cap, bounded shutdown.
    tokio::spawn(crate::http_server::serve(
        listener,
        app,
        crate::http_server::Limits::default(),
        stop.clone(),
    ));
    tokio::spawn(refresh(Some(metrics), sources, stop));
}

/// Follows Flower's state at `database` for the training events and the activity alone
/// (metrics off): no endpoint, no certificate or GPU reads.
pub fn start_tracking(
    database: PathBuf,
    events: bool,
    activity: ActivityTx,
    stop: CancellationToken,
) {
    let sources = Sources {
        database: Some(database),
        events,
        activity: Some(activity),
        ..Sources::default()
    };
    tokio::spawn(refresh(None, sources, stop));
}

/// Period of the training view's refresh.
const TRAINING_PERIOD: Duration = Duration::from_secs(2);
/// Period of the certificate and GPU refresh.
const SLOW_PERIOD: Duration = Duration::from_secs(15);

async fn refresh(metrics: Option<AgentMetrics>, sources: Sources, stop: CancellationToken) {
    let update = |f: &dyn Fn(&mut AgentView)| {
        if let Some(m) = &metrics {
            m.update(f);
        }
    };
    let mut tracker = sources.database.clone().map(training::Tracker::new);
    let mut emitter = Emitter::new(Role::Superlink.as_str());
    // The view the next events are derived against; `None` until the first (the baseline).
    let mut last: Option<TrainingView> = None;
    let mut problem: Option<String> = None;
    let mut next_slow = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(TRAINING_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Some(mut t) = tracker.take() {
            let now = Utc::now().timestamp_micros() as f64 / 1e6;
            let joined = tokio::task::spawn_blocking(move || {
                let r = t.poll(now);
                (t, r)
            })
            .await;
            let Ok((t, read)) = joined else {
                tracing::warn!("the training state reader stopped");
                continue;
            };
            tracker = Some(t);
            match read {
                Ok(view) => {
                    problem = None;
                    if let Some(tx) = &sources.activity {
                        tx.send_replace(Some(view.activity()));
                    }
                    if sources.events {
                        emitter.emit(&events::derive(last.as_ref(), &view), &view);
                        last = Some(view.clone());
                    }
                    update(&|v| v.training = Some(view.clone()));
                }
                // Kept: the last view read is still what Flower last said.
                Err(e) if problem.as_deref() != Some(&e.to_string()) => {
                    tracing::debug!(problem = %e, "cannot read training state");
                    problem = Some(e.to_string());
                }
                Err(_) => {}
            }
        }
        if tokio::time::Instant::now() >= next_slow {
            next_slow = tokio::time::Instant::now() + SLOW_PERIOD;
            let not_after = sources
                .cert
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|pem| super::tls::inspect(&pem).ok())
                .map(|c| c.not_after);
            update(&|v| v.cert_not_after = not_after);
            if sources.gpu {
                let gpus = gpu::sample().await.unwrap_or_default();
                update(&|v| v.gpus = gpus.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use training::{RunLogView, RunView, Status};

    #[test]
    fn absent_values_are_absent_and_the_text_format_passes_the_classic_rules() {
        let m = AgentMetrics::new(Role::Superlink);
        let text = m.encode();
        assert!(
            text.contains("flower_agent_phase{phase=\"down\"} 1.0"),
            "{text}"
        );
        assert!(!text.contains("fl_"), "no training view yet: {text}");
        assert!(!text.contains("cert_expiry"), "no certificate: {text}");
        m.update(|v| {
            v.phase = "serving";
            v.healthy = true;
            v.cert_not_after = Some(Utc::now() + chrono::Duration::days(10));
            v.training = Some(TrainingView {
                clients_connected: Some(2),
                nodes_online: None,
                runs: vec![
                    RunView {
                        run_id: 7,
                        status: Status::Running,
                        duration: None,
                        settled: false,
                        log: RunLogView {
                            round_current: Some(2),
                            round_total: Some(3),
                            failed: 1,
                            ..RunLogView::default()
                        },
                    },
                    RunView {
                        run_id: 5,
                        status: Status::Complete,
                        duration: None,
                        settled: false,
                        log: RunLogView::default(),
                    },
                ],
            });
        });
        let text = m.encode();
        let samples: HashMap<&str, f64> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k, v.parse().ok()?))
            })
            .collect();
        for (series, value) in [
            ("flower_agent_phase{phase=\"serving\"}", 1.0),
            ("flower_agent_phase{phase=\"down\"}", 0.0),
            ("flower_agent_flower_healthy", 1.0),
            ("fl_round_current{run_id=\"7\"}", 2.0),
            ("fl_rounds_planned{run_id=\"7\"}", 3.0),
            ("fl_clients_connected", 2.0),
            ("fl_clients_failed_total{run_id=\"7\"}", 1.0),
            ("fl_training_status{run_id=\"7\"}", 1.0),
            ("fl_training_status{run_id=\"5\"}", 2.0),
            ("fl_round_duration_seconds_count{run_id=\"5\"}", 0.0),
            (
                "fl_round_duration_seconds_bucket{le=\"+Inf\",run_id=\"7\"}",
                0.0,
            ),
        ] {
            assert_eq!(samples.get(series), Some(&value), "{series} in\n{text}");
        }
        assert!(
            !text.contains("fl_round_current{run_id=\"5\"}"),
            "not stated: absent"
        );
        assert!(!text.contains("fl_aggregated_loss"), "{text}");
        let days = text
            .lines()
            .find_map(|l| l.strip_prefix("flower_agent_cert_expiry_seconds{cert=\"server\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("expiry")
            / 86400.0;
        assert!((9.9..=10.0).contains(&days), "{days}");
        let plain = crate::exposition::to_text_format(&text);
        assert!(
            plain.contains("# TYPE fl_clients_failed_total counter"),
            "{plain}"
        );
    }
}
