//! The long-running reconcile loop behind `flower-reconcile run`.
//!
//! Level-triggered, after kube-runtime's controller: the reconciler receives the whole
//! desired spec and the newest live observation and never learns *why* it runs. Triggers
//! (a new source snapshot, a live-state poll that changed a cluster's summary, the
//! periodic resync, a requeue) only put the cluster into the [`Scheduler`].
//!
//! # Guarantees
//! - No reconcile before the first complete live observation **and** the first complete
//!   source snapshot.
//! - At most one reconcile per cluster at a time, at most `concurrency` overall.
//! - After a reconcile that changed something (or failed part-way), that cluster waits
//!   for an observation *started after* the reconcile finished before it runs again, so
//!   a stale observation can never make it repeat a mutation.
//! - Per-cluster exponential backoff on errors, neither reset nor inflated by triggers
//!   (see [`self::backoff`]).
//! - One observation per poll tick serves every cluster; nothing is observed per VM.
//!   Failed observations back off exponentially (capped by the backoff's `max`) and
//!   wake-ups do not shorten that; after recovery the next one starts within
//!   `max(poll, backoff max)`.
//! - After an error whose outcome is unknown (the reconciler's [`Reconciler::error_policy`]
//!   says how long) the cluster is left alone at least that long, so a timed-out create still running server-side is
//!   seen by the next re-list instead of being made twice.
//! - Held clusters (broken spec files) are never reconciled.
//! - Every new snapshot re-queues the live clusters without a spec, so a removal blocked
//!   until a confirming second read (or an allow-delete marker) proceeds without waiting
//!   for the resync.
//! - A failed observation keeps the last complete one; the reconciler plans on its own
//!   timestamp and holds destructive actions once it is too old (see
//!   [`crate::reconciler::reconcile_one`]); each such safety hold is counted in
//!   `flower_reconcile_safety_holds_total{reason}`.
//! - On shutdown no new reconcile starts and in-flight ones run to completion.
//! - With leader election ([`Runtime::with_leadership`]) a standby observes and serves
//!   status but starts no reconcile, and a new leader reconciles only on an observation
//!   started after it became leader
//!   (`a_standby_reconciles_nothing_and_a_new_leader_waits_for_a_fresh_observation`).
//!
//! # Assumptions
//! - The reconciler is idempotent and re-checks before creating (restart safety).
//! - A single controller acts on a set of clusters (see [`self::lease`] and
//!   [`self::election`]).
//!
//! # Caveats
//! - A cluster removed from the specs and absent live is forgotten; its history with it.

pub mod backoff;
pub mod election;
pub mod lease;
pub mod scheduler;
pub mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::backoff::{Backoff, BackoffPolicy};
use self::scheduler::Scheduler;
use self::status::{compute, ClusterTrack, ClusterView, LiveSummary, StatusInput};
use crate::api::ReconcileRecord;
use crate::one::ApiStats;
use crate::source::{FileError, Snapshot, SourceChecks, SourceState, SourcedCluster};
use crate::telemetry::metrics::Metrics;

/// What one reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Actions applied (waits included), one line each (empty: nothing to do).
    pub actions: Vec<String>,
    /// Whether OpenNebula was changed.
    pub mutated: bool,
    /// Run again after this long (e.g. waiting for a deployment); default: right after
    /// the next observation when OpenNebula was changed, else at the next resync.
    pub requeue_after: Option<Duration>,
    /// Why the cluster's removal is not carried out (mass-delete guard, unconfirmed or
    /// incomplete source): shown as `Stalled/DeletionBlocked` and counted in a metric.
    pub deletion_blocked: Option<String>,
    /// Destructive actions held back for safety, by reason (counted in
    /// `flower_reconcile_safety_holds_total{reason}`).
    pub holds: Vec<&'static str>,
}

/// One reconcile request: everything the reconciler may look at.
#[derive(Debug)]
pub struct ReconcileRequest<L> {
    /// Cluster name.
    pub name: String,
    /// The spec, or `None` when no spec defines the cluster any more.
    pub desired: Option<SourcedCluster>,
    /// The newest complete observation.
    pub live: Arc<L>,
    /// Source revision of `desired`.
    pub revision: String,
    /// The whole snapshot `desired` comes from (what the prune guard looks at).
    pub snapshot: Arc<Snapshot>,
}

