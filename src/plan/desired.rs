//! The desired state: what the spec sources say, plus what the planner may not prune.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::api::FlowerCluster;

/// One cluster as its spec file describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredCluster {
    /// The validated spec.
    pub cluster: FlowerCluster,
    /// Hash of the spec (as computed by the loader).
    pub spec_hash: String,
    /// Source revision (Git sha or directory digest).
    pub revision: String,
    /// The public keys of this cluster's SuperNodes in other sites (other OpenNebula zones:
    /// its SuperLink's OneGate cannot see them), which the SuperLink must accept too: the
    /// controller writes them, signed, as `FL_SITE_NODE_KEYS`. Empty for a single-site
    /// cluster, which then gets no such attribute at all. Whoever fills it must fill it from
    /// complete views only: a key left out is unregistered by the SuperLink, and Flower never
    /// registers an unregistered key again, so a site that could not be observed keeps the
    /// keys it had.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub site_node_keys: BTreeSet<crate::protocol::node_key::NodePublicKey>,
}

/// Everything the sources currently ask for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Valid clusters by name.
    pub clusters: BTreeMap<String, DesiredCluster>,
    /// Clusters whose file currently fails to load. They are left exactly as they are:
    /// never pruned, never changed.
    pub held: BTreeSet<String>,
    /// `false` when the source could not be read completely, a spec file failing to load
    /// included (then nothing is pruned).
    pub complete: bool,
    /// Whether removed clusters may be deleted beyond `complete` (the mass-delete guard,
    /// [`super::prune`]).
    #[serde(default)]
    pub prune: super::prune::PruneGate,
}

/// Paths (prefixes) whose change OneFlow cannot apply in place: the cluster is redeployed.
pub const REPLACEMENT_FIELDS: &[&str] = &[
    "spec.flowerVersion",
    "spec.tls.enabled",
    "spec.tls.mode",
    "spec.tls.provided",
    "spec.tls.extraNames",
    "spec.superlink.ports",
    "spec.opennebula.templates",
    "spec.opennebula.network",
    // A site part's SuperLink address and CA are in its VMs' context, which OneFlow
    // gives only to new VMs.
    "spec.part",
];

/// Paths left out of the applied record: `count` is reconciled by scaling, `suspend` only
/// gates planning and `training` is read by `submit`, not by OpenNebula;
/// `supernodes.sites` is carried out by the site parts (their own services), never by
/// the home service.
const UNRECORDED_FIELDS: &[&str] = &[
    "spec.supernodes.count",
    "spec.supernodes.sites",
    "spec.suspend",
    "spec.training",
];

/// Paths whose values are secret: kept only as a hash, displayed as `(sensitive value)`.
pub const SENSITIVE_FIELDS: &[&str] = &["spec.tls.provided"];

/// Whether `path` is `prefix` or lies below it.
pub fn under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// Whether a change at `path` forces a redeploy.
pub fn forces_replacement(path: &str) -> bool {
    REPLACEMENT_FIELDS.iter().any(|p| under(path, p))
}

/// Whether the value at `path` is secret.
pub fn is_sensitive(path: &str) -> bool {
    SENSITIVE_FIELDS.iter().any(|p| under(path, p))
}

/// The spec flattened to `spec.a.b[0]` → value, the form recorded in a service body and
/// diffed by the planner. Secret values are replaced by `sha256:<16 hex>` so a change is
/// still detected without the value ever being stored or printed.
pub fn spec_fields(cluster: &FlowerCluster) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let value = serde_json::to_value(&cluster.spec).unwrap_or_default();
    flatten("spec", &value, &mut out);
    out.retain(|k, _| !UNRECORDED_FIELDS.iter().any(|p| under(k, p)));
    for (k, v) in out.iter_mut() {
        if is_sensitive(k) {
            *v = redact(v);
        }
    }
    out
}

fn redact(value: &str) -> String {
    use sha2::{Digest, Sha256};
    let hash = super::live::hex(&Sha256::digest(value.as_bytes()));
    format!("sha256:{}", &hash[..16])
}

fn flatten(path: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{path}.{k}"), v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{path}[{i}]"), v, out);
            }
        }
        Value::String(s) => {
            out.insert(path.to_string(), s.clone());
        }
        Value::Null => {}
        other => {
            out.insert(path.to_string(), other.to_string());
        }
    }
}

/// The replacement-forcing subset of a field map.
pub fn replacement_fields(fields: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    fields
        .iter()
        .filter(|(k, _)| forces_replacement(k))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments_only() {
        assert!(under("spec.tls.mode", "spec.tls.mode"));
        assert!(under("spec.superlink.ports.fleet", "spec.superlink.ports"));
        assert!(!under("spec.tls.modeX", "spec.tls.mode"));
        assert!(forces_replacement("spec.opennebula.templates.superlink"));
        assert!(!forces_replacement("spec.supernodes.vcpu"));
        // A running SuperLink cannot see a new context: new names need a new certificate.
        assert!(forces_replacement("spec.tls.extraNames[0]"));
    }
}
