//! oned XML-RPC client (opennebula-api.md §1): typed methods, pagination, retries of
//! idempotent reads only, the shared request budget, a span and a stats entry per call.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use super::calls::{
    finish_span, redact_url, rpc_span, run_with_retry, ApiBudget, ApiStats, Outcome, Redactor,
    RetryPolicy, Retryable,
};
use super::config::{ConfigError, OneConfig};
use super::http::{self, BodyError};
use super::model::{
    self, Document, Image, ModelError, User, VirtualNetwork, Vm, VmState, VmTemplate,
};
use super::secret::Secret;
use super::xmlrpc::{self, ErrorCode, OneResult, Param, Response, Value};

/// Page size OpenNebula recommends for pool listings (anchors §7).
pub const DEFAULT_PAGE_SIZE: u32 = 2000;

/// Errors of the oned client. Messages never hold the session string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OnedError {
    /// The client could not be configured.
    #[error("oned configuration: {0}")]
    Config(String),
    /// A parameter was refused before sending.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was checked.
        what: String,
        /// Why.
        reason: String,
    },
    /// Connection, TLS, timeout or body read failure.
    #[error("{method}: {message}")]
    Transport {
        /// XML-RPC method.
        method: &'static str,
        /// What happened.
        message: String,
    },
    /// The HTTP status was not 200.
    #[error("{method}: HTTP {code}: {message}")]
    Http {
        /// XML-RPC method.
        method: &'static str,
        /// HTTP status.
        code: u16,
        /// Body text, shortened.
        message: String,
    },
    /// The answer exceeded the configured cap.
    #[error("{method}: answer exceeds {limit} bytes")]
    TooLarge {
        /// XML-RPC method.
        method: &'static str,
        /// The cap.
        limit: usize,
    },
    /// An XML-RPC `<fault>` (wrong arity or types, unknown method).
    #[error("{method}: XML-RPC fault {code}: {message}")]
    Fault {
        /// XML-RPC method.
        method: &'static str,
        /// faultCode.
        code: i64,
        /// faultString.
        message: String,
    },
    /// oned's failure array.
    #[error("{method}: {code}: {message}")]
    Api {
        /// XML-RPC method.
        method: &'static str,
        /// OpenNebula's error code.
        code: ErrorCode,
        /// oned's message (`[method] …`).
        message: String,
        /// Offending object id, when sent and not -1.
        resp_id: Option<i64>,
    },
    /// The answer could not be decoded.
    #[error("{method}: cannot decode the answer: {reason}")]
    Decode {
        /// XML-RPC method.
        method: &'static str,
        /// Why (element path for model errors).
        reason: String,
    },
}

impl OnedError {
    fn outcome(&self) -> Outcome {
        match self {
            Self::Config(_) | Self::Invalid { .. } => Outcome::Invalid,
            Self::Transport { .. } => Outcome::Transport,
            Self::Http { .. } | Self::Api { .. } => Outcome::Error,
            Self::Fault { .. } => Outcome::Fault,
            Self::TooLarge { .. } | Self::Decode { .. } => Outcome::Decode,
        }
    }

    /// OpenNebula's error code, for [`OnedError::Api`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The object does not exist (`NO_EXISTS`).
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(ErrorCode::NoExists)
    }
}

impl Retryable for OnedError {
    fn is_retryable(&self) -> bool {
        matches!(self, Self::Transport { .. } | Self::Http { code: 503, .. })
    }
}

impl From<ConfigError> for OnedError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e.to_string())
    }
}

/// Pool filter flag (§1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolFilter {
    /// -4: the user's primary group.
    PrimaryGroup,
    /// -3: owned by the user.
    Mine,
    /// -2: everything the user may see.
    All,
    /// -1: the user's and the user's groups'.
    MineAndGroups,
    /// ≥ 0: that user's.
    User(u32),
}

impl PoolFilter {
    fn code(self) -> i32 {
        match self {
            Self::PrimaryGroup => -4,
            Self::Mine => -3,
            Self::All => -2,
            Self::MineAndGroups => -1,
            Self::User(uid) => i32::try_from(uid).unwrap_or(i32::MAX),
        }
    }
}

