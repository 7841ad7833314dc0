//! flower-reconcile: GitOps for Flower federated-learning clusters on OpenNebula.
//!
//! The crate is laid out by architecture, one module per part:
//!
//! | module | owns |
//! |---|---|
//! | [`api`] | the `FlowerCluster` resource: types, defaults, loading, validation, schema |
//! | [`render`] | spec → OneFlow service template + per-role `ONEAPP_*` context (pure) |
//! | [`one`] | OpenNebula: oned XML-RPC, OneFlow REST, OneGate REST clients, and the `OneBackend` port the reconciler uses |
//! | [`source`] | where desired state comes from: a directory or a Git repository |
//! | [`plan`] | (desired, live, now) → ordered actions (pure) |
//! | [`reconciler`] | the Flower reconciler: observe OpenNebula, apply a cluster's plan |
//! | [`runtime`] | the generic level-triggered loop: scheduler, backoff, instance lock, status tracking |
//! | [`service`] | `flower-reconcile run`: configuration, wiring, HTTP API |
//! | [`submit`] | run a Flower app on a managed cluster (`flwr run` with the cluster's address and CA) |
//! | [`agent`] | `flower-agent`, the node-level half inside the appliance images |
//! | [`telemetry`] | logging, tracing (OpenTelemetry) and metrics set-up |
//! | [`otel`] | the OTLP span exporter, trace continuation and JSON log lines with trace ids both binaries use |
//! | [`cli`] | the `flower-reconcile` command line: argument parsing and reports |
//! | [`demo`] | the one-command demo: onesim in-process, real Flower, one training run |
//! | [`error_chain`] | an error and its sources as one line (logs, status, transport errors) |
//! | [`exposition`] | `/metrics` content negotiation: OpenMetrics or the Prometheus text format |
//! | [`http_server`] | the HTTP server loop both binaries use: timeouts, connection cap, body cap, bounded shutdown |
//!
//! Without the default features (what the images build) only [`agent`], [`one`]'s
//! clients, [`protocol`], [`otel`], [`error_chain`], [`exposition`] and [`http_server`] are
//! compiled.
//!
//! The contract between the controller and the agents (VM user-template attributes) is
//! [`protocol`]. `fuzzing` (hidden) holds the harnesses of the `cargo fuzz` targets in
//! `fuzz/`.
#![forbid(unsafe_code)]

pub mod agent;
#[cfg(feature = "controller")]
pub mod api;
#[cfg(feature = "controller")]
pub mod cli;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error_chain;
pub mod exposition;
#[cfg(feature = "controller")]
#[doc(hidden)]
pub mod fuzzing;
pub mod http_server;
pub mod one;
pub mod otel;
#[cfg(feature = "controller")]
pub mod plan;
pub mod protocol;
#[cfg(feature = "controller")]
pub mod reconciler;
#[cfg(feature = "controller")]
pub mod render;
#[cfg(feature = "controller")]
pub mod runtime;
#[cfg(feature = "controller")]
pub mod service;
#[cfg(feature = "controller")]
pub mod source;
#[cfg(feature = "controller")]
pub mod submit;
#[cfg(feature = "controller")]
pub mod telemetry;
