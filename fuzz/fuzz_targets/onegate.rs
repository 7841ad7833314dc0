//! Fuzz target `onegate`: the harness is `flower_reconcile::fuzzing::onegate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flower_reconcile::fuzzing::onegate(data));
