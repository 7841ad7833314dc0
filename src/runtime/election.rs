//! Leader election among controller instances on different hosts, with the lease kept in
//! OpenNebula itself (issue #17 item 1), after client-go's `leaderelection`.
//!
//! Owns: the lease record, the elector loop, the [`Leadership`] state everything else
//! reads (runtime gating, `/readyz`, `/metrics`, status) and the fence every mutation
//! passes ([`FencedBackend`]).
//! Must not: reconcile, or mutate anything in OpenNebula but the lease document.
//!
//! # The mapping onto oned
//! oned's `one.document.lock` owner is the *user*, not the client: two controllers with
//! the same credentials are the same lock owner, and a plain lock by one overrides the
//! other's (`PoolObjectSQL::lock_db`). With `test=true`, though, oned refuses any existing
//! lock, whoever holds it: that is the compare-and-set. So the lock is a short mutex
//! around a read-modify-write of a lease record in the document's TEMPLATE — `HOLDER`,
//! `ACQUIRE_TIME`, `RENEW_TIME`, `LEASE_DURATION`, `TRANSITIONS` — never the lease
//! itself. The lock level is ADMIN (3): a USE or MANAGE lock would refuse the
//! `one.document.update` inside the section to everyone, its owner included
//! (`AclManager::authorize`; docs/upstream-notes.md).
//!
//! One round, every `retry_period`: read the record (`one.document.info`, no lock). A
//! standby that sees another holder's record *unchanged* for `lease_duration` by its own
//! monotonic clock (client-go's rule: no wall clocks compared, so skew does not matter)
//! takes it; the holder renews it. Either write is lock(test) → re-read → update →
//! unlock, and is dropped when the re-read differs (someone wrote in between).
//!
//! A lock left by an instance that died inside the section (oned has no expiry:
//! `LOCK_DB_EXPIRATION` is declared but unused) is broken by whoever sees the same
//! `LOCK/TIME` for `lease_duration`: a live section takes three requests. A standby
//! counts from the first round it saw that lock, so a leader killed inside its section is
//! replaced within about a lease and a retry, like one killed outside it.
//!
//! # Guarantees
//! - Fencing: [`Leadership::check`] passes only while the last successful renew *started*
//!   less than `renew_deadline` ago. A standby takes over no sooner than `lease_duration`
//!   after it *observed* that renew, which happened after it started; so the old leader
//!   stops mutating at least `lease_duration − renew_deadline` (5 s by default) before a
//!   new one may start (`a_leader_cut_off_from_opennebula_stops_before_another_starts`).
//! - Every OpenNebula mutation of the reconciler passes [`FencedBackend`], which refuses
//!   it (`Rejected`: certainly not sent) without leadership.
//! - A new leader reconciles only on an observation started after it became leader
//!   (the runtime's gate), so a change the old leader made just before dying is seen,
//!   not repeated.
//! - On shutdown the leader empties `HOLDER`, so a standby takes over within one
//!   `retry_period` instead of a lease.
//!
//! # Assumptions
//! - The instances share OpenNebula credentials (or the lease document's permissions let
//!   all of them MANAGE it) and a controller id (the lease document's name).
//! - Monotonic clocks run at about the same rate on the instances (no NTP needed).
//!
//! # Caveats
//! - Fencing bounds when a mutation is *sent*; OpenNebula has no fencing tokens, so a
//!   request delayed in the network for longer than the margin could still land after a
//!   takeover (client-go has the same limit).
//! - Anyone who may MANAGE the document can forge the record: the lease coordinates
//!   cooperating controllers, it is not a security boundary.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::one::backend::{
    BackendError, BackendErrorKind, BackendFuture, Document, Identity, NameScope, OneBackend,
    VmRecord,
};
use crate::one::oned::{LockLevel, PoolFilter, UpdateType};
use crate::one::xmlrpc::ErrorCode;
use crate::one::{OnedClient, OnedError};

/// The `TYPE` of lease documents (OneFlow uses 100 and 101).
pub const LEASE_DOC_TYPE: i32 = 1717;

/// client-go's defaults.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// See [`DEFAULT_LEASE_DURATION`].
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// See [`DEFAULT_LEASE_DURATION`].
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Election timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionTiming {
    /// How long a standby waits, from its last observed change of the record, before it
    /// takes the lease.
    pub lease_duration: Duration,
    /// How long after its last successful renew started the leader still mutates.
    pub renew_deadline: Duration,
    /// Rounds' period.
    pub retry_period: Duration,
}