/// Pool range (§1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolRange {
    /// Every object.
    All,
    /// Objects whose id is in `start..=end` (`-1` = unbounded).
    Ids {
        /// Lowest id or -1.
        start: i32,
        /// Highest id or -1.
        end: i32,
    },
    /// `size` objects from `offset` (oned: `start` = offset, `end` = -size).
    Page {
        /// Objects to skip.
        offset: u32,
        /// Page size (≥ 2: oned reads `end = -1` as "no upper bound").
        size: u32,
    },
}

impl PoolRange {
    fn params(self) -> Result<(i32, i32), OnedError> {
        match self {
            Self::All => Ok((-1, -1)),
            Self::Ids { start, end } => Ok((start, end)),
            Self::Page { offset, size } => {
                let size = i32::try_from(size)
                    .ok()
                    .filter(|s| *s >= 2)
                    .ok_or_else(|| OnedError::Invalid {
                        what: "page size".into(),
                        reason: "must be between 2 and 2^31-1".into(),
                    })?;
                let offset = i32::try_from(offset).map_err(|_| OnedError::Invalid {
                    what: "page offset".into(),
                    reason: "too large".into(),
                })?;
                Ok((offset, -size))
            }
        }
    }
}

/// VM state filter of `one.vmpool.info*` (§1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmStateFilter {
    /// -2: any state, DONE included.
    Any,
    /// -1: any state except DONE.
    NotDone,
    /// Exactly this state.
    Only(VmState),
}

impl VmStateFilter {
    fn code(self) -> Result<i32, OnedError> {
        match self {
            Self::Any => Ok(-2),
            Self::NotDone => Ok(-1),
            Self::Only(s) => i32::try_from(s.code())
                .ok()
                .filter(|c| (0..=11).contains(c))
                .ok_or_else(|| OnedError::Invalid {
                    what: "state filter".into(),
                    reason: format!("{s} cannot be filtered on"),
                }),
        }
    }
}

/// `one.vm.action` actions (7.4 `VMActions::action_from_str`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum VmAction {
    Terminate,
    TerminateHard,
    Undeploy,
    UndeployHard,
    Poweroff,
    PoweroffHard,
    Reboot,
    RebootHard,
    Hold,
    Release,
    Stop,
    Suspend,
    Resume,
    Resched,
    Unresched,
}

impl VmAction {
    /// The action string oned expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Terminate => "terminate",
            Self::TerminateHard => "terminate-hard",
            Self::Undeploy => "undeploy",
            Self::UndeployHard => "undeploy-hard",
            Self::Poweroff => "poweroff",
            Self::PoweroffHard => "poweroff-hard",
            Self::Reboot => "reboot",
            Self::RebootHard => "reboot-hard",
            Self::Hold => "hold",
            Self::Release => "release",
            Self::Stop => "stop",
            Self::Suspend => "suspend",
            Self::Resume => "resume",
            Self::Resched => "resched",
            Self::Unresched => "unresched",
        }
    }
}

/// Replace or merge (`one.vm.update`, `one.vm.updateconf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateType {
    /// 0: replace the whole template (updateconf: wipes absent sections, §1.5).
    Replace,
    /// 1: merge into the existing template.
    Merge,
}

impl UpdateType {
    fn code(self) -> i32 {
        match self {
            Self::Replace => 0,
            Self::Merge => 1,
        }
    }
}

/// `one.vm.recover` operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum RecoverOp {
    Failure,
    Success,
    Retry,
    Delete,
    DeleteRecreate,
    DeleteDb,
}

impl RecoverOp {
    fn code(self) -> i32 {
        match self {
            Self::Failure => 0,
            Self::Success => 1,
            Self::Retry => 2,
            Self::Delete => 3,
            Self::DeleteRecreate => 4,
            Self::DeleteDb => 5,
        }
    }
}

/// Document lock levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum LockLevel {
    Use,
    Manage,
    Admin,
    All,
}

impl LockLevel {
    fn code(self) -> i32 {
        match self {
            Self::Use => 1,
            Self::Manage => 2,
            Self::Admin => 3,
            Self::All => 4,
        }
    }
}

