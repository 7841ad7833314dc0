//! `flower-reconcile schema`

use std::process::ExitCode;

use super::Global;

/// Arguments of `schema`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  flower-reconcile schema")]
pub struct Args {}

/// Runs `schema`.
pub fn run(_g: &Global, _args: Args) -> ExitCode {
    super::fail("not implemented yet")
}
