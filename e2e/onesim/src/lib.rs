//! onesim: a faithful OpenNebula simulator (oned XML-RPC, OneFlow, OneGate) that boots VMs
//! as real processes, with fault injection.
//!
//! It shares no code with the `flower-reconcile` clients: its serialisation is written
//! from the reference independently, so a misunderstanding cannot cancel itself out.
#![forbid(unsafe_code)]
