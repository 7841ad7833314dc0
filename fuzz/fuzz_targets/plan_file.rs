//! Fuzz target `plan_file`: the harness is `flower_reconcile::fuzzing::plan_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flower_reconcile::fuzzing::plan_file(data));
