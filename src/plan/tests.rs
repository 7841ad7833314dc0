//! Planner unit and property tests.

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;

use super::simulate::{healthy_vm, simulate};
use super::*;
use crate::api::FlowerCluster;

pub(crate) fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0)
        .single()
        .unwrap_or_default()
}

pub(crate) fn spec(name: &str, patch: serde_json::Value) -> FlowerCluster {
    let mut v = serde_json::json!({
        "apiVersion": crate::api::API_VERSION,
        "kind": crate::api::KIND,
        "metadata": {"name": name},
        "spec": {
            "opennebula": {
                "templates": {"superlink": "flower-superlink", "supernode": "flower-supernode"},
                "network": "private"
            },
            "supernodes": {"count": 2}
        }
    });
    merge(&mut v["spec"], patch);
    serde_json::from_value(v).expect("test spec")
}

fn merge(into: &mut serde_json::Value, patch: serde_json::Value) {
    match (into, patch) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

pub(crate) fn desired(clusters: Vec<FlowerCluster>) -> DesiredState {
    DesiredState {
        clusters: clusters
            .into_iter()
            .map(|c| {
                let name = c.metadata.name.clone();
                let hash = crate::plan::live::hex(&{
                    use sha2::Digest;
                    sha2::Sha256::digest(serde_json::to_vec(&c.spec).unwrap_or_default())
                })[..16]
                    .to_string();
                (
                    name,
                    DesiredCluster {
                        cluster: c,
                        spec_hash: hash,
                        revision: "r1".into(),
                        site_node_keys: Default::default(),
                    },
                )
            })
            .collect(),
        held: Default::default(),
        complete: true,
        prune: Default::default(),
    }
}

/// The live state after the desired state was fully applied at `t0`.
pub(crate) fn converged(d: &DesiredState) -> LiveState {
    let live = LiveState::default();
    let p = plan(d, &live, t0());
    simulate(&p, d, &live, t0())
}

fn kinds(p: &Plan) -> Vec<&'static str> {
    p.actions.iter().map(|a| a.kind.verb()).collect()
}

/// The deferred actions of `p`: verb and what each waits for.
fn deferred(p: &Plan) -> Vec<(&'static str, WaitFor)> {
    p.actions
        .iter()
        .filter_map(|a| Some((a.kind.verb(), a.deferred.as_ref()?.until)))
        .collect()
}

fn service_mut<'a>(live: &'a mut LiveState, cluster: &str) -> &'a mut LiveService {
    live.clusters
        .get_mut(cluster)
        .and_then(|v| v.first_mut())
        .expect("service")
}

#[test]
fn an_absent_cluster_is_created_with_every_field_in_the_diff() {
    let d = desired(vec![spec("alpha", serde_json::json!({}))]);
    let p = plan(&d, &LiveState::default(), t0());
    assert_eq!(kinds(&p), ["create"]);
    let a = &p.actions[0];
    assert!(a.diff.iter().all(|c| c.before.is_none()));
    assert!(a
        .diff
        .iter()
        .any(|c| c.path == "spec.flowerVersion" && c.after.as_deref() == Some("1.25.0")));
    assert_eq!(
        p.summary().to_string(),
        "Plan: 1 to create, 0 to change, 0 to replace, 0 to destroy."
    );
}

#[test]
fn a_converged_cluster_plans_nothing() {
    let d = desired(vec![spec("alpha", serde_json::json!({}))]);
    let live = converged(&d);
    let p = plan(&d, &live, t0() + Duration::seconds(30));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert!(!p.has_changes());
}

#[test]
fn a_count_change_scales_in_place_without_a_template_update() {
    let d = desired(vec![spec("alpha", serde_json::json!({}))]);
    let live = converged(&d);
    let d5 = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 5}}),
    )]);
    let p = plan(&d5, &live, t0());
    assert_eq!(kinds(&p), ["scale"]);
    assert!(matches!(
        p.actions[0].kind,
        ActionKind::Scale {
            role: Role::Supernode,
            from: 2,
            to: 5,
            ..
        }
    ));
}

#[test]
fn scaling_waits_while_the_service_is_not_running() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 3}}),
    )]);
    let mut live = converged(&desired(vec![spec("alpha", serde_json::json!({}))]));
    service_mut(&mut live, "alpha").state = ServiceState::Cooldown;
    let p = plan(&d, &live, t0());
    // Deferred, not hidden: the scale is pending, shown with its reason, and not executable.
    assert_eq!(deferred(&p), [("scale", WaitFor::Cooldown)]);
    assert!(!p.has_changes() && p.has_pending_changes());
    assert_eq!(
        p.summary().to_string(),
        "Plan: 0 to create, 0 to change, 0 to replace, 0 to destroy; 1 deferred."
    );
    // Nothing pending while the service is busy: a plain wait, and no pending change.
    let p = plan(
        &desired(vec![spec("alpha", serde_json::json!({}))]),
        &live,
        t0(),
    );
    assert_eq!(kinds(&p), ["wait"]);
    assert!(!p.has_pending_changes());
}

/// Issue #13 item 3: a change that must wait is shown as a deferred action with its
/// reason, in text and JSON, and counts as pending for `--detailed-exitcode`.
#[test]
fn a_change_that_must_wait_is_shown_deferred_with_its_reason() {
    let d2 = desired(vec![spec("alpha", serde_json::json!({}))]);
    let d3 = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 3, "vcpu": 4}}),
    )]);
    for (state, until, why) in [
        (
            ServiceState::Deploying,
            WaitFor::Deploying,
            "the service is deploying",
        ),
        (
            ServiceState::Scaling,
            WaitFor::Scaling,
            "the service is scaling",
        ),
        (
            ServiceState::Cooldown,
            WaitFor::Cooldown,
            "OneFlow cooldown after scaling",
        ),
        (ServiceState::Warning, WaitFor::Warning, "is in WARNING"),
    ] {
        let mut live = converged(&d2);
        service_mut(&mut live, "alpha").state = state;
        let p = plan(&d3, &live, t0());
        let scale = p
            .actions
            .iter()
            .find(|a| matches!(a.kind, ActionKind::Scale { from: 2, to: 3, .. }))
            .unwrap_or_else(|| panic!("{state:?}: no scale in {:?}", p.actions));
        let d = scale.deferred.as_ref().expect("deferred");
        assert_eq!(d.until, until);
        assert!(d.reason.contains(why), "{state:?}: {}", d.reason);
        assert!(p.has_pending_changes(), "{state:?}");
        let text = render_text(&p, TextOptions::default());
        assert!(
            text.contains(&format!("~ scale supernode 2 → 3 (deferred: {}", d.reason)),
            "{text}"
        );
        assert!(!text.contains("No changes"), "{text}");
        let json = serde_json::to_value(render_json(&p)).expect("json");
        assert_eq!(json["has_pending_changes"], true);
        let j = json["actions"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["action"] == "scale"))
            .expect("scale in JSON");
        assert_eq!(j["deferred"]["reason"], d.reason.as_str());
        if state == ServiceState::Warning {
            // WARNING holds only scaling back: in-place updates go ahead.
            assert!(p
                .actions
                .iter()
                .any(|a| a.kind.verb() == "update_template" && a.is_executable()));
        } else {
            assert_eq!(
                deferred(&p),
                [("update_template", until), ("scale", until)],
                "{state:?}"
            );
            assert!(!p.has_changes());
        }
    }
}

#[test]
fn an_in_place_field_change_updates_the_template() {
    let d = desired(vec![spec("alpha", serde_json::json!({}))]);
    let live = converged(&d);
    let d2 = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"vcpu": 4}}),
    )]);
    let p = plan(&d2, &live, t0());
    assert_eq!(kinds(&p), ["update_template"]);
    let c = &p.actions[0].diff;
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].path, "spec.supernodes.vcpu");
    assert_eq!(
        (c[0].before.as_deref(), c[0].after.as_deref()),
        (Some("2"), Some("4"))
    );
    assert!(!c[0].forces_replacement);
}