impl Default for ElectionTiming {
    fn default() -> Self {
        Self {
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }
}

impl ElectionTiming {
    /// client-go's checks: lease > renew deadline > retry period (× its jitter 1.2).
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_duration <= self.renew_deadline {
            return Err(format!(
                "lease-duration ({:?}) must be greater than renew-deadline ({:?}): the difference is the fencing margin",
                self.lease_duration, self.renew_deadline
            ));
        }
        if self.renew_deadline.as_secs_f64() <= self.retry_period.as_secs_f64() * 1.2 {
            return Err(format!(
                "renew-deadline ({:?}) must be greater than 1.2 × retry-period ({:?})",
                self.renew_deadline, self.retry_period
            ));
        }
        if self.retry_period.is_zero() {
            return Err("retry-period must be positive".into());
        }
        Ok(())
    }
}

/// An instance id: `hostname-pid-random` unless configured. Only `[A-Za-z0-9._-]`, at
/// most 63 characters: it goes into a template value and a User-Agent.
pub fn instance_id(configured: Option<&str>) -> Result<String, String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    if let Some(id) = configured {
        return if ok(id) {
            Ok(id.to_string())
        } else {
            Err(format!(
                "instance-id {id:?}: use 1 to 63 of A-Z a-z 0-9 . _ -"
            ))
        };
    }
    let host: String = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        .take(40)
        .collect();
    let suffix = random_u64() as u32;
    let host = if host.is_empty() { "host".into() } else { host };
    Ok(format!("{host}-{}-{suffix:08x}", std::process::id()))
}

/// The lease record kept in the document's TEMPLATE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Instance id of the holder; empty when released.
    pub holder: String,
    /// When the holder took it (informative: expiry never compares wall clocks).
    pub acquire_time: String,
    /// When the holder last renewed it (informative, and what makes each renew a change).
    pub renew_time: String,
    /// The holder's lease duration, seconds.
    pub lease_duration_s: u64,
    /// How many times the lease changed hands.
    pub transitions: u64,
}

/// Longest value read from the record (anyone with MANAGE could write a huge one).
const MAX_VALUE: usize = 256;

impl LeaseRecord {
    /// From a lease document's TEMPLATE; missing, oversized or control-character values
    /// (they would reach logs and status) read as empty.
    fn from_template(t: &crate::one::model::Template) -> Self {
        let get = |k: &str| {
            t.get(k)
                .filter(|v| v.len() <= MAX_VALUE && !v.chars().any(char::is_control))
                .unwrap_or_default()
                .to_string()
        };
        Self {
            holder: get("HOLDER"),
            acquire_time: get("ACQUIRE_TIME"),
            renew_time: get("RENEW_TIME"),
            lease_duration_s: get("LEASE_DURATION").parse().unwrap_or(0),
            transitions: get("TRANSITIONS").parse().unwrap_or(0),
        }
    }

    /// Template text for `one.document.update` (replace). Values are ours: ids are
    /// `[A-Za-z0-9._-]` and times RFC 3339, so no quoting is needed beyond the quotes.
    fn to_template(&self) -> String {
        format!(
            "HOLDER=\"{}\"\nACQUIRE_TIME=\"{}\"\nRENEW_TIME=\"{}\"\nLEASE_DURATION=\"{}\"\nTRANSITIONS=\"{}\"\n",
            self.holder, self.acquire_time, self.renew_time, self.lease_duration_s, self.transitions
        )
    }
}

fn now_text() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What `/readyz`, `/metrics` and status show about leadership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderView {
    /// `leader`, `standby`, or `single` (election off).
    pub role: String,
    /// This instance's id.
    pub identity: String,
    /// The holder as last read (empty: none, or not read yet).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub holder: String,
    /// When the holder took the lease (its `ACQUIRE_TIME`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub holder_since: String,
    /// Times the lease changed hands.
    pub transitions: u64,
    /// The lease document's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_document: Option<i64>,
}

#[derive(Debug, Default)]
struct State {
    /// Start of the last round whose write succeeded while we hold the lease.
    renewed: Option<Instant>,
    view: LeaderView,
}

/// Who may mutate: shared by the elector (writer), the fence, the runtime and the API.
#[derive(Debug)]
pub struct Leadership {
    renew_deadline: Option<Duration>,
    state: Mutex<State>,
    tx: watch::Sender<bool>,
}

/// Why a mutation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not the leader ({0}): refusing to change OpenNebula")]
pub struct Fenced(pub String);

