//! Semantic validation of a parsed FlowerCluster (pure: no I/O).
//!
//! Values that reach OpenNebula templates or command lines are checked against
//! allow-lists, never deny-lists. Values the agent reads back (Flower version, node and run
//! config, paths, durations) are checked with the same [`crate::protocol`] codecs the agent
//! uses, so a spec that validates renders to a context the agent accepts
//! (`tests/protocol_roundtrip.rs`).

use std::collections::BTreeSet;
use std::sync::LazyLock;

use regex::Regex;

use super::error::FieldPath;
use super::types::*;
use crate::protocol::config_kv::{self, NodeConfig};
use crate::protocol::{path as vm_path, version};

/// How bad an issue is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The spec is invalid.
    Error,
    /// Worth knowing; the spec stays valid.
    Warning,
}

/// A problem at a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Field path.
    pub path: FieldPath,
    /// What is wrong.
    pub message: String,
    /// Error or warning.
    pub severity: Severity,
    /// Other fields a cross-field check read (`min` reads `count`).
    pub reads: Vec<FieldPath>,
}

impl Issue {
    /// An error.
    pub fn error(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
            severity: Severity::Error,
            reads: Vec::new(),
        }
    }

    /// A warning.
    pub fn warning(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
            severity: Severity::Warning,
            reads: Vec::new(),
        }
    }

    /// The check also read `path`.
    pub fn reading(mut self, path: FieldPath) -> Self {
        self.reads.push(path);
        self
    }

    /// Whether the issue is about, or read, a value at or under one of `paths`.
    pub fn touches(&self, paths: &[FieldPath]) -> bool {
        std::iter::once(&self.path)
            .chain(&self.reads)
            .any(|p| paths.iter().any(|t| p.starts_with(t)))
    }
}

macro_rules! re {
    ($name:ident, $pat:expr) => {
        static $name: LazyLock<Regex> =
            LazyLock::new(|| Regex::new($pat).expect("static regex compiles"));
    };
}

re!(DNS1123_LABEL, r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$");
re!(OBJECT_NAME, r"^[A-Za-z0-9][A-Za-z0-9 ._:/+-]*$");

/// Every semantic problem of `c` (TLS material is checked separately, it needs files).
pub fn validate(c: &FlowerCluster) -> Vec<Issue> {
    let mut v = Vec::new();
    let root = FieldPath::root();
    if c.api_version != API_VERSION {
        v.push(Issue::error(
            root.key("apiVersion"),
            format!(
                "must be `{API_VERSION}`, found `{}`",
                printable(&c.api_version)
            ),
        ));
    }
    if c.kind != KIND {
        v.push(Issue::error(
            root.key("kind"),
            format!("must be `{KIND}`, found `{}`", printable(&c.kind)),
        ));
    }
    check_name(&c.metadata.name, &mut v);
    let spec = root.key("spec");
    if c.spec.part.is_some() {
        v.push(Issue::error(
            spec.key("part"),
            "is set by the controller on a site part; a spec file places SuperNodes in \
             other sites with supernodes.sites",
        ));
    }
    check_version(&c.spec.flower_version, &spec.key("flowerVersion"), &mut v);
    check_opennebula(&c.spec.opennebula, &spec.key("opennebula"), &mut v);
    check_tls(&c.spec.tls, &spec.key("tls"), &mut v);
    check_superlink(&c.spec.superlink, &spec.key("superlink"), &mut v);
    check_supernodes(&c.spec.supernodes, &spec.key("supernodes"), &mut v);
    check_sites(c, &spec.key("supernodes").key("sites"), &mut v);
    check_training(
        &c.spec.training,
        &c.spec.supernodes,
        &spec.key("training"),
        &mut v,
    );
    v
}

/// Error text must stay one short line even when the input is hostile.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_debug).collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// Longest site name: a site part is the cluster `<cluster>--<site>`, itself a cluster name.
pub const MAX_SITE_NAME: usize = 20;

/// Whether `name` is a valid site name (a short DNS-1123 label), in a spec's
/// `supernodes.sites[].site` and in the controller's `[sites.NAME]`.
pub fn is_site_name(name: &str) -> bool {
    name.len() <= MAX_SITE_NAME && is_cluster_name(name)
}

/// Remote SuperNode groups (`supernodes.sites`): unique, well-named sites whose part
/// name fits; counts within bounds; a given address parses and, with a generated
/// certificate, names a host the certificate carries.
fn check_sites(c: &FlowerCluster, path: &FieldPath, v: &mut Vec<Issue>) {
    let sites = &c.spec.supernodes.sites;
    if sites.len() > MAX_SITES {
        v.push(Issue::error(
            path.clone(),
            format!("at most {MAX_SITES} sites"),
        ));
    }
    let tls = &c.spec.tls;
    // A SuperNode given the SuperLink by address presents its key (it cannot read the
    // SuperLink's FL_NODE_AUTH through another zone's OneGate), and a SuperLink without
    // persistent state authenticates nobody: Flower 1.25 would refuse every remote node.
    if !sites.is_empty() && tls.enabled && !c.spec.superlink.persistent_state {
        v.push(
            Issue::error(
                path.clone(),
                "SuperNodes in other sites need superlink.persistentState: they authenticate with \
                 their keys over TLS, which a SuperLink without persistent state does not check, \
                 so Flower would refuse them",
            )
            .reading(FieldPath::parse("spec.superlink.persistentState")),
        );
    }
    let mut seen = BTreeSet::new();
    for (i, s) in sites.iter().enumerate() {
        let at = path.index(i);
        if !is_site_name(&s.site) {
            v.push(Issue::error(
                at.key("site"),
                format!(
                    "{:?} is not a site name: a DNS label (a-z, 0-9, -) of at most {MAX_SITE_NAME} characters",
                    printable(&s.site)
                ),
            ));
        } else if !seen.insert(s.site.as_str()) {
            v.push(Issue::error(
                at.key("site"),
                format!("site {:?} is listed twice", s.site),
            ));
        } else if !is_cluster_name(&crate::plan::site::part_name(&c.metadata.name, &s.site)) {
            v.push(
                Issue::error(
                    at.key("site"),
                    format!(
                        "the site part's name {:?} is longer than 63 characters: shorten the cluster or site name",
                        crate::plan::site::part_name(&c.metadata.name, &s.site)
                    ),
                )
                .reading(FieldPath::parse("metadata.name")),
            );
        }
        check_bounds(s.min, s.count, s.max, &at, v);
        check_ref(
            &s.templates.supernode,
            at.key("templates").key("supernode"),
            v,
        );
        check_ref(&s.network, at.key("network"), v);
        let Some(addr) = &s.superlink_address else {
            continue;
        };
        let addr_at = at.key("superlinkAddress");
        match crate::protocol::endpoint::parse(addr) {
            Err(e) => v.push(Issue::error(addr_at, e)),
            Ok(hp) if tls.enabled && tls.mode != TlsMode::Provided => {
                use crate::protocol::san::San;
                let host = hp.host_text();
                // Compared as SANs: `10.0.0.1` and a DNS name match their own kind only.
                let want = hp.ip().map(San::Ip).or_else(|| San::parse_name(&host).ok());
                let named = tls.extra_names.iter().any(|n| {
                    San::parse_name(n)
                        .ok()
                        .is_some_and(|san| Some(&san) == want.as_ref())
                });
                if !named {
                    v.push(
                        Issue::error(
                            addr_at,
                            format!(
                                "{host} is not in tls.extraNames: the SuperLink's certificate would not name it and the site's SuperNodes would refuse it"
                            ),
                        )
                        .reading(FieldPath::parse("spec.tls.extraNames")),
                    );
                }
            }
            Ok(_) => {}
        }
    }
}

/// Most remote SuperNode groups per cluster.
pub const MAX_SITES: usize = 16;

/// Whether `name` is a valid cluster name (a DNS-1123 label).
pub fn is_cluster_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 63 && DNS1123_LABEL.is_match(name)
}

