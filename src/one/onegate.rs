//! OneGate client, used by `flower-agent` inside the appliance VMs (opennebula-api.md §3).
//!
//! Everything read back from OneGate is untrusted: bodies are capped
//! ([`OneGateConfig::max_body`]), JSON types are checked field by field, attribute values
//! are length-capped, and protocol values such as `FL_ENDPOINT` are only handed out
//! through validating accessors ([`GateVm::endpoint_attr`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use serde_json::{Map, Value};
use tracing::Instrument;
use url::Url;

use super::calls::{
    finish_span, http_span, redact_url, run_with_retry, ApiBudget, ApiStats, HttpApi, Outcome,
    Redactor, RetryPolicy, Retryable,
};
use super::http::{self, BodyError, DEFAULT_MAX_BODY};
use super::json::{self, FieldError};
use super::model::{LcmState, RoleState, ServiceState, VmState};
use super::secret::Secret;

/// Default per-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest attribute value accepted from or sent to OneGate.
pub const MAX_ATTRIBUTE_VALUE: usize = 256 * 1024;
/// Longest attribute name accepted for writing.
pub const MAX_ATTRIBUTE_NAME: usize = 128;

/// Errors of the OneGate client. Messages never hold the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OneGateError {
    /// The client could not be configured (missing variable, bad URL, CA bundle).
    #[error("OneGate configuration: {0}")]
    Config(String),
    /// Connection, TLS, timeout or body read failure.
    #[error("OneGate {route}: {message}")]
    Transport {
        /// Route template, e.g. `GET /vm`.
        route: &'static str,
        /// What happened (no credentials, no URL userinfo).
        message: String,
    },
    /// OneGate answered with a non-success HTTP status.
    #[error("OneGate {route}: HTTP {code}: {message}")]
    Status {
        /// Route template.
        route: &'static str,
        /// HTTP status code.
        code: u16,
        /// The (plain-text) body, trimmed and shortened.
        message: String,
    },
    /// The response body exceeded the configured cap.
    #[error("OneGate {route}: response body exceeds {limit} bytes")]
    TooLarge {
        /// Route template.
        route: &'static str,
        /// The cap in bytes.
        limit: usize,
    },
    /// The answer is not what OneGate sends: the field path says where.
    #[error("OneGate answer: {what}: {reason}")]
    Decode {
        /// Field path, e.g. `VM.TEMPLATE.NIC[0].IP`.
        what: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A value (to send, or read back) failed validation.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was checked (attribute name, field path).
        what: String,
        /// Why it was rejected.
        reason: String,
    },
}

impl OneGateError {
    fn outcome(&self) -> Outcome {
        match self {
            Self::Config(_) | Self::Invalid { .. } => Outcome::Invalid,
            Self::Transport { .. } => Outcome::Transport,
            Self::Status { .. } => Outcome::Error,
            Self::TooLarge { .. } | Self::Decode { .. } => Outcome::Decode,
        }
    }
}

impl Retryable for OneGateError {
    fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Transport { .. } | Self::Status { code: 503, .. }
        )
    }
}

impl From<FieldError> for OneGateError {
    fn from(e: FieldError) -> Self {
        Self::Decode {
            what: e.field,
            reason: e.reason,
        }
    }
}

/// OneGate connection settings.
#[derive(Debug, Clone)]
pub struct OneGateConfig {
    /// `ONEGATE_ENDPOINT`, e.g. `http://169.254.16.9:5030`.
    pub endpoint: Url,
    /// `TOKENTXT` (contents of the context CD's `token.txt`).
    pub token: Secret,
    /// `VMID`.
    pub vmid: u64,
    /// Timeout of every request.
    pub timeout: Duration,
    /// Extra CA certificates (PEM) for an https endpoint.
    pub ca_bundle: Option<PathBuf>,
    /// Cap on every response body.
    pub max_body: usize,
    /// Retries of GET requests.
    pub retry: RetryPolicy,
}

