//! The production [`Reconciler`]: observe OpenNebula through a [`Context`] and reconcile
//! one cluster with [`reconcile_one`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use super::desired::snapshot_prune_gate;
use super::{observe, reconcile_one, Context, ReconcileError};
use crate::api::FlowerCluster;
use crate::plan::prune::deletes_on_removal;
use crate::plan::ready;
use crate::plan::{
    DesiredCluster, DesiredState, LiveService, LiveState, Outage, PruneGate, PrunePolicy, Role,
};
use crate::protocol::node_key::NodePublicKey;
use crate::runtime::status::{LiveSummary, MetricsTarget, Verdict};
use crate::runtime::{ErrorAction, Outcome, ReconcileRequest, Reconciler};
use crate::source::SourcedCluster;

/// Drives OpenNebula for the runtime.
pub struct OneReconciler {
    ctx: Arc<Context>,
    blind: Mutex<BlindSpells>,
    prune: PrunePolicy,
    /// Service-level observation warnings already logged (each is logged once).
    reported: Mutex<BTreeSet<String>>,
    heartbeats: Mutex<HeartbeatMarks>,
    /// The runtime's poll interval, for the grace-period margin check (`run` sets it).
    poll_interval: Option<std::time::Duration>,
    /// Where each complete observation is also published (the home site's, read by the
    /// site loops' derivation: `service::sites`).
    tap: Option<tokio::sync::watch::Sender<Option<Arc<LiveState>>>>,
    /// The sites `run`'s configuration names: a spec naming another is reported
    /// (`Degraded/UnknownSite`).
    known_sites: Option<BTreeSet<String>>,
    /// Each configured site's newest complete observation (its loop's tap): where the home
    /// loop finds the keys of the clusters' SuperNodes there ([`Self::wanted_site_keys`]).
    site_observations: BTreeMap<String, Observations>,
}

/// The newest complete observation of one loop (`None` before the first).
pub type Observations = tokio::sync::watch::Receiver<Option<Arc<LiveState>>>;

/// The observer's record of when it could not see OpenNebula.
#[derive(Debug, Default)]
struct BlindSpells {
    /// Start of the last successful observation.
    last_ok: Option<DateTime<Utc>>,
    /// The observation before this one failed.
    failing: bool,
    last_outage: Option<Outage>,
}

impl BlindSpells {
    /// Record an observation started at `at`; returns the last outage.
    fn record(&mut self, at: DateTime<Utc>, ok: bool) -> Option<Outage> {
        if !ok {
            self.failing = true;
            return self.last_outage;
        }
        if let (true, Some(from)) = (self.failing, self.last_ok) {
            self.last_outage = Some(Outage { from, to: at });
        }
        self.failing = false;
        self.last_ok = Some(at);
        self.last_outage
    }
}

/// How far ahead of the observation a heartbeat may be (agents' clocks drift) before it
/// is ignored as forged: kept as the newest, a far-future value would hide a dead node.
const MAX_HEARTBEAT_LEAD: chrono::TimeDelta = chrono::TimeDelta::minutes(2);

/// The newest `FL_HEARTBEAT` seen per VM, across observations.
///
/// Any VM of a service can rewrite a peer's `FL_HEARTBEAT` through OneGate
/// (`PUT /vms/:id`), e.g. back to an old time to get a healthy peer replaced. A heartbeat
/// only moves forward: the live state handed to the planner carries, per VM, the newest
/// heartbeat this process has seen (older values are ignored and reported), so the
/// planner's meaning of `heartbeat` — "the last time the agent was alive" — is unchanged.
/// Values more than [`MAX_HEARTBEAT_LEAD`] ahead of the observation are ignored. Kept in
/// the runtime's reconciler, not in the pure planner: it is memory of past observations.
/// Forgotten with the VM, and on restart (then the first observation is the baseline).
/// Shown by `driver::tests::a_heartbeat_never_moves_backwards` and
/// `tests/safety_liveness.rs::a_heartbeat_rewritten_backwards_by_a_peer_is_ignored`.
///
/// It also remembers, per VM, the last silence it saw end (the heartbeat before an advance
/// and the advance), handed to the planner as `LiveVm::last_silence`: heartbeats that stall
/// together resume one by one, and the breaker must still see the outage while the last
/// ones catch up (`driver::tests::a_heartbeat_never_moves_backwards`).
#[derive(Debug, Default)]
pub struct HeartbeatMarks {
    newest: std::collections::HashMap<u64, DateTime<Utc>>,
    silences: std::collections::HashMap<u64, crate::plan::Silence>,
}

