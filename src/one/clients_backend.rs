//! The [`OneBackend`] implementation over this module's clients (the adapter behind the
//! port in [`super::backend`]).

use std::num::NonZeroU32;
use std::sync::Arc;

use serde_json::Value;

use super::backend::{
    BackendError, BackendErrorKind, BackendFuture, Document, Identity, NameScope, OneBackend,
    VmRecord,
};
use crate::one::oned::{PoolFilter, PoolRange, UpdateType, VmAction, VmStateFilter};
use crate::one::oneflow::FlowDocument;
use crate::one::xmlrpc::ErrorCode;
use crate::one::{
    ApiBudget, ApiStats, OneConfig, OneFlowClient, OneFlowError, OnedClient, OnedError,
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
    /// The request budget both share.
    pub budget: Arc<ApiBudget>,
}

impl ClientsBackend {
    /// Clients for `cfg`, sharing a budget of `cfg.requests_per_second`.
    pub fn new(cfg: &OneConfig) -> anyhow::Result<Self> {
        crate::one::http::ensure_crypto_provider();
        let budget = ApiBudget::new(cfg.requests_per_second);
        let stats = ApiStats::new();
        Ok(Self {
            oned: OnedClient::new(cfg, budget.clone(), stats.clone())?,
            oneflow: OneFlowClient::new(cfg, budget.clone(), stats.clone())?,
            stats,
            budget,
        })
    }

    /// Clients for `cfg`, with the budget overridden by `api_rate` when given (the
    /// `--api-rate` of `run`).
    pub fn with_rate(mut cfg: OneConfig, api_rate: Option<NonZeroU32>) -> anyhow::Result<Self> {
        if let Some(rate) = api_rate {
            cfg.requests_per_second = rate;
        }
        Self::new(&cfg)
    }
}

