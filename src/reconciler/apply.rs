//! Apply: execute one cluster's planned actions through the backend.
//!
//! Guarantees:
//! - Every mutation is safe to repeat after a crash. A create first re-lists services and
//!   creates nothing when one carrying this controller's marker for the cluster (and the
//!   desired replacement fields) exists; the marker is part of the body sent at creation,
//!   so a create that reached OneFlow is always findable.
//! - A mutation whose outcome is unknown (timeout) is never retried here: the error says
//!   so ([`ApplyError::is_ambiguous`]) and the caller re-observes before planning again.
//! - `Delete` is refused for a cluster whose spec exists or is held, whatever the plan says.
//! - A deferred action ([`crate::plan::Deferral`]) is never executed: it reports why it
//!   waits and calls nothing (`reconciler::scenarios::deferred_actions_are_never_executed`).
//! - A SuperNode is terminated only if, re-read right before (`GET /service/:id`,
//!   `one.vm.info`), it is still in the SuperNode node list of this controller's service
//!   for the cluster and still failed by the planner's own rule ([`node_failure`]); see
//!   `Applier::still_failed`.
//!
//! Assumptions: actions come from a plan computed on a recent observation.
//! Caveats: `UpdateTemplate` updates the live service in place (`PUT /service/:id`):
//! OneFlow stores the new role contents (CPU, memory, context, bounds) and uses them for
//! VMs it creates from then on; running VMs keep theirs. Keys OneFlow refuses to change
//! on a running service (`deployment`, `ready_status_gate`, networks, inputs, a role's
//! template, parents and cardinality) keep their live values. When a role's new
//! `min_vms`/`max_vms` exclude its live cardinality, the bounds are widened to it and
//! the old applied-spec record is kept, so the next reconcile (after the scale) applies
//! the exact bounds.

use std::collections::BTreeMap;

use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::Instrument;

use super::context::Context;
use super::observe::{live_vm, owned_marker, role_has_node};
use super::render_glue::ResolvedIds;
use crate::api::ObjectRef;
use crate::one::backend::{BackendError, BackendErrorKind, Document};
use crate::plan::{
    node_failure, replacement_fields, spec_fields, Action, ActionKind, AppliedSpec, DesiredCluster,
    DesiredState, LiveState, RedeployStep, ServiceState, SUPERNODE_ROLE,
};
use crate::protocol::signing::SigningSeed;
use crate::render::ownership;

/// Why applying stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// An OpenNebula call failed.
    #[error("{action} of cluster {cluster}: {error}")]
    Backend {
        /// Cluster.
        cluster: String,
        /// Action verb.
        action: &'static str,
        /// The failure (shown in the message, not chained: `{:#}` would print it twice).
        error: BackendError,
    },
    /// A template or network reference does not resolve.
    #[error("cluster {cluster}: {message}")]
    Resolve {
        /// Cluster.
        cluster: String,
        /// What is missing or ambiguous.
        message: String,
    },
    /// The spec could not be rendered into a service template.
    #[error("cluster {cluster}: cannot render the service template: {message}")]
    Render {
        /// Cluster.
        cluster: String,
        /// Why.
        message: String,
    },
    /// A safety check refused the action.
    #[error("cluster {cluster}: refused: {message}")]
    Refused {
        /// Cluster.
        cluster: String,
        /// Why.
        message: String,
    },
}

impl ApplyError {
    /// The last mutation may or may not have happened: re-observe before anything else.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, ApplyError::Backend { error, .. } if error.kind == BackendErrorKind::Ambiguous)
    }
}

/// Executes actions; caches name → id resolution for one reconcile. Names resolve among
/// the controller user's own templates and networks (pool filter -3), or among those of
/// `--resource-owner`: another user's object of the same name neither blocks nor
/// hijacks a reference (`tests/safety_ownership.rs`,
/// `a_foreign_template_with_our_name_neither_blocks_nor_hijacks`). Numeric ids are
/// checked to exist (`one.template.info` / `one.vn.info`).
pub struct Applier<'a> {
    ctx: &'a Context,
    desired: &'a DesiredState,
    vm_templates: Option<Vec<(u64, String)>>,
    networks: Option<Vec<(u64, String)>>,
    /// The observation the actions were planned on, when there is one.
    view: Option<&'a LiveState>,
}

