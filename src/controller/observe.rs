//! Observe: one OneFlow service listing plus paged `one.vmpool.infoextended`, joined into
//! a [`LiveState`]. Never a call per VM or per service.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::backend::{BackendError, Document, VmRecord};
use super::context::Context;
use crate::plan::{
    AgentAttributes, AppliedSpec, LcmState, LiveRole, LiveService, LiveState, LiveVm,
    ObservationWarning, Owner, RoleState, ServiceState, VmState, SUPERLINK_ROLE, SUPERNODE_ROLE,
};

/// Top-level key of the ownership marker in a service (and service template) body.
pub const MARKER_KEY: &str = crate::render::ownership::MARKER_KEY;

/// Read the live state: `GET /service` once, then the VM pool in pages. Each service body
/// carries the record of the spec applied to it (written at instantiate and by every
/// in-place update), so service templates need not be read.
pub async fn observe(ctx: &Context, now: DateTime<Utc>) -> Result<LiveState, BackendError> {
    let services = ctx.backend.list_services().await?;
    let vms = ctx
        .backend
        .list_vms(ctx.options.vm_page_size.max(1))
        .await?;
    Ok(build_live(&services, vms, &ctx.controller_id, now))
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

/// Join services and VMs (pure). Only services whose marker names `controller_id` are kept.
pub fn build_live(
    services: &[Document],
    vms: Vec<VmRecord>,
    controller_id: &str,
    now: DateTime<Utc>,
) -> LiveState {
    let mut live = LiveState {
        observed_at: now,
        ..LiveState::default()
    };
    let mut by_id: HashMap<u64, VmRecord> = HashMap::with_capacity(vms.len());
    // (service id, role) → VM ids that name the service in their user template.
    let mut by_tag: HashMap<(u64, String), Vec<u64>> = HashMap::new();
    for vm in vms {
        let tag = vm
            .user_template
            .get("SERVICE_ID")
            .and_then(|s| s.trim().parse::<u64>().ok())
            .zip(vm.user_template.get("ROLE_NAME").cloned());
        if let Some(t) = tag {
            by_tag.entry(t).or_default().push(vm.id);
        }
        by_id.insert(vm.id, vm);
    }

    for doc in services {
        let owner = match owner_of(&doc.body) {
            Some(o) if o.controller == controller_id => o,
            _ => {
                live.unowned_count += 1;
                continue;
            }
        };
        let mut warnings = Vec::new();
        let service = LiveService {
            service_id: doc.id,
            name: doc.name.clone(),
            state: ServiceState::from_code(int(doc.body.get("state")).unwrap_or(0)),
            applied: applied_of(&doc.body),
            superlink: role(doc, SUPERLINK_ROLE, &by_id, &by_tag, &mut warnings),
            supernode: role(doc, SUPERNODE_ROLE, &by_id, &by_tag, &mut warnings),
            owner: owner.clone(),
        };
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

/// Keys of a listed service body the controller reads: `name`, `state`, the ownership
/// marker, the applied-spec record and `roles` (of which [`retain_listed_fields`] keeps
/// `name`, `cardinality`, `state` and each node's `deploy_id`).
const LISTED_BODY_KEYS: &[&str] = &["name", "state", MARKER_KEY, AppliedSpec::BODY_KEY, "roles"];

/// Reduce a listed service body, in place, to what the controller reads from a listing
/// ([`LISTED_BODY_KEYS`]). OneFlow embeds a VM document in every node (`vm_info`); at
/// 1,000 services they were most of the controller's memory. Code that writes a body back
/// must read it whole (`get_service`), never from a listing.
pub fn retain_listed_fields(body: &mut serde_json::Value) {
    const ROLE: &[&str] = &["name", "cardinality", "state", "nodes"];
    let Some(b) = body.as_object_mut() else {
        return;
    };
    keep_only(b, LISTED_BODY_KEYS);
    let roles = b.get_mut("roles").and_then(|r| r.as_array_mut());
    for role in roles
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_object_mut())
    {
        keep_only(role, ROLE);
        let nodes = role.get_mut("nodes").and_then(|n| n.as_array_mut());
        for node in nodes
            .into_iter()
            .flatten()
            .filter_map(|n| n.as_object_mut())
        {
            keep_only(node, &["deploy_id"]);
        }
    }
}

/// A listed service body read straight into the [`retain_listed_fields`] form: other keys
/// are skipped unread, so only one service's `roles` ever exists whole in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedBody(pub serde_json::Value);

impl<'de> serde::Deserialize<'de> for ListedBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Body;
        impl<'de> serde::de::Visitor<'de> for Body {
            type Value = ListedBody;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a service body (JSON object)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ListedBody, A::Error> {
                let mut kept = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    if LISTED_BODY_KEYS.contains(&key.as_str()) {
                        kept.insert(key, map.next_value()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                let mut body = serde_json::Value::Object(kept);
                retain_listed_fields(&mut body);
                Ok(ListedBody(body))
            }
        }
        d.deserialize_map(Body)
    }
}

/// Rebuilt rather than `retain`ed: the map's table shrinks with it.
fn keep_only(obj: &mut serde_json::Map<String, serde_json::Value>, keys: &[&str]) {
    *obj = std::mem::take(obj)
        .into_iter()
        .filter(|(k, _)| keys.contains(&k.as_str()))
        .collect();
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
    by_tag: &HashMap<(u64, String), Vec<u64>>,
    warnings: &mut Vec<(u64, String)>,
) -> LiveRole {
    let Some(r) = doc
        .body
        .get("roles")
        .and_then(|r| r.as_array())
        .and_then(|roles| {
            roles
                .iter()
                .find(|r| r.get("name").and_then(|n| n.as_str()) == Some(name))
        })
    else {
        return LiveRole::default();
    };
    let mut ids: Vec<u64> = r
        .get("nodes")
        .and_then(|n| n.as_array())
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| int(n.get("deploy_id")).and_then(|i| u64::try_from(i).ok()))
                .collect()
        })
        .unwrap_or_default();
    if let Some(tagged) = by_tag.get(&(doc.id, name.to_string())) {
        ids.extend(tagged);
    }
    ids.sort_unstable();
    ids.dedup();
    // Sized up front: a collected Vec grows by doubling, and 20,000 of these live on.
    let mut nodes = Vec::with_capacity(ids.len());
    nodes.extend(
        ids.into_iter()
            .filter_map(|id| by_id.get(&id))
            .filter(|vm| vm.state != 6)
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

fn live_vm(vm: &VmRecord, warnings: &mut Vec<(u64, String)>) -> LiveVm {
    let (attrs, problems) = AgentAttributes::parse(
        vm.user_template
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    warnings.extend(problems.into_iter().map(|p| (vm.id, p)));
    LiveVm {
        id: vm.id,
        name: vm.name.clone(),
        state: VmState::from_code(vm.state),
        lcm_state: if vm.state == 3 {
            LcmState::from_code(vm.lcm_state)
        } else {
            LcmState::LcmInit
        },
        stime: (vm.stime > 0)
            .then(|| DateTime::<Utc>::from_timestamp(vm.stime, 0))
            .flatten(),
        attrs,
    }
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
    use serde_json::json;

    fn service(id: u64, cluster: &str, controller: &str, nodes: &[u64]) -> Document {
        Document {
            id,
            name: cluster.into(),
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
            name: format!("{role}_{id}"),
            state: 3,
            lcm_state: 3,
            stime: 1_700_000_000,
            user_template: ut,
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
            // Created by a scale still in flight: not yet in `nodes`, found by its tags.
            vm(12, 5, "supernode", &[]),
            vm(20, 6, "superlink", &[]),
        ];
        let live = build_live(&services, vms, "ctl-1", now);
        assert_eq!(live.unowned_count, 2);
        let alpha = &live.services("alpha")[0];
        assert_eq!(alpha.service_id, 5);
        assert_eq!(alpha.state, ServiceState::Running);
        assert_eq!(alpha.supernode.cardinality, 2);
        assert_eq!(alpha.superlink.nodes[0].attrs.fl_ready, Some(true));
        let ids: Vec<u64> = alpha.supernode.nodes.iter().map(|v| v.id).collect();
        assert_eq!(ids, vec![11, 12]);
        assert_eq!(live.warnings.len(), 1);
        assert!(live.warnings[0].message.contains("FL_HEARTBEAT"));
        assert!(live.services("beta").is_empty());
    }

    #[test]
    fn digest_ignores_observation_time_but_not_state() {
        let a = build_live(
            &[service(5, "a", "c", &[1, 2])],
            vec![vm(1, 5, "superlink", &[])],
            "c",
            Utc::now(),
        );
        let b = build_live(
            &[service(5, "a", "c", &[1, 2])],
            vec![vm(1, 5, "superlink", &[])],
            "c",
            Utc::now() + chrono::Duration::seconds(9),
        );
        assert_eq!(a.digest, b.digest);
        let c = build_live(
            &[service(5, "a", "c", &[1, 2])],
            vec![vm(1, 5, "superlink", &[("FL_READY", "NO")])],
            "c",
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
            "c",
            Utc::now(),
        );
        assert_eq!(a.digest, beat.digest);
        // The same service under another cluster name is another observation.
        let renamed = build_live(
            &[service(5, "b", "c", &[1, 2])],
            vec![vm(1, 5, "superlink", &[])],
            "c",
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
        let a = build_live(&[full], vms(), "ctl-1", now);
        let b = build_live(&[reduced], vms(), "ctl-1", now);
        assert!(a.services("alpha")[0].applied.is_some());
        assert_eq!(a, b);
    }
}
