//! `flower-reconcile submit CLUSTER APP_DIR [-- FLWR_ARGS]`: run a Flower app on a cluster
//! (library: [`crate::submit`]).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize as _;

use crate::api::{FlowerCluster, DEFAULT_FLOWER_VERSION};
use crate::submit::{
    self, OutputStream, RoundMetrics, RunStatus, SubmitOptions, SubmitOutcome, SubmitTarget,
};

/// Arguments of `submit`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Exit status: 0 when the run completed, 1 otherwise.

Examples:
  flower-reconcile submit demo ./my-app --spec clusters/demo.yaml
  flower-reconcile submit demo ./my-app --address 127.0.0.1:9093 --ca-file ca.b64
  flower-reconcile --output json submit demo ./my-app --address 10.0.0.5:9093 --insecure")]
pub struct SubmitArgs {
    /// Cluster name (`metadata.name`); also the federation name given to `flwr`.
    pub cluster: String,
    /// Flower app directory (holding `pyproject.toml`); it is copied, never modified.
    pub app_dir: PathBuf,
    /// FlowerCluster spec file holding CLUSTER: its `training` section becomes `--run-config`,
    /// its `flowerVersion` the version the CLI must match, its Control API port the default port.
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
    /// SuperLink Control API `HOST:PORT` (e.g. the local end of an SSH tunnel).
    #[arg(long, value_name = "HOST:PORT")]
    pub address: Option<String>,
    /// CA certificate of the SuperLink: PEM, or the base64 `FL_CA_CERT` value it published.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca_file: Option<PathBuf>,
    /// The cluster runs without TLS.
    #[arg(long)]
    pub insecure: bool,
    /// Flower version of the cluster (default: the spec's, else the built-in default).
    #[arg(long, value_name = "X.Y.Z")]
    pub flower_version: Option<String>,
    /// The `flwr` executable (default: `$FLOWER_VENV/bin/flwr`, else `flwr` on PATH).
    #[arg(long, value_name = "PATH")]
    pub flwr: Option<PathBuf>,
    /// Give up (and stop the run) after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Run even if the CLI's minor version differs from the cluster's (Flower usually breaks).
    #[arg(long)]
    pub allow_version_mismatch: bool,
    /// Report format, set from the global `--output`: `json` prints one JSON object on
    /// stdout and `flwr`'s output on stderr.
    #[arg(skip)]
    pub output: ReportFormat,
    /// OpenNebula connection (ONE_XMLRPC, ONEFLOW_URL, ONE_AUTH) and controller id, used to
    /// find the SuperLink unless --address and --ca-file/--insecure are given.
    #[command(flatten)]
    pub connect: super::plan::ConnectArgs,
    /// Extra arguments for `flwr run`.
    #[arg(last = true, value_name = "FLWR_ARGS")]
    pub flwr_args: Vec<String>,
}

/// Report format (the global `--output`).
pub use super::OutputFormat as ReportFormat;

/// Runs `submit`; exit code 0 when the run completed, 1 otherwise.
pub async fn run(args: SubmitArgs) -> ExitCode {
    match run_inner(&args).await {
        Ok(outcome) => {
            match args.output {
                ReportFormat::Text => print!("{}", text_report(&outcome)),
                ReportFormat::Json => println!("{}", json_report(&outcome)),
            }
            if outcome.succeeded() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: submit {}: {e:#}", args.cluster);
            ExitCode::FAILURE
        }
    }
}

async fn run_inner(args: &SubmitArgs) -> anyhow::Result<SubmitOutcome> {
    let spec = match &args.spec {
        Some(file) => Some(load_cluster(file, &args.cluster)?),
        None => None,
    };
    let target = match manual_target(args, spec.as_ref())? {
        Some(t) => t,
        None => {
            let ctx = super::plan::connect(&args.connect).await?;
            let mut t =
                submit::discover_target(&ctx, &args.cluster, args.address.as_deref()).await?;
            if let Some(v) = &args.flower_version {
                t.flower_version.clone_from(v);
            }
            t
        }
    };
    let training = spec.map(|c| c.spec.training).unwrap_or_default();
    let opts = SubmitOptions {
        flwr: args.flwr.clone(),
        flwr_args: args.flwr_args.clone(),
        timeout: args.timeout,
        allow_version_mismatch: args.allow_version_mismatch,
    };
    let json = args.output == ReportFormat::Json;
    let mut echo = |stream: OutputStream, line: &str| {
        // Best effort: a closed stdout must not abort the run.
        let _ = if stream == OutputStream::Stderr || json {
            writeln!(std::io::stderr(), "{line}")
        } else {
            writeln!(std::io::stdout(), "{line}")
        };
    };
    Ok(submit::submit(&target, &training, &args.app_dir, &opts, &mut echo).await?)
}

/// The cluster named `name` from a spec file (one or more YAML documents).
fn load_cluster(file: &Path, name: &str) -> anyhow::Result<FlowerCluster> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    let mut names = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let value = serde_norway::Value::deserialize(doc)
            .map_err(|e| anyhow::anyhow!("{} document {}: {e}", file.display(), i + 1))?;
        if value.is_null() {
            continue;
        }
        let cluster: FlowerCluster = serde_norway::from_value(value)
            .map_err(|e| anyhow::anyhow!("{} document {}: {e}", file.display(), i + 1))?;
        if cluster.metadata.name == name {
            return Ok(cluster);
        }
        names.push(cluster.metadata.name);
    }
    anyhow::bail!(
        "{} holds no cluster named {name:?} (found: {})",
        file.display(),
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )
}

