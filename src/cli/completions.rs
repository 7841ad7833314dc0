//! `flower-reconcile completions`

use std::process::ExitCode;

use super::Global;

/// Arguments of `completions`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  flower-reconcile completions")]
pub struct Args {}

/// Runs `completions`.
pub fn run(_g: &Global, _args: Args) -> ExitCode {
    super::fail("not implemented yet")
}
