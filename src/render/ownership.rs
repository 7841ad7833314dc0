//! Ownership markers: how a controller recognises the OneFlow services it created.
//!
//! A managed service template carries a top-level object (OneFlow keeps unknown keys)
//!
//! ```json
//! "flower_reconcile": {"cluster": "demo", "spec_hash": "…", "controller": "ctl-1", "format": 1}
//! ```
//!
//! plus a human `description` and the `ONEAPP_FL_CLUSTER_NAME` context variable per role.

use serde_json::{json, Value};

/// Top-level key of the marker object in a service template body.
pub const MARKER_KEY: &str = "flower_reconcile";
/// Marker field: cluster name.
pub const CLUSTER_KEY: &str = "cluster";
/// Marker field: spec hash the service was rendered from.
pub const SPEC_HASH_KEY: &str = "spec_hash";
/// Marker field: id of the controller that owns the service.
pub const CONTROLLER_KEY: &str = "controller";
/// Marker field: marker format version.
pub const FORMAT_KEY: &str = "format";
/// The marker format this code writes and reads.
pub const FORMAT: u64 = 1;
/// Top-level key of the cluster's signing key in a managed service (template) body:
/// `{"ed25519_seed": "<base64>"}`, a secret ([`crate::protocol::signing`]). OneGate's
/// service view shows only names, states and node lists, so no VM can read it.
pub const SIGNING_KEY: &str = "flower_reconcile_signing";
const SEED_FIELD: &str = "ed25519_seed";

/// What a planned body carries in place of the cluster's public key
/// (`ONEAPP_FL_CONTROLLER_KEY`) until [`seal`] puts the key in: plans are printed and
/// saved, so the key (and the seed behind it) is chosen when the body is sent.
pub const PENDING_PUBLIC_KEY: &str = "sealed-when-applied";

/// `body` (rendered with [`PENDING_PUBLIC_KEY`]) with the cluster's signing key put in:
/// the seed under [`SIGNING_KEY`], its public half in the SuperLink's context. Pure: the
/// executor calls it right before sending.
pub fn seal(body: &Value, seed: &crate::protocol::signing::SigningSeed) -> Value {
    let mut body = body.clone();
    let public = seed.public_key();
    super::map_context(
        &mut body,
        &[crate::protocol::context::CONTROLLER_KEY],
        |_| public.clone(),
    );
    if let Some(o) = body.as_object_mut() {
        o.insert(SIGNING_KEY.into(), signing_key_json(seed));
    }
    body
}

/// The signing-key object to put into a body under [`SIGNING_KEY`].
pub fn signing_key_json(seed: &crate::protocol::signing::SigningSeed) -> Value {
    json!({ SEED_FIELD: seed.to_base64() })
}

/// The cluster's signing seed stored in a body (template body or service body), if any.
pub fn signing_seed_of(body: &Value) -> Option<crate::protocol::signing::SigningSeed> {
    let text = body.get(SIGNING_KEY)?.get(SEED_FIELD)?.as_str()?;
    crate::protocol::signing::SigningSeed::from_base64(text)
}

/// Who owns a service, as written into its template.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ownership {
    /// `metadata.name` of the cluster.
    pub cluster: String,
    /// Spec hash the service was rendered from.
    pub spec_hash: String,
    /// Id of the owning controller.
    pub controller: String,
}

impl Ownership {
    /// The marker object.
    pub fn to_json(&self) -> Value {
        json!({
            CLUSTER_KEY: self.cluster,
            SPEC_HASH_KEY: self.spec_hash,
            CONTROLLER_KEY: self.controller,
            FORMAT_KEY: FORMAT,
        })
    }

    /// Reads the marker from a service body: the template body itself, or a OneFlow
    /// document (`{"DOCUMENT": {"TEMPLATE": {"BODY": …}}}` or `{"TEMPLATE": {"BODY": …}}`).
    /// Tolerant: `None` on anything missing or malformed, never a panic.
    pub fn from_body(body: &Value) -> Option<Self> {
        let candidates = [
            Some(body),
            body.pointer("/DOCUMENT/TEMPLATE/BODY"),
            body.pointer("/TEMPLATE/BODY"),
        ];
        candidates
            .into_iter()
            .flatten()
            .find_map(|b| Self::from_marker(b.get(MARKER_KEY)?))
    }

    fn from_marker(m: &Value) -> Option<Self> {
        let format_ok = match m.get(FORMAT_KEY)? {
            Value::Number(n) => n.as_u64() == Some(FORMAT),
            Value::String(s) => s.trim().parse::<u64>().ok() == Some(FORMAT),
            _ => false,
        };
        let text = |k: &str| {
            m.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        format_ok.then_some(())?;
        Some(Self {
            cluster: text(CLUSTER_KEY)?,
            spec_hash: text(SPEC_HASH_KEY)?,
            controller: text(CONTROLLER_KEY)?,
        })
    }
}

/// The `description` of a managed service template.
pub fn description(cluster: &str) -> String {
    format!("Managed by flower-reconcile (cluster {cluster}). Do not edit by hand.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Ownership {
        Ownership {
            cluster: "demo".into(),
            spec_hash: "0123abcd".into(),
            controller: "ctl".into(),
        }
    }

    #[test]
    fn round_trips_through_a_body_and_a_oneflow_document() {
        let body = json!({"name": "demo", MARKER_KEY: owner().to_json()});
        assert_eq!(Ownership::from_body(&body), Some(owner()));
        let doc = json!({"DOCUMENT": {"TEMPLATE": {"BODY": body}}});
        assert_eq!(Ownership::from_body(&doc), Some(owner()));
    }

    #[test]
    fn malformed_markers_are_ignored() {
        for bad in [
            json!(null),
            json!("x"),
            json!({MARKER_KEY: "x"}),
            json!({MARKER_KEY: {"cluster": "a", "spec_hash": "b", "controller": "c"}}),
            json!({MARKER_KEY: {"cluster": "a", "spec_hash": "b", "controller": "c", "format": 2}}),
            json!({MARKER_KEY: {"cluster": "", "spec_hash": "b", "controller": "c", "format": 1}}),
            json!({MARKER_KEY: {"cluster": 5, "spec_hash": "b", "controller": "c", "format": 1}}),
        ] {
            assert_eq!(Ownership::from_body(&bad), None, "{bad}");
        }
        let string_format = json!({MARKER_KEY: {"cluster": "a", "spec_hash": "b", "controller": "c", "format": "1"}});
        assert!(Ownership::from_body(&string_format).is_some());
    }
}
