//! Rendering: a validated `FlowerCluster` → the OneFlow service template (6.x or 7.x
//! dialect) and the per-role `ONEAPP_*` context variables the agent reads.
//!
//! Owns: the mapping from spec fields to OneFlow/OpenNebula keys, and the ownership
//! markers that let a controller recognise what it created.
//!
//! Must not: do I/O. Rendering is a pure function, so plans and golden tests are stable.
//! Template and network names are resolved by the caller (the controller asks oned);
//! the renderer only takes numeric ids.

mod context;
mod hand;
pub mod ownership;
pub mod sunstone;
mod template;

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::api::{spec_hash, AdjustmentType, Deployment, FlowerCluster, ObjectRef, ShutdownAction};
pub use context::{redact_context, SECRET_CONTEXT_KEYS};
pub use hand::{hand_usable, hand_usable_json, hand_usable_yaml};
use ownership::Ownership;

/// OneFlow role name of the SuperLink.
pub const SUPERLINK_ROLE: &str = "superlink";
/// OneFlow role name of the SuperNodes.
pub const SUPERNODE_ROLE: &str = "supernode";
/// Name of the network user input in hand-usable templates.
pub const NETWORK_INPUT: &str = "Private";

/// The OneFlow service-template dialect (opennebula-api.md §2.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OneFlowDialect {
    /// OpenNebula 6.x: `vm_template` + `vm_template_contents` (template-syntax string).
    V6,
    /// OpenNebula 7.x: `type: vm`, `template_id` + `template_contents` (JSON object).
    V7,
}

impl OneFlowDialect {
    /// The dialect of an OpenNebula major version (6 → V6, 7 or later → V7).
    pub fn for_major(major: u32) -> Option<Self> {
        match major {
            6 => Some(Self::V6),
            7.. => Some(Self::V7),
            _ => None,
        }
    }
}

/// Numeric VM template ids per role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RoleTemplateIds {
    /// SuperLink VM template.
    pub superlink: u32,
    /// SuperNode VM template.
    pub supernode: u32,
}

impl RoleTemplateIds {
    /// The ids written in the spec, when both references are numeric.
    pub fn from_spec(cluster: &FlowerCluster) -> Option<Self> {
        let t = &cluster.spec.opennebula.templates;
        match (&t.superlink, &t.supernode) {
            (ObjectRef::Id(a), ObjectRef::Id(b)) => Some(Self {
                superlink: *a,
                supernode: *b,
            }),
            _ => None,
        }
    }
}

/// How the VMs' NIC names its network.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NetworkBinding {
    /// A resolved virtual network id.
    Id(u32),
    /// A OneFlow network input (`networks: {"<name>": "M|network|…||id:<default>"}`),
    /// referenced as `NETWORK_ID = "$<name>"`: for hand-usable templates.
    Input {
        /// Input name, e.g. `Private`.
        name: String,
        /// Default network id offered to the user.
        default_id: u32,
    },
}

/// Who the rendered template is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// A service the controller creates and owns: ownership markers are written.
    Managed {
        /// The controller's id.
        controller_id: String,
        /// The cluster's public signing key (base64 Ed25519): the SuperLink acts only on
        /// rotation requests it signed ([`crate::protocol::signing`]).
        signing_key: Option<String>,
    },
    /// A template for people to import by hand: no ownership marker (a controller must
    /// never adopt services created from it).
    HandUsable,
}

/// Everything rendering needs besides the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// OneFlow dialect.
    pub dialect: OneFlowDialect,
    /// Managed or hand-usable.
    pub purpose: Purpose,
    /// Resolved VM template ids.
    pub template_ids: RoleTemplateIds,
    /// Network of the VMs.
    pub network: NetworkBinding,
    /// Extra `ONEAPP_*` variables for both roles (e.g. the agent runtime a test
    /// environment needs); they override rendered ones with the same name.
    pub extra_context: BTreeMap<String, String>,
}

/// The result of rendering.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The OneFlow service template body (POST /service_template).
    pub service_template: Value,
    /// `ONEAPP_*` variables of the SuperLink role.
    pub superlink_context: BTreeMap<String, String>,
    /// `ONEAPP_*` variables of the SuperNode role.
    pub supernode_context: BTreeMap<String, String>,
    /// The ownership marker written (managed templates only).
    pub ownership: Option<Ownership>,
}

