use std::path::Path;

use super::*;
use crate::api::load::load_text;
use crate::protocol::context as ctx;

pub(crate) const SPEC: &str = "\
apiVersion: flower.opennebula.io/v1alpha1
kind: FlowerCluster
metadata: {name: demo}
spec:
  opennebula:
    templates: {superlink: 3, supernode: 4}
    network: 0
  supernodes:
    count: 3
    min: 2
    max: 5
    nodeConfig: {dataset: mnist, batch-size: '32'}
    elasticity:
      cooldown: 2m
      policies:
        - {type: CHANGE, adjust: 1, expression: 'FL_CLIENT_STATUS > 1.5'}
";

fn cluster() -> FlowerCluster {
    let out = load_text(Path::new("demo.yaml"), SPEC);
    assert_eq!(out.errors, vec![]);
    out.loaded.into_iter().next().unwrap().cluster
}

fn opts(dialect: OneFlowDialect) -> RenderOptions {
    RenderOptions {
        dialect,
        purpose: Purpose::Managed {
            controller_id: "ctl-1".into(),
            signing_key: None,
        },
        template_ids: RoleTemplateIds::from_spec(&cluster()).unwrap(),
        network: NetworkBinding::Id(0),
        extra_context: BTreeMap::new(),
    }
}

#[test]
fn v7_roles_carry_template_id_contents_and_context() {
    let r = render(&cluster(), &opts(OneFlowDialect::V7)).unwrap();
    let t = &r.service_template;
    assert_eq!(t["name"], "demo");
    assert_eq!(t["deployment"], "straight");
    assert_eq!(t["ready_status_gate"], true);
    let roles = t["roles"].as_array().unwrap();
    assert_eq!(roles[0]["name"], "superlink");
    assert_eq!(roles[0]["type"], "vm");
    assert_eq!(roles[0]["template_id"], 3);
    assert_eq!(
        (
            roles[0]["cardinality"].as_u64(),
            roles[0]["max_vms"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(roles[1]["parents"], json!(["superlink"]));
    assert_eq!(
        (
            roles[1]["min_vms"].as_u64(),
            roles[1]["cardinality"].as_u64(),
            roles[1]["max_vms"].as_u64()
        ),
        (Some(2), Some(3), Some(5))
    );
    assert_eq!(roles[1]["cooldown"], 120);
    assert_eq!(roles[1]["elasticity_policies"][0]["period"], 60);
    let c = &roles[1]["template_contents"]["CONTEXT"];
    assert_eq!(c["TOKEN"], "YES");
    assert_eq!(c["REPORT_READY"], "YES");
    assert_eq!(c[ctx::NODE_CONFIG], "batch-size=32 dataset=mnist");
    assert_eq!(c[ctx::CLUSTER_NAME], "demo");
    assert_eq!(roles[1]["template_contents"]["NIC"][0]["NETWORK_ID"], "0");
    assert_eq!(r.supernode_context[ctx::FRAMEWORK], "pytorch");
    assert_eq!(r.superlink_context[ctx::TLS_MODE], "auto");
}

#[test]
fn v6_roles_use_vm_template_and_a_template_string() {
    let r = render(&cluster(), &opts(OneFlowDialect::V6)).unwrap();
    let role = &r.service_template["roles"][1];
    assert_eq!(role["vm_template"], 4);
    assert!(role.get("type").is_none() && role.get("template_id").is_none());
    let text = role["vm_template_contents"].as_str().unwrap();
    assert!(text.contains("NIC = [ NETWORK_ID = \"0\" ]"), "{text}");
    assert!(
        text.contains("ONEAPP_FL_NODE_CONFIG = \"batch-size=32 dataset=mnist\""),
        "{text}"
    );
}

#[test]
fn managed_templates_carry_the_ownership_marker_and_hand_usable_ones_do_not() {
    let c = cluster();
    let r = render(&c, &opts(OneFlowDialect::V7)).unwrap();
    let owner = ownership::Ownership::from_body(&r.service_template).unwrap();
    assert_eq!(owner.cluster, "demo");
    assert_eq!(owner.controller, "ctl-1");
    assert_eq!(owner.spec_hash, spec_hash(&c));
    assert!(r.service_template["description"]
        .as_str()
        .unwrap()
        .contains("Managed by flower-reconcile"));
    let mut hand = opts(OneFlowDialect::V7);
    hand.purpose = Purpose::HandUsable;
    hand.network = NetworkBinding::Input {
        name: NETWORK_INPUT.into(),
        default_id: 0,
    };
    let r = render(&c, &hand).unwrap();
    assert_eq!(ownership::Ownership::from_body(&r.service_template), None);
    assert_eq!(
        r.service_template["networks"]["Private"],
        "M|network|Private network||id:0"
    );
    assert_eq!(
        r.service_template["roles"][0]["template_contents"]["NIC"][0]["NETWORK_ID"],
        "$Private"
    );
}

#[test]
fn spec_changes_change_the_marker_hash() {
    let a = cluster();
    let mut b = a.clone();
    b.spec.supernodes.count = 4;
    let ha = render(&a, &opts(OneFlowDialect::V7))
        .unwrap()
        .ownership
        .unwrap()
        .spec_hash;
    let hb = render(&b, &opts(OneFlowDialect::V7))
        .unwrap()
        .ownership
        .unwrap()
        .spec_hash;
    assert_ne!(ha, hb);
    assert_eq!(
        ha,
        render(&a, &opts(OneFlowDialect::V7))
            .unwrap()
            .ownership
            .unwrap()
            .spec_hash
    );
}

#[test]
fn unsafe_extra_context_is_refused_not_escaped() {
    let mut o = opts(OneFlowDialect::V6);
    o.extra_context
        .insert("ONEAPP_FL_RUNTIME".into(), "process\"\nX=1".into());
    assert!(matches!(
        render(&cluster(), &o),
        Err(RenderError::UnsafeContextValue(_))
    ));
    let mut o = opts(OneFlowDialect::V7);
    o.extra_context.insert("FOO".into(), "x".into());
    assert!(matches!(
        render(&cluster(), &o),
        Err(RenderError::BadContextName(_))
    ));
    let mut o = opts(OneFlowDialect::V7);
    o.extra_context
        .insert("ONEAPP_FL_RUNTIME".into(), "process".into());
    let r = render(&cluster(), &o).unwrap();
    assert_eq!(r.superlink_context["ONEAPP_FL_RUNTIME"], "process");
}

#[test]
fn the_runtime_is_rendered_explicitly_for_both_roles() {
    let r = render(&cluster(), &opts(OneFlowDialect::V7)).unwrap();
    assert_eq!(r.superlink_context[ctx::RUNTIME], "process");
    assert_eq!(r.supernode_context[ctx::RUNTIME], "process");
    let mut c = cluster();
    c.spec.runtime = crate::api::FlowerRuntime::Docker;
    let r = render(&c, &opts(OneFlowDialect::V6)).unwrap();
    assert_eq!(r.superlink_context[ctx::RUNTIME], "docker");
    assert_eq!(r.supernode_context[ctx::RUNTIME], "docker");
}

/// The edge profile (#18 item 4) reaches the SuperNodes as the seed's backoff variables;
/// without it discovery keeps the agent's prompt defaults (nothing rendered).
#[test]
fn the_edge_profile_renders_the_seeds_backoff_on_supernodes_only() {
    let r = render(&cluster(), &opts(OneFlowDialect::V7)).unwrap();
    assert!(!r.supernode_context.contains_key(ctx::EDGE_BACKOFF));
    assert!(!r.supernode_context.contains_key(ctx::EDGE_MAX_BACKOFF));
    let mut c = cluster();
    c.spec.supernodes.edge = Some(crate::api::EdgeSpec {
        max_backoff: crate::api::HumanDuration::from_secs(120),
        ..Default::default()
    });
    let r = render(&c, &opts(OneFlowDialect::V6)).unwrap();
    assert_eq!(r.supernode_context[ctx::EDGE_BACKOFF], "exponential");
    assert_eq!(r.supernode_context[ctx::EDGE_MAX_BACKOFF], "120");
    assert!(!r.superlink_context.contains_key(ctx::EDGE_BACKOFF));
}

#[test]
fn every_rendered_context_name_is_a_protocol_constant() {
    let mut c = cluster();
    c.spec.supernodes.edge = Some(crate::api::EdgeSpec::default());
    let r = render(&c, &opts(OneFlowDialect::V7)).unwrap();
    let known = [
        ctx::FLOWER_VERSION,
        ctx::TLS_ENABLED,
        ctx::LOG_LEVEL,
        ctx::LOG_FORMAT,
        ctx::ISOLATION,
        ctx::CLUSTER_NAME,
        ctx::HEARTBEAT_INTERVAL,
        ctx::FLEET_PORT,
        ctx::CONTROL_PORT,
        ctx::SERVERAPPIO_PORT,
        ctx::CONTROL_BIND,
        ctx::PERSISTENT_STATE,
        ctx::TLS_MODE,
        ctx::SSL_CA_CERTFILE,
        ctx::SSL_CERTFILE,
        ctx::SSL_KEYFILE,
        ctx::CERT_VALIDITY,
        ctx::CERT_RENEW_BEFORE,
        ctx::METRICS_ENABLED,
        ctx::METRICS_PORT,
        ctx::FRAMEWORK,
        ctx::NODE_CONFIG,
        ctx::MAX_RETRIES,
        ctx::MAX_WAIT_TIME,
        ctx::DATA_DIR,
        ctx::GPU_ENABLED,
        ctx::CUDA_VISIBLE_DEVICES,
        ctx::GPU_MEMORY_FRACTION,
        ctx::DCGM_ENABLED,
        ctx::RUNTIME,
        ctx::EDGE_BACKOFF,
        ctx::EDGE_MAX_BACKOFF,
    ];
    for k in r.superlink_context.keys().chain(r.supernode_context.keys()) {
        assert!(
            known.contains(&k.as_str()),
            "{k} is not in protocol::context"
        );
    }
}

#[test]
fn sealing_puts_the_key_in_both_dialects_and_the_digest_hides_secrets() {
    let seed = crate::protocol::signing::SigningSeed::generate().unwrap();
    for dialect in [OneFlowDialect::V6, OneFlowDialect::V7] {
        let mut o = opts(dialect);
        o.purpose = Purpose::Managed {
            controller_id: "ctl-1".into(),
            signing_key: Some(ownership::PENDING_PUBLIC_KEY.into()),
        };
        let planned = render(&cluster(), &o).unwrap().service_template;
        let sealed = ownership::seal(&planned, &seed);
        let text = sealed.to_string();
        assert!(!text.contains(ownership::PENDING_PUBLIC_KEY), "{text}");
        assert_eq!(text.matches(&seed.public_key()).count(), 1, "{text}");
        assert_eq!(
            ownership::signing_seed_of(&sealed).map(|s| s.to_base64()),
            Some(seed.to_base64())
        );
        // The digest ignores the sealing and changes with any rendered value.
        assert_eq!(
            digest_service_template(&planned),
            digest_service_template(&redact_signing(&sealed, &planned))
        );
        let mut other = planned.clone();
        other["name"] = json!("other");
        assert_ne!(
            digest_service_template(&planned),
            digest_service_template(&other)
        );
    }
}

/// `sealed` with the public key put back to what `planned` had (the seed stays).
fn redact_signing(sealed: &Value, planned: &Value) -> Value {
    let mut v = sealed.clone();
    v["roles"] = planned["roles"].clone();
    v
}

#[test]
fn stamped_context_reaches_every_role_in_both_dialects_and_unsafe_values_are_refused() {
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string();
    let vars = [
        (ctx::TRACEPARENT, tp.clone()),
        (ctx::OTLP_ENDPOINT, "http://otel:4318".to_string()),
    ];
    let v7 = render(&cluster(), &opts(OneFlowDialect::V7)).unwrap();
    let stamped = stamp_context(&v7.service_template, &vars).unwrap();
    for role in stamped["roles"].as_array().unwrap() {
        let c = &role["template_contents"]["CONTEXT"];
        assert_eq!(c[ctx::TRACEPARENT], tp.as_str());
        assert_eq!(c[ctx::OTLP_ENDPOINT], "http://otel:4318");
    }
    // Stamping again replaces, and the rest of the body is untouched.
    let again = stamp_context(&stamped, &[(ctx::TRACEPARENT, tp.replace("-01", "-00"))]).unwrap();
    assert_eq!(
        again["roles"][1]["template_contents"]["CONTEXT"][ctx::TRACEPARENT],
        tp.replace("-01", "-00").as_str()
    );
    let mut unstamped = stamped.clone();
    for role in unstamped["roles"].as_array_mut().unwrap() {
        let c = role["template_contents"]["CONTEXT"]
            .as_object_mut()
            .unwrap();
        c.remove(ctx::TRACEPARENT);
        c.remove(ctx::OTLP_ENDPOINT);
    }
    assert_eq!(unstamped, v7.service_template);

    let v6 = render(&cluster(), &opts(OneFlowDialect::V6)).unwrap();
    let stamped = stamp_context(&v6.service_template, &vars).unwrap();
    for role in stamped["roles"].as_array().unwrap() {
        let text = role["vm_template_contents"].as_str().unwrap();
        let context = text.lines().find(|l| l.starts_with("CONTEXT = [")).unwrap();
        assert!(context.ends_with(" ]"), "{context}");
        assert!(
            context.contains(&format!(", {} = \"{tp}\", ", ctx::TRACEPARENT)),
            "{context}"
        );
        assert!(context.contains(", ONEAPP_FL_OTLP_ENDPOINT = \"http://otel:4318\" ]"));
    }
    let again = stamp_context(&stamped, &[(ctx::TRACEPARENT, tp.replace("-01", "-00"))]).unwrap();
    let text = again["roles"][0]["vm_template_contents"].as_str().unwrap();
    assert_eq!(text.matches(ctx::TRACEPARENT).count(), 1, "{text}");
    assert!(text.contains(&tp.replace("-01", "-00")), "{text}");

    for (k, v) in [
        (ctx::TRACEPARENT, "a\" ]\nCPU = \"64".to_string()),
        (ctx::OTLP_ENDPOINT, "$(reboot)".to_string()),
        ("TOKEN", "YES".to_string()),
    ] {
        assert!(
            stamp_context(&v7.service_template, &[(k, v.clone())]).is_err(),
            "{k}={v:?}"
        );
    }
}

#[test]
fn each_role_carries_its_own_metrics_settings() {
    let r = render(&cluster(), &opts(OneFlowDialect::V7)).unwrap();
    for c in [&r.superlink_context, &r.supernode_context] {
        assert_eq!(c[ctx::METRICS_ENABLED], "NO");
        assert_eq!(c[ctx::METRICS_PORT], "9101");
    }
    let mut c = cluster();
    c.spec.superlink.metrics = crate::api::MetricsSpec {
        enabled: true,
        port: 9200,
    };
    c.spec.supernodes.metrics = crate::api::MetricsSpec {
        enabled: true,
        port: 9300,
    };
    let r = render(&c, &opts(OneFlowDialect::V6)).unwrap();
    assert_eq!(r.superlink_context[ctx::METRICS_ENABLED], "YES");
    assert_eq!(r.superlink_context[ctx::METRICS_PORT], "9200");
    assert_eq!(r.supernode_context[ctx::METRICS_ENABLED], "YES");
    assert_eq!(r.supernode_context[ctx::METRICS_PORT], "9300");
}
