//! The part derivation: pure, from the home spec and the home observation.

use super::*;
use crate::plan::simulate::healthy_vm;
use crate::plan::tests::{converged, desired, spec};
use crate::plan::Role;

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn home(patch: serde_json::Value) -> FlowerCluster {
    let mut p = serde_json::json!({
        "tls": {"extraNames": ["10.10.9.1"]},
        "supernodes": {"sites": [{
            "site": "b", "count": 2, "min": 1, "max": 4,
            "templates": {"supernode": "b-supernode"}, "network": 7,
            "superlinkAddress": "10.10.9.1:9092"
        }]}
    });
    if let (Some(a), serde_json::Value::Object(b)) = (p.as_object_mut(), patch) {
        a.extend(b);
    }
    spec("fl", p)
}

/// The home cluster converged, its SuperLink publishing `ca` (if any).
fn home_live(c: &FlowerCluster, ca: Option<&str>) -> LiveState {
    let mut live = converged(&desired(vec![c.clone()]));
    for s in live.clusters.values_mut().flatten() {
        for vm in &mut s.superlink.nodes {
            vm.attrs.ca_cert = ca.map(str::to_string);
        }
    }
    live
}

/// A well-formed node key made of byte `b`.
fn key(b: u8) -> NodePublicKey {
    let mut p = [b; 65];
    p[0] = 4;
    NodePublicKey::from_point(&p).unwrap()
}

fn ready(d: Option<PartDerivation>) -> SitePart {
    match d {
        Some(PartDerivation::Ready(p)) => *p,
        other => panic!("not ready: {other:?}"),
    }
}

#[test]
fn a_part_carries_the_home_superlinks_address_and_ca() {
    let c = home(serde_json::json!({}));
    let live = home_live(&c, Some(CA));
    let part = ready(derive_part(&c, &live, "b"));
    assert_eq!(part.name, "fl--b");
    assert_eq!((part.cluster.as_str(), part.site.as_str()), ("fl", "b"));
    assert_eq!(part.spec.metadata.name, "fl--b");
    let n = &part.spec.spec.supernodes;
    assert_eq!((n.count, n.min, n.max), (2, 1, 4));
    assert!(n.sites.is_empty(), "a part has no sites of its own");
    let o = &part.spec.spec.opennebula;
    assert_eq!(
        o.templates.supernode,
        crate::api::ObjectRef::Name("b-supernode".into())
    );
    assert_eq!(o.network, crate::api::ObjectRef::Id(7));
    let p = part.spec.spec.part.as_ref().unwrap();
    assert_eq!((p.cluster.as_str(), p.site.as_str()), ("fl", "b"));
    assert_eq!(p.superlink_address, "10.10.9.1:9092");
    assert_eq!(
        pem::decode_certificate(p.ca_cert.as_deref().unwrap()).unwrap(),
        CA
    );
    assert_eq!(part.spec_hash, crate::api::spec_hash(&part.spec));
    // Pure: the same inputs, the same part.
    assert_eq!(ready(derive_part(&c, &live, "b")), part);
    // Another site, or a spec without sites: no part.
    assert_eq!(derive_part(&c, &live, "c"), None);
    assert_eq!(
        derive_part(&spec("fl", serde_json::json!({})), &live, "b"),
        None
    );
}

#[test]
fn the_address_defaults_to_the_published_endpoint_and_tls_off_gives_no_ca() {
    let mut c = home(serde_json::json!({"tls": {"enabled": false}}));
    c.spec.supernodes.sites[0].superlink_address = None;
    let live = home_live(&c, None);
    let part = ready(derive_part(&c, &live, "b"));
    let p = part.spec.spec.part.unwrap();
    assert_eq!(
        (p.superlink_address.as_str(), p.ca_cert),
        ("10.0.0.1:9092", None)
    );
}

#[test]
fn a_part_waits_while_the_superlink_has_not_published() {
    let c = home(serde_json::json!({}));
    let waiting = |live: &LiveState| match derive_part(&c, live, "b") {
        Some(PartDerivation::Waiting { name, reason }) => {
            assert_eq!(name, "fl--b");
            reason
        }
        other => panic!("not waiting: {other:?}"),
    };
    // No home service yet.
    let r = waiting(&LiveState::default());
    assert!(r.contains("home cluster's service"), "{r}");
    // TLS on and no CA published.
    let r = waiting(&home_live(&c, None));
    assert!(r.contains("FL_CA_CERT"), "{r}");
    // The SuperLink not ready.
    let mut live = home_live(&c, Some(CA));
    for s in live.clusters.values_mut().flatten() {
        s.superlink.nodes[0].attrs.fl_ready = Some(false);
    }
    let r = waiting(&live);
    assert!(r.contains("FL_READY"), "{r}");
    // Only an outdated service (another SuperLink template: a redeploy underway) serves.
    let mut moved = c.clone();
    moved.spec.opennebula.templates.superlink = crate::api::ObjectRef::Name("other".into());
    match derive_part(&moved, &home_live(&c, Some(CA)), "b") {
        Some(PartDerivation::Waiting { reason, .. }) => {
            assert!(reason.contains("home cluster's service"), "{reason}")
        }
        other => panic!("not waiting: {other:?}"),
    }
}

