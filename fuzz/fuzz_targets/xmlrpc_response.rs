//! Fuzz target `xmlrpc_response`: the harness is `flower_reconcile::fuzzing::xmlrpc_response`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flower_reconcile::fuzzing::xmlrpc_response(data));
