//! `flower-reconcile run`: the long-running controller service.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Global;
use crate::controller::config::{RunConfig, RunSettings};
use crate::controller::driver::OneReconciler;
use crate::controller::http;
use crate::controller::lease::InstanceLock;
use crate::controller::runtime::{Reconciler, Runtime};
use crate::one::ApiStats;
use crate::source::{Source, SourceState};

/// `flower-reconcile run`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  flower-reconcile run --specs /etc/flower-reconcile/clusters
  flower-reconcile run --git https://git.example.org/ml/clusters.git --branch main --path clusters
  flower-reconcile run --config /etc/flower-reconcile/config.toml --listen 0.0.0.0:9464

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
    rt.block_on(async {
        match run_service(g, args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        }
    })
}

fn resolve(args: RunArgs) -> anyhow::Result<RunConfig> {
    let file = match &args.config {
        Some(p) => RunSettings::from_file(p)?,
        None => RunSettings::default(),
    };
    args.settings.or(file).resolve()
}

async fn run_service(g: &Global, args: RunArgs) -> anyhow::Result<()> {
    let cfg = resolve(args)?;
    let telemetry = crate::telemetry::init("flower-reconcile", cfg.log_format, &g.log_level)?;
    if cfg.controller_id_defaulted {
        tracing::warn!(
            controller_id = %cfg.controller_id,
            "no controller id configured: using the default. Set controller-id in the config \
             (or --controller-id): two controllers sharing an id and OpenNebula user see each \
             other's clusters as removed"
        );
    }
    let _lock = InstanceLock::acquire(&cfg.state_dir)?;
    let source = cfg.source.build(&cfg.state_dir.join("git"))?;
    let mut ctx = crate::controller::clients::context_from_env(
        &cfg.controller_id,
        Some(cfg.api_rate),
        cfg.ownership,
    )
    .await
    .context("connecting to OpenNebula")?;
    ctx.options.max_view_age = cfg.max_view_age;
    let api_stats = ctx.api_stats();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let reconciler =
        Arc::new(OneReconciler::new(Arc::new(ctx)).with_prune_policy(cfg.prune.clone()));
    let result = serve(reconciler, source, &cfg, listener, api_stats, shutdown).await;
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

/// First SIGTERM/SIGINT: graceful (stop scheduling, finish in-flight reconciles).
/// Second: exit at once.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            tracing::error!("cannot install the SIGTERM handler");
            return;
        };
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if n > 0 {
                tracing::warn!("second signal: exiting without waiting");
                std::process::exit(130);
            }
            tracing::info!("signal received: finishing in-flight reconciles");
            shutdown.cancel();
        }
    });
}

/// The service wiring, generic over the reconciler so tests can drive it with onesim or
/// a fake: source watcher, reconcile runtime and HTTP server until `shutdown`.
pub async fn serve<R: Reconciler>(
    reconciler: Arc<R>,
    source: Source,
    cfg: &RunConfig,
    listener: tokio::net::TcpListener,
    api_stats: Option<Arc<ApiStats>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut runtime =
        Runtime::new(reconciler, cfg.runtime.clone()).with_source_name(source.describe());
    if let Some(stats) = api_stats {
        runtime = runtime.with_api_stats(stats);
    }
    let (tx, rx) = watch::channel(SourceState::default());
    let source_task = tokio::spawn(source.run(tx, shutdown.clone()));
    let http_stop = CancellationToken::new();
    let http_task = tokio::spawn(http::serve(
        listener,
        runtime.shared(),
        runtime.metrics(),
        http_stop.clone(),
    ));
    tracing::info!(listen = %cfg.listen, "controller running");
    runtime.run(rx, shutdown).await;
    http_stop.cancel();
    let _ = source_task.await;
    http_task.await?.context("HTTP server")?;
    tracing::info!("controller stopped");
    Ok(())
}
