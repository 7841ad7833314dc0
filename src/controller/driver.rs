//! The production [`Reconciler`]: observe OpenNebula through a [`Context`] and reconcile
//! one cluster with [`reconcile_one`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::desired::snapshot_prune_gate;
use super::runtime::{Outcome, ReconcileRequest, Reconciler};
use super::status::LiveSummary;
use super::{observe, reconcile_one, Context, ReconcileError};
use crate::plan::prune::deletes_on_removal;
use crate::plan::{
    DesiredCluster, DesiredState, LiveService, LiveState, Outage, PruneGate, PrunePolicy,
};

/// Drives OpenNebula for the runtime.
pub struct OneReconciler {
    ctx: Arc<Context>,
    blind: Mutex<BlindSpells>,
    prune: PrunePolicy,
    /// Service-level observation warnings already logged (each is logged once).
    reported: Mutex<BTreeSet<String>>,
}

/// The observer's record of when it could not see OpenNebula.
#[derive(Debug, Default)]
struct BlindSpells {
    /// Start of the last successful observation.
    last_ok: Option<DateTime<Utc>>,
    /// The observation before this one failed.
    failing: bool,
    last_outage: Option<Outage>,
}

impl BlindSpells {
    /// Record an observation started at `at`; returns the last outage.
    fn record(&mut self, at: DateTime<Utc>, ok: bool) -> Option<Outage> {
        if !ok {
            self.failing = true;
            return self.last_outage;
        }
        if let (true, Some(from)) = (self.failing, self.last_ok) {
            self.last_outage = Some(Outage { from, to: at });
        }
        self.failing = false;
        self.last_ok = Some(at);
        self.last_outage
    }
}

impl OneReconciler {
    /// A reconciler over `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            blind: Mutex::default(),
            prune: PrunePolicy::default(),
            reported: Mutex::default(),
        }
    }

    /// Log each new service-level observation warning once (a foreign-owned service
    /// marked as ours, …): `run` has no plan output to show them in.
    fn report(&self, live: &LiveState) {
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for w in live.warnings.iter().filter(|w| w.vm_id.is_none()) {
            if reported.insert(w.message.clone()) {
                tracing::warn!(
                    cluster = w.cluster.as_deref().unwrap_or("-"),
                    "{}",
                    w.message
                );
            }
        }
    }

    /// Use `policy` for the mass-delete guard (default: [`PrunePolicy::default`]).
    pub fn with_prune_policy(mut self, policy: PrunePolicy) -> Self {
        self.prune = policy;
        self
    }
}

/// The planner's view for one cluster: just its spec (or none), the held set, whether the
/// snapshot is complete (no file error) and, for a cluster without a spec, the prune gate
/// of the whole snapshot (mass-delete guard, second read required). The runtime never
/// reconciles a held cluster. Other clusters are left out on purpose: `plan_cluster` only
/// looks at `name`, and cloning every spec per reconcile would cost O(clusters²) per resync.
pub fn desired_for(
    req: &ReconcileRequest<LiveState>,
    held: BTreeSet<String>,
    policy: &PrunePolicy,
) -> DesiredState {
    let clusters: BTreeMap<String, DesiredCluster> = req
        .desired
        .iter()
        .map(|d| {
            (
                req.name.clone(),
                DesiredCluster {
                    cluster: d.cluster.clone(),
                    spec_hash: d.spec_hash.clone(),
                    revision: req.revision.clone(),
                },
            )
        })
        .collect();
    let prune = if req.desired.is_none() {
        snapshot_prune_gate(&req.snapshot, &req.live, policy, true)
    } else {
        PruneGate::Open
    };
    DesiredState {
        clusters,
        held,
        complete: req.snapshot.errors.is_empty(),
        prune,
    }
}

/// Why `name`'s removal is not carried out under `desired`, if it has a Delete-policy
/// service waiting for it.
fn deletion_blocked(desired: &DesiredState, live: &LiveState, name: &str) -> Option<String> {
    let why = desired.prune_block()?;
    let waiting = !desired.clusters.contains_key(name)
        && live
            .services(name)
            .iter()
            .any(|s| !s.state.is_going_away() && deletes_on_removal(live, name, s));
    waiting.then(|| why.to_string())
}