/// Issue #18 item 5: with elasticity the controller does not fight OneFlow's autoscaler.
/// A count OneFlow moved within [min, max] plans nothing; only a count outside the bounds
/// is scaled (to the nearest bound); min, max and the policies are reconciled in place;
/// and `plan` says so in its text.
#[test]
fn an_elastic_role_keeps_oneflows_count_and_reconciles_only_min_max_and_policies() {
    let elastic = |max: u32, adjust: i64| {
        spec(
            "alpha",
            serde_json::json!({"supernodes": {"count": 2, "min": 1, "max": max,
                "elasticity": {"cooldown": "30s", "policies": [{"type": "CHANGE", "adjust": adjust,
                    "expression": "FL_CLIENT_STATUS > 1.5"}]}}}),
        )
    };
    let d = desired(vec![elastic(4, 1)]);
    let mut live = converged(&d);
    assert!(plan(&d, &live, t0()).actions.is_empty());
    // OneFlow scaled 2 → 3 (its VM is there too): nothing to do, and the text says why.
    let svc = service_mut(&mut live, "alpha");
    svc.supernode.cardinality = 3;
    let mut vm = svc.supernode.nodes[0].clone();
    vm.id = 999;
    svc.supernode.nodes.push(vm);
    let p = plan(&d, &live, t0() + Duration::seconds(30));
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    let text = render_text(&p, TextOptions::default());
    assert!(
        text.contains(
            "Note: alpha: SuperNode count is left to OneFlow's elasticity policies (3 now)"
        ) && text.contains("reconciles min 1 and max 4")
            && text.contains("No changes."),
        "{text}"
    );
    // A lowered max below OneFlow's count: the bounds change in place, then the count is
    // brought to the new max.
    let p = plan(
        &desired(vec![elastic(2, 1)]),
        &live,
        t0() + Duration::seconds(30),
    );
    assert_eq!(kinds(&p), ["update_template", "scale"]);
    assert!(p.actions[0]
        .diff
        .iter()
        .any(|c| c.path == "spec.supernodes.max"));
    assert!(matches!(
        p.actions[1].kind,
        ActionKind::Scale {
            role: Role::Supernode,
            from: 3,
            to: 2,
            ..
        }
    ));
    // A changed policy is an in-place update, never a scale.
    let p = plan(
        &desired(vec![elastic(4, 2)]),
        &live,
        t0() + Duration::seconds(30),
    );
    assert_eq!(kinds(&p), ["update_template"]);
    // Without elasticity the count is the spec's and no note is printed.
    let fixed = desired(vec![spec("alpha", serde_json::json!({}))]);
    let p = plan(&fixed, &converged(&fixed), t0());
    assert!(p.notes.is_empty());
}

#[test]
fn a_version_change_redeploys_then_undeploys_the_old_service_once_the_new_one_is_ready() {
    let d = desired(vec![spec("alpha", serde_json::json!({}))]);
    let live = converged(&d);
    let old_id = live.services("alpha")[0].service_id;
    let d2 = desired(vec![spec(
        "alpha",
        serde_json::json!({"flowerVersion": "1.26.0"}),
    )]);

    let p1 = plan(&d2, &live, t0());
    assert_eq!(kinds(&p1), ["redeploy"]);
    let diff = &p1.actions[0].diff;
    assert!(diff
        .iter()
        .any(|c| c.path == "spec.flowerVersion" && c.forces_replacement));
    assert_eq!(p1.summary().replace, 1);

    // The new service exists but its SuperNodes are not registered yet: wait, keep the old.
    let mut live2 = simulate(&p1, &d2, &live, t0());
    assert_eq!(live2.services("alpha").len(), 2);
    let new_id = live2.services("alpha")[1].service_id;
    for vm in &mut live2.clusters.get_mut("alpha").unwrap()[1].supernode.nodes {
        vm.attrs.node_ready = Some(false);
    }
    let p2 = plan(&d2, &live2, t0());
    assert_eq!(
        deferred(&p2),
        [("redeploy_undeploy_old", WaitFor::RedeployReady)]
    );
    assert!(!p2.has_changes(), "nothing destructive is executable");
    assert!(
        p2.actions[0].deferred.as_ref().is_some_and(|d| d
            .reason
            .contains(&format!("service {new_id}: 0/2 SuperNodes ready"))),
        "{:?}",
        p2.actions
    );

    // Ready: undeploy exactly the old one.
    let live3 = simulate(&p1, &d2, &live, t0());
    let p3 = plan(&d2, &live3, t0());
    assert_eq!(kinds(&p3), ["redeploy_undeploy_old"]);
    assert_eq!(
        p3.actions[0].kind,
        ActionKind::Redeploy(RedeployStep::UndeployOld {
            old_service_id: old_id,
            new_service_id: new_id
        })
    );
    let live4 = simulate(&p3, &d2, &live3, t0());
    assert!(plan(&d2, &live4, t0()).actions.is_empty());
}

#[test]
fn a_certificate_near_expiry_is_rotated_once_per_generation() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"tls": {"renewBefore": "720h"}}),
    )]);
    let mut live = converged(&d);
    let link = &mut service_mut(&mut live, "alpha").superlink.nodes[0];
    link.attrs.cert_not_after = Some(t0() + Duration::days(10));
    link.attrs.rotate_request = Some(2);
    link.attrs.rotate_done = Some(2);
    let vm_id = link.id;
    let p = plan(&d, &live, t0());
    assert_eq!(kinds(&p), ["rotate_certificate"]);
    // A generation is never below the observation's epoch second, so it is newer than any
    // the SuperLink carried out, whatever a peer wrote over the attributes since.
    let epoch = t0().timestamp() as u64;
    assert!(matches!(
        p.actions[0].kind,
        ActionKind::RotateCertificate { generation, vm_id: v, .. } if v == vm_id && generation == epoch
    ));
    let link = &mut service_mut(&mut live, "alpha").superlink.nodes[0];
    link.attrs.rotate_request = Some(epoch + 10);
    link.attrs.rotate_done = Some(epoch + 10);
    let p = plan(&d, &live, t0());
    assert!(matches!(
        p.actions[0].kind,
        ActionKind::RotateCertificate { generation, .. } if generation == epoch + 11
    ));
    // Requested, not yet done: wait, do not bump the generation.
    service_mut(&mut live, "alpha").superlink.nodes[0]
        .attrs
        .rotate_request = Some(epoch + 11);
    let p = plan(&d, &live, t0());
    assert_eq!(kinds(&p), ["wait"]);
    assert!(matches!(
        p.actions[0].kind,
        ActionKind::Wait {
            until: WaitFor::Rotation
        }
    ));
    // Far from expiry: nothing.
    service_mut(&mut live, "alpha").superlink.nodes[0]
        .attrs
        .cert_not_after = Some(t0() + Duration::days(300));
    assert!(plan(&d, &live, t0()).actions.is_empty());
}

fn node_key(b: u8) -> crate::protocol::node_key::NodePublicKey {
    let mut p = [b; 65];
    p[0] = 0x04;
    crate::protocol::node_key::NodePublicKey::from_point(&p).expect("a point")
}

#[test]
fn a_single_site_cluster_gets_no_site_keys_attribute() {
    let d = desired(vec![spec("alpha", serde_json::json!({}))]);
    assert!(d.clusters["alpha"].site_node_keys.is_empty());
    let mut live = converged(&d);
    assert!(plan(&d, &live, t0()).actions.is_empty());
    // A peer's forged list is dropped by observation (unsigned): still nothing to write.
    service_mut(&mut live, "alpha").superlink.nodes[0]
        .attrs
        .site_node_keys = None;
    assert!(plan(&d, &live, t0()).actions.is_empty());
}

