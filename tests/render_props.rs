//! Property tests: any spec that validates renders to a template OneFlow accepts (both
//! dialects), and the loader never panics on arbitrary or mutated input.

mod oneflow_rules;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flower_reconcile::api::load::load_text;
use flower_reconcile::api::validate::{validate, Severity};
use flower_reconcile::api::*;
use flower_reconcile::render::{
    render, NetworkBinding, OneFlowDialect, Purpose, RenderOptions, RoleTemplateIds,
};
use oneflow_rules::{check_service_template, Dialect};
use proptest::prelude::*;

fn policy() -> impl Strategy<Value = ElasticityPolicy> {
    (
        prop_oneof![
            Just(AdjustmentType::Change),
            Just(AdjustmentType::Cardinality),
            Just(AdjustmentType::PercentageChange)
        ],
        prop_oneof![9 => 1i32..6, 1 => -3i32..1],
        prop_oneof![
            3 => Just("FL_CLIENT_STATUS > 1.5".to_string()),
            3 => Just("CPU >= 80 && !(MEMORY < 10)".to_string()),
            3 => Just("(A = 1) || B <> 2".to_string()),
            1 => Just("".to_string()),
            1 => Just("LOAD >".to_string()),
            3 => "[A-Z_]{1,8} (>|<|>=|<=|==|!=) [0-9]{1,3}(\\.[0-9])?",
        ],
        0u32..5,
        1u64..900,
        proptest::option::of(1u32..4),
        proptest::option::of(0u64..900),
    )
        .prop_map(
            |(kind, adjust, expression, period_number, period, step, cooldown)| ElasticityPolicy {
                kind,
                adjust,
                expression,
                period_number,
                period: HumanDuration::from_secs(period),
                min_adjust_step: step,
                cooldown: cooldown.map(HumanDuration::from_secs),
            },
        )
}

fn config_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(
        prop_oneof![20 => "[a-z][a-z0-9._-]{0,10}", 1 => Just("bad key".to_string())],
        prop_oneof![20 => "[A-Za-z0-9._:/+-]{1,12}", 1 => Just("$(reboot)".to_string()), 1 => Just("a=b\nX=1".to_string())],
        0..4,
    )
}

prop_compose! {
    fn cluster()(
        name in prop_oneof![20 => "[a-z]([a-z0-9-]{0,20}[a-z0-9])?", 1 => Just("Bad_Name".to_string())],
        sizes in (1u32..12, 1u32..12, 1u32..12),
        resources in (1u32..16, 512u32..16384, 1u32..16, 512u32..65536),
        ports in (1u16.., 1u16.., 1u16.., 1u16..),
        templates in (0u32..1000, 0u32..1000, 0u32..100),
        elasticity in proptest::option::of((0u64..1200, proptest::collection::vec(policy(), 0..3))),
        node_config in config_map(),
        gpu in (any::<bool>(), prop_oneof![Just(CudaDevices::All), proptest::collection::btree_set(0u32..8, 1..3).prop_map(|s| CudaDevices::List(s.into_iter().collect()))], prop_oneof![9 => 0.05f64..=1.0, 1 => 0.0f64..1.5], any::<bool>()),
        tls in (any::<bool>(), 1000u64..20000, 1u64..1200),
        oneflow in (any::<bool>(), any::<bool>(), any::<bool>()),
        training in (1u32..10, 0u32..2, 1u32..3),
    ) -> FlowerCluster {
        let mut s = [sizes.0, sizes.1, sizes.2];
        // Mostly ordered sizes (valid), sometimes as drawn.
        if sizes.0 % 8 != 0 { s.sort(); }
        let mut spec: FlowerClusterSpec = serde_json::from_value(serde_json::json!({
            "opennebula": {"templates": {"superlink": templates.0, "supernode": templates.1}, "network": templates.2}
        })).expect("minimal spec");
        spec.supernodes.min = s[0];
        spec.supernodes.count = s[1];
        spec.supernodes.max = s[2];
        spec.superlink.vcpu = resources.0;
        spec.superlink.memory = resources.1;
        spec.supernodes.vcpu = resources.2;
        spec.supernodes.memory = resources.3;
        spec.superlink.ports = SuperLinkPorts { fleet: ports.0, control: ports.1, serverappio: ports.2 };
        spec.superlink.metrics = MetricsSpec { enabled: ports.3 % 2 == 0, port: ports.3 };
        spec.supernodes.elasticity = elasticity.map(|(c, policies)| ElasticitySpec { cooldown: HumanDuration::from_secs(c), policies });
        spec.supernodes.node_config = node_config;
        spec.supernodes.gpu = GpuSpec { enabled: gpu.0, cuda_visible_devices: gpu.1, memory_fraction: gpu.2, dcgm_exporter: gpu.3 };
        spec.tls.enabled = tls.0;
        spec.tls.validity = HumanDuration::from_hours(tls.1);
        spec.tls.renew_before = HumanDuration::from_hours(tls.2);
        spec.opennebula.oneflow.deployment = if oneflow.0 { Deployment::Straight } else { Deployment::None };
        spec.opennebula.oneflow.ready_status_gate = oneflow.1;
        spec.opennebula.oneflow.shutdown_action = if oneflow.2 { ShutdownAction::Terminate } else { ShutdownAction::TerminateHard };
        spec.training.min_available_clients = training.0;
        spec.training.strategy.name = if training.1 == 0 { StrategyName::FedAvg } else { StrategyName::Krum };
        spec.training.strategy.num_malicious_clients = (training.1 == 1).then_some(training.2 - 1);
        FlowerCluster {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: ObjectMeta { name, ..Default::default() },
            spec,
        }
    }
}

