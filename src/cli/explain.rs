//! `flower-reconcile explain`

use std::process::ExitCode;

use super::Global;

/// Arguments of `explain`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  flower-reconcile explain")]
pub struct Args {}

/// Runs `explain`.
pub fn run(_g: &Global, _args: Args) -> ExitCode {
    super::fail("not implemented yet")
}