fn check_name(name: &str, v: &mut Vec<Issue>) {
    let path = FieldPath::parse("metadata.name");
    if name.is_empty() {
        v.push(Issue::error(path, "must not be empty"));
    } else if !is_cluster_name(name) {
        v.push(Issue::error(
            path,
            format!(
                "`{}` is not a DNS-1123 label: lowercase letters, digits and `-`, at most 63 characters, starting and ending with a letter or digit",
                printable(name)
            ),
        ));
    }
}

fn check_version(s: &str, path: &FieldPath, v: &mut Vec<Issue>) {
    match version::FlowerVersion::parse(s) {
        Err(_) => v.push(Issue::error(
            path.clone(),
            format!(
                "`{}` is not a Flower version `X.Y.Z` such as `1.25.0`",
                printable(s)
            ),
        )),
        Ok(ver) if !ver.is_supported() => v.push(Issue::error(
            path.clone(),
            format!(
                "Flower {s} is too old: the appliances need {} or newer",
                version::MIN_SUPPORTED
            ),
        )),
        Ok(_) => {}
    }
}

fn check_ref(r: &ObjectRef, path: FieldPath, v: &mut Vec<Issue>) {
    if let ObjectRef::Name(n) = r {
        if n.len() > 128 || !OBJECT_NAME.is_match(n) {
            v.push(Issue::error(
                path,
                format!(
                    "`{}` is not a usable OpenNebula name (letters, digits, space and `._:/+-`, at most 128 characters)",
                    printable(n)
                ),
            ));
        }
    }
}

fn check_opennebula(o: &OpenNebulaSpec, path: &FieldPath, v: &mut Vec<Issue>) {
    let t = path.key("templates");
    check_ref(&o.templates.superlink, t.key("superlink"), v);
    check_ref(&o.templates.supernode, t.key("supernode"), v);
    check_ref(&o.network, path.key("network"), v);
}

fn check_positive_duration(d: HumanDuration, path: FieldPath, v: &mut Vec<Issue>) {
    if d.get().is_zero() {
        v.push(Issue::error(path, "must be longer than 0s"));
    }
}

