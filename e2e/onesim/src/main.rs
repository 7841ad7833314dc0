//! The `onesim` binary.
#![forbid(unsafe_code)]

fn main() {}
