//! `flower-reconcile run`: the long-running controller service ([`crate::service`]).

use std::path::PathBuf;
use std::process::ExitCode;

use super::Global;
use crate::service::config::{RunConfig, RunSettings};

/// `flower-reconcile run`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  flower-reconcile run --specs /etc/flower-reconcile/clusters
  flower-reconcile run --git https://git.example.org/ml/clusters.git --branch main --path clusters
  flower-reconcile run --config /etc/flower-reconcile/config.toml
  FLOWER_RECONCILE_AUTH_TOKEN_FILE=/etc/flower-reconcile/api_token flower-reconcile run --listen 0.0.0.0:9464 --specs clusters/

OpenNebula credentials come from ONE_XMLRPC, ONEFLOW_URL and ONE_AUTH.
SIGTERM or Ctrl-C stops scheduling and waits for running reconciles; a second one exits at once.")]
pub struct RunArgs {
    /// TOML configuration file (flags and environment variables override it).
    #[arg(long, value_name = "FILE", env = "FLOWER_RECONCILE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Settings.
    #[command(flatten)]
    pub settings: RunSettings,
}

/// Run the controller until SIGTERM/SIGINT.
pub fn run(g: &Global, args: RunArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return super::fail(format!("cannot start the async runtime: {e}")),
    };
    let result = resolve(args).and_then(|cfg| rt.block_on(crate::service::run(cfg, &g.log_level)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn resolve(args: RunArgs) -> anyhow::Result<RunConfig> {
    let file = match &args.config {
        Some(p) => RunSettings::from_file(p)?,
        None => RunSettings::default(),
    };
    args.settings.or(file).resolve()
}
