//! The controller ⇄ agent contract, end to end in one process: any spec that validates
//! renders to contexts the agent's parser accepts, and the agent reads back exactly the
//! spec's values — for EVERY `ONEAPP_*` variable the renderer writes.
//!
//! Coverage is enumerated from the renderer, not from a list kept here: each rendered
//! variable must have a check in [`check_variable`] (a new variable without one fails every
//! case), and [`every_checked_variable_is_rendered_by_some_spec`] fails when a check names
//! a variable the renderer no longer writes.
//!
//! The other direction, agent → controller, for Flower's view of its nodes
//! (`FL_FLOWER_NODE_ID`, `FL_NODES_ONLINE`, #12 item 4c): what the agent writes, the
//! controller's attribute reader reads back exactly
//! ([`what_the_agent_publishes_about_its_nodes_the_controller_reads_back_exactly`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use flower_reconcile::agent::context::{self as agent, Config, Context};
use flower_reconcile::api::validate::{validate, Severity};
use flower_reconcile::api::*;
use flower_reconcile::protocol::context as ctx;
use flower_reconcile::protocol::san::San;
use flower_reconcile::protocol::signing::SigningSeed;
use flower_reconcile::render::{
    render, NetworkBinding, OneFlowDialect, Purpose, RenderOptions, RoleTemplateIds,
};
use proptest::prelude::*;

/// The checked-in example certificates, inlined the way the loader inlines them.
static PROVIDED: LazyLock<ProvidedTls> = LazyLock::new(|| {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/examples");
    let mut c = spec_with(|s| {
        s.tls.mode = TlsMode::Provided;
        s.tls.provided = Some(ProvidedTls {
            ca_cert: file("certs/ca.crt"),
            cert: file("certs/superlink.crt"),
            key: file("certs/superlink.key"),
        });
    });
    let issues = flower_reconcile::api::tls::resolve_provided(&mut c, &root, &root);
    assert!(issues.is_empty(), "example certificates: {issues:?}");
    c.spec.tls.provided.expect("inlined")
});

static SIGNING_KEY: LazyLock<String> =
    LazyLock::new(|| SigningSeed::generate().expect("random seed").public_key());

fn file(p: &str) -> PemSource {
    PemSource {
        file: Some(p.into()),
        inline: None,
    }
}

fn spec_with(f: impl FnOnce(&mut FlowerClusterSpec)) -> FlowerCluster {
    let mut spec: FlowerClusterSpec = serde_json::from_value(serde_json::json!({
        "opennebula": {"templates": {"superlink": 1, "supernode": 2}, "network": 0}
    }))
    .expect("minimal spec");
    f(&mut spec);
    FlowerCluster {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata: ObjectMeta {
            name: "rt".into(),
            ..Default::default()
        },
        spec,
    }
}

fn render_contexts(c: &FlowerCluster) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let r = render(
        c,
        &RenderOptions {
            dialect: OneFlowDialect::V7,
            purpose: Purpose::Managed {
                controller_id: "rt".into(),
                signing_key: Some(SIGNING_KEY.clone()),
            },
            template_ids: RoleTemplateIds {
                superlink: 1,
                supernode: 2,
            },
            network: NetworkBinding::Id(0),
            extra_context: BTreeMap::new(),
        },
    )
    .expect("a valid spec renders");
    (r.superlink_context, r.supernode_context)
}

fn read(context: &BTreeMap<String, String>) -> Config {
    Config::from_context(&Context::from_pairs(context.clone()))
        .unwrap_or_else(|e| panic!("the agent refuses a rendered context: {e}\n{context:#?}"))
}

