//! Per-role `ONEAPP_*` context variables: exactly the names in [`crate::protocol::context`],
//! each value printed with its [`crate::protocol`] codec (the one the agent parses with;
//! `tests/protocol_roundtrip.rs` reads every variable written here back through the agent).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;

use super::RenderError;
use crate::api::{
    ControlApiAccess, CudaDevices, FlowerCluster, FlowerRuntime, Framework, Isolation, LogFormat,
    LogLevel, MetricsSpec, PemSource, TlsMode,
};
use crate::protocol::config_kv::NodeConfig;
use crate::protocol::san::{self, San};
use crate::protocol::{boolean, context as ctx};

/// Context variables whose values are secret: redact them in plans, logs and reports.
pub const SECRET_CONTEXT_KEYS: &[&str] = &[ctx::SSL_KEYFILE];

/// one-apps infrastructure switches every role's CONTEXT carries (seed-facts §1.3):
/// OneGate token, network configuration, READY reporting, the owner's SSH key.
pub(super) const INFRA_CONTEXT: &[(&str, &str)] = &[
    ("NETWORK", "YES"),
    ("REPORT_READY", "YES"),
    ("SSH_PUBLIC_KEY", "$USER[SSH_PUBLIC_KEY]"),
    ("TOKEN", "YES"),
];

/// [`INFRA_CONTEXT`] followed by `context`: a role's whole CONTEXT vector.
pub(super) fn with_infra(context: &BTreeMap<String, String>) -> Vec<(String, String)> {
    INFRA_CONTEXT
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain(context.iter().map(|(k, v)| (k.clone(), v.clone())))
        .collect()
}

static SAFE_VALUE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9._:/+=,@ -]*$").expect("static regex"));
static CONTEXT_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^ONEAPP_[A-Z0-9_]+$").expect("static regex"));

/// True when `v` is safe inside a quoted OpenNebula template value and the guest's
/// shell-sourced context environment.
pub(super) fn is_safe_value(v: &str) -> bool {
    SAFE_VALUE.is_match(v)
}

pub(super) fn is_context_name(k: &str) -> bool {
    CONTEXT_NAME.is_match(k)
}