/// A `one.vmpool.info*` query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPoolQuery {
    /// Ownership filter.
    pub filter: PoolFilter,
    /// Range or page.
    pub range: PoolRange,
    /// State filter.
    pub state: VmStateFilter,
}

impl Default for VmPoolQuery {
    fn default() -> Self {
        Self {
            filter: PoolFilter::All,
            range: PoolRange::All,
            state: VmStateFilter::NotDone,
        }
    }
}

/// The filter and range parameters every `one.*pool.info` call starts with.
fn pool_params(filter: PoolFilter, range: PoolRange) -> Result<Vec<Param<'static>>, OnedError> {
    let (start, end) = range.params()?;
    Ok(vec![
        Param::Int(filter.code()),
        Param::Int(start),
        Param::Int(end),
    ])
}

fn id_param(what: &str, id: i64) -> Result<Param<'static>, OnedError> {
    i32::try_from(id)
        .map(Param::Int)
        .map_err(|_| OnedError::Invalid {
            what: what.into(),
            reason: format!("{id} does not fit an XML-RPC int"),
        })
}

/// The oned client. Cheap to clone.
#[derive(Clone)]
pub struct OnedClient {
    http: reqwest::Client,
    endpoint: url::Url,
    session: Secret,
    retry: RetryPolicy,
    max_body: usize,
    budget: Arc<ApiBudget>,
    stats: Arc<ApiStats>,
    redactor: Redactor,
}

