//! `flower-reconcile submit CLUSTER APP_DIR [-- FLWR_ARGS]`: run a Flower app on a cluster
//! (library: [`crate::submit`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::api::{ConfigValue, FlowerCluster, DEFAULT_FLOWER_VERSION};
use crate::protocol::endpoint::HostPort;
use crate::submit::{
    self, json_report, text_report, OutputStream, SubmitOptions, SubmitOutcome, SubmitTarget,
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
    #[arg(long, value_name = "HOST:PORT", value_parser = crate::protocol::endpoint::parse)]
    pub address: Option<HostPort>,
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
    /// A run-config entry `KEY=VALUE` (TOML value, e.g. `num-server-rounds=5`,
    /// `strategy='"FedProx"'`); repeatable. Overrides the cluster's published defaults
    /// (`FL_RUN_CONFIG`) and the spec's `training` section, key by key.
    #[arg(long = "run-config", value_name = "KEY=VALUE", value_parser = parse_entry)]
    pub run_config: Vec<(String, ConfigValue)>,
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
            let mut t = submit::discover_target(&ctx, &args.cluster, args.address.as_ref()).await?;
            if let Some(v) = &args.flower_version {
                t.flower_version.clone_from(v);
            }
            t
        }
    };
    let training = spec.map(|c| c.spec.training);
    let opts = SubmitOptions {
        run_config: args.run_config.iter().cloned().collect(),
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
    Ok(submit::submit(&target, training.as_ref(), &args.app_dir, &opts, &mut echo).await?)
}

/// One `--run-config KEY=VALUE` entry, read with the run-config codec.
fn parse_entry(s: &str) -> Result<(String, ConfigValue), String> {
    let mut entries = submit::run_config::parse_run_config(s)?;
    match (entries.len(), entries.pop()) {
        (1, Some(entry)) => Ok(entry),
        _ => Err("give one KEY=VALUE per --run-config".into()),
    }
}

/// The cluster named `name` from a spec file, loaded and validated as `validate` and `plan`
/// load it ([`crate::api::load::load_file`]: size cap, every error located).
fn load_cluster(file: &Path, name: &str) -> anyhow::Result<FlowerCluster> {
    let outcome = crate::api::load::load_file(file);
    let mut names = Vec::new();
    for loaded in outcome.loaded {
        if loaded.cluster.metadata.name == name {
            return Ok(loaded.cluster);
        }
        names.push(loaded.cluster.metadata.name);
    }
    if !outcome.errors.is_empty() {
        let errors: Vec<String> = outcome.errors.iter().map(ToString::to_string).collect();
        anyhow::bail!("--spec {}:\n{}", file.display(), errors.join("\n"));
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
/// OpenNebula must be asked (the controller's observation of the SuperLink).
fn manual_target(
    args: &SubmitArgs,
    spec: Option<&FlowerCluster>,
) -> anyhow::Result<Option<SubmitTarget>> {
    let (Some(address), true) = (&args.address, args.ca_file.is_some() || args.insecure) else {
        return Ok(None);
    };
    let ca_pem = match &args.ca_file {
        Some(file) => Some(submit::read_ca_file(file)?),
        None => None,
    };
    let flower_version = args
        .flower_version
        .clone()
        .or_else(|| spec.map(|c| c.spec.flower_version.clone()))
        .unwrap_or_else(|| DEFAULT_FLOWER_VERSION.to_string());
    Ok(Some(SubmitTarget {
        cluster: args.cluster.clone(),
        control_address: address.to_string(),
        ca_pem,
        flower_version,
        // Flags alone: the published defaults are unknown (no observation).
        default_run_config: None,
    }))
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
}
