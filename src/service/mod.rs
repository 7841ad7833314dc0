//! The long-running controller service behind `flower-reconcile run`: configuration,
//! the wiring of source, reconciler, runtime, instance lock and leader election, and the
//! HTTP API (`/healthz`, `/readyz`, `/metrics`, `/api/v1/clusters`).
//!
//! Two locks, kept both: the host-local `flock` ([`InstanceLock`]) protects one state
//! directory (its Git cache) from a second process on the same host, whatever the
//! election says; the OpenNebula lease ([`crate::runtime::election`], `--leader-elect`)
//! decides which of the instances on different hosts acts.
//!
//! Must not: reconcile (that is [`crate::reconciler`] driven by [`crate::runtime`]) or
//! parse command lines (that is [`crate::cli`]).

pub mod auth;
pub mod config;
pub mod http;
pub mod sites;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::one::ApiStats;
use crate::reconciler::driver::OneReconciler;
use crate::runtime::election::{Elector, FencedBackend, Leadership};
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
    let instance = &cfg.election.instance_id;
    let one_cfg = crate::reconciler::context::one_config_from_env(Some(instance))?;
    let mut ctx = connect(&cfg, &one_cfg).await?;
    let stop_election = CancellationToken::new();
    let (leadership, elector) = if cfg.election.enabled {
        let leadership = Leadership::elected(instance, cfg.election.timing.renew_deadline);
        // Its own budget: renewals never queue behind reconcile traffic.
        let oned = crate::one::OnedClient::new(
            &one_cfg,
            crate::one::ApiBudget::new(one_cfg.requests_per_second),
            ctx.api_stats().unwrap_or_else(crate::one::ApiStats::new),
        )?;
        let elector = Elector::new(
            oned,
            &cfg.controller_id,
            instance,
            cfg.election.timing,
            leadership.clone(),
        );
        tracing::info!(instance = %instance, timing = ?cfg.election.timing, "leader election on: standing by until the lease is ours");
        let task = tokio::spawn(elector.run(stop_election.clone()));
        (leadership, Some(task))
    } else {
        (Leadership::single(instance), None)
    };
    ctx.backend = Arc::new(FencedBackend::new(ctx.backend.clone(), leadership.clone()));
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
    let (tap, home_live) = watch::channel(None);
    let (site_taps, site_observations) = cfg
        .sites
        .keys()
        .map(|site| {
            let (tx, rx) = watch::channel(None);
            ((site.clone(), tx), (site.clone(), rx))
        })
        .unzip();
    let sites = SiteSetup {
        home_live,
        options: ctx.options.clone(),
        leadership: leadership.clone(),
        elected: elector.is_some(),
        site_taps,
    };
    let mut reconciler = OneReconciler::new(Arc::new(ctx))
        .with_prune_policy(cfg.prune.clone())
        .with_poll_interval(cfg.runtime.poll_interval)
        .with_known_sites(cfg.sites.keys().cloned().collect())
        .with_site_observations(site_observations);
    if !cfg.sites.is_empty() {
        // The site loops derive their parts from the home observation.
        reconciler = reconciler.with_observation_tap(tap);
    }
    let election = elector.is_some().then(|| leadership.clone());
    let result = serve(
        Arc::new(reconciler),
        source,
        &cfg,
        listener,
        api_stats,
        election,
        Some(sites),
        shutdown,
    )
    .await;
    // After the runtime stopped (no mutation in flight): give the lease up.
    stop_election.cancel();
    if let Some(task) = elector {
        let _ = task.await;
    }
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result
}