impl Leadership {
    /// Election off: always allowed (`role: single`).
    pub fn single(identity: &str) -> Arc<Self> {
        Self::new(identity, None)
    }

    /// Election on: standby until the elector renews.
    pub fn elected(identity: &str, renew_deadline: Duration) -> Arc<Self> {
        Self::new(identity, Some(renew_deadline))
    }

    fn new(identity: &str, renew_deadline: Option<Duration>) -> Arc<Self> {
        let single = renew_deadline.is_none();
        let (tx, _) = watch::channel(single);
        Arc::new(Self {
            renew_deadline,
            state: Mutex::new(State {
                renewed: None,
                view: LeaderView {
                    role: if single { "single" } else { "standby" }.into(),
                    identity: identity.into(),
                    ..LeaderView::default()
                },
            }),
            tx,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this instance may mutate now: the fence every mutation passes.
    pub fn check(&self) -> Result<(), Fenced> {
        let Some(deadline) = self.renew_deadline else {
            return Ok(());
        };
        let st = self.lock();
        match st.renewed {
            Some(at) if at.elapsed() < deadline => Ok(()),
            Some(at) => Err(Fenced(format!(
                "lease not renewed for {:.1}s (renew deadline {:?})",
                at.elapsed().as_secs_f64(),
                deadline
            ))),
            None if st.view.holder.is_empty() => Err(Fenced("no lease yet".into())),
            None => Err(Fenced(format!("the lease is held by {}", st.view.holder))),
        }
    }

    /// When the fence closes unless renewed before (`None`: never, election off).
    fn closes_at(&self) -> Option<Instant> {
        let deadline = self.renew_deadline?;
        Some(
            self.lock()
                .renewed
                .map_or_else(Instant::now, |at| at + deadline),
        )
    }

    /// Whether this instance leads (and is within its renew deadline).
    pub fn is_leader(&self) -> bool {
        self.check().is_ok()
    }

    /// A receiver of leader (true) / not (false) transitions.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }

    /// What the API shows.
    pub fn view(&self) -> LeaderView {
        let mut v = self.lock().view.clone();
        if self.renew_deadline.is_some() {
            v.role = if self.is_leader() {
                "leader"
            } else {
                "standby"
            }
            .into();
        }
        v
    }

    fn observed(&self, rec: &LeaseRecord, doc: i64) {
        let mut st = self.lock();
        st.view.holder = rec.holder.clone();
        st.view.holder_since = rec.acquire_time.clone();
        st.view.transitions = rec.transitions;
        st.view.lease_document = Some(doc);
    }

    fn renewed(&self, started: Instant) {
        self.lock().renewed = Some(started);
        self.publish();
    }

    fn lost(&self) {
        self.lock().renewed = None;
        self.publish();
    }

    /// Publish the current verdict (the elector calls it every round, so an expired
    /// renew deadline shows even while a round hangs).
    fn publish(&self) {
        let leader = self.is_leader();
        self.tx.send_if_modified(|v| {
            let changed = *v != leader;
            *v = leader;
            changed
        });
    }
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// An OpenNebula call failed.
    #[error("lease document: {0}")]
    One(#[from] OnedError),
}

/// What one round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// We hold the lease (renewed or just taken).
    Leader,
    /// Someone else holds it (or wrote between our read and our lock).
    Standby(String),
}

/// The elector: runs rounds against the lease document.
pub struct Elector {
    oned: OnedClient,
    name: String,
    identity: String,
    timing: ElectionTiming,
    leadership: Arc<Leadership>,
    doc: Option<i64>,
    /// The record as last seen and when we first saw it so (our clock).
    seen: Option<(LeaseRecord, Instant)>,
    /// A lock as last seen (its TIME) and when we first saw it.
    lock_seen: Option<(i64, Instant)>,
    /// Our last unlock may not have happened.
    maybe_locked: bool,
}

impl Elector {
    /// An elector for the lease of controller `controller_id`, as `identity`.
    pub fn new(
        oned: OnedClient,
        controller_id: &str,
        identity: &str,
        timing: ElectionTiming,
        leadership: Arc<Leadership>,
    ) -> Self {
        Self {
            oned,
            name: format!("flower-reconcile-lease-{controller_id}"),
            identity: identity.into(),
            timing,
            leadership,
            doc: None,
            seen: None,
            lock_seen: None,
            maybe_locked: false,
        }
    }

    /// The lease document if it exists: the lowest id of ours with the name and type (two
    /// instances allocating at once each make one; all then agree on the lowest).
    pub async fn existing_document(&mut self) -> Result<Option<i64>, ElectionError> {
        if self.doc.is_none() {
            let docs = self
                .oned
                .documentpool_info(PoolFilter::Mine, LEASE_DOC_TYPE)
                .await?;
            self.doc = docs
                .into_iter()
                .filter(|d| d.name == self.name)
                .map(|d| d.id)
                .min();
        }
        Ok(self.doc)
    }

    /// The lease document, allocated if none exists.
    async fn document(&mut self) -> Result<i64, ElectionError> {
        if let Some(id) = self.existing_document().await? {
            return Ok(id);
        }
        let text = format!("NAME=\"{}\"\n", self.name);
        self.oned.document_allocate(&text, LEASE_DOC_TYPE).await?;
        self.existing_document().await?.ok_or_else(|| {
            ElectionError::One(OnedError::Decode {
                method: "one.documentpool.info",
                reason: "the lease document just allocated is not listed".into(),
            })
        })
    }

    /// Note `rec` as observed now; whether it has been unchanged for a lease duration.
    fn expired(&mut self, rec: &LeaseRecord, now: Instant) -> bool {
        match &self.seen {
            Some((old, since)) if old == rec => {
                now.duration_since(*since) >= self.timing.lease_duration
            }
            _ => {
                self.seen = Some((rec.clone(), now));
                false
            }
        }
    }

    /// One round: read, and take or renew when due.
    pub async fn round(&mut self) -> Result<Round, ElectionError> {
        let started = Instant::now();
        let id = self.document().await?;
        if std::mem::take(&mut self.maybe_locked) {
            // Our section was cut short (timeout, crash of a round): release our lock.
            if let Err(e) = self.oned.document_unlock(id).await {
                tracing::debug!(error = %e, "unlocking the lease document after a cut-short round");
            }
        }
        let doc = self.oned.document_info(id).await?;
        let rec = LeaseRecord::from_template(&doc.template);
        self.leadership.observed(&rec, id);
        let now = Instant::now();
        let expired = self.expired(&rec, now);
        let mine = rec.holder == self.identity;
        if !(mine || rec.holder.is_empty() || expired) {
            // A lock seen while standing by starts its staleness clock at once: a holder
            // that died inside its section is then broken when its lease expires, not a
            // lease later (the chaos suite saw takeovers of two leases).
            self.note_lock(doc.lock.map(|_| doc.lock_time.unwrap_or(-1)), now);
            self.leadership.lost();
            return Ok(Round::Standby(rec.holder));
        }
        // Write: the lock is the compare-and-set.
        self.maybe_locked = true;
        match self.oned.document_try_lock(id, LockLevel::Admin).await {
            Ok(()) => {}
            Err(OnedError::Api {
                code: ErrorCode::Action,
                ..
            }) => {
                self.maybe_locked = false;
                self.stale_lock(id, doc.lock_time, now).await;
                return Ok(Round::Standby(rec.holder));
            }
            Err(e) => return Err(e.into()),
        }
        self.lock_seen = None;
        let inside = self.oned.document_info(id).await;
        let result = match inside {
            Ok(d) if LeaseRecord::from_template(&d.template) == rec => {
                let next = if mine {
                    LeaseRecord {
                        renew_time: now_text(),
                        lease_duration_s: self.timing.lease_duration.as_secs(),
                        ..rec.clone()
                    }
                } else {
                    let t = now_text();
                    LeaseRecord {
                        holder: self.identity.clone(),
                        acquire_time: t.clone(),
                        renew_time: t,
                        lease_duration_s: self.timing.lease_duration.as_secs(),
                        // A fresh record (never acquired) is no transition.
                        transitions: rec.transitions + u64::from(!rec.acquire_time.is_empty()),
                    }
                };
                match self
                    .oned
                    .document_update(id, &next.to_template(), UpdateType::Replace)
                    .await
                {
                    Ok(_) => {
                        if !mine {
                            tracing::info!(
                                identity = %self.identity,
                                previous = %rec.holder,
                                transitions = next.transitions,
                                "took the lease: leading"
                            );
                        }
                        self.seen = Some((next.clone(), Instant::now()));
                        self.leadership.observed(&next, id);
                        self.leadership.renewed(started);
                        Ok(Round::Leader)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Ok(d) => {
                let now = LeaseRecord::from_template(&d.template);
                self.expired(&now, Instant::now());
                Ok(Round::Standby(now.holder))
            }
            Err(e) => Err(e.into()),
        };
        match self.oned.document_unlock(id).await {
            Ok(()) => self.maybe_locked = false,
            Err(e) => {
                tracing::warn!(error = %e, "unlocking the lease document failed; retried next round")
            }
        }
        result
    }

    /// Remember a lock (its TIME; `None`: not locked) as a standby sees it, keeping when
    /// an unchanged one was first seen.
    fn note_lock(&mut self, time: Option<i64>, now: Instant) {
        self.lock_seen = match (time, self.lock_seen) {
            (None, _) => None,
            (Some(t), Some((seen, since))) if seen == t => Some((seen, since)),
            (Some(t), _) => Some((t, now)),
        };
    }

    /// A lock we did not take: break it once its TIME has been the same for a lease
    /// duration (its owner died inside the section).
    async fn stale_lock(&mut self, id: i64, time: Option<i64>, now: Instant) {
        let time = time.unwrap_or(-1);
        match self.lock_seen {
            Some((t, since)) if t == time => {
                if now.duration_since(since) >= self.timing.lease_duration {
                    tracing::warn!(
                        document = id,
                        lock_time = time,
                        "breaking a lease-document lock left for a whole lease duration"
                    );
                    if let Err(e) = self.oned.document_unlock(id).await {
                        tracing::warn!(error = %e, "breaking the stale lock failed");
                    }
                    self.lock_seen = None;
                }
            }
            _ => self.lock_seen = Some((time, now)),
        }
    }

    /// Give the lease up (shutdown): empty HOLDER so a standby takes over at once.
    pub async fn release(&mut self) -> Result<(), ElectionError> {
        let Some(id) = self.doc else { return Ok(()) };
        self.leadership.lost();
        if std::mem::take(&mut self.maybe_locked) {
            // A round cut short by the shutdown may hold our lock: test=true refuses it too.
            let _ = self.oned.document_unlock(id).await;
        }
        self.oned.document_try_lock(id, LockLevel::Admin).await?;
        let result = async {
            let d = self.oned.document_info(id).await?;
            let rec = LeaseRecord::from_template(&d.template);
            if rec.holder == self.identity {
                let next = LeaseRecord {
                    holder: String::new(),
                    renew_time: now_text(),
                    ..rec
                };
                self.oned
                    .document_update(id, &next.to_template(), UpdateType::Replace)
                    .await?;
            }
            Ok::<(), OnedError>(())
        }
        .await;
        self.oned.document_unlock(id).await?;
        result.map_err(Into::into)
    }

    /// Rounds every `retry_period` until `stop`; then release the lease if held.
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            // A hung request must not keep a stale verdict published: the round is cut at
            // the renew deadline (the fence itself needs no timer: it reads the clock).
            let round = tokio::time::timeout(self.timing.renew_deadline, self.round());
            let result = tokio::select! {
                () = stop.cancelled() => break,
                r = round => r,
            };
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::error_chain::error_chain(&e), "lease round failed")
                }
                Err(_) => {
                    self.maybe_locked = true;
                    tracing::warn!("lease round timed out");
                }
            }
            self.leadership.publish();
            // client-go's jitter on retries: 0..20 %.
            let jitter = self
                .timing
                .retry_period
                .mul_f64((random_u64() % 1000) as f64 / 1000.0 * 0.2);
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.timing.retry_period + jitter) => {}
            }
        }
        if self.leadership.is_leader() {
            match tokio::time::timeout(self.timing.renew_deadline, self.release()).await {
                Ok(Ok(())) => tracing::info!("lease released"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::error_chain::error_chain(&e), "releasing the lease failed")
                }
                Err(_) => tracing::warn!("releasing the lease timed out"),
            }
        }
        self.leadership.lost();
    }
}