impl OneGateConfig {
    /// Settings from explicit values (what `/run/one-context/one_env` holds).
    pub fn new(endpoint: &str, token: &str, vmid: u64) -> Result<Self, OneGateError> {
        let endpoint = parse_endpoint_url(endpoint)?;
        let token = token.trim();
        if token.is_empty() {
            return Err(OneGateError::Config("empty OneGate token".into()));
        }
        if token.chars().any(|c| c.is_control()) {
            return Err(OneGateError::Config(
                "OneGate token holds control characters".into(),
            ));
        }
        Ok(Self {
            endpoint,
            token: Secret::new(token),
            vmid,
            timeout: DEFAULT_TIMEOUT,
            ca_bundle: None,
            max_body: DEFAULT_MAX_BODY,
            retry: RetryPolicy::default(),
        })
    }

    /// Settings from variables named like the guest `onegate` tool uses them:
    /// `ONEGATE_ENDPOINT`, `TOKENTXT` (or `ONEGATE_TOKEN`), `VMID`. `lookup` is e.g. a
    /// parsed `one_env` or [`std::env::var`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, OneGateError> {
        let need = |k: &str| {
            lookup(k)
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| OneGateError::Config(format!("{k} is not set")))
        };
        let endpoint = need("ONEGATE_ENDPOINT")?;
        let token = lookup("TOKENTXT")
            .filter(|v| !v.trim().is_empty())
            .or_else(|| lookup("ONEGATE_TOKEN").filter(|v| !v.trim().is_empty()))
            .ok_or_else(|| OneGateError::Config("TOKENTXT is not set".into()))?;
        let vmid_text = need("VMID")?;
        let vmid = vmid_text.trim().parse::<u64>().map_err(|_| {
            OneGateError::Config(format!(
                "VMID {:?} is not a number",
                json::shorten(&vmid_text)
            ))
        })?;
        Self::new(&endpoint, &token, vmid)
    }

    /// Settings from the process environment (see [`OneGateConfig::from_lookup`]).
    pub fn from_env() -> Result<Self, OneGateError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Set the per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

