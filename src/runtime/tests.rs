//! Runtime tests against an instrumented fake reconciler, under paused time.

use std::sync::Mutex;

use super::*;
use crate::source::{Assembler, FileLoad};

/// What the fake observes: a sequence number and when the observation started.
#[derive(Debug)]
struct FakeLive {
    seq: u64,
    started: Instant,
}

#[derive(Debug, Clone)]
struct Call {
    name: String,
    start: Instant,
    end: Instant,
    live_seq: u64,
    live_started: Instant,
}

#[derive(Default)]
struct Fake {
    observations: AtomicU64,
    observe_delay: Duration,
    reconcile_delay: Duration,
    failing: Mutex<HashSet<String>>,
    /// Clusters whose reconcile reports an applied action.
    acting: Mutex<HashSet<String>>,
    live_names: Vec<String>,
    calls: Mutex<Vec<Call>>,
    in_flight: Mutex<HashMap<String, u32>>,
    max_per_cluster: AtomicU64,
    max_total: AtomicU64,
    /// Observations fail while set.
    observe_failing: std::sync::atomic::AtomicBool,
    /// When each observation started.
    observe_starts: Mutex<Vec<Instant>>,
    /// What `error_policy` holds for every error.
    hold: Option<Duration>,
}

/// The fake's failures.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct FakeError(&'static str);

impl Reconciler for Fake {
    type Live = FakeLive;
    type Error = FakeError;

    async fn observe(&self) -> Result<FakeLive, FakeError> {
        let started = Instant::now();
        self.observe_starts.lock().unwrap().push(started);
        let seq = self.observations.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.observe_delay).await;
        if self.observe_failing.load(Ordering::SeqCst) {
            return Err(FakeError("front-end down"));
        }
        Ok(FakeLive { seq, started })
    }

    fn error_policy(&self, _: &FakeError) -> ErrorAction {
        ErrorAction {
            hold_at_least: self.hold,
        }
    }

    fn live_names(&self, _: &FakeLive) -> BTreeSet<String> {
        self.live_names.iter().cloned().collect()
    }

    fn summarize(
        &self,
        _: &FakeLive,
        _: &str,
        _: Option<&crate::source::SourcedCluster>,
    ) -> Option<LiveSummary> {
        None
    }

    async fn reconcile(&self, req: ReconcileRequest<FakeLive>) -> Result<Outcome, FakeError> {
        let start = Instant::now();
        {
            let mut f = self.in_flight.lock().unwrap();
            *f.entry(req.name.clone()).or_default() += 1;
            let mine = u64::from(f[&req.name]);
            let total = u64::from(f.values().sum::<u32>());
            self.max_per_cluster.fetch_max(mine, Ordering::SeqCst);
            self.max_total.fetch_max(total, Ordering::SeqCst);
        }
        tokio::time::sleep(self.reconcile_delay).await;
        *self.in_flight.lock().unwrap().get_mut(&req.name).unwrap() -= 1;
        self.calls.lock().unwrap().push(Call {
            name: req.name.clone(),
            start,
            end: Instant::now(),
            live_seq: req.live.seq,
            live_started: req.live.started,
        });
        if self.failing.lock().unwrap().contains(&req.name) {
            return Err(FakeError("simulated failure"));
        }
        let acting = self.acting.lock().unwrap().contains(&req.name);
        Ok(Outcome {
            actions: if acting { vec!["scale".into()] } else { vec![] },
            mutated: acting,
            requeue_after: None,
            deletion_blocked: None,
            holds: vec![],
        })
    }
}

impl Fake {
    fn calls_of(&self, name: &str) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.name == name)
            .cloned()
            .collect()
    }
}

fn snapshot(revision: &str, names: &[(&str, u32)]) -> SourceState {
    let loads = names
        .iter()
        .map(|(n, count)| FileLoad::Ok {
            file: format!("{n}.yaml").into(),
            clusters: vec![
                serde_norway::from_str(&crate::source::tests::spec_yaml_for(n, *count)).unwrap(),
            ],
        })
        .collect();
    SourceState {
        snapshot: Some(Arc::new(
            Assembler::default().assemble(revision.into(), loads),
        )),
        error: None,
        generation: 1,
        checks: Default::default(),
    }
}

