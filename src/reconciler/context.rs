//! What every reconcile shares: the OpenNebula backend, the controller's identity, the
//! detected OpenNebula dialect and tuning options.
//!
//! Guarantees: the OpenNebula user the controller acts as is read once, when the context
//! is built (`one.user.info(-1)`), and [`Trust::owns`] is the one ownership rule: a
//! OneFlow document is trusted only when its owner `UID` is that user's (and its `GID`
//! the configured group, when one is set). A marker in the body alone never suffices:
//! any user can write one (`tests/safety_ownership.rs`,
//! `a_foreign_service_with_a_forged_marker_is_never_adopted`).
//! Assumptions: the controller's credentials belong to one user for the process's life.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::one::backend::{Identity, NameScope, OneBackend};
use crate::render::OneFlowDialect;

/// The OneFlow dialect of a `one.system.version` string such as `7.4.0`.
pub fn dialect_of(version: &str) -> Option<OneFlowDialect> {
    OneFlowDialect::for_major(version.trim().split('.').next()?.parse().ok()?)
}

/// Tuning of observe and apply.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// VMs per `one.vmpool.infoextended` page (OpenNebula's default page is 2000).
    pub vm_page_size: u32,
    /// Look again this soon after a reconcile that changed something.
    pub requeue_after_change: Duration,
    /// Extra `ONEAPP_*` context variables rendered into both roles (e.g. the agent
    /// runtime of a test environment).
    pub extra_context: BTreeMap<String, String>,
    /// After a mutation whose outcome is unknown (timeout, lost answer) the cluster is
    /// left alone this long: OpenNebula carries on with a request whose client gave up,
    /// and a re-list before it finished would create a second service. Twice the
    /// clients' request timeout by default.
    pub ambiguous_hold: Duration,
    /// An observation older than this never leads to a destructive or clock-driven
    /// action (replace, delete, undeploy, scale-down, rotation): when part of an
    /// observation fails the controller keeps planning on the last complete one.
    /// `run` sets it to 3 × the poll interval unless configured (`--max-view-age`).
    pub max_view_age: Duration,
    /// Which owner is trusted, and where names resolve.
    pub ownership: OwnershipOptions,
    /// What the VMs get to continue the controller's traces.
    pub vm_tracing: VmTracing,
}

/// Trace context for the VMs (issue #16 item 2): stamped into every role's context when a
/// service body is sent (create, redeploy, in-place update, and before a scale-up), never
/// planned, so it shows in no plan and causes no drift.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmTracing {
    /// Write `ONEAPP_FL_TRACEPARENT` (the span sending the body, when sampled): on when
    /// the controller's spans are exported or the VMs have an endpoint.
    pub propagate: bool,
    /// `ONEAPP_FL_OTLP_ENDPOINT`: where the agents export their spans (`--vm-otlp-endpoint`).
    pub otlp_endpoint: Option<crate::protocol::trace_context::OtlpEndpoint>,
}

impl VmTracing {
    /// From the VMs' endpoint and whether the controller exports its own spans.
    pub fn new(
        otlp_endpoint: Option<crate::protocol::trace_context::OtlpEndpoint>,
        controller_exports: bool,
    ) -> Self {
        Self {
            propagate: controller_exports || otlp_endpoint.is_some(),
            otlp_endpoint,
        }
    }
}

/// Ownership settings (`--owner-gid`, `--resource-owner`); both off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::Args, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct OwnershipOptions {
    /// Trust a OneFlow service only when it also belongs to this OpenNebula group (GID),
    /// besides being owned by the controller's user [default: any group].
    #[arg(long, value_name = "GID", env = "FLOWER_RECONCILE_OWNER_GID")]
    pub owner_gid: Option<u32>,
    /// Resolve VM template and network names among the objects of this OpenNebula user
    /// id (e.g. the operator who registered the appliance templates) [default: the
    /// controller user's own objects].
    #[arg(long, value_name = "UID", env = "FLOWER_RECONCILE_RESOURCE_OWNER")]
    pub resource_owner: Option<u32>,
}

impl OwnershipOptions {
    /// Fill every unset field from `other`.
    pub fn or(self, other: OwnershipOptions) -> OwnershipOptions {
        OwnershipOptions {
            owner_gid: self.owner_gid.or(other.owner_gid),
            resource_owner: self.resource_owner.or(other.resource_owner),
        }
    }

    /// Whose objects template and network names resolve among.
    pub fn name_scope(&self) -> NameScope {
        self.resource_owner.map_or(NameScope::Mine, NameScope::User)
    }
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        Self {
            vm_page_size: 2000,
            requeue_after_change: Duration::from_secs(5),
            extra_context: BTreeMap::new(),
            ambiguous_hold: crate::one::config::DEFAULT_TIMEOUT * 2,
            ownership: OwnershipOptions::default(),
            max_view_age: Duration::from_secs(30),
            vm_tracing: VmTracing::default(),
        }
    }
}