#[test]
fn the_other_sites_keys_are_written_when_they_differ_and_shown_by_fingerprint() {
    let mut d = desired(vec![spec("alpha", serde_json::json!({}))]);
    let live = converged(&d);
    let link = service_mut(&mut live.clone(), "alpha").superlink.nodes[0].id;
    let (k1, k2) = (node_key(1), node_key(2));
    d.clusters.get_mut("alpha").unwrap().site_node_keys = [k1.clone(), k2.clone()].into();
    let p = plan(&d, &live, t0());
    assert_eq!(kinds(&p), ["set_site_node_keys"]);
    assert_eq!(
        p.actions[0].kind,
        ActionKind::SetSiteNodeKeys {
            service_id: service_mut(&mut live.clone(), "alpha").service_id,
            vm_id: link,
            fingerprints: vec![k1.fingerprint(), k2.fingerprint()],
        }
    );
    // Neither the text nor the JSON plan carries key material, only fingerprints.
    let text = render_text(&p, TextOptions::default());
    let json = serde_json::to_string(&render_json(&p)).unwrap();
    assert!(text.contains(&k1.fingerprint()), "{text}");
    assert!(
        text.contains("will accept 2 SuperNode key(s) of other sites"),
        "{text}"
    );
    for k in [&k1, &k2] {
        let b64 = k.encode();
        let b64 = b64.split(' ').nth(1).unwrap();
        assert!(
            !text.contains(b64) && !json.contains(b64),
            "key material shown"
        );
    }
    // Written (simulated as the SuperLink's verified attribute): converged.
    let live = simulate(&p, &d, &live, t0());
    assert!(plan(&d, &live, t0()).actions.is_empty());
    // One remote key dropped: the smaller set is written, the change named.
    d.clusters.get_mut("alpha").unwrap().site_node_keys = [k1.clone()].into();
    let p = plan(&d, &live, t0());
    assert_eq!(kinds(&p), ["set_site_node_keys"]);
    assert!(
        p.actions[0].reason.contains("0 to add, 1 to revoke"),
        "{}",
        p.actions[0].reason
    );
    assert_eq!(
        p.actions[0].diff[0].after.as_deref(),
        Some(k1.fingerprint().as_str())
    );
    // The last one dropped: the empty set is written (so the SuperLink revokes it), once.
    let live = simulate(&p, &d, &live, t0());
    d.clusters.get_mut("alpha").unwrap().site_node_keys.clear();
    let p = plan(&d, &live, t0());
    assert!(matches!(
        &p.actions[0].kind,
        ActionKind::SetSiteNodeKeys { fingerprints, .. } if fingerprints.is_empty()
    ));
    let live = simulate(&p, &d, &live, t0());
    assert!(plan(&d, &live, t0()).actions.is_empty());
}

#[test]
fn a_shortened_validity_rotates_once_and_carries_the_new_validity() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"tls": {"validity": "30m", "renewBefore": "10m"}}),
    )]);
    let mut live = converged(&d);
    // Issued under the old spec: valid for a year.
    service_mut(&mut live, "alpha").superlink.nodes[0]
        .attrs
        .cert_not_after = Some(t0() + Duration::days(365));
    let p = plan(&d, &live, t0());
    assert_eq!(kinds(&p), ["rotate_certificate"]);
    let ActionKind::RotateCertificate { validity, .. } = &p.actions[0].kind else {
        unreachable!()
    };
    assert_eq!(validity.map(|v| v.to_string()).as_deref(), Some("30m"));
    assert!(p.actions[0].reason.contains("longer than validity (30m)"));
    // Reissued with the new validity (the 5 min slack absorbs clock skew): no more actions.
    let live = simulate(&p, &d, &live, t0());
    assert!(plan(&d, &live, t0()).actions.is_empty());
    let mut live = live;
    service_mut(&mut live, "alpha").superlink.nodes[0]
        .attrs
        .cert_not_after = Some(t0() + Duration::minutes(34));
    assert!(plan(&d, &live, t0()).actions.is_empty());
}

#[test]
fn provided_certificates_are_never_rotated_only_reported() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"tls": {"mode": "provided", "provided": {
            "caCert": {"inline": "Q0E="}, "cert": {"inline": "Q0VSVA=="}, "key": {"inline": "S0VZ"}}}}),
    )]);
    let mut live = converged(&d);
    service_mut(&mut live, "alpha").superlink.nodes[0]
        .attrs
        .cert_not_after = Some(t0() + Duration::days(1));
    let p = plan(&d, &live, t0());
    assert!(p.actions.is_empty());
    assert_eq!(p.warnings.len(), 1);
}

#[test]
fn a_failed_supernode_is_replaced_and_the_role_scaled_back_afterwards() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 3}}),
    )]);
    let mut live = converged(&d);
    let vm = &mut service_mut(&mut live, "alpha").supernode.nodes[1];
    vm.lcm_state = LcmState::BootFailure;
    let failed = vm.id;
    service_mut(&mut live, "alpha").state = ServiceState::Warning;
    let p = plan(&d, &live, t0());
    assert_eq!(kinds(&p), ["replace_node"]);
    assert!(matches!(
        p.actions[0].kind,
        ActionKind::ReplaceNode { vm_id, failure: NodeFailure::FailureState, .. } if vm_id == failed
    ));
    let mut after = simulate(&p, &d, &live, t0());
    service_mut(&mut after, "alpha").state = ServiceState::Running;
    let p2 = plan(&d, &after, t0());
    assert_eq!(kinds(&p2), ["scale"]);
    assert!(matches!(
        p2.actions[0].kind,
        ActionKind::Scale { from: 2, to: 3, .. }
    ));
}

#[test]
fn poweroff_and_unknown_vms_count_as_failed() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 4}}),
    )]);
    let mut live = converged(&d);
    let s = service_mut(&mut live, "alpha");
    s.supernode.nodes[0].state = VmState::Poweroff;
    s.supernode.nodes[0].lcm_state = LcmState::LcmInit;
    s.supernode.nodes[1].lcm_state = LcmState::Unknown;
    let p = plan(&d, &live, t0());
    assert_eq!(replacing(&p), [NodeFailure::Poweroff, NodeFailure::Unknown]);
}

/// Whether the plan executes nothing destructive now (deferred actions aside).
fn destroys_nothing(p: &Plan) -> bool {
    !p.actions
        .iter()
        .any(|a| a.is_executable() && a.kind.is_destructive())
}

/// Why each node the plan replaces now (deferred replacements left out) has failed.
fn replacing(p: &Plan) -> Vec<NodeFailure> {
    p.actions
        .iter()
        .filter(|a| a.is_executable())
        .filter_map(|a| match a.kind {
            ActionKind::ReplaceNode { failure, .. } => Some(failure),
            _ => None,
        })
        .collect()
}

#[test]
fn the_next_deadline_is_the_first_heartbeat_to_go_stale_or_the_renewal_window() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 2, "failurePolicy": {"gracePeriod": "15s", "heartbeatInterval": "5s"}},
                           "tls": {"validity": "30m", "renewBefore": "10m"}}),
    )]);
    let now = t0();
    let mut live = converged(&d);
    let s = service_mut(&mut live, "alpha");
    for (i, vm) in s.supernode.nodes.iter_mut().enumerate() {
        vm.stime = Some(now - Duration::minutes(5));
        vm.attrs.heartbeat = Some(now - Duration::seconds(2 + i as i64));
    }
    s.superlink.nodes[0].attrs.cert_not_after = Some(now + Duration::minutes(25));
    // The older heartbeat (3 s ago) goes stale in 12 s; the renewal window opens in 15 min.
    assert_eq!(
        next_deadline(&d, &live, "alpha", now),
        Some(now + Duration::seconds(12))
    );
    // The planner agrees: nothing before the deadline, a replacement after it.
    assert!(plan(&d, &live, now + Duration::seconds(11))
        .actions
        .is_empty());
    assert_eq!(
        kinds(&plan(&d, &live, now + Duration::seconds(13))),
        ["replace_node"]
    );
    // Without replacement the certificate is next; suspended clusters have no deadline.
    let d2 = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 2, "failurePolicy": {"replace": false}},
                           "tls": {"validity": "30m", "renewBefore": "10m"}}),
    )]);
    assert_eq!(
        next_deadline(&d2, &live, "alpha", now),
        Some(now + Duration::minutes(15))
    );
    let d3 = desired(vec![spec("alpha", serde_json::json!({"suspend": true}))]);
    assert_eq!(next_deadline(&d3, &live, "alpha", now), None);
}

