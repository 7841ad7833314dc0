//! Sunstone-ready templates: a OneFlow service template (6.x and 7.x dialect) and one
//! OpenNebula VM template per role, for clusters instantiated from Sunstone or the CLI
//! with no controller and no `FlowerCluster` spec.
//!
//! Owns: which `ONEAPP_*` variables are offered as user inputs ([`INPUTS`]), their input
//! type, options and description, and which are deliberately not offered
//! ([`NOT_OFFERED`]). Together the two lists cover every [`crate::protocol::context`] name.
//!
//! Must not: do I/O, or keep a second copy of a default. Defaults are what [`super::render`]
//! writes for a spec with every field at its default; sizes, roles, infra CONTEXT and the
//! network input come from the same role shapes the rendered templates use.
//!
//! Guarantees: each input `K` is declared as a user input and mapped `K = "$K"` into the
//! role's CONTEXT (oned substitutes the value given at instantiate); the VM templates carry
//! `USER_INPUTS` and `INPUTS_ORDER` as the seed's marketplace templates do.
//! Caveats: the OneFlow template's role template ids are `0` placeholders, and the VM
//! templates name the images as README registers them; README "Without the controller".

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::{
    context, render, role_shapes, template::Template, NetworkBinding, OneFlowDialect, Purpose,
    RenderError, RenderOptions, RoleTemplateIds, NETWORK_INPUT, SUPERLINK_ROLE, SUPERNODE_ROLE,
};
use crate::api::FlowerCluster;
use crate::protocol::context as ctx;

/// Which roles read a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roles {
    /// SuperLink and SuperNodes (a service-level input in the OneFlow template).
    Both,
    /// The SuperLink only.
    SuperLink,
    /// The SuperNodes only.
    SuperNode,
}

/// An OpenNebula user-input type (opennebula-api.md §2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Free text.
    Text,
    /// Text that Sunstone base64-encodes (PEM material: the agent decodes base64).
    Text64,
    /// `YES` / `NO`.
    Boolean,
    /// One of the options.
    List(&'static [&'static str]),
    /// An integer.
    Number,
    /// A decimal number.
    NumberFloat,
    /// An integer in `min..max`.
    Range(u32, u32),
}

/// One user input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// Context variable.
    pub var: &'static str,
    /// Who reads it.
    pub roles: Roles,
    /// Input type.
    pub kind: Kind,
    /// What Sunstone shows (no `|` or `"`).
    pub description: &'static str,
}

const PORT: Kind = Kind::Range(1, 65535);

