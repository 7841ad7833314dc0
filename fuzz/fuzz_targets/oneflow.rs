//! Fuzz target `oneflow`: the harness is `flower_reconcile::fuzzing::oneflow`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flower_reconcile::fuzzing::oneflow(data));
