//! `flower-reconcile templates [--out DIR] [--check]`

use std::path::PathBuf;
use std::process::ExitCode;

use super::{fail, write_or_check, Global};
use crate::render::sunstone;

/// Arguments of `templates`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Writes the Sunstone-ready templates for clusters without a controller: the
OneFlow service template in both dialects (flower-cluster.v6.json, flower-cluster.v7.json)
and one VM template per role (flower-superlink.tmpl, flower-supernode.tmpl), with user
inputs for every ONEAPP_* variable the agent honours. Import them with
`onetemplate create` and `oneflow-template create` (README: Without the controller).

Examples:
  flower-reconcile templates                       # refresh manifests/templates/
  flower-reconcile templates --check               # exit 1 when a checked-in file is stale
  flower-reconcile templates --out /tmp/templates"
)]
pub struct Args {
    /// Directory to write to.
    #[arg(long, default_value = "manifests/templates")]
    pub out: PathBuf,
    /// Only compare the files on disk with the generated ones.
    #[arg(long)]
    pub check: bool,
}

/// Runs `templates`.
pub fn run(_g: &Global, args: Args) -> ExitCode {
    let files = match sunstone::files() {
        Ok(f) => f,
        Err(e) => return fail(format!("cannot generate the templates: {e}")),
    };
    let files = files
        .into_iter()
        .map(|(name, content)| (args.out.join(name), content));
    write_or_check(files, args.check, "templates", "flower-reconcile templates")
}