/// Every variable offered as a user input, in the order Sunstone asks for them.
#[rustfmt::skip]
pub const INPUTS: &[Input] = &[
    Input { var: ctx::CLUSTER_NAME, roles: Roles::Both, kind: Kind::Text, description: "Cluster name (logs and reports)" },
    Input { var: ctx::FLOWER_VERSION, roles: Roles::Both, kind: Kind::Text, description: "Flower version X.Y.Z (must be installed in the image)" },
    Input { var: ctx::RUNTIME, roles: Roles::Both, kind: Kind::List(&["docker", "process"]), description: "How the agent runs Flower" },
    Input { var: ctx::TLS_ENABLED, roles: Roles::Both, kind: Kind::Boolean, description: "Encrypt communication between SuperLink and SuperNodes" },
    Input { var: ctx::LOG_LEVEL, roles: Roles::Both, kind: Kind::List(&["DEBUG", "INFO", "WARNING", "ERROR"]), description: "Flower log level" },
    Input { var: ctx::LOG_FORMAT, roles: Roles::Both, kind: Kind::List(&["text", "json"]), description: "Agent log format" },
    Input { var: ctx::ISOLATION, roles: Roles::Both, kind: Kind::List(&["subprocess", "process"]), description: "Flower app isolation (same on both roles)" },
    Input { var: ctx::HEARTBEAT_INTERVAL, roles: Roles::Both, kind: Kind::Text, description: "Heartbeat interval published through OneGate (e.g. 30s)" },
    Input { var: ctx::METRICS_ENABLED, roles: Roles::Both, kind: Kind::Boolean, description: "Serve Prometheus metrics" },
    Input { var: ctx::METRICS_PORT, roles: Roles::Both, kind: PORT, description: "Prometheus metrics port" },
    Input { var: ctx::FLEET_PORT, roles: Roles::SuperLink, kind: PORT, description: "Fleet API port (SuperNodes dial it)" },
    Input { var: ctx::CONTROL_PORT, roles: Roles::SuperLink, kind: PORT, description: "Control API port (flwr run)" },
    Input { var: ctx::SERVERAPPIO_PORT, roles: Roles::SuperLink, kind: PORT, description: "ServerAppIo API port (loopback)" },
    Input { var: ctx::CONTROL_BIND, roles: Roles::SuperLink, kind: Kind::List(&["loopback", "vm"]), description: "Control API on loopback (SSH tunnel) or on the VM address" },
    Input { var: ctx::PERSISTENT_STATE, roles: Roles::SuperLink, kind: Kind::Boolean, description: "Keep SuperLink state in SQLite so SuperNodes reconnect after a restart" },
    Input { var: ctx::DATABASE, roles: Roles::SuperLink, kind: Kind::Text, description: "State database path inside the state directory (empty: state.db)" },
    Input { var: ctx::TLS_MODE, roles: Roles::SuperLink, kind: Kind::List(&["auto", "provided"]), description: "auto: the SuperLink generates a CA. provided: use the three PEM inputs" },
    Input { var: ctx::SSL_CA_CERTFILE, roles: Roles::Both, kind: Kind::Text64, description: "Provided TLS: CA certificate (PEM)" },
    Input { var: ctx::SSL_CERTFILE, roles: Roles::SuperLink, kind: Kind::Text64, description: "Provided TLS: server certificate chain (PEM)" },
    Input { var: ctx::SSL_KEYFILE, roles: Roles::SuperLink, kind: Kind::Text64, description: "Provided TLS: server private key (PEM)" },
    Input { var: ctx::CERT_VALIDITY, roles: Roles::SuperLink, kind: Kind::Text, description: "Auto TLS: certificate validity (e.g. 8760h)" },
    Input { var: ctx::CERT_RENEW_BEFORE, roles: Roles::SuperLink, kind: Kind::Text, description: "Renew the certificate this long before it expires (e.g. 720h)" },
    Input { var: ctx::CERT_EXTRA_SAN, roles: Roles::SuperLink, kind: Kind::Text, description: "Extra certificate names, comma separated IP:addr or DNS:name" },
    Input { var: ctx::NUM_ROUNDS, roles: Roles::SuperLink, kind: Kind::Number, description: "Default run configuration: federated rounds (submit passes it to flwr run)" },
    Input { var: ctx::STRATEGY, roles: Roles::SuperLink, kind: Kind::List(crate::protocol::run_config::STRATEGIES), description: "Default run configuration: aggregation strategy" },
    Input { var: ctx::MIN_FIT_CLIENTS, roles: Roles::SuperLink, kind: Kind::Number, description: "Default run configuration: clients sampled for training" },
    Input { var: ctx::MIN_EVALUATE_CLIENTS, roles: Roles::SuperLink, kind: Kind::Number, description: "Default run configuration: clients sampled for evaluation" },
    Input { var: ctx::MIN_AVAILABLE_CLIENTS, roles: Roles::SuperLink, kind: Kind::Number, description: "Default run configuration: clients connected before a round starts" },
    Input { var: ctx::PROXIMAL_MU, roles: Roles::SuperLink, kind: Kind::NumberFloat, description: "FedProx proximal term mu (empty: the app's default)" },
    Input { var: ctx::SERVER_LR, roles: Roles::SuperLink, kind: Kind::NumberFloat, description: "FedAdam server learning rate (empty: the app's default)" },
    Input { var: ctx::CLIENT_LR, roles: Roles::SuperLink, kind: Kind::NumberFloat, description: "FedAdam client learning rate (empty: the app's default)" },
    Input { var: ctx::NUM_MALICIOUS, roles: Roles::SuperLink, kind: Kind::Number, description: "Krum or Bulyan: malicious clients tolerated (empty: the app's default)" },
    Input { var: ctx::TRIM_BETA, roles: Roles::SuperLink, kind: Kind::NumberFloat, description: "FedTrimmedAvg: fraction trimmed from each end, in (0, 0.5)" },
    Input { var: ctx::CHECKPOINT_ENABLED, roles: Roles::SuperLink, kind: Kind::Boolean, description: "Default run configuration: the ServerApp writes model checkpoints" },
    Input { var: ctx::CHECKPOINT_INTERVAL, roles: Roles::SuperLink, kind: Kind::Number, description: "Checkpoint every this many rounds" },
    Input { var: ctx::CHECKPOINT_PATH, roles: Roles::SuperLink, kind: Kind::Text, description: "Checkpoint directory on the SuperLink VM, under /opt/flower/" },
    Input { var: ctx::FRAMEWORK, roles: Roles::SuperNode, kind: Kind::List(&["pytorch", "tensorflow", "sklearn", "none"]), description: "Machine learning framework" },
    Input { var: ctx::SUPERLINK_ADDRESS, roles: Roles::SuperNode, kind: Kind::Text, description: "SuperLink host:port. Leave empty to discover it through OneGate in a OneFlow service" },
    Input { var: ctx::EDGE_BACKOFF, roles: Roles::SuperNode, kind: Kind::List(&["exponential", "fixed"]), description: "Waits between SuperLink discovery attempts: doubling or fixed" },
    Input { var: ctx::EDGE_MAX_BACKOFF, roles: Roles::SuperNode, kind: Kind::Number, description: "Longest wait between discovery attempts in seconds (edge nodes: 300)" },
    Input { var: ctx::DISCOVERY_TIMEOUT, roles: Roles::SuperNode, kind: Kind::Text, description: "How long to wait for SuperLink discovery (empty: 10m)" },
    Input { var: ctx::NODE_CONFIG, roles: Roles::SuperNode, kind: Kind::Text, description: "Node config k=v pairs separated by spaces (empty: partition-id and num-partitions)" },
    Input { var: ctx::MAX_RETRIES, roles: Roles::SuperNode, kind: Kind::Number, description: "Reconnection attempts (0: unlimited)" },
    Input { var: ctx::MAX_WAIT_TIME, roles: Roles::SuperNode, kind: Kind::Number, description: "Reconnection time limit in seconds (0: unlimited)" },
    Input { var: ctx::DATA_DIR, roles: Roles::SuperNode, kind: Kind::Text, description: "Training data directory (mounted read-only)" },
    Input { var: ctx::GPU_ENABLED, roles: Roles::SuperNode, kind: Kind::Boolean, description: "Use GPUs" },
    Input { var: ctx::CUDA_VISIBLE_DEVICES, roles: Roles::SuperNode, kind: Kind::Text, description: "GPUs to use: all or indices such as 0,1" },
    Input { var: ctx::GPU_MEMORY_FRACTION, roles: Roles::SuperNode, kind: Kind::NumberFloat, description: "Fraction of GPU memory a training process may use, in (0, 1]" },
    Input { var: ctx::DCGM_ENABLED, roles: Roles::SuperNode, kind: Kind::Boolean, description: "Run the NVIDIA DCGM exporter" },
];

