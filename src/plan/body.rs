//! What a create, a redeploy or an in-place update sends: the service body rendered at
//! planning time, carried by the action ([`super::ActionKind`]) to the executor.
//!
//! Guarantees: the body itself never leaves memory. It holds provided TLS private keys,
//! so it is not serialized (saved and printed plans carry the resolved ids and
//! [`ServiceBody::digest`] only) and `Debug` leaves it out; two bodies are equal when
//! their ids and digests are, so a saved plan (no body) equals the fresh plan it was
//! (`cli::apply::unplanned`). The cluster's signing key is not in it either: the executor
//! seals it in ([`crate::render::ownership::seal`]) from the key kept in OpenNebula.
//! Shown by `reconciler::scenarios::a_printed_or_saved_plan_holds_no_private_key_and_no_seed`.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Template and network ids a spec's references resolved to (names among the
/// controller's own objects, or `--resource-owner`'s; ids checked to exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedIds {
    /// SuperLink VM template id.
    pub superlink_template: u64,
    /// SuperNode VM template id.
    pub supernode_template: u64,
    /// Virtual network id.
    pub network: u64,
}

/// A rendered OneFlow service(-template) body, without the signing key.
#[derive(Clone, Serialize, Deserialize)]
pub struct ServiceBody {
    /// The ids the body was rendered with.
    pub ids: ResolvedIds,
    /// `sha256:<hex>` of the body with each secret value replaced by its own digest
    /// ([`crate::render::digest_service_template`]).
    pub digest: String,
    /// The body: in memory only.
    #[serde(skip)]
    body: Option<Arc<Value>>,
}

impl ServiceBody {
    /// Carry `body`, rendered with `ids`.
    pub fn new(ids: ResolvedIds, body: Value) -> Self {
        Self {
            ids,
            digest: crate::render::digest_service_template(&body),
            body: Some(Arc::new(body)),
        }
    }

    /// The body; `None` for a plan read back from a file (executors use the fresh plan
    /// a saved one was checked to equal).
    pub fn body(&self) -> Option<&Value> {
        self.body.as_deref()
    }
}

impl PartialEq for ServiceBody {
    fn eq(&self, other: &Self) -> bool {
        self.ids == other.ids && self.digest == other.digest
    }
}

impl Eq for ServiceBody {}

impl fmt::Debug for ServiceBody {
    // The body holds secrets: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceBody")
            .field("ids", &self.ids)
            .field("digest", &self.digest)
            .field("body", &self.body.as_ref().map(|_| "<in memory>"))
            .finish()
    }
}
