//! OneFlow REST client (opennebula-api.md §2): service templates and services as
//! DOCUMENT-wrapped JSON. Bodies stay `serde_json::Value` (unknown keys survive round
//! trips) with typed accessors for what a controller reads; both template dialects
//! (6.x `vm_template`/`vm_template_contents`, 7.x `template_id`/`template_contents`).

use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tracing::Instrument;

use super::calls::{
    finish_span, http_span, redact_url, run_with_retry, ApiBudget, ApiStats, HttpApi, Outcome,
    Redactor, RetryPolicy, Retryable,
};
use super::config::OneConfig;
use super::http::{self, BodyError};
use super::json::{self, FieldError};
use super::model::{RoleState, ServiceState};
use super::secret::Secret;

/// Errors of the OneFlow client. OneFlow's status mapping is inverted with respect to
/// HTTP: oned AUTHORIZATION → 401, oned AUTHENTICATION → 403 (§2.1). Messages never hold
/// the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OneFlowError {
    /// The client could not be configured.
    #[error("OneFlow configuration: {0}")]
    Config(String),
    /// A request was refused before sending.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was checked.
        what: String,
        /// Why.
        reason: String,
    },
    /// Connection, TLS, timeout or body read failure.
    #[error("OneFlow {route}: {message}")]
    Transport {
        /// Route template.
        route: &'static str,
        /// What happened.
        message: String,
    },
    /// HTTP 401: not authorized (oned AUTHORIZATION), or missing/invalid Basic credentials.
    #[error("OneFlow {route}: not authorized (401): {message}")]
    Authorization {
        /// Route template.
        route: &'static str,
        /// OneFlow's message.
        message: String,
    },
    /// HTTP 403: oned could not authenticate the session (AUTHENTICATION).
    #[error("OneFlow {route}: authentication failed (403): {message}")]
    Authentication {
        /// Route template.
        route: &'static str,
        /// OneFlow's message.
        message: String,
    },
    /// HTTP 404: no such service / template (or route).
    #[error("OneFlow {route}: not found: {message}")]
    NotFound {
        /// Route template.
        route: &'static str,
        /// OneFlow's message.
        message: String,
    },
    /// HTTP 400: the body failed OneFlow's validation.
    #[error("OneFlow {route}: rejected (400): {message}")]
    Validation {
        /// Route template.
        route: &'static str,
        /// OneFlow's message.
        message: String,
    },
    /// Any other status (OneFlow answers 500 for wrong state and most failures).
    #[error("OneFlow {route}: HTTP {code}: {message}")]
    Status {
        /// Route template.
        route: &'static str,
        /// HTTP status.
        code: u16,
        /// OneFlow's message.
        message: String,
    },
    /// The answer exceeded the configured cap.
    #[error("OneFlow {route}: answer exceeds {limit} bytes")]
    TooLarge {
        /// Route template.
        route: &'static str,
        /// The cap.
        limit: usize,
    },
    /// The answer is not what OneFlow sends.
    #[error("OneFlow answer: {what}: {reason}")]
    Decode {
        /// Field path.
        what: String,
        /// Why.
        reason: String,
    },
}

impl OneFlowError {
    fn outcome(&self) -> Outcome {
        match self {
            Self::Config(_) | Self::Invalid { .. } => Outcome::Invalid,
            Self::Transport { .. } => Outcome::Transport,
            Self::TooLarge { .. } | Self::Decode { .. } => Outcome::Decode,
            _ => Outcome::Error,
        }
    }

    /// HTTP 404.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }
}

impl Retryable for OneFlowError {
    fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Transport { .. } | Self::Status { code: 503, .. }
        )
    }
}

impl From<FieldError> for OneFlowError {
    fn from(e: FieldError) -> Self {
        Self::Decode {
            what: e.field,
            reason: e.reason,
        }
    }
}

