//! `flower-reconcile schema [--check]`

use std::path::PathBuf;
use std::process::ExitCode;

use super::{write_or_check, Global};
use crate::api::generated_files;

/// Arguments of `schema`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Writes crds/flowercluster.schema.json (JSON Schema, for editors and CI),
crds/flowercluster.yaml (Kubernetes CustomResourceDefinition) and
docs/flowercluster-reference.md, all generated from the Rust types.

Examples:
  flower-reconcile schema                 # regenerate in the current repository
  flower-reconcile schema --check         # exit 1 when a checked-in file is stale
  flower-reconcile schema --dir /tmp/out"
)]
pub struct Args {
    /// Only compare the files on disk with the generated ones.
    #[arg(long)]
    pub check: bool,
    /// Repository root the paths are relative to.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

/// Runs `schema`.
pub fn run(_g: &Global, args: Args) -> ExitCode {
    let files = generated_files()
        .into_iter()
        .map(|(rel, content)| (args.dir.join(rel), content));
    write_or_check(files, args.check, "schema files", "flower-reconcile schema")
}