/// The lease for one `apply` run: taken before it acts, renewed while it runs, released
/// after.
pub struct OneShotLease {
    leadership: Arc<Leadership>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl OneShotLease {
    /// Take the lease of `controller_id` as `instance`. `None` when no controller elects a
    /// leader (no lease document: nothing to respect) or when `force`d past it. A live
    /// holder is one whose record changed within a lease duration: waited for that long
    /// (plus two retries), then refused.
    pub async fn take(
        cfg: &crate::one::OneConfig,
        controller_id: &str,
        instance: &str,
        force: bool,
    ) -> anyhow::Result<Option<Self>> {
        let oned = OnedClient::new(
            cfg,
            crate::one::ApiBudget::new(cfg.requests_per_second),
            crate::one::ApiStats::new(),
        )?;
        let probe = Leadership::elected(instance, DEFAULT_RENEW_DEADLINE);
        let mut elector = Elector::new(
            oned.clone(),
            controller_id,
            instance,
            ElectionTiming::default(),
            probe,
        );
        let Some(doc) = elector.existing_document().await? else {
            return Ok(None);
        };
        // The holder's own lease duration (in its record) decides when it counts as gone;
        // renew deadline and retry period keep client-go's proportions.
        let held = LeaseRecord::from_template(&oned.document_info(doc).await?.template);
        let lease = match held.lease_duration_s {
            1..=3600 => Duration::from_secs(held.lease_duration_s),
            _ => DEFAULT_LEASE_DURATION,
        };
        let timing = ElectionTiming {
            lease_duration: lease,
            renew_deadline: lease * 2 / 3,
            retry_period: lease * 2 / 15,
        };
        let leadership = Leadership::elected(instance, timing.renew_deadline);
        let mut elector = Elector::new(oned, controller_id, instance, timing, leadership.clone());
        elector.doc = Some(doc);
        if force {
            tracing::warn!("--force: acting without the leader lease; a running leader may act at the same time");
            eprintln!("warning: --force: acting without the leader lease; a running leader may change OpenNebula at the same time");
            return Ok(None);
        }
        let deadline = Instant::now() + timing.lease_duration + timing.retry_period * 2;
        loop {
            match elector.round().await? {
                Round::Leader => break,
                Round::Standby(holder) if Instant::now() >= deadline => anyhow::bail!(
                    "the leader lease of controller {controller_id:?} is held by {holder:?}, which \
                     renewed it within the last {:?}: refusing to act beside a running controller \
                     (stop it, or pass --force)",
                    timing.lease_duration
                ),
                Round::Standby(_) => {}
            }
            tokio::time::sleep(timing.retry_period).await;
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn(elector.run(stop.clone()));
        Ok(Some(Self {
            leadership,
            stop,
            task,
        }))
    }

    /// The fence for this run's mutations.
    pub fn leadership(&self) -> Arc<Leadership> {
        self.leadership.clone()
    }

    /// Give the lease back.
    pub async fn release(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The backend behind the fence: every mutating call first asks [`Leadership::check`];
/// reads pass through. The one place all reconciler mutations pass.
pub struct FencedBackend {
    inner: Arc<dyn OneBackend>,
    leadership: Arc<Leadership>,
}

impl FencedBackend {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn OneBackend>, leadership: Arc<Leadership>) -> Self {
        Self { inner, leadership }
    }

    fn fence(&self) -> Result<(), BackendError> {
        self.leadership
            .check()
            .map_err(|e| BackendError::new(BackendErrorKind::Rejected, e.to_string()))
    }
}

/// A fenced mutation: the check, then the call, abandoned if the fence closes before it
/// finishes. The client waits for the rate budget before it sends, so a check at the
/// start alone would let a request leave after the deadline; abandoned there, it either
/// was never sent or its outcome is unknown (`Ambiguous`: the reconciler re-observes).
macro_rules! fenced {
    ($self:ident, $call:expr) => {{
        let gate = $self.fence();
        Box::pin(async move {
            gate?;
            let call = $call;
            tokio::pin!(call);
            loop {
                let Some(at) = $self.leadership.closes_at() else {
                    return call.await;
                };
                tokio::select! {
                    r = &mut call => return r,
                    () = tokio::time::sleep_until(at) => {
                        if let Err(e) = $self.leadership.check() {
                            return Err(BackendError::new(
                                BackendErrorKind::Ambiguous,
                                format!("{e} while the call was under way; it may or may not have been sent"),
                            ));
                        }
                    }
                }
            }
        })
    }};
}

impl OneBackend for FencedBackend {
    fn system_version(&self) -> BackendFuture<'_, String> {
        self.inner.system_version()
    }
    fn whoami(&self) -> BackendFuture<'_, Identity> {
        self.inner.whoami()
    }
    fn list_services(&self) -> BackendFuture<'_, Vec<Document>> {
        self.inner.list_services()
    }
    fn list_vms(&self, page_size: u32) -> BackendFuture<'_, Vec<VmRecord>> {
        self.inner.list_vms(page_size)
    }
    fn list_service_templates(&self) -> BackendFuture<'_, Vec<Document>> {
        self.inner.list_service_templates()
    }
    fn create_service_template(&self, body: serde_json::Value) -> BackendFuture<'_, u64> {
        fenced!(self, self.inner.create_service_template(body))
    }
    fn update_service_template(&self, id: u64, body: serde_json::Value) -> BackendFuture<'_, ()> {
        fenced!(self, self.inner.update_service_template(id, body))
    }
    fn instantiate(&self, template_id: u64, merge: serde_json::Value) -> BackendFuture<'_, u64> {
        fenced!(self, self.inner.instantiate(template_id, merge))
    }
    fn get_service(&self, service_id: u64) -> BackendFuture<'_, Document> {
        self.inner.get_service(service_id)
    }
    fn update_service(&self, service_id: u64, body: serde_json::Value) -> BackendFuture<'_, ()> {
        fenced!(self, self.inner.update_service(service_id, body))
    }
    fn scale(&self, service_id: u64, role: &str, cardinality: u32) -> BackendFuture<'_, ()> {
        let role = role.to_string();
        fenced!(self, self.inner.scale(service_id, &role, cardinality))
    }
    fn delete_service(&self, service_id: u64) -> BackendFuture<'_, ()> {
        fenced!(self, self.inner.delete_service(service_id))
    }
    fn vm_update_merge(&self, vm_id: u64, template: String) -> BackendFuture<'_, ()> {
        fenced!(self, self.inner.vm_update_merge(vm_id, template))
    }
    fn vm_info(&self, vm_id: u64) -> BackendFuture<'_, VmRecord> {
        self.inner.vm_info(vm_id)
    }
    fn vm_terminate_hard(&self, vm_id: u64) -> BackendFuture<'_, ()> {
        fenced!(self, self.inner.vm_terminate_hard(vm_id))
    }
    fn vm_templates(&self, scope: NameScope) -> BackendFuture<'_, Vec<(u64, String)>> {
        self.inner.vm_templates(scope)
    }
    fn networks(&self, scope: NameScope) -> BackendFuture<'_, Vec<(u64, String)>> {
        self.inner.networks(scope)
    }
    fn vm_template_name(&self, id: u64) -> BackendFuture<'_, String> {
        self.inner.vm_template_name(id)
    }
    fn network_name(&self, id: u64) -> BackendFuture<'_, String> {
        self.inner.network_name(id)
    }
    fn api_stats(&self) -> Option<Arc<crate::one::ApiStats>> {
        self.inner.api_stats()
    }
}