/// Why a spec could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// TLS material still refers to a file: load the spec through [`crate::api::load`],
    /// which inlines it.
    #[error("spec.tls.provided.{0}: material still refers to a file; load the spec with api::load first")]
    UnresolvedTlsFile(&'static str),
    /// A context value holds characters that are not safe in OpenNebula templates and
    /// the guest's context environment.
    #[error(
        "context variable {0}: value holds characters that are unsafe in an OpenNebula template"
    )]
    UnsafeContextValue(String),
    /// An extra context variable name is not an `ONEAPP_*` name.
    #[error("context variable {0}: extra variables must be named ONEAPP_[A-Z0-9_]+")]
    BadContextName(String),
    /// `spec.tls.extraNames[i]` is not a name (validation refuses it first).
    #[error("spec.tls.extraNames[{0}]: {1}")]
    BadExtraName(usize, String),
}

/// Renders `cluster` into a OneFlow service template and the per-role contexts.
///
/// Assumes a valid spec (see [`crate::api::validate`]); still refuses, rather than
/// escapes, any context value outside the template-safe character set.
pub fn render(cluster: &FlowerCluster, opts: &RenderOptions) -> Result<Rendered, RenderError> {
    let name = &cluster.metadata.name;
    let (mut superlink_context, mut supernode_context) = context::contexts(cluster)?;
    for (k, v) in &opts.extra_context {
        if !context::is_context_name(k) {
            return Err(RenderError::BadContextName(k.clone()));
        }
        superlink_context.insert(k.clone(), v.clone());
        supernode_context.insert(k.clone(), v.clone());
    }
    if let Purpose::Managed {
        signing_key: Some(key),
        ..
    } = &opts.purpose
    {
        superlink_context.insert(crate::protocol::context::CONTROLLER_KEY.into(), key.clone());
    }
    for (k, v) in superlink_context.iter().chain(&supernode_context) {
        if !context::is_safe_value(v) {
            return Err(RenderError::UnsafeContextValue(k.clone()));
        }
    }
    let spec = &cluster.spec;
    let nic_network = match &opts.network {
        NetworkBinding::Id(id) => id.to_string(),
        NetworkBinding::Input { name, .. } => format!("${name}"),
    };

    let [superlink, supernode] = role_shapes(
        cluster,
        opts.template_ids,
        &nic_network,
        &superlink_context,
        &supernode_context,
    );

    let mut body = Map::new();
    body.insert("name".into(), json!(name));
    let ownership = match &opts.purpose {
        Purpose::Managed { controller_id, .. } => {
            body.insert("description".into(), json!(ownership::description(name)));
            Some(Ownership {
                cluster: name.clone(),
                spec_hash: spec_hash(cluster),
                controller: controller_id.clone(),
            })
        }
        Purpose::HandUsable => {
            body.insert(
                "description".into(),
                json!("Flower federated learning: one SuperLink and its SuperNodes. Generated by flower-reconcile; set each role's template id to your flower-agent appliance templates."),
            );
            None
        }
    };
    let oneflow = &spec.opennebula.oneflow;
    body.insert(
        "deployment".into(),
        json!(match oneflow.deployment {
            Deployment::Straight => "straight",
            Deployment::None => "none",
        }),
    );
    body.insert("ready_status_gate".into(), json!(oneflow.ready_status_gate));
    body.insert(
        "shutdown_action".into(),
        json!(match oneflow.shutdown_action {
            ShutdownAction::Terminate => "terminate",
            ShutdownAction::TerminateHard => "terminate-hard",
        }),
    );
    if let NetworkBinding::Input { name, default_id } = &opts.network {
        body.insert(
            "networks".into(),
            json!({ name: format!("M|network|Private network||id:{default_id}") }),
        );
    }
    let roles = if spec.part.is_some() {
        // A site part: SuperNodes only, dialling the home site's SuperLink.
        let supernode = RoleShape {
            parents: &[],
            ..supernode
        };
        json!([supernode.to_json(opts.dialect)?])
    } else {
        json!([
            superlink.to_json(opts.dialect)?,
            supernode.to_json(opts.dialect)?
        ])
    };
    body.insert("roles".into(), roles);
    if let Some(o) = &ownership {
        body.insert(ownership::MARKER_KEY.into(), o.to_json());
    }
    Ok(Rendered {
        service_template: Value::Object(body),
        superlink_context,
        supernode_context,
        ownership,
    })
}

/// A copy of a rendered service template with secret context values (see
/// [`SECRET_CONTEXT_KEYS`]) and the signing key replaced by `<redacted>`, in both dialects.
pub fn redact_service_template(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(key) = t.get_mut(ownership::SIGNING_KEY) {
        *key = json!("<redacted>");
    }
    map_context(&mut t, SECRET_CONTEXT_KEYS, |_| "<redacted>".into());
    t
}

