//! What every reconcile shares: the OpenNebula backend, the controller's identity, the
//! detected OpenNebula dialect and tuning options.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::backend::OneBackend;

/// Which OneFlow schema to speak (role `vm_template` vs `template_id`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OneDialect {
    /// OpenNebula 6.x.
    V6,
    /// OpenNebula 7.x.
    V7,
}

impl OneDialect {
    /// From a `one.system.version` string such as `7.4.0`; unknown majors ≥ 7 speak 7.
    pub fn from_version(version: &str) -> Option<Self> {
        let major: u32 = version.trim().split('.').next()?.parse().ok()?;
        match major {
            6 => Some(Self::V6),
            m if m >= 7 => Some(Self::V7),
            _ => None,
        }
    }
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
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        Self {
            vm_page_size: 2000,
            requeue_after_change: Duration::from_secs(5),
            extra_context: BTreeMap::new(),
            ambiguous_hold: crate::one::config::DEFAULT_TIMEOUT * 2,
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
    /// OneFlow dialect, detected once with `one.system.version`.
    pub dialect: OneDialect,
    /// Tuning.
    pub options: ReconcileOptions,
}

impl Context {
    /// A context for `backend`, detecting the dialect with `one.system.version`.
    pub async fn connect(
        backend: Arc<dyn OneBackend>,
        controller_id: impl Into<String>,
        options: ReconcileOptions,
    ) -> Result<Self, super::backend::BackendError> {
        let version = backend.system_version().await?;
        let dialect = OneDialect::from_version(&version).ok_or_else(|| {
            super::backend::BackendError::new(
                super::backend::BackendErrorKind::Decode,
                format!("unsupported OpenNebula version {version:?} (6.x or 7.x required)"),
            )
        })?;
        Ok(Self {
            backend,
            controller_id: controller_id.into(),
            dialect,
            options,
        })
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
            .field("dialect", &self.dialect)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialect_follows_the_major_version() {
        assert_eq!(OneDialect::from_version("6.10.5"), Some(OneDialect::V6));
        assert_eq!(OneDialect::from_version("7.4.0"), Some(OneDialect::V7));
        assert_eq!(OneDialect::from_version("5.12"), None);
        assert_eq!(OneDialect::from_version("junk"), None);
    }
}