/// Map a non-success answer to an error (the 401/403 inversion lives here).
pub(crate) fn status_error(route: &'static str, code: u16, body: &[u8]) -> OneFlowError {
    // Uncaught exceptions come as JSON {"message":…, "reason":…}; everything else is text.
    let message = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => {
            let pick = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_string);
            match (pick("message"), pick("reason")) {
                (Some(m), Some(r)) => http::body_message(format!("{m}: {r}").as_bytes()),
                (Some(m), None) => http::body_message(m.as_bytes()),
                _ => http::body_message(body),
            }
        }
        _ => http::body_message(body),
    };
    match code {
        400 => OneFlowError::Validation { route, message },
        401 => OneFlowError::Authorization { route, message },
        403 => OneFlowError::Authentication { route, message },
        404 => OneFlowError::NotFound { route, message },
        code => OneFlowError::Status {
            route,
            code,
            message,
        },
    }
}

/// A OneFlow DOCUMENT: owner fields (sent as strings) plus the JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowDocument {
    /// Document id.
    pub id: i64,
    /// Document name.
    pub name: String,
    /// Owner id.
    pub uid: i64,
    /// Group id.
    pub gid: i64,
    /// Owner name.
    pub uname: String,
    /// Group name.
    pub gname: String,
    /// 100 = service, 101 = service template.
    pub doc_type: i64,
    /// `TEMPLATE.BODY`, untouched.
    pub body: Value,
}

fn opt_string(obj: &Map<String, Value>, path: &str, key: &str) -> Result<String, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(v) => json::string(v, &format!("{path}.{key}")),
    }
}

fn opt_int(obj: &Map<String, Value>, path: &str, key: &str) -> Result<Option<i64>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => json::int(v, &format!("{path}.{key}")).map(Some),
    }
}

fn opt_uint(obj: &Map<String, Value>, path: &str, key: &str) -> Result<Option<u64>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => json::uint(v, &format!("{path}.{key}")).map(Some),
    }
}

impl FlowDocument {
    /// Parse a `DOCUMENT` object found at `path`, moving its body out (a pool listing can
    /// hold thousands; copying them doubled the controller's peak memory).
    fn from_value(mut v: Value, path: &str) -> Result<Self, FieldError> {
        let d = json::as_object(&v, path)?;
        let id = json::int(json::field(d, path, "ID")?, &format!("{path}.ID"))?;
        let template = json::as_object(
            json::field(d, path, "TEMPLATE")?,
            &format!("{path}.TEMPLATE"),
        )?;
        let body = json::field(template, &format!("{path}.TEMPLATE"), "BODY")?;
        json::as_object(body, &format!("{path}.TEMPLATE.BODY"))?;
        let mut doc = Self {
            id,
            name: opt_string(d, path, "NAME")?,
            uid: opt_int(d, path, "UID")?.unwrap_or(-1),
            gid: opt_int(d, path, "GID")?.unwrap_or(-1),
            uname: opt_string(d, path, "UNAME")?,
            gname: opt_string(d, path, "GNAME")?,
            doc_type: opt_int(d, path, "TYPE")?.unwrap_or(-1),
            body: Value::Null,
        };
        if let Some(body) = v.pointer_mut("/TEMPLATE/BODY") {
            doc.body = body.take();
        }
        Ok(doc)
    }

    fn body_obj(&self) -> Result<&Map<String, Value>, FieldError> {
        json::as_object(&self.body, "BODY")
    }

    /// `BODY.name`.
    pub fn body_name(&self) -> Option<&str> {
        self.body.get("name").and_then(Value::as_str)
    }

    /// `BODY.roles`, typed (either dialect).
    pub fn roles(&self) -> Result<Vec<FlowRole>, OneFlowError> {
        let body = self.body_obj()?;
        let Some(roles) = body.get("roles") else {
            return Ok(Vec::new());
        };
        json::array(roles, "BODY.roles")?
            .iter()
            .enumerate()
            .map(|(i, r)| FlowRole::from_value(r, &format!("BODY.roles[{i}]")).map_err(Into::into))
            .collect()
    }
}

/// A node of a role (`roles[].nodes[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowNode {
    /// VM id.
    pub deploy_id: i64,
    /// `vm_info.VM.NAME`, when present.
    pub vm_name: Option<String>,
}

