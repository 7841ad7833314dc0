//! The planner: (desired, live, now) → ordered actions. Pure.
//!
//! Guarantees:
//! - A cluster whose spec exists, or whose file fails to load (`held`), never gets a
//!   `Delete`; the only service-destroying step for such a cluster is the last step of a
//!   redeploy, planned only once the new service is ready.
//! - `Delete` is planned only for services recorded with `deletionPolicy: Delete`, and
//!   only when [`DesiredState::prune_block`] is `None` (every spec file loads, no mass
//!   delete; see [`super::prune`]); otherwise the plan warns why nothing is deleted.
//! - Node replacements are planned only while the service is RUNNING or WARNING, never for
//!   the SuperLink, and at most ⌈count/2⌉ SuperNodes are out of service for a replacement
//!   at once: terminating, gone but not yet dropped by OneFlow, and replacements not yet
//!   ready all count (`tests::nodes_replaced_but_not_yet_ready_count_against_the_budget`),
//!   except that in WARNING a slot OneFlow cannot fill does not hold back replacing a VM
//!   OpenNebula reports stopped or lost, which is what ends the WARNING
//!   (`tests::a_warning_service_replaces_its_stopped_node_before_a_pending_scale_up`).
//! - When more than half of the running VMs of all clusters have stale heartbeats
//!   ([`heartbeat_outage`], the heartbeat channel is down), nothing is replaced for a stale
//!   heartbeat; a warning and the deferred replacements report it
//!   (`tests::a_heartbeat_channel_outage_replaces_nothing_and_says_so`).
//! - Honest plans: a change that is due but must wait (OneFlow deploying, scaling, in
//!   cooldown or WARNING, an undeploy or a replacement not finished, a safety hold) is
//!   planned all the same as a deferred action ([`super::Deferral`]) with its reason, never
//!   hidden behind a wait; a plain `Wait` stands only where nothing is pending
//!   (`tests::a_change_that_must_wait_is_shown_deferred_with_its_reason`).
//! - A redeploy's old service is undeployed only once the replacement is Ready by the one
//!   definition ([`super::ready`]).
//! - A SuperNode is never replaced for a stale heartbeat while its SuperLink's fresh
//!   `FL_NODES_ONLINE` holds its Flower node online; a warning and the
//!   deferred replacement (`FlowerSeesOnline`) report it ([`online_in_flower`],
//!   `tests::a_stale_heartbeat_is_not_replaced_while_the_superlink_holds_the_node_online`).
//! - At most one replacement service is in flight: a replacement that never became ready
//!   is undeployed, and gone, before the next one is created
//!   (`tests::at_most_one_replacement_service_is_in_flight`,
//!   `tests::version_churn_never_stacks_replacements`).
//! - Time rules (heartbeat staleness, renewal windows) use only the `now` argument; the
//!   controller passes the observation's own time, [`super::LiveState::observed_at`].
//! - Same inputs → same plan, byte for byte (all iteration is over sorted collections).
//!
//! Assumptions: the live state only holds services carrying this controller's marker.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use super::desired::{forces_replacement, is_sensitive, replacement_fields, spec_fields};
use super::prune::deletes_on_removal;
use super::ready::{
    replacement_rule, service_readiness, split_current, supernode_ready, supernode_target,
};
use super::{
    Action, ActionKind, Deferral, DesiredCluster, DesiredState, FieldChange, LiveService,
    LiveState, LiveVm, NodeFailure, Outage, Plan, PlanWarning, RedeployStep, Role, ServiceState,
    WaitFor,
};
use crate::api::TlsMode;
use crate::protocol::node_key::NodePublicKey;
use crate::protocol::nodes::NodesOnline;

/// Plan every cluster named by the desired or the live state.
pub fn plan(desired: &DesiredState, live: &LiveState, now: DateTime<Utc>) -> Plan {
    let names: BTreeSet<&str> = desired
        .clusters
        .keys()
        .chain(live.clusters.keys())
        .chain(desired.held.iter())
        .map(String::as_str)
        .collect();
    let mut out = Plan {
        observation_digest: live.digest.clone(),
        ..Plan::default()
    };
    for name in names {
        let mut p = plan_cluster(desired, live, name, now);
        out.actions.append(&mut p.actions);
        out.warnings.append(&mut p.warnings);
        out.notes.append(&mut p.notes);
    }
    out
}

/// Plan one cluster (what a per-cluster reconcile executes).
pub fn plan_cluster(
    desired: &DesiredState,
    live: &LiveState,
    name: &str,
    now: DateTime<Utc>,
) -> Plan {
    let mut p = ClusterPlanner {
        name,
        plan: Plan {
            observation_digest: live.digest.clone(),
            ..Plan::default()
        },
    };
    let all = live.services(name);
    let active: Vec<&LiveService> = all.iter().filter(|s| !s.state.is_going_away()).collect();
    let going_away = all.len() > active.len();

    if desired.held.contains(name) {
        if !all.is_empty() {
            p.warn("its spec file fails to load; the cluster is left exactly as it is");
        }
        return p.plan;
    }
    match desired.clusters.get(name) {
        None => p.orphan(&active, desired.prune_block()),
        Some(d) if d.cluster.spec.suspend => {}
        Some(d) => p.desired(live, d, &active, going_away, now),
    }
    p.plan
}

