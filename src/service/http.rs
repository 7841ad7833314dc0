//! The controller's HTTP server: health, readiness, Prometheus metrics, the cluster
//! status API and Prometheus HTTP service discovery.
//!
//! Guarantees: `/api/v1/sd` lists every agent metrics endpoint of the newest observation
//! in Prometheus' `http_sd` format, one target group per endpoint labelled `cluster`,
//! `role`, `service_id` and `vm_id`, plus `dcgm="true"` on SuperNodes that run the DCGM
//! exporter (`tests/monitoring.rs`,
//! `service_discovery_lists_every_agent_metrics_endpoint_from_the_observation`).
//! With a bearer token configured, every route but `/healthz` and `/readyz` answers 401
//! without `Authorization: Bearer <token>` (`bearer_token_guards_everything_but_health`);
//! health and readiness stay open for probes, as in Kubernetes, and say nothing about
//! clusters. [`ApiClient`] reads at most a capped answer
//! (`status_client_refuses_an_oversized_answer`).
//!
//! Must not: serve (that is [`crate::http_server`], with its limits).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::auth::BearerToken;
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
    /// Who acts (leader election); absent from a one-shot `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leadership: Option<crate::runtime::election::LeaderView>,
    /// The clusters' parts in other sites, by site (multi-site federation).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sites: std::collections::BTreeMap<String, SiteList>,
    /// Sites specs name that the controller's configuration does not, with the clusters
    /// naming each: nothing is done there.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub unknown_sites: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
}

/// One remote site's loop: its parts and whether the site can be observed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteList {
    /// The derived source: the home revision, and the parts waiting for the home
    /// SuperLink (as file errors of the home spec file).
    pub source: SourceView,
    /// When the site was first observed completely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<DateTime<Utc>>,
    /// Why the site cannot be observed now (unreachable, refusing): its parts are held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observe_error: Option<String>,
    /// The parts.
    pub clusters: Vec<ClusterView>,
}

impl SiteList {
    fn of(shared: &Shared) -> Option<Self> {
        let sh = shared.read().ok()?;
        Some(Self {
            source: sh.source.clone(),
            observed_at: sh.observed_at,
            observe_error: sh.observe_error.clone(),
            clusters: sh.clusters.values().cloned().collect(),
        })
    }
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

/// The router, for serving or for tests. With `token`, everything but `/healthz` and
/// `/readyz` requires it.
pub fn router(shared: Shared, metrics: Arc<Metrics>, token: Option<BearerToken>) -> Router {
    let state = AppState { shared, metrics };
    let guarded = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/api/v1/clusters", get(list))
        .route("/api/v1/clusters/{name}", get(one))
        .route("/api/v1/sd", get(service_discovery))
        .with_state(state.clone());
    let guarded = match token {
        Some(t) => guarded.route_layer(axum::middleware::from_fn_with_state(
            Arc::new(t),
            require_token,
        )),
        None => guarded,
    };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(guarded)
}

async fn require_token(
    State(token): State<Arc<BearerToken>>,
    req: Request,
    next: Next,
) -> Response {
    if token.accepts(req.headers().get(header::AUTHORIZATION)) {
        return next.run(req).await;
    }
    tracing::debug!(path = %req.uri().path(), "HTTP request without the right bearer token");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(ApiError {
            error: "missing or wrong bearer token".into(),
        }),
    )
        .into_response()
}

/// Ready once OpenNebula was observed, leader or standby alike: a standby observes too
/// and serves status (as a Kubernetes standby controller is Ready); the body says which.
async fn readyz(State(s): State<AppState>) -> Response {
    let (ready, view) = s
        .shared
        .read()
        .map(|sh| {
            (
                sh.observed_at.is_some(),
                sh.leadership.as_ref().map(|l| l.view()),
            )
        })
        .unwrap_or((false, None));
    if ready {
        let role = match view {
            Some(v) if v.role == "standby" && !v.holder.is_empty() => {
                format!(" (standby; leader {})", v.holder)
            }
            Some(v) => format!(" ({})", v.role),
            None => String::new(),
        };
        (StatusCode::OK, format!("ready{role}\n")).into_response()
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
        leadership: sh.leadership.as_ref().map(|l| l.view()),
        sites: sh
            .sites
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), SiteList::of(s)?)))
            .collect(),
        unknown_sites: sh.unknown_sites.clone(),
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

/// A client of a controller's API: a timeout, the bearer token if any, and a cap on the
/// answer it reads.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: Option<BearerToken>,
    max_answer_bytes: usize,
}

impl ApiClient {
    /// Largest answer read by default: far above any real cluster list.
    pub const MAX_ANSWER_BYTES: usize = 16 << 20;

    /// A client of the controller at `base` (`http://host:port`).
    pub fn new(
        base: &str,
        token: Option<BearerToken>,
        timeout: std::time::Duration,
    ) -> anyhow::Result<Self> {
        crate::one::http::ensure_crypto_provider();
        Ok(Self {
            http: reqwest::Client::builder().timeout(timeout).build()?,
            base: base.trim_end_matches('/').to_string(),
            token,
            max_answer_bytes: Self::MAX_ANSWER_BYTES,
        })
    }

    /// Read at most `n` bytes of an answer.
    pub fn with_max_answer_bytes(mut self, n: usize) -> Self {
        self.max_answer_bytes = n;
        self
    }