impl HeartbeatMarks {
    /// Raise each VM's heartbeat in `live` to the newest seen, remember the new ones.
    pub fn apply(&mut self, live: &mut LiveState) {
        let limit = live.observed_at + MAX_HEARTBEAT_LEAD;
        let mut seen = std::collections::HashMap::with_capacity(self.newest.len());
        let mut silences = std::collections::HashMap::with_capacity(self.silences.len());
        let mut warnings = Vec::new();
        for (cluster, services) in live.clusters.iter_mut() {
            let vms = services
                .iter_mut()
                .flat_map(|s| s.superlink.nodes.iter_mut().chain(&mut s.supernode.nodes));
            for vm in vms {
                let mark = self.newest.get(&vm.id).copied();
                let observed = vm.attrs.heartbeat.filter(|t| *t <= limit);
                if vm.attrs.heartbeat.is_some() && observed.is_none() {
                    warnings.push((cluster.clone(), vm.id, "ahead of the controller's clock"));
                } else if observed.is_some() && observed < mark {
                    warnings.push((cluster.clone(), vm.id, "older than one seen before"));
                }
                let newest = observed.max(mark);
                vm.attrs.heartbeat = newest;
                if let Some(t) = newest {
                    seen.insert(vm.id, t);
                }
                let silence = match (mark, newest) {
                    (Some(from), Some(to)) if to > from => Some(crate::plan::Silence { from, to }),
                    _ => self.silences.get(&vm.id).copied(),
                };
                if let Some(s) = silence {
                    silences.insert(vm.id, s);
                }
                vm.last_silence = silence;
            }
        }
        live.warnings
            .extend(warnings.into_iter().map(|(cluster, vm_id, why)| {
                crate::plan::ObservationWarning {
                    cluster: Some(cluster),
                    vm_id: Some(vm_id),
                    message: format!(
                        "FL_HEARTBEAT is {why}; ignored (the newest heartbeat seen is kept)"
                    ),
                }
            }));
        self.newest = seen;
        self.silences = silences;
    }
}

impl OneReconciler {
    /// A reconciler over `ctx`.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            blind: Mutex::default(),
            prune: PrunePolicy::default(),
            reported: Mutex::default(),
            heartbeats: Mutex::default(),
            poll_interval: None,
            tap: None,
            known_sites: None,
            site_observations: BTreeMap::new(),
        }
    }

    /// Read the clusters' SuperNode keys in other sites from those sites' observations.
    pub fn with_site_observations(mut self, sites: BTreeMap<String, Observations>) -> Self {
        self.site_observations = sites;
        self
    }

    /// The keys of `cluster`'s SuperNodes in other sites, from each site's newest complete
    /// observation ([`crate::plan::site::wanted_site_keys`]).
    fn wanted_site_keys(
        &self,
        cluster: &FlowerCluster,
        home: &LiveState,
    ) -> BTreeSet<NodePublicKey> {
        crate::plan::site::wanted_site_keys(cluster, home, |site| {
            self.site_observations
                .get(site)
                .and_then(|rx| rx.borrow().clone())
        })
    }

    /// Report specs placing SuperNodes in sites outside `sites` (the configured ones).
    pub fn with_known_sites(mut self, sites: BTreeSet<String>) -> Self {
        self.known_sites = Some(sites);
        self
    }

    /// Also publish every complete observation on `tap`.
    pub fn with_observation_tap(
        mut self,
        tap: tokio::sync::watch::Sender<Option<Arc<LiveState>>>,
    ) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Warn (once per cluster and message) about specs whose grace period does not cover
    /// 3 heartbeats plus `poll` ([`crate::api::validate::grace_margin_problem`]).
    pub fn with_poll_interval(mut self, poll: std::time::Duration) -> Self {
        self.poll_interval = Some(poll);
        self
    }

    fn check_grace_margin(&self, req: &ReconcileRequest<LiveState>) {
        let (Some(poll), Some(d)) = (self.poll_interval, &req.desired) else {
            return;
        };
        let policy = &d.cluster.spec.supernodes.failure_policy;
        if let Some(problem) = crate::api::validate::grace_margin_problem(policy, poll) {
            let key = format!("{}: {problem}", req.name);
            if self
                .reported
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key)
            {
                tracing::warn!(cluster = %req.name, "{problem}");
            }
        }
    }

    /// Log each new service-level observation warning once (a foreign-owned service
    /// marked as ours, …): `run` has no plan output to show them in.
    fn report(&self, live: &LiveState) {
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for w in live.warnings.iter().filter(|w| w.vm_id.is_none()) {
            if reported.insert(w.message.clone()) {
                tracing::warn!(
                    cluster = w.cluster.as_deref().unwrap_or("-"),
                    "{}",
                    w.message
                );
            }
        }
    }

    /// Use `policy` for the mass-delete guard (default: [`PrunePolicy::default`]).
    pub fn with_prune_policy(mut self, policy: PrunePolicy) -> Self {
        self.prune = policy;
        self
    }
}

