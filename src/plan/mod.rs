//! Planning: a pure function of (desired specs, observed live state, now) → ordered
//! actions, each with a reason, and their rendering as text or JSON.
//!
//! Must not: do I/O or read the clock. Everything it needs is an argument, so a plan is
//! deterministic and testable.

mod body;
mod desired;
mod live;
mod planner;
pub mod prune;
pub mod ready;
mod render_text;
pub mod simulate;
pub mod site;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use body::{ResolvedIds, ServiceBody};
pub use desired::{
    forces_replacement, is_sensitive, replacement_fields, spec_fields, DesiredCluster,
    DesiredState, REPLACEMENT_FIELDS, SENSITIVE_FIELDS,
};
pub use live::{
    current_service, AgentAttributes, AppliedSpec, LcmState, LiveRole, LiveService, LiveState,
    LiveVm, NodeFailure, ObservationWarning, Outage, Owner, RoleState, ServiceState, Silence,
    VmState, SUPERLINK_ROLE, SUPERNODE_ROLE,
};
pub use planner::{
    heartbeat_outage, next_deadline, node_failure, plan, plan_cluster, replacement_failure,
    ReplacementRule,
};
pub use prune::{prune_gate, PruneGate, PrunePolicy};
pub use ready::{
    cluster_readiness, readiness, service_readiness, superlink_serving, supernode_ready,
    supernode_target, Readiness, ReadyReason,
};
pub use render_text::{render_json, render_text, PlanJson, TextOptions, FORMAT_VERSION};

/// An ordered list of actions and what the planner noticed on the way.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Actions in execution order: by cluster name, then by kind within a cluster.
    pub actions: Vec<Action>,
    /// Things a human should know that need no action from the controller.
    pub warnings: Vec<PlanWarning>,
    /// How the controller treats a cluster, where it is not obvious from the actions
    /// (an elastic role's count left to OneFlow). Text output only; never a change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<PlanWarning>,
    /// Digest of the observation the plan was computed from.
    pub observation_digest: String,
}

impl Plan {
    /// Whether applying the plan now changes OpenNebula (waits and deferred actions do not).
    pub fn has_changes(&self) -> bool {
        self.actions.iter().any(Action::is_executable)
    }

    /// Whether desired and live differ: a change to make now or one deferred. `plan
    /// --detailed-exitcode` exits 2 exactly then; "No changes" is printed only when not.
    pub fn has_pending_changes(&self) -> bool {
        self.actions
            .iter()
            .any(|a| a.kind.is_change() || a.deferred.is_some())
    }

    /// The actions of one cluster, in order.
    pub fn for_cluster<'a>(&'a self, cluster: &'a str) -> impl Iterator<Item = &'a Action> + 'a {
        self.actions.iter().filter(move |a| a.cluster == cluster)
    }

    /// Counts for the closing summary line.
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for a in &self.actions {
            if a.deferred.is_some() {
                s.deferred += 1;
                continue;
            }
            match a.kind.category() {
                Some(Category::Create) => s.create += 1,
                Some(Category::Change) => s.change += 1,
                Some(Category::Replace) => s.replace += 1,
                Some(Category::Destroy) => s.destroy += 1,
                None => {}
            }
        }
        s
    }
}

/// `Plan: N to create, N to change, N to replace, N to destroy.`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Services to create.
    pub create: usize,
    /// In-place changes (template update, scale, certificate rotation).
    pub change: usize,
    /// Replacements (redeploy steps, node replacements).
    pub replace: usize,
    /// Services to delete.
    pub destroy: usize,
    /// Changes that are due but must wait (counted here only, not above).
    #[serde(default)]
    pub deferred: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Plan: {} to create, {} to change, {} to replace, {} to destroy",
            self.create, self.change, self.replace, self.destroy
        )?;
        match self.deferred {
            0 => write!(f, "."),
            n => write!(f, "; {n} deferred."),
        }
    }
}

/// Something the planner reports without acting on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanWarning {
    /// Cluster concerned.
    pub cluster: String,
    /// What a human should know.
    pub message: String,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Action {
    /// Cluster the action belongs to.
    pub cluster: String,
    /// What to do.
    pub kind: ActionKind,
    /// Why, in one sentence.
    pub reason: String,
    /// Field-level changes behind the action (secrets shown as `(sensitive value)`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diff: Vec<FieldChange>,
    /// Set when the change is due but must wait (the service is deploying, a safety hold,
    /// …): it is shown in the plan and counted as pending, never executed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred: Option<Deferral>,
}

