//! Rendering: a validated `FlowerCluster` → the OneFlow service template (6.x or 7.x
//! dialect) and the per-role `ONEAPP_*` context variables the agent reads.
//!
//! Owns: the mapping from spec fields to OneFlow/OpenNebula keys, and the ownership
//! markers that let a controller recognise what it created.
//!
//! Must not: do I/O. Rendering is a pure function, so plans and golden tests are stable.
