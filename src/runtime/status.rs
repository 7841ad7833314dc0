//! Status per cluster: conditions, revision, endpoint, node counts and history, computed
//! from the desired spec, a summary of the live state and the controller's own record of
//! recent reconciles. Pure: the same inputs give the same status.
//!
//! Must not: define readiness. The Ready condition is the reconciler's verdict, carried in
//! [`LiveSummary::ready`] (for Flower clusters `crate::plan::ready`, the one definition);
//! this module only turns it into a condition (`tests::the_ready_condition_is_the_reconcilers_verdict`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::api::{
    Condition, ConditionStatus, ConditionType, FlowerClusterStatus, NodeCounts, ReconcileRecord,
};
use crate::source::SourcedCluster;

/// Consecutive failures after which a cluster is reported `Stalled`.
pub const STALL_AFTER_FAILURES: u32 = 5;

/// The reconciler's readiness verdict on one cluster: the Ready condition as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Ready.
    pub ready: bool,
    /// The condition's reason (`Available` when ready).
    pub reason: String,
    /// One line for humans.
    pub message: String,
}

/// What the controller needs to know about one cluster's live state for its status.
/// A cluster with a spec has one even before its service exists (the verdict says so).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveSummary {
    /// The readiness verdict (the Ready condition).
    pub ready: Verdict,
    /// OneFlow service id.
    pub service_id: Option<u64>,
    /// OneFlow service state name (`RUNNING`, `DEPLOYING`, …).
    pub service_state: String,
    /// The SuperLink serves (as readiness defines it); a shortfall of running SuperNodes
    /// is reported as `Degraded` only then, not while the cluster comes up.
    pub superlink_ready: bool,
    /// `FL_ENDPOINT` of the SuperLink.
    pub superlink_endpoint: Option<String>,
    /// SuperNode VMs ACTIVE/RUNNING.
    pub nodes_running: u32,
    /// SuperNodes ready (running, registered and heartbeating, as readiness counts them).
    pub nodes_ready: u32,
    /// SuperNodes failed.
    pub nodes_failed: u32,
    /// `FL_CERT_NOT_AFTER` of the SuperLink.
    pub cert_not_after: Option<DateTime<Utc>>,
    /// The agents' Prometheus endpoints (`/api/v1/sd`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics_targets: Vec<MetricsTarget>,
    /// Sites the spec places SuperNodes in that the controller's configuration does not
    /// name (multi-site): nothing is done there; shown as `Degraded/UnknownSite`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown_sites: Vec<String>,
    /// The SuperNode keys in other sites differ from those the SuperLink holds (multi-site:
    /// `FL_SITE_NODE_KEYS` is to be written).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub site_keys_pending: bool,
}

/// One agent's Prometheus metrics endpoint: a running VM of the cluster's current service
/// whose agent was told to serve metrics, at the first address oned lists on its NICs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MetricsTarget {
    /// `superlink` or `supernode`.
    pub role: String,
    /// OneFlow service id.
    pub service_id: u64,
    /// VM id.
    pub vm_id: u64,
    /// `host:port` to scrape.
    pub address: String,
    /// A SuperNode whose spec also runs NVIDIA's DCGM exporter (port 9400).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dcgm: bool,
}

/// The controller's memory of one cluster between reconciles.
#[derive(Debug, Clone, Default)]
pub struct ClusterTrack {
    /// Most recent first, at most `history` entries.
    pub history: VecDeque<ReconcileRecord>,
    /// Consecutive failed reconciles.
    pub failures: u32,
    /// Message of the last failure, cleared by a success.
    pub last_error: Option<String>,
    /// Actions of the last successful reconcile.
    pub last_actions: Vec<String>,
    /// Revision and spec hash of the last successful reconcile.
    pub last_ok: Option<(String, Option<String>)>,
    /// A reconcile is running now.
    pub in_flight: bool,
    /// Conditions last reported (to keep transition times).
    pub conditions: Vec<Condition>,
    /// Why the last reconcile did not delete this cluster whose spec is gone.
    pub deletion_blocked: Option<String>,
}

impl ClusterTrack {
    /// Record a finished reconcile, keeping at most `keep` records.
    pub fn record(&mut self, rec: ReconcileRecord, keep: usize) {
        self.history.push_front(rec);
        self.history.truncate(keep.max(1));
    }