/// `sha256:<hex>` of a rendered service template with each secret context value replaced
/// by its own SHA-256 and the signing key left out: what a printed or saved plan shows
/// of the body it carries. It changes when any value does, secrets included, and shows
/// none of them.
pub fn digest_service_template(template: &Value) -> String {
    use sha2::{Digest, Sha256};
    let mut t = template.clone();
    if let Some(o) = t.as_object_mut() {
        o.remove(ownership::SIGNING_KEY);
    }
    map_context(&mut t, SECRET_CONTEXT_KEYS, |v| {
        format!("sha256:{:x}", Sha256::digest(v.as_bytes()))
    });
    let canonical = serde_json::to_vec(&t).unwrap_or_default();
    format!("sha256:{:x}", Sha256::digest(&canonical))
}

/// A copy of a service body (a rendered template, or a live service's body) with the
/// context variables `vars` set in every role, both dialects: the per-send values
/// (trace context) that are stamped on a body right before it is sent, never planned, so
/// they neither show in plans nor make a spec drift. Pure. Refuses names outside
/// `ONEAPP_*` and values outside the template-safe set, like [`render`].
pub fn stamp_context(template: &Value, vars: &[(&str, String)]) -> Result<Value, RenderError> {
    for (k, v) in vars {
        if !context::is_context_name(k) {
            return Err(RenderError::BadContextName((*k).to_string()));
        }
        if !context::is_safe_value(v) {
            return Err(RenderError::UnsafeContextValue((*k).to_string()));
        }
    }
    let mut t = template.clone();
    let Some(roles) = t.get_mut("roles").and_then(Value::as_array_mut) else {
        return Ok(t);
    };
    for role in roles {
        if let Some(ctx) = role
            .pointer_mut("/template_contents/CONTEXT")
            .and_then(Value::as_object_mut)
        {
            for (k, v) in vars {
                ctx.insert((*k).to_string(), json!(v));
            }
        }
        if let Some(Value::String(text)) = role.get_mut("vm_template_contents") {
            for (k, v) in vars {
                *text = stamp_template_text(text, k, v);
            }
        }
    }
    Ok(t)
}

