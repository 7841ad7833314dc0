//! The bridge from a desired cluster to a OneFlow service-template body ([`crate::render`]).

use serde_json::Value;

use super::context::Context;
use crate::plan::DesiredCluster;
use crate::protocol::signing::SigningSeed;
use crate::render::ownership;
use crate::render::{render, NetworkBinding, Purpose, RenderOptions, RoleTemplateIds};

/// Render the managed service-template body of `d`: ownership marker, the public half of
/// the cluster's signing key in the SuperLink context, and the seed itself in the body.
pub fn render_body(
    ctx: &Context,
    d: &DesiredCluster,
    ids: &ResolvedIds,
    seed: &SigningSeed,
) -> Result<Value, String> {
    let id =
        |what: &str, v: u64| u32::try_from(v).map_err(|_| format!("{what} id {v} is out of range"));
    let opts = RenderOptions {
        dialect: ctx.dialect,
        purpose: Purpose::Managed {
            controller_id: ctx.controller_id.clone(),
            signing_key: Some(seed.public_key()),
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
    if let Some(obj) = body.as_object_mut() {
        obj.insert(
            ownership::SIGNING_KEY.into(),
            ownership::signing_key_json(seed),
        );
    }
    Ok(body)
}

/// Template and network ids a spec's references resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedIds {
    /// SuperLink VM template id.
    pub superlink_template: u64,
    /// SuperNode VM template id.
    pub supernode_template: u64,
    /// Virtual network id.
    pub network: u64,
}