fn check_tls(t: &TlsSpec, path: &FieldPath, v: &mut Vec<Issue>) {
    check_positive_duration(t.validity, path.key("validity"), v);
    if t.validity.get() > crate::protocol::MAX_CERT_VALIDITY {
        v.push(Issue::error(
            path.key("validity"),
            "must be at most 20 years (175200h): the agents refuse longer certificates",
        ));
    }
    check_positive_duration(t.renew_before, path.key("renewBefore"), v);
    if t.renew_before >= t.validity {
        v.push(
            Issue::error(
                path.key("renewBefore"),
                format!(
                    "must be shorter than validity ({}), or certificates are renewed all the time",
                    t.validity
                ),
            )
            .reading(path.key("validity")),
        );
    }
    match (t.mode, &t.provided) {
        (TlsMode::Provided, _) if !t.enabled => v.push(
            Issue::error(
                path.key("mode"),
                "`provided` needs `enabled: true` (certificates would be ignored)",
            )
            .reading(path.key("enabled")),
        ),
        (TlsMode::Provided, None) => v.push(
            Issue::error(
                path.key("provided"),
                "`mode: provided` needs `provided` with caCert, cert and key",
            )
            .reading(path.key("mode")),
        ),
        (TlsMode::Auto, Some(_)) => v.push(
            Issue::error(
                path.key("provided"),
                "certificates are given but `mode` is `auto`; set `mode: provided` or remove them",
            )
            .reading(path.key("mode")),
        ),
        _ => {}
    }
    check_extra_names(t, path, v);
}