/// A copy of `context` with secret values replaced by `<redacted>`.
pub fn redact_context(context: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    context
        .iter()
        .map(|(k, v)| {
            let v = if SECRET_CONTEXT_KEYS.contains(&k.as_str()) {
                "<redacted>".to_string()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

fn yes_no(b: bool) -> String {
    boolean::format(b).to_string()
}

fn inline(src: &PemSource, item: &'static str) -> Result<String, RenderError> {
    match (&src.file, &src.inline) {
        (None, Some(b64)) => Ok(b64.chars().filter(|c| !c.is_whitespace()).collect()),
        _ => Err(RenderError::UnresolvedTlsFile(item)),
    }
}

type Ctx = BTreeMap<String, String>;

/// `ONEAPP_FL_METRICS_*` of one role (both roles' agents serve metrics).
fn put_metrics(m: &mut Ctx, metrics: &MetricsSpec) {
    m.insert(ctx::METRICS_ENABLED.into(), yes_no(metrics.enabled));
    m.insert(ctx::METRICS_PORT.into(), metrics.port.to_string());
}

/// (SuperLink, SuperNode) contexts.
pub(super) fn contexts(c: &FlowerCluster) -> Result<(Ctx, Ctx), RenderError> {
    let spec = &c.spec;
    let mut common = Ctx::new();
    let put = |m: &mut Ctx, k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put(
        &mut common,
        ctx::FLOWER_VERSION,
        spec.flower_version.clone(),
    );
    put(&mut common, ctx::CLUSTER_NAME, c.metadata.name.clone());
    // Explicit, never the image's default: a VM runs what the spec says or fails loudly.
    put(
        &mut common,
        ctx::RUNTIME,
        match spec.runtime {
            FlowerRuntime::Process => "process",
            FlowerRuntime::Docker => "docker",
        }
        .into(),
    );
    put(&mut common, ctx::TLS_ENABLED, yes_no(spec.tls.enabled));
    // Both roles heartbeat at the interval the planner's grace period was checked against.
    put(
        &mut common,
        ctx::HEARTBEAT_INTERVAL,
        spec.supernodes
            .failure_policy
            .heartbeat_interval
            .to_string(),
    );
    put(
        &mut common,
        ctx::LOG_LEVEL,
        match spec.logging.level {
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warning => "WARNING",
            LogLevel::Error => "ERROR",
        }
        .into(),
    );
    put(
        &mut common,
        ctx::LOG_FORMAT,
        match spec.logging.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
        .into(),
    );
    put(
        &mut common,
        ctx::ISOLATION,
        match spec.superlink.isolation {
            Isolation::Subprocess => "subprocess",
            Isolation::Process => "process",
        }
        .into(),
    );

    let mut link = common.clone();
    let mut node = common;
    let sl = &spec.superlink;
    put(&mut link, ctx::FLEET_PORT, sl.ports.fleet.to_string());
    put(&mut link, ctx::CONTROL_PORT, sl.ports.control.to_string());
    put(
        &mut link,
        ctx::SERVERAPPIO_PORT,
        sl.ports.serverappio.to_string(),
    );
    put(
        &mut link,
        ctx::CONTROL_BIND,
        match sl.control_api {
            ControlApiAccess::Loopback => "loopback",
            ControlApiAccess::Network => "vm",
        }
        .into(),
    );
    put(
        &mut link,
        ctx::PERSISTENT_STATE,
        yes_no(sl.persistent_state),
    );
    put_metrics(&mut link, &sl.metrics);
    let tls = &spec.tls;
    if tls.enabled {
        match (tls.mode, &tls.provided) {
            (TlsMode::Provided, Some(p)) => {
                put(&mut link, ctx::TLS_MODE, "provided".into());
                let ca = inline(&p.ca_cert, "caCert")?;
                put(&mut link, ctx::SSL_CA_CERTFILE, ca.clone());
                put(&mut link, ctx::SSL_CERTFILE, inline(&p.cert, "cert")?);
                put(&mut link, ctx::SSL_KEYFILE, inline(&p.key, "key")?);
                // The CA is public; SuperNodes trust it directly.
                put(&mut node, ctx::SSL_CA_CERTFILE, ca);
            }
            _ => {
                put(&mut link, ctx::TLS_MODE, "auto".into());
                put(&mut link, ctx::CERT_VALIDITY, tls.validity.to_string());
                if !tls.extra_names.is_empty() {
                    let sans = tls
                        .extra_names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| {
                            San::parse_name(n).map_err(|e| RenderError::BadExtraName(i, e))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    put(&mut link, ctx::CERT_EXTRA_SAN, san::render_list(&sans));
                }
            }
        }
        put(
            &mut link,
            ctx::CERT_RENEW_BEFORE,
            tls.renew_before.to_string(),
        );
    }

    let sn = &spec.supernodes;
    put(
        &mut node,
        ctx::FRAMEWORK,
        match sn.framework {
            Framework::Pytorch => "pytorch",
            Framework::Tensorflow => "tensorflow",
            Framework::Sklearn => "sklearn",
            Framework::None => "none",
        }
        .into(),
    );
    if !sn.node_config.is_empty() {
        let nc = NodeConfig::from_map(&sn.node_config)
            .map_err(|_| RenderError::UnsafeContextValue(ctx::NODE_CONFIG.into()))?;
        put(&mut node, ctx::NODE_CONFIG, nc.as_context());
    }
    put(
        &mut node,
        ctx::MAX_RETRIES,
        sn.reconnect.max_retries.to_string(),
    );
    put(
        &mut node,
        ctx::MAX_WAIT_TIME,
        sn.reconnect.max_wait_time.to_string(),
    );
    if let Some(edge) = &sn.edge {
        // The seed's edge variant: discovery doubles its wait up to the cap (validation
        // keeps the cap a whole number of seconds in the agent's 1–3600 range).
        put(&mut node, ctx::EDGE_BACKOFF, "exponential".into());
        put(
            &mut node,
            ctx::EDGE_MAX_BACKOFF,
            edge.max_backoff.get().as_secs().to_string(),
        );
    }
    put(&mut node, ctx::DATA_DIR, sn.data_dir.clone());
    put_metrics(&mut node, &sn.metrics);
    put(&mut node, ctx::GPU_ENABLED, yes_no(sn.gpu.enabled));
    if sn.gpu.enabled {
        let devices = match &sn.gpu.cuda_visible_devices {
            CudaDevices::All => "all".to_string(),
            CudaDevices::List(l) => l.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
        };
        put(&mut node, ctx::CUDA_VISIBLE_DEVICES, devices);
        put(
            &mut node,
            ctx::GPU_MEMORY_FRACTION,
            sn.gpu.memory_fraction.to_string(),
        );
        put(&mut node, ctx::DCGM_ENABLED, yes_no(sn.gpu.dcgm_exporter));
    }
    if let Some(part) = &spec.part {
        // A site part: OneGate, which would name the SuperLink and give its CA, is
        // zone-local, so its SuperNodes are told both (docs/multi-site.md).
        put(
            &mut node,
            ctx::SUPERLINK_ADDRESS,
            part.superlink_address.clone(),
        );
        if let Some(ca) = &part.ca_cert {
            put(&mut node, ctx::SSL_CA_CERTFILE, ca.clone());
        }
    }
    Ok((link, node))
}
