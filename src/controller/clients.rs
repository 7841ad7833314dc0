//! The [`OneBackend`] implementation over [`crate::one`]'s clients, and a context built
//! from the usual OpenNebula environment (`ONE_XMLRPC`, `ONEFLOW_URL`, `ONE_AUTH`).

use std::sync::Arc;

use serde_json::Value;

use super::backend::{
    BackendError, BackendErrorKind, BackendFuture, Document, OneBackend, VmRecord,
};
use super::context::{Context, ReconcileOptions};
use crate::one::oned::{PoolFilter, PoolRange, UpdateType, VmAction, VmStateFilter};
use crate::one::{
    ApiBudget, ApiStats, ConfigOptions, OneConfig, OneFlowClient, OneFlowError, OnedClient,
    OnedError,
};

/// oned + OneFlow clients sharing one budget and one set of statistics.
#[derive(Clone, Debug)]
pub struct ClientsBackend {
    /// oned XML-RPC.
    pub oned: OnedClient,
    /// OneFlow REST.
    pub oneflow: OneFlowClient,
    /// Call statistics of both (the `/metrics` source).
    pub stats: Arc<ApiStats>,
}

impl ClientsBackend {
    /// Clients for `cfg`, sharing a budget of `cfg.requests_per_second`.
    pub fn new(cfg: &OneConfig) -> anyhow::Result<Self> {
        crate::one::http::ensure_crypto_provider();
        let budget = ApiBudget::new(cfg.requests_per_second);
        let stats = ApiStats::new();
        Ok(Self {
            oned: OnedClient::new(cfg, budget.clone(), stats.clone())?,
            oneflow: OneFlowClient::new(cfg, budget, stats.clone())?,
            stats,
        })
    }
}

/// A context connected to the OpenNebula front-end named by the environment.
pub async fn context_from_env(controller_id: &str) -> anyhow::Result<Context> {
    let cfg = OneConfig::from_env(&ConfigOptions::default())?;
    let backend = ClientsBackend::new(&cfg)?;
    Ok(Context::connect(
        Arc::new(backend),
        controller_id,
        ReconcileOptions::default(),
    )
    .await?)
}

fn oned_err(e: OnedError) -> BackendError {
    let kind = match &e {
        // The request may have reached oned: the outcome is unknown.
        OnedError::Transport { .. } | OnedError::Http { .. } | OnedError::TooLarge { .. } => {
            BackendErrorKind::Ambiguous
        }
        OnedError::Decode { .. } => BackendErrorKind::Decode,
        _ if e.to_string().contains("NO_EXISTS") => BackendErrorKind::NotFound,
        _ => BackendErrorKind::Rejected,
    };
    BackendError::new(kind, e.to_string())
}

fn flow_err(e: OneFlowError) -> BackendError {
    let kind = match &e {
        OneFlowError::NotFound { .. } => BackendErrorKind::NotFound,
        OneFlowError::Transport { .. } => BackendErrorKind::Ambiguous,
        // OneFlow answers 500 for wrong states and for its own crashes alike.
        OneFlowError::Status { code, .. } if *code >= 502 => BackendErrorKind::Ambiguous,
        OneFlowError::Decode { .. } => BackendErrorKind::Decode,
        _ => BackendErrorKind::Rejected,
    };
    BackendError::new(kind, e.to_string())
}

fn id(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn int(v: u64) -> Result<i64, BackendError> {
    i64::try_from(v)
        .map_err(|_| BackendError::new(BackendErrorKind::Rejected, format!("id {v} out of range")))
}

fn doc(id_: i64, name: &str, body: &Value) -> Document {
    Document {
        id: id(id_),
        name: name.to_string(),
        body: body.clone(),
    }
}

impl OneBackend for ClientsBackend {
    fn system_version(&self) -> BackendFuture<'_, String> {
        Box::pin(async move { self.oned.system_version().await.map_err(oned_err) })
    }

    fn list_services(&self) -> BackendFuture<'_, Vec<Document>> {
        Box::pin(async move {
            let list = self.oneflow.list_services().await.map_err(flow_err)?;
            Ok(list
                .iter()
                .map(|s| doc(s.id(), s.name(), s.body()))
                .collect())
        })
    }

    fn list_vms(&self, page_size: u32) -> BackendFuture<'_, Vec<VmRecord>> {
        Box::pin(async move {
            let vms = self
                .oned
                .list_all_vms_extended(PoolFilter::All, VmStateFilter::NotDone, page_size)
                .await
                .map_err(oned_err)?;
            Ok(vms
                .into_iter()
                .map(|vm| VmRecord {
                    id: id(vm.id),
                    state: vm.state.code(),
                    lcm_state: vm.lcm_state.code(),
                    stime: vm.stime,
                    user_template: vm
                        .user_template
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    name: vm.name,
                })
                .collect())
        })
    }

    fn list_service_templates(&self) -> BackendFuture<'_, Vec<Document>> {
        Box::pin(async move {
            let list = self
                .oneflow
                .list_service_templates()
                .await
                .map_err(flow_err)?;
            Ok(list
                .iter()
                .map(|t| doc(t.id(), t.name(), t.body()))
                .collect())
        })
    }

    fn create_service_template(&self, body: Value) -> BackendFuture<'_, u64> {
        Box::pin(async move {
            let t = self
                .oneflow
                .create_service_template(&body)
                .await
                .map_err(flow_err)?;
            Ok(id(t.id()))
        })
    }

    fn update_service_template(&self, template_id: u64, body: Value) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.oneflow
                .update_service_template(int(template_id)?, &body)
                .await
                .map(drop)
                .map_err(flow_err)
        })
    }

    fn instantiate(&self, template_id: u64, merge_template: Value) -> BackendFuture<'_, u64> {
        Box::pin(async move {
            let s = self
                .oneflow
                .instantiate_service_template(int(template_id)?, Some(&merge_template))
                .await
                .map_err(flow_err)?;
            Ok(id(s.id()))
        })
    }

    fn scale(&self, service_id: u64, role: &str, cardinality: u32) -> BackendFuture<'_, ()> {
        let role = role.to_string();
        Box::pin(async move {
            self.oneflow
                .scale_service(int(service_id)?, &role, u64::from(cardinality), false)
                .await
                .map_err(flow_err)
        })
    }

    fn delete_service(&self, service_id: u64) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.oneflow
                .delete_service(int(service_id)?)
                .await
                .map_err(flow_err)
        })
    }

    fn vm_update_merge(&self, vm_id: u64, template: String) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.oned
                .vm_update(int(vm_id)?, &template, UpdateType::Merge)
                .await
                .map(drop)
                .map_err(oned_err)
        })
    }

    fn vm_terminate_hard(&self, vm_id: u64) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.oned
                .vm_action(VmAction::TerminateHard, int(vm_id)?)
                .await
                .map(drop)
                .map_err(oned_err)
        })
    }

    fn vm_templates(&self) -> BackendFuture<'_, Vec<(u64, String)>> {
        Box::pin(async move {
            let list = self
                .oned
                .templatepool_info(PoolFilter::All, PoolRange::All)
                .await
                .map_err(oned_err)?;
            Ok(list.into_iter().map(|t| (id(t.id), t.name)).collect())
        })
    }

    fn networks(&self) -> BackendFuture<'_, Vec<(u64, String)>> {
        Box::pin(async move {
            let list = self
                .oned
                .vnpool_info(PoolFilter::All, PoolRange::All)
                .await
                .map_err(oned_err)?;
            Ok(list.into_iter().map(|n| (id(n.id), n.name)).collect())
        })
    }
}
