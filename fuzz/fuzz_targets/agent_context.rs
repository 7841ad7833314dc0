//! Fuzz target `agent_context`: the harness is `flower_reconcile::fuzzing::agent_context`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flower_reconcile::fuzzing::agent_context(data));
