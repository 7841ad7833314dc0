//! Shared call plumbing: the API budget (one rate limiter for every client), per-call
//! statistics, retry policy for idempotent reads, the client span of every call, and
//! redaction of anything that may hold a credential.
//!
//! Spans ([`rpc_span`], [`http_span`], [`finish_span`]) carry the OpenTelemetry
//! semantic-convention attributes (`rpc.system`, `rpc.method`, `http.request.method`,
//! `url.template`, `server.address`, `server.port`, `http.response.status_code`,
//! `error.type`) and nothing else from the request: never a parameter, a body, a header
//! or URL userinfo. Their fields are computed only when a subscriber wants the span.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// OpenNebula's guidance is ≤ 30 req/s per oned; 20 leaves room for OneFlow's own calls.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 20;

/// One client-side rate limiter shared (through an [`Arc`]) by every client that talks to
/// the same OpenNebula front-end. Each request waits for a token before it is sent.
pub struct ApiBudget {
    limiter: DefaultDirectRateLimiter,
    per_second: NonZeroU32,
}

impl ApiBudget {
    /// A budget of `per_second` requests per second (burst of the same size).
    pub fn new(per_second: NonZeroU32) -> Arc<Self> {
        Arc::new(Self {
            limiter: RateLimiter::direct(Quota::per_second(per_second)),
            per_second,
        })
    }

    /// The default budget: [`DEFAULT_REQUESTS_PER_SECOND`].
    pub fn default_shared() -> Arc<Self> {
        Self::new(NonZeroU32::new(DEFAULT_REQUESTS_PER_SECOND).unwrap_or(NonZeroU32::MIN))
    }

    /// Configured requests per second.
    pub fn per_second(&self) -> u32 {
        self.per_second.get()
    }

    /// Wait until one request may be sent.
    pub async fn acquire(&self) {
        self.limiter.until_ready().await;
    }
}

impl fmt::Debug for ApiBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiBudget")
            .field("per_second", &self.per_second)
            .finish()
    }
}

/// How a call ended, as recorded in spans and [`ApiStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Success.
    Ok,
    /// The server answered with an error (oned error array, HTTP 4xx/5xx).
    Error,
    /// An XML-RPC `<fault>`.
    Fault,
    /// Connection, TLS, timeout or body-read failure.
    Transport,
    /// The answer could not be decoded or failed validation.
    Decode,
    /// The request was refused locally before sending (invalid input).
    Invalid,
}

impl Outcome {
    /// Stable lower-case label (used as a metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Fault => "fault",
            Outcome::Transport => "transport",
            Outcome::Decode => "decode",
            Outcome::Invalid => "invalid",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Default)]
struct Counter {
    calls: AtomicU64,
    micros: AtomicU64,
}

/// Per-(method, outcome) call counters shared by all clients; the controller exports a
/// [`ApiStats::snapshot`] as Prometheus metrics.
#[derive(Default)]
pub struct ApiStats {
    counters: RwLock<HashMap<(&'static str, Outcome), Arc<Counter>>>,
}

/// One row of [`ApiStats::snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct StatsEntry {
    /// `one.vm.info`, or an HTTP route such as `GET /service/:id`.
    pub method: &'static str,
    /// How the calls ended.
    pub outcome: Outcome,
    /// Number of calls (each retry attempt counts once).
    pub calls: u64,
    /// Total wall time of those calls.
    pub total: Duration,
}

impl ApiStats {
    /// A fresh, shareable set of counters.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Count one call.
    pub fn record(&self, method: &'static str, outcome: Outcome, elapsed: Duration) {
        let key = (method, outcome);
        let existing = self.counters.read().ok().and_then(|m| m.get(&key).cloned());
        let counter = match existing {
            Some(c) => c,
            None => match self.counters.write() {
                Ok(mut m) => m.entry(key).or_default().clone(),
                Err(_) => return,
            },
        };
        counter.calls.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        counter.micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Calls counted for `method` with any outcome.
    pub fn calls(&self, method: &str) -> u64 {
        self.snapshot()
            .iter()
            .filter(|e| e.method == method)
            .map(|e| e.calls)
            .sum()
    }

    /// All counters, sorted by method then outcome.
    pub fn snapshot(&self) -> Vec<StatsEntry> {
        let Ok(map) = self.counters.read() else {
            return Vec::new();
        };
        let mut out: Vec<StatsEntry> = map
            .iter()
            .map(|(&(method, outcome), c)| StatsEntry {
                method,
                outcome,
                calls: c.calls.load(Ordering::Relaxed),
                total: Duration::from_micros(c.micros.load(Ordering::Relaxed)),
            })
            .collect();
        out.sort_by(|a, b| (a.method, a.outcome).cmp(&(b.method, b.outcome)));
        out
    }
}

impl fmt::Debug for ApiStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.snapshot()).finish()
    }
}

/// Retries for idempotent reads only: jittered exponential backoff.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 = never retry).
    pub max_retries: usize,
    /// First delay.
    pub min_delay: Duration,
    /// Upper bound of a single delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    pub(crate) fn backoff(&self) -> backon::ExponentialBuilder {
        backon::ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_retries)
    }
}

/// Whether an error is worth retrying (for idempotent requests only).
pub(crate) trait Retryable {
    fn is_retryable(&self) -> bool;
}