/// What applying one action did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// One line for status and logs.
    pub summary: String,
    /// Whether OpenNebula was changed (false for waits and already-done creates).
    pub mutated: bool,
}

impl<'a> Applier<'a> {
    /// An applier for one reconcile.
    pub fn new(ctx: &'a Context, desired: &'a DesiredState) -> Self {
        Self {
            ctx,
            desired,
            vm_templates: None,
            networks: None,
            view: None,
        }
    }

    /// Re-checks use what `live` (the plan's observation) knows: the newest heartbeats
    /// seen and the last outage.
    pub fn with_view(mut self, live: &'a LiveState) -> Self {
        self.view = Some(live);
        self
    }

    /// Apply `actions` in order, stopping at the first error.
    pub async fn apply_all(&mut self, actions: &[Action]) -> Result<Vec<Applied>, ApplyError> {
        let mut done = Vec::with_capacity(actions.len());
        for a in actions {
            done.push(self.apply(a).await?);
        }
        Ok(done)
    }

    /// Apply one action inside a span recording cluster, action and outcome.
    pub async fn apply(&mut self, action: &Action) -> Result<Applied, ApplyError> {
        let span = tracing::info_span!(
            "apply",
            cluster = %action.cluster,
            action = action.kind.verb(),
            outcome = tracing::field::Empty
        );
        let result = self.apply_inner(action).instrument(span.clone()).await;
        let outcome = match &result {
            Ok(a) if a.mutated => "applied",
            Ok(_) => "noop",
            Err(e) if e.is_ambiguous() => "ambiguous",
            Err(_) => "error",
        };
        span.record("outcome", outcome);
        match &result {
            Ok(a) => {
                tracing::info!(parent: &span, cluster = %action.cluster, outcome, "{}", a.summary)
            }
            Err(e) => {
                tracing::warn!(parent: &span, cluster = %action.cluster, outcome, error = %e, "action failed")
            }
        }
        result
    }