/// The service that stands for the cluster: the newest one not being undeployed.
fn current(services: &[LiveService]) -> Option<&LiveService> {
    services
        .iter()
        .rev()
        .find(|s| !s.state.is_going_away())
        .or_else(|| services.last())
}

/// Status summary of the service standing for `name` in `live`, if any.
pub fn summarize_cluster(live: &LiveState, name: &str) -> Option<LiveSummary> {
    current(live.services(name)).map(summarize_service)
}

/// Status summary of one service (heartbeat staleness is left to the planner, which
/// knows the spec's grace period; failed here means failed by VM state).
pub fn summarize_service(s: &LiveService) -> LiveSummary {
    let link = s.superlink.nodes.first();
    let nodes = &s.supernode.nodes;
    let count = |f: &dyn Fn(&crate::plan::LiveVm) -> bool| {
        u32::try_from(nodes.iter().filter(|v| f(v)).count()).unwrap_or(u32::MAX)
    };
    LiveSummary {
        service_id: Some(s.service_id),
        service_state: format!("{:?}", s.state),
        superlink_ready: link.is_some_and(|v| v.is_running() && v.attrs.fl_ready == Some(true)),
        superlink_endpoint: link.and_then(|v| v.attrs.endpoint.clone()),
        nodes_running: count(&|v| v.is_running()),
        nodes_ready: count(&|v| v.is_running() && v.attrs.node_ready == Some(true)),
        nodes_failed: count(&|v| v.state_failure().is_some()),
        cert_not_after: link.and_then(|v| v.attrs.cert_not_after),
    }
}

impl Reconciler for OneReconciler {
    type Live = LiveState;

    /// Also hands the planner the last outage, so that heartbeats agents could not send
    /// while the front-end was down are not held against them.
    async fn observe(&self) -> anyhow::Result<LiveState> {
        let started = Utc::now();
        let result = observe(&self.ctx, started).await;
        let outage = self
            .blind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(started, result.is_ok());
        let mut live = result?;
        live.last_outage = outage;
        self.report(&live);
        Ok(live)
    }

    fn live_names(&self, live: &LiveState) -> BTreeSet<String> {
        live.clusters.keys().cloned().collect()
    }

    fn summarize(&self, live: &LiveState, name: &str) -> Option<LiveSummary> {
        summarize_cluster(live, name)
    }

    async fn reconcile(&self, req: ReconcileRequest<LiveState>) -> anyhow::Result<Outcome> {
        let desired = desired_for(&req, BTreeSet::new(), &self.prune);
        let out = reconcile_one(&self.ctx, &desired, &req.live, &req.name, Utc::now()).await?;
        let deletion_blocked = deletion_blocked(&desired, &req.live, &req.name);
        if let Some(why) = &deletion_blocked {
            tracing::warn!(cluster = %req.name, reason = %why, "deletion blocked");
        }
        Ok(Outcome {
            actions: out.applied,
            mutated: out.mutated,
            requeue_after: out.requeue_after,
            deletion_blocked,
        })
    }

    fn hold_after(&self, error: &anyhow::Error) -> Option<std::time::Duration> {
        error
            .downcast_ref::<ReconcileError>()
            .is_some_and(ReconcileError::is_ambiguous)
            .then_some(self.ctx.options.ambiguous_hold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outage_runs_from_the_last_good_observation_to_the_next_one() {
        let t = |s: i64| DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(s);
        let mut b = BlindSpells::default();
        assert_eq!(
            b.record(t(0), false),
            None,
            "no outage before a first success"
        );
        assert_eq!(b.record(t(10), true), None);
        assert_eq!(b.record(t(20), true), None);
        assert_eq!(b.record(t(30), false), None);
        assert_eq!(b.record(t(40), false), None);
        let outage = Some(Outage {
            from: t(20),
            to: t(50),
        });
        assert_eq!(b.record(t(50), true), outage);
        assert_eq!(b.record(t(60), true), outage, "kept until the next one");
    }
}