struct ClusterPlanner<'a> {
    name: &'a str,
    plan: Plan,
}

impl ClusterPlanner<'_> {
    fn push(&mut self, kind: ActionKind, reason: impl Into<String>, diff: Vec<FieldChange>) {
        self.plan.actions.push(Action {
            cluster: self.name.to_string(),
            kind,
            reason: reason.into(),
            diff,
            deferred: None,
        });
    }

    /// Push a change that is due but must wait for `until` (shown, never executed).
    fn push_deferred(
        &mut self,
        kind: ActionKind,
        reason: impl Into<String>,
        diff: Vec<FieldChange>,
        until: WaitFor,
        why: impl Into<String>,
    ) {
        self.push(kind, reason, diff);
        self.defer_since(self.plan.actions.len() - 1, until, &why.into());
    }

    /// Defer every change pushed from index `from` on (waits stay waits); whether any was.
    fn defer_since(&mut self, from: usize, until: WaitFor, why: &str) -> bool {
        let mut any = false;
        for a in &mut self.plan.actions[from..] {
            if a.kind.is_change() && a.deferred.is_none() {
                a.deferred = Some(Deferral {
                    until,
                    reason: why.to_string(),
                });
                any = true;
            }
        }
        any
    }

    fn replace_node(&mut self, service_id: u64, vm_id: u64, failure: NodeFailure) {
        self.push(
            ActionKind::ReplaceNode {
                service_id,
                vm_id,
                failure,
            },
            format!("SuperNode VM {vm_id}: {failure}"),
            Vec::new(),
        );
    }

    fn wait(&mut self, until: WaitFor, reason: impl Into<String>) {
        self.push(ActionKind::Wait { until }, reason, Vec::new());
    }

    fn warn(&mut self, message: impl Into<String>) {
        self.plan.warnings.push(PlanWarning {
            cluster: self.name.to_string(),
            message: message.into(),
        });
    }

    /// Services whose spec is gone.
    fn orphan(&mut self, services: &[&LiveService], block: Option<&str>) {
        for s in services {
            if !deletes_on_removal(s) {
                self.warn(format!(
                    "spec removed; service {} is retained (deletionPolicy Retain) and no longer managed",
                    s.service_id
                ));
            } else if let Some(why) = block {
                self.warn(format!(
                    "spec removed; service {} (deletionPolicy Delete) is not deleted: {why}",
                    s.service_id
                ));
            } else {
                self.push(
                    ActionKind::Delete {
                        service_id: s.service_id,
                    },
                    "its spec was removed and its deletionPolicy is Delete",
                    Vec::new(),
                );
            }
        }
    }

    fn desired(
        &mut self,
        live: &LiveState,
        d: &DesiredCluster,
        services: &[&LiveService],
        going_away: bool,
        now: DateTime<Utc>,
    ) {
        let fields = spec_fields(&d.cluster);
        let wanted = replacement_fields(&fields);
        let (current, old) = split_current(services.iter().copied(), &wanted);
        let ready = |s: &LiveService| {
            let want = supernode_target(&d.cluster, s.supernode.cardinality);
            service_readiness(&d.cluster, s, want, now, live.last_outage)
        };

        let Some(cur) = current.first().copied() else {
            // At most one replacement in flight: a replacement that never became ready is
            // undeployed (and gone) before the next one is created.
            let (keep, abandon) = unready_replacements(&old, |s| ready(s).is_ready());
            let busy = if !abandon.is_empty() || (going_away && keep.is_some()) {
                Some("an unready replacement is undeploying; the next one is created once it is gone")
            } else if going_away {
                Some("a previous service of this cluster is still undeploying")
            } else {
                None
            };
            for a in &abandon {
                self.push(
                    ActionKind::Redeploy(RedeployStep::AbandonUnready {
                        service_id: a.service_id,
                    }),
                    "a replacement that never became ready is undeployed before the next \
                     one is created (at most one replacement in flight)",
                    Vec::new(),
                );
            }
            let from = self.plan.actions.len();
            match keep {
                Some(o) => {
                    let before = o.applied.as_ref().map(|a| &a.fields);
                    let diff = diff_fields(before, &fields, forces_replacement);
                    self.push(
                        ActionKind::Redeploy(RedeployStep::Instantiate {
                            old_service_id: o.service_id,
                            body: None,
                        }),
                        "a change OneFlow cannot apply in place: a new service replaces \
                         the old one once ready (SuperLink run history starts fresh)",
                        diff,
                    );
                }
                // A create lists the spec's fields; none forces a replacement of anything.
                None => self.push(
                    ActionKind::Create { body: None },
                    "no service exists for this cluster",
                    diff_fields(None, &fields, |_| true)
                        .into_iter()
                        .map(|c| FieldChange {
                            forces_replacement: false,
                            ..c
                        })
                        .collect(),
                ),
            }
            if let Some(why) = busy {
                self.defer_since(from, WaitFor::Undeploying, why);
            }
            return;
        };
        for extra in current.iter().skip(1) {
            self.warn(format!(
                "service {} duplicates service {} for this cluster; it is left untouched",
                extra.service_id, cur.service_id
            ));
        }

        if !old.is_empty() {
            let verdict = ready(cur);
            for o in &old {
                let kind = ActionKind::Redeploy(RedeployStep::UndeployOld {
                    old_service_id: o.service_id,
                    new_service_id: cur.service_id,
                });
                let reason = format!(
                    "the replacement service {} is ready with its SuperNodes registered",
                    cur.service_id
                );
                if verdict.is_ready() {
                    self.push(kind, reason, Vec::new());
                } else {
                    self.push_deferred(
                        kind,
                        format!("service {} replaces it", cur.service_id),
                        Vec::new(),
                        WaitFor::RedeployReady,
                        format!("the replacement is not ready: {}", verdict.message),
                    );
                }
            }
        }
        self.steady(live, d, cur, &fields, now);
    }

    /// A service that matches the spec's replacement fields: converge it in place.
    fn steady(
        &mut self,
        live: &LiveState,
        d: &DesiredCluster,
        cur: &LiveService,
        fields: &BTreeMap<String, String>,
        now: DateTime<Utc>,
    ) {
        let wait = match cur.state {
            ServiceState::Running | ServiceState::Warning => None,
            s if s.is_deploying() => Some((WaitFor::Deploying, "the service is deploying")),
            ServiceState::Scaling => Some((WaitFor::Scaling, "the service is scaling")),
            ServiceState::Cooldown => Some((WaitFor::Cooldown, "OneFlow cooldown after scaling")),
            ServiceState::Hold => Some((WaitFor::Failed, "the service is on hold")),
            s if s.is_failed() => Some((
                WaitFor::Failed,
                "OneFlow reports a failure; recover the service (oneflow recover) or fix the cause",
            )),
            _ => Some((
                WaitFor::Failed,
                "the service is in a state the controller does not act on",
            )),
        };
        // Changes due while OneFlow is busy are planned all the same, deferred with the
        // reason, so the plan shows what is pending; a plain wait only when nothing is.
        let from = self.plan.actions.len();
        let recorded = cur.applied.as_ref();
        let diff = diff_fields(recorded.map(|a| &a.fields), fields, |p| {
            !forces_replacement(p)
        });
        if recorded.is_none() || !diff.is_empty() {
            self.push(
                ActionKind::UpdateTemplate {
                    service_id: cur.service_id,
                    body: None,
                },
                if recorded.is_none() {
                    "the service carries no record of the applied spec".to_string()
                } else {
                    "fields that apply in place changed".to_string()
                },
                diff,
            );
        }

        let scale_hold = match wait {
            Some(_) => None,
            None => self.replacements(live, d, cur, now),
        };
        self.scale(d, cur, scale_hold);
        self.rotation(d, cur, now);
        self.site_keys(d, cur);
        if let Some((until, reason)) = wait {
            let why = format!("{reason} (service {})", cur.service_id);
            if !self.defer_since(from, until, &why) {
                self.wait(until, why);
            }
        }
    }

    /// Plan node replacements; `Some` (what for, why) when scaling must wait (a
    /// termination planned or in flight, OneFlow's numbers not yet updated, or heartbeats
    /// held by the breaker). Replacements the breaker or the budget holds back are
    /// planned deferred.
    ///
    /// Budget: at most ⌈count/2⌉ SuperNodes out of service for a replacement at once,
    /// counting every slot of the role that is not healthy and ready and not itself a
    /// candidate — terminating VMs, VMs gone but not yet dropped by OneFlow, replacements
    /// still booting. (Counting only terminating VMs let a OneGate outage take every node.)
    /// Exception: while the service is in WARNING, OneFlow fills no missing slot (it
    /// scales only RUNNING services), and the WARNING lasts as long as the VMs OpenNebula
    /// reports stopped or lost are there; the missing slots are then not counted against
    /// *those* replacements, which are planned first — otherwise they wait on a scale that
    /// waits on them (`a_warning_service_replaces_its_stopped_node_before_a_pending_scale_up`).
    fn replacements(
        &mut self,
        live: &LiveState,
        d: &DesiredCluster,
        cur: &LiveService,
        now: DateTime<Utc>,
    ) -> Option<(WaitFor, String)> {
        let sn = &d.cluster.spec.supernodes;
        let grace = sn.failure_policy.grace_period.as_chrono();
        let rule = replacement_rule(&d.cluster);
        let outage = live.last_outage;
        let breaker = heartbeat_outage(live, now, grace);
        let flower = flower_view(cur, now, grace);
        let mut failed: Vec<(u64, NodeFailure)> = Vec::new();
        let mut held: Vec<u64> = Vec::new();
        let mut healthy = 0usize;
        // SuperNodes with stale heartbeats that Flower still holds online: (VM, node id).
        let mut online: Vec<(u64, u64)> = Vec::new();
        for vm in &cur.supernode.nodes {
            let failure = replacement_failure(vm, now, rule, outage);
            if let (None, Some(quiet), Some(edge)) =
                (failure, node_failure(vm, now, grace, outage), &sn.edge)
            {
                self.warn(format!(
                    "edge SuperNode VM {}: {quiet}; kept until it has been quiet for \
                     edge.offlineGrace ({})",
                    vm.id, edge.offline_grace
                ));
            }
            let stale = failure == Some(NodeFailure::StaleHeartbeat);
            match (
                failure,
                stale.then(|| online_in_flower(vm, &flower)).flatten(),
            ) {
                (Some(_), _) if stale && breaker.is_some() => held.push(vm.id),
                (Some(_), Some(node_id)) => online.push((vm.id, node_id)),
                (Some(f), None) => failed.push((vm.id, f)),
                (None, _) if supernode_ready(vm, now, grace, outage) => healthy += 1,
                (None, _) => {}
            }
        }
        if let FlowerView::Stale(at) = flower {
            if failed
                .iter()
                .any(|(_, f)| *f == NodeFailure::StaleHeartbeat)
            {
                self.warn(format!(
                    "the SuperLink's list of online Flower nodes dates from {at}, older than \
                     the grace period: stale heartbeats are not corroborated by Flower"
                ));
            }
        }
        if let FlowerView::Fresh(list) = flower {
            for (vm_id, node_id) in &online {
                self.warn(format!(
                    "SuperNode VM {vm_id}: heartbeat is older than the grace period, but the \
                     SuperLink holds its Flower node {node_id} online (as of {}): not replaced",
                    list.at
                ));
            }
        }
        const FLOWER: &str =
            "the SuperLink holds the SuperNode online: only its heartbeat channel is broken";
        if !online.is_empty() {
            let from = self.plan.actions.len();
            for (vm_id, _) in &online {
                self.replace_node(cur.service_id, *vm_id, NodeFailure::StaleHeartbeat);
            }
            self.defer_since(from, WaitFor::FlowerSeesOnline, FLOWER);
        }
        for vm in &cur.superlink.nodes {
            if let Some(f) = vm.state_failure() {
                self.warn(format!(
                    "SuperLink VM {}: {f}; the SuperLink holds run state and is never replaced automatically",
                    vm.id
                ));
            }
        }
        const OUTAGE: &str =
            "most heartbeats are stale together: no SuperNode is replaced for a stale heartbeat";
        if let Some((stale, total)) = breaker.filter(|_| !held.is_empty()) {
            self.warn(format!(
                "heartbeat channel outage: {stale} of {total} heartbeats are stale together \
                 (OneGate unreachable?); {} SuperNode(s) with stale heartbeats are not replaced",
                held.len()
            ));
            let from = self.plan.actions.len();
            for vm_id in &held {
                self.replace_node(cur.service_id, *vm_id, NodeFailure::StaleHeartbeat);
            }
            self.defer_since(from, WaitFor::HeartbeatOutage, OUTAGE);
        }
        let outage_held = held.len();
        let held = held.len() + online.len();
        let terminating = cur
            .supernode
            .nodes
            .iter()
            .filter(|vm| vm.is_terminating())
            .count();
        // A VM gone (DONE) before OneFlow's watchdog dropped it from the role: the
        // cardinality still counts it, so scaling now would be computed on stale numbers.
        let vanished = (cur.supernode.nodes.len() as u32) < cur.supernode.cardinality;
        const SETTLING: &str =
            "SuperNode VMs are terminating or not yet removed from the role by OneFlow";
        // A SuperNode Flower holds online serves; it does not hold scaling back (a hung
        // agent would otherwise block every count change for as long as it hangs).
        let hold = |terminating: bool| {
            if terminating {
                Some((WaitFor::Replacement, SETTLING.to_string()))
            } else if outage_held > 0 {
                Some((WaitFor::HeartbeatOutage, OUTAGE.to_string()))
            } else {
                None
            }
        };
        if failed.is_empty() {
            if terminating > 0 || vanished {
                self.wait(WaitFor::Replacement, SETTLING);
            }
            return hold(terminating > 0 || vanished);
        }
        if !sn.failure_policy.replace {
            self.warn(format!(
                "{} SuperNode(s) failed and failurePolicy.replace is off",
                failed.len()
            ));
            return hold(false);
        }
        let cap = (sn.count as usize).div_ceil(2).max(1);
        let present = (cur.supernode.cardinality as usize).max(cur.supernode.nodes.len());
        // Slots OneFlow has yet to fill: replacements to scale back, or a scale-up.
        let missing = (sn.count as usize).saturating_sub(present);
        let in_flight = (present + missing).saturating_sub(healthy + failed.len() + held);
        // Nodes OpenNebula reports stopped or lost first: in WARNING they alone may use
        // the budget the missing slots would take (see the doc comment).
        failed.sort_by_key(|(_, f)| *f == NodeFailure::StaleHeartbeat);
        let stopped = failed
            .iter()
            .filter(|(_, f)| *f != NodeFailure::StaleHeartbeat)
            .count();
        let stopped_budget = if cur.state == ServiceState::Warning {
            cap.saturating_sub(in_flight.saturating_sub(missing))
        } else {
            cap.saturating_sub(in_flight)
        };
        let stopped_planned = stopped.min(stopped_budget);
        let budget = if stopped_planned < stopped {
            stopped_planned
        } else {
            stopped_planned + cap.saturating_sub(in_flight + stopped_planned)
        };
        let from = self.plan.actions.len();
        for (vm_id, failure) in &failed {
            self.replace_node(cur.service_id, *vm_id, *failure);
        }
        // Beyond the budget: deferred, shown with why.
        self.defer_since(
            from + budget.min(failed.len()),
            WaitFor::Replacement,
            &format!(
                "at most {cap} SuperNode(s) are out of service for a replacement at once \
                 ({in_flight} not ready yet)"
            ),
        );
        // Nothing terminated now: scaling the role back up is what readies the missing
        // replacements (and frees the budget), so it may go ahead.
        if budget > 0 && !failed.is_empty() {
            return Some((
                WaitFor::Replacement,
                "failed SuperNodes are being replaced first".to_string(),
            ));
        }
        hold(terminating > 0 || vanished)
    }

    /// Scale toward the spec; deferred with `hold` (replacements first), or while the
    /// service is in WARNING.
    fn scale(&mut self, d: &DesiredCluster, cur: &LiveService, hold: Option<(WaitFor, String)>) {
        let live = cur.supernode.cardinality;
        // With elasticity OneFlow moves the count itself; the controller only enforces bounds.
        let target = supernode_target(&d.cluster, live);
        let sn = &d.cluster.spec.supernodes;
        if sn.elasticity.is_some() {
            self.plan.notes.push(PlanWarning {
                cluster: self.name.to_string(),
                message: format!(
                    "SuperNode count is left to OneFlow's elasticity policies ({live} now):                      the controller reconciles min {} and max {} and the policies, and scales                      only a count outside [{}, {}]; `count` is the starting size",
                    sn.min,
                    sn.max,
                    sn.min,
                    sn.max.max(sn.min)
                ),
            });
        }
        let mut wanted = Vec::new();
        // A site part has no SuperLink role.
        if cur.superlink.cardinality != 1 && d.cluster.spec.part.is_none() {
            wanted.push((Role::Superlink, cur.superlink.cardinality, 1));
        }
        if live != target {
            wanted.push((Role::Supernode, live, target));
        }
        if wanted.is_empty() {
            return;
        }
        let from_index = self.plan.actions.len();
        // OneFlow scales one role at a time; the next plan does the other.
        let (role, from, to) = wanted[0];
        self.push(
            ActionKind::Scale {
                service_id: cur.service_id,
                role,
                from,
                to,
            },
            format!(
                "role {} has {from} VM(s), the spec wants {to}",
                role.oneflow_name()
            ),
            vec![FieldChange {
                path: match role {
                    Role::Superlink => "roles.superlink.cardinality".into(),
                    Role::Supernode => "spec.supernodes.count".into(),
                },
                before: Some(from.to_string()),
                after: Some(to.to_string()),
                forces_replacement: false,
                sensitive: false,
            }],
        );
        let hold = hold.or_else(|| {
            (cur.state == ServiceState::Warning).then(|| {
                (
                    WaitFor::Warning,
                    format!(
                        "service {} is in WARNING: OneFlow scales it once RUNNING again",
                        cur.service_id
                    ),
                )
            })
        });
        if let Some((until, why)) = hold {
            self.defer_since(from_index, until, &why);
        }
    }

    fn rotation(&mut self, d: &DesiredCluster, cur: &LiveService, now: DateTime<Utc>) {
        let tls = &d.cluster.spec.tls;
        if !tls.enabled {
            return;
        }
        let Some(vm) = cur.superlink.nodes.iter().find(|vm| vm.is_running()) else {
            return;
        };
        let Some(not_after) = vm.attrs.cert_not_after else {
            return;
        };
        let Some(why) = rotation_reason(tls, not_after, now) else {
            return;
        };
        if tls.mode == TlsMode::Provided {
            self.warn(format!(
                "the provided serving certificate expires at {}; put a renewed one in the spec",
                not_after.to_rfc3339()
            ));
            return;
        }
        let requested = vm.attrs.rotate_request.unwrap_or(0);
        let done = vm.attrs.rotate_done.unwrap_or(0);
        // Generations only grow, whatever a peer wrote over the attributes: at least the
        // observation's epoch second, so a request is always newer than every earlier one
        // the SuperLink carried out.
        let generation = (requested + 1).max(u64::try_from(now.timestamp()).unwrap_or(0));
        if requested > done {
            self.wait(
                WaitFor::Rotation,
                format!(
                    "SuperLink VM {} is rotating its certificate (generation {requested})",
                    vm.id
                ),
            );
            return;
        }
        self.push(
            ActionKind::RotateCertificate {
                service_id: cur.service_id,
                vm_id: vm.id,
                generation,
                validity: Some(tls.validity),
            },
            why,
            vec![FieldChange {
                path: format!("vm.{}.{}", vm.id, crate::protocol::FL_ROTATE_REQUEST),
                before: vm.attrs.rotate_request.map(|g| g.to_string()),
                after: Some(generation.to_string()),
                forces_replacement: false,
                sensitive: false,
            }],
        );
    }
}