fn parse_endpoint_url(text: &str) -> Result<Url, OneGateError> {
    let url = Url::parse(text.trim()).map_err(|e| {
        OneGateError::Config(format!(
            "ONEGATE_ENDPOINT {:?} is not a URL: {e}",
            json::shorten(&super::calls::strip_userinfo_in_text(text))
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(OneGateError::Config(format!(
            "ONEGATE_ENDPOINT must be http or https, not {}",
            url.scheme()
        )));
    }
    Ok(url)
}

/// A NIC as OneGate shows it (only the keys OneGate keeps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GateNic {
    /// IPv4 address.
    pub ip: Option<IpAddr>,
    /// IPv6 global address.
    pub ip6_global: Option<IpAddr>,
    /// IPv6 link-local address.
    pub ip6_link: Option<IpAddr>,
    /// IPv6 site address.
    pub ip6_site: Option<IpAddr>,
    /// External (NAT) IP.
    pub external_ip: Option<IpAddr>,
    /// Virtual network name.
    pub network: Option<String>,
    /// MAC address.
    pub mac: Option<String>,
    /// NIC name, e.g. `NIC0`.
    pub name: Option<String>,
}

/// A VM as `GET /vm` / `GET /vms/:id` (or a service node's `vm_info`) shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateVm {
    /// VM id.
    pub id: u64,
    /// VM name.
    pub name: String,
    /// `STATE`, when shown.
    pub state: Option<VmState>,
    /// `LCM_STATE`, when shown.
    pub lcm_state: Option<LcmState>,
    /// Single-valued `USER_TEMPLATE` attributes in OpenNebula's order (`READY`,
    /// `SERVICE_ID`, `ROLE_NAME`, `FL_*`). Untrusted: use the validating accessors.
    pub user_template: IndexMap<String, String>,
    /// Vector and repeated `USER_TEMPLATE` attributes, kept as JSON.
    pub user_template_vectors: IndexMap<String, Value>,
    /// `TEMPLATE.NIC`.
    pub nics: Vec<GateNic>,
    /// `TEMPLATE.NIC_ALIAS`.
    pub nic_aliases: Vec<GateNic>,
}

pub use crate::protocol::endpoint::HostPort;

impl GateVm {
    /// A single-valued user-template attribute.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.user_template.get(key).map(String::as_str)
    }

    /// `USER_TEMPLATE/SERVICE_ID`, checked to be a number.
    pub fn service_id(&self) -> Result<Option<u64>, OneGateError> {
        self.attr("SERVICE_ID")
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| OneGateError::Invalid {
                    what: "USER_TEMPLATE.SERVICE_ID".into(),
                    reason: format!("{:?} is not a number", json::shorten(v)),
                })
            })
            .transpose()
    }

    /// `USER_TEMPLATE/ROLE_NAME`, checked against OneFlow's `^\w+$`.
    pub fn role_name(&self) -> Result<Option<&str>, OneGateError> {
        self.attr("ROLE_NAME")
            .map(|v| {
                if is_role_name(v) {
                    Ok(v)
                } else {
                    Err(OneGateError::Invalid {
                        what: "USER_TEMPLATE.ROLE_NAME".into(),
                        reason: format!("{:?} is not a role name", json::shorten(v)),
                    })
                }
            })
            .transpose()
    }

    /// A `host:port` attribute (e.g. `FL_ENDPOINT`), strictly validated: a value such as
    /// `10.0.0.1:9092; rm -rf /` is an [`OneGateError::Invalid`], never returned.
    pub fn endpoint_attr(&self, key: &str) -> Result<Option<HostPort>, OneGateError> {
        self.attr(key)
            .map(|v| {
                crate::protocol::endpoint::parse(v.trim()).map_err(|reason| OneGateError::Invalid {
                    what: format!("USER_TEMPLATE.{key}"),
                    reason,
                })
            })
            .transpose()
    }

    /// First IPv4 (or else IPv6 global) address of the first NIC that has one.
    pub fn first_ip(&self) -> Option<IpAddr> {
        self.nics.iter().find_map(|n| n.ip.or(n.ip6_global))
    }
}

