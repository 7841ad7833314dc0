//! The controller: observe live state, apply plans, and the long-running level-triggered
//! reconcile loop (scheduler, per-cluster backoff, concurrency limit), status and the
//! HTTP API (`/healthz`, `/readyz`, `/metrics`, `/api/v1/clusters`).
//!
//! Must not: decide what to change (that is [`crate::plan`]) or parse specs (that is
//! [`crate::api`]). It never mutates a service it does not own.

pub mod backoff;
pub mod scheduler;