    async fn apply_inner(&mut self, action: &Action) -> Result<Applied, ApplyError> {
        let cluster = action.cluster.as_str();
        let verb = action.kind.verb();
        let be = |source| ApplyError::Backend {
            cluster: cluster.to_string(),
            action: verb,
            error: source,
        };
        if let Some(d) = &action.deferred {
            return Ok(Applied {
                summary: format!("deferred {verb}: {}", d.reason),
                mutated: false,
            });
        }
        let backend = self.ctx.backend.clone();
        let changed = |summary: String| Applied {
            summary,
            mutated: true,
        };
        match &action.kind {
            ActionKind::Create | ActionKind::Redeploy(RedeployStep::Instantiate { .. }) => {
                self.instantiate(cluster, verb).await
            }
            ActionKind::UpdateTemplate { service_id, .. } => {
                let d = self.desired_cluster(cluster)?;
                let current = backend.get_service(*service_id).await.map_err(be)?;
                if !self.is_ours(&current, cluster) {
                    return Err(ApplyError::Refused {
                        cluster: cluster.into(),
                        message: format!("service {service_id} is not owned by this controller's user with its marker for the cluster"),
                    });
                }
                // Keep the cluster's key: the running SuperLink booted with its public half.
                let seed = match ownership::signing_seed_of(&current.body) {
                    Some(seed) => seed,
                    None => new_seed(cluster)?,
                };
                let rendered = self.body_for(d, &seed).await?;
                let update = service_update_body(&current.body, &rendered).map_err(|message| {
                    ApplyError::Refused {
                        cluster: cluster.into(),
                        message,
                    }
                })?;
                backend
                    .update_service(*service_id, update.body)
                    .await
                    .map_err(be)?;
                Ok(changed(if update.widened {
                    format!("updated service {service_id} in place (role bounds widened to the live cardinality until it is scaled)")
                } else {
                    format!(
                        "updated service {service_id} in place (new VMs get the new role contents)"
                    )
                }))
            }
            ActionKind::Scale {
                service_id,
                role,
                from,
                to,
            } => {
                backend
                    .scale(*service_id, role.oneflow_name(), *to)
                    .await
                    .map_err(be)?;
                Ok(changed(format!(
                    "scaled role {} of service {service_id}: {from} → {to}",
                    role.oneflow_name()
                )))
            }
            ActionKind::RotateCertificate {
                service_id,
                vm_id,
                generation,
                validity,
            } => {
                // Sign the request: any VM of the service can write FL_ROTATE_REQUEST
                // through OneGate, and the SuperLink acts only on what this key signed.
                let current = backend.get_service(*service_id).await.map_err(be)?;
                let seed = ownership::signing_seed_of(&current.body)
                    .filter(|_| self.is_ours(&current, cluster))
                    .ok_or_else(|| ApplyError::Refused {
                        cluster: cluster.into(),
                        message: format!(
                            "service {service_id} is not ours or has no signing key (it predates \
                             signed rotation requests; its SuperLink renews its certificate \
                             itself within renewBefore, or redeploy it)"
                        ),
                    })?;
                let validity = validity.as_ref().map(ToString::to_string);
                let sig = seed.sign_rotation(*vm_id, *generation, validity.as_deref());
                let mut line = format!("{}=\"{generation}\"", crate::protocol::FL_ROTATE_REQUEST);
                if let Some(v) = &validity {
                    line.push_str(&format!(
                        "\n{}=\"{v}\"",
                        crate::protocol::FL_ROTATE_VALIDITY
                    ));
                }
                line.push_str(&format!("\n{}=\"{sig}\"", crate::protocol::FL_ROTATE_SIG));
                backend.vm_update_merge(*vm_id, line).await.map_err(be)?;
                Ok(changed(format!(
                    "requested certificate rotation {generation} on SuperLink VM {vm_id}"
                )))
            }
            ActionKind::ReplaceNode {
                service_id,
                vm_id,
                failure,
            } => {
                if let Some(why) = self.still_failed(cluster, *service_id, *vm_id).await? {
                    return Ok(Applied {
                        summary: format!("SuperNode VM {vm_id} not terminated: {why}"),
                        mutated: false,
                    });
                }
                backend.vm_terminate_hard(*vm_id).await.map_err(be)?;
                Ok(changed(format!(
                    "terminated SuperNode VM {vm_id} ({failure})"
                )))
            }
            ActionKind::Delete { service_id } => {
                if self.desired.clusters.contains_key(cluster)
                    || self.desired.held.contains(cluster)
                {
                    return Err(ApplyError::Refused {
                        cluster: cluster.into(),
                        message: "its spec exists or is held; a service is never deleted then"
                            .into(),
                    });
                }
                backend.delete_service(*service_id).await.map_err(be)?;
                Ok(changed(format!("undeploying service {service_id}")))
            }
            ActionKind::Redeploy(RedeployStep::AbandonUnready { service_id }) => {
                let current = backend.get_service(*service_id).await.map_err(be)?;
                if !self.is_ours(&current, cluster) {
                    return Err(ApplyError::Refused {
                        cluster: cluster.into(),
                        message: format!("service {service_id} does not carry this controller's marker for the cluster"),
                    });
                }
                backend.delete_service(*service_id).await.map_err(be)?;
                Ok(changed(format!(
                    "undeploying service {service_id}, a replacement that never became ready"
                )))
            }
            ActionKind::Redeploy(RedeployStep::UndeployOld {
                old_service_id,
                new_service_id,
            }) => {
                backend.delete_service(*old_service_id).await.map_err(be)?;
                Ok(changed(format!(
                    "undeploying service {old_service_id}, replaced by service {new_service_id}"
                )))
            }
            ActionKind::Wait { .. } => Ok(Applied {
                summary: format!("waiting: {}", action.reason),
                mutated: false,
            }),
        }
    }