fn is_role_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A service node (`roles[].nodes[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct GateNode {
    /// VM id (`deploy_id`).
    pub deploy_id: u64,
    /// `vm_info.VM`: six keys normally, the full VM with `extended=true`.
    pub vm: Option<GateVm>,
}

/// A service role.
#[derive(Debug, Clone, PartialEq)]
pub struct GateRole {
    /// Role name.
    pub name: String,
    /// Wanted number of VMs.
    pub cardinality: u64,
    /// Role state.
    pub state: RoleState,
    /// Current VMs.
    pub nodes: Vec<GateNode>,
}

/// The caller's OneFlow service as `GET /service` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct GateService {
    /// Service (document) id.
    pub id: u64,
    /// Service name.
    pub name: String,
    /// Service state.
    pub state: ServiceState,
    /// Roles.
    pub roles: Vec<GateRole>,
}

impl GateService {
    /// The role called `name`.
    pub fn role(&self, name: &str) -> Option<&GateRole> {
        self.roles.iter().find(|r| r.name == name)
    }
}

/// Validate an attribute name for writing: `^[A-Z][A-Z0-9_]*$`.
pub fn validate_attribute_name(key: &str) -> Result<(), OneGateError> {
    let mut chars = key.chars();
    let ok = key.len() <= MAX_ATTRIBUTE_NAME
        && chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(OneGateError::Invalid {
            what: format!("attribute name {:?}", json::shorten(key)),
            reason: "must match ^[A-Z][A-Z0-9_]*$ (at most 128 characters)".into(),
        })
    }
}

/// Render one `KEY=VALUE` line for `PUT /vm`, or refuse a value OneGate would mangle.
///
/// Guarantees: the line holds no newline or control character, so one attribute can never
/// inject another. Assumptions: OneGate quotes an unquoted value from `=` up to the next
/// `,`, `]` or newline (§3.4), and the oned lexer honours `\"` inside quotes.
/// Caveats: backslashes are refused outright (OneGate turns a literal `\n` into a newline),
/// and so are values holding both `=` and `,`/`]` (neither form stores them faithfully).
pub fn template_line(key: &str, value: &str) -> Result<String, OneGateError> {
    validate_attribute_name(key)?;
    let invalid = |reason: &str| OneGateError::Invalid {
        what: format!("value of {key}"),
        reason: reason.to_string(),
    };
    if value.len() > MAX_ATTRIBUTE_VALUE {
        return Err(invalid(&format!(
            "{} bytes, more than {MAX_ATTRIBUTE_VALUE}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid("must be a single line without control characters"));
    }
    if value.contains('\\') {
        return Err(invalid("backslashes are not supported by OneGate"));
    }
    let needs_quotes = value.contains([',', ']']) || value.starts_with(['[', '"']);
    if !needs_quotes {
        return Ok(format!("{key}={value}"));
    }
    if value.contains('=') {
        return Err(invalid(
            "a value with '=' and ',' or ']' cannot be stored faithfully through OneGate",
        ));
    }
    Ok(format!("{key}=\"{}\"", value.replace('"', "\\\"")))
}

/// The OneGate client. Cheap to clone.
#[derive(Clone)]
pub struct OneGateClient {
    http: reqwest::Client,
    cfg: Arc<OneGateConfig>,
    budget: Option<Arc<ApiBudget>>,
    stats: Arc<ApiStats>,
    redactor: Redactor,
}

impl std::fmt::Debug for OneGateClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneGateClient")
            .field("endpoint", &redact_url(&self.cfg.endpoint))
            .field("vmid", &self.cfg.vmid)
            .finish_non_exhaustive()
    }
}

/// Request description handed to the shared send path.
struct Req<'a> {
    route: &'static str,
    method: reqwest::Method,
    path: String,
    object_id: Option<u64>,
    form: Option<&'a [(&'a str, &'a str)]>,
    json: Option<Value>,
    query: Option<&'a [(&'a str, &'a str)]>,
}

impl<'a> Req<'a> {
    fn new(
        route: &'static str,
        method: reqwest::Method,
        path: String,
        object_id: Option<u64>,
    ) -> Self {
        Self {
            route,
            method,
            path,
            object_id,
            form: None,
            json: None,
            query: None,
        }
    }

    fn form(mut self, form: &'a [(&'a str, &'a str)]) -> Self {
        self.form = Some(form);
        self
    }

    fn json(mut self, json: Value) -> Self {
        self.json = Some(json);
        self
    }

    fn query(mut self, query: Option<&'a [(&'a str, &'a str)]>) -> Self {
        self.query = query;
        self
    }
}

impl OneGateClient {
    /// Build a client (no request is sent).
    pub fn new(cfg: OneGateConfig) -> Result<Self, OneGateError> {
        let http = http::build_client(
            cfg.timeout,
            cfg.ca_bundle.as_deref(),
            concat!("flower-agent/", env!("CARGO_PKG_VERSION")),
        )
        .map_err(OneGateError::Config)?;
        let redactor = Redactor::new([cfg.token.expose().to_string()]);
        Ok(Self {
            http,
            cfg: Arc::new(cfg),
            budget: None,
            stats: ApiStats::new(),
            redactor,
        })
    }

