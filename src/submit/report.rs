//! What a submission produced, and its summary for people (text) and machines (JSON).
//!
//! Owns: [`SubmitOutcome`], [`RunStatus`] and both renderings `submit` prints.
//! Must not: run anything or read output (the outcome is built by [`super::run`]).

use std::fmt::Write as _;
use std::time::Duration;

use super::output::RoundMetrics;
use super::FlowerVersion;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunStatus {
    /// `finished:completed`.
    Completed,
    /// Any other final status (`finished:failed`, `finished:stopped`), as reported.
    Failed(String),
    /// The status could not be read; the reason.
    Unknown(String),
}

/// What a submitted run produced.
#[derive(Debug, Clone)]
pub struct SubmitOutcome {
    /// The run id, when the run started.
    pub run_id: Option<u64>,
    /// The SuperLink's verdict.
    pub status: RunStatus,
    /// Per-round metrics.
    pub rounds: Vec<RoundMetrics>,
    /// The `--run-config` passed.
    pub run_config: String,
    /// The CLI version used.
    pub flwr_version: FlowerVersion,
    /// Things the user should know (dropped run-config keys, version notes).
    pub warnings: Vec<String>,
    /// Wall time of `flwr run`.
    pub elapsed: Duration,
}

impl SubmitOutcome {
    /// True when the run completed.
    pub fn succeeded(&self) -> bool {
        self.status == RunStatus::Completed
    }

    /// `(round, value)` of an evaluate metric (or, failing that, a train metric) named `key`.
    pub fn series(&self, key: &str) -> Vec<(u32, f64)> {
        self.rounds
            .iter()
            .filter_map(|r| {
                r.evaluate
                    .get(key)
                    .or_else(|| r.train.get(key))
                    .map(|v| (r.round, *v))
            })
            .collect()
    }
}

fn status_text(status: &RunStatus) -> String {
    match status {
        RunStatus::Completed => "completed".into(),
        RunStatus::Failed(s) => format!("failed ({s})"),
        RunStatus::Unknown(s) => format!("unknown ({s})"),
    }
}

/// Metric columns: `train.<key>` then `evaluate.<key>`, each sorted.
fn columns(rounds: &[RoundMetrics]) -> Vec<(bool, String)> {
    let mut train = std::collections::BTreeSet::new();
    let mut eval = std::collections::BTreeSet::new();
    for r in rounds {
        train.extend(r.train.keys().cloned());
        eval.extend(r.evaluate.keys().cloned());
    }
    let train = train.into_iter().map(|k| (true, k));
    train.chain(eval.into_iter().map(|k| (false, k))).collect()
}

/// The human summary printed after the run's output.
pub fn text_report(o: &SubmitOutcome) -> String {
    let mut s = String::new();
    let run = o
        .run_id
        .map(|id| format!("run {id}"))
        .unwrap_or_else(|| "run".into());
    let _ = writeln!(
        s,
        "\n{run}: {} after {:.1}s (flwr {})",
        status_text(&o.status),
        o.elapsed.as_secs_f64(),
        o.flwr_version
    );
    for w in &o.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    let cols = columns(&o.rounds);
    if cols.is_empty() {
        let _ = writeln!(s, "no per-round metrics were reported");
        return s;
    }
    let header: Vec<String> = cols
        .iter()
        .map(|(train, k)| format!("{}.{k}", if *train { "train" } else { "evaluate" }))
        .collect();
    let _ = write!(s, "{:>5}", "round");
    for h in &header {
        let _ = write!(s, "  {h:>w$}", w = h.len().max(12));
    }
    s.push('\n');
    for r in &o.rounds {
        let _ = write!(s, "{:>5}", r.round);
        for ((train, k), h) in cols.iter().zip(&header) {
            let map = if *train { &r.train } else { &r.evaluate };
            let v = map
                .get(k)
                .map(|v| format!("{v:.6}"))
                .unwrap_or_else(|| "-".into());
            let _ = write!(s, "  {v:>w$}", w = h.len().max(12));
        }
        s.push('\n');
    }
    s
}

/// The machine-readable summary (`--output json`).
pub fn json_report(o: &SubmitOutcome) -> serde_json::Value {
    let (status, detail) = match &o.status {
        RunStatus::Completed => ("completed", None),
        RunStatus::Failed(d) => ("failed", Some(d.as_str())),
        RunStatus::Unknown(d) => ("unknown", Some(d.as_str())),
    };
    serde_json::json!({
        "runId": o.run_id.map(|id| id.to_string()),
        "status": status,
        "statusDetail": detail,
        "elapsedSeconds": o.elapsed.as_secs_f64(),
        "flwrVersion": o.flwr_version.to_string(),
        "runConfig": o.run_config,
        "warnings": o.warnings,
        "rounds": o.rounds.iter().map(|r| serde_json::json!({
            "round": r.round, "train": r.train, "evaluate": r.evaluate,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_show_every_round_and_metric() {
        let rounds = vec![
            RoundMetrics {
                round: 1,
                train: [("train_loss".to_string(), 1.5)].into(),
                evaluate: [("eval_loss".to_string(), 0.25)].into(),
            },
            RoundMetrics {
                round: 2,
                train: Default::default(),
                evaluate: [("eval_loss".to_string(), 0.125)].into(),
            },
        ];
        let o = SubmitOutcome {
            run_id: Some(7),
            status: RunStatus::Completed,
            rounds,
            run_config: "num-server-rounds=2".into(),
            flwr_version: crate::submit::FlowerVersion::find_in("1.25.0").unwrap(),
            warnings: vec!["w".into()],
            elapsed: Duration::from_millis(1500),
        };
        let text = text_report(&o);
        assert!(
            text.contains("run 7: completed after 1.5s (flwr 1.25.0)"),
            "{text}"
        );
        assert!(text.contains("warning: w"));
        assert!(
            text.contains("round  train.train_loss  evaluate.eval_loss"),
            "{text}"
        );
        assert!(
            text.contains("    2                 -            0.125000"),
            "{text}"
        );
        let json = json_report(&o);
        assert_eq!(json["runId"], "7");
        assert_eq!(json["rounds"][1]["evaluate"]["eval_loss"], 0.125);
        assert_eq!(json["status"], "completed");
    }
}
