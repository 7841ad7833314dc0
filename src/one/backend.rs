//! The port: the OpenNebula operations the reconciler uses, as one object-safe trait.
//!
//! This module's clients implement it through an adapter ([`super::clients_backend`]);
//! unit scenarios use a scripted in-memory backend (`one::fake`, test builds only), and
//! the integration tests the real clients against onesim. Keeping the reconciler on this
//! narrow surface makes the exact set of calls a reconcile may make visible in one place.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// A boxed future returned by [`OneBackend`] methods.
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// A OneFlow document (service or service template): id, name, owner and parsed JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Document id.
    pub id: u64,
    /// Document name.
    pub name: String,
    /// Owner user id (`UID`), -1 when OneFlow did not say.
    pub uid: i64,
    /// Owner group id (`GID`), -1 when OneFlow did not say.
    pub gid: i64,
    /// `TEMPLATE.BODY`.
    pub body: serde_json::Value,
}

/// The part of a VM the controller reads (from `one.vmpool.infoextended`).
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    /// VM id.
    pub id: u64,
    /// Owner user id (`UID`).
    pub uid: i64,
    /// VM name.
    pub name: String,
    /// `STATE`.
    pub state: crate::one::model::VmState,
    /// `LCM_STATE`.
    pub lcm_state: crate::one::model::LcmState,
    /// `STIME`, epoch seconds (0 when unknown).
    pub stime: i64,
    /// `USER_TEMPLATE` scalar attributes (vector attributes are left out).
    pub user_template: BTreeMap<String, String>,
    /// The addresses oned assigned to its NICs and NIC aliases: what `FL_ENDPOINT`, which
    /// any VM of the service can rewrite through OneGate, is checked against.
    pub addresses: Vec<std::net::IpAddr>,
}

/// The OpenNebula user the controller authenticates as (`one.user.info(-1)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: i64,
    /// Primary group id.
    pub gid: i64,
    /// User name.
    pub name: String,
}

/// Whose VM templates and networks a name may resolve to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameScope {
    /// The controller user's own (pool filter -3).
    Mine,
    /// Those of this user id (pool filter ≥ 0).
    User(u32),
}

/// Why a backend call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// The request may or may not have been executed (timeout, connection reset after
    /// sending). Re-observe before doing anything else.
    Ambiguous,
    /// The request certainly did not execute (connection refused, rejected by the server).
    Rejected,
    /// The object does not exist.
    NotFound,
    /// The answer could not be understood.
    Decode,
}

/// A backend failure. The message never holds credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendError {
    /// Classification, which decides whether a retry is safe.
    pub kind: BackendErrorKind,
    /// What happened.
    pub message: String,
}

impl BackendError {
    /// An error of `kind`.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            BackendErrorKind::Ambiguous => "outcome unknown",
            BackendErrorKind::Rejected => "rejected",
            BackendErrorKind::NotFound => "not found",
            BackendErrorKind::Decode => "unreadable answer",
        };
        write!(f, "{kind}: {}", self.message)
    }
}

impl std::error::Error for BackendError {}