impl ClusterPlanner<'_> {
    /// The other sites' SuperNode keys onto the SuperLink VM, when its verified
    /// `FL_SITE_NODE_KEYS` (observation drops an unsigned one) is not the desired set. A
    /// single-site cluster (no keys wanted, none written) gets nothing; one whose last
    /// remote key went gets the empty set written, so its SuperLink revokes it.
    fn site_keys(&mut self, d: &DesiredCluster, cur: &LiveService) {
        let Some(vm) = cur.superlink.nodes.iter().find(|vm| vm.is_running()) else {
            return;
        };
        let live = vm.attrs.site_node_keys.as_ref();
        let wanted = &d.site_node_keys;
        if live == Some(wanted) || (live.is_none() && wanted.is_empty()) {
            return;
        }
        let prints = |keys: &BTreeSet<NodePublicKey>| {
            keys.iter()
                .map(NodePublicKey::fingerprint)
                .collect::<Vec<_>>()
        };
        let fingerprints = prints(wanted);
        let why = match live {
            None => "the SuperLink holds no signed list of the other sites' SuperNode keys".into(),
            Some(have) => format!(
                "the other sites' SuperNode keys changed: {} to add, {} to revoke",
                wanted.difference(have).count(),
                have.difference(wanted).count()
            ),
        };
        self.push(
            ActionKind::SetSiteNodeKeys {
                service_id: cur.service_id,
                vm_id: vm.id,
                fingerprints: fingerprints.clone(),
            },
            why,
            vec![FieldChange {
                path: format!("vm.{}.{}", vm.id, crate::protocol::FL_SITE_NODE_KEYS),
                before: live.map(|k| prints(k).join(",")),
                after: Some(fingerprints.join(",")),
                forces_replacement: false,
                sensitive: false,
            }],
        );
    }
}