    /// Share a rate limiter with other clients.
    pub fn with_budget(mut self, budget: Arc<ApiBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Count calls into shared statistics.
    pub fn with_stats(mut self, stats: Arc<ApiStats>) -> Self {
        self.stats = stats;
        self
    }

    /// The statistics this client updates.
    pub fn stats(&self) -> &Arc<ApiStats> {
        &self.stats
    }

    /// The configured VM id.
    pub fn vmid(&self) -> u64 {
        self.cfg.vmid
    }

    /// `GET /vm`: the calling VM.
    pub async fn get_vm(&self) -> Result<GateVm, OneGateError> {
        let v = self
            .send_json(Req::new(
                "GET /vm",
                reqwest::Method::GET,
                "vm".into(),
                Some(self.cfg.vmid),
            ))
            .await?;
        parse_vm_document(&v)
    }

    /// `GET /vms/:id`: another VM of the same service.
    pub async fn get_vm_by_id(&self, id: u64) -> Result<GateVm, OneGateError> {
        let v = self
            .send_json(Req::new(
                "GET /vms/:id",
                reqwest::Method::GET,
                format!("vms/{id}"),
                Some(id),
            ))
            .await?;
        parse_vm_document(&v)
    }

    /// `PUT /vm` with merge (type 1): set `attrs` in the calling VM's user template. Every
    /// key and value is validated (see [`template_line`]) before anything is sent.
    pub async fn update_vm(&self, attrs: &[(&str, &str)]) -> Result<(), OneGateError> {
        if attrs.is_empty() {
            return Ok(());
        }
        let lines = attrs
            .iter()
            .map(|(k, v)| template_line(k, v))
            .collect::<Result<Vec<_>, _>>()?;
        self.put_vm("PUT /vm", &lines.join("\n"), "1").await
    }

    /// `PUT /vm` with type 2: delete one user-template attribute (OneGate answers 500
    /// `attribute not found` if it is absent).
    pub async fn delete_vm_attribute(&self, key: &str) -> Result<(), OneGateError> {
        validate_attribute_name(key)?;
        self.put_vm("PUT /vm (delete)", key, "2").await
    }

    /// `PUT /vm` form `data` + `type` (1 merge, 2 delete) on the calling VM.
    async fn put_vm(
        &self,
        route: &'static str,
        data: &str,
        kind: &str,
    ) -> Result<(), OneGateError> {
        let form = [("data", data), ("type", kind)];
        let put = Req::new(
            route,
            reqwest::Method::PUT,
            "vm".into(),
            Some(self.cfg.vmid),
        );
        self.send(put.form(&form)).await.map(drop)
    }

    /// `GET /service` (`extended=true` includes every node's full VM, hence peers'
    /// user templates).
    pub async fn get_service(&self, extended: bool) -> Result<GateService, OneGateError> {
        let query = [("extended", "true")];
        let v = self
            .send_json(
                Req::new("GET /service", reqwest::Method::GET, "service".into(), None)
                    .query(extended.then_some(&query[..])),
            )
            .await?;
        parse_service_document(&v)
    }

    /// `PUT /service/role/:role` `{"cardinality": N}` (OneGate forwards it to OneFlow's
    /// scale with `force: false`).
    pub async fn scale_role(&self, role: &str, cardinality: u64) -> Result<(), OneGateError> {
        if !is_role_name(role) {
            return Err(OneGateError::Invalid {
                what: format!("role name {:?}", json::shorten(role)),
                reason: "must match ^\\w+$".into(),
            });
        }
        self.send(
            Req::new(
                "PUT /service/role/:role",
                reqwest::Method::PUT,
                format!("service/role/{role}"),
                None,
            )
            .json(serde_json::json!({ "cardinality": cardinality })),
        )
        .await
        .map(drop)
    }

    async fn send_json(&self, req: Req<'_>) -> Result<Value, OneGateError> {
        let body = self.send(req).await?;
        serde_json::from_slice(&body).map_err(|e| OneGateError::Decode {
            what: "response body".into(),
            reason: format!("not JSON: {e}"),
        })
    }

    /// The one send path: budget, span, stats, retries (GET only), body cap.
    async fn send(&self, req: Req<'_>) -> Result<Vec<u8>, OneGateError> {
        let span = http_span(
            HttpApi::OneGate,
            req.route,
            &self.cfg.endpoint,
            req.object_id.and_then(|id| i64::try_from(id).ok()),
        );
        let started = Instant::now();
        let idempotent = req.method == reqwest::Method::GET;
        let result = run_with_retry(idempotent, &self.cfg.retry, || self.attempt(&req))
            .instrument(span.clone())
            .await;
        let outcome = result
            .as_ref()
            .map_or_else(OneGateError::outcome, |_| Outcome::Ok);
        finish_span(&span, outcome, started);
        if let Err(e) = &result {
            span.in_scope(|| tracing::debug!(error = %e, "OneGate call failed"));
        }
        result
    }

    async fn attempt(&self, req: &Req<'_>) -> Result<Vec<u8>, OneGateError> {
        if let Some(b) = &self.budget {
            b.acquire().await;
        }
        let started = Instant::now();
        let result = self.attempt_once(req).await;
        let outcome = result
            .as_ref()
            .map_or_else(OneGateError::outcome, |_| Outcome::Ok);
        self.stats.record(req.route, outcome, started.elapsed());
        result
    }

    async fn attempt_once(&self, req: &Req<'_>) -> Result<Vec<u8>, OneGateError> {
        let route = req.route;
        let url = join_url(&self.cfg.endpoint, &req.path);
        let mut rb = self
            .http
            .request(req.method.clone(), url)
            .header("X-ONEGATE-TOKEN", self.cfg.token.expose())
            .header("X-ONEGATE-VMID", self.cfg.vmid.to_string())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(q) = req.query {
            rb = rb.query(q);
        }
        if let Some(f) = req.form {
            rb = rb.form(f);
        }
        if let Some(j) = &req.json {
            rb = rb.json(j);
        }
        let mut resp = rb.send().await.map_err(|e| OneGateError::Transport {
            route,
            message: self.redactor.clean(&http::describe_reqwest(&e)),
        })?;
        let status = resp.status();
        tracing::Span::current().record("http.response.status_code", status.as_u16());
        let body = http::read_capped(&mut resp, self.cfg.max_body)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge { limit } => OneGateError::TooLarge { route, limit },
                BodyError::Transport(m) => OneGateError::Transport {
                    route,
                    message: self.redactor.clean(&m),
                },
            })?;
        if !status.is_success() {
            return Err(OneGateError::Status {
                route,
                code: status.as_u16(),
                message: self.redactor.clean(&http::body_message(&body)),
            });
        }
        Ok(body)
    }
}

