//! The converge loop: observe → plan → apply the allowed actions → again, until every
//! cluster in scope is Ready and nothing is pending, or a timeout.
//!
//! Owns: [`converge`] and its settings ([`ConvergeOptions`]), what one pass saw ([`Pass`])
//! and the per-pass hooks ([`Hooks`]). `apply --wait`, the demo and the tests'
//! converge helpers all use it.
//!
//! Must not: define readiness ([`crate::plan::ready`] does), plan ([`crate::plan`]) or
//! apply by itself: each pass applies through [`reconcile_allowed`], the reconcile `run`
//! uses (same plan, stale-view withhold and applier), restricted to the allowed actions.
//!
//! Guarantees:
//! - A cluster is done when its plan (at the observation's own time) holds no action at
//!   all (no change, wait or deferred change) and, if its spec wants it running (a spec,
//!   not suspended), [`crate::plan::ready::cluster_readiness`] says Ready. Converge
//!   returns only when every cluster in scope is done.
//! - Only actions the filter allows are applied; the others stay pending (they keep the
//!   cluster not done and are named in progress and errors).
//! - On timeout the error names every cluster not done and why: the first pending
//!   action's reason, else the readiness verdict's reason and message
//!   (`tests/controller_scenarios.rs::converge_times_out_saying_what_is_not_ready`).
//!
//! Caveats: one observation per pass and at least `poll` between passes; a pass that
//! finds everything done returns at once, so the timeout is checked between passes only.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::Utc;

use super::context::Context;
use super::observe::observe;
use super::reconcile::{reconcile_allowed, ReconcileError};
use crate::one::BackendError;
use crate::plan::{cluster_readiness, plan_cluster, Action, DesiredState, LiveState, Readiness};

/// What the loop may do and how long it tries.
pub struct ConvergeOptions<'a> {
    /// The clusters to follow (`None`: every cluster the specs or OpenNebula name).
    pub scope: Option<BTreeSet<String>>,
    /// Give up after this long.
    pub timeout: Duration,
    /// Pause between passes.
    pub poll: Duration,
    /// Which planned actions may be applied (e.g. `apply --wait` continues only approved
    /// work; [`allow_all`] for the demo and the tests).
    pub allow: &'a (dyn Fn(&Action) -> bool + Sync),
}

/// Allow every planned action.
pub fn allow_all(_: &Action) -> bool {
    true
}

/// One cluster as a pass saw it.
#[derive(Debug, Clone)]
pub struct ClusterPass {
    /// Its planned actions (changes, waits, deferred changes).
    pub pending: Vec<Action>,
    /// The readiness verdict, when the spec wants the cluster running.
    pub readiness: Option<Readiness>,
}

impl ClusterPass {
    /// Why the cluster is not done (`None`: done): the first pending action's reason,
    /// else the readiness verdict.
    pub fn waiting(&self) -> Option<String> {
        if let Some(a) = self.pending.first() {
            return Some(a.reason.clone());
        }
        self.readiness
            .as_ref()
            .filter(|r| !r.is_ready())
            .map(|r| format!("{} ({})", r.reason.as_str(), r.message))
    }
}

/// What one pass observed and concluded.
#[derive(Debug, Clone)]
pub struct Pass {
    /// 1 for the first pass.
    pub number: u32,
    /// Since the loop started.
    pub elapsed: Duration,
    /// The observation.
    pub live: LiveState,
    /// Each cluster in scope.
    pub clusters: BTreeMap<String, ClusterPass>,
}

impl Pass {
    /// `cluster: why` for each cluster not done (empty: converged).
    pub fn waiting(&self) -> Vec<String> {
        self.clusters
            .iter()
            .filter_map(|(name, c)| Some(format!("{name}: {}", c.waiting()?)))
            .collect()
    }

    /// Every cluster in scope is done.
    pub fn done(&self) -> bool {
        self.clusters.values().all(|c| c.waiting().is_none())
    }
}

/// Called by the loop on its way; every method defaults to nothing.
pub trait Hooks {
    /// Before each observation (tests publish stand-in agent attributes here).
    fn before_observe(&mut self) {}
    /// After each pass is planned, before anything is applied (the demo prints progress).
    fn on_pass(&mut self, pass: &Pass) {
        let _ = pass;
    }
    /// After a cluster's allowed actions were applied: one line per action.
    fn on_applied(&mut self, cluster: &str, lines: &[String]) {
        let _ = (cluster, lines);
    }
}

/// Hooks that do nothing.
pub struct Quiet;

impl Hooks for Quiet {}

/// Why converging failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvergeError {
    /// Observing OpenNebula failed.
    #[error("observing OpenNebula")]
    Observe(#[source] BackendError),
    /// A reconcile failed.
    #[error("reconciling {cluster}")]
    Reconcile {
        /// The cluster.
        cluster: String,
        /// The failure.
        #[source]
        error: ReconcileError,
    },
    /// Time ran out; `waiting` says, per cluster, what is not done.
    #[error("not converged after {}: {}", crate::api::HumanDuration(*.after), .waiting.join("; "))]
    Timeout {
        /// The timeout.
        after: Duration,
        /// `cluster: why` per cluster not done.
        waiting: Vec<String>,
    },
}

/// Observe, plan and apply until every cluster in scope is done (module doc), returning
/// the last pass; or fail on timeout saying what is not done.
pub async fn converge(
    ctx: &Context,
    desired: &DesiredState,
    opts: &ConvergeOptions<'_>,
    hooks: &mut dyn Hooks,
) -> Result<Pass, ConvergeError> {
    let started = Instant::now();
    let mut number = 0;
    loop {
        number += 1;
        hooks.before_observe();
        let live = observe(ctx, Utc::now())
            .await
            .map_err(ConvergeError::Observe)?;
        let pass = survey(
            desired,
            live,
            opts.scope.as_ref(),
            number,
            started.elapsed(),
        );
        hooks.on_pass(&pass);
        if pass.done() {
            return Ok(pass);
        }
        if started.elapsed() >= opts.timeout {
            return Err(ConvergeError::Timeout {
                after: opts.timeout,
                waiting: pass.waiting(),
            });
        }
        for (name, c) in &pass.clusters {
            if !c.pending.iter().any(|a| (opts.allow)(a)) {
                continue;
            }
            let out = reconcile_allowed(ctx, desired, &pass.live, name, Utc::now(), opts.allow)
                .await
                .map_err(|error| ConvergeError::Reconcile {
                    cluster: name.clone(),
                    error,
                })?;
            hooks.on_applied(name, &out.applied);
        }
        tokio::time::sleep(opts.poll).await;
    }
}

/// Plan and judge each cluster in scope on `live`.
fn survey(
    desired: &DesiredState,
    live: LiveState,
    scope: Option<&BTreeSet<String>>,
    number: u32,
    elapsed: Duration,
) -> Pass {
    let names: BTreeSet<String> = match scope {
        Some(names) => names.clone(),
        None => desired
            .clusters
            .keys()
            .chain(live.clusters.keys())
            .chain(desired.held.iter())
            .cloned()
            .collect(),
    };
    let clusters = names
        .into_iter()
        .map(|name| {
            let pending = plan_cluster(desired, &live, &name, live.observed_at).actions;
            let readiness = desired
                .clusters
                .get(&name)
                .filter(|d| !d.cluster.spec.suspend)
                .map(|d| cluster_readiness(&d.cluster, &live, &name));
            (name, ClusterPass { pending, readiness })
        })
        .collect();
    Pass {
        number,
        elapsed,
        live,
        clusters,
    }
}
