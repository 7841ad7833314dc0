//! Reading what `flwr` prints: the run id and per-round metrics from `flwr run --stream`,
//! and a run's final status from `flwr ls --format json`.
//!
//! Owns: the line grammar of Flower's output this client depends on.
//! Must not: run processes, or fail a run on output it does not understand (unknown lines
//! are ignored; an unreadable `ls` answer is [`RunStatus::Unknown`]).
//!
//! Assumptions: the app's ServerApp reports metrics either with a
//! `FLOWER_RECONCILE_METRICS {json}` line on stdout (see `e2e/apps/fedlinreg`) or through the
//! stock strategies' log lines (`[ROUND n/N]` … `Aggregated MetricRecord: {...}`), both
//! forwarded by `flwr run --stream` (`stream_parser_reads_run_id_report_and_strategy_logs`).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;

use super::report::RunStatus;

/// Prefix of the machine-readable metrics line an app's ServerApp prints.
pub const METRICS_PREFIX: &str = "FLOWER_RECONCILE_METRICS ";

/// Metrics of one round, by phase (`train` and `evaluate` aggregated client metrics).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RoundMetrics {
    /// Round number, from 1.
    pub round: u32,
    /// Aggregated ClientApp train metrics.
    #[serde(default)]
    pub train: BTreeMap<String, f64>,
    /// Aggregated ClientApp evaluate metrics.
    #[serde(default)]
    pub evaluate: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Deserialize)]
struct MetricsReport {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    rounds: Vec<RoundMetrics>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Train,
    Evaluate,
}

/// Reads `flwr run --stream` output line by line.
#[derive(Debug, Default)]
pub struct StreamParser {
    run_id: Option<u64>,
    report: Option<MetricsReport>,
    logged: BTreeMap<u32, RoundMetrics>,
    round: Option<u32>,
    phase: Option<Phase>,
}

static ANSI: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\x1b\[[0-9;?]*[ -/]*[@-~]").unwrap_or_else(|e| unreachable!("{e}"))
});
static STARTED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"Successfully started run (\d+)").unwrap_or_else(|e| unreachable!("{e}"))
});
static ROUND: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\[ROUND (\d+)(?:/\d+)?\]").unwrap_or_else(|e| unreachable!("{e}"))
});
static METRIC: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"'([^']+)':\s*'?([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)'?")
        .unwrap_or_else(|e| unreachable!("{e}"))
});

/// `line` without ANSI colour sequences (Flower colours its log lines).
pub fn strip_ansi(line: &str) -> std::borrow::Cow<'_, str> {
    ANSI.replace_all(line, "")
}

impl StreamParser {
    /// Feeds one output line (ANSI sequences are ignored).
    pub fn feed(&mut self, raw: &str) {
        let line = strip_ansi(raw);
        if let Some(rest) = line
            .find(METRICS_PREFIX)
            .map(|i| &line[i + METRICS_PREFIX.len()..])
        {
            if let Ok(report) = serde_json::from_str::<MetricsReport>(rest.trim()) {
                self.report = Some(report);
            }
            return;
        }
        if let Some(c) = STARTED.captures(&line) {
            self.run_id = c[1].parse().ok();
        } else if let Some(c) = ROUND.captures(&line) {
            self.round = c[1].parse().ok();
            self.phase = None;
        } else if line.contains("aggregate_train:") {
            self.phase = Some(Phase::Train);
        } else if line.contains("aggregate_evaluate:") {
            self.phase = Some(Phase::Evaluate);
        } else if let (Some(round), Some(phase), Some(i)) = (
            self.round,
            self.phase,
            line.find("Aggregated MetricRecord:"),
        ) {
            let entry = self.logged.entry(round).or_insert_with(|| RoundMetrics {
                round,
                ..RoundMetrics::default()
            });
            let map = match phase {
                Phase::Train => &mut entry.train,
                Phase::Evaluate => &mut entry.evaluate,
            };
            for c in METRIC.captures_iter(&line[i..]) {
                if let Ok(v) = c[2].parse::<f64>() {
                    map.insert(c[1].to_string(), v);
                }
            }
            self.phase = None;
        }
    }