/// Why the serving certificate must be renewed now, if it must: it expires within
/// `renewBefore`, or it outlives `validity` by more than max(5 min, 5 %) — the spec shortened
/// the validity, which a running SuperLink cannot see in its context.
fn rotation_reason(
    tls: &crate::api::TlsSpec,
    not_after: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<String> {
    let left = not_after - now;
    if left <= tls.renew_before.as_chrono() {
        return Some(format!(
            "the serving certificate expires at {}, within renewBefore ({})",
            not_after.to_rfc3339(),
            tls.renew_before
        ));
    }
    let validity = tls.validity.as_chrono();
    let slack = (validity / 20).max(chrono::Duration::minutes(5));
    let limit = validity.checked_add(&slack)?;
    (left > limit).then(|| {
        format!(
            "the serving certificate is valid until {}, longer than validity ({}) allows",
            not_after.to_rfc3339(),
            tls.validity
        )
    })
}

/// The next moment the plan of `name` changes by the clock alone — a SuperNode heartbeat
/// going stale, the serving certificate entering `renewBefore` — so the controller looks
/// again then rather than at the next periodic resync. `None`: nothing is due.
pub fn next_deadline(
    desired: &DesiredState,
    live: &LiveState,
    name: &str,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let spec = &desired.clusters.get(name)?.cluster.spec;
    if spec.suspend {
        return None;
    }
    let mut due = Vec::new();
    for s in live.services(name) {
        if spec.supernodes.failure_policy.replace {
            let rule = replacement_rule(&desired.clusters.get(name)?.cluster);
            let grace = rule.grace;
            due.extend(
                s.supernode
                    .nodes
                    .iter()
                    .filter(|vm| {
                        vm.is_running()
                            || (rule.edge && vm.state_failure() == Some(NodeFailure::Unknown))
                    })
                    .filter_map(|vm| {
                        let since = vm.stime.max(vm.attrs.heartbeat)?;
                        let blind = live
                            .last_outage
                            .map_or(chrono::Duration::zero(), |o| o.overlap(since, now));
                        since.checked_add_signed(grace.checked_add(&blind)?)
                    }),
            );
        }
        if spec.tls.enabled && spec.tls.mode != TlsMode::Provided {
            let renew = spec.tls.renew_before.as_chrono();
            due.extend(
                s.superlink
                    .nodes
                    .iter()
                    .filter(|vm| vm.is_running())
                    .filter_map(|vm| vm.attrs.cert_not_after?.checked_sub_signed(renew)),
            );
        }
    }
    due.into_iter().filter(|t| *t > now).min()
}

/// What the SuperLink's `FL_NODES_ONLINE` can say at `at` (#12 item 4c).
#[derive(Debug, Clone, Copy)]
enum FlowerView<'a> {
    /// No SuperLink published a valid list (older agent, no persistent state).
    Absent,
    /// Read more than `grace` before `at` (or implausibly far after it).
    Stale(DateTime<Utc>),
    /// Read within `grace` of `at`.
    Fresh(&'a NodesOnline),
}

/// The newest list of `service`'s SuperLink(s), judged at `at`.
fn flower_view(
    service: &LiveService,
    at: DateTime<Utc>,
    grace: chrono::Duration,
) -> FlowerView<'_> {
    let Some(list) = service
        .superlink
        .nodes
        .iter()
        .filter_map(|vm| vm.attrs.nodes_online.as_ref())
        .max_by_key(|l| l.at)
    else {
        return FlowerView::Absent;
    };
    // The SuperLink's clock may run ahead a little; a list from far ahead is a forgery
    // that would hold replacements forever.
    let age = at - list.at;
    if age <= grace && age >= -MAX_CLOCK_LEAD {
        FlowerView::Fresh(list)
    } else {
        FlowerView::Stale(list.at)
    }
}

