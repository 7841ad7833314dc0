//! Planning's I/O half: the payloads the planner cannot compute purely. For every
//! action that sends a service body (create, redeploy, in-place update) it resolves the
//! spec's VM template and network references to ids and renders the body, which the
//! action then carries ([`crate::plan::ServiceBody`]) to the executor ([`super::apply`]).
//!
//! Guarantees:
//! - Names resolve among the controller user's own VM templates and networks (pool
//!   filter -3), or among those of `--resource-owner`: another user's object of the same
//!   name neither blocks nor hijacks a reference (`tests/safety_ownership.rs`,
//!   `a_foreign_template_with_our_name_neither_blocks_nor_hijacks`). Numeric ids must
//!   exist (`one.template.info` / `one.vn.info`). One listing per pool per plan.
//! - Only actions that will execute are prepared (deferred ones call nothing), and a plan
//!   with none makes no call.
//! - The body holds no signing key: it carries
//!   [`crate::render::ownership::PENDING_PUBLIC_KEY`], and the executor seals the
//!   cluster's key in, so plans stay deterministic and free of the seed.
//!
//! Caveats: a reference that does not resolve fails the whole cluster's plan before any
//! of its actions runs (it used to fail at its own action, after earlier ones).

use serde_json::Value;

use super::apply::ApplyError;
use super::context::Context;
use crate::api::ObjectRef;
use crate::one::backend::{BackendError, BackendErrorKind};
use crate::plan::ServiceBody;
use crate::plan::{spec_fields, AppliedSpec, DesiredCluster, DesiredState, Plan, ResolvedIds};
use crate::render::ownership::PENDING_PUBLIC_KEY;
use crate::render::{render, NetworkBinding, Purpose, RenderOptions, RoleTemplateIds};

/// Fill in the body of every executable action of `plan` that sends one.
pub async fn prepare(
    ctx: &Context,
    desired: &DesiredState,
    plan: &mut Plan,
) -> Result<(), ApplyError> {
    let mut resolver = Resolver {
        ctx,
        vm_templates: None,
        networks: None,
    };
    for action in &mut plan.actions {
        if action.deferred.is_some() {
            continue;
        }
        let cluster = action.cluster.as_str();
        let Some(slot) = action.kind.body_slot() else {
            continue;
        };
        let d = desired
            .clusters
            .get(cluster)
            .ok_or_else(|| ApplyError::Refused {
                cluster: cluster.into(),
                message: "no spec for this cluster".into(),
            })?;
        let ids = resolver.ids(d).await?;
        let body = render_body(ctx, d, &ids).map_err(|message| ApplyError::Render {
            cluster: cluster.into(),
            message,
        })?;
        *slot = Some(ServiceBody::new(ids, body));
    }
    Ok(())
}

/// The managed service-template body of `d`: the rendering with the ownership marker,
/// the pending public key and the applied-spec record.
fn render_body(ctx: &Context, d: &DesiredCluster, ids: &ResolvedIds) -> Result<Value, String> {
    let id =
        |what: &str, v: u64| u32::try_from(v).map_err(|_| format!("{what} id {v} is out of range"));
    let opts = RenderOptions {
        dialect: ctx.dialect,
        purpose: Purpose::Managed {
            controller_id: ctx.controller_id.clone(),
            signing_key: Some(PENDING_PUBLIC_KEY.into()),
        },
        template_ids: RoleTemplateIds {
            superlink: id("SuperLink template", ids.superlink_template)?,
            supernode: id("SuperNode template", ids.supernode_template)?,
        },
        network: NetworkBinding::Id(id("network", ids.network)?),
        extra_context: ctx.options.extra_context.clone(),
    };
    let mut body = render(&d.cluster, &opts)
        .map(|r| r.service_template)
        .map_err(|e| e.to_string())?;
    let record = AppliedSpec {
        format: AppliedSpec::FORMAT,
        fields: spec_fields(&d.cluster),
    };
    if let Some(obj) = body.as_object_mut() {
        obj.insert(
            AppliedSpec::BODY_KEY.into(),
            serde_json::to_value(record).unwrap_or(Value::Null),
        );
    }
    Ok(body)
}

/// Name → id resolution with one listing per pool per plan.
struct Resolver<'a> {
    ctx: &'a Context,
    vm_templates: Option<Vec<(u64, String)>>,
    networks: Option<Vec<(u64, String)>>,
}

impl Resolver<'_> {
    async fn ids(&mut self, d: &DesiredCluster) -> Result<ResolvedIds, ApplyError> {
        let name = d.cluster.metadata.name.as_str();
        let o = &d.cluster.spec.opennebula;
        Ok(ResolvedIds {
            superlink_template: self
                .resolve(Pool::VmTemplate, name, &o.templates.superlink)
                .await?,
            supernode_template: self
                .resolve(Pool::VmTemplate, name, &o.templates.supernode)
                .await?,
            network: self.resolve(Pool::Network, name, &o.network).await?,
        })
    }

    /// A reference to a VM template or network: an id must exist; a name is looked up in
    /// one listing per plan (scoped to the controller's or the configured owner's
    /// objects) and must match exactly one object.
    async fn resolve(
        &mut self,
        pool: Pool,
        cluster: &str,
        r: &ObjectRef,
    ) -> Result<u64, ApplyError> {
        let backend = self.ctx.backend.clone();
        let name = match r {
            ObjectRef::Id(id) => {
                let lookup = match pool {
                    Pool::VmTemplate => backend.vm_template_name(u64::from(*id)),
                    Pool::Network => backend.network_name(u64::from(*id)),
                };
                return match lookup.await {
                    Ok(_) => Ok(u64::from(*id)),
                    Err(e) if e.kind == BackendErrorKind::NotFound => Err(ApplyError::Resolve {
                        cluster: cluster.into(),
                        message: format!("no {} with id {id}", pool.what()),
                    }),
                    Err(e) => Err(resolve_failed(cluster, e)),
                };
            }
            ObjectRef::Name(name) => name,
        };
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
        let hits: Vec<u64> = cache
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .filter(|(_, n)| n == name)
            .map(|(id, _)| *id)
            .collect();
        let what = pool.what();
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
