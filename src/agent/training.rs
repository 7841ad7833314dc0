//! The seed's training metrics, derived from what the SuperLink already has (#16 item 3),
//! without touching the user's Flower app: Flower's state database — its `run` table
//! (each run's status) and its `logs` table (the ServerApp's output, per run) — read
//! read-only. The table of every metric and where it comes from: docs/metrics.md.
//!
//! Owns: the per-run state the metrics are encoded from, the read-only queries of `run` and
//! `logs`, and the bounded parser of the lines Flower's strategies log.
//! Must not: write the database, take anything from the app's output but numbers, keep
//! more than [`MAX_RUNS`] runs, or guess: a value nothing stated stays absent.
//!
//! Assumptions (flwr 1.25, measured; docs/metrics.md §Sources):
//! - `flwr-serverapp` mirrors its stdout and stderr to the SuperLink (`PushLogs`, every
//!   0.2 s); the SuperLink stores each batch as one `logs` row (`run_id`, `node_id` 0,
//!   `timestamp` of arrival, `log` = the batch's text). A line may be split across rows.
//!   The same output also reaches the SuperLink's own stdout (the subprocess inherits it),
//!   but there the runs are interleaved and unlabelled, so the table is read.
//! - `run` has `pending_at`, `running_at`, `finished_at` (ISO text, empty until reached)
//!   and `sub_status` (`completed`, `failed`, `stopped`) once finished.
//! - The Message-API strategies (`flwr.serverapp.strategy`) log `[ROUND r/N]`,
//!   `configure_train: Sampled S nodes (out of T)`, `aggregate_train: Received R results
//!   and F failures`, `└──> Aggregated MetricRecord: {'key': value}` and `Strategy execution
//!   finished`; the legacy `flwr.server.Server` logs `[ROUND r]`, `configure_fit: strategy
//!   sampled S clients (out of T)`, `aggregate_fit: received R results and F failures`,
//!   `History (loss, distributed):` with `round r: loss` lines, and `[SUMMARY]`.
//!
//! Caveats: round durations are measured between the arrival of the log batches holding
//! the round markers, so they are as precise as the 0.2 s upload period and the grid's
//! waits allow; an app that prints lines shaped like Flower's can move these numbers
//! (only numbers: nothing else is taken from the output).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::LazyLock;

use regex::Regex;

/// Runs kept (the newest by `pending_at`): bounds the `run_id` label's cardinality.
pub const MAX_RUNS: usize = 3;
/// Longest log line parsed; longer lines are skipped whole.
pub const MAX_LINE: usize = 4096;
/// Log rows read per run and poll (the rest on the next poll).
const MAX_ROWS: i64 = 256;
/// Bytes read of one log row.
const MAX_ROW_BYTES: i64 = 64 * 1024;
/// Rounds remembered per run ([`RunLogView::rounds`]): the training events of rounds that
/// ended faster than the agent polls are still told, up to this many per poll.
pub const MAX_ROUNDS_KEPT: usize = 8;
/// Upper bounds of `fl_round_duration_seconds` (the seed's buckets).
pub const DURATION_BUCKETS: [f64; 8] = [1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// `fl_training_status` of a run (the seed's codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Submitted, not running yet.
    Idle = 0,
    /// The ServerApp is running.
    Running = 1,
    /// Finished `completed`.
    Complete = 2,
    /// Finished otherwise (`failed`, `stopped`).
    Failed = 3,
}

/// Observed round durations, as a histogram over [`DURATION_BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Durations {
    /// Count per bucket (not cumulative); the last is `+Inf`.
    pub buckets: [u64; DURATION_BUCKETS.len() + 1],
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Durations {
    fn observe(&mut self, secs: f64) {
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum += secs;
        self.count += 1;
    }
}

/// What the ServerApp's log stated within one round. `None`: not stated (yet).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundView {
    /// The round's number.
    pub round: u64,
    /// Nodes sampled for its training.
    pub selected: Option<u64>,
    /// Training results received.
    pub responded: Option<u64>,
    /// Failed replies, training and evaluation.
    pub failures: u64,
    /// Loss of its aggregated evaluation (never a train loss).
    pub loss: Option<f64>,
    /// Accuracy of its aggregated evaluation.
    pub accuracy: Option<f64>,
    /// Seconds it lasted, once it ended.
    pub duration: Option<f64>,
}