/// How far ahead of the observation an agent's clock may be.
const MAX_CLOCK_LEAD: chrono::Duration = chrono::Duration::minutes(2);

/// The corroboration of a stale heartbeat (#12 item 4c): `Some(node id)` when the
/// SuperLink's fresh list holds `vm`'s Flower node online — its SuperNode still talks to
/// the SuperLink, so only the OneGate path of its heartbeat is broken and it is not
/// replaced. `None` (replace) when the list is fresh and lacks it, or when there is no
/// fresh list to ask (then the heartbeat alone decides, as without corroboration).
/// Flower holds a silent node online for up to 2 × its 30 s heartbeat, so a dead
/// SuperNode is replaced up to a minute later than without corroboration.
/// Shown by `tests::a_stale_heartbeat_is_not_replaced_while_the_superlink_holds_the_node_online`.
fn online_in_flower(vm: &LiveVm, view: &FlowerView<'_>) -> Option<u64> {
    let FlowerView::Fresh(list) = view else {
        return None;
    };
    let id = vm.attrs.flower_node_id?;
    list.ids.contains(&id).then_some(id)
}

/// Why SuperNode `vm` counts as failed at `at` (`None`: it does not): a failure state,
/// UNKNOWN or unexpected POWEROFF, or no heartbeat within `grace` counted from the later of
/// boot and the last heartbeat, not counting the controller's last outage (a front-end
/// that was down took OneGate with it, so healthy agents could not heartbeat either).
///
/// The one rule: the planner plans replacements with it and the applier re-checks a
/// freshly read VM with it right before terminating (`controller::apply`).
pub fn node_failure(
    vm: &LiveVm,
    at: DateTime<Utc>,
    grace: chrono::Duration,
    outage: Option<Outage>,
) -> Option<NodeFailure> {
    vm.state_failure()
        .or_else(|| heartbeat_stale(vm, at, grace, outage).then_some(NodeFailure::StaleHeartbeat))
}