/// `tls.extraNames`: each an IP address or a DNS name, at most `MAX_SANS`, and only
/// for certificates the SuperLink generates.
fn check_extra_names(t: &TlsSpec, path: &FieldPath, v: &mut Vec<Issue>) {
    use crate::protocol::san::{San, MAX_SANS};
    let names = path.key("extraNames");
    if t.extra_names.is_empty() {
        return;
    }
    if !t.enabled || t.mode == TlsMode::Provided {
        let why = if t.enabled {
            "a provided certificate carries its own names; give them to it instead"
        } else {
            "TLS is off: there is no certificate to name"
        };
        v.push(
            Issue::error(names.clone(), why).reading(path.key(if t.enabled {
                "mode"
            } else {
                "enabled"
            })),
        );
    }
    if t.extra_names.len() > MAX_SANS {
        v.push(Issue::error(
            names.clone(),
            format!("at most {MAX_SANS} names"),
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, name) in t.extra_names.iter().enumerate() {
        match San::parse_name(name) {
            Ok(san) if !seen.insert(san.to_string()) => v.push(Issue::error(
                names.index(i),
                format!("{name:?} is listed twice"),
            )),
            Ok(_) => {}
            Err(e) => v.push(Issue::error(names.index(i), e)),
        }
    }
}

/// The warning a spec choosing `superlink.controlApi: network` gets.
pub const CONTROL_API_NETWORK_WARNING: &str = "the Control API listens on the SuperLink VM's \
    address and Flower 1.25 authenticates nobody there (TLS encrypts, it does not check who \
    connects): anyone who reaches that port can run code on every SuperNode. Prefer \
    `loopback` and an SSH tunnel (README, Troubleshooting), or fence the port off with \
    security groups";

fn check_resources(vcpu: u32, memory: u32, path: &FieldPath, v: &mut Vec<Issue>) {
    if !(1..=256).contains(&vcpu) {
        v.push(Issue::error(path.key("vcpu"), "must be between 1 and 256"));
    }
    if !(512..=4 * 1024 * 1024).contains(&memory) {
        v.push(Issue::error(
            path.key("memory"),
            "must be between 512 and 4194304 (MiB)",
        ));
    }
}

fn check_superlink(s: &SuperLinkSpec, path: &FieldPath, v: &mut Vec<Issue>) {
    check_resources(s.vcpu, s.memory, path, v);
    if s.control_api == ControlApiAccess::Network {
        // Flower 1.25's Control API authenticates nobody (its account auth is an enterprise
        // plugin): TLS encrypts the connection, it does not check who connects.
        v.push(Issue::warning(
            path.key("controlApi"),
            CONTROL_API_NETWORK_WARNING,
        ));
    }
    let ports = path.key("ports");
    let named = [
        ("fleet", s.ports.fleet),
        ("control", s.ports.control),
        ("serverappio", s.ports.serverappio),
    ];
    let mut seen: Vec<(&str, u16)> = Vec::new();
    for (name, port) in named {
        if port == 0 {
            v.push(Issue::error(ports.key(name), "must be between 1 and 65535"));
        } else if let Some((other, _)) = seen.iter().find(|(_, p)| *p == port) {
            v.push(
                Issue::error(
                    ports.key(name),
                    format!("port {port} is already used by `{other}`"),
                )
                .reading(ports.key(other)),
            );
        }
        seen.push((name, port));
    }
    let mp = s.metrics.port;
    let metrics_port = path.key("metrics").key("port");
    if mp == 0 {
        v.push(Issue::error(metrics_port, "must be between 1 and 65535"));
    } else if let Some((other, _)) = seen.iter().find(|(_, p)| *p == mp) {
        v.push(
            Issue::error(
                metrics_port,
                format!("port {mp} is already used by `ports.{other}`"),
            )
            .reading(ports.key(other)),
        );
    }
}

/// `min`, `count` and `max` of a SuperNode group under `path`: 1 ≤ min ≤ count ≤ max ≤ 1000.
fn check_bounds(min: u32, count: u32, max: u32, path: &FieldPath, v: &mut Vec<Issue>) {
    if min < 1 {
        v.push(Issue::error(path.key("min"), "must be at least 1"));
    }
    if min > count {
        v.push(
            Issue::error(
                path.key("min"),
                format!("min ({min}) must not exceed count ({count})"),
            )
            .reading(path.key("count")),
        );
    }
    if count > max {
        v.push(
            Issue::error(
                path.key("max"),
                format!("max ({max}) must be at least count ({count})"),
            )
            .reading(path.key("count")),
        );
    }
    if max > 1000 {
        v.push(Issue::error(path.key("max"), "must be at most 1000"));
    }
}

fn check_supernodes(s: &SuperNodesSpec, path: &FieldPath, v: &mut Vec<Issue>) {
    check_resources(s.vcpu, s.memory, path, v);
    check_bounds(s.min, s.count, s.max, path, v);
    let nc = path.key("nodeConfig");
    for (k, val) in &s.node_config {
        check_config_entry(k, &nc, val, v);
    }
    if !s.node_config.is_empty()
        && s.node_config
            .iter()
            .all(|(k, val)| config_kv::is_key(k) && config_kv::is_value(val))
    {
        // Entries are fine one by one; the agent also needs the set to be one TOML table
        // that fits its context variable.
        if let Err((key, why)) = NodeConfig::from_map(&s.node_config) {
            let at = key.map_or(nc.clone(), |k| nc.key(&k));
            v.push(Issue::error(at, why));
        }
    }
    if !vm_path::is_absolute_path(&s.data_dir) {
        v.push(Issue::error(path.key("dataDir"), vm_path::RULE));
    } else if let Some(why) = vm_path::protected_problem(&s.data_dir) {
        v.push(Issue::error(path.key("dataDir"), why));
    }
    check_gpu(&s.gpu, &path.key("gpu"), v);
    check_supernode_metrics(s, &path.key("metrics").key("port"), v);
    if let Some(e) = &s.elasticity {
        check_elasticity(e, &path.key("elasticity"), v);
    }
    check_failure_policy(&s.failure_policy, &path.key("failurePolicy"), v);
    if let Some(edge) = &s.edge {
        check_edge(
            edge,
            &s.failure_policy,
            &path.key("edge"),
            &path.key("failurePolicy"),
            v,
        );
    }
}

/// The edge profile: `offlineGrace ≥ failurePolicy.gracePeriod` (an edge node is kept at
/// least as long as any node), `maxBackoff` whole seconds within the agent's 1–3600 s.
/// Shown by `spec_validation::edge_profile_limits_are_checked_with_the_field_named`.
fn check_edge(
    e: &EdgeSpec,
    f: &FailurePolicy,
    path: &FieldPath,
    fp: &FieldPath,
    v: &mut Vec<Issue>,
) {
    if e.offline_grace < f.grace_period {
        v.push(
            Issue::error(
                path.key("offlineGrace"),
                format!(
                    "must be at least failurePolicy.gracePeriod ({}), got {}",
                    f.grace_period, e.offline_grace
                ),
            )
            .reading(fp.key("gracePeriod")),
        );
    }
    let b = e.max_backoff.get();
    if b.subsec_nanos() != 0 || !(1..=3600).contains(&b.as_secs()) {
        v.push(Issue::error(
            path.key("maxBackoff"),
            format!(
                "must be a whole number of seconds from 1s to 1h, got {}",
                e.max_backoff
            ),
        ));
    }
}

/// The SuperNode agents' metrics port must be free on their VMs: not the ClientAppIo
/// port (9094) nor, with the DCGM exporter, its 9400.
fn check_supernode_metrics(s: &SuperNodesSpec, at: &FieldPath, v: &mut Vec<Issue>) {
    let port = s.metrics.port;
    let taken = match port {
        0 => Some("must be between 1 and 65535".to_string()),
        9094 => Some("port 9094 is the SuperNodes' ClientAppIo API".to_string()),
        9400 if s.gpu.dcgm_exporter => {
            Some("port 9400 is the DCGM exporter's (`gpu.dcgmExporter`)".to_string())
        }
        _ => None,
    };
    if let Some(why) = taken {
        v.push(Issue::error(at.clone(), why));
    }
}

/// `gracePeriod ≥ 3 × heartbeatInterval` (#12 item 4d): a node is declared failed only
/// after it missed at least two heartbeats in a row, never for one late or lost write.
/// Shown by `spec_validation::a_grace_period_under_three_heartbeats_is_refused`.
/// `run`'s start-up rule (#12 item 4d): a heartbeat the controller sees is up to one poll
/// old, so `gracePeriod` should cover 3 heartbeats plus a poll. `Some(problem)` when it
/// does not; `run` logs it once per cluster (validation already holds the 3 × part).
/// Shown by `validate::tests::the_grace_period_must_cover_three_heartbeats_and_a_poll`.
pub fn grace_margin_problem(f: &FailurePolicy, poll: std::time::Duration) -> Option<String> {
    let floor = f
        .heartbeat_interval
        .get()
        .saturating_mul(3)
        .saturating_add(poll);
    (f.grace_period.get() < floor).then(|| {
        format!(
            "supernodes.failurePolicy.gracePeriod ({}) is shorter than 3 × heartbeatInterval ({}) \
             + the poll interval ({}) = {}: a healthy SuperNode may look failed between two polls",
            f.grace_period,
            f.heartbeat_interval,
            HumanDuration(poll),
            HumanDuration(floor)
        )
    })
}

fn check_failure_policy(f: &FailurePolicy, path: &FieldPath, v: &mut Vec<Issue>) {
    check_positive_duration(f.grace_period, path.key("gracePeriod"), v);
    check_positive_duration(f.heartbeat_interval, path.key("heartbeatInterval"), v);
    let floor = f.heartbeat_interval.get().saturating_mul(3);
    if !f.heartbeat_interval.get().is_zero() && f.grace_period.get() < floor {
        v.push(
            Issue::error(
                path.key("gracePeriod"),
                format!(
                    "must be at least 3 × heartbeatInterval ({} × 3 = {}), got {}",
                    f.heartbeat_interval,
                    HumanDuration(floor),
                    f.grace_period
                ),
            )
            .reading(path.key("heartbeatInterval")),
        );
    }
}

fn check_config_entry(k: &str, parent: &FieldPath, val: &str, v: &mut Vec<Issue>) {
    if !config_kv::is_key(k) {
        v.push(Issue::error(
            parent.clone(),
            format!(
                "key `{}` may only hold {}",
                printable(k),
                config_kv::KEY_RULE
            ),
        ));
    } else if !config_kv::is_value(val) {
        v.push(Issue::error(
            parent.key(k),
            format!(
                "value `{}` may only hold {}",
                printable(val),
                config_kv::VALUE_RULE
            ),
        ));
    }
}

fn check_gpu(g: &GpuSpec, path: &FieldPath, v: &mut Vec<Issue>) {
    if let CudaDevices::List(l) = &g.cuda_visible_devices {
        let unique: BTreeSet<_> = l.iter().collect();
        if l.is_empty() {
            v.push(Issue::error(
                path.key("cudaVisibleDevices"),
                "must be `all` or a non-empty list of device indices",
            ));
        } else if unique.len() != l.len() {
            v.push(Issue::error(
                path.key("cudaVisibleDevices"),
                "lists a device twice",
            ));
        } else if l.iter().any(|d| *d > 63) {
            v.push(Issue::error(
                path.key("cudaVisibleDevices"),
                "device indices must be below 64",
            ));
        }
    }
    let f = g.memory_fraction;
    // From 0.01 up, the rendered decimal stays short enough for the agent's reader.
    if !(f.is_finite() && (0.01..=1.0).contains(&f)) {
        v.push(Issue::error(
            path.key("memoryFraction"),
            format!("must be in [0.01, 1], found {f}"),
        ));
    }
    if g.dcgm_exporter && !g.enabled {
        v.push(
            Issue::warning(
                path.key("dcgmExporter"),
                "the DCGM exporter has nothing to export while `gpu.enabled` is false",
            )
            .reading(path.key("enabled")),
        );
    }
}

fn check_elasticity(e: &ElasticitySpec, path: &FieldPath, v: &mut Vec<Issue>) {
    let policies = path.key("policies");
    if e.policies.is_empty() {
        v.push(Issue::error(policies.clone(), "needs at least one policy"));
    }
    for (i, p) in e.policies.iter().enumerate() {
        let pp = policies.index(i);
        if let Err(msg) = check_expression(&p.expression) {
            v.push(Issue::error(pp.key("expression"), msg));
        }
        match p.kind {
            AdjustmentType::Cardinality if p.adjust < 0 => v.push(
                Issue::error(
                    pp.key("adjust"),
                    "a CARDINALITY adjustment is a node count and cannot be negative",
                )
                .reading(pp.key("type")),
            ),
            AdjustmentType::Change | AdjustmentType::PercentageChange if p.adjust == 0 => v.push(
                Issue::error(
                    pp.key("adjust"),
                    "an adjustment of 0 never changes anything",
                )
                .reading(pp.key("type")),
            ),
            _ => {}
        }
        if p.min_adjust_step == Some(0) {
            v.push(Issue::error(pp.key("minAdjustStep"), "must be at least 1"));
        }
        if p.min_adjust_step.is_some() && p.kind != AdjustmentType::PercentageChange {
            v.push(
                Issue::warning(
                    pp.key("minAdjustStep"),
                    "only PERCENTAGE_CHANGE policies use minAdjustStep",
                )
                .reading(pp.key("type")),
            );
        }
        check_positive_duration(p.period, pp.key("period"), v);
    }
}

/// Checks a OneFlow elasticity expression: comparisons (`==`/`=`, `!=`/`<>`, `>`, `>=`,
/// `<`, `<=`) of attribute names and numbers, combined with `&&`/`&`, `||`/`|`, `!` and
/// parentheses (opennebula-api.md §2.7).
pub fn check_expression(expr: &str) -> Result<(), String> {
    if expr.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if expr.len() > 1024 {
        return Err("is longer than 1024 characters".into());
    }
    let tokens = tokenize(expr)?;
    let mut p = ExprParser {
        t: &tokens,
        i: 0,
        depth: 0,
    };
    p.or()?;
    if p.i != tokens.len() {
        return Err(format!(
            "unexpected `{}` in expression `{}`",
            tokens[p.i].text(),
            printable(expr)
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Num(String),
    Cmp(&'static str),
    And,
    Or,
    Not,
    Open,
    Close,
}

impl Tok {
    fn text(&self) -> String {
        match self {
            Tok::Ident(s) | Tok::Num(s) => s.clone(),
            Tok::Cmp(s) => (*s).to_string(),
            Tok::And => "&&".into(),
            Tok::Or => "||".into(),
            Tok::Not => "!".into(),
            Tok::Open => "(".into(),
            Tok::Close => ")".into(),
        }
    }
}

fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let two = |a: char| next == Some(a);
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => (out.push(Tok::Open), i += 1).1,
            ')' => (out.push(Tok::Close), i += 1).1,
            '&' => (out.push(Tok::And), i += if two('&') { 2 } else { 1 }).1,
            '|' => (out.push(Tok::Or), i += if two('|') { 2 } else { 1 }).1,
            '!' if two('=') => (out.push(Tok::Cmp("!=")), i += 2).1,
            '!' => (out.push(Tok::Not), i += 1).1,
            '=' => (out.push(Tok::Cmp("==")), i += if two('=') { 2 } else { 1 }).1,
            '<' if two('>') => (out.push(Tok::Cmp("!=")), i += 2).1,
            '<' if two('=') => (out.push(Tok::Cmp("<=")), i += 2).1,
            '<' => (out.push(Tok::Cmp("<")), i += 1).1,
            '>' if two('=') => (out.push(Tok::Cmp(">=")), i += 2).1,
            '>' => (out.push(Tok::Cmp(">")), i += 1).1,
            c if c.is_ascii_digit() || c == '-' || c == '.' => {
                let start = i;
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                let n: String = chars[start..i].iter().collect();
                if n.parse::<f64>().is_err() {
                    return Err(format!("`{}` is not a number", printable(&n)));
                }
                out.push(Tok::Num(n));
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                out.push(Tok::Ident(chars[start..i].iter().collect()));
            }
            other => {
                return Err(format!(
                    "character `{}` is not allowed in an expression",
                    other.escape_debug()
                ))
            }
        }
    }
    Ok(out)
}

struct ExprParser<'a> {
    t: &'a [Tok],
    i: usize,
    depth: usize,
}

impl ExprParser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i)
    }

    fn or(&mut self) -> Result<(), String> {
        self.and()?;
        while self.peek() == Some(&Tok::Or) {
            self.i += 1;
            self.and()?;
        }
        Ok(())
    }

    fn and(&mut self) -> Result<(), String> {
        self.unary()?;
        while self.peek() == Some(&Tok::And) {
            self.i += 1;
            self.unary()?;
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > 64 {
            return Err("expression nests too deeply".into());
        }
        let r = match self.peek() {
            Some(Tok::Not) => {
                self.i += 1;
                self.unary()
            }
            Some(Tok::Open) => {
                self.i += 1;
                self.or()?;
                if self.peek() != Some(&Tok::Close) {
                    return Err("missing `)`".into());
                }
                self.i += 1;
                Ok(())
            }
            _ => self.comparison(),
        };
        self.depth -= 1;
        r
    }

    fn operand(&mut self) -> Result<(), String> {
        match self.peek() {
            Some(Tok::Ident(_) | Tok::Num(_)) => {
                self.i += 1;
                Ok(())
            }
            Some(t) => Err(format!(
                "expected an attribute name or a number, found `{}`",
                t.text()
            )),
            None => Err("expression ends too early".into()),
        }
    }

    fn comparison(&mut self) -> Result<(), String> {
        self.operand()?;
        match self.peek() {
            Some(Tok::Cmp(_)) => self.i += 1,
            _ => return Err("expected a comparison such as `FL_CLIENT_STATUS > 1.5`".into()),
        }
        self.operand()
    }
}

