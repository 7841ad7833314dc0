//! Typed models of OpenNebula objects.

pub mod states;

pub use states::{LcmState, RoleState, ServiceState, VmState};
