//! Observe: one OneFlow service listing plus paged `one.vmpool.infoextended` of the
//! controller user's own VMs, joined into a [`LiveState`]. Never a call per VM or per
//! service.
//!
//! Guarantees:
//! - A service is the cluster's only when the controller's user owns it ([`Trust::owns`])
//!   and its marker names this controller; a foreign-owned document whose marker names
//!   this controller is reported as an observation warning and otherwise ignored
//!   (`tests/safety_ownership.rs`, `a_foreign_service_with_a_forged_marker_is_never_adopted`).
//! - A VM belongs to a role only when OneFlow lists it in that role's `nodes` and the
//!   controller's user owns it. `SERVICE_ID`/`ROLE_NAME` in a user template are never
//!   trusted: any VM owner can write them (`tests/safety_ownership.rs`,
//!   `a_foreign_vm_tagged_with_our_service_never_joins_a_role`).
//! - A VM's `FL_ENDPOINT` is kept only when its host is one of the addresses oned lists on
//!   that VM's NICs and NIC aliases: any VM of the service can rewrite it through OneGate
//!   (`an_endpoint_off_the_vm_s_own_nics_is_dropped_and_the_ca_is_kept`;
//!   `tests/safety_ownership.rs`, `a_peer_s_fl_endpoint_never_becomes_the_submit_target`).
//! - The SuperLink's CA (`FL_CA_CERT`) is kept decoded in the live state, so `submit` needs
//!   no second reading of the VM records.
//!
//! Caveats: a VM OneFlow has created but not yet written into `nodes` (a scale in flight)
//! is not seen until OneFlow records it; the role's cardinality already counts it.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::context::{Context, Trust};
use crate::one::backend::{BackendError, Document, VmRecord};
use crate::plan::{
    AgentAttributes, AppliedSpec, LcmState, LiveRole, LiveService, LiveState, LiveVm,
    ObservationWarning, Owner, RoleState, ServiceState, VmState, SUPERLINK_ROLE, SUPERNODE_ROLE,
};

/// Top-level key of the ownership marker in a service (and service template) body.
pub const MARKER_KEY: &str = crate::render::ownership::MARKER_KEY;

/// Read the live state: `GET /service` once, then our VM pool in pages. Each service body
/// carries the record of the spec applied to it (written at instantiate and by every
/// in-place update), so service templates need not be read.
pub async fn observe(ctx: &Context, now: DateTime<Utc>) -> Result<LiveState, BackendError> {
    let services = ctx.backend.list_services().await?;
    let vms = ctx
        .backend
        .list_vms(ctx.options.vm_page_size.max(1))
        .await?;
    Ok(build_live(&services, vms, ctx.trust(), now))
}

/// The marker of `doc` when the document is ours: owned by the controller's user (and
/// group, when configured) and marked by this controller. The one test for "ours" that
/// observe and apply share.
pub fn owned_marker(doc: &Document, trust: Trust<'_>) -> Option<Owner> {
    owner_of(&doc.body)
        .filter(|o| o.controller == trust.controller_id && trust.owns(doc.uid, doc.gid))
}

fn applied_of(body: &serde_json::Value) -> Option<AppliedSpec> {
    body.get(AppliedSpec::BODY_KEY)
        .and_then(|v| AppliedSpec::deserialize(v).ok())
        .filter(|a| a.format == AppliedSpec::FORMAT)
}

/// The ownership marker of a body, when it is well-formed.
pub fn owner_of(body: &serde_json::Value) -> Option<Owner> {
    crate::render::ownership::Ownership::from_body(body).map(|o| Owner {
        cluster: o.cluster,
        spec_hash: o.spec_hash,
        controller: o.controller,
    })
}

