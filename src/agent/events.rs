//! The seed's structured training events (#16 item 7; seed-facts §6), derived on the
//! SuperLink from the same training views as the metrics ([`super::training`]), and
//! written as one log line each. Which events exist, their fields and the switch:
//! docs/metrics.md §Training events.
//!
//! Owns: deriving the events from two successive views ([`derive`], pure), the
//! SuperNode's start-up GPU events ([`gpu`]), and writing them ([`log`]: `event`, `role`
//! and `data` fields; [`Emitter`]: a `flower run` span per run, so that in JSON lines a
//! run's events share a trace id when tracing is on).
//! Must not: invent a value (a field its source did not state is left out), replay what
//! happened before the agent's first view (that view is the baseline: nothing is derived
//! from it alone), or keep more than the previous view and one span per run in the view.
//!
//! Guarantees: at most `MAX_RUNS × (2 + 4 × MAX_ROUNDS_KEPT)` run events and one
//! join or leave per online node ([`crate::protocol::nodes::MAX_NODES`]) per derivation.
//! Caveats: rounds that both start and end within one poll (2 s) are told together; more
//! than [`MAX_ROUNDS_KEPT`](super::training::MAX_ROUNDS_KEPT) of them in one poll are not
//! all told. Node ids are Flower's uint64 (JSON numbers above 2^53 lose precision in
//! JavaScript readers).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::training::{RoundView, RunView, Status, TrainingView};

/// One event: the seed's name, its level, and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The seed's event name (`training_start`, `round_end`, …).
    pub name: &'static str,
    /// Logged as a warning (`client_failure`), else as information.
    pub warning: bool,
    /// The run it belongs to (`None`: a node event).
    pub run_id: Option<u64>,
    /// The seed's `data` fields that have a value, plus `run_id` for run events.
    pub data: Map<String, Value>,
}

fn event(name: &'static str, run_id: Option<u64>, fields: Vec<(&str, Option<Value>)>) -> Event {
    let data = run_id
        .map(|id| ("run_id", Some(Value::from(id))))
        .into_iter()
        .chain(fields)
        .filter_map(|(k, v)| Some((k.to_string(), v?)))
        .collect();
    Event {
        name,
        warning: matches!(name, "client_failure" | "gpu_unavailable"),
        run_id,
        data,
    }
}

fn finished(s: Status) -> bool {
    matches!(s, Status::Complete | Status::Failed)
}

/// Started, and the log said something of it (or it finished): `training_start` can carry
/// the rounds planned, which the ServerApp logs only after Flower marks the run running.
fn began(r: &RunView) -> bool {
    r.status != Status::Idle
        && (r.log.round_total.is_some() || r.log.round_current.is_some() || finished(r.status))
}

/// Its training was configured (the clients selected are known) or it ended.
fn announced(r: &RoundView) -> bool {
    r.selected.is_some() || r.duration.is_some()
}

fn evaluated(r: &RoundView) -> bool {
    r.loss.is_some() || r.accuracy.is_some()
}

fn ended(r: &RoundView) -> bool {
    r.duration.is_some()
}

fn num(v: Option<u64>) -> Option<Value> {
    v.map(Value::from)
}

fn real(v: Option<f64>) -> Option<Value> {
    v.and_then(serde_json::Number::from_f64).map(Value::Number)
}

