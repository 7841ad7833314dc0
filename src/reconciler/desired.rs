//! From a source snapshot to the planner's desired state, and the prune gate it allows.

use crate::plan::{prune_gate, DesiredCluster, DesiredState, LiveState, PruneGate, PrunePolicy};
use crate::source::Snapshot;

/// The desired state a snapshot describes. Held clusters are carried over so they are
/// never pruned, and a snapshot with any file error is not `complete`: a file broken
/// before its `metadata.name` cannot say which clusters it defines, so nothing is pruned
/// (after a restart, the assembler's memory of the file is gone).
pub fn desired_from_snapshot(s: &Snapshot) -> DesiredState {
    DesiredState {
        clusters: s
            .clusters
            .iter()
            .map(|(name, c)| {
                (
                    name.clone(),
                    DesiredCluster {
                        cluster: c.cluster.clone(),
                        spec_hash: c.spec_hash.clone(),
                        revision: s.revision.clone(),
                        site_node_keys: Default::default(),
                    },
                )
            })
            .collect(),
        held: s.held.keys().cloned().collect(),
        complete: s.errors.is_empty(),
        prune: PruneGate::Open,
    }
}

/// The prune gate of snapshot `s` against `live` (the mass-delete guard, with `s`'s
/// allow-delete marker). `require_confirmed` (the `run` service): an unconfirmed
/// snapshot deletes nothing yet.
pub fn snapshot_prune_gate(
    s: &Snapshot,
    live: &LiveState,
    policy: &PrunePolicy,
    require_confirmed: bool,
) -> PruneGate {
    if require_confirmed && !s.confirmed {
        return PruneGate::Blocked(
            "the removal is applied once a second read of the source agrees (next source \
             interval)"
                .into(),
        );
    }
    let specified = |n: &str| s.clusters.contains_key(n) || s.held.contains_key(n);
    prune_gate(&specified, live, s.allow_delete.as_ref(), policy)
}