/// The parts of a role a controller reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRole {
    /// Role name.
    pub name: String,
    /// Wanted number of VMs (default 0).
    pub cardinality: u64,
    /// Role state (services only).
    pub state: Option<RoleState>,
    /// `min_vms`.
    pub min_vms: Option<u64>,
    /// `max_vms`.
    pub max_vms: Option<u64>,
    /// VM template id: 7.x `template_id` or 6.x `vm_template`.
    pub template_id: Option<i64>,
    /// Current VMs (services only).
    pub nodes: Vec<FlowNode>,
}

impl FlowRole {
    fn from_value(v: &Value, path: &str) -> Result<Self, FieldError> {
        let r = json::as_object(v, path)?;
        let name = json::string(json::field(r, path, "name")?, &format!("{path}.name"))?;
        let template_id = match opt_int(r, path, "template_id")? {
            Some(id) => Some(id),
            None => opt_int(r, path, "vm_template")?,
        };
        let mut nodes = Vec::new();
        if let Some(ns) = r.get("nodes") {
            for (i, n) in json::array(ns, &format!("{path}.nodes"))?
                .iter()
                .enumerate()
            {
                let np = format!("{path}.nodes[{i}]");
                let no = json::as_object(n, &np)?;
                let deploy_id = json::int(
                    json::field(no, &np, "deploy_id")?,
                    &format!("{np}.deploy_id"),
                )?;
                let vm_name = no
                    .get("vm_info")
                    .and_then(|i| i.get("VM"))
                    .and_then(|vm| vm.get("NAME"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                nodes.push(FlowNode { deploy_id, vm_name });
            }
        }
        Ok(Self {
            name,
            cardinality: opt_uint(r, path, "cardinality")?.unwrap_or(0),
            state: opt_int(r, path, "state")?.map(RoleState::from_code),
            min_vms: opt_uint(r, path, "min_vms")?,
            max_vms: opt_uint(r, path, "max_vms")?,
            template_id,
            nodes,
        })
    }
}

/// A service template (DOCUMENT TYPE 101).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceTemplate(pub FlowDocument);

/// A service (DOCUMENT TYPE 100).
#[derive(Debug, Clone, PartialEq)]
pub struct Service(pub FlowDocument);

impl ServiceTemplate {
    /// Template id.
    pub fn id(&self) -> i64 {
        self.0.id
    }

    /// Template name (document NAME).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The template body as stored (send it back to `update` to keep unknown keys).
    pub fn body(&self) -> &Value {
        &self.0.body
    }

    /// Roles, typed.
    pub fn roles(&self) -> Result<Vec<FlowRole>, OneFlowError> {
        self.0.roles()
    }
}

impl Service {
    /// Service id.
    pub fn id(&self) -> i64 {
        self.0.id
    }

    /// Service name (document NAME).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The service body as stored.
    pub fn body(&self) -> &Value {
        &self.0.body
    }

    /// `BODY.state`.
    pub fn state(&self) -> Result<ServiceState, OneFlowError> {
        let body = self.0.body_obj()?;
        let s = json::int(json::field(body, "BODY", "state")?, "BODY.state")?;
        Ok(ServiceState::from_code(s))
    }

    /// Roles with states and nodes.
    pub fn roles(&self) -> Result<Vec<FlowRole>, OneFlowError> {
        self.0.roles()
    }

    /// The role called `name`.
    pub fn role(&self, name: &str) -> Result<Option<FlowRole>, OneFlowError> {
        Ok(self.roles()?.into_iter().find(|r| r.name == name))
    }
}

pub(crate) fn parse_document_answer(mut v: Value) -> Result<FlowDocument, FieldError> {
    let root = json::as_object(&v, "response")?;
    json::field(root, "response", "DOCUMENT")?;
    FlowDocument::from_value(v["DOCUMENT"].take(), "DOCUMENT")
}

pub(crate) fn parse_pool_answer(mut v: Value) -> Result<Vec<FlowDocument>, FieldError> {
    let root = json::as_object(&v, "response")?;
    json::as_object(
        json::field(root, "response", "DOCUMENT_POOL")?,
        "DOCUMENT_POOL",
    )?;
    match v["DOCUMENT_POOL"]["DOCUMENT"].take() {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, d)| FlowDocument::from_value(d, &format!("DOCUMENT_POOL.DOCUMENT[{i}]")))
            .collect(),
        // A lone document (older servers) is accepted as a one-element pool.
        d @ Value::Object(_) => Ok(vec![FlowDocument::from_value(d, "DOCUMENT_POOL.DOCUMENT")?]),
        other => Err(FieldError::new(
            "DOCUMENT_POOL.DOCUMENT",
            format!("expected an array, found {}", json::type_name(&other)),
        )),
    }
}