/// The planner's view for one cluster: just its spec (or none), the held set, whether the
/// snapshot is complete (no file error) and, for a cluster without a spec, the prune gate
/// of the whole snapshot (mass-delete guard, second read required). The runtime never
/// reconciles a held cluster. Other clusters are left out on purpose: `plan_cluster` only
/// looks at `name`, and cloning every spec per reconcile would cost O(clusters²) per resync.
pub fn desired_for(
    req: &ReconcileRequest<LiveState>,
    held: BTreeSet<String>,
    policy: &PrunePolicy,
) -> DesiredState {
    let clusters: BTreeMap<String, DesiredCluster> = req
        .desired
        .iter()
        .map(|d| {
            (
                req.name.clone(),
                DesiredCluster {
                    cluster: d.cluster.clone(),
                    spec_hash: d.spec_hash.clone(),
                    revision: req.revision.clone(),
                    site_node_keys: Default::default(),
                },
            )
        })
        .collect();
    let prune = if req.desired.is_none() {
        snapshot_prune_gate(&req.snapshot, &req.live, policy, true)
    } else {
        PruneGate::Open
    };
    DesiredState {
        clusters,
        held,
        complete: req.snapshot.errors.is_empty(),
        prune,
    }
}

/// Why `name`'s removal is not carried out under `desired`, if it has a Delete-policy
/// service waiting for it.
fn deletion_blocked(desired: &DesiredState, live: &LiveState, name: &str) -> Option<String> {
    let why = desired.prune_block()?;
    let waiting = !desired.clusters.contains_key(name)
        && live
            .services(name)
            .iter()
            .any(|s| !s.state.is_going_away() && deletes_on_removal(s));
    waiting.then(|| why.to_string())
}

use crate::plan::current_service as current;

/// Status summary of `name` in `live` under its spec `spec`: the Ready verdict is
/// [`crate::plan::ready::cluster_readiness`] (the one definition), the counts and the
/// endpoint are those of the service standing for the cluster, nodes ready counted as
/// readiness counts them. `None` when `name` has neither a spec nor a service.
/// Without a spec there is no grace period: nodes ready are then counted without the
/// heartbeat rule, and the Ready condition says `NotInSpecs`.
pub fn summarize_cluster(
    live: &LiveState,
    name: &str,
    spec: Option<&FlowerCluster>,
) -> Option<LiveSummary> {
    let service = current(live.services(name));
    if service.is_none() && spec.is_none() {
        return None;
    }
    let mut summary = service.map_or_else(LiveSummary::default, |s| {
        let grace = spec.map_or(chrono::TimeDelta::MAX, ready::grace_period);
        summarize_service(s, live.observed_at, grace, live.last_outage)
    });
    if let Some(cluster) = spec {
        let verdict = ready::cluster_readiness(cluster, live, name);
        summary.ready = Verdict {
            ready: verdict.is_ready(),
            reason: verdict.reason.as_str().to_string(),
            message: verdict.message,
        };
    }
    Some(summary)
}