/// What the ServerApp's log stated about one run. `None`: not stated (yet).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunLogView {
    /// The round in progress or last run.
    pub round_current: Option<u64>,
    /// Rounds the strategy was started with.
    pub round_total: Option<u64>,
    /// Durations of the finished rounds.
    pub durations: Durations,
    /// Loss of the last aggregated evaluation.
    pub loss: Option<f64>,
    /// Accuracy of the last aggregated evaluation.
    pub accuracy: Option<f64>,
    /// Nodes sampled for the last training round.
    pub selected: Option<u64>,
    /// Training results received in the last training round.
    pub responded: Option<u64>,
    /// Failed replies, training and evaluation, over the run (a counter).
    pub failed: u64,
    /// The last [`MAX_ROUNDS_KEPT`] rounds, oldest first.
    pub rounds: Vec<RoundView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Stage {
    #[default]
    Other,
    Train,
    Evaluate,
    /// Inside the legacy `History (loss, distributed):` block.
    LossHistory,
}

/// The parser of one run's ServerApp log: fed chunks as they arrive.
#[derive(Debug, Clone, Default)]
pub struct RunLog {
    view: RunLogView,
    stage: Stage,
    round_started: Option<f64>,
    partial: String,
    /// The current line exceeded [`MAX_LINE`]: skip to its end.
    overlong: bool,
}

static ANSI: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\x1b\[[0-9;]{0,16}[A-Za-z]").expect("static regex"));
static LEVEL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s?").expect("static regex")
});
static ROUND: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\[ROUND (\d{1,9})(?:/(\d{1,9}))?\]$").expect("static regex"));
static NUM_ROUNDS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^├── Number of rounds: (\d{1,9})$").expect("static regex"));
static SAMPLED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^configure_(train|fit|evaluate): (?:strategy )?[Ss]ampled (\d{1,9}) (?:nodes|clients) \(out of (\d{1,9})\)$",
    )
    .expect("static regex")
});
static RECEIVED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^aggregate_(train|fit|evaluate): [Rr]eceived (\d{1,9}) results and (\d{1,9}) failures$",
    )
    .expect("static regex")
});
static AGGREGATED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^└──> Aggregated MetricRecord: \{(.*)\}$").expect("static regex")
});
static ENTRY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"'([A-Za-z0-9_.-]{1,64})': (-?[0-9]{1,20}(?:\.[0-9]{1,20})?(?:[eE][+-]?[0-9]{1,3})?)",
    )
    .expect("static regex")
});
static HISTORY_ROUND: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^round (\d{1,9}): (-?[0-9]{1,20}(?:\.[0-9]{1,20})?(?:[eE][+-]?[0-9]{1,3})?)$")
        .expect("static regex")
});
static RUN_FINISHED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^Run finished (\d{1,9}) round\(s\) in ").expect("static regex"));

fn num<T: std::str::FromStr>(s: &str) -> Option<T> {
    s.parse().ok()
}

/// The value of the metric named like `names` (exact), or of the single key ending in
/// one of `suffixes`; `None` when absent or ambiguous.
fn pick(record: &BTreeMap<String, f64>, names: &[&str], suffixes: &[&str]) -> Option<f64> {
    if let Some(v) = names.iter().find_map(|n| record.get(*n)) {
        return Some(*v);
    }
    let mut found = record
        .iter()
        .filter(|(k, _)| suffixes.iter().any(|s| k.ends_with(s)));
    match (found.next(), found.next()) {
        (Some((_, v)), None) => Some(*v),
        _ => None,
    }
}

impl RunLog {
    /// What the log said so far.
    pub fn view(&self) -> &RunLogView {
        &self.view
    }

    /// Feeds the text of one log row that arrived at `ts` (Unix seconds).
    pub fn feed(&mut self, ts: f64, chunk: &str) {
        let mut rest = chunk;
        while let Some(i) = rest.find('\n') {
            let (piece, tail) = (&rest[..i], &rest[i + 1..]);
            rest = tail;
            if self.overlong || self.partial.len() + piece.len() > MAX_LINE {
                self.overlong = false;
                self.partial.clear();
                continue;
            }
            let line = std::mem::take(&mut self.partial) + piece;
            self.line(ts, &line);
        }
        if self.overlong || self.partial.len() + rest.len() > MAX_LINE {
            self.overlong = true;
            self.partial.clear();
        } else {
            self.partial.push_str(rest);
        }
    }