fn cfg() -> RuntimeConfig {
    RuntimeConfig {
        poll_interval: Duration::from_secs(10),
        resync_interval: Duration::from_secs(600),
        concurrency: 2,
        debounce: Duration::ZERO,
        backoff: BackoffPolicy {
            initial: Duration::from_secs(2),
            max: Duration::from_secs(60),
            factor: 2,
            jitter: 0.0,
        },
        history: 5,
        min_observe_gap: Duration::from_secs(1),
    }
}

struct Harness {
    fake: Arc<Fake>,
    shared: Shared,
    source: watch::Sender<SourceState>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(fake: Fake, cfg: RuntimeConfig, initial: SourceState) -> Harness {
    let fake = Arc::new(fake);
    let rt = Runtime::new(fake.clone(), cfg).with_source_name("dir:test");
    let shared = rt.shared();
    let (source, rx) = watch::channel(initial);
    let stop = CancellationToken::new();
    let task = tokio::spawn(rt.run(rx, stop.clone()));
    Harness {
        fake,
        shared,
        source,
        stop,
        task,
    }
}

#[tokio::test(start_paused = true)]
async fn nothing_runs_before_the_first_observation_and_the_first_snapshot() {
    let fake = Fake {
        observe_delay: Duration::from_secs(30),
        ..Fake::default()
    };
    let h = start(fake, cfg(), SourceState::default());
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert!(
        h.fake.calls.lock().unwrap().is_empty(),
        "observed, but no snapshot yet"
    );
    assert!(
        h.shared.read().unwrap().observed_at.is_some(),
        "ready after the first observation"
    );
    let t = Instant::now();
    h.source.send(snapshot("r1", &[("alpha", 2)])).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = h.fake.calls_of("alpha");
    assert_eq!(calls.len(), 1);
    assert!(
        calls[0].start - t < Duration::from_millis(10),
        "runs as soon as both arrived"
    );
    h.stop.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn one_reconcile_per_cluster_at_a_time_and_the_concurrency_limit_holds() {
    let fake = Fake {
        reconcile_delay: Duration::from_secs(3),
        live_names: (0..6).map(|i| format!("c{i}")).collect(),
        ..Fake::default()
    };
    let names: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    let specs: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    let h = start(fake, cfg(), snapshot("r1", &specs));
    // Triggers storm: new revisions every 500 ms for 20 s, while reconciles take 3 s.
    for i in 0..40 {
        let specs: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1 + i % 3)).collect();
        h.source.send(snapshot(&format!("r{i}"), &specs)).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(h.fake.max_per_cluster.load(Ordering::SeqCst), 1);
    assert_eq!(
        h.fake.max_total.load(Ordering::SeqCst),
        2,
        "limit reached, never exceeded"
    );
    for n in &names {
        let calls = h.fake.calls_of(n);
        assert!(calls.len() >= 2, "{n} reconciled after changes");
        for w in calls.windows(2) {
            assert!(w[1].start >= w[0].end, "{n}: runs never overlap");
        }
    }
    h.stop.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn backoff_is_neither_reset_nor_inflated_by_triggers() {
    let fake = Fake {
        live_names: vec!["alpha".into()],
        ..Fake::default()
    };
    fake.failing.lock().unwrap().insert("alpha".into());
    let mut c = cfg();
    c.poll_interval = Duration::from_millis(300); // observation triggers galore
    let h = start(fake, c, snapshot("r0", &[("alpha", 1)]));
    // Source changes every 250 ms too, for 40 s.
    for i in 0..160 {
        h.source
            .send(snapshot(&format!("r{}", i + 1), &[("alpha", 1 + i % 4)]))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let calls = h.fake.calls_of("alpha");
    let gaps: Vec<u64> = calls
        .windows(2)
        .map(|w| (w[1].start - w[0].end).as_millis() as u64)
        .collect();
    // Failures at ~0, 2, 6, 14, 30 s: gaps 2, 4, 8, 16 s (plus at most one poll for
    // the fresh observation).
    assert_eq!(calls.len(), 5, "gaps {gaps:?}");
    for (gap, want) in gaps.iter().zip([2000, 4000, 8000, 16000]) {
        assert!(*gap >= want && *gap <= want + 400, "gaps {gaps:?}");
    }
    let view = h.shared.read().unwrap().clusters["alpha"].clone();
    assert_eq!(view.failures, 5, "one failure per run, none per trigger");
    // Success resets it.
    h.fake.failing.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(h.shared.read().unwrap().clusters["alpha"].failures, 0);
    h.stop.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn after_a_change_the_next_reconcile_waits_for_a_fresh_observation() {
    let fake = Fake {
        observe_delay: Duration::from_secs(2),
        reconcile_delay: Duration::from_millis(500),
        live_names: vec!["alpha".into()],
        ..Fake::default()
    };
    fake.acting.lock().unwrap().insert("alpha".into());
    let h = start(fake, cfg(), snapshot("r1", &[("alpha", 3)]));
    for i in 0..20 {
        h.source
            .send(snapshot(&format!("r{}", i + 2), &[("alpha", 3 + i % 2)]))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let calls = h.fake.calls_of("alpha");
    assert!(calls.len() >= 3, "{calls:?}");
    for w in calls.windows(2) {
        assert!(
            w[1].live_started >= w[0].end,
            "a reconcile after a change saw an observation older than that change: {w:?}"
        );
        assert!(w[1].live_seq > w[0].live_seq);
    }
    h.stop.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_in_flight_reconciles_and_starts_no_new_ones() {
    let fake = Fake {
        reconcile_delay: Duration::from_secs(20),
        ..Fake::default()
    };
    let h = start(fake, cfg(), snapshot("r1", &[("a", 1), ("b", 1), ("c", 1)]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    h.stop.cancel();
    h.task.await.unwrap();
    assert!(
        Instant::now() - t >= Duration::from_secs(18),
        "waited for the in-flight ones"
    );
    let calls = h.fake.calls.lock().unwrap().clone();
    assert_eq!(
        calls.len(),
        2,
        "the two in flight finished, the queued third never started"
    );
}

#[tokio::test(start_paused = true)]
async fn held_clusters_are_never_reconciled_and_show_as_stalled() {
    let fake = Fake {
        live_names: vec!["alpha".into()],
        ..Fake::default()
    };
    let h = start(fake, cfg(), snapshot("r1", &[("alpha", 1)]));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.fake.calls_of("alpha").len(), 1);
    let mut asm = Assembler::default();
    asm.assemble(
        "r1".into(),
        vec![FileLoad::Ok {
            file: "alpha.yaml".into(),
            clusters: vec![serde_norway::from_str(&crate::source::tests::spec_yaml_for(
                "alpha", 1,
            ))
            .unwrap()],
        }],
    );
    let broken = asm.assemble(
        "r2".into(),
        vec![FileLoad::Err {
            file: "alpha.yaml".into(),
            errors: vec![crate::source::FileError::file("alpha.yaml", "bad")],
            readable_names: vec![],
        }],
    );
    h.source
        .send(SourceState {
            snapshot: Some(Arc::new(broken)),
            error: None,
            generation: 2,
            checks: Default::default(),
        })
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1300)).await; // two resyncs, many polls
    assert_eq!(
        h.fake.calls_of("alpha").len(),
        1,
        "held: not reconciled, not pruned"
    );
    let view = h.shared.read().unwrap().clusters["alpha"].clone();
    assert_eq!(view.held_by, Some("alpha.yaml".into()));
    let stalled =
        super::status::condition(&view.status, crate::api::ConditionType::Stalled).unwrap();
    assert_eq!(stalled.reason, "SpecInvalid");
    h.stop.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn failed_observations_back_off_and_the_first_one_after_recovery_comes_within_the_cap() {
    let fake = Fake {
        live_names: vec!["alpha".into()],
        ..Fake::default()
    };
    let mut c = cfg();
    c.poll_interval = Duration::from_millis(500);
    c.backoff.max = Duration::from_secs(16);
    let h = start(fake, c, snapshot("r1", &[("alpha", 1)]));
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.fake.observe_failing.store(true, Ordering::SeqCst);
    let down = Instant::now();
    // Down for 60 s while the source keeps changing (every change wakes the observer
    // through a reconcile, at most once per cluster).
    for i in 0..60 {
        h.source
            .send(snapshot(&format!("r{}", i + 2), &[("alpha", 1 + i % 3)]))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let up = Instant::now();
    h.fake.observe_failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let starts = h.fake.observe_starts.lock().unwrap().clone();
    let during: Vec<Instant> = starts
        .iter()
        .copied()
        .filter(|t| *t >= down && *t < up)
        .collect();
    let gaps: Vec<u64> = during
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect();
    // 2, 4, 8, 16, 16, … s instead of every 500 ms: 120 observations at the poll rate.
    assert!(
        during.len() <= 8,
        "{} observations while down: {gaps:?}",
        during.len()
    );
    for (gap, want) in gaps.iter().zip([2000, 4000, 8000, 16000, 16000]) {
        assert!(*gap >= want && *gap <= want + 100, "gaps {gaps:?}");
    }
    let first_after = starts.iter().find(|t| **t >= up).expect("observed again");
    assert!(*first_after - up <= Duration::from_secs(16) + Duration::from_millis(500));
    // After recovery the poll rate is back.
    let after: Vec<&Instant> = starts.iter().filter(|t| **t > *first_after).collect();
    assert!(
        after.len() >= 5,
        "{} observations after recovery",
        after.len()
    );
    h.stop.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_error_with_a_hold_keeps_the_cluster_alone_beyond_the_backoff() {
    let fake = Fake {
        live_names: vec!["alpha".into()],
        hold: Some(Duration::from_secs(30)),
        ..Fake::default()
    };
    fake.failing.lock().unwrap().insert("alpha".into());
    let mut c = cfg();
    c.poll_interval = Duration::from_millis(300);
    let h = start(fake, c, snapshot("r0", &[("alpha", 1)]));
    // Triggers keep coming; none may cut the hold short.
    for i in 0..200 {
        h.source
            .send(snapshot(&format!("r{}", i + 1), &[("alpha", 1 + i % 4)]))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let calls = h.fake.calls_of("alpha");
    let gaps: Vec<u64> = calls
        .windows(2)
        .map(|w| (w[1].start - w[0].end).as_millis() as u64)
        .collect();
    assert_eq!(calls.len(), 4, "gaps {gaps:?}");
    for gap in &gaps {
        assert!(*gap >= 30_000 && *gap <= 30_400, "gaps {gaps:?}");
    }
    h.stop.cancel();
    h.task.await.unwrap();
}

/// Leader election's gate: a standby observes (and is ready) but reconciles nothing; on
/// becoming leader it reconciles only on an observation that started after the gain,
/// never on one from before (the old leader may have acted since).
#[tokio::test(start_paused = true)]
async fn a_standby_reconciles_nothing_and_a_new_leader_waits_for_a_fresh_observation() {
    let fake = Arc::new(Fake {
        observe_delay: Duration::from_secs(3),
        ..Fake::default()
    });
    let (leader_tx, leader_rx) = watch::channel(false);
    let rt = Runtime::new(fake.clone(), cfg()).with_leadership(leader_rx);
    let shared = rt.shared();
    let metrics = rt.metrics();
    let (source, rx) = watch::channel(snapshot("r1", &[("alpha", 1)]));
    let stop = CancellationToken::new();
    let task = tokio::spawn(rt.run(rx, stop.clone()));
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert!(
        fake.calls.lock().unwrap().is_empty(),
        "a standby acts on nothing"
    );
    assert!(shared.read().unwrap().observed_at.is_some(), "but observes");
    assert!(metrics.encode().contains("flower_reconcile_leader 0"));
    let gained = Instant::now();
    leader_tx.send(true).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let calls = fake.calls_of("alpha");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].live_started >= gained,
        "planned on an observation started after the gain"
    );
    let text = metrics.encode();
    assert!(text.contains("flower_reconcile_leader 1"), "{text}");
    assert!(
        text.contains("flower_reconcile_leader_transitions_total 1"),
        "{text}"
    );
    // Losing leadership stops new reconciles (a new revision is not acted on).
    leader_tx.send(false).unwrap();
    tokio::task::yield_now().await;
    let _ = source.send(snapshot("r2", &[("alpha", 2)]));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(fake.calls_of("alpha").len(), 1);
    stop.cancel();
    task.await.unwrap();
}
