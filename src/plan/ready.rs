//! Readiness: the one definition of a Ready Flower cluster. Pure.
//!
//! Owns: [`readiness`] (a cluster against its spec; [`cluster_readiness`] in an
//! observation), [`service_readiness`] (one service), [`superlink_serving`],
//! [`supernode_ready`] (one SuperNode) and [`supernode_target`] (how many SuperNodes a spec
//! asks for).
//!
//! Must not: do I/O or read the clock; every time rule uses the `at` argument, the
//! observation's own time ([`super::LiveState::observed_at`]).
//!
//! Guarantees — a cluster is Ready exactly when, at `at`:
//! 1. one service stands for it: not going away, carrying the spec's replacement fields,
//!    and no other service of the cluster still serves (no redeploy to start or to finish);
//! 2. OneFlow reports that service RUNNING (not deploying, scaling, in cooldown or WARNING);
//! 3. its SuperLink VM is ACTIVE/RUNNING and published `FL_READY=YES` and `FL_ENDPOINT`
//!    (what SuperNodes and `submit` dial);
//! 4. at least [`supernode_target`] SuperNodes are ready: ACTIVE/RUNNING, `FL_NODE_READY=YES`
//!    and, per the attribute protocol, a heartbeat within the grace period ([`supernode_ready`],
//!    the same rule the planner counts healthy nodes with).
//!
//! Ready says the cluster serves as specified; it does not say nothing is left to do (a
//! template update, a scale-down, a rotation). The converge loop
//! (`crate::reconciler::converge`) waits for both: Ready and an empty plan. Shown by
//! `plan::tests::readiness_follows_the_one_definition`.
//!
//! Used by the planner (a replacement must be ready before the old service goes), status
//! (the Ready condition), and the converge loop behind `apply --wait`, the demo and the
//! tests.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::desired::{replacement_fields, spec_fields};
use super::planner::{node_failure, ReplacementRule};
use super::{LiveService, LiveState, LiveVm, Outage, ServiceState};
use crate::api::FlowerCluster;

/// Why a cluster is, or is not, Ready (the Ready condition's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadyReason {
    /// No service stands for the cluster.
    ServiceMissing,
    /// A change OneFlow cannot apply in place: a replacement is to be created, or an
    /// outdated service still serves beside the replacement.
    Redeploying,
    /// OneFlow does not report the service RUNNING.
    ServiceNotRunning,
    /// The SuperLink does not serve (or has not published its endpoint).
    SuperLinkNotReady,
    /// Fewer SuperNodes are ready than the spec asks for.
    NodesNotReady,
    /// Ready.
    Available,
}

impl ReadyReason {
    /// The reason as the Ready condition spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServiceMissing => "ServiceMissing",
            Self::Redeploying => "Redeploying",
            Self::ServiceNotRunning => "ServiceNotRunning",
            Self::SuperLinkNotReady => "SuperLinkNotReady",
            Self::NodesNotReady => "NodesNotReady",
            Self::Available => "Available",
        }
    }
}

/// The verdict, with a one-line explanation for status and progress lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// Why.
    pub reason: ReadyReason,
    /// For humans: `SuperLink serving, 2/2 SuperNodes ready`.
    pub message: String,
}