fn opts(c: &FlowerCluster, dialect: OneFlowDialect, hand: bool) -> RenderOptions {
    RenderOptions {
        dialect,
        purpose: if hand {
            Purpose::HandUsable
        } else {
            Purpose::Managed {
                controller_id: "prop".into(),
                signing_key: None,
            }
        },
        template_ids: RoleTemplateIds::from_spec(c).expect("numeric ids"),
        network: if hand {
            NetworkBinding::Input {
                name: "Private".into(),
                default_id: 0,
            }
        } else {
            NetworkBinding::Id(0)
        },
        extra_context: Default::default(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_global_rejects: 4_000, ..ProptestConfig::default() })]

    #[test]
    fn every_valid_spec_renders_to_a_template_oneflow_accepts(c in cluster(), hand in any::<bool>()) {
        let errors = validate(&c).into_iter().filter(|i| i.severity == Severity::Error).count();
        prop_assume!(errors == 0);
        for (dialect, rules) in [(OneFlowDialect::V6, Dialect::V6), (OneFlowDialect::V7, Dialect::V7)] {
            let r = render(&c, &opts(&c, dialect, hand)).expect("a valid spec renders");
            if let Err(e) = check_service_template(&r.service_template, rules) {
                prop_assert!(false, "{:?}: {}\n{}", dialect, e, serde_json::to_string_pretty(&r.service_template).unwrap());
            }
            let roles = r.service_template["roles"].as_array().unwrap();
            prop_assert_eq!(roles[1]["cardinality"].as_u64(), Some(u64::from(c.spec.supernodes.count)));
        }
    }

    #[test]
    fn invalid_specs_are_never_silently_accepted(c in cluster()) {
        // The rules the renderer relies on are enforced by validation itself.
        let ok = validate(&c).into_iter().all(|i| i.severity != Severity::Error);
        let n = &c.spec.supernodes;
        if ok {
            prop_assert!(1 <= n.min && n.min <= n.count && n.count <= n.max);
            prop_assert!(n.node_config.values().all(|v| !v.contains(['$', '\n', ' ', '"'])));
        }
    }

    #[test]
    fn the_loader_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = load_text(Path::new("fuzz.yaml"), &text);
    }

    #[test]
    fn the_loader_never_panics_on_nesting_quotes_comments_and_block_scalars(
        pieces in proptest::collection::vec(prop::sample::select(vec!["[", "]", "{", "}", "'", "\"", "\\", "# ", "|\n", ">-\n", "\n", "  ", "a: ", "- ", ",", "x"]), 0..400),
        depth in 0usize..80,
    ) {
        let text = format!("{}{}{}", "[".repeat(depth), pieces.concat(), "]".repeat(depth));
        let out = load_text(Path::new("nest.yaml"), &text);
        if depth > flower_reconcile::api::load::MAX_FLOW_DEPTH {
            // Unquoted, uncommented nesting past the limit at the start is always refused.
            prop_assert!(out.errors[0].message.contains("nested deeper than"), "{}", out.errors[0]);
        }
        prop_assert!(out.loaded.is_empty());
    }

    #[test]
    fn the_loader_never_panics_on_mutated_examples(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4, prop::sample::select(vec![":", "-", "[", "]", "{", "}", "\t", "\n", "#", "&a", "*a", "!!str", "|", ">", "'", "\"", "%", "@", "`", " ", "---\n", "<<: *a", "0", "null"])), 1..8),
    ) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("manifests/examples");
        let file = ["basic.yaml", "elastic.yaml", "tls-provided-gpu.yaml"][which];
        let mut text = std::fs::read_to_string(dir.join(file)).unwrap();
        for (at, op, piece) in edits {
            let mut i = at.index(text.len() + 1);
            while !text.is_char_boundary(i) { i -= 1; }
            match op {
                0 => text.insert_str(i, piece),
                1 => { let mut j = (i + 7).min(text.len()); while !text.is_char_boundary(j) { j -= 1; } text.replace_range(i..j, ""); }
                2 => text.truncate(i),
                _ => { let line: String = text[i..].lines().next().unwrap_or("").to_string(); text.insert_str(i, &format!("{line}\n")); }
            }
        }
        let out = load_text(&dir.join(file), &text);
        for l in &out.loaded {
            // Whatever survives mutation and validates must still render to a valid template.
            if let Some(ids) = RoleTemplateIds::from_spec(&l.cluster) {
                let o = RenderOptions { template_ids: ids, ..opts_for_ids(ids) };
                let r = render(&l.cluster, &o).expect("loaded specs render");
                prop_assert!(check_service_template(&r.service_template, Dialect::V7).is_ok());
            }
        }
        for e in &out.errors {
            prop_assert!(!e.to_string().contains("PRIVATE KEY"));
        }
    }
}

fn opts_for_ids(ids: RoleTemplateIds) -> RenderOptions {
    RenderOptions {
        dialect: OneFlowDialect::V7,
        purpose: Purpose::Managed {
            controller_id: "prop".into(),
            signing_key: None,
        },
        template_ids: ids,
        network: NetworkBinding::Id(0),
        extra_context: Default::default(),
    }
}