/// Join services and VMs (pure). Only services [`owned_marker`] accepts are kept; VMs
/// join a role only through OneFlow's node list, and only when `trust`'s user owns them.
pub fn build_live(
    services: &[Document],
    vms: Vec<VmRecord>,
    trust: Trust<'_>,
    now: DateTime<Utc>,
) -> LiveState {
    let mut live = LiveState {
        observed_at: now,
        ..LiveState::default()
    };
    // Defence in depth: the listing asks oned for our VMs only.
    let by_id: HashMap<u64, VmRecord> = vms
        .into_iter()
        .filter(|vm| vm.uid == trust.identity.uid)
        .map(|vm| (vm.id, vm))
        .collect();

    for doc in services {
        let Some(owner) = owned_marker(doc, trust) else {
            live.unowned_count += 1;
            if let Some(forged) =
                owner_of(&doc.body).filter(|o| o.controller == trust.controller_id)
            {
                live.warnings.push(ObservationWarning {
                    cluster: Some(forged.cluster),
                    vm_id: None,
                    message: format!(
                        "service {} ({:?}) carries this controller's marker but is owned by \
                         user {} group {}, not by {} ({}){}; it is not this cluster's and is \
                         never touched",
                        doc.id,
                        doc.name,
                        doc.uid,
                        doc.gid,
                        trust.identity.name,
                        trust.identity.uid,
                        trust
                            .owner_gid
                            .map(|g| format!(" in group {g}"))
                            .unwrap_or_default(),
                    ),
                });
            }
            continue;
        };
        let mut warnings = Vec::new();
        let mut service = LiveService {
            service_id: doc.id,
            name: doc.name.clone(),
            state: ServiceState::from_code(int(doc.body.get("state")).unwrap_or(0)),
            applied: applied_of(&doc.body),
            superlink: role(doc, SUPERLINK_ROLE, &by_id, &mut warnings),
            supernode: role(doc, SUPERNODE_ROLE, &by_id, &mut warnings),
            owner: owner.clone(),
        };
        drop_unsigned_controller_requests(&doc.body, &mut service, &mut warnings);
        live.warnings.extend(
            warnings
                .into_iter()
                .map(|(vm_id, message)| ObservationWarning {
                    cluster: Some(owner.cluster.clone()),
                    vm_id: Some(vm_id),
                    message,
                }),
        );
        live.clusters
            .entry(owner.cluster)
            .or_default()
            .push(service);
    }
    live.seal();
    live
}

/// What the controller writes onto a SuperLink counts only when the cluster's key signed it
/// for that VM: any VM of the service can write its user template through OneGate
/// (tests/safety_peers.rs). A forged pending `FL_ROTATE_REQUEST` would make the planner
/// wait for a rotation that never comes; a forged `FL_SITE_NODE_KEYS` is no set at all, so
/// the planner writes the signed one over it (and the SuperLink's agent ignores it meanwhile).
fn drop_unsigned_controller_requests(
    body: &serde_json::Value,
    service: &mut LiveService,
    warnings: &mut Vec<(u64, String)>,
) {
    use crate::protocol::{signing, FL_ROTATE_REQUEST, FL_SITE_NODE_KEYS};
    let key = crate::render::ownership::signing_seed_of(body).map(|s| s.public_key_bytes());
    let key = key.as_deref();
    for vm in &mut service.superlink.nodes {
        let a = &mut vm.attrs;
        let mut unsigned = Vec::new();
        if let Some(generation) = a.rotate_request {
            let validity = a.rotate_validity.as_deref();
            if !matches!((key, &a.rotate_sig), (Some(k), Some(sig))
                if signing::verify_rotation(k, sig, vm.id, generation, validity))
            {
                a.rotate_request = None;
                unsigned.push(FL_ROTATE_REQUEST);
            }
        }
        if let Some(keys) = &a.site_node_keys {
            if !matches!((key, &a.site_node_keys_sig), (Some(k), Some(sig))
                if signing::verify_site_keys(k, sig, vm.id, keys))
            {
                a.site_node_keys = None;
                unsigned.push(FL_SITE_NODE_KEYS);
            }
        }
        warnings.extend(unsigned.into_iter().map(|name| {
            (
                vm.id,
                format!("{name} is not signed by this cluster's key (written by a peer through OneGate?); ignored"),
            )
        }));
    }
}

/// OneFlow bodies hold numbers as JSON numbers or numeric strings.
fn int(v: Option<&serde_json::Value>) -> Option<i64> {
    match v? {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn role(
    doc: &Document,
    name: &str,
    by_id: &HashMap<u64, VmRecord>,
    warnings: &mut Vec<(u64, String)>,
) -> LiveRole {
    let Some(r) = role_of(&doc.body, name) else {
        return LiveRole::default();
    };
    let mut ids = deploy_ids(r);
    ids.sort_unstable();
    ids.dedup();
    // Sized up front: a collected Vec grows by doubling, and 20,000 of these live on.
    let mut nodes = Vec::with_capacity(ids.len());
    nodes.extend(
        ids.into_iter()
            .filter_map(|id| by_id.get(&id))
            .filter(|vm| vm.state != VmState::Done)
            .map(|vm| live_vm(vm, warnings)),
    );
    LiveRole {
        cardinality: int(r.get("cardinality"))
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(0),
        state: RoleState::from_code(int(r.get("state")).unwrap_or(0)),
        nodes,
    }
}

fn role_of<'b>(body: &'b serde_json::Value, name: &str) -> Option<&'b serde_json::Value> {
    body.get("roles")
        .and_then(|r| r.as_array())
        .and_then(|roles| {
            roles
                .iter()
                .find(|r| r.get("name").and_then(|n| n.as_str()) == Some(name))
        })
}