    /// The re-check right before a terminate: re-read the service (`GET /service/:id`) and
    /// the VM (`one.vm.info`). `None` when the VM, owned by the controller's user, is still
    /// a node of this controller's service for `cluster` in OneFlow's own SuperNode node
    /// list, and still failed by
    /// [`node_failure`] — the planner's rule, evaluated at the time of the re-read, with the
    /// newest heartbeat seen (the plan's view or the re-read, whichever is later), the spec's
    /// grace period and the last outage. Otherwise why the terminate is skipped.
    /// Shown by `tests/safety_liveness.rs::a_failed_vmpool_listing_never_terminates_a_heartbeating_node`.
    async fn still_failed(
        &self,
        cluster: &str,
        service_id: u64,
        vm_id: u64,
    ) -> Result<Option<String>, ApplyError> {
        let be = |source| ApplyError::Backend {
            cluster: cluster.to_string(),
            action: "replace_node",
            error: source,
        };
        let d = self.desired_cluster(cluster)?;
        let service = self.ctx.backend.get_service(service_id).await.map_err(be)?;
        if !self.is_ours(&service, cluster) {
            return Ok(Some(format!(
                "service {service_id} does not carry this controller's marker for the cluster"
            )));
        }
        if !role_has_node(&service.body, SUPERNODE_ROLE, vm_id) {
            return Ok(Some(format!(
                "no longer a node of the supernode role of service {service_id}"
            )));
        }
        // Never earlier than the plan's view (the same instant in tests that move it ahead).
        let read_at = self
            .view
            .map_or(Utc::now(), |l| l.observed_at.max(Utc::now()));
        let record = self.ctx.backend.vm_info(vm_id).await.map_err(be)?;
        if record.uid != self.ctx.identity.uid {
            return Ok(Some(
                "the VM is not owned by the controller's user".to_string(),
            ));
        }
        let mut vm = live_vm(&record, &mut Vec::new());
        let seen = self
            .view
            .and_then(|l| l.vm(vm_id))
            .map(|v| v.attrs.heartbeat);
        vm.attrs.heartbeat = vm.attrs.heartbeat.max(seen.flatten());
        let grace = d
            .cluster
            .spec
            .supernodes
            .failure_policy
            .grace_period
            .as_chrono();
        let outage = self.view.and_then(|l| l.last_outage);
        Ok(match node_failure(&vm, read_at, grace, outage) {
            Some(_) => None,
            None => Some("it is healthy when read again".to_string()),
        })
    }

