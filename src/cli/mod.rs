//! The `flower-reconcile` command line: argument parsing (clap) and human or JSON
//! reports. This is the only place typed library errors become readable reports.
//!
//! Adding a subcommand: put it in `src/cli/<name>.rs` with an `Args` struct and a `run`
//! function returning an `ExitCode` (`fn run(&Global, Args)`, or `async fn run(Args)` for
//! commands that talk to OpenNebula, whose `output` field [`dispatch`] fills from
//! [`Global`]), add a variant to [`Command`] and one arm to [`dispatch`]. Library work
//! belongs in the library (e.g. `run` is [`crate::service`]); global options live in
//! [`Global`] only.

mod completions;
mod explain;
mod render;
mod schema;
mod templates;
mod validate;

pub mod apply;
#[cfg(feature = "demo")]
pub mod demo;
pub mod plan;
pub mod run;
mod sites;
pub mod status;
pub mod submit;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON document on stdout.
    Json,
}

/// Options every subcommand accepts.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Log level (error, warn, info, debug, trace) or a tracing filter directive.
    #[arg(
        long,
        global = true,
        env = "FLOWER_RECONCILE_LOG",
        default_value = "warn"
    )]
    pub log_level: String,
}

/// GitOps for Flower federated-learning clusters on OpenNebula.
#[derive(Debug, Parser)]
#[command(name = "flower-reconcile", version, about, propagate_version = true)]
#[command(after_help = "Examples:
  flower-reconcile validate manifests/examples
  flower-reconcile render manifests/examples/basic.yaml --one-version 6 --template-id superlink=3 --template-id supernode=4 --network-id 0
  flower-reconcile explain spec.supernodes.gpu")]
pub struct Cli {
    /// Global options.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check FlowerCluster specs: files or directories (searched for *.yaml / *.yml).
    Validate(validate::Args),
    /// Write (or check) the JSON Schema and the Kubernetes CRD under crds/.
    Schema(schema::Args),
    /// Render a spec into a OneFlow service template and the ONEAPP_* context.
    Render(render::Args),
    /// Write (or check) the Sunstone-ready templates under manifests/templates/.
    Templates(templates::Args),
    /// Describe a FlowerCluster field: type, default, description, child fields.
    Explain(explain::Args),
    /// Print a shell completion script.
    Completions(completions::Args),
    /// Show what a reconcile would change (exit codes with --detailed-exitcode: 0 no
    /// changes, 1 error, 2 changes).
    Plan(plan::PlanArgs),
    /// Reconcile once (or apply exactly a saved plan).
    Apply(apply::ApplyArgs),
    /// Run a Flower app on a cluster with `flwr run`, wiring address, CA and run config.
    Submit(submit::SubmitArgs),
    /// Everything on this machine: onesim + real Flower, plan, apply, one training run.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Run the appliance agent (`flower-agent`) from this binary; used by `demo`.
    #[command(
        hide = true,
        after_help = "Examples:\n  flower-reconcile agent status --output json"
    )]
    Agent(AgentArgs),
    /// Run the controller: watch the specs and keep OpenNebula matching them.
    Run(Box<run::RunArgs>),
    /// Show cluster status from a running controller (or computed with --direct).
    Status(status::StatusArgs),
}

/// Arguments of the hidden `agent` subcommand: passed to `flower-agent` unchanged.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// flower-agent's own arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<std::ffi::OsString>,
}

/// Runs one parsed command line.
pub fn dispatch(cli: Cli) -> ExitCode {
    let g = &cli.global;
    match cli.command {
        Command::Validate(a) => validate::run(g, a),
        Command::Schema(a) => schema::run(g, a),
        Command::Render(a) => render::run(g, a),
        Command::Templates(a) => templates::run(g, a),
        Command::Explain(a) => explain::run(g, a),
        Command::Completions(a) => completions::run(g, a),
        Command::Plan(mut a) => {
            a.output = g.output;
            block_on_traced(g, "plan", plan::run(a))
        }
        Command::Apply(a) => block_on_traced(g, "apply", apply::run(a)),
        Command::Submit(mut a) => {
            a.output = g.output;
            block_on_traced(g, "submit", submit::run(a))
        }
        #[cfg(feature = "demo")]
        Command::Demo(a) => block_on_traced(g, "demo", demo::run(a)),
        Command::Agent(a) => crate::agent::cli::main_from(
            std::iter::once(std::ffi::OsString::from("flower-agent")).chain(a.args),
        ),
        Command::Run(a) => run::run(g, *a),
        Command::Status(mut a) => {
            a.output = g.output;
            block_on_traced(g, "status", status::run(a))
        }
    }
}

/// Runs an async command on a multi-threaded runtime.
fn block_on(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r.block_on(f),
        Err(e) => fail(format!("cannot start the async runtime: {e}")),
    }
}

/// Runs a one-shot command like [`block_on`], with logging (`--log-level`) and tracing
/// from the `OTEL_*` variables ([`crate::telemetry`]), inside the command's root span;
/// pending spans are flushed before it returns.
fn block_on_traced(
    g: &Global,
    command: &'static str,
    f: impl std::future::Future<Output = ExitCode>,
) -> ExitCode {
    use crate::telemetry::{command_span, init, LogFormat, Traces};
    use tracing::Instrument as _;
    block_on(async move {
        let telemetry = match init(
            "flower-reconcile",
            LogFormat::Text,
            &g.log_level,
            Traces::WhenExported,
        ) {
            Ok(t) => t,
            Err(e) => return fail(format!("telemetry: {e:#}")),
        };
        let span = command_span(command);
        let code = f.instrument(span).await;
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        code
    })
}

/// Entry point of the `flower-reconcile` binary.
pub fn main() -> ExitCode {
    dispatch(Cli::parse())
}

/// Prints an error report on stderr and returns the failure exit code (2: usage or
/// environment problem, as opposed to 1: invalid input).
pub(crate) fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

/// Writes generated files (creating their directories), or with `check` only compares
/// them with the files on disk: exit 1 naming each stale one and `refresh`, the command
/// that rewrites them. `what` names the set in the up-to-date message.
pub(crate) fn write_or_check(
    files: impl IntoIterator<Item = (std::path::PathBuf, String)>,
    check: bool,
    what: &str,
    refresh: &str,
) -> ExitCode {
    let mut stale = Vec::new();
    for (path, content) in files {
        if check {
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
        if check {
            println!("{what} are up to date");
        }
        ExitCode::SUCCESS
    } else {
        for s in &stale {
            eprintln!("{s}: out of date; run `{refresh}`");
        }
        ExitCode::FAILURE
    }
}

/// Prints `value` as pretty JSON on stdout.
pub(crate) fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_has_examples_in_its_help() {
        for sub in Cli::command().get_subcommands() {
            let after = sub
                .get_after_help()
                .map(|s| s.to_string())
                .unwrap_or_default();
            assert!(
                after.contains("Examples:"),
                "`{}` --help has no examples",
                sub.get_name()
            );
        }
    }
}
