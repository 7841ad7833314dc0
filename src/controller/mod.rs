//! The controller: observe live state, apply plans, and the long-running level-triggered
//! reconcile loop (scheduler, per-cluster backoff, concurrency limit), status and the
//! HTTP API (`/healthz`, `/readyz`, `/metrics`, `/api/v1/clusters`).
//!
//! Must not: decide what to change (that is [`crate::plan`]) or parse specs (that is
//! [`crate::api`]). It never mutates a service it does not own.

pub mod apply;
pub mod backend;
pub mod backoff;
pub mod clients;
pub mod config;
pub mod context;
pub mod desired;
pub mod driver;
pub mod http;
pub mod lease;
pub mod observe;
pub mod reconcile;
mod render_glue;
pub mod runtime;
pub mod scheduler;
pub mod status;
pub mod submit;

pub use apply::{Applied, Applier, ApplyError, ResolvedIds};
pub use backend::{
    BackendError, BackendErrorKind, BackendFuture, Document, Identity, NameScope, OneBackend,
    VmRecord,
};
pub use context::{Context, OneDialect, OwnershipOptions, ReconcileOptions, Trust};
pub use desired::desired_from_snapshot;
pub use observe::{build_live, observe};
pub use reconcile::{reconcile_one, ReconcileError, ReconcileOutcome};