impl std::fmt::Debug for OnedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnedClient")
            .field("endpoint", &redact_url(&self.endpoint))
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl OnedClient {
    /// Build a client from `cfg`, sharing `budget` and `stats` with the other clients.
    pub fn new(
        cfg: &OneConfig,
        budget: Arc<ApiBudget>,
        stats: Arc<ApiStats>,
    ) -> Result<Self, OnedError> {
        let http = http::build_client(cfg.timeout, cfg.ca_bundle.as_deref(), &cfg.user_agent)
            .map_err(OnedError::Config)?;
        let session = cfg.credentials.session();
        let redactor = Redactor::new([
            session.expose().to_string(),
            cfg.credentials.password().expose().to_string(),
        ]);
        Ok(Self {
            http,
            endpoint: cfg.xmlrpc.clone(),
            session,
            retry: cfg.retry,
            max_body: cfg.max_xmlrpc_body,
            budget,
            stats,
            redactor,
        })
    }

    /// The statistics this client updates.
    pub fn stats(&self) -> &Arc<ApiStats> {
        &self.stats
    }

    /// `one.system.version`.
    pub async fn system_version(&self) -> Result<String, OnedError> {
        let v = self.call("one.system.version", None, true, vec![]).await?;
        expect_string("one.system.version", v)
    }

    /// `one.user.info` (`-1` = the authenticated user).
    pub async fn user_info(&self, id: i64) -> Result<User, OnedError> {
        let m = "one.user.info";
        let xml = self
            .info_string(m, id, vec![id_param("user id", id)?])
            .await?;
        model::parse_user(&xml).map_err(|e| decode(m, e))
    }

    /// `one.vm.info`: the full VM body.
    pub async fn vm_info(&self, id: i64) -> Result<Vm, OnedError> {
        let m = "one.vm.info";
        let xml = self
            .info_string(m, id, vec![id_param("VM id", id)?])
            .await?;
        model::parse_vm(&xml).map_err(|e| decode(m, e))
    }

    /// `one.vmpool.info`: short bodies (no CONTEXT, no custom user-template keys).
    pub async fn vmpool_info(&self, q: &VmPoolQuery) -> Result<Vec<Vm>, OnedError> {
        self.vmpool("one.vmpool.info", q).await
    }

    /// `one.vmpool.infoextended`: full bodies.
    pub async fn vmpool_info_extended(&self, q: &VmPoolQuery) -> Result<Vec<Vm>, OnedError> {
        self.vmpool("one.vmpool.infoextended", q).await
    }

    /// Every VM matching `filter`/`state`, full bodies, paged with `page_size`
    /// (use [`DEFAULT_PAGE_SIZE`]).
    ///
    /// Guarantees: ⌈N / page_size⌉ requests for N VMs (each page asks for one extra VM to
    /// know whether another page follows), never a per-VM call; a VM is returned once.
    /// Caveats: offset paging is not a snapshot — the one-VM overlap between pages
    /// absorbs one deletion between two page reads; more concurrent deletions may hide a
    /// VM until the next listing.
    pub async fn list_all_vms_extended(
        &self,
        filter: PoolFilter,
        state: VmStateFilter,
        page_size: u32,
    ) -> Result<Vec<Vm>, OnedError> {
        self.list_all_vms_extended_map(filter, state, page_size, |vm| vm)
            .await
    }

    /// [`Self::list_all_vms_extended`], turning each VM into `T` as its page arrives, so a
    /// caller keeping a few fields never holds every full VM model at once.
    pub async fn list_all_vms_extended_map<T>(
        &self,
        filter: PoolFilter,
        state: VmStateFilter,
        page_size: u32,
        mut keep: impl FnMut(Vm) -> T,
    ) -> Result<Vec<T>, OnedError> {
        if page_size == 0 || page_size >= i32::MAX as u32 {
            return Err(OnedError::Invalid {
                what: "page size".into(),
                reason: "must be at least 1".into(),
            });
        }
        let mut out: Vec<T> = Vec::new();
        let mut seen: HashSet<i64> = HashSet::new();
        let mut offset = 0u32;
        loop {
            let q = VmPoolQuery {
                filter,
                range: PoolRange::Page {
                    offset,
                    size: page_size + 1,
                },
                state,
            };
            let page = self.vmpool_info_extended(&q).await?;
            let more = page.len() > page_size as usize;
            for vm in page {
                if seen.insert(vm.id) {
                    out.push(keep(vm));
                }
            }
            if !more {
                return Ok(out);
            }
            offset = offset.saturating_add(page_size);
        }
    }

    async fn vmpool(&self, m: &'static str, q: &VmPoolQuery) -> Result<Vec<Vm>, OnedError> {
        let mut params = pool_params(q.filter, q.range)?;
        params.push(Param::Int(q.state.code()?));
        self.pool(m, params, model::parse_vm_pool).await
    }

    /// One pool listing: a single read call, the body parsed off the async workers.
    async fn pool<T: Send + 'static>(
        &self,
        m: &'static str,
        params: Vec<Param<'static>>,
        parse: fn(&str) -> Result<T, ModelError>,
    ) -> Result<T, OnedError> {
        let v = self.call(m, None, true, params).await?;
        let xml = expect_string(m, v)?;
        parse_off_thread(m, xml, parse).await
    }

    /// `one.vm.action` (action first, then id). Returns the VM id.
    pub async fn vm_action(&self, action: VmAction, id: i64) -> Result<i64, OnedError> {
        let m = "one.vm.action";
        let params = vec![Param::from(action.as_str()), id_param("VM id", id)?];
        let v = self.call(m, Some(id), false, params).await?;
        expect_int(m, v)
    }

    /// `one.vm.update`: the VM's USER_TEMPLATE (template text or `<TEMPLATE>` XML).
    pub async fn vm_update(
        &self,
        id: i64,
        template: &str,
        how: UpdateType,
    ) -> Result<i64, OnedError> {
        self.vm_template_call("one.vm.update", id, template, how)
            .await
    }

    /// `one.vm.updateconf` with merge: only the sections and keys given change (a replace
    /// would wipe every absent section, §1.5).
    pub async fn vm_updateconf(&self, id: i64, template: &str) -> Result<i64, OnedError> {
        self.vm_updateconf_with(id, template, UpdateType::Merge)
            .await
    }

    /// `one.vm.updateconf` with an explicit update type.
    pub async fn vm_updateconf_with(
        &self,
        id: i64,
        template: &str,
        how: UpdateType,
    ) -> Result<i64, OnedError> {
        self.vm_template_call("one.vm.updateconf", id, template, how)
            .await
    }

    /// `(VM id, template, update type)` calls answering the VM id: update and updateconf.
    async fn vm_template_call(
        &self,
        m: &'static str,
        id: i64,
        template: &str,
        how: UpdateType,
    ) -> Result<i64, OnedError> {
        let params = vec![
            id_param("VM id", id)?,
            Param::from(template),
            Param::Int(how.code()),
        ];
        let v = self.call(m, Some(id), false, params).await?;
        expect_int(m, v)
    }

    /// `one.vm.recover`.
    pub async fn vm_recover(&self, id: i64, op: RecoverOp) -> Result<i64, OnedError> {
        let m = "one.vm.recover";
        let params = vec![id_param("VM id", id)?, Param::Int(op.code())];
        let v = self.call(m, Some(id), false, params).await?;
        expect_int(m, v)
    }

    /// `one.template.info` (`extended` resolves DISK sizes etc.).
    pub async fn template_info(&self, id: i64, extended: bool) -> Result<VmTemplate, OnedError> {
        let m = "one.template.info";
        let params = vec![id_param("template id", id)?, Param::Bool(extended)];
        let xml = self.info_string(m, id, params).await?;
        model::parse_vm_template(&xml).map_err(|e| decode(m, e))
    }

    /// `one.templatepool.info`.
    pub async fn templatepool_info(
        &self,
        filter: PoolFilter,
        range: PoolRange,
    ) -> Result<Vec<VmTemplate>, OnedError> {
        let m = "one.templatepool.info";
        self.pool(
            m,
            pool_params(filter, range)?,
            model::parse_vm_template_pool,
        )
        .await
    }

    /// `one.template.allocate`: returns the new template id.
    pub async fn template_allocate(&self, template: &str) -> Result<i64, OnedError> {
        let m = "one.template.allocate";
        let v = self
            .call(m, None, false, vec![Param::from(template)])
            .await?;
        expect_int(m, v)
    }

    /// `one.template.instantiate` with all five parameters (6.10 needs hold and extra
    /// template together). Returns the new VM id.
    pub async fn template_instantiate(
        &self,
        id: i64,
        name: &str,
        hold: bool,
        extra_template: &str,
        persistent: bool,
    ) -> Result<i64, OnedError> {
        let m = "one.template.instantiate";
        let params = vec![
            id_param("template id", id)?,
            Param::from(name),
            Param::Bool(hold),
            Param::from(extra_template),
            Param::Bool(persistent),
        ];
        let v = self.call(m, Some(id), false, params).await?;
        expect_int(m, v)
    }

    /// `one.vn.info`.
    pub async fn vn_info(&self, id: i64) -> Result<VirtualNetwork, OnedError> {
        let m = "one.vn.info";
        let xml = self
            .info_string(m, id, vec![id_param("network id", id)?])
            .await?;
        model::parse_vnet(&xml).map_err(|e| decode(m, e))
    }

    /// `one.vnpool.info`.
    pub async fn vnpool_info(
        &self,
        filter: PoolFilter,
        range: PoolRange,
    ) -> Result<Vec<VirtualNetwork>, OnedError> {
        let m = "one.vnpool.info";
        self.pool(m, pool_params(filter, range)?, model::parse_vnet_pool)
            .await
    }

    /// `one.vn.allocate` (`cluster_id` -1 = default cluster). Returns the network id.
    pub async fn vn_allocate(&self, template: &str, cluster_id: i64) -> Result<i64, OnedError> {
        let m = "one.vn.allocate";
        let params = vec![Param::from(template), id_param("cluster id", cluster_id)?];
        let v = self.call(m, None, false, params).await?;
        expect_int(m, v)
    }

    /// `one.image.allocate` of `template` (e.g. `NAME` and `PATH` to a file oned may read,
    /// as `oneimage create --path` sends it) into datastore `datastore_id`: the new image's
    /// id. oned answers at once; the image is LOCKED until its copy is done ([`Self::image_info`]).
    pub async fn image_allocate(
        &self,
        template: &str,
        datastore_id: i64,
    ) -> Result<i64, OnedError> {
        let m = "one.image.allocate";
        let params = vec![
            Param::from(template),
            id_param("datastore id", datastore_id)?,
        ];
        let v = self.call(m, None, false, params).await?;
        expect_int(m, v)
    }

    /// `one.image.info`.
    pub async fn image_info(&self, id: i64) -> Result<Image, OnedError> {
        let m = "one.image.info";
        let xml = self
            .info_string(m, id, vec![id_param("image id", id)?])
            .await?;
        model::parse_image(&xml).map_err(|e| decode(m, e))
    }

    /// `one.document.info`.
    pub async fn document_info(&self, id: i64) -> Result<Document, OnedError> {
        let m = "one.document.info";
        let xml = self
            .info_string(m, id, vec![id_param("document id", id)?])
            .await?;
        model::parse_document(&xml).map_err(|e| decode(m, e))
    }

    /// `one.document.lock`.
    pub async fn document_lock(&self, id: i64, level: LockLevel) -> Result<(), OnedError> {
        let m = "one.document.lock";
        let params = vec![id_param("document id", id)?, Param::Int(level.code())];
        let v = self.call(m, Some(id), false, params).await?;
        expect_ack(m, v)
    }

    /// `one.document.lock` with `test=true`: oned refuses (ACTION, the message being the
    /// lock's TIME) when the document is locked at all, by anyone, so this is a
    /// compare-and-set even between two clients of the same user.
    pub async fn document_try_lock(&self, id: i64, level: LockLevel) -> Result<(), OnedError> {
        let m = "one.document.lock";
        let params = vec![
            id_param("document id", id)?,
            Param::Int(level.code()),
            Param::Bool(true),
        ];
        let v = self.call(m, Some(id), false, params).await?;
        expect_ack(m, v)
    }

    /// `one.document.allocate` of template text `template` with document type `doc_type`;
    /// returns the new document id.
    pub async fn document_allocate(&self, template: &str, doc_type: i32) -> Result<i64, OnedError> {
        let m = "one.document.allocate";
        let params = vec![Param::from(template), Param::Int(doc_type)];
        let v = self.call(m, None, false, params).await?;
        expect_int(m, v)
    }

    /// `one.document.update`: replace or merge the document's TEMPLATE.
    pub async fn document_update(
        &self,
        id: i64,
        template: &str,
        how: UpdateType,
    ) -> Result<i64, OnedError> {
        let m = "one.document.update";
        let params = vec![
            id_param("document id", id)?,
            Param::from(template),
            Param::Int(how.code()),
        ];
        let v = self.call(m, Some(id), false, params).await?;
        expect_int(m, v)
    }

    /// `one.documentpool.info` of documents of type `doc_type` (all types when negative).
    pub async fn documentpool_info(
        &self,
        filter: PoolFilter,
        doc_type: i32,
    ) -> Result<Vec<Document>, OnedError> {
        let m = "one.documentpool.info";
        let mut params = pool_params(filter, PoolRange::All)?;
        params.push(Param::Int(doc_type));
        self.pool(m, params, model::parse_document_pool).await
    }

    /// `one.document.unlock`.
    pub async fn document_unlock(&self, id: i64) -> Result<(), OnedError> {
        let m = "one.document.unlock";
        let v = self
            .call(m, Some(id), false, vec![id_param("document id", id)?])
            .await?;
        expect_ack(m, v)
    }

    async fn info_string(
        &self,
        m: &'static str,
        id: i64,
        params: Vec<Param<'_>>,
    ) -> Result<String, OnedError> {
        let v = self.call(m, Some(id), true, params).await?;
        expect_string(m, v)
    }

    /// The one call path: budget, span, stats, retries (idempotent reads only).
    /// The session is prepended here and never enters the span.
    async fn call(
        &self,
        method: &'static str,
        object_id: Option<i64>,
        idempotent: bool,
        params: Vec<Param<'_>>,
    ) -> Result<Value, OnedError> {
        let span = rpc_span(method, &self.endpoint, object_id);
        let started = Instant::now();
        let result = async {
            let mut all = Vec::with_capacity(params.len() + 1);
            all.push(Param::from(self.session.expose()));
            all.extend(params);
            let body = xmlrpc::encode_call(method, &all).map_err(|e| OnedError::Invalid {
                what: format!("{method} parameter {}", e.index),
                reason: "holds a control character XML cannot carry".into(),
            })?;
            run_with_retry(idempotent, &self.retry, || {
                self.attempt(method, body.clone())
            })
            .await
        }
        .instrument(span.clone())
        .await;
        let outcome = result
            .as_ref()
            .map_or_else(OnedError::outcome, |_| Outcome::Ok);
        finish_span(&span, outcome, started);
        if let Err(e) = &result {
            span.in_scope(|| tracing::debug!(error = %e, "oned call failed"));
        }
        result
    }

    async fn attempt(&self, method: &'static str, body: String) -> Result<Value, OnedError> {
        self.budget.acquire().await;
        let started = Instant::now();
        let result = self.attempt_once(method, body).await;
        let outcome = result
            .as_ref()
            .map_or_else(OnedError::outcome, |_| Outcome::Ok);
        self.stats.record(method, outcome, started.elapsed());
        result
    }

    async fn attempt_once(&self, method: &'static str, body: String) -> Result<Value, OnedError> {
        let mut resp = self
            .http
            .post(self.endpoint.clone())
            .header(reqwest::header::CONTENT_TYPE, "text/xml")
            .body(body)
            .send()
            .await
            .map_err(|e| OnedError::Transport {
                method,
                message: self.redactor.clean(&http::describe_reqwest(&e)),
            })?;
        let status = resp.status();
        let bytes = http::read_capped(&mut resp, self.max_body)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge { limit } => OnedError::TooLarge { method, limit },
                BodyError::Transport(m) => OnedError::Transport {
                    method,
                    message: self.redactor.clean(&m),
                },
            })?;
        if status != reqwest::StatusCode::OK {
            return Err(OnedError::Http {
                method,
                code: status.as_u16(),
                message: self.redactor.clean(&http::body_message(&bytes)),
            });
        }
        let text = String::from_utf8(bytes).map_err(|_| OnedError::Decode {
            method,
            reason: "answer is not UTF-8".into(),
        })?;
        let decode_err = |reason: String| OnedError::Decode {
            method,
            reason: self.redactor.clean(&reason),
        };
        match xmlrpc::decode_response(&text).map_err(|e| decode_err(e.to_string()))? {
            Response::Fault { code, message } => Err(OnedError::Fault {
                method,
                code,
                message: self.redactor.clean(&message),
            }),
            Response::Value(v) => match xmlrpc::one_result(v).map_err(decode_err)? {
                OneResult::Success(v) => Ok(v),
                OneResult::Failure {
                    message,
                    code,
                    resp_id,
                } => Err(OnedError::Api {
                    method,
                    code,
                    message: self.redactor.clean(&message),
                    resp_id: resp_id.filter(|id| *id >= 0),
                }),
            },
        }
    }
}