/// What the agent read for `var` equals what the spec says; `None` when the variable has
/// no check (a gap in the contract's coverage).
fn check_variable(
    var: &str,
    role: &str,
    c: &FlowerCluster,
    cfg: &Config,
) -> Option<Result<(), String>> {
    let s = &c.spec;
    // Each role's agents get their own role's metrics settings.
    let metrics = match role {
        "superlink" => &s.superlink.metrics,
        _ => &s.supernodes.metrics,
    };
    let eq = |what: &str, got: String, want: String| {
        if got == want {
            Ok(())
        } else {
            Err(format!("{what}: agent read {got:?}, spec says {want:?}"))
        }
    };
    let json = |v: serde_json::Value| v.as_str().map(str::to_string).unwrap_or(v.to_string());
    let ser = |v: &dyn erased::Ser| json(v.json());
    let provided = || s.tls.provided.as_ref().expect("provided mode");
    let decoded = |p: &PemSource| {
        flower_reconcile::protocol::pem::decode(p.inline.as_deref().unwrap_or_default())
            .expect("inline PEM")
    };
    Some(match var {
        ctx::FLOWER_VERSION => eq(var, cfg.version.clone(), s.flower_version.clone()),
        ctx::CLUSTER_NAME => eq(
            var,
            cfg.cluster_name.clone().unwrap_or_default(),
            c.metadata.name.clone(),
        ),
        ctx::TLS_ENABLED => eq(var, cfg.tls.to_string(), s.tls.enabled.to_string()),
        ctx::HEARTBEAT_INTERVAL => eq(
            var,
            format!("{:?}", cfg.heartbeat_interval),
            format!("{:?}", s.supernodes.failure_policy.heartbeat_interval.get()),
        ),
        ctx::LOG_LEVEL => eq(var, cfg.log_level.as_str().into(), ser(&s.logging.level)),
        ctx::LOG_FORMAT => eq(var, ser(&cfg.log_format), ser(&s.logging.format)),
        ctx::RUNTIME => eq(var, ser(&cfg.runtime), ser(&s.runtime)),
        ctx::ISOLATION => eq(
            var,
            cfg.isolation.as_str().into(),
            ser(&s.superlink.isolation),
        ),
        ctx::FLEET_PORT => eq(
            var,
            cfg.fleet_port.to_string(),
            s.superlink.ports.fleet.to_string(),
        ),
        ctx::CONTROL_PORT => eq(
            var,
            cfg.control_port.to_string(),
            s.superlink.ports.control.to_string(),
        ),
        ctx::SERVERAPPIO_PORT => eq(
            var,
            cfg.serverappio_port.to_string(),
            s.superlink.ports.serverappio.to_string(),
        ),
        ctx::CONTROL_BIND => eq(
            var,
            ser(&cfg.control_bind),
            match s.superlink.control_api {
                ControlApiAccess::Loopback => "loopback",
                ControlApiAccess::Network => "vm",
            }
            .into(),
        ),
        ctx::PERSISTENT_STATE => eq(
            var,
            cfg.persistent_state.to_string(),
            s.superlink.persistent_state.to_string(),
        ),
        ctx::METRICS_ENABLED => eq(
            var,
            cfg.metrics_enabled.to_string(),
            metrics.enabled.to_string(),
        ),
        ctx::METRICS_PORT => eq(var, cfg.metrics_port.to_string(), metrics.port.to_string()),
        ctx::TLS_MODE => eq(var, ser(&cfg.tls_mode), ser(&s.tls.mode)),
        ctx::SSL_CA_CERTFILE => eq(
            var,
            cfg.ca_override.clone().unwrap_or_default(),
            decoded(&provided().ca_cert),
        ),
        ctx::SSL_CERTFILE => eq(
            var,
            cfg.provided
                .as_ref()
                .map(|p| p.cert_pem.clone())
                .unwrap_or_default(),
            decoded(&provided().cert),
        ),
        ctx::SSL_KEYFILE => eq(
            var,
            cfg.provided
                .as_ref()
                .map(|p| p.key_pem.0.clone())
                .unwrap_or_default(),
            decoded(&provided().key),
        ),
        ctx::CERT_VALIDITY => eq(
            var,
            format!("{:?}", cfg.cert_validity),
            format!("{:?}", s.tls.validity.get()),
        ),
        ctx::CERT_RENEW_BEFORE => eq(
            var,
            format!("{:?}", cfg.cert_renew_before),
            format!("{:?}", s.tls.renew_before.get()),
        ),
        ctx::CERT_EXTRA_SAN => eq(
            var,
            format!("{:?}", cfg.extra_san),
            format!(
                "{:?}",
                s.tls
                    .extra_names
                    .iter()
                    .map(|n| San::parse_name(n).expect("validated"))
                    .collect::<Vec<_>>()
            ),
        ),
        ctx::CONTROLLER_KEY => eq(
            var,
            format!("{:?}", cfg.controller_key),
            format!(
                "{:?}",
                flower_reconcile::protocol::signing::parse_public_key(&SIGNING_KEY).ok()
            ),
        ),
        ctx::FRAMEWORK => eq(
            var,
            cfg.framework.as_str().into(),
            ser(&s.supernodes.framework),
        ),
        ctx::NODE_CONFIG => eq(
            var,
            format!(
                "{:?}",
                cfg.node_config.as_ref().map(|n| n.entries().clone())
            ),
            format!("{:?}", Some(&s.supernodes.node_config)),
        ),
        ctx::MAX_RETRIES => eq(
            var,
            cfg.max_retries.to_string(),
            s.supernodes.reconnect.max_retries.to_string(),
        ),
        ctx::MAX_WAIT_TIME => eq(
            var,
            cfg.max_wait_time.to_string(),
            s.supernodes.reconnect.max_wait_time.to_string(),
        ),
        ctx::DATA_DIR => eq(
            var,
            cfg.data_dir.display().to_string(),
            s.supernodes.data_dir.clone(),
        ),
        ctx::GPU_ENABLED => eq(
            var,
            cfg.gpu_enabled.to_string(),
            s.supernodes.gpu.enabled.to_string(),
        ),
        ctx::CUDA_VISIBLE_DEVICES => eq(
            var,
            cfg.cuda_visible_devices.clone(),
            match &s.supernodes.gpu.cuda_visible_devices {
                CudaDevices::All => "all".into(),
                CudaDevices::List(l) => l.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
            },
        ),
        ctx::GPU_MEMORY_FRACTION => eq(
            var,
            cfg.gpu_memory_fraction.to_bits().to_string(),
            s.supernodes.gpu.memory_fraction.to_bits().to_string(),
        ),
        ctx::DCGM_ENABLED => eq(
            var,
            cfg.dcgm_enabled.to_string(),
            s.supernodes.gpu.dcgm_exporter.to_string(),
        ),
        _ => return None,
    })
}

