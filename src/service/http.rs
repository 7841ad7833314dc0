//! The controller's HTTP server: health, readiness, Prometheus metrics, the cluster
//! status API and Prometheus HTTP service discovery.
//!
//! Guarantees: `/api/v1/sd` lists every agent metrics endpoint of the newest observation
//! in Prometheus' `http_sd` format, one target group per endpoint labelled `cluster`,
//! `role`, `service_id` and `vm_id`, plus `dcgm="true"` on SuperNodes that run the DCGM
//! exporter (`tests/monitoring.rs`,
//! `service_discovery_lists_every_agent_metrics_endpoint_from_the_observation`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::runtime::status::ClusterView;
use crate::runtime::{Shared, SourceView};
use crate::telemetry::metrics::Metrics;

/// `GET /api/v1/clusters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterList {
    /// Source and revision.
    pub source: SourceView,
    /// When the controller first observed OpenNebula completely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<DateTime<Utc>>,
    /// Last observation error, if the last poll failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observe_error: Option<String>,
    /// Every cluster.
    pub clusters: Vec<ClusterView>,
}

/// An API error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}

#[derive(Clone)]
struct AppState {
    shared: Shared,
    metrics: Arc<Metrics>,
}

/// The router, for serving or for tests.
pub fn router(shared: Shared, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/api/v1/clusters", get(list))
        .route("/api/v1/clusters/{name}", get(one))
        .route("/api/v1/sd", get(service_discovery))
        .with_state(AppState { shared, metrics })
}

/// Serve on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Shared,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(shared, metrics))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn readyz(State(s): State<AppState>) -> Response {
    let ready = s
        .shared
        .read()
        .map(|sh| sh.observed_at.is_some())
        .unwrap_or(false);
    if ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first complete observation of OpenNebula\n",
        )
            .into_response()
    }
}

/// OpenMetrics (with exemplars) for Prometheus, the text format for other scrapers.
async fn metrics_text(State(s): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = crate::exposition::negotiate(s.metrics.encode(), accept);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn list(State(s): State<AppState>) -> Response {
    let Ok(sh) = s.shared.read() else {
        return internal();
    };
    Json(ClusterList {
        source: sh.source.clone(),
        observed_at: sh.observed_at,
        observe_error: sh.observe_error.clone(),
        clusters: sh.clusters.values().cloned().collect(),
    })
    .into_response()
}

async fn one(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let Ok(sh) = s.shared.read() else {
        return internal();
    };
    match sh.clusters.get(&name) {
        Some(view) => Json(view.clone()).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(ApiError {
                error: format!("no cluster named {name:?}"),
            }),
        )
            .into_response(),
    }
}

/// One target group of Prometheus' HTTP service discovery (`http_sd_configs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetGroup {
    /// `host:port` of each target (here always one).
    pub targets: Vec<String>,
    /// Labels every target of the group gets.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// `GET /api/v1/sd`: every agent metrics endpoint of every cluster, as Prometheus'
/// `http_sd` JSON (an empty list, never an error, before the first observation).
async fn service_discovery(State(s): State<AppState>) -> Response {
    let Ok(sh) = s.shared.read() else {
        return internal();
    };
    let groups: Vec<TargetGroup> = sh
        .clusters
        .values()
        .flat_map(|c| {
            c.metrics_targets.iter().map(|t| TargetGroup {
                targets: vec![t.address.clone()],
                labels: [
                    ("cluster", c.name.clone()),
                    ("role", t.role.clone()),
                    ("service_id", t.service_id.to_string()),
                    ("vm_id", t.vm_id.to_string()),
                ]
                .into_iter()
                // prometheus.yml's `dcgm_gpu` job keeps only these.
                .chain(t.dcgm.then(|| ("dcgm", "true".to_string())))
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            })
        })
        .collect();
    Json(groups).into_response()
}

/// GET `path` from a controller at `base` and decode the JSON answer; an error answer
/// becomes an error carrying the server's message.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    base: &str,
    path: &str,
) -> anyhow::Result<T> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let r = client
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the controller at {url}: {e}"))?;
    let status = r.status();
    if !status.is_success() {
        let msg = r
            .json::<ApiError>()
            .await
            .map_or_else(|_| status.to_string(), |e| e.error);
        anyhow::bail!("{url}: {msg}");
    }
    Ok(r.json().await?)
}