fn deploy_ids(role: &serde_json::Value) -> Vec<u64> {
    role.get("nodes")
        .and_then(|n| n.as_array())
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| int(n.get("deploy_id")).and_then(|i| u64::try_from(i).ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether OneFlow's own node list of role `name` in a service body holds VM `vm_id`.
pub fn role_has_node(body: &serde_json::Value, name: &str, vm_id: u64) -> bool {
    role_of(body, name).is_some_and(|r| deploy_ids(r).contains(&vm_id))
}

/// The planner's view of one VM record; validation problems go to `warnings`.
pub fn live_vm(vm: &VmRecord, warnings: &mut Vec<(u64, String)>) -> LiveVm {
    let (attrs, problems) = AgentAttributes::parse(
        vm.user_template
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    warnings.extend(problems.into_iter().map(|p| (vm.id, p)));
    let mut attrs = attrs;
    drop_foreign_endpoint(vm, &mut attrs, warnings);
    LiveVm {
        id: vm.id,
        name: vm.name.clone(),
        state: vm.state,
        lcm_state: if vm.state == VmState::Active {
            vm.lcm_state
        } else {
            LcmState::LcmInit
        },
        stime: (vm.stime > 0)
            .then(|| DateTime::<Utc>::from_timestamp(vm.stime, 0))
            .flatten(),
        addresses: vm.addresses.clone(),
        last_silence: None,
        attrs,
    }
}

/// `FL_ENDPOINT` counts only when its host is one of the VM's own NIC addresses: oned
/// assigns those and OneGate cannot change them, while any VM of the service can rewrite
/// `FL_ENDPOINT` through OneGate and so steer `submit` (and `status`) to itself. The same
/// rule the SuperNodes apply (`agent::discovery::is_own_address`).
fn drop_foreign_endpoint(
    vm: &VmRecord,
    attrs: &mut AgentAttributes,
    warnings: &mut Vec<(u64, String)>,
) {
    let Some(endpoint) = &attrs.endpoint else {
        return;
    };
    if endpoint.ip().is_some_and(|ip| vm.addresses.contains(&ip)) {
        return;
    }
    warnings.push((
        vm.id,
        format!(
            "{} is not an address of the VM's NICs (written by a peer through OneGate?); ignored",
            crate::protocol::FL_ENDPOINT
        ),
    ));
    attrs.endpoint = None;
}

/// Scalar map helper for tests and adapters.
pub fn scalar_map<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::one::backend::{retain_listed_fields, ListedBody};
    use crate::one::Identity;
    use serde_json::json;

    /// The controller's user in these tests: uid 7, group 100.
    const ME: i64 = 7;

    fn me() -> Identity {
        Identity {
            uid: ME,
            gid: 100,
            name: "flower".into(),
        }
    }

    fn trust<'a>(me: &'a Identity, controller: &'a str) -> Trust<'a> {
        Trust {
            controller_id: controller,
            identity: me,
            owner_gid: None,
        }
    }

    fn service(id: u64, cluster: &str, controller: &str, nodes: &[u64]) -> Document {
        Document {
            id,
            name: cluster.into(),
            uid: ME,
            gid: 100,
            body: json!({
                "name": cluster,
                "state": 2,
                MARKER_KEY: {"cluster": cluster, "spec_hash": "h1", "controller": controller, "format": 1},
                "roles": [
                    {"name": "superlink", "cardinality": 1, "state": 2,
                     "nodes": [{"deploy_id": nodes[0]}]},
                    {"name": "supernode", "cardinality": "2", "state": 2,
                     "nodes": nodes[1..].iter().map(|n| json!({"deploy_id": n})).collect::<Vec<_>>()}
                ]
            }),
        }
    }

    fn vm(id: u64, svc: u64, role: &str, extra: &[(&str, &str)]) -> VmRecord {
        let sid = svc.to_string();
        let mut ut = scalar_map([("SERVICE_ID", sid.as_str()), ("ROLE_NAME", role)]);
        ut.extend(scalar_map(extra.iter().copied()));
        VmRecord {
            id,
            uid: ME,
            name: format!("{role}_{id}"),
            state: crate::one::model::VmState::Active,
            lcm_state: crate::one::model::LcmState::Running,
            stime: 1_700_000_000,
            user_template: ut,
            // VM n has 10.0.0.n on its NIC.
            addresses: vec![std::net::Ipv4Addr::new(10, 0, 0, id as u8).into()],
        }
    }

    #[test]
    fn an_endpoint_off_the_vm_s_own_nics_is_dropped_and_the_ca_is_kept() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let ca = crate::protocol::pem::encode(pem.as_bytes());
        let observe = |endpoint: &str| {
            let me = me();
            let vms = vec![vm(
                10,
                5,
                "superlink",
                &[("FL_ENDPOINT", endpoint), ("FL_CA_CERT", &ca)],
            )];
            build_live(
                &[service(5, "a", "c", &[10])],
                vms,
                trust(&me, "c"),
                Utc::now(),
            )
        };
        let live = observe("10.0.0.10:9092");
        let attrs = &live.services("a")[0].superlink.nodes[0].attrs;
        assert_eq!(
            attrs.endpoint.as_ref().map(ToString::to_string).as_deref(),
            Some("10.0.0.10:9092")
        );
        assert_eq!(attrs.ca_cert.as_deref(), Some(pem));
        assert!(live.warnings.is_empty(), "{:?}", live.warnings);

        // A peer's address, a name (never a NIC address) and another VM's address.
        for forged in ["10.0.0.11:9092", "evil.example:9092", "203.0.113.9:9092"] {
            let live = observe(forged);
            let attrs = &live.services("a")[0].superlink.nodes[0].attrs;
            assert_eq!(attrs.endpoint, None, "{forged}");
            assert_eq!(attrs.ca_cert.as_deref(), Some(pem));
            assert_eq!(live.warnings.len(), 1);
            assert!(
                live.warnings[0]
                    .message
                    .starts_with("FL_ENDPOINT is not an address of the VM's NICs"),
                "{:?}",
                live.warnings
            );
            assert_eq!(live.warnings[0].vm_id, Some(10));
        }
    }

    #[test]
    fn joins_owned_services_with_their_vms_and_counts_the_rest() {
        let now = Utc::now();
        let services = vec![
            service(5, "alpha", "ctl-1", &[10, 11]),
            service(6, "beta", "other-controller", &[20]),
            Document {
                id: 7,
                name: "manual".into(),
                uid: ME,
                gid: 100,
                body: json!({"name": "manual", "roles": []}),
            },
        ];
        let vms = vec![
            vm(
                10,
                5,
                "superlink",
                &[("FL_READY", "YES"), ("FL_HEARTBEAT", "garbage")],
            ),
            vm(11, 5, "supernode", &[("FL_NODE_READY", "YES")]),
            // Tagged with the service but not in its `nodes`: tags are never trusted.
            vm(12, 5, "supernode", &[]),
            vm(20, 6, "superlink", &[]),
        ];
        let me = me();
        let live = build_live(&services, vms, trust(&me, "ctl-1"), now);
        assert_eq!(live.unowned_count, 2);
        let alpha = &live.services("alpha")[0];
        assert_eq!(alpha.service_id, 5);
        assert_eq!(alpha.state, ServiceState::Running);
        assert_eq!(alpha.supernode.cardinality, 2);
        assert_eq!(alpha.superlink.nodes[0].attrs.fl_ready, Some(true));
        let ids: Vec<u64> = alpha.supernode.nodes.iter().map(|v| v.id).collect();
        assert_eq!(ids, vec![11]);
        assert_eq!(live.warnings.len(), 1);
        assert!(live.warnings[0].message.contains("FL_HEARTBEAT"));
        assert!(live.services("beta").is_empty());
    }

    #[test]
    fn digest_ignores_observation_time_but_not_state() {
        let me = me();
        let a = build_live(
            &[service(5, "a", "c", &[1, 2])],
            vec![vm(1, 5, "superlink", &[])],
            trust(&me, "c"),
            Utc::now(),
        );
        let b = build_live(
            &[service(5, "a", "c", &[1, 2])],
            vec![vm(1, 5, "superlink", &[])],
            trust(&me, "c"),
            Utc::now() + chrono::Duration::seconds(9),
        );
        assert_eq!(a.digest, b.digest);
        let c = build_live(
            &[service(5, "a", "c", &[1, 2])],
            vec![vm(1, 5, "superlink", &[("FL_READY", "NO")])],
            trust(&me, "c"),
            Utc::now(),
        );
        assert_ne!(a.digest, c.digest);
        // Heartbeats move every few seconds; they are not drift.
        let beat = build_live(
            &[service(5, "a", "c", &[1, 2])],
            vec![vm(
                1,
                5,
                "superlink",
                &[("FL_HEARTBEAT", "2026-11-28T05:00:00Z")],
            )],
            trust(&me, "c"),
            Utc::now(),
        );
        assert_eq!(a.digest, beat.digest);
        // The same service under another cluster name is another observation.
        let renamed = build_live(
            &[service(5, "b", "c", &[1, 2])],
            vec![vm(1, 5, "superlink", &[])],
            trust(&me, "c"),
            Utc::now(),
        );
        assert_ne!(a.digest, renamed.digest);
    }

    #[test]
    fn a_listed_body_reduced_to_the_read_fields_observes_the_same() {
        let mut full = service(5, "alpha", "ctl-1", &[10, 11]);
        let body = full.body.as_object_mut().expect("object");
        body.insert("deployment".into(), json!("straight"));
        body.insert("log".into(), json!([{"message": "deploying"}]));
        body.insert(
            AppliedSpec::BODY_KEY.into(),
            json!({"format": AppliedSpec::FORMAT, "fields": {"spec.flowerVersion": "1.25.0"}}),
        );
        for role in body["roles"].as_array_mut().expect("roles") {
            role["template_id"] = json!(3);
            role["vm_template_contents"] = json!("NIC=[NETWORK_ID=\"0\"]");
            for node in role["nodes"].as_array_mut().expect("nodes") {
                node["vm_info"] = json!({"VM": {"ID": "10", "USER_TEMPLATE": {"FL_READY": "NO"}}});
                node["running"] = json!(true);
            }
        }
        let mut reduced = full.clone();
        retain_listed_fields(&mut reduced.body);
        // Read straight from the listing's text, the body comes out reduced the same way.
        let streamed: ListedBody =
            serde_json::from_str(&full.body.to_string()).expect("a body deserializes");
        assert_eq!(streamed.0, reduced.body);

        assert!(!reduced.body.to_string().contains("vm_info"));
        assert!(reduced.body.get("deployment").is_none());
        assert_eq!(
            reduced.body["roles"][1]["nodes"][0],
            json!({"deploy_id": 11})
        );
        let vms = || {
            vec![
                vm(10, 5, "superlink", &[("FL_READY", "YES")]),
                vm(11, 5, "supernode", &[]),
            ]
        };
        let now = Utc::now();
        let me = me();
        let a = build_live(&[full], vms(), trust(&me, "ctl-1"), now);
        let b = build_live(&[reduced], vms(), trust(&me, "ctl-1"), now);
        assert!(a.services("alpha")[0].applied.is_some());
        assert_eq!(a, b);
    }

    #[test]
    fn only_our_user_s_documents_and_vms_count() {
        let me = me();
        let mut foreign = service(8, "alpha", "ctl-1", &[30, 31]);
        foreign.uid = 9;
        let mut ours = service(5, "alpha", "ctl-1", &[10, 11]);
        // A node id OneFlow lists but that another user owns is not taken either.
        ours.body["roles"][1]["nodes"] = json!([{"deploy_id": 11}, {"deploy_id": 40}]);
        let mut theirs = vm(40, 5, "supernode", &[]);
        theirs.uid = 9;
        let vms = vec![
            vm(10, 5, "superlink", &[]),
            vm(11, 5, "supernode", &[]),
            vm(30, 8, "superlink", &[]),
            theirs,
        ];
        let live = build_live(&[foreign, ours], vms, trust(&me, "ctl-1"), Utc::now());
        let alpha = live.services("alpha");
        assert_eq!(alpha.len(), 1);
        assert_eq!(alpha[0].service_id, 5);
        let ids: Vec<u64> = alpha[0].supernode.nodes.iter().map(|v| v.id).collect();
        assert_eq!(ids, vec![11]);
        assert_eq!(live.unowned_count, 1);
        assert_eq!(live.warnings.len(), 1, "{:?}", live.warnings);
        assert!(live.warnings[0].message.contains("service 8"));
        assert!(live.warnings[0].message.contains("owned by user 9"));

        // With a group required, our user's service in another group is not ours.
        let mut other_group = service(5, "alpha", "ctl-1", &[10, 11]);
        other_group.gid = 101;
        let strict = Trust {
            owner_gid: Some(100),
            ..trust(&me, "ctl-1")
        };
        let live = build_live(&[other_group], vec![], strict, Utc::now());
        assert!(live.services("alpha").is_empty());
        assert_eq!(live.warnings.len(), 1);
    }
}