/// Shared by every reconcile of one controller process.
#[derive(Clone)]
pub struct Context {
    /// OpenNebula access (rate-limited by the clients' shared budget).
    pub backend: Arc<dyn OneBackend>,
    /// This controller's id, written into every ownership marker it creates.
    pub controller_id: String,
    /// The OpenNebula user the controller acts as, read once by [`Context::connect`].
    pub identity: Identity,
    /// OneFlow dialect, detected once with `one.system.version`.
    pub dialect: OneFlowDialect,
    /// Tuning.
    pub options: ReconcileOptions,
}

impl Context {
    /// A context for `backend`, detecting the dialect with `one.system.version` and the
    /// controller's user with `one.user.info(-1)`.
    pub async fn connect(
        backend: Arc<dyn OneBackend>,
        controller_id: impl Into<String>,
        options: ReconcileOptions,
    ) -> Result<Self, crate::one::backend::BackendError> {
        let version = backend.system_version().await?;
        let dialect = dialect_of(&version).ok_or_else(|| {
            crate::one::backend::BackendError::new(
                crate::one::backend::BackendErrorKind::Decode,
                format!("unsupported OpenNebula version {version:?} (6.x or 7.x required)"),
            )
        })?;
        let identity = backend.whoami().await?;
        Ok(Self {
            backend,
            controller_id: controller_id.into(),
            identity,
            dialect,
            options,
        })
    }

    /// What this controller trusts as its own (see [`Trust`]).
    pub fn trust(&self) -> Trust<'_> {
        Trust {
            controller_id: &self.controller_id,
            identity: &self.identity,
            owner_gid: self.options.ownership.owner_gid,
        }
    }
}

/// The one ownership rule, usable without a context (pure callers such as
/// [`super::observe::build_live`]).
#[derive(Debug, Clone, Copy)]
pub struct Trust<'a> {
    /// The controller id a marker must name.
    pub controller_id: &'a str,
    /// The OpenNebula user that must own the object.
    pub identity: &'a Identity,
    /// The group that must own it too, when set.
    pub owner_gid: Option<u32>,
}

impl Trust<'_> {
    /// Whether an object owned by `uid`/`gid` is the controller's: its user, and its
    /// group when `--owner-gid` is set.
    pub fn owns(&self, uid: i64, gid: i64) -> bool {
        uid == self.identity.uid && self.owner_gid.is_none_or(|g| i64::from(g) == gid)
    }
}

impl Context {
    /// The API call counters of the backend's clients, if it has any.
    pub fn api_stats(&self) -> Option<Arc<crate::one::ApiStats>> {
        self.backend.api_stats()
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("controller_id", &self.controller_id)
            .field("identity", &self.identity)
            .field("dialect", &self.dialect)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A context connected to the OpenNebula front-end named by the environment; `api_rate`
/// overrides the clients' shared budget (requests per second).
pub async fn context_from_env(
    controller_id: &str,
    api_rate: Option<std::num::NonZeroU32>,
    ownership: OwnershipOptions,
) -> anyhow::Result<Context> {
    let cfg = one_config_from_env(None)?;
    context_for(cfg, controller_id, api_rate, ownership).await
}

/// The OpenNebula settings of the environment; with `instance`, every request's
/// User-Agent names it (`flower-reconcile/<version> (<instance>)`).
pub fn one_config_from_env(instance: Option<&str>) -> anyhow::Result<crate::one::OneConfig> {
    let mut cfg = crate::one::OneConfig::from_env(&crate::one::ConfigOptions::default())?;
    for (var, url) in cfg.plaintext_remote_endpoints() {
        tracing::warn!(
            var,
            endpoint = %crate::one::calls::redact_url(url),
            "plain http to another host: the OpenNebula session and every answer cross the network unencrypted; use https"
        );
    }
    if let Some(id) = instance {
        cfg.user_agent =
            crate::one::http::user_agent_with_instance(crate::one::http::CONTROLLER_AGENT, id);
    }
    Ok(cfg)
}

/// A context over clients built from `cfg` (see [`context_from_env`]).
pub async fn context_for(
    cfg: crate::one::OneConfig,
    controller_id: &str,
    api_rate: Option<std::num::NonZeroU32>,
    ownership: OwnershipOptions,
) -> anyhow::Result<Context> {
    let options = ReconcileOptions {
        ambiguous_hold: cfg.timeout * 2,
        ownership,
        ..ReconcileOptions::default()
    };
    let backend = crate::one::ClientsBackend::with_rate(cfg, api_rate)?;
    Ok(Context::connect(Arc::new(backend), controller_id, options).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialect_follows_the_major_version() {
        assert_eq!(dialect_of("6.10.5"), Some(OneFlowDialect::V6));
        assert_eq!(dialect_of("7.4.0"), Some(OneFlowDialect::V7));
        assert_eq!(dialect_of("8.0"), Some(OneFlowDialect::V7));
        assert_eq!(dialect_of("5.12"), None);
        assert_eq!(dialect_of("junk"), None);
    }
}