impl Action {
    /// One line for logs and status: `create cluster "a" (reason)`.
    pub fn one_line(&self) -> String {
        match &self.deferred {
            None => format!("{} {}: {}", self.kind.verb(), self.cluster, self.reason),
            Some(d) => format!(
                "{} {}: {} (deferred: {})",
                self.kind.verb(),
                self.cluster,
                self.reason,
                d.reason
            ),
        }
    }

    /// Whether executing the action changes OpenNebula now: a change that is not deferred.
    pub fn is_executable(&self) -> bool {
        self.kind.is_change() && self.deferred.is_none()
    }

    /// What the action waits for: a wait's `until`, a deferred change's.
    pub fn waits_for(&self) -> Option<WaitFor> {
        match (&self.kind, &self.deferred) {
            (ActionKind::Wait { until }, _) => Some(*until),
            (_, Some(d)) => Some(d.until),
            _ => None,
        }
    }
}

/// Why a due change is not made now. One concept for every hold: OpenNebula still busy
/// (deploying, scaling, cooldown, an undeploy, a replacement not ready) and the safety
/// holds (a stale observation, a heartbeat-channel outage, the replacement budget).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deferral {
    /// What it waits for.
    pub until: WaitFor,
    /// Why, in a few words: `the service is deploying (service 3)`.
    pub reason: String,
}

/// One changed field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// `spec.supernodes.count`-style path.
    pub path: String,
    /// Live value (`None`: not set / not known).
    pub before: Option<String>,
    /// Desired value (`None`: removed).
    pub after: Option<String>,
    /// This change is why the cluster is redeployed.
    pub forces_replacement: bool,
    /// The value is secret; `before`/`after` hold hashes, never material.
    pub sensitive: bool,
}

/// A OneFlow role of a Flower cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The SuperLink role.
    Superlink,
    /// The SuperNode role.
    Supernode,
}

impl Role {
    /// OneFlow role name.
    pub fn oneflow_name(self) -> &'static str {
        match self {
            Role::Superlink => SUPERLINK_ROLE,
            Role::Supernode => SUPERNODE_ROLE,
        }
    }
}

/// The redeploy state machine, recomputed from the live services on every plan: the new
/// service is identified by carrying the desired replacement fields, the old one by not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum RedeployStep {
    /// Instantiate a new service beside the old one.
    Instantiate {
        /// The service being replaced.
        old_service_id: u64,
        /// The service-template body to send (set once planning resolved the ids).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<ServiceBody>,
    },
    /// A replacement that never became ready is undeployed before another one is
    /// created: at most one replacement is in flight.
    AbandonUnready {
        /// The unready replacement.
        service_id: u64,
    },
    /// The new service is ready: undeploy the old one.
    UndeployOld {
        /// The service being removed.
        old_service_id: u64,
        /// Its ready replacement.
        new_service_id: u64,
    },
}