#[test]
fn a_new_ca_changes_the_part() {
    let c = home(serde_json::json!({}));
    let a = ready(derive_part(&c, &home_live(&c, Some(CA)), "b"));
    let other = CA.replace("MIIB", "MIIC");
    let b = ready(derive_part(&c, &home_live(&c, Some(&other)), "b"));
    assert_ne!(a.spec_hash, b.spec_hash);
    let mut bigger = c.clone();
    bigger.spec.supernodes.sites[0].count = 3;
    let d = ready(derive_part(&bigger, &home_live(&c, Some(CA)), "b"));
    assert_ne!(a.spec_hash, d.spec_hash);
}

#[test]
fn parts_are_named_per_site_and_found_back() {
    assert_eq!(part_name("fl", "b"), "fl--b");
    assert_eq!(cluster_of_part("fl--b", "b"), Some("fl"));
    assert_eq!(cluster_of_part("my--fl--b", "b"), Some("my--fl"));
    assert_eq!(cluster_of_part("fl--b", "c"), None);
    assert_eq!(cluster_of_part("--b", "b"), None);
    assert_eq!(cluster_of_part("flb", "b"), None);
    let c = home(serde_json::json!({}));
    let live = home_live(&c, Some(CA));
    let parts = derive_parts([&c, &spec("x", serde_json::json!({}))], &live, "b");
    assert_eq!(parts.keys().collect::<Vec<_>>(), ["fl--b"]);
}

#[test]
fn site_node_keys_are_the_keys_of_that_parts_supernodes_while_they_are_in_it() {
    let part = home(serde_json::json!({}));
    let mut site = converged(&desired(vec![
        ready(derive_part(&part, &home_live(&part, Some(CA)), "b")).spec,
    ]));
    let s = &mut site.clusters.get_mut("fl--b").unwrap()[0];
    s.supernode.nodes = vec![healthy_vm(10, Role::Supernode, crate::plan::tests::t0()); 3];
    for (i, vm) in s.supernode.nodes.iter_mut().enumerate() {
        vm.id = 10 + i as u64;
        vm.attrs.node_pubkey = Some(key(i as u8 + 1));
    }
    // Powered off (or rebooting) is still in the part: its key stays, or it could never
    // come back (Flower never registers an unregistered key again).
    s.supernode.nodes[2].state = crate::plan::VmState::Poweroff;
    let keys = site_node_keys(&site, "fl--b");
    assert_eq!(keys, BTreeSet::from([key(1), key(2), key(3)]));
    // Gone from the part (replaced): its key goes.
    site.clusters.get_mut("fl--b").unwrap()[0]
        .supernode
        .nodes
        .truncate(2);
    assert_eq!(
        site_node_keys(&site, "fl--b"),
        BTreeSet::from([key(1), key(2)])
    );
    assert!(site_node_keys(&site, "other--b").is_empty());
}

#[test]
fn a_part_renders_supernodes_only_with_the_superlinks_address_and_ca() {
    use crate::protocol::context as ctx;
    use crate::render::{render, NetworkBinding, Purpose, RenderOptions, RoleTemplateIds};
    let c = home(serde_json::json!({}));
    let part = ready(derive_part(&c, &home_live(&c, Some(CA)), "b"));
    let opts = RenderOptions {
        dialect: crate::render::OneFlowDialect::for_major(7).unwrap(),
        purpose: Purpose::Managed {
            controller_id: "ctl".into(),
            signing_key: None,
        },
        template_ids: RoleTemplateIds {
            superlink: 3,
            supernode: 3,
        },
        network: NetworkBinding::Id(7),
        extra_context: Default::default(),
    };
    let r = render(&part.spec, &opts).unwrap();
    let roles = r.service_template["roles"].as_array().unwrap();
    assert_eq!(roles.len(), 1, "{roles:?}");
    assert_eq!(roles[0]["name"], "supernode");
    assert!(roles[0]
        .get("parents")
        .is_none_or(|p| p.as_array().is_some_and(Vec::is_empty)));
    assert_eq!(r.ownership.unwrap().cluster, "fl--b");
    assert_eq!(
        r.supernode_context[ctx::SUPERLINK_ADDRESS],
        "10.10.9.1:9092"
    );
    assert_eq!(
        pem::decode_certificate(&r.supernode_context[ctx::SSL_CA_CERTFILE]).unwrap(),
        CA
    );
    // The home cluster renders both roles and no fixed address.
    let home = render(&c, &opts).unwrap();
    assert_eq!(home.service_template["roles"].as_array().unwrap().len(), 2);
    assert!(!home.supernode_context.contains_key(ctx::SUPERLINK_ADDRESS));
}