    fn desired_cluster(&self, cluster: &str) -> Result<&'a DesiredCluster, ApplyError> {
        self.desired
            .clusters
            .get(cluster)
            .ok_or_else(|| ApplyError::Refused {
                cluster: cluster.into(),
                message: "no spec for this cluster".into(),
            })
    }

    /// Create (or redeploy) findably: re-list, reuse, then instantiate once.
    async fn instantiate(
        &mut self,
        cluster: &str,
        verb: &'static str,
    ) -> Result<Applied, ApplyError> {
        let d = self.desired_cluster(cluster)?;
        let be = |source| ApplyError::Backend {
            cluster: cluster.to_string(),
            action: verb,
            error: source,
        };
        let services = self.ctx.backend.list_services().await.map_err(be)?;
        let wanted = spec_fields(&d.cluster);
        if let Some(existing) = self.find_current(&services, cluster, &wanted) {
            return Ok(Applied {
                summary: format!(
                    "service {existing} already exists for this spec; not creating another"
                ),
                mutated: false,
            });
        }
        let templates = self
            .ctx
            .backend
            .list_service_templates()
            .await
            .map_err(be)?;
        let existing = templates
            .iter()
            .filter(|t| self.is_ours(t, cluster))
            .min_by_key(|t| t.id);
        // One key per cluster: a redeploy keeps the key of the cluster's template.
        let seed = match existing.and_then(|t| ownership::signing_seed_of(&t.body)) {
            Some(seed) => seed,
            None => new_seed(cluster)?,
        };
        let body = self.body_for(d, &seed).await?;
        let template_id = self.upsert_template(cluster, verb, existing, body).await?;
        let service_id = self
            .ctx
            .backend
            .instantiate(template_id, json!({ "name": cluster }))
            .await
            .map_err(be)?;
        Ok(Applied {
            summary: format!(
                "instantiated service {service_id} from service template {template_id}"
            ),
            mutated: true,
        })
    }

    /// A live service of ours for `cluster` that already carries the desired replacement fields.
    fn find_current(
        &self,
        services: &[Document],
        cluster: &str,
        wanted: &BTreeMap<String, String>,
    ) -> Option<u64> {
        let wanted = replacement_fields(wanted);
        services
            .iter()
            .filter(|d| self.is_ours(d, cluster))
            .filter(|d| {
                let state = d.body.get("state").and_then(Value::as_i64).unwrap_or(0);
                !ServiceState::from_code(state).is_going_away()
            })
            .filter(|d| {
                d.body
                    .get(AppliedSpec::BODY_KEY)
                    .and_then(|v| AppliedSpec::deserialize(v).ok())
                    .is_none_or(|a| replacement_fields(&a.fields) == wanted)
            })
            .map(|d| d.id)
            .min()
    }

    /// Owned by the controller's user and marked by this controller for `cluster`: a
    /// marker alone is not enough, any user can write one.
    fn is_ours(&self, d: &Document, cluster: &str) -> bool {
        owned_marker(d, self.ctx.trust()).is_some_and(|o| o.cluster == cluster)
    }

    /// Update the cluster's service template (`existing`, found by marker) or create it;
    /// returns its id.
    async fn upsert_template(
        &mut self,
        cluster: &str,
        verb: &'static str,
        existing: Option<&Document>,
        body: Value,
    ) -> Result<u64, ApplyError> {
        let be = |source| ApplyError::Backend {
            cluster: cluster.to_string(),
            action: verb,
            error: source,
        };
        match existing {
            Some(t) if same_template(&t.body, &body) => Ok(t.id),
            Some(t) => {
                self.ctx
                    .backend
                    .update_service_template(t.id, body)
                    .await
                    .map_err(be)?;
                Ok(t.id)
            }
            None => self
                .ctx
                .backend
                .create_service_template(body)
                .await
                .map_err(be),
        }
    }

    /// The full service-template body: rendered spec + marker + applied-spec record.
    async fn body_for(
        &mut self,
        d: &DesiredCluster,
        seed: &SigningSeed,
    ) -> Result<Value, ApplyError> {
        let name = d.cluster.metadata.name.clone();
        let templates = &d.cluster.spec.opennebula.templates;
        let superlink = self
            .resolve_ref(Pool::VmTemplate, &name, &templates.superlink)
            .await?;
        let supernode = self
            .resolve_ref(Pool::VmTemplate, &name, &templates.supernode)
            .await?;
        let network = self
            .resolve_ref(Pool::Network, &name, &d.cluster.spec.opennebula.network)
            .await?;
        let ids = ResolvedIds {
            superlink_template: superlink,
            supernode_template: supernode,
            network,
        };
        let mut body =
            super::render_glue::render_body(self.ctx, d, &ids, seed).map_err(|message| {
                ApplyError::Render {
                    cluster: name.clone(),
                    message,
                }
            })?;
        if let Some(obj) = body.as_object_mut() {
            obj.insert(
                AppliedSpec::BODY_KEY.into(),
                serde_json::to_value(AppliedSpec {
                    format: AppliedSpec::FORMAT,
                    fields: spec_fields(&d.cluster),
                })
                .unwrap_or(Value::Null),
            );
        }
        Ok(body)
    }

    /// A spec's reference to a VM template or network: an id must exist; a name is looked
    /// up in one listing per apply (scoped to the controller's or the configured owner's
    /// objects) and must match exactly one object.
    async fn resolve_ref(
        &mut self,
        pool: Pool,
        cluster: &str,
        r: &ObjectRef,
    ) -> Result<u64, ApplyError> {
        let backend = self.ctx.backend.clone();
        if let ObjectRef::Id(id) = r {
            let lookup = match pool {
                Pool::VmTemplate => backend.vm_template_name(u64::from(*id)),
                Pool::Network => backend.network_name(u64::from(*id)),
            };
            return exists(cluster, pool.what(), *id, lookup).await;
        }
        let cache = match pool {
            Pool::VmTemplate => &mut self.vm_templates,
            Pool::Network => &mut self.networks,
        };
        if cache.is_none() {
            let scope = self.ctx.options.ownership.name_scope();
            let list = match pool {
                Pool::VmTemplate => backend.vm_templates(scope),
                Pool::Network => backend.networks(scope),
            }
            .await
            .map_err(|e| resolve_failed(cluster, e))?;
            *cache = Some(list);
        }
        resolve(cluster, pool.what(), r, cache.as_deref().unwrap_or(&[]))
    }
}