    /// GET `path` and decode the JSON answer; an error answer becomes an error carrying
    /// the server's message, an answer over the cap an error naming the cap and the URL.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.get(&url);
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, t.header()?);
        }
        let mut r = req
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the controller at {url}: {e}"))?;
        let status = r.status();
        let body = self.read_capped(&mut r, &url).await?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<ApiError>(&body)
                .map_or_else(|_| status.to_string(), |e| e.error);
            anyhow::bail!("{url}: {msg}");
        }
        serde_json::from_slice(&body).map_err(|e| anyhow::anyhow!("{url}: unexpected answer: {e}"))
    }

    async fn read_capped(&self, r: &mut reqwest::Response, url: &str) -> anyhow::Result<Vec<u8>> {
        use crate::one::http::{read_capped, BodyError};
        read_capped(r, self.max_answer_bytes)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge { limit } => {
                    anyhow::anyhow!("{url}: the answer is larger than the {limit}-byte cap")
                }
                BodyError::Transport(e) => anyhow::anyhow!("{url}: reading the answer: {e}"),
            })
    }
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

    async fn server(
        shared: Shared,
        metrics: Arc<Metrics>,
        token: Option<BearerToken>,
    ) -> (String, tokio_util::sync::CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(crate::http_server::serve(
            listener,
            router(shared, metrics, token),
            crate::http_server::Limits::default(),
            stop.clone(),
        ));
        (base, stop)
    }

    fn client() -> reqwest::Client {
        crate::one::http::ensure_crypto_provider();
        reqwest::Client::new()
    }

    fn api(base: &str, token: Option<BearerToken>) -> ApiClient {
        ApiClient::new(base, token, std::time::Duration::from_secs(10)).unwrap()
    }

    fn token_file(dir: &std::path::Path, token: &str) -> BearerToken {
        let p = dir.join("token");
        std::fs::write(&p, format!("{token}\n")).unwrap();
        BearerToken::from_file(&p).unwrap()
    }

    #[tokio::test]
    async fn bearer_token_guards_everything_but_health() {
        // Every log line of this test, at trace level, on this (current-thread) runtime.
        let logs = crate::otel::tests::Buf::default();
        let w = logs.clone();
        let _guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_writer(move || w.clone())
                .finish(),
        );
        let dir = tempfile::tempdir().unwrap();
        let secret = "0123456789abcdef-the-token";
        let (base, stop) = server(
            Shared::default(),
            Arc::new(Metrics::new()),
            Some(token_file(dir.path(), secret)),
        )
        .await;
        let c = client();
        for path in ["/healthz", "/readyz"] {
            let r = c.get(format!("{base}{path}")).send().await.unwrap();
            assert_ne!(r.status(), 401, "{path} stays open for probes");
        }
        for path in [
            "/metrics",
            "/api/v1/clusters",
            "/api/v1/clusters/x",
            "/api/v1/sd",
        ] {
            let r = c.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 401, "{path} without a token");
            assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
            let r = c
                .get(format!("{base}{path}"))
                .bearer_auth("0123456789abcdef-the-tokem")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{path} with a wrong token");
        }
        let r = c
            .get(format!("{base}/metrics"))
            .bearer_auth(secret)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // The status client sends the token from its file; without it: the server's word.
        let list: ClusterList = api(&base, Some(token_file(dir.path(), secret)))
            .get_json("/api/v1/clusters")
            .await
            .unwrap();
        assert!(list.clusters.is_empty());
        let err = api(&base, None)
            .get_json::<ClusterList>("/api/v1/clusters")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing or wrong bearer token"), "{err}");
        stop.cancel();
        let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(
            logged.contains("without the right bearer token"),
            "{logged}"
        );
        assert!(!logged.contains("the-token"), "the token reached the logs");
    }

    #[tokio::test]
    async fn status_client_refuses_an_oversized_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        // A controller (or an impostor) answering 64 KiB of JSON, with and without a length.
        let big = format!("[{}0]", "0,".repeat(32 * 1024));
        let app = Router::new()
            .route(
                "/sized",
                get({
                    let big = big.clone();
                    move || async move { big }
                }),
            )
            .route(
                "/chunked",
                get(move || async move {
                    axum::body::Body::from_stream(futures::stream::iter(
                        big.into_bytes()
                            .chunks(4096)
                            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
                            .collect::<Vec<_>>(),
                    ))
                }),
            );
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(crate::http_server::serve(
            listener,
            app,
            crate::http_server::Limits::default(),
            stop.clone(),
        ));
        let small = api(&base, None).with_max_answer_bytes(16 * 1024);
        for path in ["/sized", "/chunked"] {
            let err = small
                .get_json::<Vec<u32>>(path)
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("16384-byte cap") && err.contains(&format!("{base}{path}")),
                "{err}"
            );
            let all: Vec<u32> = api(&base, None).get_json(path).await.unwrap();
            assert_eq!(all.len(), 32 * 1024 + 1);
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn health_readiness_metrics_and_cluster_api() {
        let shared = Shared::default();
        let metrics = Arc::new(Metrics::new());
        metrics.reconciled(true, std::time::Duration::from_millis(5), None);
        metrics.set_revision("git:file:///r", "0123abcd");
        let (base, stop) = server(shared.clone(), metrics, None).await;
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

        let a = api(&base, None);
        let list: ClusterList = a.get_json("/api/v1/clusters").await.unwrap();
        assert_eq!(list.source.revision.as_deref(), Some("0123abcd"));
        assert_eq!(list.clusters.len(), 1);
        let one: ClusterView = a.get_json("/api/v1/clusters/alpha").await.unwrap();
        assert_eq!(one.status.observed_revision.as_deref(), Some("0123abcd"));
        let err = a
            .get_json::<ClusterView>("/api/v1/clusters/nope")
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("no cluster named \"nope\""),
            "{err}"
        );
        let sd: serde_json::Value = a.get_json("/api/v1/sd").await.unwrap();
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
