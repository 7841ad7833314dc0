//! `flower-reconcile explain FIELD.PATH`

use std::process::ExitCode;

use super::{print_json, Global, OutputFormat};
use crate::api::explain::explain;

/// Arguments of `explain`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  flower-reconcile explain spec
  flower-reconcile explain spec.supernodes.gpu
  flower-reconcile explain spec.tls.provided.key --output json")]
pub struct Args {
    /// Field path, e.g. `spec.supernodes.elasticity.policies` (empty: the whole resource).
    #[arg(default_value = "")]
    pub field: String,
}

/// Runs `explain`.
pub fn run(g: &Global, args: Args) -> ExitCode {
    match explain(&args.field) {
        Ok(doc) => {
            match g.output {
                OutputFormat::Json => print_json(&serde_json::to_value(&doc).unwrap_or_default()),
                OutputFormat::Text => print!("{}", doc.to_text()),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