/// How a cluster's quiet SuperNodes are judged for replacement ([`ready::replacement_rule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplacementRule {
    /// No heartbeat for this long (not counting the controller's last outage): replaced.
    pub grace: chrono::Duration,
    /// The edge profile: a VM in UNKNOWN is replaced only once its heartbeat is older
    /// than `grace` too (an edge host drops off the network with its link).
    pub edge: bool,
}

/// Why SuperNode `vm` is replaced at `at` (`None`: it is not): [`node_failure`] with the
/// cluster's replacement grace, except that an edge node in UNKNOWN is held while its
/// last heartbeat is within that grace. Readiness keeps [`node_failure`] with
/// `gracePeriod`, so a quiet edge node is not ready although it is kept.
///
/// The one rule: the planner plans replacements with it and the applier re-checks a
/// freshly read VM with it right before terminating (`controller::apply`).
/// Shown by `tests::an_edge_node_offline_past_the_grace_period_is_kept_until_its_offline_grace`.
pub fn replacement_failure(
    vm: &LiveVm,
    at: DateTime<Utc>,
    rule: ReplacementRule,
    outage: Option<Outage>,
) -> Option<NodeFailure> {
    match node_failure(vm, at, rule.grace, outage) {
        Some(NodeFailure::Unknown) if rule.edge => {
            quiet_longer_than(vm, at, rule.grace, outage).then_some(NodeFailure::Unknown)
        }
        f => f,
    }
}

