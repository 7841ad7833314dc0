//! Prometheus metrics of the controller, encoded with prometheus-client as OpenMetrics.
//!
//! Guarantees: the reconcile duration histogram carries, per bucket, an exemplar with
//! the `trace_id` of the last reconcile that fell in it (when it had one), so a slow
//! bucket leads to its trace (`exposition_carries_results_api_calls_and_the_revision`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

use crate::one::ApiStats;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// Every metric the controller exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels, Counter>,
    duration: HistogramWithExemplars<Labels>,
    errors: Family<Labels, Counter>,
    drift: Gauge,
    deletions_blocked: Gauge,
    queue: Gauge,
    holds: Family<Labels, Counter>,
    api_calls: Family<Labels, Counter>,
    revision: Family<Labels, Gauge>,
    refused: Family<Labels, Gauge>,
    leader: Gauge,
    leader_transitions: Counter,
    api_seen: Mutex<HashMap<(&'static str, &'static str), u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered under the `flower_reconcile` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flower_reconcile");
        let reconciles = Family::<Labels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles finished, by result (ok, error)",
            reconciles.clone(),
        );
        let duration = HistogramWithExemplars::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one cluster reconcile",
            duration.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register(
            "errors",
            "Errors by stage (reconcile, observe, source)",
            errors.clone(),
        );
        let drift = Gauge::default();
        registry.register(
            "drift_clusters",
            "Clusters whose last reconcile had pending actions or failed",
            drift.clone(),
        );
        let deletions_blocked = Gauge::default();
        registry.register(
            "deletions_blocked_clusters",
            "Clusters whose spec is gone but whose deletion is blocked (mass-delete guard, \
             unconfirmed or incomplete source)",
            deletions_blocked.clone(),
        );
        let queue = Gauge::default();
        registry.register(
            "queue_depth",
            "Clusters queued for a reconcile",
            queue.clone(),
        );
        let holds = Family::<Labels, Counter>::default();
        registry.register(
            "safety_holds",
            "Reconciles that held back destructive actions for safety, by reason \
             (heartbeat_outage: most heartbeats stale together; stale_view: observation too old; \
             flower_sees_online: a stale heartbeat's SuperNode is online in the SuperLink)",
            holds.clone(),
        );
        let api_calls = Family::<Labels, Counter>::default();
        registry.register(
            "api_calls",
            "OpenNebula API calls by method and outcome",
            api_calls.clone(),
        );
        let revision = Family::<Labels, Gauge>::default();
        registry.register(
            "source_revision_info",
            "The last synced source revision (value 1)",
            revision.clone(),
        );
        let refused = Family::<Labels, Gauge>::default();
        registry.register(
            "source_refused_revision_info",
            "The newest fetched revision while it is refused (value 1), with the failed \
             check (SourceVerified, FastForward) and its reason; absent otherwise",
            refused.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this instance leads (acts on OpenNebula), 0 while it stands by",
            leader.clone(),
        );
        let leader_transitions = Counter::default();
        registry.register(
            "leader_transitions",
            "Times this instance gained or lost leadership",
            leader_transitions.clone(),
        );
        Self {
            registry,
            leader,
            leader_transitions,
            reconciles,
            duration,
            errors,
            drift,
            deletions_blocked,
            queue,
            holds,
            api_calls,
            revision,
            refused,
            api_seen: Mutex::new(HashMap::new()),
        }
    }

    /// Count one finished reconcile; `trace_id` becomes its duration's exemplar.
    pub fn reconciled(&self, ok: bool, took: Duration, trace_id: Option<&str>) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&labels(&[("result", result)]))
            .inc();
        let exemplar = trace_id.map(|id| labels(&[("trace_id", id)]));
        self.duration.observe(took.as_secs_f64(), exemplar, None);
        if !ok {
            self.error("reconcile");
        }
    }

    /// Count one error of `stage`.
    pub fn error(&self, stage: &str) {
        self.errors
            .get_or_create(&labels(&[("stage", stage)]))
            .inc();
    }

    /// Count one reconcile that held back destructive actions for `reason`.
    pub fn safety_hold(&self, reason: &str) {
        self.holds
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    /// Set the number of drifting clusters and the queue depth.
    pub fn set_drift(&self, drifting: usize, queued: usize) {
        self.drift.set(i64::try_from(drifting).unwrap_or(i64::MAX));
        self.queue.set(i64::try_from(queued).unwrap_or(i64::MAX));
    }

    /// Set the number of clusters whose deletion is blocked.
    pub fn set_deletions_blocked(&self, clusters: usize) {
        self.deletions_blocked
            .set(i64::try_from(clusters).unwrap_or(i64::MAX));
    }

    /// Set the leader gauge; a change of value counts as a transition.
    pub fn set_leader(&self, leading: bool) {
        let v = i64::from(leading);
        if self.leader.set(v) != v {
            self.leader_transitions.inc();
        }
    }

    /// Record the synced revision of `source`.
    pub fn set_revision(&self, source: &str, revision: &str) {
        self.revision.clear();
        self.revision
            .get_or_create(&labels(&[("source", source), ("revision", revision)]))
            .set(1);
    }

    /// Record the refused revision, or none.
    pub fn set_refused(&self, refused: Option<&crate::source::SourceCondition>) {
        self.refused.clear();
        if let Some(c) = refused {
            self.refused
                .get_or_create(&labels(&[
                    ("revision", &c.revision),
                    ("check", &c.kind),
                    ("reason", &c.reason),
                ]))
                .set(1);
        }
    }

    /// Bring the API counters up to `stats` (monotonic: only the increase is added).
    pub fn sync_api(&self, stats: &ApiStats) {
        let Ok(mut seen) = self.api_seen.lock() else {
            return;
        };
        for e in stats.snapshot() {
            let key = (e.method, e.outcome.as_str());
            let last = seen.entry(key).or_insert(0);
            if e.calls > *last {
                self.api_calls
                    .get_or_create(&labels(&[("method", key.0), ("outcome", key.1)]))
                    .inc_by(e.calls - *last);
                *last = e.calls;
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::one::Outcome;

    #[test]
    fn exposition_carries_results_api_calls_and_the_revision() {
        let m = Metrics::new();
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        m.reconciled(true, Duration::from_millis(30), Some(trace));
        m.reconciled(false, Duration::from_millis(30), None);
        m.set_revision("git", "abc123");
        m.set_revision("git", "def456");
        let stats = ApiStats::new();
        stats.record(
            "one.vmpool.infoextended",
            Outcome::Ok,
            Duration::from_millis(5),
        );
        m.sync_api(&stats);
        stats.record(
            "one.vmpool.infoextended",
            Outcome::Ok,
            Duration::from_millis(5),
        );
        m.sync_api(&stats);
        m.sync_api(&stats);
        let text = m.encode();
        assert!(
            text.contains("flower_reconcile_reconciles_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("flower_reconcile_errors_total{stage=\"reconcile\"} 1"));
        assert!(text.contains(
            "flower_reconcile_api_calls_total{method=\"one.vmpool.infoextended\",outcome=\"ok\"} 2"
        ));
        assert!(text.contains("revision=\"def456\""));
        assert!(!text.contains("abc123"), "only the current revision");
        assert!(text.contains("flower_reconcile_reconcile_duration_seconds_count 2"));
        // 30 ms falls in the 0.04 s bucket; OpenMetrics puts the exemplar after ` # `.
        let bucket = text
            .lines()
            .find(|l| {
                l.starts_with("flower_reconcile_reconcile_duration_seconds_bucket{le=\"0.04\"}")
            })
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            bucket.contains(&format!(" # {{trace_id=\"{trace}\"}} 0.03")),
            "{bucket}"
        );
    }
}