/// A document of a pool listing whose body was read straight into `B`. With a `B` that
/// skips what it does not need (serde ignores unknown keys without building them), a
/// listing of thousands of services never exists in memory as one JSON tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed<B> {
    /// Document id.
    pub id: i64,
    /// Document name.
    pub name: String,
    /// Owner id (`UID`; -1 when the answer has none).
    pub uid: i64,
    /// Group id (`GID`; -1 when the answer has none).
    pub gid: i64,
    /// `TEMPLATE.BODY`.
    pub body: B,
}

/// `{"DOCUMENT_POOL": {"DOCUMENT": …}}`: an array, a lone document (older servers) or
/// nothing at all.
#[derive(serde::Deserialize)]
struct PoolAnswer<B> {
    #[serde(rename = "DOCUMENT_POOL")]
    pool: PoolDocuments<B>,
}

struct PoolDocuments<B>(Vec<Listed<B>>);

#[derive(serde::Deserialize)]
struct ListedRaw<B> {
    #[serde(rename = "ID", deserialize_with = "id_or_numeric_string")]
    id: i64,
    #[serde(rename = "NAME", default)]
    name: String,
    #[serde(
        rename = "UID",
        default = "unknown_id",
        deserialize_with = "id_or_numeric_string"
    )]
    uid: i64,
    #[serde(
        rename = "GID",
        default = "unknown_id",
        deserialize_with = "id_or_numeric_string"
    )]
    gid: i64,
    #[serde(rename = "TEMPLATE")]
    template: TemplateRaw<B>,
}

/// An owner field the answer left out: matches no user.
fn unknown_id() -> i64 {
    -1
}

#[derive(serde::Deserialize)]
struct TemplateRaw<B> {
    #[serde(rename = "BODY")]
    body: B,
}

impl<'de, B: serde::Deserialize<'de>> serde::Deserialize<'de> for PoolDocuments<B> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, MapAccess, SeqAccess, Visitor};
        struct Docs<B>(std::marker::PhantomData<B>);
        impl<'de, B: serde::Deserialize<'de>> Visitor<'de> for Docs<B> {
            type Value = Vec<Listed<B>>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("DOCUMENT_POOL.DOCUMENT as an array, an object or null")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Vec::new())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(raw) = seq.next_element::<ListedRaw<B>>()? {
                    out.push(raw.into());
                }
                Ok(out)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let raw = ListedRaw::<B>::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(vec![raw.into()])
            }
        }
        #[derive(serde::Deserialize)]
        #[serde(bound(deserialize = "B: serde::Deserialize<'de>"))]
        struct Pool<B> {
            #[serde(rename = "DOCUMENT", default = "none", deserialize_with = "docs")]
            documents: Vec<Listed<B>>,
        }
        fn none<B>() -> Vec<Listed<B>> {
            Vec::new()
        }
        fn docs<'de, D: serde::Deserializer<'de>, B: serde::Deserialize<'de>>(
            d: D,
        ) -> Result<Vec<Listed<B>>, D::Error> {
            d.deserialize_any(Docs(std::marker::PhantomData))
        }
        Pool::deserialize(d).map(|p| Self(p.documents))
    }
}

impl<B> From<ListedRaw<B>> for Listed<B> {
    fn from(r: ListedRaw<B>) -> Self {
        Self {
            id: r.id,
            name: r.name,
            uid: r.uid,
            gid: r.gid,
            body: r.template.body,
        }
    }
}

