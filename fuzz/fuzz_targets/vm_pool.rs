//! Fuzz target `vm_pool`: the harness is `flower_reconcile::fuzzing::vm_pool`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flower_reconcile::fuzzing::vm_pool(data));