#[test]
fn a_spec_file_cannot_claim_to_be_a_part() {
    let c = home(serde_json::json!({}));
    let part = ready(derive_part(&c, &home_live(&c, Some(CA)), "b"));
    let issues = crate::api::validate::validate(&part.spec);
    assert!(
        issues.iter().any(|i| i.path.to_string() == "spec.part"),
        "{issues:?}"
    );
    assert!(crate::api::validate::validate(&c)
        .iter()
        .all(|i| i.path.to_string() != "spec.part"));
}

#[test]
fn a_part_plans_no_superlink_and_is_ready_on_its_supernodes() {
    let c = home(serde_json::json!({}));
    let part = ready(derive_part(&c, &home_live(&c, Some(CA)), "b"));
    let d = desired(vec![part.spec.clone()]);
    let mut live = converged(&d);
    // As observed: the part's service has no SuperLink role.
    for s in live.clusters.values_mut().flatten() {
        s.superlink = Default::default();
    }
    let p = crate::plan::plan(&d, &live, crate::plan::tests::t0());
    assert!(!p.has_changes(), "{p:#?}");
    let r = crate::plan::cluster_readiness(&part.spec, &live, "fl--b");
    assert!(r.is_ready(), "{r:?}");
    // A new CA (the home cluster redeployed) replaces the part's service.
    let other = CA.replace("MIIB", "MIIC");
    let moved = ready(derive_part(&c, &home_live(&c, Some(&other)), "b"));
    let p = crate::plan::plan(&desired(vec![moved.spec]), &live, crate::plan::tests::t0());
    assert!(
        p.actions.iter().any(|a| a.one_line().contains("spec.part")
            || matches!(a.kind, crate::plan::ActionKind::Redeploy(_))),
        "{p:#?}"
    );
}

#[test]
fn site_keys_drop_only_on_a_view_of_every_site() {
    let group = |site: &str, addr: &str| {
        serde_json::json!({
            "site": site, "count": 1, "min": 1, "max": 2,
            "templates": {"supernode": "remote-supernode"}, "network": 7,
            "superlinkAddress": addr
        })
    };
    let c = home(serde_json::json!({
        "tls": {"extraNames": ["10.10.9.1", "10.10.9.2"]},
        "supernodes": {"sites": [group("b", "10.10.9.1:9092"), group("c", "10.10.9.2:9092")]}
    }));
    let mut live = home_live(&c, Some(CA));
    // The SuperLink holds key 1 (a node still in site b) and key 9 (one that left).
    for s in live.clusters.values_mut().flatten() {
        s.superlink.nodes[0].attrs.site_node_keys = Some(BTreeSet::from([key(1), key(9)]));
    }
    // A site's view: its part with one SuperNode publishing `k`.
    let view = |site: &str, k: u8| {
        let part = ready(derive_part(&c, &live, site)).spec;
        let mut v = converged(&desired(vec![part]));
        for s in v.clusters.values_mut().flatten() {
            s.supernode.nodes.truncate(1);
            s.supernode.nodes[0].attrs.node_pubkey = Some(key(k));
        }
        std::sync::Arc::new(v)
    };
    let (b, cc) = (view("b", 2), view("c", 3));
    // Site c never seen: b's key joins, nothing the SuperLink holds is dropped.
    let partial = wanted_site_keys(&c, &live, |s| (s == "b").then(|| b.clone()));
    assert_eq!(partial, BTreeSet::from([key(1), key(2), key(9)]));
    // Both seen: exactly their nodes' keys; 1 and 9 go.
    let whole = wanted_site_keys(&c, &live, |s| {
        Some(if s == "b" { b.clone() } else { cc.clone() })
    });
    assert_eq!(whole, BTreeSet::from([key(2), key(3)]));
    // A single-site cluster wants none.
    let single = home(serde_json::json!({"supernodes": {"count": 2}}));
    assert!(wanted_site_keys(&single, &live, |_| Some(b.clone())).is_empty());
}