fn heartbeat_stale(
    vm: &LiveVm,
    now: DateTime<Utc>,
    grace: chrono::Duration,
    outage: Option<Outage>,
) -> bool {
    vm.is_running() && quiet_longer_than(vm, now, grace, outage)
}

/// More than `grace` since the later of boot and the last heartbeat, not counting the
/// controller's last outage.
fn quiet_longer_than(
    vm: &LiveVm,
    now: DateTime<Utc>,
    grace: chrono::Duration,
    outage: Option<Outage>,
) -> bool {
    let since = match (vm.stime, vm.attrs.heartbeat) {
        (Some(a), Some(b)) => a.max(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return false,
    };
    let blind = outage.map_or(chrono::Duration::zero(), |o| o.overlap(since, now));
    now - since - blind > grace
}

/// The heartbeat circuit breaker: `Some((stale, total))` when more than half of the
/// running VMs of every managed cluster (both roles; `total` ≥ 2) have no heartbeat
/// within `grace` at `at`, or came back within the last `grace` from a silence longer than
/// it ([`back_from_silence`]). Agents heartbeat through OneGate, so that many going stale
/// together points at the channel (OneGate down, its host unreachable), not at the
/// nodes: no node is replaced for a stale heartbeat while it holds.
///
/// Caveat: it cannot tell a channel outage from most nodes really dying at once; then
/// replacements wait for the heartbeats of the survivors to make them a minority, or for
/// a human.
pub fn heartbeat_outage(
    live: &LiveState,
    at: DateTime<Utc>,
    grace: chrono::Duration,
) -> Option<(usize, usize)> {
    let (mut stale, mut total) = (0usize, 0usize);
    let vms = live
        .clusters
        .values()
        .flatten()
        .filter(|s| !s.state.is_going_away())
        .flat_map(|s| s.superlink.nodes.iter().chain(&s.supernode.nodes))
        .filter(|vm| vm.is_running());
    for vm in vms {
        total += 1;
        stale += usize::from(
            heartbeat_stale(vm, at, grace, live.last_outage) || back_from_silence(vm, at, grace),
        );
    }
    (total >= 2 && stale * 2 > total).then_some((stale, total))
}

/// `vm`'s heartbeat came back within the last `grace` from a silence longer than `grace`:
/// it was quiet with the others. Heartbeats that stalled together (OneGate, or a host, too
/// slow for a while) come back one by one; counted as still out for one grace period, the
/// first to return do not turn the breaker off and get the last ones, healthy but a few
/// seconds behind, replaced (seen on an overloaded CI machine: a healthy SuperNode
/// terminated 10 s after the breaker had held it).
/// Shown by `tests::heartbeats_resuming_one_by_one_after_an_outage_replace_nothing`.
fn back_from_silence(vm: &LiveVm, at: DateTime<Utc>, grace: chrono::Duration) -> bool {
    vm.last_silence
        .is_some_and(|s| s.to - s.from > grace && at - s.to <= grace)
}

/// Of the services carrying outdated replacement fields (sorted by id): the one to keep
/// serving — the newest ready one, else the oldest — and the replacements created after
/// it that never became ready, which are undeployed before another one is created.
fn unready_replacements<'s>(
    old: &[&'s LiveService],
    ready: impl Fn(&LiveService) -> bool,
) -> (Option<&'s LiveService>, Vec<&'s LiveService>) {
    let keep = old
        .iter()
        .rev()
        .find(|s| ready(s))
        .or_else(|| old.first())
        .copied();
    let abandon = keep.map_or_else(Vec::new, |k| {
        old.iter()
            .filter(|s| s.service_id > k.service_id)
            .copied()
            .collect()
    });
    (keep, abandon)
}

/// Field changes between two flattened specs, restricted to paths `include` accepts.
fn diff_fields(
    before: Option<&BTreeMap<String, String>>,
    after: &BTreeMap<String, String>,
    include: impl Fn(&str) -> bool,
) -> Vec<FieldChange> {
    let empty = BTreeMap::new();
    let before = before.unwrap_or(&empty);
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| include(k))
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| FieldChange {
            path: k.clone(),
            before: before.get(k).cloned(),
            after: after.get(k).cloned(),
            forces_replacement: forces_replacement(k),
            sensitive: is_sensitive(k),
        })
        .collect()
}