/// Variables the agent reads that are not offered, and why.
pub const NOT_OFFERED: &[(&str, &str)] = &[
    (ctx::ROLE, "fixed by each VM template"),
    (
        ctx::FLOWER_BIN_DIR,
        "a property of the image, not of a cluster",
    ),
    (
        ctx::CLIENTAPPIO_PORT,
        "loopback inside the SuperNode VM; the agent's default never collides",
    ),
    (
        ctx::CONTROLLER_KEY,
        "written by a controller for certificate rotation; none here",
    ),
    (ctx::TRACEPARENT, "written by a controller per request"),
    (
        ctx::FLEET_API_ADDRESS,
        "the seed's spelling; the Fleet port is offered as ONEAPP_FL_FLEET_PORT",
    ),
    (
        ctx::CONTROL_API_ADDRESS,
        "the seed's spelling; offered as ONEAPP_FL_CONTROL_PORT and ONEAPP_FL_CONTROL_BIND",
    ),
    (
        ctx::GRPC_KEEPALIVE_TIME,
        "Flower 1.25 has no keepalive option: validated only",
    ),
    (
        ctx::GRPC_KEEPALIVE_TIMEOUT,
        "Flower 1.25 has no keepalive option: validated only",
    ),
    (
        ctx::OTLP_ENDPOINT,
        "written by a controller with --vm-otlp-endpoint",
    ),
];

/// The appliance image each role's VM template boots, by name (README "Appliance images,
/// step by step" registers them under these names).
pub fn image_name(role: &str) -> &'static str {
    if role == SUPERLINK_ROLE {
        "Flower SuperLink"
    } else {
        "Flower SuperNode"
    }
}