/// What the runtime does after a failed reconcile, as the reconciler's
/// [`Reconciler::error_policy`] decides (kube-runtime's `error_policy`). The runtime always
/// backs off exponentially and waits for a fresh observation; this can only add to that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorAction {
    /// Leave the cluster alone at least this long, whatever the backoff says: e.g. a
    /// mutation whose outcome is unknown (timeout) may still be executing server-side,
    /// and a re-list before that would not see its result.
    pub hold_at_least: Option<Duration>,
}

/// The work the runtime drives. The production implementation observes OpenNebula and
/// applies plans; tests use instrumented fakes.
pub trait Reconciler: Send + Sync + 'static {
    /// One observation of every managed cluster.
    type Live: Send + Sync + 'static;
    /// Why an observation or a reconcile failed; reported with its source chain.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Observe live state (one service listing plus pool pages, never per VM).
    fn observe(&self) -> impl Future<Output = Result<Self::Live, Self::Error>> + Send;

    /// Names of the clusters this controller manages in `live`.
    fn live_names(&self, live: &Self::Live) -> BTreeSet<String>;

    /// Status summary of `name` under its spec `desired` (`None`: no spec), including the
    /// readiness verdict the Ready condition shows; `None` when `name` neither has a spec
    /// nor exists live (then it is forgotten).
    fn summarize(
        &self,
        live: &Self::Live,
        name: &str,
        desired: Option<&SourcedCluster>,
    ) -> Option<LiveSummary>;

    /// Bring `name` towards its spec; must be idempotent.
    fn reconcile(
        &self,
        req: ReconcileRequest<Self::Live>,
    ) -> impl Future<Output = Result<Outcome, Self::Error>> + Send;

    /// What to do after a failed reconcile, beyond backoff and a fresh observation.
    fn error_policy(&self, error: &Self::Error) -> ErrorAction {
        let _ = error;
        ErrorAction::default()
    }
}

/// One observation's result with its sequence number.
type Observation<R> = (
    u64,
    Result<<R as Reconciler>::Live, <R as Reconciler>::Error>,
);

/// Why a reconcile produced no outcome: the reconciler's error, or its task died.
#[derive(Debug, thiserror::Error)]
enum Failure<E: std::error::Error + 'static> {
    #[error(transparent)]
    Reconcile(E),
    #[error("reconcile task failed: {0}")]
    Task(String),
}

/// Errors read as one line in logs and status: the crate's one chain walk.
pub use crate::error_chain::error_chain;

/// Runtime settings.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Live-state poll interval.
    pub poll_interval: Duration,
    /// Every cluster is reconciled at least this often.
    pub resync_interval: Duration,
    /// Reconciles running at once across clusters (≥ 1).
    pub concurrency: usize,
    /// Trailing-edge debounce of triggers.
    pub debounce: Duration,
    /// Backoff on errors.
    pub backoff: BackoffPolicy,
    /// Reconcile records kept per cluster.
    pub history: usize,
    /// Shortest gap between two observations when one is requested early.
    pub min_observe_gap: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(10),
            resync_interval: Duration::from_secs(600),
            concurrency: 4,
            debounce: Duration::from_millis(200),
            backoff: BackoffPolicy::default(),
            history: 10,
            min_observe_gap: Duration::from_secs(1),
        }
    }
}

/// Source information shown by the API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceView {
    /// Description (`dir:…` or `git:URL@branch`, without credentials).
    pub source: String,
    /// Revision of the snapshot in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Last fetch/scan error (the revision above is then the last good one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Files that do not load.
    #[serde(default)]
    pub file_errors: Vec<FileError>,
    /// Checks of the newest fetched revision (`SourceVerified`, `FastForward`) and the
    /// revision refused, if any (`revision` above is then the last good one, still applied).
    #[serde(flatten)]
    pub checks: SourceChecks,
}