impl Readiness {
    fn new(reason: ReadyReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// Whether the cluster (or service) is Ready.
    pub fn is_ready(&self) -> bool {
        self.reason == ReadyReason::Available
    }
}

/// How many SuperNodes the spec asks for when the role currently has `cardinality`:
/// `count`, or with elasticity (OneFlow moves the count itself) the cardinality clamped to
/// `[min, max]`. The planner scales to it; readiness counts against it.
pub fn supernode_target(cluster: &FlowerCluster, cardinality: u32) -> u32 {
    let sn = &cluster.spec.supernodes;
    if sn.elasticity.is_some() {
        cardinality.clamp(sn.min, sn.max.max(sn.min))
    } else {
        sn.count
    }
}

/// How long a SuperNode may go without a heartbeat (`failurePolicy.gracePeriod`).
pub fn grace_period(cluster: &FlowerCluster) -> chrono::Duration {
    cluster
        .spec
        .supernodes
        .failure_policy
        .grace_period
        .as_chrono()
}

/// When a SuperNode of `cluster` that went quiet is replaced ([`replacement_failure`]):
/// after `failurePolicy.gracePeriod` without a heartbeat, or for the edge profile after
/// `edge.offlineGrace`, which also covers a VM in UNKNOWN (its host unreachable).
pub fn replacement_rule(cluster: &FlowerCluster) -> ReplacementRule {
    let sn = &cluster.spec.supernodes;
    match &sn.edge {
        Some(edge) => ReplacementRule {
            grace: edge.offline_grace.as_chrono(),
            edge: true,
        },
        None => ReplacementRule {
            grace: sn.failure_policy.grace_period.as_chrono(),
            edge: false,
        },
    }
}

/// A SuperNode that counts as ready: ACTIVE/RUNNING, `FL_NODE_READY=YES`, and not failed
/// by [`node_failure`] at `at` (failure state, or no heartbeat within `grace` not counting
/// the controller's last outage).
pub fn supernode_ready(
    vm: &LiveVm,
    at: DateTime<Utc>,
    grace: chrono::Duration,
    outage: Option<Outage>,
) -> bool {
    vm.is_running()
        && vm.attrs.node_ready == Some(true)
        && node_failure(vm, at, grace, outage).is_none()
}

/// Criterion 3: the service's SuperLink VM runs and published `FL_READY=YES` and
/// `FL_ENDPOINT`.
pub fn superlink_serving(s: &LiveService) -> bool {
    s.superlink
        .nodes
        .iter()
        .any(|vm| vm.is_running() && vm.attrs.fl_ready == Some(true) && vm.attrs.endpoint.is_some())
}

/// Readiness of one service of `cluster` wanting `want` ready SuperNodes (criteria 2-4 of
/// the module doc): what the planner asks of a replacement before it undeploys the old
/// service. A site part ([`crate::plan::site`]) has no SuperLink of its own: criterion 3
/// is the home cluster's.
pub fn service_readiness(
    cluster: &FlowerCluster,
    s: &LiveService,
    want: u32,
    at: DateTime<Utc>,
    outage: Option<Outage>,
) -> Readiness {
    let grace = grace_period(cluster);
    if s.state != ServiceState::Running {
        return Readiness::new(
            ReadyReason::ServiceNotRunning,
            format!("service {} is {:?}", s.service_id, s.state),
        );
    }
    if cluster.spec.part.is_none() && !superlink_serving(s) {
        return Readiness::new(
            ReadyReason::SuperLinkNotReady,
            format!(
                "service {}: the SuperLink has not published FL_READY=YES and FL_ENDPOINT",
                s.service_id
            ),
        );
    }
    let ready = s
        .supernode
        .nodes
        .iter()
        .filter(|vm| supernode_ready(vm, at, grace, outage))
        .count();
    if ready < want as usize {
        return Readiness::new(
            ReadyReason::NodesNotReady,
            format!("service {}: {ready}/{want} SuperNodes ready", s.service_id),
        );
    }
    Readiness::new(
        ReadyReason::Available,
        format!("SuperLink serving, {ready}/{want} SuperNodes ready"),
    )
}

/// Split the services of a cluster that are not going away into those carrying the spec's
/// replacement fields (`wanted`; a service without a record counts as current) and the
/// outdated ones a redeploy replaces. The planner and [`readiness`] share it.
pub(crate) fn split_current<'s>(
    services: impl IntoIterator<Item = &'s LiveService>,
    wanted: &std::collections::BTreeMap<&str, &str>,
) -> (Vec<&'s LiveService>, Vec<&'s LiveService>) {
    services.into_iter().partition(|s| {
        s.applied
            .as_ref()
            .is_none_or(|a| replacement_fields(&a.fields) == *wanted)
    })
}

/// Readiness of the cluster `cluster` given all its observed services (any order is
/// fine; they are taken by id) and the last outage, at `at`. The module doc states the
/// definition.
pub fn readiness(
    cluster: &FlowerCluster,
    services: &[LiveService],
    at: DateTime<Utc>,
    outage: Option<Outage>,
) -> Readiness {
    let mut active: Vec<&LiveService> = services
        .iter()
        .filter(|s| !s.state.is_going_away())
        .collect();
    active.sort_by_key(|s| s.service_id);
    if active.is_empty() {
        return Readiness::new(ReadyReason::ServiceMissing, "no OneFlow service yet");
    }
    let fields = spec_fields(cluster);
    let wanted = replacement_fields(&fields);
    let (current, old) = split_current(active, &wanted);
    let Some(cur) = current.first() else {
        return Readiness::new(
            ReadyReason::Redeploying,
            format!(
                "service {} must be replaced (a change OneFlow cannot apply in place)",
                old[0].service_id
            ),
        );
    };
    if let Some(o) = old.first() {
        return Readiness::new(
            ReadyReason::Redeploying,
            format!(
                "service {} still serves until its replacement, service {}, is ready",
                o.service_id, cur.service_id
            ),
        );
    }
    let want = supernode_target(cluster, cur.supernode.cardinality);
    service_readiness(cluster, cur, want, at, outage)
}

/// [`readiness`] of cluster `name` in an observation: its services, at the observation's
/// own time, with its last outage. What status, the converge loop and the tests ask.
pub fn cluster_readiness(cluster: &FlowerCluster, live: &LiveState, name: &str) -> Readiness {
    readiness(
        cluster,
        live.services(name),
        live.observed_at,
        live.last_outage,
    )
}
