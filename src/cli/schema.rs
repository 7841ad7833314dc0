//! `flower-reconcile schema [--check]`

use std::path::PathBuf;
use std::process::ExitCode;

use super::{fail, Global};
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
    let mut stale = Vec::new();
    for (rel, content) in generated_files() {
        let path = args.dir.join(rel);
        if args.check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(content.as_str()) {
                stale.push(path.display().to_string());
            }
            continue;
        }
        if let Some(parent) = path.parent() {
            if let Err(e) = std::fs::create_dir_all(parent) {
                return fail(format!("cannot create {}: {e}", parent.display()));
            }
        }
        if let Err(e) = std::fs::write(&path, content) {
            return fail(format!("cannot write {}: {e}", path.display()));
        }
        println!("wrote {}", path.display());
    }
    if stale.is_empty() {
        if args.check {
            println!("schema files are up to date");
        }
        ExitCode::SUCCESS
    } else {
        for s in &stale {
            eprintln!("{s}: out of date; run `flower-reconcile schema`");
        }
        ExitCode::FAILURE
    }
}