#[test]
fn a_stale_heartbeat_is_replaced_but_a_booting_node_is_not() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 2}}),
    )]);
    let mut live = converged(&d);
    let now = t0() + Duration::minutes(30);
    let s = service_mut(&mut live, "alpha");
    // Node 0: booted at t0, last heartbeat at t0 → 30 min > 10 min grace.
    let stale = s.supernode.nodes[0].id;
    // Node 1: booted 5 minutes ago, never heartbeated → within grace.
    s.supernode.nodes[1].stime = Some(now - Duration::minutes(5));
    s.supernode.nodes[1].attrs.heartbeat = None;
    s.superlink.nodes[0].attrs.heartbeat = Some(now);
    let p = plan(&d, &live, now);
    assert_eq!(kinds(&p), ["replace_node"]);
    assert!(matches!(
        p.actions[0].kind,
        ActionKind::ReplaceNode { vm_id, failure: NodeFailure::StaleHeartbeat, .. } if vm_id == stale
    ));
}

/// #18 item 4: an edge SuperNode quiet for longer than `gracePeriod` (so not ready) is
/// kept, with a warning, until `edge.offlineGrace`; so is one whose VM went UNKNOWN; then
/// both are replaced, and the deadline is the offline grace, not the grace period.
#[test]
fn an_edge_node_offline_past_the_grace_period_is_kept_until_its_offline_grace() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 4,
            "failurePolicy": {"gracePeriod": "10m"}, "edge": {"offlineGrace": "1h"}}}),
    )]);
    let mut live = converged(&d);
    let now = t0() + Duration::minutes(30);
    let s = service_mut(&mut live, "alpha");
    for vm in s.supernode.nodes.iter_mut().chain(&mut s.superlink.nodes) {
        vm.attrs.heartbeat = Some(now);
    }
    // Node 0: last heartbeat at t0 (30 min > 10 min grace); node 1: UNKNOWN since t0.
    let (quiet, unknown) = (s.supernode.nodes[0].id, s.supernode.nodes[1].id);
    s.supernode.nodes[0].attrs.heartbeat = Some(t0());
    s.supernode.nodes[1].attrs.heartbeat = Some(t0());
    s.supernode.nodes[1].lcm_state = LcmState::Unknown;
    let p = plan(&d, &live, now);
    assert!(p.actions.is_empty(), "{:?}", kinds(&p));
    let warned: Vec<&str> = p.warnings.iter().map(|w| w.message.as_str()).collect();
    for id in [quiet, unknown] {
        assert!(
            warned
                .iter()
                .any(|w| w.starts_with(&format!("edge SuperNode VM {id}:"))
                    && w.contains("edge.offlineGrace (1h)")),
            "{warned:?}"
        );
    }
    // Not ready meanwhile: readiness keeps the grace period.
    assert!(!ready::cluster_readiness(&d.clusters["alpha"].cluster, &live, "alpha").is_ready());
    assert_eq!(
        next_deadline(&d, &live, "alpha", now),
        Some(t0() + Duration::hours(1))
    );
    let later = t0() + Duration::minutes(61);
    let p = plan(&d, &live, later);
    let replaced: Vec<(u64, NodeFailure)> = p
        .actions
        .iter()
        .filter_map(|a| match a.kind {
            ActionKind::ReplaceNode { vm_id, failure, .. } => Some((vm_id, failure)),
            _ => None,
        })
        .collect();
    assert_eq!(
        replaced,
        [
            (quiet, NodeFailure::StaleHeartbeat),
            (unknown, NodeFailure::Unknown)
        ]
    );
    // Without the edge profile the same view replaces both at once (beside the template
    // update that dropping the profile is).
    let plain = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 4, "failurePolicy": {"gracePeriod": "10m"}}}),
    )]);
    let p = plan(&plain, &live, now);
    assert_eq!(
        kinds(&p).iter().filter(|k| **k == "replace_node").count(),
        2,
        "{:?}",
        kinds(&p)
    );
}

#[test]
fn heartbeats_missed_during_the_controllers_outage_do_not_count() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 4}}),
    )]);
    let mut live = converged(&d);
    // Last heartbeats of two nodes at t0 (the others' now: a minority, so the heartbeat
    // circuit breaker stays off); OpenNebula (and OneGate with it) down from t0 + 1 min
    // to t0 + 25 min; now t0 + 30 min: 30 min since, 6 of them observable (< 10 min grace).
    let now = t0() + Duration::minutes(30);
    for (i, vm) in service_mut(&mut live, "alpha")
        .supernode
        .nodes
        .iter_mut()
        .enumerate()
    {
        vm.attrs.heartbeat = Some(if i < 2 { t0() } else { now });
    }
    service_mut(&mut live, "alpha").superlink.nodes[0]
        .attrs
        .heartbeat = Some(now);
    live.last_outage = Some(Outage {
        from: t0() + Duration::minutes(1),
        to: t0() + Duration::minutes(25),
    });
    assert!(plan(&d, &live, now).actions.is_empty());
    // A short outage does not hide a node that stopped heartbeating long before it.
    live.last_outage = Some(Outage {
        from: t0() + Duration::minutes(20),
        to: t0() + Duration::minutes(25),
    });
    let p = plan(&d, &live, now);
    assert!(
        p.actions.iter().any(|a| matches!(
            a.kind,
            ActionKind::ReplaceNode {
                failure: NodeFailure::StaleHeartbeat,
                ..
            }
        )),
        "{:?}",
        kinds(&p)
    );
}

#[test]
fn at_most_half_the_nodes_are_replaced_at_once() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 5}}),
    )]);
    let mut live = converged(&d);
    for vm in &mut service_mut(&mut live, "alpha").supernode.nodes {
        vm.lcm_state = LcmState::Unknown;
    }
    let p = plan(&d, &live, t0());
    let n = p
        .actions
        .iter()
        .filter(|a| matches!(a.kind, ActionKind::ReplaceNode { .. }))
        .count();
    assert_eq!(n, 5);
    assert_eq!(
        p.actions.iter().filter(|a| a.is_executable()).count(),
        3,
        "at most ⌈5/2⌉ now"
    );
    assert_eq!(deferred(&p), [("replace_node", WaitFor::Replacement); 2]);
}

#[test]
fn nothing_is_replaced_while_the_service_deploys() {
    let d = desired(vec![spec("alpha", serde_json::json!({}))]);
    let mut live = converged(&d);
    let s = service_mut(&mut live, "alpha");
    s.state = ServiceState::Deploying;
    s.supernode.nodes[0].lcm_state = LcmState::PrologFailure;
    let p = plan(&d, &live, t0());
    assert_eq!(kinds(&p), ["wait"]);
    assert!(!p.has_pending_changes());
}

#[test]
fn a_removed_spec_is_deleted_only_with_policy_delete() {
    let keep = desired(vec![spec("alpha", serde_json::json!({}))]);
    let del = desired(vec![spec(
        "alpha",
        serde_json::json!({"deletionPolicy": "Delete"}),
    )]);
    let empty = desired(vec![]);

    let p = plan(&empty, &converged(&keep), t0());
    assert!(p.actions.is_empty());
    assert_eq!(p.warnings.len(), 1);
    assert!(p.warnings[0].message.contains("retained"));

    let live = converged(&del);
    let p = plan(&empty, &live, t0());
    assert_eq!(kinds(&p), ["delete"]);
    assert_eq!(p.summary().destroy, 1);

    // Incomplete source or held file: never prune.
    let mut incomplete = empty.clone();
    incomplete.complete = false;
    assert!(plan(&incomplete, &live, t0()).actions.is_empty());
    let mut held = empty.clone();
    held.held.insert("alpha".into());
    assert!(plan(&held, &live, t0()).actions.is_empty());
}

#[test]
fn suspended_clusters_plan_nothing() {
    let d = desired(vec![spec("alpha", serde_json::json!({"suspend": true}))]);
    assert!(plan(&d, &LiveState::default(), t0()).actions.is_empty());
}