    fn end_round(&mut self, ts: f64) {
        if let Some(t0) = self.round_started.take() {
            let secs = (ts - t0).max(0.0);
            self.view.durations.observe(secs);
            if let Some(r) = self.view.rounds.last_mut() {
                r.duration = Some(secs);
            }
        }
    }

    fn line(&mut self, ts: f64, raw: &str) {
        let plain = ANSI.replace_all(raw, "");
        let msg = LEVEL.replace(&plain, "");
        let msg = msg.trim();
        if self.stage == Stage::LossHistory {
            if let Some(c) = HISTORY_ROUND.captures(msg) {
                let v: Option<f64> = num(&c[2]);
                if let Some(v) = v.filter(|v| v.is_finite()) {
                    self.view.loss = Some(v);
                }
                return;
            }
            self.stage = Stage::Other;
        }
        let v = &mut self.view;
        if let Some(c) = ROUND.captures(msg) {
            self.end_round(ts);
            self.round_started = Some(ts);
            self.view.round_current = num(&c[1]);
            if let Some(round) = self.view.round_current {
                let rounds = &mut self.view.rounds;
                if rounds.len() == MAX_ROUNDS_KEPT {
                    rounds.remove(0);
                }
                rounds.push(RoundView {
                    round,
                    ..RoundView::default()
                });
            }
            if let Some(total) = c.get(2) {
                self.view.round_total = num(total.as_str());
            }
            self.stage = Stage::Other;
        } else if let Some(c) = NUM_ROUNDS.captures(msg) {
            v.round_total = num(&c[1]);
        } else if let Some(c) = SAMPLED.captures(msg) {
            let train = &c[1] != "evaluate";
            self.stage = if train { Stage::Train } else { Stage::Evaluate };
            if train {
                v.selected = num(&c[2]);
                if let Some(r) = v.rounds.last_mut() {
                    r.selected = v.selected;
                }
            }
        } else if let Some(c) = RECEIVED.captures(msg) {
            let train = &c[1] != "evaluate";
            self.stage = if train { Stage::Train } else { Stage::Evaluate };
            let failures = num::<u64>(&c[3]).unwrap_or(0);
            v.failed += failures;
            if train {
                v.responded = num(&c[2]);
            }
            if let Some(r) = v.rounds.last_mut() {
                r.failures += failures;
                if train {
                    r.responded = v.responded;
                }
            }
        } else if let Some(c) = AGGREGATED.captures(msg) {
            // Only the evaluation's aggregate is "the" loss/accuracy (a train loss is not).
            if self.stage == Stage::Evaluate {
                let record: BTreeMap<String, f64> = ENTRY
                    .captures_iter(&c[1])
                    .filter_map(|e| Some((e[1].to_string(), num::<f64>(&e[2])?)))
                    .filter(|(_, x)| x.is_finite())
                    .collect();
                let loss = pick(&record, &["loss"], &["_loss"]);
                let accuracy = pick(&record, &["accuracy", "acc"], &["_accuracy", "_acc"]);
                v.loss = loss.or(v.loss);
                v.accuracy = accuracy.or(v.accuracy);
                if let Some(r) = v.rounds.last_mut() {
                    r.loss = loss.or(r.loss);
                    r.accuracy = accuracy.or(r.accuracy);
                }
            }
        } else if msg == "History (loss, distributed):" {
            self.stage = Stage::LossHistory;
        } else if let Some(c) = RUN_FINISHED.captures(msg) {
            v.round_total = v.round_total.or(num(&c[1]));
        } else if msg.starts_with("Strategy execution finished") || msg == "[SUMMARY]" {
            self.end_round(ts);
            self.stage = Stage::Other;
        }
    }
}

/// One run as the metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunView {
    /// Flower's run id.
    pub run_id: u64,
    /// From the `run` table.
    pub status: Status,
    /// From the `run` table: `running_at` to `finished_at`, once finished.
    pub duration: Option<f64>,
    /// Finished, and its whole log read: the poll found no new row of it.
    pub settled: bool,
    /// From the ServerApp's log.
    pub log: RunLogView,
}

