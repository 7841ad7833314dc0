//! Apply: execute one cluster's planned actions through the backend. A thin executor:
//! each action carries what it sends (ids, cardinality, and the service body rendered at
//! planning time, [`super::prepare`]); apply makes the call(s) with it, plus the re-reads
//! that make each call safe at the time it is made.
//!
//! Guarantees:
//! - A create, redeploy or in-place update sends exactly the body its action carries,
//!   sealed with the cluster's signing key ([`ownership::seal`]: the key of the cluster's
//!   service template or live service, else a new one) — shown by
//!   `reconciler::scenarios::a_create_sends_exactly_the_carried_body`. An action without
//!   its body (a plan read back from a file) is refused.
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
//!   for the cluster and still failed by the planner's own rule ([`replacement_failure`]); see
//!   `Applier::still_failed`.
//!
//! Assumptions: actions come from a plan computed on a recent observation and prepared
//! ([`super::prepare`]).
//! - The VMs' trace context ([`super::context::VmTracing`]) is stamped on a body right
//!   before it is sent (create, redeploy, in-place update) and into the live service
//!   before a scale-up: never planned, so plans stay deterministic and nothing drifts.
//!
//! Caveats: `UpdateTemplate` updates the live service in place (`PUT /service/:id`,
//! the body merged by [`super::update_body`]): OneFlow stores the new role contents
//! (CPU, memory, context, bounds) and uses them for VMs it creates from then on; running
//! VMs keep theirs.

use chrono::Utc;
use serde::Deserialize;
use serde_json::{json, Value};

use super::update_body::service_update_body;
use tracing::Instrument;