/// What an action does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ActionKind {
    /// Create (or update) the service template and instantiate it.
    Create {
        /// The service-template body to send (set once planning resolved the ids).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<ServiceBody>,
    },
    /// Apply in-place changes to the running service (`PUT /service/:id`): its roles get
    /// the new contents for VMs created from then on, and the applied spec is recorded.
    UpdateTemplate {
        /// The running service.
        service_id: u64,
        /// The rendered body whose mutable parts go into the live one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<ServiceBody>,
    },
    /// Change a role's cardinality through OneFlow.
    Scale {
        /// Service.
        service_id: u64,
        /// Role.
        role: Role,
        /// Current cardinality.
        from: u32,
        /// Desired cardinality.
        to: u32,
    },
    /// Replace the service for a change OneFlow cannot apply in place.
    Redeploy(RedeployStep),
    /// Ask the SuperLink to rotate its serving certificate.
    RotateCertificate {
        /// Service.
        service_id: u64,
        /// SuperLink VM.
        vm_id: u64,
        /// Generation to write to `FL_ROTATE_REQUEST`.
        generation: u64,
        /// Validity of the new certificate (`FL_ROTATE_VALIDITY`), from `spec.tls.validity`.
        #[serde(default)]
        validity: Option<crate::api::HumanDuration>,
    },
    /// Write the other sites' SuperNode keys, signed, onto the SuperLink VM
    /// (`FL_SITE_NODE_KEYS` and `FL_SITE_NODE_KEYS_SIG`). The keys themselves come from the
    /// desired state at apply time; the plan carries only their fingerprints.
    SetSiteNodeKeys {
        /// Service.
        service_id: u64,
        /// SuperLink VM.
        vm_id: u64,
        /// Fingerprints ([`crate::protocol::node_key::NodePublicKey::fingerprint`]) of the
        /// keys to write, in the set's order; apply refuses when the desired keys differ.
        fingerprints: Vec<String>,
    },
    /// Terminate a failed SuperNode VM; a later plan scales the role back to `count`.
    ReplaceNode {
        /// Service.
        service_id: u64,
        /// The failed VM.
        vm_id: u64,
        /// Why it counts as failed.
        failure: NodeFailure,
    },
    /// Undeploy a service whose spec is gone (`deletionPolicy: Delete` only).
    Delete {
        /// Service.
        service_id: u64,
    },
    /// Nothing to do until OpenNebula or an agent progresses.
    Wait {
        /// What is awaited.
        until: WaitFor,
    },
}

/// What a [`ActionKind::Wait`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitFor {
    /// The service is deploying.
    Deploying,
    /// The service is scaling.
    Scaling,
    /// OneFlow's cooldown after scaling.
    Cooldown,
    /// OneFlow reports the service in WARNING (a VM failed): it scales nothing until
    /// RUNNING again.
    Warning,
    /// The service is being undeployed.
    Undeploying,
    /// The SuperLink has not finished the requested rotation.
    Rotation,
    /// The new service of a redeploy is not ready yet.
    RedeployReady,
    /// Replaced nodes are being terminated before the role is scaled back.
    Replacement,
    /// OneFlow reports a failure only a human (or `oneflow recover`) can clear.
    Failed,
    /// Most heartbeats are stale together (the heartbeat channel, OneGate, is down):
    /// nothing is replaced for a stale heartbeat.
    HeartbeatOutage,
    /// SuperNodes with stale heartbeats are online in the SuperLink's own state
    /// (`FL_NODES_ONLINE`): only their heartbeat channel is broken; they are not replaced.
    FlowerSeesOnline,
    /// The observation is older than the controller's bound: destructive and
    /// clock-driven actions wait for a fresh one.
    FreshObservation,
}

impl WaitFor {
    /// The `reason` label of `flower_reconcile_safety_holds_total` when this wait holds
    /// back a destructive action for safety.
    pub fn safety_hold(self) -> Option<&'static str> {
        match self {
            WaitFor::HeartbeatOutage => Some("heartbeat_outage"),
            WaitFor::FreshObservation => Some("stale_view"),
            WaitFor::FlowerSeesOnline => Some("flower_sees_online"),
            _ => None,
        }
    }

    /// Suggested time before looking again.
    pub fn requeue_secs(self) -> u64 {
        match self {
            WaitFor::Deploying | WaitFor::Scaling | WaitFor::Undeploying => 10,
            WaitFor::Rotation | WaitFor::RedeployReady | WaitFor::Replacement => 10,
            WaitFor::HeartbeatOutage | WaitFor::FreshObservation => 10,
            WaitFor::FlowerSeesOnline => 10,
            WaitFor::Cooldown | WaitFor::Warning => 30,
            WaitFor::Failed => 300,
        }
    }
}

/// Summary category of an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// `+`
    Create,
    /// `~`
    Change,
    /// `-/+`
    Replace,
    /// `-`
    Destroy,
}

impl ActionKind {
    /// Whether the action changes OpenNebula.
    pub fn is_change(&self) -> bool {
        !matches!(self, ActionKind::Wait { .. })
    }

    /// The slot of the service body the action sends (create, redeploy, in-place update).
    pub fn body_slot(&mut self) -> Option<&mut Option<ServiceBody>> {
        match self {
            ActionKind::Create { body }
            | ActionKind::UpdateTemplate { body, .. }
            | ActionKind::Redeploy(RedeployStep::Instantiate { body, .. }) => Some(body),
            _ => None,
        }
    }