/// The OpenNebula pools a spec refers into by name or id.
#[derive(Debug, Clone, Copy)]
enum Pool {
    VmTemplate,
    Network,
}

impl Pool {
    fn what(self) -> &'static str {
        match self {
            Pool::VmTemplate => "VM template",
            Pool::Network => "virtual network",
        }
    }
}

fn resolve_failed(cluster: &str, error: BackendError) -> ApplyError {
    ApplyError::Backend {
        cluster: cluster.into(),
        action: "resolve",
        error,
    }
}

/// A numeric reference: the object must exist and be visible to the controller's user.
async fn exists(
    cluster: &str,
    what: &str,
    id: u32,
    lookup: crate::one::backend::BackendFuture<'_, String>,
) -> Result<u64, ApplyError> {
    match lookup.await {
        Ok(_) => Ok(u64::from(id)),
        Err(e) if e.kind == BackendErrorKind::NotFound => Err(ApplyError::Resolve {
            cluster: cluster.into(),
            message: format!("no {what} with id {id}"),
        }),
        Err(e) => Err(resolve_failed(cluster, e)),
    }
}

fn resolve(
    cluster: &str,
    what: &str,
    r: &ObjectRef,
    pool: &[(u64, String)],
) -> Result<u64, ApplyError> {
    match r {
        ObjectRef::Id(id) => Ok(u64::from(*id)),
        ObjectRef::Name(name) => {
            let hits: Vec<u64> = pool
                .iter()
                .filter(|(_, n)| n == name)
                .map(|(id, _)| *id)
                .collect();
            match hits.as_slice() {
                [id] => Ok(*id),
                [] => Err(ApplyError::Resolve {
                    cluster: cluster.into(),
                    message: format!("no {what} named {name:?}"),
                }),
                many => Err(ApplyError::Resolve {
                    cluster: cluster.into(),
                    message: format!(
                        "{} {what}s are named {name:?} (ids {many:?}); use an id",
                        many.len()
                    ),
                }),
            }
        }
    }
}

/// Service keys OneFlow refuses to change in `PUT /service/:id` (`Service::IMMUTABLE_ATTRS`,
/// plus the 6.x names of the inputs).
const SERVICE_IMMUTABLE: &[&str] = &[
    "name",
    "deployment",
    "ready_status_gate",
    "networks",
    "networks_values",
    "user_inputs",
    "user_inputs_values",
    "custom_attrs",
    "custom_attrs_values",
    "state",
    "start_time",
    "log",
];

/// Role keys OneFlow refuses to change (`Role::IMMUTABLE_ATTRS`, 6.x `vm_template`), or
/// keeps as its own bookkeeping.
const ROLE_KEPT: &[&str] = &[
    "name",
    "cardinality",
    "last_vmname",
    "nodes",
    "parents",
    "state",
    "template_id",
    "vm_template",
    "type",
    "scale_way",
    "on_hold",
];

/// Role keys the renderer owns: dropped when the new rendering no longer has them.
const ROLE_RENDERED: &[&str] = &[
    "min_vms",
    "max_vms",
    "cooldown",
    "shutdown_action",
    "elasticity_policies",
    "scheduled_policies",
    "template_contents",
    "vm_template_contents",
    "user_inputs",
    "user_inputs_values",
];

