//! One reconcile of one cluster: plan it against the given observation, apply, and say
//! when to look again. Level-triggered: it never needs to know why it was called.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::apply::{Applier, ApplyError};
use super::context::Context;
use crate::one::BackendError;
use crate::plan::{next_deadline, plan_cluster, Action, DesiredState, LiveState, Plan};

/// What a reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileOutcome {
    /// One line per action executed (waits included).
    pub applied: Vec<String>,
    /// Whether OpenNebula was changed.
    pub mutated: bool,
    /// Look again after this long (`None`: nothing pending; the periodic resync suffices).
    pub requeue_after: Option<Duration>,
    /// Safety holds in the plan ([`crate::plan::WaitFor::safety_hold`]).
    pub holds: Vec<&'static str>,
}

/// A failed observation or reconcile: the error type of the runtime seam
/// ([`crate::runtime::Reconciler::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Observing OpenNebula failed; nothing was planned.
    #[error("observing OpenNebula")]
    Observe(#[source] BackendError),
    /// Applying an action failed; the actions before it succeeded.
    #[error("{error}")]
    Apply {
        /// Actions that succeeded before the failure.
        applied: Vec<String>,
        /// The failure (its message is this error's, not chained: `{:#}` would repeat it).
        error: ApplyError,
    },
}

impl ReconcileError {
    /// The last mutation's outcome is unknown (e.g. a timeout).
    pub fn is_ambiguous(&self) -> bool {
        match self {
            ReconcileError::Observe(_) => false,
            ReconcileError::Apply { error, .. } => error.is_ambiguous(),
        }
    }
}

/// Reconcile `cluster`: plan it from `desired` and `live` at the observation's own time
/// (`live.observed_at`, never the wall clock), prepare the actions' payloads (resolved
/// ids, rendered bodies), apply them.
///
/// `now` (the wall clock) only measures the observation's age: older than
/// `ctx.options.max_view_age`, nothing destructive or clock-driven is applied
/// ([`crate::plan::Plan::withhold_on_stale_view`]), and when to look again.
///
/// `live` must come from an observation made after this cluster's last failed reconcile:
/// a failed mutation's outcome may be unknown (the runtime guarantees it).
pub async fn reconcile_one(
    ctx: &Context,
    desired: &DesiredState,
    live: &LiveState,
    cluster: &str,
    now: DateTime<Utc>,
) -> Result<ReconcileOutcome, ReconcileError> {
    reconcile_allowed(ctx, desired, live, cluster, now, &|_| true).await
}

/// [`reconcile_one`] applying only the planned actions `allow` accepts (the others are
/// left pending; they still count for the requeue and the safety holds): what the
/// converge loop behind `apply --wait` runs ([`super::converge`]).
pub async fn reconcile_allowed(
    ctx: &Context,
    desired: &DesiredState,
    live: &LiveState,
    cluster: &str,
    now: DateTime<Utc>,
    allow: &(dyn Fn(&Action) -> bool + Sync),
) -> Result<ReconcileOutcome, ReconcileError> {
    let at = live.observed_at;
    let mut plan = plan_cluster(desired, live, cluster, at);
    let max_age =
        chrono::Duration::from_std(ctx.options.max_view_age).unwrap_or(chrono::Duration::MAX);
    plan.withhold_on_stale_view(now - at, max_age);
    // Only what will run is prepared: a disallowed create resolves nothing.
    let mut run = Plan {
        actions: plan.actions.iter().filter(|a| allow(a)).cloned().collect(),
        ..Plan::default()
    };
    super::prepare(ctx, desired, &mut run)
        .await
        .map_err(|error| ReconcileError::Apply {
            applied: Vec::new(),
            error,
        })?;
    let mut applier = Applier::new(ctx, desired).with_view(live);
    let mut out = ReconcileOutcome::default();
    for action in &run.actions {
        match applier.apply(action).await {
            Ok(a) => {
                out.mutated |= a.mutated;
                out.applied.push(a.summary);
            }
            Err(source) => {
                return Err(ReconcileError::Apply {
                    applied: out.applied,
                    error: source,
                })
            }
        }
    }
    // Waits and deferred changes alike: what they wait for sets the requeue, and each
    // safety hold counts once per reconcile.
    out.holds = plan
        .actions
        .iter()
        .filter_map(|a| a.waits_for()?.safety_hold())
        .collect();
    out.holds.sort_unstable();
    out.holds.dedup();
    let wait = plan
        .actions
        .iter()
        .filter_map(|a| Some(Duration::from_secs(a.waits_for()?.requeue_secs())))
        .min();
    let wait = match out.mutated {
        true => Some(wait.map_or(ctx.options.requeue_after_change, |w| {
            w.min(ctx.options.requeue_after_change)
        })),
        false => wait,
    };
    // Heartbeats go stale and certificates near expiry with no event at all: look again
    // just after the next such moment (kube-runtime's `Action::requeue`).
    // Deadlines are relative to the observation; one already past on the wall clock
    // needs a newer observation, which the next poll brings.
    let clock = next_deadline(desired, live, cluster, at)
        .map(|t| (t - now).to_std().unwrap_or_default() + Duration::from_secs(1));
    out.requeue_after = [wait, clock].into_iter().flatten().min();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::one::backend::BackendErrorKind;
    use crate::runtime::error_chain;

    #[test]
    fn a_failed_reconcile_reads_once_in_logs_and_status() {
        let e = ReconcileError::Apply {
            applied: vec![],
            error: ApplyError::Backend {
                cluster: "alpha".into(),
                action: "create",
                error: BackendError::new(BackendErrorKind::Ambiguous, "POST /x: timed out"),
            },
        };
        assert_eq!(
            error_chain(&e),
            "create of cluster alpha: outcome unknown: POST /x: timed out"
        );
        assert!(e.is_ambiguous());
        let observe = ReconcileError::Observe(BackendError::new(
            BackendErrorKind::Rejected,
            "GET /service: 401",
        ));
        assert_eq!(
            error_chain(&observe),
            "observing OpenNebula: rejected: GET /service: 401"
        );
        assert!(!observe.is_ambiguous());
    }
}