/// The first connection to OpenNebula (its version and our identity), retried with the
/// runtime's backoff while OpenNebula fails or is unreachable: a front-end that is
/// restarting, overloaded or failing calls when the controller starts is a transient
/// fault like any later one, not a reason to exit (found by the chaos suite,
/// `tests/chaos.rs`: a restarted instance exited on one failed `one.system.version`).
/// An answer the controller cannot use (an unsupported version) or a configuration
/// error still ends the process. SIGTERM meanwhile ends it at once (no handler is
/// installed yet, and nothing has started).
async fn connect(
    cfg: &RunConfig,
    one_cfg: &crate::one::OneConfig,
) -> anyhow::Result<crate::reconciler::Context> {
    use crate::one::backend::{BackendError, BackendErrorKind};
    let mut failures = 0u32;
    loop {
        let err = match connect_once(cfg, one_cfg).await {
            Ok(ctx) => return Ok(ctx),
            Err(e) => e,
        };
        let transient = err.downcast_ref::<BackendError>().is_some_and(|b| {
            matches!(
                b.kind,
                BackendErrorKind::Rejected | BackendErrorKind::Ambiguous
            )
        });
        if !transient {
            return Err(err.context("connecting to OpenNebula"));
        }
        failures += 1;
        let delay = cfg.runtime.backoff.base_delay(failures);
        tracing::warn!(error = %err, failures, retry_in = ?delay, "connecting to OpenNebula failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

/// One attempt at a context over `one_cfg` with `cfg`'s identity, budget and ownership.
async fn connect_once(
    cfg: &RunConfig,
    one_cfg: &crate::one::OneConfig,
) -> anyhow::Result<crate::reconciler::Context> {
    crate::reconciler::context::context_for(
        one_cfg.clone(),
        &cfg.controller_id,
        Some(cfg.api_rate),
        cfg.ownership,
    )
    .await
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

/// What the remote sites' loops need from the home one.
pub struct SiteSetup {
    /// The home loop's complete observations.
    pub home_live: watch::Receiver<Option<Arc<crate::plan::LiveState>>>,
    /// The home loop's reconcile options (the sites' are the same).
    pub options: crate::reconciler::ReconcileOptions,
    /// Who acts: a site's mutations are fenced by the same lease as the home site's.
    pub leadership: Arc<Leadership>,
    /// Whether an election decides who acts.
    pub elected: bool,
    /// Where each site's loop publishes its complete observations, by site (the home loop
    /// reads the keys of the clusters' SuperNodes there from them).
    pub site_taps:
        std::collections::BTreeMap<String, watch::Sender<Option<Arc<crate::plan::LiveState>>>>,
}

/// The service wiring, generic over the reconciler so tests can drive it with onesim or
/// a fake: source watcher, reconcile runtime and HTTP server until `shutdown`. With
/// `election`, the runtime reconciles only while it leads; with `sites`, one more loop
/// runs per configured site ([`sites`]).
#[allow(clippy::too_many_arguments)]
pub async fn serve<R: Reconciler>(
    reconciler: Arc<R>,
    source: Source,
    cfg: &RunConfig,
    listener: tokio::net::TcpListener,
    api_stats: Option<Arc<ApiStats>>,
    election: Option<Arc<Leadership>>,
    sites: Option<SiteSetup>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut runtime =
        Runtime::new(reconciler, cfg.runtime.clone()).with_source_name(source.describe());
    if let Some(stats) = api_stats {
        runtime = runtime.with_api_stats(stats);
    }
    if let Some(l) = election {
        runtime = runtime.with_leadership(l.subscribe());
        if let Ok(mut sh) = runtime.shared().write() {
            sh.leadership = Some(l);
        }
    }
    let (tx, rx) = watch::channel(SourceState::default());
    let mut site_tasks = Vec::new();
    if let Some(setup) = sites {
        let mut feeds = std::collections::BTreeMap::new();
        for (name, one_cfg) in &cfg.sites {
            let (feed, site_source) = watch::channel(SourceState::default());
            let shared = crate::runtime::Shared::default();
            if let Ok(mut sh) = runtime.shared().write() {
                sh.sites.insert(name.clone(), shared.clone());
            }
            site_tasks.push(tokio::spawn(sites::run_site(
                name.clone(),
                one_cfg.clone(),
                setup.site_taps.get(name).cloned(),
                cfg.clone(),
                setup.options.clone(),
                setup.leadership.clone(),
                setup.elected,
                shared,
                site_source,
                shutdown.clone(),
            )));
            feeds.insert(name.clone(), feed);
        }
        site_tasks.push(tokio::spawn(sites::derive_loop(
            tx.subscribe(),
            setup.home_live,
            feeds,
            runtime.shared(),
            shutdown.clone(),
        )));
    }
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
    for task in site_tasks {
        let _ = task.await;
    }
    http_stop.cancel();
    let _ = source_task.await;
    http_task.await.context("HTTP server")?;
    tracing::info!("controller stopped");
    Ok(())
}