/// The body of a `PUT /service/:id` and whether role bounds had to be widened.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceUpdate {
    /// The full service body to send.
    pub body: Value,
    /// A role's new bounds excluded its live cardinality (the old record is kept).
    pub widened: bool,
}

/// The live service body with the rendered (mutable) parts put in: top-level keys except
/// the immutable ones, and per role (matched by name) the rendered keys except the kept
/// ones. Pure. Fails when the roles differ (a change OneFlow cannot make in place).
pub fn service_update_body(current: &Value, rendered: &Value) -> Result<ServiceUpdate, String> {
    let (Some(cur), Some(new)) = (current.as_object(), rendered.as_object()) else {
        return Err("service or rendered body is not a JSON object".into());
    };
    let mut body = cur.clone();
    for (k, v) in new {
        if k != "roles" && !SERVICE_IMMUTABLE.contains(&k.as_str()) {
            body.insert(k.clone(), v.clone());
        }
    }
    let role_name = |r: &Value| r.get("name").and_then(Value::as_str).map(str::to_string);
    let empty = Vec::new();
    let cur_roles = cur.get("roles").and_then(Value::as_array).unwrap_or(&empty);
    let new_roles = new.get("roles").and_then(Value::as_array).unwrap_or(&empty);
    let mut names: Vec<Option<String>> = cur_roles.iter().map(role_name).collect();
    let mut wanted: Vec<Option<String>> = new_roles.iter().map(role_name).collect();
    names.sort();
    wanted.sort();
    if names != wanted {
        return Err(format!(
            "the live roles {names:?} differ from the rendered roles {wanted:?}; OneFlow cannot change roles in place"
        ));
    }
    let mut widened = false;
    let mut roles = Vec::with_capacity(cur_roles.len());
    for live in cur_roles {
        let name = role_name(live);
        let Some(r) = new_roles.iter().find(|r| role_name(r) == name) else {
            continue;
        };
        let mut role = live.as_object().cloned().unwrap_or_default();
        for k in ROLE_RENDERED {
            if r.get(k).is_none() {
                role.remove(*k);
            }
        }
        for (k, v) in r.as_object().into_iter().flatten() {
            if !ROLE_KEPT.contains(&k.as_str()) {
                role.insert(k.clone(), v.clone());
            }
        }
        widened |= widen_bounds(&mut role);
        roles.push(Value::Object(role));
    }
    body.insert("roles".into(), Value::Array(roles));
    if widened {
        match cur.get(AppliedSpec::BODY_KEY) {
            Some(old) => body.insert(AppliedSpec::BODY_KEY.into(), old.clone()),
            None => body.remove(AppliedSpec::BODY_KEY),
        };
    }
    Ok(ServiceUpdate {
        body: Value::Object(body),
        widened,
    })
}

/// OneFlow validates `min_vms ≤ cardinality ≤ max_vms`; the live cardinality is
/// immutable here, so bounds that exclude it are widened to it. True when widened.
fn widen_bounds(role: &mut serde_json::Map<String, Value>) -> bool {
    let num = |v: Option<&Value>| match v? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    let Some(card) = num(role.get("cardinality")) else {
        return false;
    };
    let mut widened = false;
    if num(role.get("min_vms")).is_some_and(|m| m > card) {
        role.insert("min_vms".into(), json!(card));
        widened = true;
    }
    if num(role.get("max_vms")).is_some_and(|m| m < card) {
        role.insert("max_vms".into(), json!(card));
        widened = true;
    }
    widened
}

/// A fresh signing key for `cluster`.
fn new_seed(cluster: &str) -> Result<SigningSeed, ApplyError> {
    SigningSeed::generate().map_err(|message| ApplyError::Render {
        cluster: cluster.into(),
        message,
    })
}