/// A spec with every field at its default: what the defaults are read from.
fn default_cluster(gpu: bool) -> FlowerCluster {
    let text = format!(
        "apiVersion: flower.opennebula.io/v1alpha1\nkind: FlowerCluster\nmetadata: {{name: flower}}\n\
         spec:\n  opennebula:\n    templates: {{superlink: 0, supernode: 0}}\n    network: 0\n  \
         supernodes:\n    gpu: {{enabled: {gpu}}}\n"
    );
    let out = crate::api::load::load_text(Path::new("sunstone-defaults.yaml"), &text);
    out.loaded
        .into_iter()
        .next()
        .map(|l| l.cluster)
        .expect("the built-in default spec loads")
}

/// Each input's default: the value [`render`] writes for a default spec (GPU settings from
/// the same spec with GPUs on); when it writes none, the agent's own default from the
/// variable table ([`crate::protocol::variables`]), empty when that depends on the VM.
pub fn defaults() -> Result<BTreeMap<&'static str, String>, RenderError> {
    let (plain_link, plain_node) = context::contexts(&default_cluster(false))?;
    let (_, gpu_node) = context::contexts(&default_cluster(true))?;
    Ok(INPUTS
        .iter()
        .map(|i| {
            let found = [&plain_link, &plain_node, &gpu_node]
                .iter()
                .find_map(|m| m.get(i.var).cloned())
                .or_else(|| crate::protocol::variables::find(i.var).map(|v| v.default.to_string()));
            (i.var, found.unwrap_or_default())
        })
        .collect())
}

impl Input {
    fn for_role(&self, role: &str) -> bool {
        match self.roles {
            Roles::Both => true,
            Roles::SuperLink => role == SUPERLINK_ROLE,
            Roles::SuperNode => role == SUPERNODE_ROLE,
        }
    }

    /// The user-input spec string `O|type|description|options|default`.
    pub fn spec(&self, default: &str) -> String {
        let (kind, options) = match self.kind {
            Kind::Text => ("text", String::new()),
            Kind::Text64 => ("text64", String::new()),
            Kind::Boolean => ("boolean", String::new()),
            Kind::List(o) => ("list", o.join(",")),
            Kind::Number => ("number", String::new()),
            Kind::NumberFloat => ("number-float", String::new()),
            Kind::Range(a, b) => ("range", format!("{a}..{b}")),
        };
        format!("O|{kind}|{}|{options}|{default}", self.description)
    }
}

fn inputs_of(role: &str) -> impl Iterator<Item = &'static Input> + '_ {
    INPUTS.iter().filter(move |i| i.for_role(role))
}

/// A role's `ONEAPP_*` CONTEXT: its role, and `K = "$K"` for each of its inputs.
fn role_context(role: &str) -> BTreeMap<String, String> {
    let mut c: BTreeMap<String, String> = inputs_of(role)
        .map(|i| (i.var.to_string(), format!("${}", i.var)))
        .collect();
    c.insert(ctx::ROLE.into(), role.into());
    c
}