fn rounds(prev: Option<&RunView>, next: &RunView, out: &mut Vec<Event>) {
    let id = Some(next.run_id);
    for n in &next.log.rounds {
        let p = prev.and_then(|p| p.log.rounds.iter().find(|r| r.round == n.round));
        let was = |f: fn(&RoundView) -> bool| p.is_some_and(f);
        let round = Some(Value::from(n.round));
        if announced(n) && !was(announced) {
            out.push(event(
                "round_start",
                id,
                vec![
                    ("round", round.clone()),
                    ("num_clients_selected", num(n.selected)),
                ],
            ));
        }
        let failures = n.failures - p.map_or(0, |p| p.failures.min(n.failures));
        if failures > 0 {
            out.push(event(
                "client_failure",
                id,
                vec![
                    ("round", round.clone()),
                    ("num_failures", Some(failures.into())),
                ],
            ));
        }
        if evaluated(n) && !was(evaluated) {
            out.push(event(
                "evaluation_result",
                id,
                vec![
                    ("round", round.clone()),
                    ("loss", real(n.loss)),
                    ("accuracy", real(n.accuracy)),
                ],
            ));
        }
        if ended(n) && !was(ended) {
            out.push(event(
                "round_end",
                id,
                vec![
                    ("round", round),
                    ("num_clients_responded", num(n.responded)),
                    ("aggregated_loss", real(n.loss)),
                    ("aggregated_accuracy", real(n.accuracy)),
                    ("round_duration_seconds", real(n.duration)),
                ],
            ));
        }
    }
}

/// The events that happened between `prev` and `next`, oldest run first; none when there
/// is no `prev` (the first view after the agent started is the baseline).
pub fn derive(prev: Option<&TrainingView>, next: &TrainingView) -> Vec<Event> {
    let Some(prev) = prev else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let (Some(was), Some(now)) = (&prev.nodes_online, &next.nodes_online) {
        for (name, ids) in [
            ("client_join", now.difference(was)),
            ("client_leave", was.difference(now)),
        ] {
            out.extend(ids.map(|id| event(name, None, vec![("node_id", Some(Value::from(*id)))])));
        }
    }
    for n in next.runs.iter().rev() {
        let p = prev.runs.iter().find(|r| r.run_id == n.run_id);
        let id = Some(n.run_id);
        if began(n) && !p.is_some_and(began) {
            out.push(event(
                "training_start",
                id,
                vec![("num_rounds", num(n.log.round_total))],
            ));
        }
        rounds(p, n, &mut out);
        // Settled: finished and its whole log read, so no round is told after the end.
        if n.settled && !p.is_some_and(|p| p.settled) {
            let status = if n.status == Status::Complete {
                "completed"
            } else {
                "failed"
            };
            out.push(event(
                "training_end",
                id,
                vec![
                    ("total_rounds", num(n.log.round_current)),
                    ("final_loss", real(n.log.loss)),
                    ("final_accuracy", real(n.log.accuracy)),
                    ("total_duration_seconds", real(n.duration)),
                    ("status", Some(status.into())),
                ],
            ));
        }
    }
    out
}

/// `gpu_detected` (the first device's name and memory, the driver's version, the number
/// of devices) or `gpu_unavailable`: a SuperNode asked for a GPU, at start-up.
pub fn gpu(found: Option<&super::gpu::GpuFound>) -> Event {
    match found {
        Some(g) => event(
            "gpu_detected",
            None,
            vec![
                ("gpu_name", Some(g.name.clone().into())),
                ("gpu_memory_mb", num(g.memory_mb)),
                ("driver_version", g.driver.clone().map(Value::from)),
                ("gpu_count", Some(g.count.into())),
            ],
        ),
        None => event(
            "gpu_unavailable",
            None,
            vec![("fallback_device", Some("cpu".into()))],
        ),
    }
}

/// Logs one event: message and `event` the event's name, `role`, and `data` the JSON
/// object (the agent's JSON lines write it as an object: [`crate::otel`]), in the current
/// span.
pub fn log(e: &Event, role: &str) {
    let data = Value::Object(e.data.clone()).to_string();
    let name = e.name;
    if e.warning {
        tracing::warn!(event = name, role, data = %data, "{name}");
    } else {
        tracing::info!(event = name, role, data = %data, "{name}");
    }
}

/// Writes the training events, each run's in its `flower run` span.
#[derive(Debug)]
pub struct Emitter {
    role: &'static str,
    /// The `flower run` span of each run with events, until its end or it leaves the view.
    spans: BTreeMap<u64, tracing::Span>,
}

impl Emitter {
    /// An emitter for a `role` agent.
    pub fn new(role: &'static str) -> Self {
        Self {
            role,
            spans: BTreeMap::new(),
        }
    }