#[test]
fn text_output_is_terraform_like_and_never_prints_secrets() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"tls": {"mode": "provided", "provided": {
            "caCert": {"inline": "Q0E="}, "cert": {"inline": "Q0VSVA=="}, "key": {"inline": "U0VDUkVUS0VZ"}}}}),
    )]);
    let p = plan(&d, &LiveState::default(), t0());
    let text = render_text(&p, TextOptions::default());
    assert!(text.contains("  + create"), "{text}");
    assert!(
        !text.contains("forces replacement"),
        "a create replaces nothing: {text}"
    );
    assert!(text.contains("(sensitive value)"));
    assert!(!text.contains("U0VDUkVUS0VZ"));
    assert!(!text.contains("\x1b["));
    assert!(text
        .trim_end()
        .ends_with("Plan: 1 to create, 0 to change, 0 to replace, 0 to destroy."));
    let json = serde_json::to_string(&render_json(&p)).unwrap_or_default();
    assert!(!json.contains("U0VDUkVUS0VZ"));
    assert!(json.contains("\"format_version\":\"2.1\""));
    let coloured = render_text(&p, TextOptions { color: true });
    assert!(coloured.contains("\x1b[32m+\x1b[0m"));
}

// ---------------------------------------------------------------------------------------
// Properties

fn arb_cluster(name: &'static str) -> impl Strategy<Value = FlowerCluster> {
    (1u32..6, prop::bool::ANY, 1u32..4, prop::bool::ANY).prop_map(
        move |(count, new_version, vcpu, delete)| {
            spec(
                name,
                serde_json::json!({
                    "flowerVersion": if new_version { "1.26.0" } else { "1.25.0" },
                    "supernodes": {"count": count, "vcpu": vcpu},
                    "deletionPolicy": if delete { "Delete" } else { "Retain" },
                }),
            )
        },
    )
}

fn arb_desired() -> impl Strategy<Value = DesiredState> {
    prop::collection::vec(
        prop::option::of(prop_oneof![
            arb_cluster("a"),
            arb_cluster("b"),
            arb_cluster("c")
        ]),
        0..4,
    )
    .prop_map(|cs| {
        let mut seen = std::collections::BTreeSet::new();
        desired(
            cs.into_iter()
                .flatten()
                .filter(|c| seen.insert(c.metadata.name.clone()))
                .collect(),
        )
    })
}

/// Perturbations of a converged live state: failures, drift, rotations due, states.
#[derive(Debug, Clone)]
enum Perturb {
    FailNode(usize),
    PowerOff(usize),
    StaleHeartbeats,
    Cardinality(u32),
    CertDue,
    State(i64),
}

fn arb_perturb() -> impl Strategy<Value = Perturb> {
    prop_oneof![
        (0usize..6).prop_map(Perturb::FailNode),
        (0usize..6).prop_map(Perturb::PowerOff),
        Just(Perturb::StaleHeartbeats),
        (0u32..7).prop_map(Perturb::Cardinality),
        Just(Perturb::CertDue),
        prop_oneof![Just(1i64), Just(4), Just(8), Just(10)].prop_map(Perturb::State),
    ]
}

fn perturb(live: &mut LiveState, ps: &[Perturb], now: DateTime<Utc>) {
    let mut next_vm = 10_000;
    for (i, p) in ps.iter().enumerate() {
        let Some(services) = live.clusters.values_mut().nth(i % 3) else {
            continue;
        };
        let Some(s) = services.first_mut() else {
            continue;
        };
        match p {
            Perturb::FailNode(n) => {
                if let Some(vm) = s.supernode.nodes.get_mut(*n) {
                    vm.lcm_state = LcmState::BootFailure;
                }
            }
            Perturb::PowerOff(n) => {
                if let Some(vm) = s.supernode.nodes.get_mut(*n) {
                    vm.state = VmState::Poweroff;
                }
            }
            Perturb::StaleHeartbeats => {
                // One dead agent: all of them going stale together is a heartbeat-channel
                // outage, which waits rather than converges (see the breaker tests).
                if let Some(vm) = s.supernode.nodes.first_mut() {
                    vm.stime = Some(now - Duration::hours(2));
                    vm.attrs.heartbeat = Some(now - Duration::hours(1));
                }
            }
            Perturb::Cardinality(c) => {
                s.supernode.cardinality = *c;
                s.supernode.nodes.truncate(*c as usize);
                while s.supernode.nodes.len() < *c as usize {
                    next_vm += 1;
                    s.supernode
                        .nodes
                        .push(healthy_vm(next_vm, Role::Supernode, now));
                }
            }
            Perturb::CertDue => {
                if let Some(vm) = s.superlink.nodes.first_mut() {
                    vm.attrs.cert_not_after = Some(now + Duration::days(1));
                }
            }
            Perturb::State(code) => s.state = ServiceState::from_code(*code),
        }
    }
    live.seal();
}

/// The agents are alive: every VM heartbeated at `now`.
fn alive_at(live: &mut LiveState, now: DateTime<Utc>) {
    let vms = live
        .clusters
        .values_mut()
        .flatten()
        .flat_map(|s| s.superlink.nodes.iter_mut().chain(&mut s.supernode.nodes));
    for vm in vms {
        vm.attrs.heartbeat = Some(now);
    }
}

/// Replaced VMs come back healthy when the role is scaled back, and the service returns to
/// RUNNING once no VM is failed (OneFlow's watchdog).
fn settle(live: &mut LiveState) {
    for s in live.clusters.values_mut().flatten() {
        let failed = s
            .supernode
            .nodes
            .iter()
            .any(|v| v.state_failure().is_some());
        if s.state == ServiceState::Warning && !failed {
            s.state = ServiceState::Running;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn planning_converges(before in arb_desired(), after in arb_desired(), ps in prop::collection::vec(arb_perturb(), 0..4)) {
        let now = t0() + Duration::hours(3);
        let mut live = converged(&before);
        alive_at(&mut live, now);
        perturb(&mut live, &ps, now);
        let mut rounds = 0;
        loop {
            let p = plan(&after, &live, now);
            if !p.has_changes() && !p.actions.iter().any(|a| matches!(a.kind, ActionKind::Wait { .. })) {
                break;
            }
            rounds += 1;
            prop_assert!(rounds <= 8, "no convergence: {:#?}", p.actions);
            live = simulate(&p, &after, &live, now);
            settle(&mut live);
        }
        // Converged: every desired, unsuspended cluster has exactly one service.
        for name in after.clusters.keys() {
            prop_assert_eq!(live.services(name).len(), 1);
        }
    }

    #[test]
    fn a_cluster_whose_spec_exists_or_is_held_is_never_destroyed(
        before in arb_desired(), after in arb_desired(), ps in prop::collection::vec(arb_perturb(), 0..4), hold in prop::option::of(0usize..3)
    ) {
        let now = t0() + Duration::hours(3);
        let mut live = converged(&before);
        alive_at(&mut live, now);
        perturb(&mut live, &ps, now);
        let mut d = after.clone();
        if let Some(i) = hold {
            d.held.insert(["a", "b", "c"][i].to_string());
        }
        let p = plan(&d, &live, now);
        for a in &p.actions {
            let protected = d.clusters.contains_key(&a.cluster) || d.held.contains(&a.cluster);
            prop_assert!(!(protected && matches!(a.kind, ActionKind::Delete { .. })), "{:?}", a);
            if d.held.contains(&a.cluster) {
                prop_assert!(false, "held cluster got an action: {:?}", a);
            }
            if let ActionKind::Redeploy(RedeployStep::UndeployOld { new_service_id, .. }) = a.kind {
                // The replacement must exist in the live state.
                prop_assert!(live.services(&a.cluster).iter().any(|s| s.service_id == new_service_id));
            }
        }
    }

    #[test]
    fn plans_are_deterministic(before in arb_desired(), after in arb_desired(), ps in prop::collection::vec(arb_perturb(), 0..4)) {
        let now = t0() + Duration::hours(3);
        let mut live = converged(&before);
        alive_at(&mut live, now);
        perturb(&mut live, &ps, now);
        let a = plan(&after, &live, now);
        let b = plan(&after.clone(), &live.clone(), now);
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(render_text(&a, TextOptions::default()), render_text(&b, TextOptions::default()));
        prop_assert_eq!(
            serde_json::to_string(&render_json(&a)).unwrap_or_default(),
            serde_json::to_string(&render_json(&b)).unwrap_or_default()
        );
    }
}

#[test]
fn a_vm_gone_before_oneflow_noticed_waits_instead_of_scaling() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 3}}),
    )]);
    let mut live = converged(&d);
    // terminate-hard finished (VM DONE, so not observed) but the role still counts it.
    service_mut(&mut live, "alpha").supernode.nodes.pop();
    let p = plan(&d, &live, t0());
    assert_eq!(kinds(&p), ["wait"]);
    assert!(matches!(
        p.actions[0].kind,
        ActionKind::Wait {
            until: WaitFor::Replacement
        }
    ));
}

