//! What the controller tests against onesim share: the VM templates and network their
//! specs name, a spec file, the agents' attributes, a role's cardinality.

use flower_reconcile::one::OnedClient;
use serde_json::Value;

/// The two VM templates (`flower-superlink`, `flower-supernode`) and the network
/// (`private`) that [`spec_yaml`] names.
pub async fn fixtures(oned: &OnedClient) {
    for name in ["flower-superlink", "flower-supernode"] {
        oned.template_allocate(&format!(
            "NAME=\"{name}\"\nCPU=\"1\"\nMEMORY=\"512\"\nCONTEXT=[TOKEN=\"YES\"]"
        ))
        .await
        .expect("template");
    }
    oned.vn_allocate(
        "NAME=\"private\"\nVN_MAD=\"bridge\"\nBRIDGE=\"br0\"\nAR=[TYPE=\"IP4\",IP=\"10.0.0.10\",SIZE=\"250\"]",
        -1,
    )
    .await
    .expect("network");
}

/// A FlowerCluster spec file over [`fixtures`] with `count` SuperNodes.
pub fn spec_yaml(name: &str, count: u32) -> String {
    format!(
        "apiVersion: {}\nkind: {}\nmetadata:\n  name: {name}\nspec:\n  opennebula:\n    templates:\n      superlink: flower-superlink\n      supernode: flower-supernode\n    network: private\n  supernodes:\n    count: {count}\n",
        flower_reconcile::api::API_VERSION,
        flower_reconcile::api::KIND
    )
}

/// What the agents would publish on every running VM: readiness and the heartbeat `beat`
/// (a heartbeat set to `stale` by a test is left alone).
pub fn publish_agent_attributes(st: &mut onesim::state::State, beat: &str) {
    for vm in st.vms.values_mut().filter(|v| v.is_running()) {
        match vm
            .user_template
            .get("ROLE_NAME")
            .map(str::to_string)
            .as_deref()
        {
            Some("superlink") => vm.user_template.set("FL_READY", "YES"),
            Some("supernode") => vm.user_template.set("FL_NODE_READY", "YES"),
            _ => {}
        }
        if vm.user_template.get("FL_HEARTBEAT") != Some("stale") {
            vm.user_template.set("FL_HEARTBEAT", beat);
        }
    }
}

/// The `supernode` role's cardinality in a OneFlow service body (number or string).
pub fn supernode_cardinality(body: &Value) -> u64 {
    body["roles"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "supernode"))
        .and_then(|r| {
            r["cardinality"]
                .as_u64()
                .or_else(|| r["cardinality"].as_str()?.parse().ok())
        })
        .unwrap_or(0)
}
