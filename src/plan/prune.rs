//! The prune guard: whether clusters whose spec is gone may be destroyed now. Pure.
//!
//! Owns: the rules that stop a source accident (an empty or unmounted directory, a wrong
//! `--path`, a force-push, a commit keeping only `.gitkeep`, a typo before a restart) from
//! destroying `deletionPolicy: Delete` clusters.
//!
//! Must not: read the source or OpenNebula; callers hand in what they saw.
//!
//! # Guarantees
//! - Nothing is pruned while any spec file fails to load: a file broken before its
//!   `metadata.name` cannot say which clusters it defines
//!   ([`DesiredState::prune_block`]; `tests/safety_prune.rs`
//!   `a_typo_before_metadata_name_never_prunes_in_plan_apply_or_run`).
//! - In `run`, nothing is pruned until a second read of the source agreed with the first
//!   (`Snapshot::confirmed`; `run_deletes_only_after_a_second_read_and_blocks_a_mass_delete`).
//! - A change that removes the specs of more than [`PrunePolicy::max_share`] of the managed
//!   clusters, or of all of them, deletes nothing unless explicitly allowed: by
//!   `--allow-mass-delete` for one `plan`/`apply`, or by the allow-delete marker
//!   ([`ALLOW_DELETE_FILE`]) naming every removed cluster, none of which may have a spec
//!   (a marker left behind after its clusters came back is stale and ignored) —
//!   [`prune_gate`]; tests below and `tests/safety_prune.rs`.
//!
//! # Caveats
//! - Retain-policy clusters count as removed too: the guard is about the source, and an
//!   empty source is an accident whatever the policies say.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{DesiredState, LiveService, LiveState};
use crate::api::DeletionPolicy;

/// The allow-delete marker: a file at the spec root naming, one per line, the clusters
/// whose removal a mass-delete block may let through (`#` starts a comment).
pub const ALLOW_DELETE_FILE: &str = "flower-reconcile-allow-delete";

/// Default largest share of the managed clusters one change may remove.
pub const DEFAULT_MAX_DELETE_SHARE: f64 = 0.5;

/// Whether deletions may be planned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PruneGate {
    /// Services of removed Delete-policy clusters may be deleted.
    #[default]
    Open,
    /// Nothing is deleted, for this reason (shown as a plan warning and in status).
    Blocked(String),
}

/// The mass-delete limits.
#[derive(Debug, Clone, PartialEq)]
pub struct PrunePolicy {
    /// Largest share (0..=1) of the managed clusters one change may remove; removing all
    /// of them is always a mass delete.
    pub max_share: f64,
    /// `--allow-mass-delete`: lift the block for this one command.
    pub allow_all: bool,
}

impl Default for PrunePolicy {
    fn default() -> Self {
        Self {
            max_share: DEFAULT_MAX_DELETE_SHARE,
            allow_all: false,
        }
    }
}

/// Whether `service` is recorded with `deletionPolicy: Delete`.
pub fn deletes_on_removal(service: &LiveService) -> bool {
    service
        .applied
        .as_ref()
        .and_then(|a| a.fields.get("spec.deletionPolicy"))
        .is_some_and(|p| p == policy_name(DeletionPolicy::Delete))
}

/// The policy as recorded in a service body.
fn policy_name(p: DeletionPolicy) -> &'static str {
    match p {
        DeletionPolicy::Retain => "Retain",
        DeletionPolicy::Delete => "Delete",
    }
}