fn check_training(t: &TrainingSpec, nodes: &SuperNodesSpec, path: &FieldPath, v: &mut Vec<Issue>) {
    for (name, value) in [
        ("numRounds", t.num_rounds),
        ("minFitClients", t.min_fit_clients),
        ("minEvaluateClients", t.min_evaluate_clients),
        ("minAvailableClients", t.min_available_clients),
    ] {
        if value < 1 {
            v.push(Issue::error(path.key(name), "must be at least 1"));
        }
    }
    let all_nodes = nodes.count + nodes.sites.iter().map(|s| s.count).sum::<u32>();
    if t.min_available_clients > all_nodes {
        v.push(Issue::warning(
            path.key("minAvailableClients"),
            format!(
                "{} clients are required but only {} SuperNodes are deployed: runs wait until enough nodes connect",
                t.min_available_clients, all_nodes
            ),
        ).reading(FieldPath::parse("spec.supernodes.count")));
    }
    for (name, value) in [
        ("minFitClients", t.min_fit_clients),
        ("minEvaluateClients", t.min_evaluate_clients),
    ] {
        if value > t.min_available_clients {
            v.push(
                Issue::warning(
                    path.key(name),
                    format!(
                        "larger than minAvailableClients ({})",
                        t.min_available_clients
                    ),
                )
                .reading(path.key("minAvailableClients")),
            );
        }
    }
    check_strategy(
        &t.strategy,
        t.min_available_clients,
        &path.key("strategy"),
        v,
    );
    let cp = path.key("checkpointing");
    if t.checkpointing.interval < 1 {
        v.push(Issue::error(cp.key("interval"), "must be at least 1"));
    }
    if !vm_path::is_absolute_path(&t.checkpointing.path) {
        v.push(Issue::error(cp.key("path"), vm_path::RULE));
    } else if let Some(why) = vm_path::protected_problem(&t.checkpointing.path) {
        v.push(Issue::error(cp.key("path"), why));
    }
    let rc = path.key("runConfig");
    if let Err((k, why)) = config_kv::check_key_set(t.run_config.keys().map(String::as_str)) {
        v.push(Issue::error(rc.key(&k), format!("key {why}")));
    }
    for (k, val) in &t.run_config {
        match val {
            ConfigValue::String(s) => check_config_entry(k, &rc, s, v),
            ConfigValue::Float(f) if !f.is_finite() => {
                v.push(Issue::error(rc.key(k), "must be a finite number"))
            }
            _ => check_config_entry(k, &rc, "0", v),
        }
    }
}