fn join_url(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let joined = format!("{}/{}", base.path().trim_end_matches('/'), path);
    url.set_path(&joined);
    url
}

/// Parse `{"VM": {...}}`.
pub fn parse_vm_document(v: &Value) -> Result<GateVm, OneGateError> {
    let root = json::as_object(v, "response")?;
    let vm = json::field(root, "response", "VM")?;
    Ok(parse_vm(vm, "VM")?)
}

fn opt_state<T: From<i64>>(
    obj: &Map<String, Value>,
    path: &str,
    key: &str,
) -> json::FieldResult<Option<T>> {
    obj.get(key)
        .map(|v| json::int(v, &format!("{path}.{key}")).map(T::from))
        .transpose()
}

fn parse_vm(v: &Value, path: &str) -> json::FieldResult<GateVm> {
    let obj = json::as_object(v, path)?;
    let id = json::uint(json::field(obj, path, "ID")?, &format!("{path}.ID"))?;
    let name = match obj.get("NAME") {
        Some(n) => json::string(n, &format!("{path}.NAME"))?,
        None => String::new(),
    };
    let mut vm = GateVm {
        id,
        name,
        state: opt_state(obj, path, "STATE")?,
        lcm_state: opt_state(obj, path, "LCM_STATE")?,
        ..GateVm::default()
    };
    if let Some(ut) = obj.get("USER_TEMPLATE") {
        let ut_path = format!("{path}.USER_TEMPLATE");
        let ut = json::as_object(ut, &ut_path)?;
        for (k, val) in ut {
            let p = format!("{ut_path}.{k}");
            match val {
                Value::String(s) => {
                    if s.len() > MAX_ATTRIBUTE_VALUE {
                        return Err(FieldError::new(
                            p,
                            format!(
                                "value is {} bytes, more than {MAX_ATTRIBUTE_VALUE}",
                                s.len()
                            ),
                        ));
                    }
                    vm.user_template.insert(k.clone(), s.clone());
                }
                Value::Object(_) | Value::Array(_) => {
                    vm.user_template_vectors.insert(k.clone(), val.clone());
                }
                other => {
                    return Err(FieldError::new(
                        p,
                        format!("expected a string, found {}", json::type_name(other)),
                    ))
                }
            }
        }
    }
    if let Some(t) = obj.get("TEMPLATE") {
        let t_path = format!("{path}.TEMPLATE");
        let t = json::as_object(t, &t_path)?;
        vm.nics = parse_nics(t, &t_path, "NIC")?;
        vm.nic_aliases = parse_nics(t, &t_path, "NIC_ALIAS")?;
    }
    Ok(vm)
}