/// A response body as JSON (every typed answer starts here).
pub(crate) fn decode_body(body: &[u8]) -> Result<Value, OneFlowError> {
    serde_json::from_slice(body).map_err(|e| OneFlowError::Decode {
        what: "response body".into(),
        reason: format!("not JSON: {e}"),
    })
}

/// A `GET /service` body read straight into [`Listed`] documents.
pub(crate) fn decode_listing<B: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<Vec<Listed<B>>, OneFlowError> {
    serde_json::from_slice::<PoolAnswer<B>>(body)
        .map(|a| a.pool.0)
        .map_err(|e| OneFlowError::Decode {
            what: "service listing".into(),
            reason: e.to_string(),
        })
}

/// OneFlow writes document ids as strings; accept numbers too.
fn id_or_numeric_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| D::Error::custom("ID out of range")),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| D::Error::custom(format!("ID {:?} is not a number", json::shorten(&s)))),
        other => Err(D::Error::custom(format!(
            "ID: expected a number, found {}",
            json::type_name(&other)
        ))),
    }
}

/// `delete_type` of `DELETE /service_template/:id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateDeleteType {
    /// Only the service template.
    None,
    /// Also its VM templates.
    Templates,
    /// Also their images.
    All,
}

/// VM batch actions accepted for a role (`Role::SCHEDULE_ACTIONS`).
pub const ROLE_ACTIONS: &[&str] = &[
    "terminate",
    "terminate-hard",
    "undeploy",
    "undeploy-hard",
    "hold",
    "release",
    "stop",
    "suspend",
    "resume",
    "reboot",
    "reboot-hard",
    "poweroff",
    "poweroff-hard",
    "snapshot-create",
    "snapshot-revert",
    "snapshot-delete",
    "disk-snapshot-create",
    "disk-snapshot-revert",
    "disk-snapshot-delete",
];

/// Optional parameters of a role action.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleActionParams {
    /// Seconds between batches.
    pub period: Option<u64>,
    /// VMs per batch.
    pub number: Option<u64>,
    /// Action argument.
    pub args: Option<String>,
}

/// The action wrapper; `params` is always an object (OneFlow 500s without it).
fn action_body(perform: &str, params: Map<String, Value>) -> Value {
    json!({ "action": { "perform": perform, "params": Value::Object(params) } })
}

fn valid_role_name(role: &str) -> Result<(), OneFlowError> {
    if !role.is_empty()
        && role.len() <= 128
        && role.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        Ok(())
    } else {
        Err(OneFlowError::Invalid {
            what: format!("role name {:?}", json::shorten(role)),
            reason: "must match ^\\w+$".into(),
        })
    }
}

struct Req {
    route: &'static str,
    method: reqwest::Method,
    path: String,
    object_id: Option<i64>,
    body: Option<Value>,
}

impl Req {
    /// A request for `route` (`"VERB /pattern"`, the span and statistics label; its verb is
    /// the method) at `path` below the base URL.
    fn new(route: &'static str, path: String, object_id: Option<i64>) -> Self {
        let verb = route.split(' ').next().unwrap_or_default();
        Self {
            route,
            method: reqwest::Method::from_bytes(verb.as_bytes()).unwrap_or(reqwest::Method::GET),
            path,
            object_id,
            body: None,
        }
    }

    fn json(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }
}

/// The OneFlow client. Cheap to clone.
#[derive(Clone)]
pub struct OneFlowClient {
    http: reqwest::Client,
    base: url::Url,
    user: String,
    password: Secret,
    retry: RetryPolicy,
    max_body: usize,
    budget: Arc<ApiBudget>,
    stats: Arc<ApiStats>,
    redactor: Redactor,
}

