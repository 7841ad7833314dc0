//! OpenNebula clients: oned XML-RPC, OneFlow REST and OneGate REST.
//!
//! Owns: wire codecs, typed models of OpenNebula objects, configuration from the usual
//! OpenNebula environment (`ONE_XMLRPC`, `ONEFLOW_URL`, `ONE_AUTH`, `ONEGATE_ENDPOINT`),
//! the shared rate limiter, retries of idempotent reads, and a tracing span per call.
//!
//! Must not: make decisions. Clients report what OpenNebula says; callers decide.
//! Credentials never appear in errors, spans or logs.

#[cfg(feature = "controller")]
pub mod backend;
pub mod calls;
#[cfg(feature = "controller")]
pub mod clients_backend;
pub mod config;
#[cfg(all(test, feature = "controller"))]
pub(crate) mod fake;
pub mod http;
pub(crate) mod json;
pub mod model;
pub mod oned;
pub mod oneflow;
pub mod onegate;
pub mod secret;
pub mod xml;
pub mod xmlrpc;

#[cfg(feature = "controller")]
pub use backend::{
    BackendError, BackendErrorKind, BackendFuture, Document, Identity, NameScope, OneBackend,
    VmRecord,
};
pub use calls::{ApiBudget, ApiStats, Outcome, RetryPolicy, StatsEntry};
#[cfg(feature = "controller")]
pub use clients_backend::ClientsBackend;
pub use config::{ConfigError, ConfigOptions, Credentials, OneConfig};
pub use oned::{OnedClient, OnedError};
pub use oneflow::{OneFlowClient, OneFlowError, Service, ServiceTemplate};
pub use onegate::{OneGateClient, OneGateConfig, OneGateError};
pub use secret::Secret;
