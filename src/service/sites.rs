//! Multi-site federation (issue #18 item 3): one reconcile loop per remote site, after
//! kube-runtime's one controller per API server. Each site's loop is the ordinary
//! [`Runtime`] over the ordinary [`OneReconciler`], with the site's own clients and its
//! own observation; what it reconciles are the clusters' parts in that site
//! ([`crate::plan::site`]), derived from the home source and the home observation.
//!
//! Owns: the site loops' wiring — their clients (from `[sites.NAME]` only), their
//! connection retries, and the derived source ([`derived_state`]) that feeds them.
//! Must not: plan or render (that is [`crate::plan::site`] and [`crate::render`]), or take
//! a site's endpoint or credentials from anywhere but the controller's configuration.
//!
//! # Guarantees
//! - A site whose observation fails is held: its loop has no complete observation to act
//!   on (or only an old one, on which destructive actions are withheld, as for the home
//!   site), so nothing there is mutated or pruned; status names the error
//!   (`tests/multisite_hold.rs`). The home loop is independent of it.
//! - A part waiting for the home SuperLink (not yet serving, no CA published), and every
//!   part of a home cluster whose spec file fails to load, is held: never updated, never
//!   pruned (`tests::waiting_and_broken_home_clusters_hold_their_parts`).
//! - No part is derived before the home site has been observed completely and its source
//!   read (`tests::nothing_is_derived_before_the_home_observation`).
//! - A site named by a spec but absent from the configuration gets no loop: nothing is
//!   done anywhere for it, and it is reported (`unknownSites` in the API, a warning).
//!
//! # Assumptions
//! - Sites have their own OpenNebula (front-end, OneFlow, OneGate): remote VMs heartbeat
//!   to their site's OneGate, so failure replacement works per part unchanged.
//!
//! # Caveats
//! - `/metrics` shows the home loop's metrics only.
//! - The mass-delete guard counts per site: removing the only part of a site is blocked
//!   unless the allow-delete marker names its cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::plan::site::{derive_parts, part_name, PartDerivation};
use crate::plan::LiveState;
use crate::reconciler::driver::OneReconciler;
use crate::reconciler::ReconcileOptions;
use crate::runtime::election::{FencedBackend, Leadership};
use crate::runtime::{Runtime, Shared};
use crate::source::{FileError, Snapshot, SourceState, SourcedCluster};

use super::config::RunConfig;

/// The source state `site`'s loop reconciles: the parts of the home clusters in `site`,
/// derived from the home source state `home` and the newest complete home observation
/// `live`. `None` until both exist.
pub fn derived_state(
    site: &str,
    home: &SourceState,
    live: Option<&LiveState>,
) -> Option<SourceState> {
    let (snap, live) = (home.snapshot.as_ref()?, live?);
    let derived = derive_parts(snap.clusters.values().map(|c| &c.cluster), live, site);
    let file_of = |cluster: &str| {
        snap.clusters
            .get(cluster)
            .map_or_else(PathBuf::new, |c| c.file.clone())
    };
    let mut clusters = BTreeMap::new();
    let mut held = BTreeMap::new();
    let mut errors = Vec::new();
    for (name, d) in derived {
        match d {
            PartDerivation::Ready(part) => {
                let file = file_of(&part.cluster);
                clusters.insert(
                    name,
                    SourcedCluster {
                        cluster: part.spec,
                        file,
                        spec_hash: part.spec_hash,
                    },
                );
            }
            PartDerivation::Waiting { name, reason } => {
                let cluster = name
                    .strip_suffix(site)
                    .and_then(|n| n.strip_suffix(crate::plan::site::PART_SEPARATOR))
                    .unwrap_or_default()
                    .to_string();
                let file = file_of(&cluster);
                errors.push(FileError {
                    file: file.clone(),
                    position: None,
                    message: format!("{name}: {reason}"),
                });
                held.insert(name, file);
            }
        }
    }
    // A home cluster whose file fails to load: its sites are unknown, so whatever part
    // it may have in this one is held.
    for (cluster, file) in &snap.held {
        held.insert(part_name(cluster, site), file.clone());
    }
    Some(SourceState {
        snapshot: Some(Arc::new(Snapshot {
            revision: snap.revision.clone(),
            clusters,
            held,
            errors,
            confirmed: snap.confirmed,
            allow_delete: snap
                .allow_delete
                .as_ref()
                .map(|names| names.iter().map(|n| part_name(n, site)).collect()),
        })),
        error: home.error.clone(),
        generation: home.generation,
        checks: Default::default(),
    })
}