impl std::fmt::Debug for OneFlowClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneFlowClient")
            .field("base", &redact_url(&self.base))
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl OneFlowClient {
    /// Build a client from `cfg`, sharing `budget` and `stats` with the other clients.
    pub fn new(
        cfg: &OneConfig,
        budget: Arc<ApiBudget>,
        stats: Arc<ApiStats>,
    ) -> Result<Self, OneFlowError> {
        let http = http::build_client(cfg.timeout, cfg.ca_bundle.as_deref(), &cfg.user_agent)
            .map_err(OneFlowError::Config)?;
        Ok(Self {
            http,
            base: cfg.oneflow.clone(),
            user: cfg.credentials.user().to_string(),
            password: cfg.credentials.password().clone(),
            retry: cfg.retry,
            max_body: cfg.max_http_body,
            budget,
            stats,
            redactor: Redactor::new([
                cfg.credentials.password().expose().to_string(),
                // The Basic header's form, in case a server echoes headers back.
                {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD.encode(format!(
                        "{}:{}",
                        cfg.credentials.user(),
                        cfg.credentials.password().expose()
                    ))
                },
            ]),
        })
    }

    /// The statistics this client updates.
    pub fn stats(&self) -> &Arc<ApiStats> {
        &self.stats
    }

    /// `GET /service_template`.
    pub async fn list_service_templates(&self) -> Result<Vec<ServiceTemplate>, OneFlowError> {
        let v = self
            .get("GET /service_template", "service_template".into(), None)
            .await?;
        Ok(parse_pool_answer(v)?
            .into_iter()
            .map(ServiceTemplate)
            .collect())
    }

    /// `GET /service_template/:id`.
    pub async fn get_service_template(&self, id: i64) -> Result<ServiceTemplate, OneFlowError> {
        let v = self
            .get(
                "GET /service_template/:id",
                format!("service_template/{id}"),
                Some(id),
            )
            .await?;
        Ok(ServiceTemplate(parse_document_answer(v)?))
    }

    /// `POST /service_template` (201): returns the stored template.
    pub async fn create_service_template(
        &self,
        body: &Value,
    ) -> Result<ServiceTemplate, OneFlowError> {
        let v = self
            .send_json(
                Req::new("POST /service_template", "service_template".into(), None)
                    .json(body.clone()),
            )
            .await?;
        Ok(ServiceTemplate(parse_document_answer(v)?))
    }

    /// `PUT /service_template/:id` with the full body (200).
    pub async fn update_service_template(
        &self,
        id: i64,
        body: &Value,
    ) -> Result<ServiceTemplate, OneFlowError> {
        let v = self
            .send_json(
                Req::new(
                    "PUT /service_template/:id",
                    format!("service_template/{id}"),
                    Some(id),
                )
                .json(body.clone()),
            )
            .await?;
        Ok(ServiceTemplate(parse_document_answer(v)?))
    }

    /// `DELETE /service_template/:id` (204).
    pub async fn delete_service_template(
        &self,
        id: i64,
        delete_type: Option<TemplateDeleteType>,
    ) -> Result<(), OneFlowError> {
        let body = delete_type.map(|t| {
            let s = match t {
                TemplateDeleteType::None => "none",
                TemplateDeleteType::Templates => "templates",
                TemplateDeleteType::All => "all",
            };
            json!({ "delete_type": s })
        });
        self.send(Req {
            body,
            ..Req::new(
                "DELETE /service_template/:id",
                format!("service_template/{id}"),
                Some(id),
            )
        })
        .await
        .map(drop)
    }

    /// `POST /service_template/:id/action` `instantiate` (201): the new service.
    /// `merge_template` is deep-merged by OneFlow into the template (name,
    /// `user_inputs_values`, per-role overrides, …).
    pub async fn instantiate_service_template(
        &self,
        id: i64,
        merge_template: Option<&Value>,
    ) -> Result<Service, OneFlowError> {
        let mut params = Map::new();
        if let Some(m) = merge_template {
            if !m.is_object() {
                return Err(OneFlowError::Invalid {
                    what: "merge_template".into(),
                    reason: "must be a JSON object".into(),
                });
            }
            params.insert("merge_template".into(), m.clone());
        }
        let v = self
            .send_json(
                Req::new(
                    "POST /service_template/:id/action",
                    format!("service_template/{id}/action"),
                    Some(id),
                )
                .json(action_body("instantiate", params)),
            )
            .await?;
        Ok(Service(parse_document_answer(v)?))
    }

    /// `GET /service`.
    pub async fn list_services(&self) -> Result<Vec<Service>, OneFlowError> {
        let v = self.get("GET /service", "service".into(), None).await?;
        Ok(parse_pool_answer(v)?.into_iter().map(Service).collect())
    }

    /// `GET /service`, each body read straight into `B` (see [`Listed`]).
    pub async fn list_services_as<B: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Vec<Listed<B>>, OneFlowError> {
        let bytes = self
            .send(Req::new("GET /service", "service".into(), None))
            .await?;
        decode_listing(&bytes)
    }

    /// `GET /service/:id`.
    pub async fn get_service(&self, id: i64) -> Result<Service, OneFlowError> {
        let v = self
            .get("GET /service/:id", format!("service/{id}"), Some(id))
            .await?;
        Ok(Service(parse_document_answer(v)?))
    }

    /// `PUT /service/:id` with the full service body (204). OneFlow replaces the stored
    /// body after checking that the immutable keys did not change (service: `name`,
    /// `deployment`, `ready_status_gate`, `networks(_values)`, `user_inputs(_values)`,
    /// `state`, `start_time`, `log`; role: `cardinality`, `nodes`, `parents`, `state`,
    /// `template_id`, `last_vmname`) and that the service is neither transient nor
    /// failed. VMs created after the update (scale up) get the new role contents;
    /// running VMs keep theirs. A mutation: never retried.
    pub async fn update_service(&self, id: i64, body: &Value) -> Result<(), OneFlowError> {
        if !body.is_object() {
            return Err(OneFlowError::Invalid {
                what: "service body".into(),
                reason: "must be a JSON object".into(),
            });
        }
        self.send(
            Req::new("PUT /service/:id", format!("service/{id}"), Some(id)).json(body.clone()),
        )
        .await
        .map(drop)
    }

    /// `DELETE /service/:id` (204): starts the undeploy.
    pub async fn delete_service(&self, id: i64) -> Result<(), OneFlowError> {
        self.send(Req::new(
            "DELETE /service/:id",
            format!("service/{id}"),
            Some(id),
        ))
        .await
        .map(drop)
    }

    /// `recover` a failed service; with `delete` OneFlow deletes it instead.
    pub async fn recover_service(&self, id: i64, delete: bool) -> Result<(), OneFlowError> {
        let mut params = Map::new();
        if delete {
            params.insert("delete".into(), Value::Bool(true));
        }
        self.service_action(id, "recover", params).await
    }

    /// `POST /service/:id/scale` `{role_name, cardinality, force}`.
    pub async fn scale_service(
        &self,
        id: i64,
        role: &str,
        cardinality: u64,
        force: bool,
    ) -> Result<(), OneFlowError> {
        valid_role_name(role)?;
        self.send(
            Req::new(
                "POST /service/:id/scale",
                format!("service/{id}/scale"),
                Some(id),
            )
            .json(json!({ "role_name": role, "cardinality": cardinality, "force": force })),
        )
        .await
        .map(drop)
    }

    /// `POST /service/:id/role/:role/action` with a VM batch action ([`ROLE_ACTIONS`]).
    pub async fn role_action(
        &self,
        id: i64,
        role: &str,
        action: &str,
        params: &RoleActionParams,
    ) -> Result<(), OneFlowError> {
        valid_role_name(role)?;
        if !ROLE_ACTIONS.contains(&action) {
            return Err(OneFlowError::Invalid {
                what: format!("role action {:?}", json::shorten(action)),
                reason: "not a OneFlow role action".into(),
            });
        }
        let mut p = Map::new();
        if let Some(v) = params.period {
            p.insert("period".into(), v.into());
        }
        if let Some(v) = params.number {
            p.insert("number".into(), v.into());
        }
        if let Some(v) = &params.args {
            p.insert("args".into(), v.clone().into());
        }
        self.send(
            Req::new(
                "POST /service/:id/role/:role/action",
                format!("service/{id}/role/{role}/action"),
                Some(id),
            )
            .json(action_body(action, p)),
        )
        .await
        .map(drop)
    }

    async fn service_action(
        &self,
        id: i64,
        perform: &str,
        params: Map<String, Value>,
    ) -> Result<(), OneFlowError> {
        self.send(
            Req::new(
                "POST /service/:id/action",
                format!("service/{id}/action"),
                Some(id),
            )
            .json(action_body(perform, params)),
        )
        .await
        .map(drop)
    }

    async fn get(
        &self,
        route: &'static str,
        path: String,
        object_id: Option<i64>,
    ) -> Result<Value, OneFlowError> {
        self.send_json(Req::new(route, path, object_id)).await
    }

    async fn send_json(&self, req: Req) -> Result<Value, OneFlowError> {
        decode_body(&self.send(req).await?)
    }

    /// The one send path: budget, span, stats, retries (GET only), body cap.
    async fn send(&self, req: Req) -> Result<Vec<u8>, OneFlowError> {
        let span = http_span(HttpApi::OneFlow, req.route, &self.base, req.object_id);
        let started = Instant::now();
        let idempotent = req.method == reqwest::Method::GET;
        let result = run_with_retry(idempotent, &self.retry, || self.attempt(&req))
            .instrument(span.clone())
            .await;
        let outcome = result
            .as_ref()
            .map_or_else(OneFlowError::outcome, |_| Outcome::Ok);
        finish_span(&span, outcome, started);
        if let Err(e) = &result {
            span.in_scope(|| tracing::debug!(error = %e, "OneFlow call failed"));
        }
        result
    }

    async fn attempt(&self, req: &Req) -> Result<Vec<u8>, OneFlowError> {
        self.budget.acquire().await;
        let started = Instant::now();
        let result = self.attempt_once(req).await;
        let outcome = result
            .as_ref()
            .map_or_else(OneFlowError::outcome, |_| Outcome::Ok);
        self.stats.record(req.route, outcome, started.elapsed());
        result
    }

    async fn attempt_once(&self, req: &Req) -> Result<Vec<u8>, OneFlowError> {
        let route = req.route;
        let mut url = self.base.clone();
        url.set_path(&format!(
            "{}/{}",
            self.base.path().trim_end_matches('/'),
            req.path
        ));
        let mut rb = self
            .http
            .request(req.method.clone(), url)
            .basic_auth(&self.user, Some(self.password.expose()))
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(b) = &req.body {
            rb = rb.json(b);
        }
        let mut resp = rb.send().await.map_err(|e| OneFlowError::Transport {
            route,
            message: self.redactor.clean(&http::describe_reqwest(&e)),
        })?;
        let status = resp.status();
        tracing::Span::current().record("http.response.status_code", status.as_u16());
        let body = http::read_capped(&mut resp, self.max_body)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge { limit } => OneFlowError::TooLarge { route, limit },
                BodyError::Transport(m) => OneFlowError::Transport {
                    route,
                    message: self.redactor.clean(&m),
                },
            })?;
        if !status.is_success() {
            let mut e = status_error(route, status.as_u16(), &body);
            redact_error(&mut e, &self.redactor);
            return Err(e);
        }
        Ok(body)
    }
}

