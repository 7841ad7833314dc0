//! `flower-reconcile validate PATH...`

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;

use super::{print_json, Global, OutputFormat};
use crate::api::load_paths;

/// Arguments of `validate`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit status: 0 when every spec is valid, 1 when any is not.

Examples:
  flower-reconcile validate manifests/examples
  flower-reconcile validate cluster.yaml other.yaml
  flower-reconcile validate --output json specs/ | jq '.errors[].message'"
)]
pub struct Args {
    /// Spec files or directories.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

/// Runs `validate`.
pub fn run(g: &Global, args: Args) -> ExitCode {
    let report = load_paths(&args.paths);
    match g.output {
        OutputFormat::Json => print_json(&json!({
            "valid": report.is_valid(),
            "clusters": report.clusters.iter().map(|l| json!({
                "name": l.cluster.metadata.name,
                "source": l.source,
                "specHash": l.spec_hash,
            })).collect::<Vec<_>>(),
            "errors": report.errors,
            "warnings": report.warnings,
        })),
        OutputFormat::Text => {
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            for e in &report.errors {
                eprintln!("{e}");
            }
            for l in &report.clusters {
                println!("ok: {} ({})", l.cluster.metadata.name, l.source);
            }
            if report.is_valid() {
                println!("{} valid cluster spec(s)", report.clusters.len());
            } else {
                eprintln!(
                    "{} error(s); {} valid cluster spec(s)",
                    report.errors.len(),
                    report.clusters.len()
                );
            }
        }
    }
    if report.is_valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