fn check_strategy(s: &StrategySpec, min_available: u32, path: &FieldPath, v: &mut Vec<Issue>) {
    use crate::protocol::run_config::{check_param, malicious_need, Param};
    for (x, name, p) in [
        (s.proximal_mu, "proximalMu", Param::ProximalMu),
        (
            s.server_learning_rate,
            "serverLearningRate",
            Param::ServerLr,
        ),
        (
            s.client_learning_rate,
            "clientLearningRate",
            Param::ClientLr,
        ),
        (s.trim_beta, "trimBeta", Param::TrimBeta),
        (s.fraction_train, "fractionTrain", Param::FractionTrain),
        (
            s.fraction_evaluate,
            "fractionEvaluate",
            Param::FractionEvaluate,
        ),
    ] {
        if let Some(x) = x {
            if let Err(rule) = check_param(p, x) {
                v.push(Issue::error(
                    path.key(name),
                    format!("must be {rule}, found {x}"),
                ));
            }
        }
    }
    let f = s.num_malicious_clients.unwrap_or(0);
    let strategy = s.name.as_str();
    if let Some((need, formula)) = malicious_need(strategy, f) {
        if u64::from(min_available) < need {
            v.push(Issue::error(
                path.key("numMaliciousClients"),
                format!(
                    "{:?} tolerating {f} malicious clients needs minAvailableClients ≥ {formula} = {need}, found {min_available}",
                    s.name
                ),
            )
            .reading(path.key("name"))
            .reading(FieldPath::parse("spec.training.minAvailableClients")));
        }
    }
    let unused = |set: bool, name: &str, used_by: &[StrategyName], v: &mut Vec<Issue>| {
        if set && !used_by.contains(&s.name) {
            v.push(
                Issue::warning(path.key(name), format!("{:?} does not use {name}", s.name))
                    .reading(path.key("name")),
            );
        }
    };
    use StrategyName::*;
    unused(s.proximal_mu.is_some(), "proximalMu", &[FedProx], v);
    unused(
        s.server_learning_rate.is_some(),
        "serverLearningRate",
        &[FedAdam],
        v,
    );
    unused(
        s.client_learning_rate.is_some(),
        "clientLearningRate",
        &[FedAdam],
        v,
    );
    unused(
        s.num_malicious_clients.is_some(),
        "numMaliciousClients",
        &[Krum, Bulyan],
        v,
    );
    unused(s.trim_beta.is_some(), "trimBeta", &[FedTrimmedAvg], v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grace_period_must_cover_three_heartbeats_and_a_poll() {
        let policy = |grace: u64, beat: u64| FailurePolicy {
            grace_period: HumanDuration::from_secs(grace),
            heartbeat_interval: HumanDuration::from_secs(beat),
            ..FailurePolicy::default()
        };
        let poll = std::time::Duration::from_secs(2);
        assert_eq!(grace_margin_problem(&policy(8, 2), poll), None);
        let p = grace_margin_problem(&policy(7, 2), poll).expect("7s < 3 × 2s + 2s");
        assert!(
            p.contains(
                "(7s) is shorter than 3 × heartbeatInterval (2s) + the poll interval (2s) = 8s"
            ),
            "{p}"
        );
        // The defaults (10m grace, 30s heartbeats) hold for any poll up to 8m30s.
        let d = FailurePolicy::default();
        assert_eq!(
            grace_margin_problem(&d, std::time::Duration::from_secs(510)),
            None
        );
        assert!(grace_margin_problem(&d, std::time::Duration::from_secs(511)).is_some());
    }

    #[test]
    fn expressions_follow_the_oneflow_grammar() {
        for ok in [
            "FL_CLIENT_STATUS > 1.5",
            "CPU>=80 && !(MEMORY < 10) || X = 1",
            "A <> 2 & B != -3 | C == 4",
        ] {
            assert_eq!(check_expression(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "  ",
            "CPU >",
            "CPU > 1 &&",
            "$(reboot) > 1",
            "(A > 1",
            "A B",
            "> 3",
            "A > 1)",
        ] {
            assert!(check_expression(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn remote_sites_are_checked_with_their_field_paths() {
        let mut c = crate::plan::tests::spec(
            "fl",
            serde_json::json!({
                "tls": {"extraNames": ["10.10.9.1", "hub.example.org"]},
                "supernodes": {"sites": [
                    {"site": "b", "count": 1, "templates": {"supernode": 3}, "network": 4,
                     "superlinkAddress": "10.10.9.1:9092"},
                    {"site": "c", "count": 2, "templates": {"supernode": 3}, "network": 4,
                     "superlinkAddress": "HUB.example.org:443"}
                ]}
            }),
        );
        let errors = |c: &FlowerCluster| -> Vec<String> {
            validate(c)
                .into_iter()
                .filter(|i| i.severity == Severity::Error)
                .map(|i| format!("{}: {}", i.path, i.message))
                .collect()
        };
        assert_eq!(errors(&c), Vec::<String>::new());
        let mut stateless = c.clone();
        stateless.spec.superlink.persistent_state = false;
        assert!(
            errors(&stateless).iter().any(|l| l.starts_with(
                "spec.supernodes.sites: SuperNodes in other sites need superlink.persistentState"
            )),
            "{:?}",
            errors(&stateless)
        );
        stateless.spec.tls.enabled = false;
        stateless.spec.tls.extra_names.clear();
        stateless
            .spec
            .supernodes
            .sites
            .iter_mut()
            .for_each(|s| s.superlink_address = None);
        assert_eq!(
            errors(&stateless),
            Vec::<String>::new(),
            "without TLS nothing authenticates"
        );
        fn sites(c: &mut FlowerCluster) -> &mut Vec<SiteSuperNodes> {
            &mut c.spec.supernodes.sites
        }
        sites(&mut c)[1].site = "b".into();
        sites(&mut c)[0].superlink_address = Some("10.10.9.2:9092".into());
        sites(&mut c)[0].min = 0;
        sites(&mut c)[0].max = 0;
        let e = errors(&c);
        for want in [
            "spec.supernodes.sites[1].site: site \"b\" is listed twice",
            "spec.supernodes.sites[0].superlinkAddress: 10.10.9.2 is not in tls.extraNames",
            "spec.supernodes.sites[0].min: must be at least 1",
            "spec.supernodes.sites[0].max: max (0) must be at least count (1)",
        ] {
            assert!(
                e.iter().any(|l| l.starts_with(want)),
                "{want} not in {e:#?}"
            );
        }
        let mut c2 = c.clone();
        sites(&mut c2)[0] = sites(&mut c.clone())[1].clone();
        sites(&mut c2)[0].site = "Not_A_Label".into();
        sites(&mut c2)[1].site = "a-very-long-site-name-x".into();
        sites(&mut c2)[1].superlink_address = Some("no-port".into());
        let e = errors(&c2);
        assert!(
            e.iter().any(|l| l.starts_with("spec.supernodes.sites[0].site:") && l.contains("DNS label")),
            "{e:#?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("spec.supernodes.sites[1].site:")),
            "{e:#?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("spec.supernodes.sites[1].superlinkAddress:")),
            "{e:#?}"
        );
        // Without TLS there is no certificate to match, and a long cluster name is caught.
        let mut plain = c.clone();
        plain.spec.tls.enabled = false;
        plain.spec.tls.extra_names.clear();
        sites(&mut plain)[1].site = "c".into();
        assert_eq!(
            errors(&plain)
                .iter()
                .filter(|l| l.contains("superlinkAddress"))
                .count(),
            0
        );
        plain.metadata.name = "x".repeat(62);
        let e = errors(&plain);
        assert!(e.iter().any(|l| l.contains("longer than 63")), "{e:#?}");
    }

    fn node_config_issues(pairs: &[(&str, &str)]) -> Vec<Issue> {
        let s = SuperNodesSpec {
            node_config: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..SuperNodesSpec::default()
        };
        let mut v = Vec::new();
        check_supernodes(&s, &FieldPath::parse("spec.supernodes"), &mut v);
        v
    }

    #[test]
    fn node_config_uses_the_agents_alphabet() {
        assert_eq!(
            node_config_issues(&[("data", "data:/mnt/x+y"), ("lr", "1e-3")]),
            vec![]
        );
        for (k, val) in [
            ("a", "a=b\nONEAPP_X=1"),
            ("a", "$(reboot)"),
            ("a", "`id`"),
            ("a", "a b"),
            ("a", "\"q\""),
            ("a", "x;y"),
            ("a", ""),
            ("a..b", "1"),
            (".a", "1"),
        ] {
            assert_eq!(node_config_issues(&[(k, val)]).len(), 1, "{k}={val:?}");
        }
        let conflict = node_config_issues(&[("a", "1"), ("a.b", "2")]);
        assert_eq!(conflict.len(), 1, "{conflict:?}");
        assert_eq!(
            conflict[0].path.to_string(),
            "spec.supernodes.nodeConfig.a.b"
        );
    }
}
