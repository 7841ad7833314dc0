//! `flower-agent`: the appliance agent inside the SuperLink and SuperNode images.
//!
//! Owns: reading the OpenNebula context, TLS material, SuperLink discovery, running and
//! supervising Flower (docker or process runtime), publishing state through OneGate and
//! acting on controller requests written into the VM's user template, and serving the
//! node's Prometheus metrics.
//!
//! Must not: run a shell with any input. Every command is an argv array.

pub mod cli;
pub mod context;
pub mod discovery;
pub mod error;
pub mod events;
pub mod flower;
pub mod gate;
pub mod gpu;
pub mod linkstate;
pub mod metrics;
pub mod node;
pub mod node_auth;
pub mod onecontext;
pub mod paths;
pub mod privilege;
pub mod process;
pub mod supervisor;
pub mod tls;
pub mod trace;
pub mod training;
