//! `flower-reconcile demo`: onesim + real Flower on this machine, one training run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::demo::{self, DemoOptions};

/// Arguments of `demo`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  cargo run --release -- demo              # plan, apply, Ready, one training run, teardown
  flower-reconcile demo --keep             # leave the cluster running and print how to use it
  flower-reconcile demo --spec my.yaml     # your own FlowerCluster instead of basic.yaml")]
pub struct DemoArgs {
    /// Leave everything running (Ctrl-C tears it down) and print how to use it.
    #[arg(long)]
    pub keep: bool,
    /// A FlowerCluster spec instead of the embedded manifests/examples/basic.yaml.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Working directory for VM disks and logs (default: a temporary directory).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Flower virtualenv to use or create (default: $FLOWER_VENV, else target/flower-venv).
    #[arg(long)]
    pub venv: Option<PathBuf>,
    /// Give up when the cluster is not Ready after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
}

/// Run `demo`.
pub async fn run(args: DemoArgs) -> ExitCode {
    let opts = DemoOptions {
        keep: args.keep,
        spec: args.spec,
        workdir: args.workdir,
        venv: args.venv,
        ready_timeout: args.ready_timeout,
        agent: demo::default_agent_argv(),
    };
    match demo::run(opts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
