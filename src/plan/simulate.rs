//! A small pure model of OpenNebula + agents executing a plan, used by the convergence
//! property tests and the benchmark. It models the happy path: every action succeeds, a
//! created service is immediately RUNNING with healthy, registered nodes, and an agent
//! answers a rotation request at once.

use chrono::{DateTime, Utc};

use super::{
    spec_fields, ActionKind, AgentAttributes, AppliedSpec, DesiredState, LcmState, LiveRole,
    LiveService, LiveState, LiveVm, Owner, Plan, RedeployStep, Role, RoleState, ServiceState,
    VmState,
};

/// Apply `plan` to `live` as OpenNebula and the agents would, at time `now`.
pub fn simulate(
    plan: &Plan,
    desired: &DesiredState,
    live: &LiveState,
    now: DateTime<Utc>,
) -> LiveState {
    let mut next = live.clone();
    let mut next_id = next
        .clusters
        .values()
        .flatten()
        .flat_map(|s| {
            std::iter::once(s.service_id)
                .chain(s.superlink.nodes.iter().map(|v| v.id))
                .chain(s.supernode.nodes.iter().map(|v| v.id))
        })
        .max()
        .map_or(0, |m| m + 1);
    let mut fresh = || {
        next_id += 1;
        next_id
    };
    for a in &plan.actions {
        let services = next.clusters.entry(a.cluster.clone()).or_default();
        // A deferred change is not made; like a wait, OneFlow meanwhile finishes its work.
        let wait = ActionKind::Wait {
            until: super::WaitFor::Deploying,
        };
        let kind = if a.deferred.is_some() { &wait } else { &a.kind };
        match kind {
            ActionKind::Create { .. } | ActionKind::Redeploy(RedeployStep::Instantiate { .. }) => {
                if let Some(d) = desired.clusters.get(&a.cluster) {
                    services.push(new_service(d, &mut fresh, now));
                }
            }
            ActionKind::UpdateTemplate { service_id, .. } => {
                // PUT /service/:id records the applied spec in the service itself.
                if let (Some(d), Some(s)) = (
                    desired.clusters.get(&a.cluster),
                    find(services, *service_id),
                ) {
                    s.applied = Some(applied(d));
                    s.owner.spec_hash = d.spec_hash.clone();
                }
            }
            ActionKind::Scale {
                service_id,
                role,
                to,
                ..
            } => {
                if let Some(s) = find(services, *service_id) {
                    let r = match role {
                        Role::Superlink => &mut s.superlink,
                        Role::Supernode => &mut s.supernode,
                    };
                    r.cardinality = *to;
                    // OneFlow removes the oldest nodes first.
                    while r.nodes.len() > *to as usize {
                        r.nodes.remove(0);
                    }
                    while r.nodes.len() < *to as usize {
                        r.nodes.push(healthy_vm(fresh(), *role, now));
                    }
                }
            }
            ActionKind::RotateCertificate {
                service_id,
                vm_id,
                generation,
                validity,
            } => {
                let validity = validity
                    .map(|v| v.get())
                    .or_else(|| {
                        desired
                            .clusters
                            .get(&a.cluster)
                            .map(|d| d.cluster.spec.tls.validity.get())
                    })
                    .unwrap_or_default();
                if let Some(vm) = find(services, *service_id)
                    .and_then(|s| s.superlink.nodes.iter_mut().find(|v| v.id == *vm_id))
                {
                    vm.attrs.rotate_request = Some(*generation);
                    vm.attrs.rotate_done = Some(*generation);
                    vm.attrs.cert_not_after =
                        Some(now + chrono::Duration::from_std(validity).unwrap_or_default());
                }
            }
            ActionKind::SetSiteNodeKeys {
                service_id, vm_id, ..
            } => {
                let keys = desired
                    .clusters
                    .get(&a.cluster)
                    .map(|d| d.site_node_keys.clone())
                    .unwrap_or_default();
                if let Some(vm) = find(services, *service_id)
                    .and_then(|s| s.superlink.nodes.iter_mut().find(|v| v.id == *vm_id))
                {
                    vm.attrs.site_node_keys = Some(keys);
                }
            }
            ActionKind::ReplaceNode {
                service_id, vm_id, ..
            } => {
                // terminate-hard: the VM reaches DONE and OneFlow drops it from the role.
                if let Some(s) = find(services, *service_id) {
                    let before = s.supernode.nodes.len();
                    s.supernode.nodes.retain(|v| v.id != *vm_id);
                    if s.supernode.nodes.len() < before {
                        s.supernode.cardinality = s.supernode.cardinality.saturating_sub(1);
                    }
                }
            }
            ActionKind::Delete { service_id }
            | ActionKind::Redeploy(RedeployStep::AbandonUnready { service_id })
            | ActionKind::Redeploy(RedeployStep::UndeployOld {
                old_service_id: service_id,
                ..
            }) => services.retain(|s| s.service_id != *service_id),
            ActionKind::Wait { .. } => {
                // OneFlow finishes whatever was in progress.
                for s in services.iter_mut() {
                    if s.state.is_deploying()
                        || matches!(s.state, ServiceState::Scaling | ServiceState::Cooldown)
                    {
                        s.state = ServiceState::Running;
                    }
                }
                services.retain(|s| !s.state.is_going_away());
            }
        }
    }
    next.clusters.retain(|_, v| !v.is_empty());
    next.seal();
    next
}

fn applied(d: &super::DesiredCluster) -> AppliedSpec {
    AppliedSpec {
        format: AppliedSpec::FORMAT,
        fields: spec_fields(&d.cluster),
    }
}

fn find(services: &mut [LiveService], id: u64) -> Option<&mut LiveService> {
    services.iter_mut().find(|s| s.service_id == id)
}

fn new_service(
    d: &super::DesiredCluster,
    fresh: &mut impl FnMut() -> u64,
    now: DateTime<Utc>,
) -> LiveService {
    let name = d.cluster.metadata.name.clone();
    let count = d.cluster.spec.supernodes.count;
    let service_id = fresh();
    LiveService {
        service_id,
        name: name.clone(),
        owner: Owner {
            cluster: name,
            spec_hash: d.spec_hash.clone(),
            controller: "sim".into(),
        },
        state: ServiceState::Running,
        applied: Some(applied(d)),
        superlink: LiveRole {
            cardinality: 1,
            state: RoleState::Running,
            nodes: vec![healthy_vm(fresh(), Role::Superlink, now)],
        },
        supernode: LiveRole {
            cardinality: count,
            state: RoleState::Running,
            nodes: (0..count)
                .map(|_| healthy_vm(fresh(), Role::Supernode, now))
                .collect(),
        },
    }
}

/// A running, registered, heartbeating VM of `role`.
pub fn healthy_vm(id: u64, role: Role, now: DateTime<Utc>) -> LiveVm {
    let link = role == Role::Superlink;
    LiveVm {
        id,
        name: format!("{}_{id}", role.oneflow_name()),
        state: VmState::Active,
        lcm_state: LcmState::Running,
        stime: Some(now),
        addresses: Vec::new(),
        last_silence: None,
        attrs: AgentAttributes {
            ready: true,
            role: Some(role.oneflow_name().into()),
            fl_ready: link.then_some(true),
            node_ready: (!link).then_some(true),
            heartbeat: Some(now),
            cert_not_after: link.then(|| now + chrono::Duration::days(365)),
            endpoint: link
                .then(|| crate::protocol::endpoint::HostPort::from_ip([10, 0, 0, 1].into(), 9092)),
            ..AgentAttributes::default()
        },
    }
}