    /// Whether the last reconcile left work behind (actions applied or an error): the
    /// cluster has drifted and is being corrected.
    pub fn drifting(&self) -> bool {
        self.failures > 0 || !self.last_actions.is_empty()
    }
}

/// One cluster as the HTTP API and `flower-reconcile status` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    /// Cluster name.
    pub name: String,
    /// Spec file, relative to the source root (absent when the spec was removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_file: Option<PathBuf>,
    /// Set when the spec file is broken: the cluster is held as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<PathBuf>,
    /// Consecutive reconcile failures (the backoff exponent).
    #[serde(default)]
    pub failures: u32,
    /// The status.
    pub status: FlowerClusterStatus,
    /// The agents' Prometheus endpoints, from the newest observation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics_targets: Vec<MetricsTarget>,
}

/// Inputs of [`compute`].
#[derive(Debug, Clone, Copy)]
pub struct StatusInput<'a> {
    /// The spec, if valid in the current snapshot.
    pub desired: Option<&'a SourcedCluster>,
    /// The broken file holding this cluster, if any.
    pub held_by: Option<&'a Path>,
    /// Live state, if the cluster's service exists.
    pub live: Option<&'a LiveSummary>,
    /// The controller's record.
    pub track: &'a ClusterTrack,
    /// Now.
    pub now: DateTime<Utc>,
}

