//! One submission, end to end: the `flwr run --stream` process, its streamed output, the
//! time limit, and the outcome.
//!
//! Owns: the order of the steps (executable and version, project, run config, run, status)
//! and the run's lifetime.
//! Must not: discover the target ([`super::target`]) or print anything (lines go to the
//! caller's `on_line`; the summary is [`super::report`]'s).
//!
//! Guarantees:
//! - A run that exceeds its time limit is asked to stop (`flwr stop`) and its process group
//!   is killed; nothing outlives the call.
//!
//! Caveats:
//! - `flwr run` exits 0 even when the run fails; the outcome comes from `flwr ls --run-id`.
//! - Stock Flower reads the training settings only from `--run-config`, never from the
//!   SuperLink's environment: the SuperLink's `ONEAPP_FL_*` training variables reach a run
//!   only through the `FL_RUN_CONFIG` it publishes and this layering.
//! - Flower rejects run-config keys the app does not declare, so keys rendered from the spec
//!   that the app lacks are dropped with a warning.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use super::flwr::{
    check_versions, find_flwr, flwr_command, flwr_version, run_status, stop_run, GroupGuard,
};
use super::output::{strip_ansi, StreamParser};
use super::project::{prepare_workdir, FederationMechanism};
use super::report::{RunStatus, SubmitOutcome};
use super::run_config::{
    layered_entries, parse_run_config, render_run_config, run_config_entries, select_declared,
};
use super::{io_err, SubmitError, SubmitTarget};
use crate::api::{ConfigValue, TrainingSpec};
use indexmap::IndexMap;

/// How to run `flwr`.
#[derive(Debug, Clone)]
pub struct SubmitOptions {
    /// `--flwr PATH`; `None` looks at `$FLOWER_VENV` then `PATH`.
    pub flwr: Option<PathBuf>,
    /// Extra arguments appended to `flwr run` (after `--`).
    pub flwr_args: Vec<String>,
    /// Limit for the whole run.
    pub timeout: Duration,
    /// Run even when the CLI's minor version differs from the cluster's.
    pub allow_version_mismatch: bool,
    /// Run-config entries given on the command line: they override the published defaults
    /// and the spec's `training`, key by key.
    pub run_config: IndexMap<String, ConfigValue>,
}

impl Default for SubmitOptions {
    fn default() -> Self {
        Self {
            flwr: None,
            flwr_args: Vec::new(),
            timeout: Duration::from_secs(30 * 60),
            allow_version_mismatch: false,
            run_config: IndexMap::new(),
        }
    }
}

/// Which stream a line of `flwr` output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output (the run's logs).
    Stdout,
    /// Standard error.
    Stderr,
}

/// Submits `app_dir` to `target`, streaming each output line (ANSI-stripped) to `on_line`,
/// and returns the run's outcome and metrics. The run config layers, key by key, the
/// cluster's published defaults (`FL_RUN_CONFIG`; without them the built-in training
/// defaults), `training` (a spec's section, when given) and `opts.run_config`
/// ([`layered_entries`]).
pub async fn submit(
    target: &SubmitTarget,
    training: Option<&TrainingSpec>,
    app_dir: &Path,
    opts: &SubmitOptions,
    on_line: &mut (dyn FnMut(OutputStream, &str) + Send),
) -> Result<SubmitOutcome, SubmitError> {
    let flwr = find_flwr(
        opts.flwr.as_deref(),
        std::env::var_os("FLOWER_VENV").as_deref(),
        std::env::var_os("PATH").as_deref(),
    )?;
    let version = flwr_version(&flwr).await?;
    let mut warnings = Vec::new();
    warnings.extend(check_versions(
        version,
        &target.flower_version,
        opts.allow_version_mismatch,
    )?);
    let (work, declared) =
        prepare_workdir(target, app_dir, FederationMechanism::for_cli(&version))?;
    let published = match &target.default_run_config {
        Some(text) => Some(
            parse_run_config(text)
                .map_err(|e| SubmitError::Target(format!("published FL_RUN_CONFIG: {e}")))?,
        ),
        None => None,
    };
    let base = match (&published, training) {
        (None, None) => Some(run_config_entries(&TrainingSpec::default())),
        _ => published,
    };
    let entries = layered_entries(base.as_ref(), training, &opts.run_config);
    let (entries, dropped) = select_declared(entries, &declared);
    if !dropped.is_empty() {
        warnings.push(format!(
            "the app does not declare run-config keys {} in [tool.flwr.app.config]; they are not passed",
            dropped.join(", ")
        ));
    }
    let run_config = render_run_config(&entries)?;

    let mut cmd = flwr_command(&flwr, &work.flwr_home);
    cmd.arg("run")
        .arg(&work.app)
        .arg(&target.cluster)
        .arg("--stream");
    if !run_config.is_empty() {
        cmd.arg("--run-config").arg(&run_config);
    }
    cmd.args(&opts.flwr_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(io_err(format!("starting {}", flwr.display())))?;
    let mut guard = GroupGuard(child.id().map(|id| nix::unistd::Pid::from_raw(id as i32)));
    let mut parser = StreamParser::default();
    let streamed = tokio::time::timeout(opts.timeout, pump(&mut child, &mut parser, on_line)).await;
    guard.kill();
    let elapsed = started.elapsed();
    match streamed {
        Err(_) => {
            if let Some(id) = parser.run_id() {
                stop_run(&flwr, &work, &target.cluster, id).await;
            }
            return Err(SubmitError::Timeout {
                after: opts.timeout,
                run_id: parser.run_id(),
            });
        }
        Ok(r) => r?,
    }
    let status = match parser.run_id() {
        Some(id) => run_status(&flwr, &work, &target.cluster, id).await,
        None => RunStatus::Failed("the run did not start (see the output above)".into()),
    };
    Ok(SubmitOutcome {
        run_id: parser.run_id(),
        status,
        rounds: parser.rounds(),
        run_config,
        flwr_version: version,
        warnings,
        elapsed,
    })
}

/// Reads both output streams to their end, then reaps the child.
async fn pump(
    child: &mut tokio::process::Child,
    parser: &mut StreamParser,
    on_line: &mut (dyn FnMut(OutputStream, &str) + Send),
) -> Result<(), SubmitError> {
    let mut out = child.stdout.take().map(|s| BufReader::new(s).lines());
    let mut err = child.stderr.take().map(|s| BufReader::new(s).lines());
    while out.is_some() || err.is_some() {
        let (line, stream) = tokio::select! {
            l = next_line(&mut out) => (l, OutputStream::Stdout),
            l = next_line(&mut err) => (l, OutputStream::Stderr),
        };
        let Some(line) = line else { continue };
        let clean = strip_ansi(&line);
        parser.feed(&clean);
        on_line(stream, &clean);
    }
    child.wait().await.map_err(io_err("waiting for flwr"))?;
    Ok(())
}

/// The next line of a stream; at its end (or on a read error) the stream is set to `None`.
async fn next_line<R: tokio::io::AsyncBufRead + Unpin>(
    lines: &mut Option<tokio::io::Lines<R>>,
) -> Option<String> {
    match lines {
        None => std::future::pending().await,
        Some(l) => match l.next_line().await {
            Ok(Some(line)) => Some(line),
            Ok(None) | Err(_) => {
                *lines = None;
                None
            }
        },
    }
}
