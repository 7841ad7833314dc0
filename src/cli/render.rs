//! `flower-reconcile render`

use std::process::ExitCode;

use super::Global;

/// Arguments of `render`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  flower-reconcile render")]
pub struct Args {}

/// Runs `render`.
pub fn run(_g: &Global, _args: Args) -> ExitCode {
    super::fail("not implemented yet")
}
