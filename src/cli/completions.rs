//! `flower-reconcile completions SHELL`

use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

use super::{Cli, Global};

/// Arguments of `completions`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  flower-reconcile completions bash > ~/.local/share/bash-completion/completions/flower-reconcile
  flower-reconcile completions zsh > ~/.zfunc/_flower-reconcile
  flower-reconcile completions fish > ~/.config/fish/completions/flower-reconcile.fish")]
pub struct Args {
    /// Shell to generate the completion script for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Runs `completions`.
pub fn run(_g: &Global, args: Args) -> ExitCode {
    let mut cmd = Cli::command();
    clap_complete::generate(
        args.shell,
        &mut cmd,
        "flower-reconcile",
        &mut std::io::stdout(),
    );
    ExitCode::SUCCESS
}
