//! From a source snapshot to the planner's desired state.

use crate::plan::{DesiredCluster, DesiredState};
use crate::source::Snapshot;

/// The desired state a complete snapshot describes (held clusters are carried over so they
/// are never pruned).
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
                    },
                )
            })
            .collect(),
        held: s.held.keys().cloned().collect(),
        complete: true,
    }
}