/// Not a secret, only distinct per process and call (instance-id suffix, jitter, the demo
/// lab's throwaway password): std's randomly keyed hasher over the time, not a new crate.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_follows_client_go_checks() {
        assert!(ElectionTiming::default().validate().is_ok());
        let bad = ElectionTiming {
            lease_duration: Duration::from_secs(10),
            ..ElectionTiming::default()
        };
        assert!(bad.validate().unwrap_err().contains("fencing margin"));
        let bad = ElectionTiming {
            retry_period: Duration::from_secs(9),
            ..ElectionTiming::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn instance_ids_are_checked_and_defaulted() {
        assert_eq!(instance_id(Some("ctl-a")).unwrap(), "ctl-a");
        for bad in ["", "a b", "x\"y", &"x".repeat(64)] {
            assert!(instance_id(Some(bad)).is_err(), "{bad:?}");
        }
        let a = instance_id(None).unwrap();
        let b = instance_id(None).unwrap();
        assert_ne!(a, b, "a random suffix");
        assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
    }

    #[test]
    fn the_fence_closes_at_the_renew_deadline() {
        let l = Leadership::elected("me", Duration::from_millis(50));
        assert!(l.check().is_err(), "standby until the first renew");
        let rx = l.subscribe();
        l.renewed(Instant::now());
        assert!(l.check().is_ok());
        assert!(*rx.borrow());
        std::thread::sleep(Duration::from_millis(60));
        let err = l.check().unwrap_err();
        assert!(err.to_string().contains("not renewed"), "{err}");
        l.publish();
        assert!(!*rx.borrow());
        assert_eq!(l.view().role, "standby");
        assert!(Leadership::single("me").check().is_ok());
    }

    /// The fence refuses mutations without leadership (`Rejected`: nothing sent) and
    /// passes reads; a call under way when the fence closes is abandoned as `Ambiguous`.
    #[tokio::test]
    async fn the_fenced_backend_refuses_mutations_but_not_reads() {
        use crate::one::fake::{Answer, Scripted};
        let inner = Arc::new(Scripted::new([Answer::Names(vec![]), Answer::Done]));
        let l = Leadership::elected("me", Duration::from_millis(80));
        let b = FencedBackend::new(inner.clone(), l.clone());
        assert!(b.networks(NameScope::Mine).await.is_ok(), "reads pass");
        let e = b.delete_service(7).await.unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Rejected);
        assert!(e.message.contains("not the leader"), "{e}");
        assert_eq!(
            inner.calls(),
            vec!["networks Mine".to_string()],
            "never reached the backend"
        );
        l.renewed(Instant::now());
        assert!(b.delete_service(7).await.is_ok());
        // A call that outlives the fence (here: one whose answer never comes).
        let b = FencedBackend::new(Arc::new(Hang), l.clone());
        let e = b.delete_service(8).await.unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Ambiguous, "{e}");
    }

    /// A backend whose every call hangs: for the fence's mid-call cut.
    struct Hang;

    impl OneBackend for Hang {
        fn system_version(&self) -> BackendFuture<'_, String> {
            Box::pin(std::future::pending())
        }
        fn whoami(&self) -> BackendFuture<'_, Identity> {
            Box::pin(std::future::pending())
        }
        fn list_services(&self) -> BackendFuture<'_, Vec<Document>> {
            Box::pin(std::future::pending())
        }
        fn list_vms(&self, _: u32) -> BackendFuture<'_, Vec<VmRecord>> {
            Box::pin(std::future::pending())
        }
        fn list_service_templates(&self) -> BackendFuture<'_, Vec<Document>> {
            Box::pin(std::future::pending())
        }
        fn create_service_template(&self, _: serde_json::Value) -> BackendFuture<'_, u64> {
            Box::pin(std::future::pending())
        }
        fn update_service_template(&self, _: u64, _: serde_json::Value) -> BackendFuture<'_, ()> {
            Box::pin(std::future::pending())
        }
        fn instantiate(&self, _: u64, _: serde_json::Value) -> BackendFuture<'_, u64> {
            Box::pin(std::future::pending())
        }
        fn get_service(&self, _: u64) -> BackendFuture<'_, Document> {
            Box::pin(std::future::pending())
        }
        fn update_service(&self, _: u64, _: serde_json::Value) -> BackendFuture<'_, ()> {
            Box::pin(std::future::pending())
        }
        fn scale(&self, _: u64, _: &str, _: u32) -> BackendFuture<'_, ()> {
            Box::pin(std::future::pending())
        }
        fn delete_service(&self, _: u64) -> BackendFuture<'_, ()> {
            Box::pin(std::future::pending())
        }
        fn vm_update_merge(&self, _: u64, _: String) -> BackendFuture<'_, ()> {
            Box::pin(std::future::pending())
        }
        fn vm_info(&self, _: u64) -> BackendFuture<'_, VmRecord> {
            Box::pin(std::future::pending())
        }
        fn vm_terminate_hard(&self, _: u64) -> BackendFuture<'_, ()> {
            Box::pin(std::future::pending())
        }
        fn vm_templates(&self, _: NameScope) -> BackendFuture<'_, Vec<(u64, String)>> {
            Box::pin(std::future::pending())
        }
        fn networks(&self, _: NameScope) -> BackendFuture<'_, Vec<(u64, String)>> {
            Box::pin(std::future::pending())
        }
        fn vm_template_name(&self, _: u64) -> BackendFuture<'_, String> {
            Box::pin(std::future::pending())
        }
        fn network_name(&self, _: u64) -> BackendFuture<'_, String> {
            Box::pin(std::future::pending())
        }
    }

    #[test]
    fn the_record_round_trips_and_bounds_what_it_reads() {
        let rec = LeaseRecord {
            holder: "host-1-abc".into(),
            acquire_time: "2026-12-03T09:00:00.000Z".into(),
            renew_time: "2026-12-03T09:00:02.000Z".into(),
            lease_duration_s: 15,
            transitions: 2,
        };
        use crate::one::model::template::TemplateValue;
        let mut t = crate::one::model::Template::default();
        for line in rec.to_template().lines() {
            let (k, v) = line.split_once('=').unwrap();
            let v = TemplateValue::Single(v.trim_matches('"').to_string());
            t.attrs.push((k.to_string(), v));
        }
        assert_eq!(LeaseRecord::from_template(&t), rec);
        for forged in ["x".repeat(MAX_VALUE + 1), "a\nforged log line".into()] {
            let mut t = t.clone();
            t.attrs
                .insert(0, ("HOLDER".into(), TemplateValue::Single(forged)));
            assert_eq!(LeaseRecord::from_template(&t).holder, "");
        }
    }
}
