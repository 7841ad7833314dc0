//! `flower-reconcile submit`: a `flwr run` client that runs a Flower App Bundle on a managed
//! cluster, wiring the SuperLink's Control API address, the CA it published and the spec's
//! `training` section, so a user never copies addresses or certificates by hand. The
//! controller never calls it; it reads the controller's observation.
//!
//! Owns, one part per file:
//! - [`target`]: where to connect — from [`crate::reconciler::observe`]'s live state;
//! - [`run_config`]: the spec's `training` section as `--run-config`;
//! - [`project`]: the private copy of the app and the federation config `flwr` reads;
//! - [`flwr`]: the executable, its version check and its short commands;
//! - [`output`]: reading `flwr run --stream` and `flwr ls` output;
//! - [`run`]: one submission end to end;
//! - [`report`]: its outcome, as text and JSON.
//!
//! Must not: mutate OpenNebula, or decode protocol values ([`crate::protocol`] does).
//!
//! Guarantees (each stated and tested in its part): the user's app directory is never
//! modified ([`project`]); `flwr` runs without a shell in its own process group that never
//! outlives the call ([`flwr`], [`run`]); a CLI of another minor version is refused unless
//! allowed ([`flwr`]); the address dialled is one the SuperLink VM really has ([`target`]).

pub mod flwr;
pub mod output;
pub mod project;
pub mod report;
pub mod run;
pub mod run_config;
pub mod target;

use std::path::PathBuf;
use std::time::Duration;

pub use crate::protocol::version::FlowerVersion;
pub use flwr::{check_versions, find_flwr, flwr_version};
pub use output::{parse_ls_status, strip_ansi, RoundMetrics, StreamParser, METRICS_PREFIX};
pub use project::{
    declared_config_keys, flwr_home_config, with_pyproject_federation,
    without_pyproject_federations, Federation, FederationMechanism,
};
pub use report::{json_report, text_report, RunStatus, SubmitOutcome};
pub use run::{submit, OutputStream, SubmitOptions};
pub use run_config::{render_run_config, run_config_entries, select_declared};
pub use target::{discover_target, read_ca_file, target_from_live, SubmitTarget};

/// Errors of `submit`, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The target cluster's published data is unusable.
    #[error("target: {0}")]
    Target(String),
    /// The app directory is unusable.
    #[error("app {path}: {reason}")]
    App {
        /// The app directory or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A run-config entry cannot be passed to `flwr`.
    #[error("training.runConfig.{key}: {reason}")]
    RunConfig {
        /// The run-config key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// No usable `flwr` executable.
    #[error("flwr executable not found (tried: {})", tried.join(", "))]
    FlwrNotFound {
        /// Places looked at, in order.
        tried: Vec<String>,
    },
    /// `flwr --version` failed or printed no version.
    #[error("{path}: cannot determine the Flower version: {reason}")]
    FlwrVersion {
        /// The executable.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
    /// The CLI and the cluster run different minor versions.
    #[error(
        "flwr CLI {cli} and cluster Flower {cluster} differ in minor version; Flower breaks \
         across minors (use a flwr {cluster} virtualenv via --flwr or FLOWER_VENV, or pass \
         --allow-version-mismatch)"
    )]
    VersionMismatch {
        /// The CLI version.
        cli: FlowerVersion,
        /// The cluster version.
        cluster: String,
    },
    /// A local I/O step failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The run did not finish in time (it was asked to stop).
    #[error("the run did not finish within {}{}", humantime::format_duration(*after), run_id.map(|id| format!(" (run {id} was asked to stop)")).unwrap_or_default())]
    Timeout {
        /// The limit.
        after: Duration,
        /// The run, if it had started.
        run_id: Option<u64>,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SubmitError {
    let what = what.into();
    move |source| SubmitError::Io { what, source }
}