// ---------------------------------------------------------------------------------------
// Safety (issue #12): stale views, the replacement budget, the heartbeat breaker, redeploys

#[test]
fn a_stale_view_withholds_destructive_and_clock_driven_actions() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 4}, "tls": {"renewBefore": "720h"}}),
    )]);
    let mut live = converged(&d);
    let s = service_mut(&mut live, "alpha");
    s.supernode.nodes[0].lcm_state = LcmState::Unknown;
    s.superlink.nodes[0].attrs.cert_not_after = Some(t0() + Duration::days(10));
    let fresh = plan(&d, &live, t0());
    assert_eq!(kinds(&fresh), ["replace_node", "rotate_certificate"]);

    let bound = Duration::seconds(30);
    let mut same_age = fresh.clone();
    same_age.withhold_on_stale_view(Duration::seconds(30), bound);
    assert_eq!(same_age, fresh, "at the bound the view is still fresh");

    let mut old = fresh.clone();
    old.withhold_on_stale_view(Duration::seconds(31), bound);
    assert_eq!(
        deferred(&old),
        [
            ("replace_node", WaitFor::FreshObservation),
            ("rotate_certificate", WaitFor::FreshObservation)
        ]
    );
    assert!(!old.has_changes() && old.has_pending_changes());
    // Creates, in-place updates and scale-ups are not held; scale-downs are.
    let mut mixed = Plan::default();
    for kind in [
        ActionKind::Create { body: None },
        ActionKind::Scale {
            service_id: 1,
            role: Role::Supernode,
            from: 2,
            to: 3,
        },
        ActionKind::Scale {
            service_id: 1,
            role: Role::Supernode,
            from: 3,
            to: 2,
        },
        ActionKind::Delete { service_id: 1 },
    ] {
        mixed.actions.push(Action {
            cluster: "alpha".into(),
            kind,
            reason: String::new(),
            diff: vec![],
            deferred: None,
        });
    }
    mixed.withhold_on_stale_view(Duration::minutes(5), bound);
    let now: Vec<&str> = mixed
        .actions
        .iter()
        .filter(|a| a.is_executable())
        .map(|a| a.kind.verb())
        .collect();
    assert_eq!(now, ["create", "scale"]);
    assert!(matches!(
        mixed.actions[1].kind,
        ActionKind::Scale { to: 3, .. }
    ));
    assert_eq!(
        deferred(&mixed),
        [
            ("scale", WaitFor::FreshObservation),
            ("delete", WaitFor::FreshObservation)
        ]
    );
}

/// Every VM of `alpha` stopped heartbeating at `since` (booted before).
fn all_heartbeats_stop(live: &mut LiveState, since: DateTime<Utc>) {
    let s = service_mut(live, "alpha");
    for vm in s.superlink.nodes.iter_mut().chain(&mut s.supernode.nodes) {
        vm.stime = Some(since - Duration::hours(1));
        vm.attrs.heartbeat = Some(since);
    }
}

/// The outage tests' cluster: `alpha` with 4 SuperNodes, grace 20 s (heartbeats every
/// 5 s), converged; at the returned `now` every VM's heartbeat (the SuperLink's too) is
/// 60 s old, as when OneGate is down ([`all_heartbeats_stop`]).
fn outage_fixture() -> (DesiredState, LiveState, DateTime<Utc>) {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 4, "failurePolicy": {"gracePeriod": "20s", "heartbeatInterval": "5s"}}}),
    )]);
    let mut live = converged(&d);
    let now = t0() + Duration::hours(1);
    all_heartbeats_stop(&mut live, now - Duration::seconds(60));
    (d, live, now)
}

#[test]
fn a_heartbeat_channel_outage_replaces_nothing_and_says_so() {
    // OneGate down: every heartbeat (SuperLink's too) is 60 s old, the grace is 20 s.
    let (d, mut live, now) = outage_fixture();
    assert_eq!(
        heartbeat_outage(&live, now, Duration::seconds(20)),
        Some((5, 5))
    );
    let p = plan(&d, &live, now);
    assert_eq!(
        deferred(&p),
        [("replace_node", WaitFor::HeartbeatOutage); 4],
        "{:?}",
        p.actions
    );
    assert!(!p.has_changes());
    assert!(p.warnings[0].message.contains("5 of 5"), "{:?}", p.warnings);
    // A VM in a failure state is still replaced: oned, not OneGate, says so.
    service_mut(&mut live, "alpha").supernode.nodes[1].lcm_state = LcmState::BootFailure;
    let p = plan(&d, &live, now);
    let replaced: Vec<u64> = p
        .actions
        .iter()
        .filter(|a| a.is_executable())
        .filter_map(|a| match a.kind {
            ActionKind::ReplaceNode {
                vm_id,
                failure: NodeFailure::FailureState,
                ..
            } => Some(vm_id),
            ActionKind::ReplaceNode { .. } => panic!("replaced for a heartbeat: {a:?}"),
            _ => None,
        })
        .collect();
    assert_eq!(replaced.len(), 1);
    // One dead agent among live ones is not an outage: it is replaced.
    let (_, mut live, _) = outage_fixture();
    let s = service_mut(&mut live, "alpha");
    for vm in s
        .superlink
        .nodes
        .iter_mut()
        .chain(&mut s.supernode.nodes[1..])
    {
        vm.attrs.heartbeat = Some(now);
    }
    assert_eq!(heartbeat_outage(&live, now, Duration::seconds(20)), None);
    assert_eq!(kinds(&plan(&d, &live, now)), ["replace_node"]);
}

/// Heartbeats that stalled together come back one by one: while the first are back for
/// less than a grace period, a VM still catching up is not replaced; a grace period later
/// a VM still silent is.
#[test]
fn heartbeats_resuming_one_by_one_after_an_outage_replace_nothing() {
    let (d, mut live, now) = outage_fixture();
    let stalled = now - Duration::seconds(60);
    // SuperLink and SuperNodes 0-2 came back 5 s ago after 55 s of silence; SuperNode 3
    // is still behind: 1 stale of 5 alone would be no outage.
    let s = service_mut(&mut live, "alpha");
    let behind = s.supernode.nodes[3].id;
    for vm in s
        .superlink
        .nodes
        .iter_mut()
        .chain(&mut s.supernode.nodes[..3])
    {
        let back = now - Duration::seconds(5);
        vm.attrs.heartbeat = Some(back);
        vm.last_silence = Some(Silence {
            from: stalled,
            to: back,
        });
    }
    assert_eq!(
        heartbeat_outage(&live, now, Duration::seconds(20)),
        Some((5, 5))
    );
    let p = plan(&d, &live, now);
    assert_eq!(
        deferred(&p),
        [("replace_node", WaitFor::HeartbeatOutage)],
        "{:?}",
        p.actions
    );
    // A silence shorter than the grace period is an ordinary gap between observations.
    let mut short = live.clone();
    let s = service_mut(&mut short, "alpha");
    for vm in s
        .superlink
        .nodes
        .iter_mut()
        .chain(&mut s.supernode.nodes[..3])
    {
        vm.last_silence = Some(Silence {
            from: now - Duration::seconds(15),
            to: now - Duration::seconds(5),
        });
    }
    assert_eq!(heartbeat_outage(&short, now, Duration::seconds(20)), None);
    // A grace period after the others came back, the one still silent is replaced.
    let later = now + Duration::seconds(16);
    let s = service_mut(&mut live, "alpha");
    for vm in s
        .superlink
        .nodes
        .iter_mut()
        .chain(&mut s.supernode.nodes[..3])
    {
        vm.attrs.heartbeat = Some(later);
    }
    assert_eq!(heartbeat_outage(&live, later, Duration::seconds(20)), None);
    let p = plan(&d, &live, later);
    assert!(
        matches!(
            p.actions.as_slice(),
            [Action { kind: ActionKind::ReplaceNode { vm_id, .. }, deferred: None, .. }] if *vm_id == behind
        ),
        "{:?}",
        p.actions
    );
}