/// The port's classification of an oned failure. NotFound is oned's typed `NO_EXISTS` code
/// (0x400), never a match on the text: a message may quote any word, and a renamed code
/// must not silently turn "gone" into "rejected" (`oned_errors_map_by_their_typed_code`).
fn oned_err(e: OnedError) -> BackendError {
    let kind = match &e {
        // The request may have reached oned: the outcome is unknown.
        OnedError::Transport { .. } | OnedError::Http { .. } | OnedError::TooLarge { .. } => {
            BackendErrorKind::Ambiguous
        }
        OnedError::Decode { .. } => BackendErrorKind::Decode,
        OnedError::Api {
            code: ErrorCode::NoExists,
            ..
        } => BackendErrorKind::NotFound,
        OnedError::Config(_)
        | OnedError::Invalid { .. }
        | OnedError::Fault { .. }
        | OnedError::Api { .. } => BackendErrorKind::Rejected,
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

/// The planner's fields of a VM; only protocol attributes of its user template.
fn vm_record(vm: crate::one::model::Vm) -> VmRecord {
    VmRecord {
        id: id(vm.id),
        uid: vm.uid,
        state: vm.state,
        lcm_state: vm.lcm_state,
        stime: vm.stime,
        user_template: vm
            .user_template
            .iter()
            .filter(|(k, _)| crate::protocol::observed_attribute(k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        addresses: vm.addresses(),
        name: vm.name,
    }
}

fn doc(d: FlowDocument) -> Document {
    Document {
        id: id(d.id),
        name: d.name,
        uid: d.uid,
        gid: d.gid,
        body: d.body,
    }
}

fn pool_filter(scope: NameScope) -> PoolFilter {
    match scope {
        NameScope::Mine => PoolFilter::Mine,
        NameScope::User(uid) => PoolFilter::User(uid),
    }
}

impl OneBackend for ClientsBackend {
    fn system_version(&self) -> BackendFuture<'_, String> {
        Box::pin(async move { self.oned.system_version().await.map_err(oned_err) })
    }

    fn whoami(&self) -> BackendFuture<'_, Identity> {
        Box::pin(async move {
            let u = self.oned.user_info(-1).await.map_err(oned_err)?;
            Ok(Identity {
                uid: u.id,
                gid: u.gid,
                name: u.name,
            })
        })
    }

    fn list_services(&self) -> BackendFuture<'_, Vec<Document>> {
        Box::pin(async move {
            let list = self
                .oneflow
                .list_services_as::<super::backend::ListedBody>()
                .await
                .map_err(flow_err)?;
            Ok(list
                .into_iter()
                .map(|s| Document {
                    id: id(s.id),
                    name: s.name,
                    uid: s.uid,
                    gid: s.gid,
                    body: s.body.0,
                })
                .collect())
        })
    }

    fn list_vms(&self, page_size: u32) -> BackendFuture<'_, Vec<VmRecord>> {
        Box::pin(async move {
            // Page by page: only the fields the planner reads outlive their page. Only our
            // own VMs: any VM owner can write a role's tags into its user template.
            self.oned
                .list_all_vms_extended_map(
                    PoolFilter::Mine,
                    VmStateFilter::NotDone,
                    page_size,
                    vm_record,
                )
                .await
                .map_err(oned_err)
        })
    }

    fn vm_info(&self, vm_id: u64) -> BackendFuture<'_, VmRecord> {
        Box::pin(async move {
            self.oned
                .vm_info(int(vm_id)?)
                .await
                .map(vm_record)
                .map_err(oned_err)
        })
    }

    fn list_service_templates(&self) -> BackendFuture<'_, Vec<Document>> {
        Box::pin(async move {
            let list = self
                .oneflow
                .list_service_templates()
                .await
                .map_err(flow_err)?;
            Ok(list.into_iter().map(|t| doc(t.0)).collect())
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

    fn get_service(&self, service_id: u64) -> BackendFuture<'_, Document> {
        Box::pin(async move {
            let s = self
                .oneflow
                .get_service(int(service_id)?)
                .await
                .map_err(flow_err)?;
            Ok(doc(s.0))
        })
    }

    fn update_service(&self, service_id: u64, body: Value) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            self.oneflow
                .update_service(int(service_id)?, &body)
                .await
                .map_err(flow_err)
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

    fn vm_templates(&self, scope: NameScope) -> BackendFuture<'_, Vec<(u64, String)>> {
        Box::pin(async move {
            let list = self
                .oned
                .templatepool_info(pool_filter(scope), PoolRange::All)
                .await
                .map_err(oned_err)?;
            Ok(list.into_iter().map(|t| (id(t.id), t.name)).collect())
        })
    }

    fn networks(&self, scope: NameScope) -> BackendFuture<'_, Vec<(u64, String)>> {
        Box::pin(async move {
            let list = self
                .oned
                .vnpool_info(pool_filter(scope), PoolRange::All)
                .await
                .map_err(oned_err)?;
            Ok(list.into_iter().map(|n| (id(n.id), n.name)).collect())
        })
    }

    fn vm_template_name(&self, template_id: u64) -> BackendFuture<'_, String> {
        Box::pin(async move {
            let t = self
                .oned
                .template_info(int(template_id)?, false)
                .await
                .map_err(oned_err)?;
            Ok(t.name)
        })
    }

    fn network_name(&self, network_id: u64) -> BackendFuture<'_, String> {
        Box::pin(async move {
            let n = self
                .oned
                .vn_info(int(network_id)?)
                .await
                .map_err(oned_err)?;
            Ok(n.name)
        })
    }

    fn api_stats(&self) -> Option<Arc<ApiStats>> {
        Some(self.stats.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_config() -> OneConfig {
        let url = |s: &str| url::Url::parse(s).expect("url");
        OneConfig::new(
            url("http://127.0.0.1:1/RPC2"),
            url("http://127.0.0.1:2"),
            crate::one::Credentials::new("oneadmin", "pw").expect("credentials"),
        )
    }

    #[test]
    fn an_api_rate_reaches_the_shared_budget_and_stats_are_exposed() {
        let rate = NonZeroU32::new(7).expect("non-zero");
        let backend = ClientsBackend::with_rate(one_config(), Some(rate)).expect("clients");
        assert_eq!(backend.budget.per_second(), 7);
        let stats = backend.api_stats().expect("clients have stats");
        assert!(Arc::ptr_eq(&stats, &backend.stats));

        let default = ClientsBackend::with_rate(one_config(), None).expect("clients");
        assert_eq!(
            default.budget.per_second(),
            crate::one::calls::DEFAULT_REQUESTS_PER_SECOND
        );
    }

    #[test]
    fn oned_errors_map_by_their_typed_code() {
        let api = |code: ErrorCode, message: &str| OnedError::Api {
            method: "one.vm.info",
            code,
            message: message.into(),
            resp_id: Some(42),
        };
        // oned's own text for a missing VM carries no code name: only the code says "gone".
        let gone = oned_err(api(
            ErrorCode::NoExists,
            "[one.vm.info] Error getting VM [42].",
        ));
        assert_eq!(gone.kind, BackendErrorKind::NotFound);
        assert!(gone.message.contains("Error getting VM [42]"), "{gone:?}");
        // A message quoting the word is not the code.
        for e in [
            api(
                ErrorCode::Action,
                "[one.vm.action] NO_EXISTS in the hook's output",
            ),
            api(ErrorCode::Locked, "NO_EXISTS"),
            OnedError::Fault {
                method: "one.vm.info",
                code: 1,
                message: "NO_EXISTS".into(),
            },
        ] {
            assert_eq!(oned_err(e).kind, BackendErrorKind::Rejected);
        }
        let transport = OnedError::Transport {
            method: "one.vm.info",
            message: "connection reset".into(),
        };
        assert_eq!(oned_err(transport).kind, BackendErrorKind::Ambiguous);
        let decode = OnedError::Decode {
            method: "one.vm.info",
            reason: "x".into(),
        };
        assert_eq!(oned_err(decode).kind, BackendErrorKind::Decode);
    }
}
