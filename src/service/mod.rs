//! The long-running controller service behind `flower-reconcile run`: configuration,
//! the wiring of source, reconciler, runtime and instance lock, and the HTTP API
//! (`/healthz`, `/readyz`, `/metrics`, `/api/v1/clusters`).
//!
//! Must not: reconcile (that is [`crate::reconciler`] driven by [`crate::runtime`]) or
//! parse command lines (that is [`crate::cli`]).

pub mod auth;
pub mod config;
pub mod http;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::one::ApiStats;
use crate::reconciler::driver::OneReconciler;
use crate::runtime::lease::InstanceLock;
use crate::runtime::{Reconciler, Runtime};
use crate::source::{Source, SourceState};
use config::RunConfig;

/// Run the controller configured by `cfg` until SIGTERM/SIGINT.
pub async fn run(cfg: RunConfig, log_level: &str) -> anyhow::Result<()> {
    let telemetry = crate::telemetry::init(
        "flower-reconcile",
        cfg.log_format,
        log_level,
        crate::telemetry::Traces::Always,
    )?;
    if cfg.controller_id_defaulted {
        tracing::warn!(
            controller_id = %cfg.controller_id,
            "no controller id configured: using the default. Set controller-id in the config \
             (or --controller-id): two controllers sharing an id and OpenNebula user see each \
             other's clusters as removed"
        );
    }
    let _lock = InstanceLock::acquire(&cfg.state_dir)?;
    let git_base = cfg.state_dir.join("git");
    let source = cfg.source.build(&git_base)?.remember_accepted_in(&git_base);
    let mut ctx = crate::reconciler::context::context_from_env(
        &cfg.controller_id,
        Some(cfg.api_rate),
        cfg.ownership,
    )
    .await
    .context("connecting to OpenNebula")?;
    ctx.options.max_view_age = cfg.max_view_age;
    ctx.options.vm_tracing = crate::reconciler::VmTracing::new(
        cfg.vm_otlp_endpoint.clone(),
        crate::telemetry::exports_spans(),
    );
    let api_stats = ctx.api_stats();
    if !cfg.listen.ip().is_loopback() && cfg.auth_token.is_none() {
        tracing::warn!(
            listen = %cfg.listen,
            "serving the HTTP API on a non-loopback address WITHOUT authentication \
             (allow-unauthenticated): anyone who reaches it reads every cluster's status"
        );
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let reconciler = Arc::new(
        OneReconciler::new(Arc::new(ctx))
            .with_prune_policy(cfg.prune.clone())
            .with_poll_interval(cfg.runtime.poll_interval),
    );
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
    let http_task = tokio::spawn(crate::http_server::serve(
        listener,
        http::router(runtime.shared(), runtime.metrics(), cfg.auth_token.clone()),
        cfg.http,
        http_stop.clone(),
    ));
    tracing::info!(listen = %cfg.listen, "controller running");
    runtime.run(rx, shutdown).await;
    http_stop.cancel();
    let _ = source_task.await;
    http_task.await.context("HTTP server")?;
    tracing::info!("controller stopped");
    Ok(())
}