/// Everything the HTTP API serves, updated by the runtime.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SharedState {
    /// When the first complete observation arrived (ready from then on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<DateTime<Utc>>,
    /// The last observation error, cleared by the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observe_error: Option<String>,
    /// Source state.
    pub source: SourceView,
    /// Clusters by name.
    pub clusters: BTreeMap<String, ClusterView>,
    /// Who acts, when there is an election (read live by the API).
    #[serde(skip)]
    pub leadership: Option<Arc<election::Leadership>>,
    /// The remote sites' loops, by site (multi-site federation; read live by the API).
    #[serde(skip)]
    pub sites: BTreeMap<String, Shared>,
    /// Sites the specs name that the controller's configuration does not, with the
    /// clusters naming each: nothing is done there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown_sites: BTreeMap<String, BTreeSet<String>>,
}

/// Handle on the state shared with the HTTP server.
pub type Shared = Arc<RwLock<SharedState>>;

/// The reconcile loop.
pub struct Runtime<R: Reconciler> {
    reconciler: Arc<R>,
    cfg: RuntimeConfig,
    metrics: Arc<Metrics>,
    api_stats: Option<Arc<ApiStats>>,
    shared: Shared,
    source_name: String,
    /// Leader (true) / standby (false), when an election decides who acts.
    leader: Option<watch::Receiver<bool>>,
}

struct Done<E: std::error::Error + 'static> {
    name: String,
    result: Result<Outcome, Failure<E>>,
    record: ReconcileRecord,
    took: Duration,
}

/// Loop state; only the loop task touches it.
struct State<R: Reconciler> {
    sched: Scheduler<String>,
    backoff: Backoff<String>,
    running: HashSet<String>,
    /// Cluster → the observation sequence number it waits for.
    awaiting: HashMap<String, u64>,
    live: Option<Arc<R::Live>>,
    observed_seq: Option<u64>,
    summaries: HashMap<String, LiveSummary>,
    snapshot: Option<Arc<Snapshot>>,
    tracks: HashMap<String, ClusterTrack>,
    /// Whether this instance acts (always, without an election).
    leading: bool,
    /// Leading acts only on observations numbered from this on: those started after
    /// leadership was gained (the old leader may have changed things just before).
    fresh_from: u64,
}

impl<R: Reconciler> State<R> {
    fn ready(&self) -> bool {
        self.live.is_some()
            && self.snapshot.is_some()
            && self.leading
            && self.observed_seq.is_some_and(|s| s >= self.fresh_from)
    }

    /// Pop the next due cluster that is not running and not awaiting an observation.
    fn pop_runnable(&mut self, now: Instant) -> Option<String> {
        let (running, awaiting, seq) = (&self.running, &self.awaiting, self.observed_seq);
        self.sched
            .pop_due(now, |n| runnable(running, awaiting, seq, n))
    }

    fn next_due(&self) -> Option<Instant> {
        self.sched
            .next_due(|n| runnable(&self.running, &self.awaiting, self.observed_seq, n))
    }

    /// Names a reconcile is due for: desired ∪ live, minus held.
    fn names(&self, r: &R) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self
            .snapshot
            .as_ref()
            .map(|s| s.clusters.keys().cloned().collect())
            .unwrap_or_default();
        if let Some(live) = &self.live {
            names.extend(r.live_names(live));
        }
        if let Some(s) = &self.snapshot {
            names.retain(|n| !s.held.contains_key(n));
        }
        names
    }
}

fn runnable(
    running: &HashSet<String>,
    awaiting: &HashMap<String, u64>,
    observed: Option<u64>,
    name: &String,
) -> bool {
    !running.contains(name)
        && awaiting
            .get(name)
            .is_none_or(|need| observed.is_some_and(|s| s >= *need))
}

impl<R: Reconciler> Runtime<R> {
    /// A runtime driving `reconciler`.
    pub fn new(reconciler: Arc<R>, cfg: RuntimeConfig) -> Self {
        Self {
            reconciler,
            cfg,
            metrics: Arc::new(Metrics::new()),
            api_stats: None,
            shared: Shared::default(),
            source_name: String::new(),
            leader: None,
        }
    }

    /// Reconcile only while `leader` says true (leader election); standing by, the
    /// runtime still observes and serves status.
    pub fn with_leadership(mut self, leader: watch::Receiver<bool>) -> Self {
        self.leader = Some(leader);
        self
    }

    /// Export these API counters in the metrics.
    pub fn with_api_stats(mut self, stats: Arc<ApiStats>) -> Self {
        self.api_stats = Some(stats);
        self
    }