/// Counts and endpoint of one service at `at` (failed means failed by VM state).
fn summarize_service(
    s: &LiveService,
    at: DateTime<Utc>,
    grace: chrono::Duration,
    outage: Option<Outage>,
) -> LiveSummary {
    let link = s.superlink.nodes.first();
    let nodes = &s.supernode.nodes;
    let count = |f: &dyn Fn(&crate::plan::LiveVm) -> bool| {
        u32::try_from(nodes.iter().filter(|v| f(v)).count()).unwrap_or(u32::MAX)
    };
    LiveSummary {
        ready: Verdict::default(),
        service_id: Some(s.service_id),
        service_state: format!("{:?}", s.state),
        superlink_ready: ready::superlink_serving(s),
        superlink_endpoint: link.and_then(|v| v.attrs.endpoint.as_ref().map(ToString::to_string)),
        nodes_running: count(&|v| v.is_running()),
        nodes_ready: count(&|v| ready::supernode_ready(v, at, grace, outage)),
        nodes_failed: count(&|v| v.state_failure().is_some()),
        cert_not_after: link.and_then(|v| v.attrs.cert_not_after),
        metrics_targets: metrics_targets(s),
        unknown_sites: Vec::new(),
        site_keys_pending: false,
    }
}

/// The metrics endpoints of `s`: the running VMs of each role whose metrics the spec it
/// was created or last updated with (the applied record, i.e. what its agents were told)
/// enables, at the first NIC address oned lists and the role's port; SuperNodes marked
/// when the spec runs the DCGM exporter beside their agent.
fn metrics_targets(s: &LiveService) -> Vec<MetricsTarget> {
    let field = |k: &str| s.applied.as_ref().and_then(|a| a.fields.get(k));
    [
        (Role::Superlink, "superlink", &s.superlink),
        (Role::Supernode, "supernodes", &s.supernode),
    ]
    .into_iter()
    .flat_map(|(role, key, live)| {
        let enabled = field(&format!("spec.{key}.metrics.enabled")).map(String::as_str);
        let port = field(&format!("spec.{key}.metrics.port")).and_then(|p| p.parse::<u16>().ok());
        let port = port.filter(|_| enabled == Some("true"));
        let dcgm = role == Role::Supernode
            && field("spec.supernodes.gpu.dcgmExporter").map(String::as_str) == Some("true");
        live.nodes
            .iter()
            .filter(move |v| port.is_some() && v.is_running())
            .filter_map(move |v| {
                Some(MetricsTarget {
                    role: role.oneflow_name().to_string(),
                    service_id: s.service_id,
                    vm_id: v.id,
                    address: std::net::SocketAddr::new(*v.addresses.first()?, port?).to_string(),
                    dcgm,
                })
            })
    })
    .collect()
}

impl Reconciler for OneReconciler {
    type Live = LiveState;
    type Error = ReconcileError;

    /// Also hands the planner the last outage, so that heartbeats agents could not send
    /// while the front-end was down are not held against them, and the newest heartbeat
    /// seen per VM ([`HeartbeatMarks`]).
    async fn observe(&self) -> Result<LiveState, ReconcileError> {
        let started = Utc::now();
        let result = observe(&self.ctx, started).await;
        let outage = self
            .blind
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(started, result.is_ok());
        let mut live = result.map_err(ReconcileError::Observe)?;
        live.last_outage = outage;
        self.heartbeats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .apply(&mut live);
        self.report(&live);
        if let Some(tap) = &self.tap {
            tap.send_replace(Some(Arc::new(live.clone())));
        }
        Ok(live)
    }

    fn live_names(&self, live: &LiveState) -> BTreeSet<String> {
        live.clusters.keys().cloned().collect()
    }

    fn summarize(
        &self,
        live: &LiveState,
        name: &str,
        desired: Option<&SourcedCluster>,
    ) -> Option<LiveSummary> {
        let mut summary = summarize_cluster(live, name, desired.map(|d| &d.cluster))?;
        if let (Some(known), Some(d)) = (&self.known_sites, desired) {
            summary.unknown_sites = d
                .cluster
                .spec
                .supernodes
                .sites
                .iter()
                .filter(|s| !known.contains(&s.site))
                .map(|s| s.site.clone())
                .collect();
        }
        // A change in another site's keys re-queues the cluster at the next observation.
        if let Some(d) = desired.filter(|d| !d.cluster.spec.supernodes.sites.is_empty()) {
            let wanted = self.wanted_site_keys(&d.cluster, live);
            summary.site_keys_pending = crate::plan::site::held_site_keys(live, name)
                .map_or(!wanted.is_empty(), |held| *held != wanted);
        }
        Some(summary)
    }