#[test]
fn a_warning_service_replaces_its_stopped_node_before_a_pending_scale_up() {
    // Found by the chaos suite (seed 1796319163152942833): the spec raised the count 1 → 2
    // while the one SuperNode was powered off. OneFlow scales only a RUNNING service and
    // the powered-off VM keeps it in WARNING, so the missing slot must not hold back the
    // replacement, or each waits on the other for ever.
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 2}}),
    )]);
    // The service in WARNING with one SuperNode: the second slot is still to be filled.
    let one_missing = |failing: &dyn Fn(&mut LiveService)| {
        let mut live = converged(&d);
        let s = service_mut(&mut live, "alpha");
        s.state = ServiceState::Warning;
        s.supernode.cardinality = 1;
        s.supernode.nodes.truncate(1);
        failing(s);
        live
    };
    let live = one_missing(&|s| {
        s.supernode.nodes[0].state = VmState::Poweroff;
        s.supernode.nodes[0].lcm_state = LcmState::LcmInit;
    });
    let p = plan(&d, &live, t0());
    assert_eq!(replacing(&p), [NodeFailure::Poweroff], "{:?}", p.actions);
    // A stale heartbeat may still be a serving node: the missing slot counts for it.
    let now = t0() + Duration::hours(1);
    let live = one_missing(&|s| {
        s.supernode.nodes[0].attrs.heartbeat = Some(now - Duration::minutes(30));
        s.superlink.nodes[0].attrs.heartbeat = Some(now);
    });
    let p = plan(&d, &live, now);
    assert!(destroys_nothing(&p), "{:?}", p.actions);
    assert_eq!(
        deferred(&p),
        [
            ("replace_node", WaitFor::Replacement),
            ("scale", WaitFor::Warning)
        ]
    );
}

#[test]
fn nodes_replaced_but_not_yet_ready_count_against_the_budget() {
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 4}}),
    )]);
    // Two nodes already terminated and gone (OneFlow has not dropped them from the role
    // yet), the other two fail: ⌈4/2⌉ = 2 are out of service already, none more goes.
    let mut live = converged(&d);
    let s = service_mut(&mut live, "alpha");
    s.supernode.nodes.truncate(2);
    for vm in &mut s.supernode.nodes {
        vm.lcm_state = LcmState::Unknown;
    }
    let p = plan(&d, &live, t0());
    assert!(destroys_nothing(&p), "{:?}", p.actions);
    assert_eq!(deferred(&p), [("replace_node", WaitFor::Replacement); 2]);
    // Their replacements boot (running, not registered yet): still out of service.
    let mut live = converged(&d);
    let s = service_mut(&mut live, "alpha");
    for (i, vm) in s.supernode.nodes.iter_mut().enumerate() {
        if i < 2 {
            vm.attrs.node_ready = None;
            vm.attrs.heartbeat = None;
            vm.stime = Some(t0());
        } else {
            vm.lcm_state = LcmState::Unknown;
        }
    }
    let p = plan(&d, &live, t0() + Duration::seconds(30));
    assert!(destroys_nothing(&p), "{:?}", p.actions);
    // Registered: the failed two may go.
    for vm in &mut service_mut(&mut live, "alpha").supernode.nodes[..2] {
        vm.attrs.node_ready = Some(true);
    }
    let p = plan(&d, &live, t0() + Duration::seconds(30));
    let n = p
        .actions
        .iter()
        .filter(|a| a.is_executable() && matches!(a.kind, ActionKind::ReplaceNode { .. }))
        .count();
    assert_eq!(n, 2);
}

#[test]
fn at_most_one_replacement_service_is_in_flight() {
    let version = |v: &str| desired(vec![spec("alpha", serde_json::json!({"flowerVersion": v}))]);
    let live = converged(&version("1.25.0"));
    let old_id = live.services("alpha")[0].service_id;
    // 1.26: a replacement is created; it never becomes ready.
    let d26 = version("1.26.0");
    let p = plan(&d26, &live, t0());
    assert_eq!(kinds(&p), ["redeploy"]);
    let mut live = simulate(&p, &d26, &live, t0());
    let unready = live.services("alpha")[1].service_id;
    for vm in &mut live.clusters.get_mut("alpha").unwrap()[1].supernode.nodes {
        vm.attrs.node_ready = Some(false);
    }
    // 1.27 before 1.26 was ready: the unready replacement goes first, nothing is created.
    let d27 = version("1.27.0");
    let p = plan(&d27, &live, t0());
    assert_eq!(kinds(&p), ["redeploy_abandon_unready", "redeploy"]);
    assert_eq!(deferred(&p), [("redeploy", WaitFor::Undeploying)]);
    assert_eq!(
        p.actions[0].kind,
        ActionKind::Redeploy(RedeployStep::AbandonUnready {
            service_id: unready
        })
    );
    // While it undeploys: still nothing created.
    live.clusters.get_mut("alpha").unwrap()[1].state = ServiceState::Undeploying;
    let p = plan(&d27, &live, t0());
    assert_eq!(deferred(&p), [("redeploy", WaitFor::Undeploying)]);
    assert!(!p.has_changes());
    // Gone: the next replacement of the old (serving) service is created.
    live.clusters.get_mut("alpha").unwrap().truncate(1);
    let p = plan(&d27, &live, t0());
    assert_eq!(
        p.actions[0].kind,
        ActionKind::Redeploy(RedeployStep::Instantiate {
            old_service_id: old_id,
            body: None,
        })
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// However often the version changes before a replacement is ready, a cluster never
    /// has more than two services that are not going away (the serving one and one
    /// replacement).
    #[test]
    fn version_churn_never_stacks_replacements(versions in prop::collection::vec(0u8..4, 1..8)) {
        let v = |i: u8| desired(vec![spec("alpha", serde_json::json!({"flowerVersion": format!("1.2{}.0", 5 + i)}))]);
        let mut live = converged(&v(0));
        for i in versions {
            let d = v(i);
            for _ in 0..3 {
                let p = plan(&d, &live, t0());
                live = simulate(&p, &d, &live, t0());
                // Replacements never become ready in this run.
                for s in live.clusters.get_mut("alpha").unwrap().iter_mut().skip(1) {
                    for vm in &mut s.supernode.nodes {
                        vm.attrs.node_ready = Some(false);
                    }
                }
                let active = live.services("alpha").iter().filter(|s| !s.state.is_going_away()).count();
                prop_assert!(active <= 2, "{active} services: {:?}", live.services("alpha"));
            }
        }
    }
}

/// The one definition of Ready ([`super::ready`]): each criterion of the module doc, in
/// turn, makes the cluster not Ready with its reason.
#[test]
fn readiness_follows_the_one_definition() {
    let d = desired(vec![spec("alpha", serde_json::json!({}))]);
    let cluster = &d.clusters["alpha"].cluster;
    let at = t0() + Duration::seconds(30);
    let verdict = |live: &LiveState| readiness(cluster, live.services("alpha"), at, None);
    let live = converged(&d);
    let r = verdict(&live);
    assert!(r.is_ready(), "{r:?}");
    assert_eq!(r.message, "SuperLink serving, 2/2 SuperNodes ready");

    assert_eq!(
        verdict(&LiveState::default()).reason,
        ReadyReason::ServiceMissing
    );
    // 1. A redeploy to start (outdated service only) or to finish (both serve).
    let d26 = desired(vec![spec(
        "alpha",
        serde_json::json!({"flowerVersion": "1.26.0"}),
    )]);
    let c26 = &d26.clusters["alpha"].cluster;
    assert_eq!(
        readiness(c26, live.services("alpha"), at, None).reason,
        ReadyReason::Redeploying
    );
    let both = simulate(&plan(&d26, &live, t0()), &d26, &live, t0());
    assert_eq!(both.services("alpha").len(), 2);
    assert_eq!(
        readiness(c26, both.services("alpha"), at, None).reason,
        ReadyReason::Redeploying
    );
    // …and a service going away does not count.
    let mut gone = both.clone();
    gone.clusters.get_mut("alpha").unwrap()[0].state = ServiceState::Undeploying;
    assert!(readiness(c26, gone.services("alpha"), at, None).is_ready());
    // 2. RUNNING only.
    for state in [
        ServiceState::Deploying,
        ServiceState::Scaling,
        ServiceState::Cooldown,
        ServiceState::Warning,
    ] {
        let mut l = live.clone();
        service_mut(&mut l, "alpha").state = state;
        assert_eq!(
            verdict(&l).reason,
            ReadyReason::ServiceNotRunning,
            "{state:?}"
        );
    }
    // 3. The SuperLink serves and published its endpoint.
    let mut l = live.clone();
    service_mut(&mut l, "alpha").superlink.nodes[0]
        .attrs
        .endpoint = None;
    assert_eq!(verdict(&l).reason, ReadyReason::SuperLinkNotReady);
    let mut l = live.clone();
    service_mut(&mut l, "alpha").superlink.nodes[0]
        .attrs
        .fl_ready = Some(false);
    assert_eq!(verdict(&l).reason, ReadyReason::SuperLinkNotReady);
    // 4. `count` SuperNodes registered with a recent heartbeat.
    let mut l = live.clone();
    service_mut(&mut l, "alpha").supernode.nodes[1]
        .attrs
        .node_ready = None;
    let r = verdict(&l);
    assert_eq!(r.reason, ReadyReason::NodesNotReady);
    assert!(r.message.ends_with("1/2 SuperNodes ready"), "{}", r.message);
    let late = t0() + ready::grace_period(cluster) + Duration::seconds(1);
    assert_eq!(
        readiness(cluster, live.services("alpha"), late, None).reason,
        ReadyReason::NodesNotReady,
        "stale heartbeats"
    );
    // With elasticity the target is OneFlow's cardinality within [min, max].
    let elastic = spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 2, "min": 1, "max": 4,
            "elasticity": {"policies": [{"type": "CHANGE", "adjust": 1,
                "expression": "FL_CLIENT_STATUS > 1.5"}]}}}),
    );
    assert_eq!(supernode_target(&elastic, 3), 3);
    assert_eq!(supernode_target(&elastic, 9), 4);
    assert_eq!(supernode_target(cluster, 9), 2);
}