fn decode(method: &'static str, e: ModelError) -> OnedError {
    OnedError::Decode {
        method,
        reason: e.to_string(),
    }
}

fn expect_string(method: &'static str, v: Value) -> Result<String, OnedError> {
    match v {
        Value::Str(s) => Ok(s),
        other => Err(OnedError::Decode {
            method,
            reason: format!("expected a string result, found {}", other.kind()),
        }),
    }
}

fn expect_int(method: &'static str, v: Value) -> Result<i64, OnedError> {
    match v {
        Value::Int(i) => Ok(i),
        other => Err(OnedError::Decode {
            method,
            reason: format!("expected an int result, found {}", other.kind()),
        }),
    }
}

/// Lock/unlock answer an id (7.x) or a boolean (older).
fn expect_ack(method: &'static str, v: Value) -> Result<(), OnedError> {
    match v {
        Value::Int(_) | Value::Bool(true) => Ok(()),
        other => Err(OnedError::Decode {
            method,
            reason: format!("unexpected result {other:?}"),
        }),
    }
}

/// Parse a (possibly multi-megabyte) pool on the blocking pool, off the async workers.
async fn parse_off_thread<T: Send + 'static>(
    method: &'static str,
    xml: String,
    parse: fn(&str) -> Result<T, ModelError>,
) -> Result<T, OnedError> {
    tokio::task::spawn_blocking(move || parse(&xml))
        .await
        .map_err(|e| OnedError::Decode {
            method,
            reason: format!("parser task failed: {e}"),
        })?
        .map_err(|e| decode(method, e))
}