/// The OpenNebula calls a reconcile may make.
pub trait OneBackend: Send + Sync {
    /// `one.system.version`.
    fn system_version(&self) -> BackendFuture<'_, String>;
    /// `one.user.info(-1)`: the authenticated user.
    fn whoami(&self) -> BackendFuture<'_, Identity>;
    /// `GET /service`: every service the user can see. Bodies may be reduced to the
    /// fields [`retain_listed_fields`] keeps; read one whole with
    /// [`OneBackend::get_service`].
    fn list_services(&self) -> BackendFuture<'_, Vec<Document>>;
    /// The controller user's own VMs (pool filter -3, "mine"), except DONE ones, through
    /// `one.vmpool.infoextended` pages of `page_size`: ⌈N / page_size⌉ requests for N of
    /// our VMs, never a call per VM, whatever other users own. User templates may be
    /// reduced to the attributes [`crate::protocol::observed_attribute`] names.
    fn list_vms(&self, page_size: u32) -> BackendFuture<'_, Vec<VmRecord>>;
    /// `GET /service_template`.
    fn list_service_templates(&self) -> BackendFuture<'_, Vec<Document>>;
    /// `POST /service_template`; returns the new template id.
    fn create_service_template(&self, body: serde_json::Value) -> BackendFuture<'_, u64>;
    /// `PUT /service_template/:id` with the full body.
    fn update_service_template(&self, id: u64, body: serde_json::Value) -> BackendFuture<'_, ()>;
    /// `POST /service_template/:id/action` instantiate with `merge_template`; returns the
    /// new service id.
    fn instantiate(
        &self,
        template_id: u64,
        merge_template: serde_json::Value,
    ) -> BackendFuture<'_, u64>;
    /// `GET /service/:id`.
    fn get_service(&self, service_id: u64) -> BackendFuture<'_, Document>;
    /// `PUT /service/:id` with the full service body (immutable keys unchanged).
    fn update_service(&self, service_id: u64, body: serde_json::Value) -> BackendFuture<'_, ()>;
    /// `POST /service/:id/scale` with `force: false`.
    fn scale(&self, service_id: u64, role: &str, cardinality: u32) -> BackendFuture<'_, ()>;
    /// `DELETE /service/:id` (asynchronous undeploy).
    fn delete_service(&self, service_id: u64) -> BackendFuture<'_, ()>;
    /// `one.vm.update` merge (type 1) of `KEY="value"` lines.
    fn vm_update_merge(&self, vm_id: u64, template: String) -> BackendFuture<'_, ()>;
    /// `one.vm.info`: one VM, read fresh (the re-check right before a terminate). User
    /// template reduced as for [`OneBackend::list_vms`].
    fn vm_info(&self, vm_id: u64) -> BackendFuture<'_, VmRecord>;
    /// `one.vm.action terminate-hard`.
    fn vm_terminate_hard(&self, vm_id: u64) -> BackendFuture<'_, ()>;
    /// `one.templatepool.info` filtered to `scope`: (id, name) of those VM templates.
    fn vm_templates(&self, scope: NameScope) -> BackendFuture<'_, Vec<(u64, String)>>;
    /// `one.vnpool.info` filtered to `scope`: (id, name) of those virtual networks.
    fn networks(&self, scope: NameScope) -> BackendFuture<'_, Vec<(u64, String)>>;
    /// `one.template.info`: the name of VM template `id` (`NotFound` when it does not
    /// exist or is not visible to the user).
    fn vm_template_name(&self, id: u64) -> BackendFuture<'_, String>;
    /// `one.vn.info`: the name of virtual network `id` (`NotFound` likewise).
    fn network_name(&self, id: u64) -> BackendFuture<'_, String>;
    /// Per-call statistics of the clients behind this backend, for `/metrics` (fakes
    /// have none).
    fn api_stats(&self) -> Option<std::sync::Arc<crate::one::ApiStats>> {
        None
    }
}

/// Keys of a listed service body the controller reads: `name`, `state`, the ownership
/// marker, the applied-spec record, the signing key (to check rotation requests) and
/// `roles` (of which [`retain_listed_fields`] keeps `name`, `cardinality`, `state` and each
/// node's `deploy_id`).
const LISTED_BODY_KEYS: &[&str] = &[
    "name",
    "state",
    crate::render::ownership::MARKER_KEY,
    crate::plan::AppliedSpec::BODY_KEY,
    crate::render::ownership::SIGNING_KEY,
    "roles",
];

/// Reduce a listed service body, in place, to what the controller reads from a listing
/// ([`LISTED_BODY_KEYS`]). OneFlow embeds a VM document in every node (`vm_info`); at
/// 1,000 services they were most of the controller's memory. Code that writes a body back
/// must read it whole (`get_service`), never from a listing.
pub fn retain_listed_fields(body: &mut serde_json::Value) {
    const ROLE: &[&str] = &["name", "cardinality", "state", "nodes"];
    let Some(b) = body.as_object_mut() else {
        return;
    };
    keep_only(b, LISTED_BODY_KEYS);
    let roles = b.get_mut("roles").and_then(|r| r.as_array_mut());
    for role in roles
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_object_mut())
    {
        keep_only(role, ROLE);
        let nodes = role.get_mut("nodes").and_then(|n| n.as_array_mut());
        for node in nodes
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_object_mut())
        {
            keep_only(node, &["deploy_id"]);
        }
    }
}

/// A listed service body read straight into the [`retain_listed_fields`] form: other keys
/// are skipped unread, so only one service's `roles` ever exists whole in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedBody(pub serde_json::Value);

impl<'de> serde::Deserialize<'de> for ListedBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Body;
        impl<'de> serde::de::Visitor<'de> for Body {
            type Value = ListedBody;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a service body (JSON object)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ListedBody, A::Error> {
                let mut kept = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    if LISTED_BODY_KEYS.contains(&key.as_str()) {
                        kept.insert(key, map.next_value()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                let mut body = serde_json::Value::Object(kept);
                retain_listed_fields(&mut body);
                Ok(ListedBody(body))
            }
        }
        d.deserialize_map(Body)
    }
}

/// Rebuilt rather than `retain`ed: the map's table shrinks with it.
fn keep_only(obj: &mut serde_json::Map<String, serde_json::Value>, keys: &[&str]) {
    *obj = std::mem::take(obj)
        .into_iter()
        .filter(|(k, _)| keys.contains(&k.as_str()))
        .collect();
}