/// Serialising either side's enums to their JSON names, without naming each type.
mod erased {
    pub trait Ser {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("serialisable")
        }
    }
}

/// Renders `c`, reads both contexts with the agent and checks every rendered variable.
/// Returns the variables seen.
fn round_trip(c: &FlowerCluster) -> Result<BTreeSet<String>, String> {
    let (link, node) = render_contexts(c);
    let mut seen = BTreeSet::new();
    for (role, context) in [("superlink", &link), ("supernode", &node)] {
        let cfg = read(context);
        for var in context.keys() {
            match check_variable(var, role, c, &cfg) {
                None => {
                    return Err(format!(
                        "the renderer writes {var} ({role}) but the round trip does not check \
                         it: add it to check_variable"
                    ))
                }
                Some(Err(e)) => return Err(format!("{role}: {e}")),
                Some(Ok(())) => {
                    seen.insert(var.clone());
                }
            }
        }
    }
    Ok(seen)
}

fn is_valid(c: &FlowerCluster) -> bool {
    validate(c).iter().all(|i| i.severity != Severity::Error)
}

fn duration() -> impl Strategy<Value = HumanDuration> {
    prop_oneof![
        (1u64..10_000).prop_map(HumanDuration::from_hours),
        (1u64..2_000_000).prop_map(HumanDuration::from_secs),
        (1u64..100_000).prop_map(|ms| HumanDuration(Duration::from_millis(ms))),
    ]
}

fn config_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(
        "[A-Za-z0-9_-]{1,8}(\\.[A-Za-z0-9_-]{1,6})?",
        prop_oneof![
            "[A-Za-z0-9._:/+-]{1,24}",
            Just("data:/mnt/x+y".to_string()),
            (any::<i32>()).prop_map(|n| n.to_string()),
            Just("1e-3".to_string()),
        ],
        0..5,
    )
}