    async fn reconcile(&self, req: ReconcileRequest<LiveState>) -> Result<Outcome, ReconcileError> {
        self.check_grace_margin(&req);
        let mut desired = desired_for(&req, BTreeSet::new(), &self.prune);
        for d in desired.clusters.values_mut() {
            d.site_node_keys = self.wanted_site_keys(&d.cluster, &req.live);
        }
        let out = reconcile_one(&self.ctx, &desired, &req.live, &req.name, Utc::now()).await?;
        let deletion_blocked = deletion_blocked(&desired, &req.live, &req.name);
        if let Some(why) = &deletion_blocked {
            tracing::warn!(cluster = %req.name, reason = %why, "deletion blocked");
        }
        Ok(Outcome {
            actions: out.applied,
            mutated: out.mutated,
            requeue_after: out.requeue_after,
            deletion_blocked,
            holds: out.holds,
        })
    }

    /// A mutation whose outcome is unknown holds the cluster `ambiguous_hold`, so a
    /// create still running server-side is seen by the next re-list, not made twice.
    fn error_policy(&self, error: &ReconcileError) -> ErrorAction {
        ErrorAction {
            hold_at_least: error
                .is_ambiguous()
                .then_some(self.ctx.options.ambiguous_hold),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_never_moves_backwards() {
        use crate::plan::simulate::healthy_vm;
        use crate::plan::{LiveRole, Owner, Role, ServiceState};
        let t = |s: i64| DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(1_000_000 + s);
        let live_with = |beat: i64, at: i64| {
            let mut vm = healthy_vm(7, Role::Supernode, t(0));
            vm.attrs.heartbeat = Some(t(beat));
            let service = LiveService {
                service_id: 1,
                name: "a".into(),
                owner: Owner {
                    cluster: "a".into(),
                    spec_hash: String::new(),
                    controller: "c".into(),
                },
                state: ServiceState::Running,
                applied: None,
                superlink: LiveRole::default(),
                supernode: LiveRole {
                    cardinality: 1,
                    nodes: vec![vm],
                    ..LiveRole::default()
                },
            };
            LiveState {
                clusters: [("a".to_string(), vec![service])].into(),
                observed_at: t(at),
                ..LiveState::default()
            }
        };
        let beat = |live: &LiveState| live.vm(7).and_then(|v| v.attrs.heartbeat);
        let mut marks = HeartbeatMarks::default();
        let mut l = live_with(100, 100);
        marks.apply(&mut l);
        assert_eq!(beat(&l), Some(t(100)));
        // A peer rewrote it to an old time: the newest seen stands, with a warning.
        let mut l = live_with(10, 110);
        marks.apply(&mut l);
        assert_eq!(beat(&l), Some(t(100)));
        assert!(l.warnings[0].message.contains("older"), "{:?}", l.warnings);
        // Forward moves are taken; far-future ones are not.
        let mut l = live_with(120, 120);
        marks.apply(&mut l);
        assert_eq!(beat(&l), Some(t(120)));
        // The silence that advance ended is handed on, and kept while nothing advances.
        let silence = Some(crate::plan::Silence {
            from: t(100),
            to: t(120),
        });
        assert_eq!(l.vm(7).and_then(|v| v.last_silence), silence);
        let mut l = live_with(120 + 3600, 125);
        marks.apply(&mut l);
        assert_eq!(beat(&l), Some(t(120)));
        assert!(l.warnings[0].message.contains("ahead"), "{:?}", l.warnings);
        assert_eq!(l.vm(7).and_then(|v| v.last_silence), silence);
    }

    #[test]
    fn the_outage_runs_from_the_last_good_observation_to_the_next_one() {
        let t = |s: i64| DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(s);
        let mut b = BlindSpells::default();
        assert_eq!(
            b.record(t(0), false),
            None,
            "no outage before a first success"
        );
        assert_eq!(b.record(t(10), true), None);
        assert_eq!(b.record(t(20), true), None);
        assert_eq!(b.record(t(30), false), None);
        assert_eq!(b.record(t(40), false), None);
        let outage = Some(Outage {
            from: t(20),
            to: t(50),
        });
        assert_eq!(b.record(t(50), true), outage);
        assert_eq!(b.record(t(60), true), outage, "kept until the next one");
    }
}