/// The gate for a source whose clusters (valid or held) satisfy `specified`, against
/// `live`. `marker` is the allow-delete marker's names, if the source has one.
pub fn prune_gate(
    specified: &dyn Fn(&str) -> bool,
    live: &LiveState,
    marker: Option<&BTreeSet<String>>,
    policy: &PrunePolicy,
) -> PruneGate {
    let managed: Vec<&str> = live
        .clusters
        .iter()
        .filter(|(_, ss)| ss.iter().any(|s| !s.state.is_going_away()))
        .map(|(n, _)| n.as_str())
        .collect();
    let removed: Vec<&str> = managed.iter().copied().filter(|n| !specified(n)).collect();
    let deletes = removed.iter().any(|n| {
        live.services(n)
            .iter()
            .any(|s| !s.state.is_going_away() && deletes_on_removal(s))
    });
    let (r, m) = (removed.len(), managed.len());
    // Integer-safe "r / m > share": both are small counts.
    let mass = r == m || (r as f64) > policy.max_share * (m as f64);
    if !deletes || !mass || policy.allow_all {
        return PruneGate::Open;
    }
    let marker_ok = marker.is_some_and(|names| {
        removed.iter().all(|n| names.contains(*n)) && !names.iter().any(|n| specified(n))
    });
    if marker_ok {
        return PruneGate::Open;
    }
    let note = match marker {
        None => String::new(),
        Some(names) if names.iter().any(|n| specified(n)) => {
            " (the marker present names a cluster that has a spec: stale, ignored)".into()
        }
        Some(names) => format!(
            " (the marker present does not name: {})",
            removed
                .iter()
                .filter(|n| !names.contains(**n))
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let share = if r == m {
        "all".to_string()
    } else {
        format!("more than {:.0} %", policy.max_share * 100.0)
    };
    PruneGate::Blocked(format!(
        "mass delete blocked: the specs of {r} of {m} managed clusters ({share}) are gone ({}); \
         nothing is deleted. If intended: `apply --allow-mass-delete`, or for `run` a file \
         {ALLOW_DELETE_FILE} at the spec root naming every removed cluster{note}",
        removed.join(", "),
    ))
}

impl DesiredState {
    /// Why nothing may be pruned now (`None`: removed Delete-policy clusters are deleted).
    pub fn prune_block(&self) -> Option<&str> {
        if !self.complete {
            return Some(
                "a spec file fails to load, so a missing spec may only be unreadable; \
                 nothing is deleted until every file loads",
            );
        }
        match &self.prune {
            PruneGate::Open => None,
            PruneGate::Blocked(why) => Some(why),
        }
    }
}

/// A share in [0, 1].
pub fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share between 0 and 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;
    use crate::plan::tests::{converged, desired, spec};

    /// The live state after applying Delete/Retain-policy clusters `(name, policy)`.
    fn live(clusters: &[(&str, &str)]) -> LiveState {
        let specs = clusters
            .iter()
            .map(|(name, policy)| spec(name, serde_json::json!({"deletionPolicy": policy})))
            .collect();
        converged(&desired(specs))
    }

    fn gate(specs: &[&str], live: &LiveState, marker: Option<&[&str]>, allow: bool) -> PruneGate {
        let specs: BTreeSet<String> = specs.iter().map(|s| s.to_string()).collect();
        let marker: Option<BTreeSet<String>> =
            marker.map(|m| m.iter().map(|s| s.to_string()).collect());
        prune_gate(
            &|n| specs.contains(n),
            live,
            marker.as_ref(),
            &PrunePolicy {
                allow_all: allow,
                ..PrunePolicy::default()
            },
        )
    }

    #[test]
    fn removing_all_or_more_than_half_blocks_unless_allowed() {
        let l = live(&[
            ("a", "Delete"),
            ("b", "Delete"),
            ("c", "Retain"),
            ("d", "Delete"),
        ]);
        // Half (2 of 4) is allowed.
        assert_eq!(gate(&["a", "b"], &l, None, false), PruneGate::Open);
        // 3 of 4 is more than half.
        let g = gate(&["a"], &l, None, false);
        let PruneGate::Blocked(why) = g else {
            panic!("3 of 4 must block")
        };
        assert!(why.contains("3 of 4") && why.contains("b, c, d"), "{why}");
        // An empty source: all of them.
        assert!(matches!(gate(&[], &l, None, false), PruneGate::Blocked(w) if w.contains("(all)")));
        // The only cluster is "all" of them.
        let one = live(&[("a", "Delete")]);
        assert!(matches!(
            gate(&[], &one, None, false),
            PruneGate::Blocked(_)
        ));
        // The flag lifts it.
        assert_eq!(gate(&[], &l, None, true), PruneGate::Open);
        // Only Retain clusters removed: nothing would be destroyed, nothing to block.
        let retain = live(&[("a", "Retain"), ("b", "Retain")]);
        assert_eq!(gate(&[], &retain, None, false), PruneGate::Open);
    }

    #[test]
    fn the_marker_lifts_the_block_only_when_it_names_every_removed_cluster_and_no_present_one() {
        let l = live(&[("a", "Delete"), ("b", "Delete"), ("c", "Delete")]);
        assert_eq!(
            gate(&[], &l, Some(&["a", "b", "c"]), false),
            PruneGate::Open
        );
        // A marker from an earlier removal of a and b does not unlock removing c too.
        let g = gate(&[], &l, Some(&["a", "b"]), false);
        assert!(
            matches!(&g, PruneGate::Blocked(w) if w.contains("does not name: c")),
            "{g:?}"
        );
        // A marker naming a cluster that has a spec is stale: ignored, and said so.
        let g = gate(&["a"], &l, Some(&["a", "b", "c"]), false);
        assert!(
            matches!(&g, PruneGate::Blocked(w) if w.contains("stale")),
            "{g:?}"
        );
    }

    #[test]
    fn a_blocked_gate_or_an_incomplete_source_plans_a_warning_instead_of_a_delete() {
        let l = live(&[("a", "Delete")]);
        let mut d = DesiredState {
            complete: true,
            ..DesiredState::default()
        };
        let t = crate::plan::tests::t0();
        assert_eq!(plan(&d, &l, t).summary().destroy, 1);
        d.prune = gate(&[], &l, None, false);
        let p = plan(&d, &l, t);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert!(
            p.warnings[0].message.contains("mass delete blocked"),
            "{:?}",
            p.warnings
        );
        d.prune = PruneGate::Open;
        d.complete = false;
        let p = plan(&d, &l, t);
        assert!(p.actions.is_empty());
        assert!(
            p.warnings[0].message.contains("fails to load"),
            "{:?}",
            p.warnings
        );
    }
}
