//! The reconcile queue: when each cluster runs next.
//!
//! Modelled on kube-runtime's `scheduler.rs`, without Kubernetes types and with one
//! addition, the *not-before* hold that carries per-cluster backoff:
//!
//! - **Dedup**: an item occupies one slot. A second request for a queued item never
//!   adds a run; the *earlier* of the two run times wins, so an event-triggered run
//!   overtakes a slower periodic requeue.
//! - **Debounce**: with a debounce `d`, a request for `t` runs at `t + d`, and a new
//!   request that is not later than the queued one restarts that delay (trailing edge).
//!   As in kube-runtime, a debounce on an item requested more often than every `d`
//!   postpones it for as long as the requests keep coming: keep `d` short.
//! - **Not-before** (backoff): while an item has a not-before instant, no request can
//!   make it run earlier. A request in the meantime is clamped, not dropped, and it
//!   cannot move the instant either: event triggers neither bypass nor extend a backoff.
//! - **Held while running**: [`Scheduler::pop_due`] takes a predicate; items it rejects
//!   (a reconcile of the same cluster in flight, a cluster awaiting a fresh observation)
//!   stay queued with their time and run once released — a request that arrives during
//!   a reconcile is never lost and never runs concurrently with it.
//! - Run times are clamped to one year ahead, so a huge requeue cannot overflow
//!   (kube-rs/kube#1772 was a panic from exactly that).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// Longest delay the scheduler accepts.
const MAX_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone, Copy)]
struct Slot {
    run_at: Instant,
    seq: u64,
}

/// A delay queue with dedup, debounce and per-item not-before holds.
#[derive(Debug)]
pub struct Scheduler<T> {
    slots: HashMap<T, Slot>,
    queue: BTreeMap<(Instant, u64), T>,
    not_before: HashMap<T, Instant>,
    debounce: Duration,
    seq: u64,
}

impl<T: Eq + Hash + Clone> Scheduler<T> {
    /// An empty scheduler with trailing-edge `debounce` (zero: none).
    pub fn new(debounce: Duration) -> Self {
        Self {
            slots: HashMap::new(),
            queue: BTreeMap::new(),
            not_before: HashMap::new(),
            debounce,
            seq: 0,
        }
    }

    fn clamp(&self, item: &T, t: Instant) -> Instant {
        let far = Instant::now()
            .checked_add(MAX_DELAY)
            .unwrap_or_else(Instant::now);
        let t = t.min(far);
        match self.not_before.get(item) {
            Some(&nb) => t.max(nb),
            None => t,
        }
    }

    fn place(&mut self, item: T, run_at: Instant) {
        if let Some(old) = self.slots.get(&item) {
            self.queue.remove(&(old.run_at, old.seq));
        }
        self.seq += 1;
        let slot = Slot {
            run_at,
            seq: self.seq,
        };
        self.queue.insert((run_at, slot.seq), item.clone());
        self.slots.insert(item, slot);
    }

    /// Request a run of `item` at `at` (see the module doc for dedup and debounce).
    pub fn schedule(&mut self, item: T, at: Instant) {
        let debounced = at.checked_add(self.debounce).unwrap_or(at);
        let run_at = self.clamp(&item, debounced);
        match self.slots.get(&item) {
            // The queued run comes before this request: it wins, this one is merged.
            Some(old) if old.run_at < at => {}
            // Same run time already (e.g. clamped to the same not-before): nothing moves.
            Some(old) if old.run_at == run_at => {}
            // Otherwise this request replaces the queued run (earlier, or debounced anew).
            _ => self.place(item, run_at),
        }
    }

    /// Hold `item` back until `until` (backoff), or release it with `None`. A queued run
    /// earlier than `until` moves to `until`; releasing never moves a run.
    pub fn set_not_before(&mut self, item: &T, until: Option<Instant>) {
        match until {
            None => {
                self.not_before.remove(item);
            }
            Some(nb) => {
                self.not_before.insert(item.clone(), nb);
                if let Some(old) = self.slots.get(item).copied() {
                    if old.run_at < nb {
                        self.place(item.clone(), nb);
                    }
                }
            }
        }
    }

    /// Drop `item` from the queue and forget its hold.
    pub fn remove(&mut self, item: &T) {
        if let Some(old) = self.slots.remove(item) {
            self.queue.remove(&(old.run_at, old.seq));
        }
        self.not_before.remove(item);
    }

    /// When `item` is due, if queued.
    pub fn scheduled_at(&self, item: &T) -> Option<Instant> {
        self.slots.get(item).map(|s| s.run_at)
    }

    /// Number of queued items.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The earliest run time among items `runnable` accepts.
    pub fn next_due(&self, mut runnable: impl FnMut(&T) -> bool) -> Option<Instant> {
        self.queue
            .iter()
            .find(|(_, item)| runnable(item))
            .map(|((t, _), _)| *t)
    }