    /// The service body the action carries, once planning rendered it.
    pub fn body(&self) -> Option<&ServiceBody> {
        match self {
            ActionKind::Create { body }
            | ActionKind::UpdateTemplate { body, .. }
            | ActionKind::Redeploy(RedeployStep::Instantiate { body, .. }) => body.as_ref(),
            _ => None,
        }
    }

    /// Summary category (`None` for waits).
    pub fn category(&self) -> Option<Category> {
        Some(match self {
            ActionKind::Create { .. } => Category::Create,
            ActionKind::UpdateTemplate { .. }
            | ActionKind::Scale { .. }
            | ActionKind::RotateCertificate { .. }
            | ActionKind::SetSiteNodeKeys { .. } => Category::Change,
            ActionKind::Redeploy(_) | ActionKind::ReplaceNode { .. } => Category::Replace,
            ActionKind::Delete { .. } => Category::Destroy,
            ActionKind::Wait { .. } => return None,
        })
    }

    /// Terraform-like symbol.
    pub fn symbol(&self) -> &'static str {
        match self.category() {
            Some(Category::Create) => "+",
            Some(Category::Change) => "~",
            Some(Category::Replace) => "-/+",
            Some(Category::Destroy) => "-",
            None => "…",
        }
    }

    /// Stable snake_case name (the JSON `type`).
    pub fn verb(&self) -> &'static str {
        match self {
            ActionKind::Create { .. } => "create",
            ActionKind::UpdateTemplate { .. } => "update_template",
            ActionKind::Scale { .. } => "scale",
            ActionKind::Redeploy(RedeployStep::Instantiate { .. }) => "redeploy",
            ActionKind::Redeploy(RedeployStep::UndeployOld { .. }) => "redeploy_undeploy_old",
            ActionKind::Redeploy(RedeployStep::AbandonUnready { .. }) => "redeploy_abandon_unready",
            ActionKind::RotateCertificate { .. } => "rotate_certificate",
            ActionKind::SetSiteNodeKeys { .. } => "set_site_node_keys",
            ActionKind::ReplaceNode { .. } => "replace_node",
            ActionKind::Delete { .. } => "delete",
            ActionKind::Wait { .. } => "wait",
        }
    }

    /// Whether the action destroys a service or a VM.
    pub fn is_destructive(&self) -> bool {
        matches!(
            self,
            ActionKind::Delete { .. }
                | ActionKind::ReplaceNode { .. }
                | ActionKind::Redeploy(RedeployStep::UndeployOld { .. })
                | ActionKind::Redeploy(RedeployStep::AbandonUnready { .. })
        )
    }

    /// Whether the action may only be taken on a fresh observation: it destroys
    /// something (including a scale-down), or the clock decided it (a rotation deadline).
    pub fn needs_fresh_view(&self) -> bool {
        self.is_destructive()
            || matches!(self, ActionKind::RotateCertificate { .. })
            || matches!(self, ActionKind::Scale { from, to, .. } if to < from)
    }
}

impl Plan {
    /// Defer every action that [`ActionKind::needs_fresh_view`] when the observation the
    /// plan was computed from is older than `max_age` (`age`: wall clock minus
    /// [`LiveState::observed_at`]): they stay in the plan, shown with the reason, and are
    /// never executed. When only part of an observation fails (e.g. the VM pool listing),
    /// the controller keeps the last complete one; planning on it must never destroy.
    /// Shown by `plan::tests::a_stale_view_withholds_destructive_and_clock_driven_actions`.
    pub fn withhold_on_stale_view(&mut self, age: chrono::Duration, max_age: chrono::Duration) {
        if age <= max_age {
            return;
        }
        for a in &mut self.actions {
            if a.kind.needs_fresh_view() && a.deferred.is_none() {
                a.deferred = Some(Deferral {
                    until: WaitFor::FreshObservation,
                    reason: format!(
                        "the last observation is {}s old (bound {}s): destructive and \
                         clock-driven actions wait for a fresh one",
                        age.num_seconds(),
                        max_age.num_seconds()
                    ),
                });
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