fn parse_nics(t: &Map<String, Value>, path: &str, key: &str) -> json::FieldResult<Vec<GateNic>> {
    let Some(v) = t.get(key) else {
        return Ok(Vec::new());
    };
    let base = format!("{path}.{key}");
    // OneGate always sends arrays; a single object is tolerated.
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(_) => vec![v],
        other => {
            return Err(FieldError::new(
                base,
                format!("expected an array, found {}", json::type_name(other)),
            ))
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, nic)| parse_nic(nic, &format!("{base}[{i}]")))
        .collect()
}

fn parse_nic(v: &Value, path: &str) -> json::FieldResult<GateNic> {
    let obj = json::as_object(v, path)?;
    let text = |k: &str| -> json::FieldResult<Option<String>> {
        obj.get(k)
            .map(|v| json::string(v, &format!("{path}.{k}")))
            .transpose()
    };
    let ip = |k: &str| -> json::FieldResult<Option<IpAddr>> {
        match text(k)? {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => s.parse::<IpAddr>().map(Some).map_err(|_| {
                FieldError::new(
                    format!("{path}.{k}"),
                    format!("{:?} is not an IP address", json::shorten(&s)),
                )
            }),
        }
    };
    Ok(GateNic {
        ip: ip("IP")?,
        ip6_global: ip("IP6_GLOBAL")?,
        ip6_link: ip("IP6_LINK")?,
        ip6_site: ip("IP6_SITE")?,
        external_ip: ip("EXTERNAL_IP")?,
        network: text("NETWORK")?,
        mac: text("MAC")?,
        name: text("NAME")?,
    })
}

/// Parse `{"SERVICE": {...}}`.
pub fn parse_service_document(v: &Value) -> Result<GateService, OneGateError> {
    let root = json::as_object(v, "response")?;
    let svc = json::as_object(json::field(root, "response", "SERVICE")?, "SERVICE")?;
    let p = "SERVICE";
    let id = json::uint(json::field(svc, p, "id")?, "SERVICE.id")?;
    let name = json::string(json::field(svc, p, "name")?, "SERVICE.name")?;
    let state = ServiceState::from(json::int(json::field(svc, p, "state")?, "SERVICE.state")?);
    let mut roles = Vec::new();
    if let Some(rs) = svc.get("roles") {
        for (i, r) in json::array(rs, "SERVICE.roles")?.iter().enumerate() {
            roles.push(parse_role(r, &format!("SERVICE.roles[{i}]"))?);
        }
    }
    Ok(GateService {
        id,
        name,
        state,
        roles,
    })
}