fn redact_error(e: &mut OneFlowError, r: &Redactor) {
    match e {
        OneFlowError::Authorization { message, .. }
        | OneFlowError::Authentication { message, .. }
        | OneFlowError::NotFound { message, .. }
        | OneFlowError::Validation { message, .. }
        | OneFlowError::Status { message, .. } => *message = r.clean(message),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_is_inverted_for_401_403() {
        assert!(matches!(
            status_error("r", 401, b"x"),
            OneFlowError::Authorization { .. }
        ));
        assert!(matches!(
            status_error("r", 403, b"x"),
            OneFlowError::Authentication { .. }
        ));
        assert!(matches!(
            status_error("r", 404, b"x"),
            OneFlowError::NotFound { .. }
        ));
        assert!(matches!(
            status_error("r", 400, b"x"),
            OneFlowError::Validation { .. }
        ));
        match status_error(
            "r",
            500,
            br#"{"message":"Internal server error","reason":"boom"}"#,
        ) {
            OneFlowError::Status {
                code: 500, message, ..
            } => {
                assert_eq!(message, "Internal server error: boom")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn action_wrapper_always_has_params() {
        assert_eq!(
            action_body("recover", Map::new()),
            json!({"action": {"perform": "recover", "params": {}}})
        );
    }
}
