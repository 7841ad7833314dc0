//! The agent's view of OneGate: a small trait so discovery and the supervisor can be
//! unit-tested with a fake, implemented by the real [`OneGateClient`].

use std::future::Future;

use crate::one::onegate::{GateService, GateVm};
use crate::one::{OneGateClient, OneGateError};

/// What the agent needs from OneGate.
pub trait Gate: Send + Sync {
    /// `GET /vm`.
    fn get_vm(&self) -> impl Future<Output = Result<GateVm, OneGateError>> + Send;
    /// `GET /vms/:id`.
    fn get_vm_by_id(&self, id: u64) -> impl Future<Output = Result<GateVm, OneGateError>> + Send;
    /// `PUT /vm` (merge).
    fn update_vm(
        &self,
        attrs: &[(&str, &str)],
    ) -> impl Future<Output = Result<(), OneGateError>> + Send;
    /// `PUT /vm` type 2 (delete one attribute).
    fn delete_vm_attribute(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<(), OneGateError>> + Send;
    /// `GET /service`.
    fn get_service(
        &self,
        extended: bool,
    ) -> impl Future<Output = Result<GateService, OneGateError>> + Send;
    /// Whether OneGate is configured at all (publishing is skipped quietly when not).
    fn is_configured(&self) -> bool {
        true
    }
}

impl Gate for OneGateClient {
    fn get_vm(&self) -> impl Future<Output = Result<GateVm, OneGateError>> + Send {
        OneGateClient::get_vm(self)
    }
    fn get_vm_by_id(&self, id: u64) -> impl Future<Output = Result<GateVm, OneGateError>> + Send {
        OneGateClient::get_vm_by_id(self, id)
    }
    fn update_vm(
        &self,
        attrs: &[(&str, &str)],
    ) -> impl Future<Output = Result<(), OneGateError>> + Send {
        OneGateClient::update_vm(self, attrs)
    }
    fn delete_vm_attribute(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<(), OneGateError>> + Send {
        OneGateClient::delete_vm_attribute(self, key)
    }
    fn get_service(
        &self,
        extended: bool,
    ) -> impl Future<Output = Result<GateService, OneGateError>> + Send {
        OneGateClient::get_service(self, extended)
    }
}

/// A gate that is not configured (no `ONEGATE_ENDPOINT`/`TOKENTXT`): every call fails with
/// a configuration error, so a standalone node still boots with a static address.
#[derive(Debug, Clone, Default)]
pub struct NoGate;

fn no_gate<T>() -> Result<T, OneGateError> {
    Err(OneGateError::Config(
        "OneGate is not configured (ONEGATE_ENDPOINT, TOKENTXT, VMID)".into(),
    ))
}

impl Gate for NoGate {
    fn is_configured(&self) -> bool {
        false
    }
    async fn get_vm(&self) -> Result<GateVm, OneGateError> {
        no_gate()
    }
    async fn get_vm_by_id(&self, _id: u64) -> Result<GateVm, OneGateError> {
        no_gate()
    }
    async fn update_vm(&self, _attrs: &[(&str, &str)]) -> Result<(), OneGateError> {
        no_gate()
    }
    async fn delete_vm_attribute(&self, _key: &str) -> Result<(), OneGateError> {
        no_gate()
    }
    async fn get_service(&self, _extended: bool) -> Result<GateService, OneGateError> {
        no_gate()
    }
}

/// Either the real client or [`NoGate`].
#[derive(Debug, Clone)]
pub enum AnyGate {
    /// Configured client.
    Real(OneGateClient),
    /// Not configured.
    None(NoGate),
}

impl Gate for AnyGate {
    fn is_configured(&self) -> bool {
        matches!(self, AnyGate::Real(_))
    }
    async fn get_vm(&self) -> Result<GateVm, OneGateError> {
        match self {
            AnyGate::Real(g) => g.get_vm().await,
            AnyGate::None(g) => g.get_vm().await,
        }
    }
    async fn get_vm_by_id(&self, id: u64) -> Result<GateVm, OneGateError> {
        match self {
            AnyGate::Real(g) => g.get_vm_by_id(id).await,
            AnyGate::None(g) => g.get_vm_by_id(id).await,
        }
    }
    async fn update_vm(&self, attrs: &[(&str, &str)]) -> Result<(), OneGateError> {
        match self {
            AnyGate::Real(g) => g.update_vm(attrs).await,
            AnyGate::None(g) => g.update_vm(attrs).await,
        }
    }
    async fn delete_vm_attribute(&self, key: &str) -> Result<(), OneGateError> {
        match self {
            AnyGate::Real(g) => g.delete_vm_attribute(key).await,
            AnyGate::None(g) => g.delete_vm_attribute(key).await,
        }
    }
    async fn get_service(&self, extended: bool) -> Result<GateService, OneGateError> {
        match self {
            AnyGate::Real(g) => g.get_service(extended).await,
            AnyGate::None(g) => g.get_service(extended).await,
        }
    }
}