prop_compose! {
    fn cluster()(
        name in "[a-z]([a-z0-9-]{0,30}[a-z0-9])?",
        version in (1u32..3, 0u32..100, 0u32..30),
        tls in (any::<bool>(), any::<bool>(), duration(), duration()),
        logging in (0usize..4, any::<bool>(), any::<bool>(), any::<bool>()),
        ports in (1u16.., 1u16.., 1u16.., 1u16.., any::<bool>()),
        link in (any::<bool>(), any::<bool>()),
        node_config in config_map(),
        reconnect in (any::<u32>(), any::<u32>()),
        data_dir in "/[A-Za-z0-9._+-]{1,12}(/[A-Za-z0-9_+-]{1,12}){0,3}",
        framework in 0usize..4,
        gpu in (any::<bool>(), prop_oneof![Just(CudaDevices::All), proptest::collection::btree_set(0u32..64, 1..4).prop_map(|s| CudaDevices::List(s.into_iter().collect()))], prop_oneof![0.01f64..=1.0, Just(1.0), Just(0.01)], any::<bool>()),
        heartbeat in (1u64..120),
        extra_names in proptest::collection::vec(prop_oneof![
            any::<std::net::Ipv4Addr>().prop_map(|ip| ip.to_string()),
            any::<std::net::Ipv6Addr>().prop_map(|ip| ip.to_string()),
            "[a-z]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z]{2,6}){0,2}",
        ], 0..3),
    ) -> FlowerCluster {
        let mut c = spec_with(|s| {
            s.flower_version = format!("{}.{}.{}", version.0, version.1, version.2);
            s.tls.enabled = tls.0;
            if tls.1 {
                s.tls.mode = TlsMode::Provided;
                s.tls.provided = Some(PROVIDED.clone());
            }
            s.tls.validity = tls.2.max(tls.3);
            s.tls.renew_before = tls.2.min(tls.3);
            if s.tls.enabled && !tls.1 {
                s.tls.extra_names = extra_names;
            }
            s.logging.level = [LogLevel::Debug, LogLevel::Info, LogLevel::Warning, LogLevel::Error][logging.0];
            s.logging.format = if logging.1 { LogFormat::Json } else { LogFormat::Text };
            s.superlink.isolation = if logging.2 { Isolation::Process } else { Isolation::Subprocess };
            s.runtime = if logging.3 { FlowerRuntime::Docker } else { FlowerRuntime::Process };
            s.superlink.ports = SuperLinkPorts { fleet: ports.0, control: ports.1, serverappio: ports.2 };
            s.superlink.metrics = MetricsSpec { enabled: ports.4, port: ports.3 };
            s.supernodes.metrics = MetricsSpec { enabled: !ports.4, port: ports.0 };
            s.superlink.persistent_state = link.0;
            s.superlink.control_api = if link.1 { ControlApiAccess::Network } else { ControlApiAccess::Loopback };
            s.supernodes.node_config = node_config;
            s.supernodes.reconnect.max_retries = reconnect.0;
            s.supernodes.reconnect.max_wait_time = reconnect.1;
            s.supernodes.data_dir = data_dir;
            s.supernodes.framework = [Framework::Pytorch, Framework::Tensorflow, Framework::Sklearn, Framework::None][framework];
            s.supernodes.gpu = GpuSpec { enabled: gpu.0, cuda_visible_devices: gpu.1, memory_fraction: gpu.2, dcgm_exporter: gpu.3 };
            s.supernodes.failure_policy.heartbeat_interval = HumanDuration::from_secs(heartbeat);
            s.supernodes.failure_policy.grace_period = HumanDuration::from_secs(heartbeat * 3 + 60);
        });
        c.metadata.name = name;
        c
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_valid_spec_renders_to_a_context_the_agent_reads_back_exactly(c in cluster()) {
        prop_assume!(is_valid(&c));
        if let Err(e) = round_trip(&c) {
            prop_assert!(false, "{}", e);
        }
    }

    #[test]
    fn what_the_agent_publishes_about_its_nodes_the_controller_reads_back_exactly(
        secs in 0i64..=4_102_444_800,
        ids in proptest::collection::btree_set(1u64.., 0..=64),
        own in 1u64..,
    ) {
        use flower_reconcile::plan::AgentAttributes;
        use flower_reconcile::protocol::{self as p, nodes::NodesOnline};
        let list = NodesOnline {
            at: chrono::DateTime::from_timestamp(secs, 0).expect("in range"),
            ids,
        };
        let (listed, own_id) = (list.encode(), own.to_string());
        let (read, problems) = AgentAttributes::parse([
            (p::FL_NODES_ONLINE, listed.as_str()),
            (p::FL_FLOWER_NODE_ID, own_id.as_str()),
        ]);
        prop_assert!(problems.is_empty(), "{:?}", problems);
        prop_assert_eq!(read.nodes_online, Some(list));
        prop_assert_eq!(read.flower_node_id, Some(own));
    }
}

#[test]
fn every_checked_variable_is_rendered_by_some_spec() {
    // One spec that turns on every optional variable: provided TLS (CA for both roles),
    // GPUs, a node config; one more for auto TLS (validity).
    let full = spec_with(|s| {
        s.tls.mode = TlsMode::Provided;
        s.tls.provided = Some(PROVIDED.clone());
        s.supernodes.gpu.enabled = true;
        s.supernodes.node_config = BTreeMap::from([("data".into(), "data:/mnt/x+y".into())]);
    });
    let auto = spec_with(|s| {
        s.tls.extra_names = vec!["203.0.113.10".into(), "flower.example.org".into()];
    });
    let mut seen = BTreeSet::new();
    for c in [&full, &auto] {
        assert!(is_valid(c), "{:?}", validate(c));
        seen.extend(round_trip(c).unwrap());
    }
    let checked: BTreeSet<String> = ctx::ALL
        .iter()
        .filter(|v| check_variable(v, "superlink", &full, &read(&BTreeMap::new())).is_some())
        .map(|v| v.to_string())
        .collect();
    assert_eq!(
        checked.difference(&seen).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "checks for variables the renderer never writes"
    );
}

#[test]
fn the_acceptance_alphabet_is_accepted_by_validate_and_the_agent() {
    let c = spec_with(|s| {
        s.supernodes.node_config = BTreeMap::from([
            ("data-path".into(), "data:/mnt/x+y".into()),
            ("dataset".into(), "mnist".into()),
            ("lr".into(), "1e-3".into()),
        ]);
    });
    assert!(is_valid(&c), "{:?}", validate(&c));
    round_trip(&c).unwrap();
    let (_, node) = render_contexts(&c);
    let nc = read(&node).node_config.unwrap();
    assert_eq!(
        nc.flower_arg(),
        "data-path=\"data:/mnt/x+y\" dataset=\"mnist\" lr=1e-3",
        "strings reach Flower as TOML strings, numbers as numbers"
    );
}

#[test]
fn the_agent_default_flower_version_is_the_specs() {
    assert_eq!(agent::DEFAULT_FLOWER_VERSION, DEFAULT_FLOWER_VERSION);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The seed's training variables → the SuperLink's `FL_RUN_CONFIG` → the controller's
    /// observation → `submit`'s entries: the same run configuration on both sides.
    #[test]
    fn training_variables_reach_submit_exactly(
        rounds in 1u32..=1_000_000,
        strategy in 0usize..6,
        avail in 3u32..=50,
        fit in 1u32..=50,
        mu in 0.0f64..100.0,
        lr in 1e-9f64..10.0,
        beta in 0.001f64..0.499,
        malicious in 0u32..=2,
        checkpoint in proptest::option::of(1u32..=100),
    ) {
        use flower_reconcile::protocol::run_config::{self, STRATEGIES};
        let strategy = STRATEGIES[strategy];
        let (r, a, f, m, l, b, c) = (
            rounds.to_string(), avail.to_string(), fit.to_string(), mu.to_string(),
            lr.to_string(), beta.to_string(), malicious.to_string(),
        );
        let mut pairs = vec![
            (ctx::RUNTIME, "docker"),
            (ctx::NUM_ROUNDS, r.as_str()),
            (ctx::STRATEGY, strategy),
            (ctx::MIN_AVAILABLE_CLIENTS, a.as_str()),
            (ctx::MIN_FIT_CLIENTS, f.as_str()),
            (ctx::PROXIMAL_MU, m.as_str()),
            (ctx::SERVER_LR, l.as_str()),
            (ctx::CLIENT_LR, l.as_str()),
            (ctx::TRIM_BETA, b.as_str()),
        ];
        // Krum/Bulyan need 2f+3 / 4f+3 available clients: stay inside the rule.
        if avail >= 4 * malicious + 3 {
            pairs.push((ctx::NUM_MALICIOUS, c.as_str()));
        }
        let interval = checkpoint.map(|i| i.to_string());
        if let Some(i) = &interval {
            pairs.push((ctx::CHECKPOINT_ENABLED, "YES"));
            pairs.push((ctx::CHECKPOINT_INTERVAL, i.as_str()));
        }
        let cfg = Config::from_context(&Context::from_pairs(pairs)).unwrap();
        let text = flower_reconcile::agent::node::published_run_config(
            &cfg,
            &flower_reconcile::agent::paths::Paths::new("/"),
        );
        let attribute = run_config::encode_attribute(&text);
        let (observed, problems) = flower_reconcile::plan::AgentAttributes::parse([(
            flower_reconcile::protocol::FL_RUN_CONFIG,
            attribute.as_str(),
        )]);
        prop_assert!(problems.is_empty(), "{:?}", problems);
        let entries = flower_reconcile::submit::run_config::parse_run_config(
            observed.run_config.as_deref().unwrap_or_default(),
        ).unwrap();
        let want: Vec<(String, ConfigValue)> = run_config::entries(&cfg.training)
            .into_iter()
            .map(|(k, v)| (k, flower_reconcile::submit::run_config::from_value(v)))
            .collect();
        prop_assert_eq!(entries.into_iter().collect::<Vec<_>>(), want);
    }

    /// The run-config reader is total on untrusted text (an `FL_RUN_CONFIG` any VM of the
    /// service can write): it answers, never panics.
    #[test]
    fn run_config_parsing_is_total(s in "[ -~]{0,300}", b in "[A-Za-z0-9+/=]{0,200}") {
        let _ = flower_reconcile::protocol::run_config::parse(&s);
        let _ = flower_reconcile::protocol::run_config::decode_attribute(&b);
    }
}