/// OneFlow adds `registration_time` to templates; compare without it.
fn same_template(live: &Value, wanted: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("registration_time");
        }
        v
    };
    strip(live) == strip(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> Value {
        json!({
            "name": "alpha", "deployment": "straight", "ready_status_gate": true,
            "state": 2, "start_time": 1700000000, "log": [{"message": "RUNNING"}],
            "flower_reconcile": {"cluster": "alpha", "spec_hash": "old", "controller": "c", "format": 1},
            AppliedSpec::BODY_KEY: {"format": 1, "fields": {"spec.supernodes.memory": "1024"}},
            "roles": [
                {"name": "superlink", "type": "vm", "template_id": 3, "cardinality": 1,
                 "state": 2, "nodes": [{"deploy_id": 7}], "last_vmname": 1,
                 "min_vms": 1, "max_vms": 1, "template_contents": {"MEMORY": "1024"}},
                {"name": "supernode", "type": "vm", "template_id": 4, "cardinality": 3,
                 "state": 2, "nodes": [{"deploy_id": 8}, {"deploy_id": 9}, {"deploy_id": 10}],
                 "last_vmname": 3, "parents": ["superlink"], "cooldown": 300,
                 "min_vms": 1, "max_vms": 4, "template_contents": {"MEMORY": "1024"}}
            ]
        })
    }

    fn rendered(min: u64, max: u64) -> Value {
        json!({
            "name": "alpha", "deployment": "none", "ready_status_gate": false,
            "flower_reconcile": {"cluster": "alpha", "spec_hash": "new", "controller": "c", "format": 1},
            AppliedSpec::BODY_KEY: {"format": 1, "fields": {"spec.supernodes.memory": "2048"}},
            "roles": [
                {"name": "superlink", "type": "vm", "template_id": 3, "cardinality": 1,
                 "min_vms": 1, "max_vms": 1, "template_contents": {"MEMORY": "2048"}},
                {"name": "supernode", "type": "vm", "template_id": 4, "cardinality": 2,
                 "parents": ["superlink"], "min_vms": min, "max_vms": max,
                 "template_contents": {"MEMORY": "2048"}}
            ]
        })
    }

    #[test]
    fn update_keeps_immutable_keys_and_takes_the_rendered_role_contents() {
        let cur = live();
        let up = service_update_body(&cur, &rendered(1, 8)).unwrap();
        assert!(!up.widened);
        let b = &up.body;
        for k in SERVICE_IMMUTABLE {
            assert_eq!(
                b.get(*k),
                cur.get(*k),
                "service key {k} must stay as it is live"
            );
        }
        assert_eq!(b["flower_reconcile"]["spec_hash"], "new");
        assert_eq!(
            b[AppliedSpec::BODY_KEY]["fields"]["spec.supernodes.memory"],
            "2048"
        );
        let node = &b["roles"][1];
        for k in [
            "cardinality",
            "nodes",
            "last_vmname",
            "state",
            "template_id",
            "parents",
        ] {
            assert_eq!(
                node[k], cur["roles"][1][k],
                "role key {k} must stay as it is live"
            );
        }
        assert_eq!(node["template_contents"]["MEMORY"], "2048");
        assert_eq!(node["max_vms"], 8);
        assert!(
            node.get("cooldown").is_none(),
            "a rendered key the new rendering drops is dropped"
        );
    }

    #[test]
    fn bounds_excluding_the_live_cardinality_are_widened_and_the_old_record_kept() {
        let cur = live();
        // Live cardinality 3; the spec now says max 2 (the scale down comes after).
        let up = service_update_body(&cur, &rendered(1, 2)).unwrap();
        assert!(up.widened);
        assert_eq!(up.body["roles"][1]["max_vms"], 3);
        assert_eq!(
            up.body[AppliedSpec::BODY_KEY],
            cur[AppliedSpec::BODY_KEY],
            "the next reconcile must see the spec as not yet applied"
        );
    }

    #[test]
    fn different_roles_cannot_be_updated_in_place() {
        let mut r = rendered(1, 4);
        r["roles"][1]["name"] = json!("worker");
        let err = service_update_body(&live(), &r).unwrap_err();
        assert!(err.contains("roles"), "{err}");
    }
}