fn cond(kind: ConditionType, holds: bool, reason: &str, message: String) -> Condition {
    Condition {
        kind,
        status: if holds {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason: reason.to_string(),
        message,
        last_transition_time: DateTime::<Utc>::UNIX_EPOCH,
    }
}

fn stalled(i: &StatusInput<'_>) -> Condition {
    if let Some(file) = i.held_by {
        return cond(
            ConditionType::Stalled,
            true,
            "SpecInvalid",
            format!(
                "{} does not load; the cluster is left exactly as it is until it does",
                file.display()
            ),
        );
    }
    if let Some(why) = &i.track.deletion_blocked {
        return cond(ConditionType::Stalled, true, "DeletionBlocked", why.clone());
    }
    if i.track.failures >= STALL_AFTER_FAILURES {
        let err = i.track.last_error.clone().unwrap_or_default();
        return cond(
            ConditionType::Stalled,
            true,
            "ReconcileFailing",
            format!("{} consecutive failures; last: {err}", i.track.failures),
        );
    }
    cond(ConditionType::Stalled, false, "AsExpected", String::new())
}

fn reconciling(i: &StatusInput<'_>) -> Condition {
    let t = ConditionType::Reconciling;
    match i.desired {
        _ if i.track.in_flight => cond(t, true, "Reconciling", "a reconcile is running".into()),
        Some(d) if d.cluster.spec.suspend => {
            cond(t, false, "Suspended", "spec.suspend is true".into())
        }
        _ if i.track.failures > 0 => cond(
            t,
            true,
            "RetryingAfterError",
            i.track.last_error.clone().unwrap_or_default(),
        ),
        _ if !i.track.last_actions.is_empty() => {
            cond(t, true, "Progressing", i.track.last_actions.join("; "))
        }
        None => cond(
            t,
            false,
            "NotInSpecs",
            "no spec defines this cluster".into(),
        ),
        Some(_) => cond(t, false, "Converged", "live state matches the spec".into()),
    }
}

fn ready(i: &StatusInput<'_>) -> Condition {
    let t = ConditionType::Ready;
    match (i.desired, i.live) {
        (None, _) => cond(
            t,
            false,
            "NotInSpecs",
            "no spec defines this cluster".into(),
        ),
        (Some(_), Some(l)) => cond(t, l.ready.ready, &l.ready.reason, l.ready.message.clone()),
        (Some(_), None) => cond(
            t,
            false,
            "NotObserved",
            "the live state has not been observed yet".into(),
        ),
    }
}

fn degraded(i: &StatusInput<'_>) -> Condition {
    let t = ConditionType::Degraded;
    match (i.live, i.desired) {
        (Some(l), Some(_)) if !l.unknown_sites.is_empty() => cond(
            t,
            true,
            "UnknownSite",
            format!(
                "supernodes.sites names {} that the controller's configuration does not \
                 ([sites.NAME]): no SuperNodes are placed there",
                l.unknown_sites.join(", ")
            ),
        ),
        (Some(l), _) if l.nodes_failed > 0 => cond(
            t,
            true,
            "NodesFailed",
            format!("{} SuperNode(s) failed", l.nodes_failed),
        ),
        (Some(l), Some(d))
            if l.superlink_ready && l.nodes_running < d.cluster.spec.supernodes.count =>
        {
            cond(
                t,
                true,
                "NodesMissing",
                format!(
                    "{}/{} SuperNodes running",
                    l.nodes_running, d.cluster.spec.supernodes.count
                ),
            )
        }
        _ => cond(t, false, "AsExpected", String::new()),
    }
}

/// The status of one cluster.
pub fn compute(i: StatusInput<'_>) -> FlowerClusterStatus {
    let mut conditions = vec![ready(&i), reconciling(&i), degraded(&i), stalled(&i)];
    for c in &mut conditions {
        let prev = i.track.conditions.iter().find(|p| p.kind == c.kind);
        c.last_transition_time = match prev {
            Some(p) if p.status == c.status => p.last_transition_time,
            _ => i.now,
        };
    }
    let (observed_revision, observed_spec_hash) = i.track.last_ok.clone().unzip();
    FlowerClusterStatus {
        observed_revision,
        observed_spec_hash: observed_spec_hash.flatten(),
        service_id: i.live.and_then(|l| l.service_id),
        conditions,
        superlink_endpoint: i.live.and_then(|l| l.superlink_endpoint.clone()),
        nodes: NodeCounts {
            desired: i.desired.map_or(0, |d| d.cluster.spec.supernodes.count),
            running: i.live.map_or(0, |l| l.nodes_running),
            ready: i.live.map_or(0, |l| l.nodes_ready),
            failed: i.live.map_or(0, |l| l.nodes_failed),
        },
        certificate_not_after: i.live.and_then(|l| l.cert_not_after),
        last_reconciles: i.track.history.iter().cloned().collect(),
    }
}

/// The condition of `kind` in `status`.
pub fn condition(status: &FlowerClusterStatus, kind: ConditionType) -> Option<&Condition> {
    status.conditions.iter().find(|c| c.kind == kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Assembler, FileLoad};

    fn desired(count: u32) -> SourcedCluster {
        let text = crate::source::tests::spec_yaml_for("alpha", count);
        let loads = vec![FileLoad::Ok {
            file: "a.yaml".into(),
            clusters: serde_norway::from_str(&text).map(|c| vec![c]).unwrap(),
        }];
        Assembler::default()
            .assemble("r1".into(), loads)
            .clusters
            .remove("alpha")
            .unwrap()
    }

    fn live(ready: u32, failed: u32) -> LiveSummary {
        let verdict = if failed == 0 {
            ("Available", "SuperLink serving")
        } else {
            ("NodesNotReady", "service 7: 2/3 SuperNodes ready")
        };
        LiveSummary {
            ready: Verdict {
                ready: failed == 0,
                reason: verdict.0.into(),
                message: verdict.1.into(),
            },
            service_id: Some(7),
            service_state: "RUNNING".into(),
            superlink_ready: true,
            superlink_endpoint: Some("10.0.0.2:9092".into()),
            nodes_running: ready + failed,
            nodes_ready: ready,
            nodes_failed: failed,
            cert_not_after: None,
            metrics_targets: Vec::new(),
            unknown_sites: Vec::new(),
            site_keys_pending: false,
        }
    }

    fn status_of(i: StatusInput<'_>, kind: ConditionType) -> (ConditionStatus, String) {
        let s = compute(i);
        let c = condition(&s, kind).unwrap();
        (c.status, c.reason.clone())
    }

    #[test]
    fn conditions_follow_desired_live_and_outcomes() {
        let d = desired(3);
        let track = ClusterTrack::default();
        let now = Utc::now();
        let base = StatusInput {
            desired: Some(&d),
            held_by: None,
            live: None,
            track: &track,
            now,
        };
        assert_eq!(
            status_of(base, ConditionType::Ready),
            (ConditionStatus::False, "NotObserved".into())
        );
        let ok = live(3, 0);
        let s = compute(StatusInput {
            live: Some(&ok),
            ..base
        });
        assert_eq!(
            condition(&s, ConditionType::Ready).unwrap().reason,
            "Available"
        );
        assert_eq!(
            s.nodes,
            NodeCounts {
                desired: 3,
                running: 3,
                ready: 3,
                failed: 0
            }
        );
        assert_eq!(s.superlink_endpoint.as_deref(), Some("10.0.0.2:9092"));

        let bad = live(2, 1);
        let i = StatusInput {
            live: Some(&bad),
            ..base
        };
        assert_eq!(
            status_of(i, ConditionType::Degraded),
            (ConditionStatus::True, "NodesFailed".into())
        );
        assert_eq!(status_of(i, ConditionType::Ready).1, "NodesNotReady");

        let failing = ClusterTrack {
            failures: STALL_AFTER_FAILURES,
            last_error: Some("oned down".into()),
            ..ClusterTrack::default()
        };
        let i = StatusInput {
            track: &failing,
            ..base
        };
        assert_eq!(
            status_of(i, ConditionType::Stalled),
            (ConditionStatus::True, "ReconcileFailing".into())
        );
        assert_eq!(
            status_of(i, ConditionType::Reconciling).1,
            "RetryingAfterError"
        );

        let i = StatusInput {
            desired: None,
            held_by: Some(Path::new("a.yaml")),
            ..base
        };
        assert_eq!(
            status_of(i, ConditionType::Stalled),
            (ConditionStatus::True, "SpecInvalid".into())
        );
    }

    /// The runtime does not define readiness: the Ready condition is the summary's
    /// verdict, word for word, whatever the node counts say.
    #[test]
    fn the_ready_condition_is_the_reconcilers_verdict() {
        let d = desired(1);
        let track = ClusterTrack::default();
        let mut l = live(5, 0);
        l.ready = Verdict {
            ready: false,
            reason: "ServiceNotRunning".into(),
            message: "service 7 is Deploying".into(),
        };
        let i = StatusInput {
            desired: Some(&d),
            held_by: None,
            live: Some(&l),
            track: &track,
            now: Utc::now(),
        };
        let s = compute(i);
        let c = condition(&s, ConditionType::Ready).unwrap();
        assert_eq!(
            (c.status, c.reason.as_str(), c.message.as_str()),
            (
                ConditionStatus::False,
                "ServiceNotRunning",
                "service 7 is Deploying"
            )
        );
        assert_eq!(s.nodes.ready, 5);
    }

    #[test]
    fn a_site_the_configuration_does_not_name_is_a_degraded_condition() {
        let (d, track) = (desired(1), ClusterTrack::default());
        let mut l = live(1, 0);
        l.unknown_sites = vec!["b".into()];
        let s = compute(StatusInput {
            desired: Some(&d),
            held_by: None,
            live: Some(&l),
            track: &track,
            now: Utc::now(),
        });
        let c = condition(&s, ConditionType::Degraded).unwrap();
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::True, "UnknownSite")
        );
        assert!(
            c.message
                .contains("b that the controller's configuration does not"),
            "{}",
            c.message
        );
    }

    #[test]
    fn transition_times_only_move_when_the_status_changes() {
        let d = desired(1);
        let t0 = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::days(1);
        let mut track = ClusterTrack::default();
        let l = live(1, 0);
        let i = StatusInput {
            desired: Some(&d),
            held_by: None,
            live: Some(&l),
            track: &track,
            now: t0,
        };
        track.conditions = compute(i).conditions;
        let t1 = t0 + chrono::Duration::hours(1);
        let i = StatusInput {
            desired: Some(&d),
            held_by: None,
            live: Some(&l),
            track: &track,
            now: t1,
        };
        let ready = compute(i);
        assert_eq!(
            condition(&ready, ConditionType::Ready)
                .unwrap()
                .last_transition_time,
            t0
        );
        let down = live(0, 1);
        let i = StatusInput {
            desired: Some(&d),
            held_by: None,
            live: Some(&down),
            track: &track,
            now: t1,
        };
        assert_eq!(
            condition(&compute(i), ConditionType::Ready)
                .unwrap()
                .last_transition_time,
            t1
        );
    }
}