use super::context::Context;
use super::observe::{live_vm, owned_marker, role_has_node};
use crate::one::backend::{BackendError, BackendErrorKind, Document};
use crate::plan::{
    replacement_failure, replacement_fields, Action, ActionKind, AppliedSpec, DesiredCluster,
    DesiredState, LiveState, RedeployStep, ServiceBody, ServiceState, SUPERNODE_ROLE,
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

/// Executes the actions of one reconcile.
pub struct Applier<'a> {
    ctx: &'a Context,
    desired: &'a DesiredState,
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
            ActionKind::Create { body }
            | ActionKind::Redeploy(RedeployStep::Instantiate { body, .. }) => {
                self.instantiate(cluster, verb, carried(cluster, body)?)
                    .await
            }
            ActionKind::UpdateTemplate { service_id, body } => {
                let planned = carried(cluster, body)?;
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
                let rendered = self.stamp_trace(cluster, ownership::seal(planned, &seed))?;
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
                if to > from {
                    self.stamp_live_service(cluster, *service_id).await?;
                }
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
            ActionKind::SetSiteNodeKeys {
                service_id,
                vm_id,
                fingerprints,
            } => {
                // The keys come from the desired state, the plan names them by fingerprint
                // only: a plan read back from a file carries no key material, and one made
                // for other keys is refused rather than applied with these.
                let keys = self
                    .desired
                    .clusters
                    .get(cluster)
                    .map(|d| &d.site_node_keys)
                    .filter(|keys| {
                        keys.iter()
                            .map(crate::protocol::node_key::NodePublicKey::fingerprint)
                            .eq(fingerprints.iter().cloned())
                    })
                    .ok_or_else(|| ApplyError::Refused {
                        cluster: cluster.into(),
                        message:
                            "the other sites' SuperNode keys are not the ones planned; plan again"
                                .into(),
                    })?;
                let current = backend.get_service(*service_id).await.map_err(be)?;
                let seed = ownership::signing_seed_of(&current.body)
                    .filter(|_| self.is_ours(&current, cluster))
                    .filter(|_| role_has_node(&current.body, crate::plan::SUPERLINK_ROLE, *vm_id))
                    .ok_or_else(|| ApplyError::Refused {
                        cluster: cluster.into(),
                        message: format!(
                            "service {service_id} is not ours, has no signing key, or VM {vm_id} \
                             is not its SuperLink"
                        ),
                    })?;
                let sig = seed.sign_site_keys(*vm_id, keys);
                let line = format!(
                    "{}=\"{}\"\n{}=\"{sig}\"",
                    crate::protocol::FL_SITE_NODE_KEYS,
                    crate::protocol::node_key::encode_set(keys),
                    crate::protocol::FL_SITE_NODE_KEYS_SIG
                );
                backend.vm_update_merge(*vm_id, line).await.map_err(be)?;
                Ok(changed(format!(
                    "wrote {} SuperNode key(s) of other sites onto SuperLink VM {vm_id}",
                    keys.len()
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
    /// [`replacement_failure`] — the planner's rule, evaluated at the time of the re-read, with the
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
        let rule = crate::plan::ready::replacement_rule(&d.cluster);
        let outage = self.view.and_then(|l| l.last_outage);
        Ok(match replacement_failure(&vm, read_at, rule, outage) {
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

    /// Create (or redeploy) findably: re-list, reuse, then instantiate once, sending
    /// `planned` sealed with the cluster's key.
    async fn instantiate(
        &mut self,
        cluster: &str,
        verb: &'static str,
        planned: &Value,
    ) -> Result<Applied, ApplyError> {
        let be = |source| ApplyError::Backend {
            cluster: cluster.to_string(),
            action: verb,
            error: source,
        };
        let wanted = planned
            .get(AppliedSpec::BODY_KEY)
            .and_then(|v| AppliedSpec::deserialize(v).ok())
            .ok_or_else(|| ApplyError::Refused {
                cluster: cluster.into(),
                message: "the planned body carries no applied-spec record".into(),
            })?;
        let services = self.ctx.backend.list_services().await.map_err(be)?;
        if let Some(existing) = self.find_current(&services, cluster, &wanted.fields) {
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
        let body = self.stamp_trace(cluster, ownership::seal(planned, &seed))?;
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

    /// The per-send trace context for the VMs ([`super::context::VmTracing`]): the
    /// `traceparent` of the span applying the action, and the VMs' OTLP endpoint.
    fn trace_vars(&self) -> Vec<(&'static str, String)> {
        use crate::protocol::context as ctx;
        let vt = &self.ctx.options.vm_tracing;
        let mut vars = Vec::new();
        if vt.propagate {
            if let Some(tp) = crate::telemetry::traceparent(&tracing::Span::current()) {
                vars.push((ctx::TRACEPARENT, tp));
            }
        }
        if let Some(e) = &vt.otlp_endpoint {
            vars.push((ctx::OTLP_ENDPOINT, e.to_string()));
        }
        vars
    }

    /// `body` with [`Self::trace_vars`] stamped into every role's context.
    fn stamp_trace(&self, cluster: &str, body: Value) -> Result<Value, ApplyError> {
        let vars = self.trace_vars();
        if vars.is_empty() {
            return Ok(body);
        }
        crate::render::stamp_context(&body, &vars).map_err(|e| ApplyError::Render {
            cluster: cluster.into(),
            message: e.to_string(),
        })
    }

    /// Before a scale-up: the live service, re-read, with the trace context stamped in
    /// (`PUT /service/:id`), so the new VMs continue this reconcile's trace. No call when
    /// there is nothing to stamp (tracing off), so scaling costs nothing more then.
    async fn stamp_live_service(&self, cluster: &str, service_id: u64) -> Result<(), ApplyError> {
        if self.trace_vars().is_empty() {
            return Ok(());
        }
        let be = |source| ApplyError::Backend {
            cluster: cluster.to_string(),
            action: "scale",
            error: source,
        };
        let current = self.ctx.backend.get_service(service_id).await.map_err(be)?;
        if !self.is_ours(&current, cluster) {
            return Err(ApplyError::Refused {
                cluster: cluster.into(),
                message: format!("service {service_id} is not owned by this controller's user with its marker for the cluster"),
            });
        }
        let stamped = self.stamp_trace(cluster, current.body.clone())?;
        if stamped == current.body {
            return Ok(());
        }
        let update = service_update_body(&current.body, &stamped).map_err(|message| {
            ApplyError::Refused {
                cluster: cluster.into(),
                message,
            }
        })?;
        self.ctx
            .backend
            .update_service(service_id, update.body)
            .await
            .map_err(be)
    }

    /// A live service of ours for `cluster` that already carries the desired replacement fields.
    fn find_current(
        &self,
        services: &[Document],
        cluster: &str,
        wanted: &std::collections::BTreeMap<String, String>,
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
}

/// The body `action` carries, or why there is none to send.
fn carried<'b>(cluster: &str, body: &'b Option<ServiceBody>) -> Result<&'b Value, ApplyError> {
    body.as_ref()
        .and_then(ServiceBody::body)
        .ok_or_else(|| ApplyError::Refused {
            cluster: cluster.into(),
            message: "the action carries no rendered body (plans are prepared before they \
                      are applied; a saved plan is applied through the fresh plan it equals)"
                .into(),
        })
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
