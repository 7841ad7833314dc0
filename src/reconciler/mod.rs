//! The Flower reconciler: observe OpenNebula, plan one cluster against its spec, apply
//! the plan through the [`crate::one::OneBackend`] port, and say when to look again.
//!
//! Owns: the observation of managed services and their VMs ([`observe`]), the bridge
//! from source snapshots to desired state ([`desired`]), the payloads of planned actions
//! (resolved ids and rendered bodies, [`prepare`]), their execution ([`apply`]; an
//! update's merged body, [`update_body`]), one reconcile ([`reconcile_one`]), the
//! converge loop behind `apply --wait`, the demo and the tests ([`converge`]) and the production
//! [`crate::runtime::Reconciler`] ([`driver::OneReconciler`]).
//!
//! Must not: decide what to change (that is [`crate::plan`]), parse specs (that is
//! [`crate::api`]), schedule itself (that is [`crate::runtime`]), or speak a wire protocol
//! (that is [`crate::one`]). It never mutates a service it does not own.

pub mod apply;
pub mod context;
pub mod converge;
pub mod desired;
pub mod driver;
pub mod observe;
pub mod prepare;
pub mod reconcile;
#[cfg(test)]
mod scenarios;
pub mod update_body;

pub use apply::{Applied, Applier, ApplyError};
pub use context::{Context, OwnershipOptions, ReconcileOptions, Trust, VmTracing};
pub use desired::desired_from_snapshot;
pub use observe::{build_live, observe};
pub use prepare::prepare;
pub use reconcile::{reconcile_allowed, reconcile_one, ReconcileError, ReconcileOutcome};