    /// Take the earliest item due at `now` that `runnable` accepts; rejected items keep
    /// their place.
    pub fn pop_due(&mut self, now: Instant, mut runnable: impl FnMut(&T) -> bool) -> Option<T> {
        let key = self
            .queue
            .iter()
            .take_while(|((t, _), _)| *t <= now)
            .find(|(_, item)| runnable(item))
            .map(|(k, _)| *k)?;
        let item = self.queue.remove(&key)?;
        self.slots.remove(&item);
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Advance paused time to the next due item and pop it, returning (item, elapsed).
    async fn run_next(
        s: &mut Scheduler<&'static str>,
        start: Instant,
        busy: &[&str],
    ) -> Option<(&'static str, Duration)> {
        let due = s.next_due(|i| !busy.contains(i))?;
        tokio::time::sleep_until(due).await;
        let item = s.pop_due(Instant::now(), |i| !busy.contains(i))?;
        Some((item, Instant::now() - start))
    }

    #[tokio::test(start_paused = true)]
    async fn dedup_keeps_the_earlier_request() {
        let start = Instant::now();
        let mut s = Scheduler::new(Duration::ZERO);
        s.schedule("a", start + secs(10));
        s.schedule("a", start + secs(5));
        s.schedule("a", start + secs(8));
        assert_eq!(s.len(), 1);
        assert_eq!(run_next(&mut s, start, &[]).await, Some(("a", secs(5))));
        assert_eq!(
            run_next(&mut s, start, &[]).await,
            None,
            "merged, not repeated"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn debounce_restarts_on_each_request_and_fires_once() {
        let start = Instant::now();
        let mut s = Scheduler::new(secs(1));
        s.schedule("a", start);
        tokio::time::advance(Duration::from_millis(500)).await;
        s.schedule("a", Instant::now());
        tokio::time::advance(Duration::from_millis(400)).await;
        s.schedule("a", Instant::now());
        assert_eq!(s.pop_due(Instant::now(), |_| true), None, "not yet");
        let (item, at) = run_next(&mut s, start, &[]).await.unwrap();
        assert_eq!((item, at), ("a", Duration::from_millis(1900)));
        assert!(s.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn debounce_does_not_delay_an_earlier_queued_run_for_a_later_request() {
        let start = Instant::now();
        let mut s = Scheduler::new(secs(1));
        s.schedule("a", start);
        s.schedule("a", start + secs(30));
        assert_eq!(run_next(&mut s, start, &[]).await, Some(("a", secs(1))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_item_is_held_in_place_while_others_run() {
        let start = Instant::now();
        let mut s = Scheduler::new(Duration::ZERO);
        s.schedule("a", start);
        s.schedule("b", start + secs(2));
        // "a" is being reconciled: "b" runs, "a" waits with its place kept.
        assert_eq!(run_next(&mut s, start, &["a"]).await, Some(("b", secs(2))));
        assert_eq!(s.scheduled_at(&"a"), Some(start));
        // Released: it is overdue, so it runs immediately.
        assert_eq!(run_next(&mut s, start, &[]).await, Some(("a", secs(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn not_before_clamps_requests_and_is_neither_bypassed_nor_extended() {
        let start = Instant::now();
        let mut s = Scheduler::new(Duration::ZERO);
        s.schedule("a", start + secs(1));
        s.set_not_before(&"a", Some(start + secs(8)));
        assert_eq!(
            s.scheduled_at(&"a"),
            Some(start + secs(8)),
            "moved to the hold"
        );
        for t in 0..5 {
            // Event triggers during the backoff: clamped to the hold, never later.
            s.schedule("a", start + secs(t));
            assert_eq!(s.scheduled_at(&"a"), Some(start + secs(8)));
        }
        assert_eq!(run_next(&mut s, start, &[]).await, Some(("a", secs(8))));
        // A request after the hold expired runs on time; releasing never moves runs.
        s.set_not_before(&"a", None);
        s.schedule("a", Instant::now() + secs(3));
        assert_eq!(run_next(&mut s, start, &[]).await, Some(("a", secs(11))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_during_a_run_queues_exactly_one_follow_up() {
        let start = Instant::now();
        let mut s = Scheduler::new(Duration::ZERO);
        s.schedule("a", start);
        assert_eq!(s.pop_due(start, |_| true), Some("a"));
        // Three triggers arrive while "a" is in flight.
        for _ in 0..3 {
            s.schedule("a", Instant::now());
        }
        assert_eq!(s.pop_due(Instant::now(), |i| *i != "a"), None);
        assert_eq!(s.pop_due(Instant::now(), |_| true), Some("a"));
        assert_eq!(s.pop_due(Instant::now(), |_| true), None);
    }

    #[tokio::test(start_paused = true)]
    async fn huge_delays_are_clamped_instead_of_overflowing() {
        let mut s = Scheduler::new(secs(1));
        let now = Instant::now();
        s.schedule("a", now + Duration::from_secs(u64::MAX / 4));
        let at = s.scheduled_at(&"a").unwrap();
        assert!(at <= now + MAX_DELAY);
        s.schedule("a", now);
        assert_eq!(s.scheduled_at(&"a"), Some(now + secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn items_run_in_time_order_and_remove_forgets_them() {
        let start = Instant::now();
        let mut s = Scheduler::new(Duration::ZERO);
        s.schedule("c", start + secs(3));
        s.schedule("a", start + secs(1));
        s.schedule("b", start + secs(2));
        s.remove(&"b");
        assert_eq!(run_next(&mut s, start, &[]).await, Some(("a", secs(1))));
        assert_eq!(run_next(&mut s, start, &[]).await, Some(("c", secs(3))));
        assert!(s.is_empty());
    }
}
