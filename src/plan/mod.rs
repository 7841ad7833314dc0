//! Planning: a pure function of (desired specs, observed live state, now) → ordered
//! actions, each with a reason, and their rendering as text or JSON.
//!
//! Must not: do I/O or read the clock. Everything it needs is an argument, so a plan is
//! deterministic and testable.