    /// The run id `flwr run` printed.
    pub fn run_id(&self) -> Option<u64> {
        self.run_id
    }

    /// Per-round metrics: the app's report if it printed one, else the strategy's log lines.
    pub fn rounds(&self) -> Vec<RoundMetrics> {
        match &self.report {
            Some(r) => r.rounds.clone(),
            None => self.logged.values().cloned().collect(),
        }
    }

    /// The status the app reported in its metrics line.
    pub fn app_status(&self) -> Option<&str> {
        self.report.as_ref().and_then(|r| r.status.as_deref())
    }
}

/// The status of the first run in `flwr ls --format json` output.
pub fn parse_ls_status(json: &str) -> RunStatus {
    #[derive(Deserialize)]
    struct Ls {
        #[serde(default)]
        runs: Vec<LsRun>,
    }
    #[derive(Deserialize)]
    struct LsRun {
        status: String,
    }
    match serde_json::from_str::<Ls>(json.trim()) {
        Ok(ls) => match ls.runs.first() {
            Some(r) if r.status == "finished:completed" => RunStatus::Completed,
            Some(r) => RunStatus::Failed(r.status.clone()),
            None => RunStatus::Unknown("flwr ls listed no run".into()),
        },
        Err(e) => RunStatus::Unknown(format!("unreadable flwr ls output: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_parser_reads_run_id_report_and_strategy_logs() {
        let lines = [
            "\u{1b}[92m🎊 Successfully started run 4297816583992648364\u{1b}[0m",
            "\u{1b}[92mINFO \u{1b}[0m:      [ROUND 1/2]",
            "INFO :      aggregate_train: Received 2 results and 0 failures",
            "INFO :      \t└──> Aggregated MetricRecord: {'train_loss': 1.28, 'acc': 5}",
            "INFO :      aggregate_evaluate: Received 2 results and 0 failures",
            "INFO :      \t└──> Aggregated MetricRecord: {'eval_loss': 0.23}",
            "INFO :      [ROUND 2/2]",
            "INFO :      aggregate_evaluate: Received 2 results and 0 failures",
            "INFO :      \t└──> Aggregated MetricRecord: {'eval_loss': 2.8e-02}",
        ];
        let mut p = StreamParser::default();
        for l in lines {
            p.feed(l);
        }
        assert_eq!(p.run_id(), Some(4297816583992648364));
        let rounds = p.rounds();
        assert_eq!(rounds.len(), 2);
        assert_eq!(rounds[0].train["train_loss"], 1.28);
        assert_eq!(rounds[0].train["acc"], 5.0);
        assert_eq!(rounds[1].evaluate["eval_loss"], 0.028);
        assert_eq!(p.app_status(), None);

        // The app's report wins over log scraping.
        p.feed(r#"FLOWER_RECONCILE_METRICS {"status":"completed","rounds":[{"round":1,"train":{"train_loss":2.0},"evaluate":{"eval_loss":1.0}}]}"#);
        assert_eq!(p.app_status(), Some("completed"));
        assert_eq!(p.rounds().len(), 1);
        assert_eq!(p.rounds()[0].evaluate["eval_loss"], 1.0);
    }

    #[test]
    fn ls_status_is_parsed() {
        let ok = r#"{"success": true, "runs": [{"run-id": "1", "status": "finished:completed"}]}"#;
        assert_eq!(parse_ls_status(ok), RunStatus::Completed);
        let failed = r#"{"runs": [{"status": "finished:failed"}]}"#;
        assert_eq!(
            parse_ls_status(failed),
            RunStatus::Failed("finished:failed".into())
        );
        assert!(matches!(
            parse_ls_status("{\"runs\": []}"),
            RunStatus::Unknown(_)
        ));
        assert!(matches!(parse_ls_status("oops"), RunStatus::Unknown(_)));
    }
}