#[test]
fn a_stale_heartbeat_is_not_replaced_while_the_superlink_holds_the_node_online() {
    use crate::protocol::nodes::NodesOnline;
    let d = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 3, "failurePolicy": {"gracePeriod": "20s", "heartbeatInterval": "5s"}}}),
    )]);
    let mut live = converged(&d);
    let now = t0() + Duration::hours(1);
    let s = service_mut(&mut live, "alpha");
    for (i, vm) in s.supernode.nodes.iter_mut().enumerate() {
        vm.attrs.heartbeat = Some(now);
        vm.attrs.flower_node_id = Some(100 + i as u64);
    }
    s.superlink.nodes[0].attrs.heartbeat = Some(now);
    // One SuperNode's heartbeat is 60 s old (a minority: the breaker stays off).
    s.supernode.nodes[0].attrs.heartbeat = Some(now - Duration::seconds(60));
    let victim = s.supernode.nodes[0].id;
    let list = |at: chrono::DateTime<Utc>, ids: &[u64]| NodesOnline {
        at,
        ids: ids.iter().copied().collect(),
    };
    let replaced = |p: &crate::plan::Plan| -> Vec<u64> {
        p.actions
            .iter()
            .filter(|a| a.is_executable())
            .filter_map(|a| match a.kind {
                ActionKind::ReplaceNode { vm_id, .. } => Some(vm_id),
                _ => None,
            })
            .collect()
    };
    let set_list = |live: &mut LiveState, l: Option<NodesOnline>| {
        service_mut(live, "alpha").superlink.nodes[0]
            .attrs
            .nodes_online = l;
    };

    // Fresh list holding all three online: nothing replaced, and said why.
    set_list(
        &mut live,
        Some(list(now - Duration::seconds(5), &[100, 101, 102])),
    );
    let p = plan(&d, &live, now);
    assert_eq!(
        deferred(&p),
        [("replace_node", WaitFor::FlowerSeesOnline)],
        "{:?}",
        p.actions
    );
    assert!(
        replaced(&p).is_empty() && !p.has_changes(),
        "{:?}",
        p.actions
    );
    // Deferred, not hidden: `plan --detailed-exitcode` exits 2, text and JSON say why.
    assert!(p.has_pending_changes());
    let text = render_text(&p, TextOptions::default());
    assert!(
        text.contains(&format!("SuperNode VM {victim} will be replaced"))
            && text.contains("(deferred: the SuperLink holds the SuperNode online"),
        "{text}"
    );
    let json = serde_json::to_value(render_json(&p)).expect("json");
    let j = json["actions"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["action"] == "replace_node"))
        .expect("replace_node in JSON");
    assert_eq!(j["deferred"]["until"], "flower_sees_online");
    // The held node serves: a count change goes ahead.
    let d4 = desired(vec![spec(
        "alpha",
        serde_json::json!({"supernodes": {"count": 4, "failurePolicy": {"gracePeriod": "20s", "heartbeatInterval": "5s"}}}),
    )]);
    let p4 = plan(&d4, &live, now);
    assert!(
        p4.actions.iter().any(
            |a| a.is_executable() && matches!(a.kind, ActionKind::Scale { from: 3, to: 4, .. })
        ),
        "{:?}",
        p4.actions
    );
    assert!(
        p.warnings[0]
            .message
            .contains(&format!("SuperNode VM {victim}: heartbeat is older than the grace period, but the SuperLink holds its Flower node 100 online")),
        "{:?}",
        p.warnings
    );
    // Fresh list without it: Flower agrees it is gone → replaced.
    set_list(
        &mut live,
        Some(list(now - Duration::seconds(5), &[101, 102])),
    );
    assert_eq!(replaced(&plan(&d, &live, now)), [victim]);
    // No list at all (an agent that cannot read Flower's state): the heartbeat decides.
    set_list(&mut live, None);
    assert_eq!(replaced(&plan(&d, &live, now)), [victim]);
    // A list older than the grace period says nothing about now: heartbeat decides, with
    // a warning; so does a list from implausibly far ahead (a forgery).
    for at in [now - Duration::seconds(21), now + Duration::minutes(3)] {
        set_list(&mut live, Some(list(at, &[100, 101, 102])));
        let p = plan(&d, &live, now);
        assert_eq!(replaced(&p), [victim], "list at {at}");
        assert!(
            p.warnings
                .iter()
                .any(|w| w.message.contains("not corroborated")),
            "{:?}",
            p.warnings
        );
    }
    // A node without a published Flower id cannot be found in the list: replaced.
    set_list(&mut live, Some(list(now, &[100, 101, 102])));
    service_mut(&mut live, "alpha").supernode.nodes[0]
        .attrs
        .flower_node_id = None;
    assert_eq!(replaced(&plan(&d, &live, now)), [victim]);
    // A failure state is oned's word: replaced whatever Flower says.
    service_mut(&mut live, "alpha").supernode.nodes[0]
        .attrs
        .flower_node_id = Some(100);
    service_mut(&mut live, "alpha").supernode.nodes[0].lcm_state = LcmState::BootFailure;
    assert_eq!(replaced(&plan(&d, &live, now)), [victim]);
}
