//! Fuzz target `spec_loader`: the harness is `flower_reconcile::fuzzing::spec_loader`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flower_reconcile::fuzzing::spec_loader(data));