    /// Logs `events`, derived from `view`.
    pub fn emit(&mut self, events: &[Event], view: &TrainingView) {
        self.spans
            .retain(|id, _| view.runs.iter().any(|r| r.run_id == *id));
        for e in events {
            let span = e.run_id.map(|id| {
                self.spans
                    .entry(id)
                    .or_insert_with(
                        || tracing::info_span!(parent: None, "flower run", flower.run_id = id),
                    )
                    .clone()
            });
            let _entered = span.as_ref().map(|s| s.enter());
            log(e, self.role);
            if e.name == "training_end" {
                if let Some(id) = e.run_id {
                    self.spans.remove(&id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::agent::training::{RunLog, MAX_ROUNDS_KEPT};

    /// Flower 1.25's ServerApp output for a 3-round FedAvg run (as in training.rs' tests,
    /// shortened), in the batches a poll would find.
    const BATCHES: &[&str] = &[
        "INFO :      Starting FedAvg strategy:\nINFO :      \t├── Number of rounds: 3\n\
         INFO :      [ROUND 1/3]\n",
        "INFO :      configure_train: Sampled 2 nodes (out of 2)\n",
        "INFO :      aggregate_train: Received 2 results and 0 failures\n\
         INFO :      configure_evaluate: Sampled 2 nodes (out of 2)\n\
         INFO :      aggregate_evaluate: Received 2 results and 0 failures\n\
         INFO :      \t└──> Aggregated MetricRecord: {'eval_loss': 0.25, 'eval_acc': 0.5}\n\
         INFO :      [ROUND 2/3]\nINFO :      configure_train: Sampled 2 nodes (out of 2)\n\
         INFO :      aggregate_train: Received 1 results and 1 failures\n\
         INFO :      [ROUND 3/3]\nINFO :      configure_train: Sampled 1 nodes (out of 1)\n",
        "INFO :      aggregate_train: Received 1 results and 0 failures\n\
         INFO :      configure_evaluate: Sampled 1 nodes (out of 1)\n\
         INFO :      aggregate_evaluate: Received 1 results and 0 failures\n\
         INFO :      \t└──> Aggregated MetricRecord: {'eval_loss': 0.125}\n\
         INFO :      Strategy execution finished in 9.00s\n",
    ];

    fn run(id: u64, status: Status, log: &RunLog, settled: bool) -> RunView {
        RunView {
            run_id: id,
            status,
            duration: settled.then_some(9.5),
            settled,
            log: log.view().clone(),
        }
    }

    fn view(nodes: &[u64], runs: Vec<RunView>) -> TrainingView {
        TrainingView {
            clients_connected: Some(nodes.len() as u64),
            nodes_online: Some(nodes.iter().copied().collect::<BTreeSet<_>>()),
            runs,
        }
    }

    /// `(name, data)` of each event, data as compact JSON.
    fn told(events: &[Event]) -> Vec<(&'static str, String)> {
        events
            .iter()
            .map(|e| (e.name, Value::Object(e.data.clone()).to_string()))
            .collect()
    }

    /// The views of the polls through the run: pending, running with no log, then one
    /// batch per poll, finished (the last rows still being read), settled.
    fn polls() -> Vec<TrainingView> {
        let mut log = RunLog::default();
        let mut views = vec![
            view(&[1], vec![]),
            view(&[1, 2], vec![run(7, Status::Idle, &log, false)]),
            view(&[1, 2], vec![run(7, Status::Running, &log, false)]),
        ];
        for (i, b) in BATCHES.iter().enumerate() {
            log.feed(10.0 + 3.0 * i as f64, b);
            let status = if i + 1 == BATCHES.len() {
                Status::Complete
            } else {
                Status::Running
            };
            views.push(view(&[1, 2], vec![run(7, status, &log, false)]));
        }
        views.push(view(&[2], vec![run(7, Status::Complete, &log, true)]));
        views
    }

    #[test]
    fn a_run_is_told_start_rounds_evaluations_failures_and_end_each_once() {
        let views = polls();
        let mut all = Vec::new();
        for w in views.windows(2) {
            all.extend(told(&derive(Some(&w[0]), &w[1])));
        }
        let expected: Vec<(&str, &str)> = vec![
            ("client_join", r#"{"node_id":2}"#),
            ("training_start", r#"{"run_id":7,"num_rounds":3}"#),
            // Round 1's start waits for its clients to be known.
            (
                "round_start",
                r#"{"run_id":7,"round":1,"num_clients_selected":2}"#,
            ),
            (
                "evaluation_result",
                r#"{"run_id":7,"round":1,"loss":0.25,"accuracy":0.5}"#,
            ),
            (
                "round_end",
                r#"{"run_id":7,"round":1,"num_clients_responded":2,"aggregated_loss":0.25,"aggregated_accuracy":0.5,"round_duration_seconds":6.0}"#,
            ),
            (
                "round_start",
                r#"{"run_id":7,"round":2,"num_clients_selected":2}"#,
            ),
            (
                "client_failure",
                r#"{"run_id":7,"round":2,"num_failures":1}"#,
            ),
            // Round 2 evaluated nothing: no loss is carried over from round 1.
            (
                "round_end",
                r#"{"run_id":7,"round":2,"num_clients_responded":1,"round_duration_seconds":0.0}"#,
            ),
            (
                "round_start",
                r#"{"run_id":7,"round":3,"num_clients_selected":1}"#,
            ),
            (
                "evaluation_result",
                r#"{"run_id":7,"round":3,"loss":0.125}"#,
            ),
            (
                "round_end",
                r#"{"run_id":7,"round":3,"num_clients_responded":1,"aggregated_loss":0.125,"round_duration_seconds":3.0}"#,
            ),
            ("client_leave", r#"{"node_id":1}"#),
            (
                "training_end",
                r#"{"run_id":7,"total_rounds":3,"final_loss":0.125,"final_accuracy":0.5,"total_duration_seconds":9.5,"status":"completed"}"#,
            ),
        ];
        let all: Vec<(&str, &str)> = all.iter().map(|(n, d)| (*n, d.as_str())).collect();
        assert_eq!(all, expected);
        let levels: Vec<_> = views
            .windows(2)
            .flat_map(|w| derive(Some(&w[0]), &w[1]))
            .filter(|e| e.warning)
            .map(|e| e.name)
            .collect();
        assert_eq!(levels, ["client_failure"]);
        // The same view twice tells nothing.
        for v in &views {
            assert_eq!(derive(Some(v), v), []);
        }
    }

    #[test]
    fn the_first_view_is_a_baseline_and_a_skipped_poll_loses_nothing_but_order() {
        let views = polls();
        // An agent (re)started after the run: nothing of it is replayed.
        let last = views.last().unwrap();
        assert_eq!(derive(None, last), []);
        assert_eq!(derive(None, &views[4]), []);
        // Started mid-run: only what happens after its first view.
        let names: Vec<_> = derive(Some(&views[4]), &views[5])
            .iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(
            names,
            [
                "evaluation_result",
                "round_end",
                "round_start",
                "client_failure",
                "round_end",
                "round_start"
            ]
        );
        // From pending straight to settled (a run shorter than a poll): all of it, once.
        let jump = told(&derive(Some(&views[1]), last));
        let names: Vec<_> = jump.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.first(), Some(&"client_leave"));
        assert_eq!(names.iter().filter(|n| **n == "round_end").count(), 3);
        assert_eq!(names.last(), Some(&"training_end"));
    }

    #[test]
    fn unstated_values_are_absent_and_the_output_is_bounded() {
        // A run that failed before its ServerApp logged anything.
        let empty = RunLog::default();
        let before = view(&[], vec![run(9, Status::Running, &empty, false)]);
        let mut failed = run(9, Status::Failed, &empty, true);
        failed.duration = None;
        let after = view(&[], vec![failed]);
        assert_eq!(
            told(&derive(Some(&before), &after)),
            [
                ("training_start", r#"{"run_id":9}"#.to_string()),
                (
                    "training_end",
                    r#"{"run_id":9,"status":"failed"}"#.to_string()
                ),
            ]
        );
        // A non-finite number is no number (cannot be JSON either).
        assert_eq!(real(Some(f64::NAN)), None);
        // Many rounds within one poll: only the kept ones are told.
        let mut log = RunLog::default();
        let text: String = (1..=50)
            .map(|r| format!("[ROUND {r}/50]\nconfigure_train: Sampled 1 nodes (out of 1)\n"))
            .collect();
        log.feed(1.0, &text);
        let start = view(
            &[],
            vec![run(3, Status::Running, &RunLog::default(), false)],
        );
        let end = view(&[], vec![run(3, Status::Running, &log, false)]);
        let events = derive(Some(&start), &end);
        let starts = events.iter().filter(|e| e.name == "round_start").count();
        assert_eq!(starts, MAX_ROUNDS_KEPT);
        // Unknown node sets (too many online, or not read) tell no joins or leaves.
        let mut unknown = view(&[], vec![]);
        unknown.nodes_online = None;
        assert_eq!(derive(Some(&unknown), &view(&[1, 2, 3], vec![])), []);
        assert_eq!(derive(Some(&view(&[1, 2, 3], vec![])), &unknown), []);
    }

    #[test]
    fn each_event_is_one_line_with_event_role_and_data_fields() {
        use crate::otel::tests::{json_lines, lines, Buf};
        let buf = Buf::default();
        // Tracing on (spans get ids, exported nowhere).
        let provider = crate::otel::tracer_provider(
            opentelemetry_sdk::trace::SdkTracerProvider::builder(),
            crate::otel::Export::Nowhere,
        )
        .unwrap();
        let views = polls();
        let mut emitter = Emitter::new("superlink");
        tracing::subscriber::with_default(json_lines(&buf, Some(&provider)), || {
            for w in views.windows(2) {
                emitter.emit(&derive(Some(&w[0]), &w[1]), &w[1]);
            }
        });
        assert!(emitter.spans.is_empty(), "the run's span ends with it");
        let lines = lines(&buf);
        assert_eq!(lines.len(), 13, "{lines:?}");
        let end = &lines[12];
        assert_eq!(end["level"], "INFO");
        assert_eq!(end["fields"]["event"], "training_end");
        assert_eq!(end["fields"]["message"], "training_end");
        assert_eq!(end["fields"]["role"], "superlink");
        assert_eq!(end["fields"]["data"]["total_rounds"], 3, "an object: {end}");
        assert_eq!(end["span"]["flower.run_id"], 7);
        let failure = lines
            .iter()
            .find(|l| l["fields"]["event"] == "client_failure");
        assert_eq!(failure.expect("client_failure")["level"], "WARN");
        let join = &lines[0];
        assert_eq!(join["fields"]["data"]["node_id"], 2);
        assert!(
            join.get("span").is_none() && join.get("trace_id").is_none(),
            "node events are in no run's span"
        );
        // The run's events share its span's trace.
        let traces: BTreeSet<&str> = lines
            .iter()
            .filter(|l| l["fields"]["data"]["run_id"] == 7)
            .map(|l| l["trace_id"].as_str().expect("a trace id"))
            .collect();
        assert_eq!(traces.len(), 1, "{lines:?}");
    }

    #[test]
    fn gpu_events_say_what_nvidia_smi_said() {
        let found = crate::agent::gpu::GpuFound {
            count: 1,
            name: "Tesla T4".into(),
            memory_mb: None,
            driver: Some("550.54.15".into()),
        };
        assert_eq!(
            told(&[gpu(Some(&found)), gpu(None)]),
            [
                (
                    "gpu_detected",
                    r#"{"gpu_name":"Tesla T4","driver_version":"550.54.15","gpu_count":1}"#
                        .to_string()
                ),
                (
                    "gpu_unavailable",
                    r#"{"fallback_device":"cpu"}"#.to_string()
                ),
            ]
        );
        assert!(gpu(None).warning);
    }
}
