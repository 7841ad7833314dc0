//! The `flower-reconcile` command line: argument parsing (clap) and human or JSON
//! reports. This is the only place typed library errors become readable reports.

pub mod apply;
pub mod plan;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// GitOps for Flower federated-learning clusters on OpenNebula.
#[derive(Debug, Parser)]
#[command(name = "flower-reconcile", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what a reconcile would change (exit codes with --detailed-exitcode: 0 no
    /// changes, 1 error, 2 changes).
    Plan(plan::PlanArgs),
    /// Reconcile once (or apply exactly a saved plan).
    Apply(apply::ApplyArgs),
}

/// Entry point of the `flower-reconcile` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Plan(args) => plan::run(args).await,
            Command::Apply(args) => apply::run(args).await,
        }
    })
}