/// The training view of a SuperLink: what the metrics endpoint encodes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingView {
    /// SuperNodes Flower holds online; `None` until read.
    pub clients_connected: Option<u64>,
    /// Their Flower node ids; `None` until read, or when more than
    /// [`crate::protocol::nodes::MAX_NODES`] are online.
    pub nodes_online: Option<BTreeSet<u64>>,
    /// The newest runs (at most [`MAX_RUNS`]), newest first.
    pub runs: Vec<RunView>,
}

impl TrainingView {
    /// `FL_TRAINING_ACTIVE` and `FL_ROUND_NUMBER`: whether a run is running, and the round
    /// in progress (or last run) of the newest run that reached one (0 before any).
    pub fn activity(&self) -> (bool, u64) {
        let active = self.runs.iter().any(|r| r.status == Status::Running);
        let round = self
            .runs
            .iter()
            .find_map(|r| r.log.round_current)
            .unwrap_or(0);
        (active, round)
    }
}

/// Why the state could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading Flower's state {}: {source}", path.display())]
pub struct TrainingError {
    path: PathBuf,
    source: rusqlite::Error,
}

#[derive(Debug, Default)]
struct Tracked {
    log: RunLog,
    /// `timestamp` of the last log row read.
    cursor: f64,
}

/// Follows Flower's state database: call [`Tracker::poll`] periodically.
#[derive(Debug)]
pub struct Tracker {
    db: PathBuf,
    runs: BTreeMap<u64, Tracked>,
}

/// Seconds from `running` to `finished` (Flower's ISO-8601 text); `None` unless both parse.
fn duration_of(running: &str, finished: &str) -> Option<f64> {
    let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok();
    let ms = (t(finished)? - t(running)?).num_milliseconds();
    (ms >= 0).then(|| ms as f64 / 1000.0)
}

fn status_of(running: &str, finished: &str, sub_status: &str) -> Status {
    match (running.is_empty(), finished.is_empty()) {
        (_, false) if sub_status == "completed" => Status::Complete,
        (_, false) => Status::Failed,
        (false, true) => Status::Running,
        (true, true) => Status::Idle,
    }
}

impl Tracker {
    /// A tracker of the database at `db` (nothing is read yet).
    pub fn new(db: PathBuf) -> Self {
        Self {
            db,
            runs: BTreeMap::new(),
        }
    }