    /// Name the source in the API and the revision metric.
    pub fn with_source_name(mut self, name: impl Into<String>) -> Self {
        self.source_name = name.into();
        self
    }

    /// Publish into `shared` (made before the runtime: a site's loop serves its
    /// connection errors before it can build its reconciler).
    pub fn with_shared(mut self, shared: Shared) -> Self {
        self.shared = shared;
        self
    }

    /// The state served over HTTP.
    pub fn shared(&self) -> Shared {
        self.shared.clone()
    }

    /// The metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Run until `shutdown` is cancelled, then wait for in-flight reconciles.
    pub async fn run(
        mut self,
        mut source: watch::Receiver<SourceState>,
        shutdown: CancellationToken,
    ) {
        let mut leader = self.leader.take();
        let mut st = State::<R> {
            leading: leader.as_ref().is_none_or(|rx| *rx.borrow()),
            fresh_from: 0,
            sched: Scheduler::new(self.cfg.debounce),
            backoff: Backoff::new(self.cfg.backoff),
            running: HashSet::new(),
            awaiting: HashMap::new(),
            live: None,
            observed_seq: None,
            summaries: HashMap::new(),
            snapshot: None,
            tracks: HashMap::new(),
        };
        if let Ok(mut sh) = self.shared.write() {
            sh.source.source = self.source_name.clone();
        }
        self.metrics.set_leader(st.leading);
        let observer_stop = CancellationToken::new();
        let started = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(Notify::new());
        let (obs_tx, mut obs_rx) = mpsc::channel(1);
        let observer = tokio::spawn(observe_loop(
            self.reconciler.clone(),
            obs_tx,
            started.clone(),
            wake.clone(),
            ObservePacing {
                poll: self.cfg.poll_interval,
                min_gap: self.cfg.min_observe_gap,
                backoff: self.cfg.backoff,
            },
            observer_stop.clone(),
        ));
        let mut tasks: JoinSet<Done<R::Error>> = JoinSet::new();
        let mut task_names: HashMap<tokio::task::Id, String> = HashMap::new();
        let mut resync = tokio::time::interval_at(
            Instant::now() + self.cfg.resync_interval,
            self.cfg.resync_interval,
        );
        let mut stopping = false;
        let mut source_open = true;
        // A snapshot published before we subscribed counts too.
        source.mark_changed();
        loop {
            let due = (!stopping && st.ready() && st.running.len() < self.cfg.concurrency.max(1))
                .then(|| st.next_due())
                .flatten();
            tokio::select! {
                () = shutdown.cancelled(), if !stopping => {
                    tracing::info!(in_flight = tasks.len(), "shutting down: no new reconciles, waiting for in-flight ones");
                    stopping = true;
                    observer_stop.cancel();
                }
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let done = match joined {
                        Ok((id, done)) => { task_names.remove(&id); done }
                        Err(e) => {
                            let name = task_names.remove(&e.id()).unwrap_or_default();
                            Done {
                                record: ReconcileRecord { time: Utc::now(), trace_id: None, actions: vec![], outcome: format!("error: reconcile task failed: {e}") },
                                result: Err(Failure::Task(e.to_string())),
                                name,
                                took: Duration::ZERO,
                            }
                        }
                    };
                    self.finish(&mut st, done, started.load(Ordering::SeqCst), &wake);
                }
                changed = source.changed(), if source_open && !stopping => {
                    if changed.is_err() { source_open = false; continue; }
                    let state = source.borrow_and_update().clone();
                    self.on_source(&mut st, state);
                }
                Some((seq, result)) = obs_rx.recv() => self.on_observation(&mut st, seq, result),
                now_leading = leader_changed(&mut leader) => {
                    let now_leading = now_leading.unwrap_or(false);
                    if now_leading && !st.leading {
                        st.fresh_from = started.load(Ordering::SeqCst);
                        tracing::info!(fresh_from = st.fresh_from, "leading: reconciling once an observation started from now arrives");
                        let now = Instant::now();
                        for n in st.names(&self.reconciler) { st.sched.schedule(n, now); }
                        wake.notify_one();
                    } else if !now_leading && st.leading {
                        tracing::warn!(in_flight = tasks.len(), "standing by: no new reconciles (in-flight ones are fenced)");
                    }
                    st.leading = now_leading;
                    self.metrics.set_leader(now_leading);
                }
                _ = resync.tick() => {
                    let now = Instant::now();
                    for n in st.names(&self.reconciler) { st.sched.schedule(n, now); }
                }
                () = sleep_until_opt(due) => {
                    while st.running.len() < self.cfg.concurrency.max(1) {
                        let Some(name) = st.pop_runnable(Instant::now()) else { break };
                        let handle = self.start(&mut st, &mut tasks, name.clone());
                        task_names.insert(handle, name);
                    }
                }
            }
            if stopping && tasks.is_empty() {
                break;
            }
            self.publish_gauges(&st);
        }
        observer_stop.cancel();
        let _ = observer.await;
    }

    fn start(
        &self,
        st: &mut State<R>,
        tasks: &mut JoinSet<Done<R::Error>>,
        name: String,
    ) -> tokio::task::Id {
        let (Some(snapshot), Some(live)) = (st.snapshot.clone(), st.live.clone()) else {
            unreachable!("start is only called once ready")
        };
        st.running.insert(name.clone());
        st.tracks.entry(name.clone()).or_default().in_flight = true;
        self.update_view(st, &name);
        let desired = snapshot.clusters.get(&name).cloned();
        let span = tracing::info_span!(
            parent: None,
            "reconcile",
            cluster = %name,
            revision = %snapshot.revision,
            actions = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let trace_id = crate::telemetry::trace_id(&span);
        let req = ReconcileRequest {
            name: name.clone(),
            desired,
            live,
            revision: snapshot.revision.clone(),
            snapshot: snapshot.clone(),
        };
        let r = self.reconciler.clone();
        tasks
            .spawn(async move {
                let time = Utc::now();
                let t0 = Instant::now();
                let result = r
                    .reconcile(req)
                    .instrument(span.clone())
                    .await
                    .map_err(Failure::Reconcile);
                let outcome = match &result {
                    Ok(_) => "ok".to_string(),
                    Err(e) => format!("error: {}", error_chain(e)),
                };
                let actions = result
                    .as_ref()
                    .map(|o| o.actions.clone())
                    .unwrap_or_default();
                span.record("actions", actions.join("; "));
                span.record("outcome", outcome.as_str());
                Done {
                    name,
                    record: ReconcileRecord {
                        time,
                        trace_id,
                        actions,
                        outcome,
                    },
                    result,
                    took: t0.elapsed(),
                }
            })
            .id()
    }

    fn finish(&self, st: &mut State<R>, done: Done<R::Error>, obs_started: u64, wake: &Notify) {
        let Done {
            name,
            result,
            record,
            took,
        } = done;
        let now = Instant::now();
        st.running.remove(&name);
        self.metrics
            .reconciled(result.is_ok(), took, record.trace_id.as_deref());
        let track = st.tracks.entry(name.clone()).or_default();
        track.in_flight = false;
        track.record(record, self.cfg.history);
        match result {
            Ok(outcome) => {
                st.backoff.on_success(&name);
                st.sched.set_not_before(&name, None);
                track.failures = 0;
                track.last_error = None;
                track.last_ok = st.snapshot.as_ref().map(|s| {
                    (
                        s.revision.clone(),
                        s.clusters.get(&name).map(|c| c.spec_hash.clone()),
                    )
                });
                for reason in &outcome.holds {
                    self.metrics.safety_hold(reason);
                }
                let changed = outcome.mutated;
                if changed {
                    st.awaiting.insert(name.clone(), obs_started);
                    wake.notify_one();
                }
                track.last_actions = outcome.actions;
                track.deletion_blocked = outcome.deletion_blocked;
                let after = outcome.requeue_after.unwrap_or(if changed {
                    Duration::ZERO
                } else {
                    self.cfg.resync_interval
                });
                st.sched.schedule(name.clone(), now + after);
            }
            Err(e) => {
                let text = error_chain(&e);
                tracing::warn!(cluster = %name, error = %text, failures = track.failures + 1, "reconcile failed");
                let mut until = st.backoff.on_failure(&name, now);
                let policy = match &e {
                    Failure::Reconcile(e) => self.reconciler.error_policy(e),
                    Failure::Task(_) => ErrorAction::default(),
                };
                if let Some(hold) = policy.hold_at_least {
                    until = st.backoff.hold_until(&name, now + hold);
                }
                track.failures = st.backoff.failures(&name);
                track.last_error = Some(text);
                st.sched.set_not_before(&name, Some(until));
                st.sched.schedule(name.clone(), until);
                // It may have failed half-way: act again only on a fresh observation.
                st.awaiting.insert(name.clone(), obs_started);
                wake.notify_one();
            }
        }
        self.update_view(st, &name);
    }

    fn on_source(&self, st: &mut State<R>, state: SourceState) {
        if let Ok(mut sh) = self.shared.write() {
            sh.source.error = state.error.clone();
            sh.source.checks = state.checks.clone();
        }
        if state.error.is_some() {
            self.metrics.error("source");
        }
        self.metrics.set_refused(state.checks.refusal());
        let Some(snap) = state.snapshot else { return };
        if st
            .snapshot
            .as_ref()
            .is_some_and(|old| Arc::ptr_eq(old, &snap))
        {
            return;
        }
        self.metrics.set_revision(&self.source_name, &snap.revision);
        let old = st.snapshot.replace(snap.clone());
        let now = Instant::now();
        let mut touched: BTreeSet<String> = snap.names().map(str::to_string).collect();
        if let Some(old) = &old {
            touched.extend(old.names().map(str::to_string));
        }
        for name in &touched {
            if snap.held.contains_key(name) {
                // Held: leave it alone entirely (no reconcile, queue entry dropped).
                st.sched.remove(name);
                continue;
            }
            let before = old
                .as_ref()
                .and_then(|o| o.clusters.get(name))
                .map(|c| &c.spec_hash);
            let after = snap.clusters.get(name).map(|c| &c.spec_hash);
            if old.is_none() || before != after {
                st.sched.schedule(name.clone(), now);
                // Keep the backoff hold, if any: a new spec does not bypass it.
                if let Some(until) = st.backoff.until(name) {
                    st.sched.set_not_before(name, Some(until));
                }
            }
        }
        // Clusters live but without a spec: a new snapshot (a confirming second read, an
        // allow-delete marker) may change whether their removal may proceed.
        for name in st.names(&self.reconciler) {
            if !snap.clusters.contains_key(&name) && !touched.contains(&name) {
                st.sched.schedule(name.clone(), now);
                if let Some(until) = st.backoff.until(&name) {
                    st.sched.set_not_before(&name, Some(until));
                }
            }
        }
        if let Ok(mut sh) = self.shared.write() {
            sh.source.revision = Some(snap.revision.clone());
            sh.source.file_errors = snap.errors.clone();
        }
        // A new spec can change the verdict (a new count, a redeploy) before the next
        // observation does.
        for name in touched {
            self.resummarize(st, &name);
            self.update_view(st, &name);
        }
    }

    fn on_observation(&self, st: &mut State<R>, seq: u64, result: Result<R::Live, R::Error>) {
        if let Some(stats) = &self.api_stats {
            self.metrics.sync_api(stats);
        }
        let live = match result {
            Ok(live) => Arc::new(live),
            Err(e) => {
                let text = error_chain(&e);
                tracing::warn!(error = %text, "observation failed; keeping the last one");
                self.metrics.error("observe");
                if let Ok(mut sh) = self.shared.write() {
                    sh.observe_error = Some(text);
                }
                return;
            }
        };
        let first = st.live.is_none();
        st.live = Some(live.clone());
        st.observed_seq = Some(st.observed_seq.map_or(seq, |s| s.max(seq)));
        st.awaiting.retain(|_, need| seq < *need);
        if let Ok(mut sh) = self.shared.write() {
            sh.observe_error = None;
            sh.observed_at.get_or_insert_with(Utc::now);
        }
        let now = Instant::now();
        let names = st.names(&self.reconciler);
        let mut all: BTreeSet<String> = names.clone();
        all.extend(st.summaries.keys().cloned());
        for name in all {
            let changed = self.resummarize(st, &name);
            if (first || changed) && names.contains(&name) {
                st.sched.schedule(name.clone(), now);
            }
            self.update_view(st, &name);
        }
    }

    /// Summarize `name` from the newest observation under the current spec; whether the
    /// summary changed.
    fn resummarize(&self, st: &mut State<R>, name: &str) -> bool {
        let Some(live) = &st.live else { return false };
        let desired = st.snapshot.as_ref().and_then(|s| s.clusters.get(name));
        let summary = self.reconciler.summarize(live, name, desired);
        let changed = st.summaries.get(name) != summary.as_ref();
        match summary {
            Some(s) => st.summaries.insert(name.to_string(), s),
            None => st.summaries.remove(name),
        };
        changed
    }

    fn update_view(&self, st: &mut State<R>, name: &str) {
        let snap = st.snapshot.as_deref();
        let desired = snap.and_then(|s| s.clusters.get(name));
        let held_by = snap.and_then(|s| s.held.get(name));
        let live = st.summaries.get(name);
        let Ok(mut sh) = self.shared.write() else {
            return;
        };
        if desired.is_none() && held_by.is_none() && live.is_none() && !st.running.contains(name) {
            // Gone from specs and from OpenNebula: forget it.
            sh.clusters.remove(name);
            st.tracks.remove(name);
            st.backoff.forget(&name.to_string());
            st.sched.remove(&name.to_string());
            return;
        }
        let track = st.tracks.entry(name.to_string()).or_default();
        let status = compute(StatusInput {
            desired,
            held_by: held_by.map(|p| p.as_path()),
            live,
            track,
            now: Utc::now(),
        });
        track.conditions = status.conditions.clone();
        sh.clusters.insert(
            name.to_string(),
            ClusterView {
                name: name.to_string(),
                spec_file: desired.map(|d| d.file.clone()),
                held_by: held_by.cloned(),
                failures: track.failures,
                status,
                metrics_targets: live.map(|l| l.metrics_targets.clone()).unwrap_or_default(),
            },
        );
    }

    fn publish_gauges(&self, st: &State<R>) {
        let drifting = st.tracks.values().filter(|t| t.drifting()).count();
        self.metrics.set_drift(drifting, st.sched.len());
        let blocked = st
            .tracks
            .values()
            .filter(|t| t.deletion_blocked.is_some())
            .count();
        self.metrics.set_deletions_blocked(blocked);
    }
}