fn internal() -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(ApiError {
            error: "state lock poisoned".into(),
        }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::SharedState;

    async fn server(shared: Shared, metrics: Arc<Metrics>) -> (String, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, shared, metrics, stop.clone()));
        (base, stop)
    }

    fn client() -> reqwest::Client {
        crate::one::http::ensure_crypto_provider();
        reqwest::Client::new()
    }

    #[tokio::test]
    async fn health_readiness_metrics_and_cluster_api() {
        let shared = Shared::default();
        let metrics = Arc::new(Metrics::new());
        metrics.reconciled(true, std::time::Duration::from_millis(5), None);
        metrics.set_revision("git:file:///r", "0123abcd");
        let (base, stop) = server(shared.clone(), metrics).await;
        let c = client();

        let r = c.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = c.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 503, "not ready before the first observation");

        {
            let mut sh = shared.write().unwrap();
            *sh = SharedState {
                observed_at: Some(Utc::now()),
                ..SharedState::default()
            };
            sh.source.revision = Some("0123abcd".into());
            sh.clusters.insert(
                "alpha".into(),
                ClusterView {
                    name: "alpha".into(),
                    spec_file: Some("alpha.yaml".into()),
                    held_by: None,
                    failures: 0,
                    status: crate::api::FlowerClusterStatus {
                        observed_revision: Some("0123abcd".into()),
                        ..Default::default()
                    },
                    metrics_targets: vec![crate::runtime::status::MetricsTarget {
                        role: "superlink".into(),
                        service_id: 7,
                        vm_id: 12,
                        address: "10.0.0.12:9101".into(),
                        dcgm: false,
                    }],
                },
            );
        }
        let r = c.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 200);

        let r = c
            .get(format!("{base}/metrics"))
            .header(header::ACCEPT, "application/openmetrics-text;version=1.0.0")
            .send()
            .await
            .unwrap();
        assert!(r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .contains("openmetrics"));
        let text = r.text().await.unwrap();
        let samples = parse_exposition(&text);
        assert_eq!(
            samples.get("flower_reconcile_reconciles_total{result=\"ok\"}"),
            Some(&1.0)
        );
        assert!(samples
            .keys()
            .any(|k| k.starts_with("flower_reconcile_source_revision_info")
                && k.contains("0123abcd")));
        assert!(text.trim_end().ends_with("# EOF"));
        // Without asking for OpenMetrics: the text format, the same samples.
        let r = c.get(format!("{base}/metrics")).send().await.unwrap();
        assert!(r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        let plain = r.text().await.unwrap();
        assert!(plain.contains("# TYPE flower_reconcile_reconciles_total counter"));
        assert_eq!(parse_exposition(&plain).len(), samples.len());

        let list: ClusterList = get_json(&c, &base, "/api/v1/clusters").await.unwrap();
        assert_eq!(list.source.revision.as_deref(), Some("0123abcd"));
        assert_eq!(list.clusters.len(), 1);
        let one: ClusterView = get_json(&c, &base, "/api/v1/clusters/alpha").await.unwrap();
        assert_eq!(one.status.observed_revision.as_deref(), Some("0123abcd"));
        let err = get_json::<ClusterView>(&c, &base, "/api/v1/clusters/nope")
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("no cluster named \"nope\""),
            "{err}"
        );
        let sd: serde_json::Value = get_json(&c, &base, "/api/v1/sd").await.unwrap();
        assert_eq!(
            sd,
            serde_json::json!([{"targets": ["10.0.0.12:9101"], "labels":
                {"cluster": "alpha", "role": "superlink", "service_id": "7", "vm_id": "12"}}])
        );
        stop.cancel();
    }

    /// Parse the text exposition: every sample line must be `name{labels} value`, every
    /// other line a `#` comment — a malformed line fails the test.
    fn parse_exposition(text: &str) -> std::collections::HashMap<String, f64> {
        let mut out = std::collections::HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                assert!(
                    line.is_empty()
                        || line.starts_with("# HELP ")
                        || line.starts_with("# TYPE ")
                        || line.starts_with("# UNIT ")
                        || line == "# EOF",
                    "bad comment line {line:?}"
                );
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            assert!(series.starts_with("flower_reconcile_"), "{line}");
            out.insert(series.to_string(), value);
        }
        out
    }
}