/// Sets `key = "value"` in the `CONTEXT = [ … ]` vector of 6.x template text: replaced
/// where present, appended to the vector otherwise.
fn stamp_template_text(text: &str, key: &str, value: &str) -> String {
    if text.contains(&format!(" {key} = \"")) {
        return map_template_text(text, key, &|_| value.to_string());
    }
    text.lines()
        .map(|line| {
            match line
                .strip_prefix("CONTEXT = [")
                .and_then(|l| l.strip_suffix(']'))
            {
                Some(inner) if inner.trim().is_empty() => {
                    format!("CONTEXT = [ {key} = \"{value}\" ]")
                }
                Some(inner) => format!("CONTEXT = [{}, {key} = \"{value}\" ]", inner.trim_end()),
                None => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Replace the value of each context variable in `keys`, in every role of a rendered
/// service template, with `f(value)`: 7.x `template_contents.CONTEXT` objects and 6.x
/// `vm_template_contents` text alike.
fn map_context(template: &mut Value, keys: &[&str], f: impl Fn(&str) -> String) {
    let Some(roles) = template.get_mut("roles").and_then(Value::as_array_mut) else {
        return;
    };
    for role in roles {
        if let Some(ctx) = role
            .pointer_mut("/template_contents/CONTEXT")
            .and_then(Value::as_object_mut)
        {
            for k in keys {
                if let Some(Value::String(v)) = ctx.get_mut(*k) {
                    *v = f(v);
                }
            }
        }
        if let Some(Value::String(text)) = role.get_mut("vm_template_contents") {
            for k in keys {
                *text = map_template_text(text, k, &f);
            }
        }
    }
}

/// Replaces the quoted value of every ` key = "..."` in template text (context values
/// never hold `"`: [`template`] refuses them).
fn map_template_text(text: &str, key: &str, f: &impl Fn(&str) -> String) -> String {
    let needle = format!(" {key} = \"");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&needle) {
        let start = at + needle.len();
        let end = rest[start..].find('"').map_or(rest.len(), |e| start + e);
        out.push_str(&rest[..start]);
        out.push_str(&f(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The two roles of `cluster`'s service: sizes, parents and elasticity from the spec,
/// the given NIC network and contexts (shared by [`render`] and [`sunstone`]).
fn role_shapes<'a>(
    cluster: &FlowerCluster,
    ids: RoleTemplateIds,
    network: &'a str,
    superlink_context: &'a BTreeMap<String, String>,
    supernode_context: &'a BTreeMap<String, String>,
) -> [RoleShape<'a>; 2] {
    let spec = &cluster.spec;
    let nodes = &spec.supernodes;
    let (cooldown, policies) = match &nodes.elasticity {
        Some(e) => (
            Some(e.cooldown.get().as_secs()),
            e.policies.iter().map(policy_json).collect(),
        ),
        None => (None, Vec::new()),
    };
    [
        RoleShape {
            name: SUPERLINK_ROLE,
            template_id: ids.superlink,
            cardinality: 1,
            min_vms: 1,
            max_vms: 1,
            parents: &[],
            vcpu: spec.superlink.vcpu,
            memory: spec.superlink.memory,
            network,
            context: superlink_context,
            cooldown: None,
            policies: Vec::new(),
        },
        RoleShape {
            name: SUPERNODE_ROLE,
            template_id: ids.supernode,
            cardinality: nodes.count,
            min_vms: nodes.min,
            max_vms: nodes.max,
            parents: &[SUPERLINK_ROLE],
            vcpu: nodes.vcpu,
            memory: nodes.memory,
            network,
            context: supernode_context,
            cooldown,
            policies,
        },
    ]
}

fn policy_json(p: &crate::api::ElasticityPolicy) -> Value {
    let mut m = Map::new();
    m.insert(
        "type".into(),
        json!(match p.kind {
            AdjustmentType::Change => "CHANGE",
            AdjustmentType::Cardinality => "CARDINALITY",
            AdjustmentType::PercentageChange => "PERCENTAGE_CHANGE",
        }),
    );
    m.insert("adjust".into(), json!(p.adjust));
    m.insert("expression".into(), json!(p.expression));
    m.insert("period_number".into(), json!(p.period_number));
    m.insert("period".into(), json!(p.period.get().as_secs()));
    if let Some(step) = p.min_adjust_step {
        m.insert("min_adjust_step".into(), json!(step));
    }
    if let Some(c) = p.cooldown {
        m.insert("cooldown".into(), json!(c.get().as_secs()));
    }
    Value::Object(m)
}

/// The dialect-independent shape of one role.
struct RoleShape<'a> {
    name: &'static str,
    template_id: u32,
    cardinality: u32,
    min_vms: u32,
    max_vms: u32,
    parents: &'a [&'static str],
    vcpu: u32,
    memory: u32,
    network: &'a str,
    context: &'a BTreeMap<String, String>,
    cooldown: Option<u64>,
    policies: Vec<Value>,
}

impl RoleShape<'_> {
    /// The CONTEXT section: one-apps infrastructure switches plus the agent's variables.
    fn full_context(&self) -> Vec<(String, String)> {
        context::with_infra(self.context)
    }

    fn to_json(&self, dialect: OneFlowDialect) -> Result<Value, RenderError> {
        let mut role = Map::new();
        role.insert("name".into(), json!(self.name));
        match dialect {
            OneFlowDialect::V7 => {
                role.insert("type".into(), json!("vm"));
                role.insert("template_id".into(), json!(self.template_id));
            }
            OneFlowDialect::V6 => {
                role.insert("vm_template".into(), json!(self.template_id));
            }
        }
        role.insert("cardinality".into(), json!(self.cardinality));
        role.insert("min_vms".into(), json!(self.min_vms));
        role.insert("max_vms".into(), json!(self.max_vms));
        if !self.parents.is_empty() {
            role.insert("parents".into(), json!(self.parents));
        }
        if let Some(c) = self.cooldown {
            role.insert("cooldown".into(), json!(c));
        }
        if !self.policies.is_empty() {
            role.insert("elasticity_policies".into(), json!(self.policies));
        }
        match dialect {
            OneFlowDialect::V7 => {
                let ctx: Map<String, Value> = self
                    .full_context()
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                role.insert(
                    "template_contents".into(),
                    json!({
                        "VCPU": self.vcpu,
                        "CPU": self.vcpu,
                        "MEMORY": self.memory,
                        "NIC": [{"NETWORK_ID": self.network}],
                        "CONTEXT": ctx,
                    }),
                );
            }
            OneFlowDialect::V6 => {
                let text = template::Template::new()
                    .single("VCPU", &self.vcpu.to_string())?
                    .single("CPU", &self.vcpu.to_string())?
                    .single("MEMORY", &self.memory.to_string())?
                    .vector("NIC", &[("NETWORK_ID".into(), self.network.to_string())])?
                    .vector("CONTEXT", &self.full_context())?
                    .finish();
                role.insert("vm_template_contents".into(), json!(text));
            }
        }
        Ok(Value::Object(role))
    }
}

#[cfg(test)]
mod tests;