/// The next leadership verdict; `None` (and no more waiting) once the elector is gone.
async fn leader_changed(rx: &mut Option<watch::Receiver<bool>>) -> Option<bool> {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    if r.changed().await.is_err() {
        *rx = None;
        return None;
    }
    Some(*r.borrow_and_update())
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How often the observer runs.
#[derive(Debug, Clone, Copy)]
struct ObservePacing {
    poll: Duration,
    min_gap: Duration,
    /// After consecutive failed observations the next one waits the backoff delay (when
    /// longer than `poll`), like client-go's reflector: a front-end that is down is not
    /// asked again at the full poll rate (each ask being several requests with the
    /// clients' read retries).
    backoff: BackoffPolicy,
}

impl ObservePacing {
    /// Earliest start of the next observation after one that started at `t0`, following
    /// `failures` consecutive failed ones.
    fn next_after(&self, t0: Instant, failures: u32) -> Instant {
        match failures {
            0 => t0 + self.poll,
            n => t0 + self.poll.max(self.backoff.base_delay(n)),
        }
    }
}

/// Observe every `poll` (or sooner when woken, but not more often than `min_gap`),
/// sending each result with its sequence number. One observation at a time. While
/// observations fail, wake-ups are ignored and the gap grows per [`ObservePacing`].
async fn observe_loop<R: Reconciler>(
    r: Arc<R>,
    tx: mpsc::Sender<Observation<R>>,
    started: Arc<AtomicU64>,
    wake: Arc<Notify>,
    pacing: ObservePacing,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let seq = started.fetch_add(1, Ordering::SeqCst);
        let t0 = Instant::now();
        let result = tokio::select! {
            () = stop.cancelled() => return,
            res = r.observe() => res,
        };
        failures = if result.is_ok() {
            0
        } else {
            failures.saturating_add(1)
        };
        if tx.send((seq, result)).await.is_err() {
            return;
        }
        let next = pacing.next_after(t0, failures);
        if failures > 0 {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
            }
            continue;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
            () = wake.notified() => {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until((t0 + pacing.min_gap).max(Instant::now())) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