/// The target from flags alone: `--address` plus `--ca-file` or `--insecure`; `None` when
/// OpenNebula must be asked (the SuperLink VM's published endpoint, CA and version).
fn manual_target(
    args: &SubmitArgs,
    spec: Option<&FlowerCluster>,
) -> anyhow::Result<Option<SubmitTarget>> {
    let (Some(address), true) = (&args.address, args.ca_file.is_some() || args.insecure) else {
        return Ok(None);
    };
    let ca_pem = match &args.ca_file {
        Some(file) => Some(read_ca(file)?),
        None => None,
    };
    let flower_version = args
        .flower_version
        .clone()
        .or_else(|| spec.map(|c| c.spec.flower_version.clone()))
        .unwrap_or_else(|| DEFAULT_FLOWER_VERSION.to_string());
    Ok(Some(SubmitTarget {
        cluster: args.cluster.clone(),
        control_address: address.clone(),
        ca_pem,
        flower_version,
    }))
}

/// A PEM file, or a file holding the base64 `FL_CA_CERT` value.
fn read_ca(file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("reading --ca-file {}: {e}", file.display()))?;
    crate::protocol::pem::certificate_from_file_text(&text).map_err(|e| {
        anyhow::anyhow!(
            "--ca-file {}: neither PEM nor base64 PEM: {e}",
            file.display()
        )
    })
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
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SubmitArgs,
    }

    fn parse(argv: &[&str]) -> SubmitArgs {
        Cli::try_parse_from(std::iter::once("submit").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn trailing_arguments_go_to_flwr() {
        let a = parse(&[
            "c1",
            "app",
            "--insecure",
            "--address",
            "h:1",
            "--",
            "--format",
            "json",
        ]);
        assert_eq!(a.flwr_args, ["--format", "json"]);
        assert_eq!(a.timeout, Duration::from_secs(1800));
        assert!(
            Cli::try_parse_from(["submit", "c1", "app", "--insecure", "--ca-file", "x"]).is_err()
        );
    }

    #[test]
    fn flags_alone_make_a_target_only_with_address_and_trust() {
        assert!(manual_target(&parse(&["c1", "app"]), None)
            .unwrap()
            .is_none());
        let a = parse(&["c1", "app", "--address", "h:1"]);
        assert!(manual_target(&a, None).unwrap().is_none());
        let a = parse(&[
            "c1",
            "app",
            "--address",
            "h:1",
            "--insecure",
            "--flower-version",
            "1.25.3",
        ]);
        let t = manual_target(&a, None).unwrap().unwrap();
        assert_eq!(
            (
                t.control_address.as_str(),
                t.ca_pem,
                t.flower_version.as_str()
            ),
            ("h:1", None, "1.25.3")
        );
    }

    #[test]
    fn ca_file_accepts_pem_or_the_published_base64() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        std::fs::write(dir.path().join("ca.pem"), pem).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(pem);
        std::fs::write(dir.path().join("ca.b64"), format!("{b64}\n")).unwrap();
        assert_eq!(read_ca(&dir.path().join("ca.pem")).unwrap(), pem);
        assert_eq!(read_ca(&dir.path().join("ca.b64")).unwrap(), pem);
        std::fs::write(dir.path().join("bad"), "nope").unwrap();
        assert!(read_ca(&dir.path().join("bad")).is_err());
    }

    #[test]
    fn spec_file_supplies_the_named_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.yaml");
        let doc = |name: &str, rounds: u32| {
            format!(
                "apiVersion: flower.opennebula.io/v1alpha1\nkind: FlowerCluster\nmetadata:\n  name: {name}\n\
                 spec:\n  flowerVersion: 1.25.0\n  opennebula:\n    templates: {{superlink: a, supernode: b}}\n    network: n\n\
                 \x20 training:\n    numRounds: {rounds}\n"
            )
        };
        std::fs::write(&file, format!("{}---\n{}", doc("a", 4), doc("b", 9))).unwrap();
        match load_cluster(&file, "b") {
            Ok(c) => assert_eq!(c.spec.training.num_rounds, 9),
            Err(e) => panic!("{e:#}"),
        }
        let err = load_cluster(&file, "z").unwrap_err().to_string();
        assert!(
            err.contains("no cluster named \"z\" (found: a, b)"),
            "{err}"
        );
    }

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