fn parse_role(v: &Value, path: &str) -> json::FieldResult<GateRole> {
    let obj = json::as_object(v, path)?;
    let name = json::string(json::field(obj, path, "name")?, &format!("{path}.name"))?;
    let cardinality = match obj.get("cardinality") {
        Some(c) => json::uint(c, &format!("{path}.cardinality"))?,
        None => 0,
    };
    let state = match obj.get("state") {
        Some(s) => RoleState::from(json::int(s, &format!("{path}.state"))?),
        None => RoleState::Pending,
    };
    let mut nodes = Vec::new();
    if let Some(ns) = obj.get("nodes") {
        for (i, n) in json::array(ns, &format!("{path}.nodes"))?
            .iter()
            .enumerate()
        {
            let np = format!("{path}.nodes[{i}]");
            let nobj = json::as_object(n, &np)?;
            let deploy_id = json::uint(
                json::field(nobj, &np, "deploy_id")?,
                &format!("{np}.deploy_id"),
            )?;
            let vm = match nobj.get("vm_info") {
                None | Some(Value::Null) => None,
                Some(info) => {
                    let ip = format!("{np}.vm_info");
                    let iobj = json::as_object(info, &ip)?;
                    Some(parse_vm(
                        json::field(iobj, &ip, "VM")?,
                        &format!("{ip}.VM"),
                    )?)
                }
            };
            nodes.push(GateNode { deploy_id, vm });
        }
    }
    Ok(GateRole {
        name,
        cardinality,
        state,
        nodes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_lines_are_plain_or_quoted() {
        assert_eq!(template_line("READY", "YES").unwrap(), "READY=YES");
        assert_eq!(
            template_line("FL_CA_CERT", "TUlJQ2F6Q0NBZFNnQXdJQkFnSUJBREFOQmc==").unwrap(),
            "FL_CA_CERT=TUlJQ2F6Q0NBZFNnQXdJQkFnSUJBREFOQmc=="
        );
        assert_eq!(
            template_line("FL_ERROR", "refused, \"retrying\"").unwrap(),
            "FL_ERROR=\"refused, \\\"retrying\\\"\""
        );
        assert_eq!(template_line("FL_ERROR", "").unwrap(), "FL_ERROR=");
    }

    #[test]
    fn template_lines_refuse_injection() {
        for (k, v) in [
            ("READY", "YES\nSERVICE_ID=9"),
            ("READY", "YES\r"),
            ("READY", "a\\nb"),
            ("X", "a=b,c"),
            ("lower", "x"),
            ("1X", "x"),
            ("X Y", "x"),
            ("", "x"),
        ] {
            let e = template_line(k, v).unwrap_err();
            assert!(matches!(e, OneGateError::Invalid { .. }), "{k}={v:?}: {e}");
        }
        let big = "A".repeat(MAX_ATTRIBUTE_VALUE + 1);
        assert!(template_line("X", &big).is_err());
    }

    #[test]
    fn endpoint_attributes_go_through_the_protocol_codec() {
        let mut vm = GateVm {
            id: 1,
            name: "x".into(),
            state: None,
            lcm_state: None,
            user_template: IndexMap::new(),
            user_template_vectors: IndexMap::new(),
            nics: Vec::new(),
            nic_aliases: Vec::new(),
        };
        vm.user_template
            .insert("FL_ENDPOINT".into(), "[fd00::1]:9092".into());
        let hp = vm.endpoint_attr("FL_ENDPOINT").unwrap().unwrap();
        assert_eq!((hp.host.as_str(), hp.port), ("fd00::1", 9092));
        vm.user_template
            .insert("FL_ENDPOINT".into(), "10.0.0.1:9092; rm -rf /".into());
        assert!(matches!(
            vm.endpoint_attr("FL_ENDPOINT"),
            Err(OneGateError::Invalid { .. })
        ));
    }

    #[test]
    fn config_from_lookup() {
        let vars = [
            ("ONEGATE_ENDPOINT", "http://169.254.16.9:5030"),
            ("TOKENTXT", "c2VjcmV0dG9rZW4="),
            ("VMID", "42"),
        ];
        let cfg = OneGateConfig::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
        .unwrap();
        assert_eq!(cfg.vmid, 42);
        assert!(!format!("{cfg:?}").contains("c2VjcmV0dG9rZW4"));
        let e = OneGateConfig::from_lookup(|k| (k == "VMID").then(|| "x".into())).unwrap_err();
        assert!(e.to_string().contains("ONEGATE_ENDPOINT"), "{e}");
    }
}