fn not_offered_note() -> String {
    NOT_OFFERED
        .iter()
        .map(|(k, why)| format!("{k} ({why})"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The OneFlow service template: the default spec's roles and network input, role
/// CONTEXTs mapping the inputs, service-level inputs for both roles and role-level ones
/// for one (`user_inputs` in 7.x, `custom_attrs` in 6.x).
pub fn service_template(dialect: OneFlowDialect) -> Result<Value, RenderError> {
    let cluster = default_cluster(false);
    let opts = RenderOptions {
        dialect,
        purpose: Purpose::HandUsable,
        template_ids: RoleTemplateIds {
            superlink: 0,
            supernode: 0,
        },
        network: NetworkBinding::Input {
            name: NETWORK_INPUT.into(),
            default_id: 0,
        },
        extra_context: BTreeMap::new(),
    };
    let mut body = render(&cluster, &opts)?.service_template;
    let defaults = defaults()?;
    let key = match dialect {
        OneFlowDialect::V7 => "user_inputs",
        OneFlowDialect::V6 => "custom_attrs",
    };
    let specs = |pick: &dyn Fn(&Input) -> bool| -> Map<String, Value> {
        INPUTS
            .iter()
            .filter(|i| pick(i))
            .map(|i| (i.var.to_string(), json!(i.spec(&defaults[i.var]))))
            .collect()
    };
    let (link_ctx, node_ctx) = (role_context(SUPERLINK_ROLE), role_context(SUPERNODE_ROLE));
    let nic = format!("${NETWORK_INPUT}");
    let shapes = role_shapes(&cluster, opts.template_ids, &nic, &link_ctx, &node_ctx);
    let mut roles = Vec::new();
    for shape in &shapes {
        let mut role = shape.to_json(dialect)?;
        let own = specs(&|i: &Input| i.roles != Roles::Both && i.for_role(shape.name));
        role[key] = Value::Object(own);
        roles.push(role);
    }
    body["name"] = json!("flower-cluster");
    body["description"] = json!(format!(
        "Flower federated learning: one SuperLink and its SuperNodes, no controller needed. Generated by `flower-reconcile templates`. Set each role's template id to the flower-superlink / flower-supernode VM templates. Not offered as inputs: {}.",
        not_offered_note()
    ));
    body[key] = Value::Object(specs(&|i: &Input| i.roles == Roles::Both));
    body["roles"] = Value::Array(roles);
    Ok(body)
}

/// The VM template of one role in template syntax, as `onetemplate create` takes it.
/// The DISK names the appliance image; no NIC (Sunstone asks for the network, OneFlow
/// adds its own).
fn vm_template(shape: &super::RoleShape<'_>) -> Result<String, RenderError> {
    let role = shape.name;
    let defaults = defaults()?;
    let inputs: Vec<(String, String)> = inputs_of(role)
        .map(|i| (i.var.to_string(), i.spec(&defaults[i.var])))
        .collect();
    let order = inputs_of(role).map(|i| i.var).collect::<Vec<_>>().join(",");
    let body = Template::new()
        .single("NAME", &format!("flower-{role}"))?
        .single(
            "DESCRIPTION",
            &format!("Flower {role} (flower-agent appliance), no controller needed"),
        )?
        .single("CPU", &shape.vcpu.to_string())?
        .single("VCPU", &shape.vcpu.to_string())?
        .single("MEMORY", &shape.memory.to_string())?
        .vector("DISK", &[("IMAGE".into(), image_name(role).into())])?
        .vector("CONTEXT", &shape.full_context())?
        .vector("USER_INPUTS", &inputs)?
        .single("INPUTS_ORDER", &order)?
        .finish();
    Ok(format!(
        "# Flower {role} VM template for Sunstone and `onetemplate create` (no controller).\n\
         # Generated by `flower-reconcile templates --out manifests/templates`; do not edit\n\
         # (a test fails when it drifts from the renderer).\n\
         # Not offered as inputs: {}.\n{body}\n",
        not_offered_note()
    ))
}

/// The SuperLink and SuperNode VM templates.
pub fn vm_templates() -> Result<[String; 2], RenderError> {
    let cluster = default_cluster(false);
    let (link_ctx, node_ctx) = (role_context(SUPERLINK_ROLE), role_context(SUPERNODE_ROLE));
    let ids = RoleTemplateIds {
        superlink: 0,
        supernode: 0,
    };
    let [link, node] = role_shapes(&cluster, ids, "", &link_ctx, &node_ctx);
    Ok([vm_template(&link)?, vm_template(&node)?])
}

/// Every generated file: (file name, content).
pub fn files() -> Result<Vec<(&'static str, String)>, RenderError> {
    let json = |d| -> Result<String, RenderError> {
        let mut s = serde_json::to_string_pretty(&service_template(d)?).unwrap_or_default();
        s.push('\n');
        Ok(s)
    };
    let [link, node] = vm_templates()?;
    Ok(vec![
        ("flower-cluster.v6.json", json(OneFlowDialect::V6)?),
        ("flower-cluster.v7.json", json(OneFlowDialect::V7)?),
        ("flower-superlink.tmpl", link),
        ("flower-supernode.tmpl", node),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_context_variable_is_offered_or_explained_once() {
        for var in ctx::ALL {
            let offered = INPUTS.iter().filter(|i| i.var == *var).count();
            let skipped = NOT_OFFERED.iter().filter(|(k, _)| k == var).count();
            assert_eq!(
                offered + skipped,
                1,
                "{var}: offer it in INPUTS or say why not in NOT_OFFERED"
            );
        }
        for i in INPUTS {
            assert!(!i.description.contains(['|', '"']), "{}", i.var);
        }
    }

    #[test]
    fn defaults_come_from_the_renderer_and_list_defaults_are_options() {
        let d = defaults().unwrap();
        assert_eq!(d[ctx::FLEET_PORT], "9092");
        assert_eq!(d[ctx::GPU_MEMORY_FRACTION], "0.8");
        assert_eq!(d[ctx::SSL_KEYFILE], "");
        for i in INPUTS {
            if let Kind::List(o) = i.kind {
                assert!(o.contains(&d[i.var].as_str()), "{}: {:?}", i.var, d[i.var]);
            }
        }
    }
}