/// Run `attempt` once, or — when `idempotent` — retry it per `policy` while the error is
/// retryable. Mutations are never retried: a lost answer may mean the action happened.
pub(crate) async fn run_with_retry<T, E, F, Fut>(
    idempotent: bool,
    policy: &RetryPolicy,
    attempt: F,
) -> Result<T, E>
where
    E: Retryable,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    use backon::Retryable as _;
    let mut attempt = attempt;
    if !idempotent || policy.max_retries == 0 {
        return attempt().await;
    }
    attempt
        .retry(policy.backoff())
        .sleep(tokio::time::sleep)
        .when(|e: &E| e.is_retryable())
        .await
}

/// Replaces known secrets and URL userinfo in text that may reach an error or a log.
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub(crate) fn new<I, S>(secrets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            secrets: secrets
                .into_iter()
                .map(Into::into)
                // Very short secrets would mangle ordinary text; they are still never
                // formatted by this crate, this is defence in depth only.
                .filter(|s| s.len() >= 3)
                .collect(),
        }
    }

    pub(crate) fn clean(&self, text: &str) -> String {
        let mut out = strip_userinfo_in_text(text);
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

/// `scheme://user:pass@host/…` → `scheme://***@host/…` everywhere in `text`.
pub fn strip_userinfo_in_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == ')')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***@");
                out.push_str(&authority[at + 1..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// A URL with any userinfo removed, for spans and errors.
pub fn redact_url(url: &url::Url) -> String {
    let mut u = url.clone();
    if !u.username().is_empty() || u.password().is_some() {
        let _ = u.set_username("");
        let _ = u.set_password(None);
    }
    u.to_string()
}

/// The client span of one oned XML-RPC call `method` to `server` (span name: the method).
pub(crate) fn rpc_span(
    method: &'static str,
    server: &url::Url,
    object_id: Option<i64>,
) -> tracing::Span {
    tracing::info_span!(
        "oned",
        otel.name = method,
        otel.kind = "client",
        rpc.system = "xmlrpc",
        rpc.service = "one",
        rpc.method = method,
        server.address = server.host_str().unwrap_or_default(),
        server.port = server.port_or_known_default(),
        object.id = object_id,
        error.type = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        outcome = tracing::field::Empty,
        duration_ms = tracing::field::Empty,
    )
}

/// Which HTTP API a call goes to (the span's name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HttpApi {
    /// The OneFlow server.
    OneFlow,
    /// The OneGate server.
    OneGate,
}

/// The client span of one HTTP call labelled `route` (`"VERB /pattern/:id"`, span name)
/// to `server`.
pub(crate) fn http_span(
    api: HttpApi,
    route: &'static str,
    server: &url::Url,
    object_id: Option<i64>,
) -> tracing::Span {
    macro_rules! span {
        ($name:literal) => {
            tracing::info_span!(
                $name,
                otel.name = route,
                otel.kind = "client",
                http.request.method = route.split(' ').next().unwrap_or_default(),
                url.template = url_template(route),
                server.address = server.host_str().unwrap_or_default(),
                server.port = server.port_or_known_default(),
                object.id = object_id,
                http.response.status_code = tracing::field::Empty,
                error.type = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                outcome = tracing::field::Empty,
                duration_ms = tracing::field::Empty,
            )
        };
    }
    match api {
        HttpApi::OneFlow => span!("oneflow"),
        HttpApi::OneGate => span!("onegate"),
    }
}

/// `url.template` of a route label: `"POST /service/:id/action"` → `/service/{id}/action`.
fn url_template(route: &str) -> String {
    let path = route.split_once(' ').map_or(route, |(_, p)| p);
    path.split('/')
        .map(|seg| match seg.strip_prefix(':') {
            Some(name) => format!("{{{name}}}"),
            None => seg.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Record how the call of `span` ended: outcome, duration, and on failure `error.type`
/// (the outcome label) with an error status.
pub(crate) fn finish_span(span: &tracing::Span, outcome: Outcome, started: Instant) {
    span.record("outcome", outcome.as_str());
    span.record("duration_ms", started.elapsed().as_millis() as u64);
    if outcome != Outcome::Ok {
        span.record("error.type", outcome.as_str());
        span.record("otel.status_code", "error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_templates_name_their_parameters_the_semantic_convention_way() {
        assert_eq!(
            url_template("POST /service/:id/action"),
            "/service/{id}/action"
        );
        assert_eq!(url_template("GET /service"), "/service");
        assert_eq!(
            url_template("PUT /service/role/:role"),
            "/service/role/{role}"
        );
    }

    #[test]
    fn userinfo_is_stripped_from_text() {
        let s = "error sending request for url (http://oneadmin:s3cret@front:2633/RPC2): refused";
        let c = strip_userinfo_in_text(s);
        assert!(!c.contains("s3cret"), "{c}");
        assert!(c.contains("http://***@front:2633/RPC2"), "{c}");
    }

    #[test]
    fn redactor_replaces_secrets() {
        let r = Redactor::new(["hunter22"]);
        assert_eq!(r.clean("bad hunter22 x"), "bad *** x");
    }

    #[test]
    fn stats_count_per_method_and_outcome() {
        let s = ApiStats::new();
        s.record("one.vm.info", Outcome::Ok, Duration::from_millis(2));
        s.record("one.vm.info", Outcome::Ok, Duration::from_millis(3));
        s.record("one.vm.info", Outcome::Error, Duration::from_millis(1));
        let snap = s.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[0].calls, 2);
        assert_eq!(snap[0].total, Duration::from_millis(5));
        assert_eq!(s.calls("one.vm.info"), 3);
    }
}