/// Sites the specs of `home` name, by site, with the clusters naming each.
pub fn named_sites(home: &SourceState) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in home.snapshot.iter().flat_map(|s| s.clusters.values()) {
        for s in &c.cluster.spec.supernodes.sites {
            out.entry(s.site.clone())
                .or_default()
                .insert(c.cluster.metadata.name.clone());
        }
    }
    out
}

/// Feed each site's loop its derived source from the home source and observation, until
/// `shutdown`; report the sites specs name but the configuration does not in `home_shared`.
pub async fn derive_loop(
    mut home: watch::Receiver<SourceState>,
    mut live: watch::Receiver<Option<Arc<LiveState>>>,
    sites: BTreeMap<String, watch::Sender<SourceState>>,
    home_shared: Shared,
    shutdown: CancellationToken,
) {
    loop {
        let state = home.borrow_and_update().clone();
        let observed = live.borrow_and_update().clone();
        for (site, tx) in &sites {
            if let Some(next) = derived_state(site, &state, observed.as_deref()) {
                tx.send_if_modified(|cur| {
                    let same = cur.snapshot == next.snapshot && cur.error == next.error;
                    if !same {
                        *cur = next;
                    }
                    !same
                });
            }
        }
        let mut unknown = named_sites(&state);
        unknown.retain(|site, _| !sites.contains_key(site));
        if let Ok(mut sh) = home_shared.write() {
            if sh.unknown_sites != unknown {
                for (site, clusters) in &unknown {
                    tracing::warn!(site = %site, clusters = ?clusters, "specs place SuperNodes in a site the controller's configuration does not name ([sites.{site}]): nothing is done there");
                }
                sh.unknown_sites = unknown;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = home.changed() => if r.is_err() { return },
            r = live.changed() => if r.is_err() { return },
        }
    }
}

#[allow(clippy::too_many_arguments)]
/// Run site `name`'s loop until `shutdown`: connect (retrying, with the error in its
/// status, while the site cannot be reached), then reconcile its parts from `source`.
pub async fn run_site(
    name: String,
    one_cfg: crate::one::OneConfig,
    tap: Option<watch::Sender<Option<Arc<LiveState>>>>,
    cfg: RunConfig,
    options: ReconcileOptions,
    leadership: Arc<Leadership>,
    elected: bool,
    shared: Shared,
    source: watch::Receiver<SourceState>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    let mut ctx = loop {
        // Any error is retried: a site that cannot be used must not stop the controller.
        let err = match super::connect_once(&cfg, &one_cfg).await {
            Ok(ctx) => break ctx,
            Err(e) => e,
        };
        failures += 1;
        let delay = cfg.runtime.backoff.base_delay(failures);
        let text = format!("connecting to site {name}: {err:#}");
        tracing::warn!(site = %name, error = %text, failures, retry_in = ?delay, "site unreachable; its parts are held");
        if let Ok(mut sh) = shared.write() {
            sh.observe_error = Some(text);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    };
    ctx.backend = Arc::new(FencedBackend::new(ctx.backend.clone(), leadership.clone()));
    ctx.options = options;
    let mut reconciler = OneReconciler::new(Arc::new(ctx))
        .with_prune_policy(cfg.prune.clone())
        .with_poll_interval(cfg.runtime.poll_interval);
    if let Some(tap) = tap {
        // The home loop reads the parts' SuperNode keys from this site's observations.
        reconciler = reconciler.with_observation_tap(tap);
    }
    let reconciler = Arc::new(reconciler);
    let mut runtime = Runtime::new(reconciler, cfg.runtime.clone())
        .with_shared(shared)
        .with_source_name(format!("parts in site {name}"));
    if elected {
        runtime = runtime.with_leadership(leadership.subscribe());
    }
    tracing::info!(site = %name, "site loop running");
    runtime.run(source, shutdown).await;
}

#[cfg(test)]
mod tests;