    /// Reads what changed since the last poll; `now` (Unix seconds) decides which
    /// SuperNodes are online. Blocking (SQLite): run it on a blocking thread.
    pub fn poll(&mut self, now: f64) -> Result<TrainingView, TrainingError> {
        let fail = |source| TrainingError {
            path: self.db.clone(),
            source,
        };
        let conn = super::linkstate::open(&self.db).map_err(fail)?;
        let connected = super::linkstate::online_count(&conn, now).map_err(fail)?;
        let online = super::linkstate::online_set(&conn, now).map_err(fail)?;
        let nodes_online = (online.len() <= crate::protocol::nodes::MAX_NODES).then_some(online);
        let mut stmt = conn
            .prepare(
                "SELECT run_id, COALESCE(running_at, ''), COALESCE(finished_at, ''), \
                 COALESCE(sub_status, '') FROM run \
                 ORDER BY pending_at DESC, run_id DESC LIMIT ?1",
            )
            .map_err(fail)?;
        let runs: Vec<(u64, Status, Option<f64>)> = stmt
            .query_map([MAX_RUNS as i64], |r| {
                let id: i64 = r.get(0)?;
                let (running, finished, sub): (String, String, String) =
                    (r.get(1)?, r.get(2)?, r.get(3)?);
                // Flower's int64_to_uint64: the two's-complement reinterpretation.
                Ok((
                    id as u64,
                    status_of(&running, &finished, &sub),
                    duration_of(&running, &finished),
                ))
            })
            .map_err(fail)?
            .collect::<Result<_, _>>()
            .map_err(fail)?;
        self.runs.retain(|id, _| runs.iter().any(|(r, ..)| r == id));
        let mut rows = conn
            .prepare(
                "SELECT timestamp, substr(log, 1, ?3) FROM logs \
                 WHERE run_id = ?1 AND node_id = 0 AND timestamp > ?2 \
                 ORDER BY timestamp LIMIT ?4",
            )
            .map_err(fail)?;
        let mut out = Vec::with_capacity(runs.len());
        for (id, status, duration) in runs {
            let t = self.runs.entry(id).or_default();
            let batch: Vec<(f64, String)> = rows
                .query_map((id as i64, t.cursor, MAX_ROW_BYTES, MAX_ROWS), |r| {
                    Ok((
                        r.get(0)?,
                        r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    ))
                })
                .map_err(fail)?
                .collect::<Result<_, _>>()
                .map_err(fail)?;
            let quiet = batch.is_empty();
            for (ts, text) in batch {
                t.cursor = ts;
                t.log.feed(ts, &text);
            }
            out.push(RunView {
                run_id: id,
                status,
                duration,
                settled: quiet && matches!(status, Status::Complete | Status::Failed),
                log: t.log.view().clone(),
            });
        }
        Ok(TrainingView {
            clients_connected: Some(connected),
            nodes_online,
            runs: out,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// Flower 1.25's ServerApp output for a 3-round FedAvg run with 2 SuperNodes, as the
    /// `logs` table held it (one batch per row, ANSI colours included; measured).
    const ROWS: &[(f64, &str)] = &[
        (100.2, "\x1b[92mINFO \x1b[0m:      Start `flwr-serverapp` process\n"),
        (100.4, "\x1b[92mINFO \x1b[0m:      Starting FedAvg strategy:\n\x1b[92mINFO \x1b[0m:      \t├── Number of rounds: 3\n\x1b[92mINFO \x1b[0m:      \t├── ArrayRecord (0.00 MB)\n\x1b[92mINFO \x1b[0m:      \n\x1b[92mINFO \x1b[0m:      [ROUND 1/3]\n\x1b[92mINFO \x1b[0m:      configure_train: Sampled 2 nodes (out of 2)\n"),
        (103.4, "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 2 results and 0 failures\n\x1b[92mINFO \x1b[0m:      \t└──> Aggregated MetricRecord: {'train_loss': 1.282981833866514}\n\x1b[92mINFO \x1b[0m:      configure_evaluate: Sampled 2 nodes (out of 2)\n"),
        (109.4, "\x1b[92mINFO \x1b[0m:      aggregate_evaluate: Received 2 results and 0 failures\n\x1b[92mINFO \x1b[0m:      \t└──> Aggregated MetricRecord: {'eval_loss': 0.2324267491133249}\n\x1b[92mINFO \x1b[0m:      \n\x1b[92mINFO \x1b[0m:      [ROUND 2/3]\n\x1b[92mINFO \x1b[0m:      configure_train: Sampled 2 nodes (out of 2)\n"),
        (115.6, "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 1 results and 1 failures\n\x1b[92mINFO \x1b[0m:      \t> Received error in reply from node 7: timeout\n\x1b[92mINFO \x1b[0m:      \t└──> Aggregated MetricRecord: {'train_loss': 0.09453922597086234}\n\x1b[92mINFO \x1b[0m:      configure_evaluate: Sampled 2 nodes (out of 2)\n"),
        // A line split across two batches.
        (121.6, "\x1b[92mINFO \x1b[0m:      aggregate_evaluate: Received 2 results and 0 failures\n\x1b[92mINFO \x1b[0m:      \t└──> Aggregated MetricRecord: {'eval_loss': 0.0282915, "),
        (121.7, "'eval_acc': 0.75}\n\x1b[92mINFO \x1b[0m:      \n\x1b[92mINFO \x1b[0m:      [ROUND 3/3]\n"),
        (130.7, "\x1b[92mINFO \x1b[0m:      Strategy execution finished in 30.40s\n"),
    ];

    fn parsed(rows: &[(f64, &str)]) -> RunLogView {
        let mut log = RunLog::default();
        for (ts, text) in rows {
            log.feed(*ts, text);
        }
        log.view().clone()
    }

    #[test]
    fn the_message_api_strategy_log_gives_rounds_clients_and_the_evaluation_loss() {
        let v = parsed(ROWS);
        assert_eq!(v.round_current, Some(3));
        assert_eq!(v.round_total, Some(3));
        assert_eq!(v.selected, Some(2));
        assert_eq!(v.responded, Some(1), "the last training round's results");
        assert_eq!(v.failed, 1);
        assert_eq!(
            v.loss,
            Some(0.0282915),
            "the evaluation's, never train_loss"
        );
        assert_eq!(v.accuracy, Some(0.75));
        assert_eq!(v.durations.count, 3);
        // [ROUND 1/3] at 100.4, [ROUND 2/3] at 109.4, [ROUND 3/3] at 121.7, end at 130.7.
        assert!((v.durations.sum - 30.3).abs() < 1e-9, "{}", v.durations.sum);
        assert_eq!(
            v.durations.buckets[2..4],
            [2, 1],
            "9 s twice (≤ 10), 12.3 s (≤ 30)"
        );
        // Each round's own figures, for the training events.
        let rounds: Vec<_> = v
            .rounds
            .iter()
            .map(|r| {
                let d = r.duration.map(|d| (d * 10.0).round() / 10.0);
                (
                    r.round,
                    r.selected,
                    r.responded,
                    r.failures,
                    r.loss,
                    r.accuracy,
                    d,
                )
            })
            .collect();
        assert_eq!(
            rounds,
            [
                (
                    1,
                    Some(2),
                    Some(2),
                    0,
                    Some(0.2324267491133249),
                    None,
                    Some(9.0)
                ),
                (
                    2,
                    Some(2),
                    Some(1),
                    1,
                    Some(0.0282915),
                    Some(0.75),
                    Some(12.3)
                ),
                (3, None, None, 0, None, None, Some(9.0)),
            ]
        );
        // Up to the middle of round 1: nothing not yet stated.
        let early = parsed(&ROWS[..2]);
        assert_eq!((early.round_current, early.round_total), (Some(1), Some(3)));
        assert_eq!(
            (early.loss, early.responded, early.durations.count),
            (None, None, 0)
        );
        assert_eq!(early.rounds.len(), 1);
        assert_eq!(
            (early.rounds[0].selected, early.rounds[0].duration),
            (Some(2), None)
        );
    }

    #[test]
    fn the_legacy_server_log_gives_rounds_clients_and_the_distributed_loss() {
        let log = "INFO :      [INIT]\nINFO :      [ROUND 1]\n\
                   INFO :      configure_fit: strategy sampled 3 clients (out of 4)\n\
                   INFO :      aggregate_fit: received 2 results and 1 failures\n\
                   INFO :      configure_evaluate: strategy sampled 3 clients (out of 4)\n\
                   INFO :      aggregate_evaluate: received 3 results and 0 failures\n\
                   INFO :      \nINFO :      [SUMMARY]\n\
                   INFO :      Run finished 1 round(s) in 4.20s\n\
                   INFO :      \tHistory (loss, distributed):\n\
                   INFO :      \t\tround 1: 0.5\n\
                   INFO :      \t\tround 2: 0.25\n\
                   INFO :      \n";
        let v = parsed(&[(10.0, log)]);
        assert_eq!(v.round_current, Some(1));
        assert_eq!(v.round_total, Some(1));
        assert_eq!((v.selected, v.responded, v.failed), (Some(3), Some(2), 1));
        assert_eq!(v.loss, Some(0.25));
        assert_eq!(v.accuracy, None);
    }

    #[test]
    fn only_numbers_are_taken_and_lines_are_bounded() {
        // Ambiguous or non-numeric metric records say nothing.
        let v = parsed(&[(
            1.0,
            "configure_evaluate: Sampled 1 nodes (out of 1)\n\
             └──> Aggregated MetricRecord: {'a_loss': 1.0, 'b_loss': 2.0, 'acc': 'high'}\n",
        )]);
        assert_eq!((v.loss, v.accuracy), (None, None));
        // An overlong line is skipped whole, the next one is read.
        let long = format!("[ROUND 9/9]{}\n[ROUND 2/5]\n", "x".repeat(MAX_LINE));
        let v = parsed(&[(1.0, &long)]);
        assert_eq!((v.round_current, v.round_total), (Some(2), Some(5)));
        // Split over many rows, still skipped as one line.
        let mut log = RunLog::default();
        log.feed(1.0, &"y".repeat(MAX_LINE));
        log.feed(1.0, "[ROUND 4/4]");
        log.feed(1.0, "\n[ROUND 1/2]\n");
        assert_eq!(log.view().round_current, Some(1));
        // Numbers out of range are not numbers.
        let v = parsed(&[(1.0, "[ROUND 99999999999/3]\nINFO : [ROUND 1/x]\n")]);
        assert_eq!(v.round_current, None);
        // Only the last rounds are kept.
        let many: String = (1..=20).map(|r| format!("[ROUND {r}/20]\n")).collect();
        let v = parsed(&[(1.0, &many)]);
        let kept: Vec<u64> = v.rounds.iter().map(|r| r.round).collect();
        assert_eq!(kept, (13..=20).collect::<Vec<_>>());
    }

    #[test]
    fn runs_and_their_logs_are_read_from_flowers_tables_newest_runs_only() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let mut tracker = Tracker::new(db.clone());
        assert!(tracker.poll(0.0).is_err(), "no state yet");
        assert!(!db.exists(), "never created");
        let conn = Connection::open(&db).unwrap();
        // The columns read, as flwr 1.25 declares them.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE node(node_id INTEGER UNIQUE, status TEXT, online_until TIMESTAMP NULL);
             CREATE TABLE run(run_id INTEGER UNIQUE, pending_at TEXT, starting_at TEXT,
                 running_at TEXT, finished_at TEXT, sub_status TEXT);
             CREATE TABLE logs(timestamp REAL, run_id INTEGER, node_id INTEGER, log TEXT,
                 PRIMARY KEY (timestamp, run_id, node_id));",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO node VALUES (1, 'online', 50.0), (2, 'online', 5.0)",
            [],
        )
        .unwrap();
        let big = 15644467414316882310u64; // stored as a negative sint64
        for (id, pending, running, finished, sub) in [
            (1i64, "2026-01-01T00:00:01", "x", "x", "completed"),
            (
                2,
                "2026-01-01T00:00:02",
                "2026-01-01T00:00:02.250000+00:00",
                "2026-01-01T00:00:12.750000+00:00",
                "failed",
            ),
            (big as i64, "2026-01-01T00:00:03", "x", "", ""),
            (4, "2026-01-01T00:00:04", "", "", ""),
        ] {
            conn.execute(
                "INSERT INTO run VALUES (?1, ?2, '', ?3, ?4, ?5)",
                (id, pending, running, finished, sub),
            )
            .unwrap();
        }
        for (ts, text) in &ROWS[..3] {
            conn.execute(
                "INSERT INTO logs VALUES (?1, ?2, 0, ?3)",
                (ts, big as i64, text),
            )
            .unwrap();
        }
        let v = tracker.poll(10.0).unwrap();
        assert_eq!(v.clients_connected, Some(1));
        assert_eq!(v.nodes_online, Some(BTreeSet::from([1])));
        let durations: Vec<_> = v.runs.iter().map(|r| r.duration).collect();
        assert_eq!(
            durations,
            [None, None, Some(10.5)],
            "finished and parseable only"
        );
        let settled: Vec<_> = v.runs.iter().map(|r| r.settled).collect();
        assert_eq!(
            settled,
            [false, false, true],
            "finished, no log row left to read"
        );
        let ids: Vec<_> = v.runs.iter().map(|r| (r.run_id, r.status)).collect();
        assert_eq!(
            ids,
            [
                (4, Status::Idle),
                (big, Status::Running),
                (2, Status::Failed)
            ],
            "the newest {MAX_RUNS}, run 1 left out"
        );
        assert_eq!(v.runs[1].log.round_current, Some(1));
        assert_eq!(v.runs[1].log.responded, Some(2));
        // Only new rows are read on the next poll.
        for (ts, text) in &ROWS[3..] {
            conn.execute(
                "INSERT INTO logs VALUES (?1, ?2, 0, ?3)",
                (ts, big as i64, text),
            )
            .unwrap();
        }
        let v = tracker.poll(10.0).unwrap();
        assert_eq!(v.runs[1].log, parsed(ROWS));
    }
}
