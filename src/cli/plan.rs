//! `flower-reconcile plan`: what a reconcile would do, Terraform-style.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::plan::{
    plan, render_json, render_text, DesiredState, LiveState, Plan, PrunePolicy, TextOptions,
};
use crate::reconciler::desired::snapshot_prune_gate;
use crate::reconciler::{desired_from_snapshot, observe, prepare, Context};
use crate::source::{default_cache_base, Snapshot, SourceArgs};

/// Output format of `plan` (the global `--output`; JSON is the document in docs/plan-json.md).
pub use super::OutputFormat;

/// OpenNebula connection and controller identity shared by `plan` and `apply`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Id written into (and required in) the ownership marker of every managed service.
    /// Two controllers with different ids never touch each other's services.
    #[arg(
        long,
        env = "FLOWER_RECONCILE_CONTROLLER_ID",
        default_value = crate::service::config::DEFAULT_CONTROLLER_ID
    )]
    pub controller_id: String,
    /// Which OpenNebula owner is trusted, and where names resolve.
    #[command(flatten)]
    pub ownership: crate::reconciler::OwnershipOptions,
}

/// The mass-delete guard of `plan` and `apply` ([`crate::plan::prune`]).
#[derive(Debug, Clone, clap::Args)]
pub struct PruneArgs {
    /// Let this one command delete clusters even when their specs removed are more than
    /// `--max-delete-share` of the managed clusters, or all of them.
    #[arg(long)]
    pub allow_mass_delete: bool,
    /// Largest share (0 to 1) of the managed clusters one change may remove before
    /// deletions are blocked; removing all of them is always blocked.
    #[arg(long, value_name = "SHARE", default_value_t = crate::plan::prune::DEFAULT_MAX_DELETE_SHARE, value_parser = crate::plan::prune::parse_share)]
    pub max_delete_share: f64,
}

impl PruneArgs {
    /// The policy these flags select.
    pub fn policy(&self) -> PrunePolicy {
        PrunePolicy {
            max_share: self.max_delete_share,
            allow_all: self.allow_mass_delete,
        }
    }
}

/// `flower-reconcile plan`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  flower-reconcile plan --specs manifests/examples
  flower-reconcile plan --output json --detailed-exitcode --specs specs/")]
pub struct PlanArgs {
    /// Where the specs come from.
    #[command(flatten)]
    pub source: SourceArgs,
    /// OpenNebula connection (ONE_XMLRPC, ONEFLOW_URL, ONE_AUTH) and controller id.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Mass-delete guard.
    #[command(flatten)]
    pub prune: PruneArgs,
    /// Output format: set from the global `--output`.
    #[arg(skip)]
    pub output: OutputFormat,
    /// Exit 0 with no changes, 1 on error, 2 when there are changes (deferred ones too:
    /// OpenNebula does not match the specs yet).
    #[arg(long)]
    pub detailed_exitcode: bool,
    /// Save the plan to FILE for `flower-reconcile apply FILE`.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// `run`'s TOML configuration: its `[sites.NAME]` tables are planned too, each site's
    /// parts after the home site's plan (text output).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// A saved plan: the actions plus what they were computed from. Holds no secrets: spec
/// contents are re-read from the source at apply time and must hash the same, and the
/// bodies the actions carry are saved as their ids and digests only
/// ([`crate::plan::ServiceBody`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanFile {
    /// `1`.
    pub format: u32,
    /// Controller id the plan was made for.
    pub controller_id: String,
    /// Spec hash per desired cluster.
    pub spec_hashes: BTreeMap<String, String>,
    /// Clusters held (invalid files) when planning.
    pub held: Vec<String>,
    /// The plan (its `observation_digest` is checked before applying).
    pub plan: Plan,
}

impl PlanFile {
    /// Current format.
    pub const FORMAT: u32 = 1;

    /// Record `plan` with what it was computed from.
    pub fn new(controller_id: &str, desired: &DesiredState, plan: Plan) -> Self {
        Self {
            format: Self::FORMAT,
            controller_id: controller_id.to_string(),
            spec_hashes: desired
                .clusters
                .iter()
                .map(|(n, d)| (n.clone(), d.spec_hash.clone()))
                .collect(),
            held: desired.held.iter().cloned().collect(),
            plan,
        }
    }

    /// Read a saved plan.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parse the text of a saved plan read from `path` (named in every error). serde_json
    /// bounds nesting (128 levels); `fuzzing::plan_file` feeds it arbitrary bytes.
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        let f: Self = serde_json::from_str(text).with_context(|| {
            format!(
                "{}: not a plan file written by `flower-reconcile plan --out`",
                path.display()
            )
        })?;
        anyhow::ensure!(
            f.format == Self::FORMAT,
            "{}: plan file format {} is not supported (expected {})",
            path.display(),
            f.format,
            Self::FORMAT
        );
        Ok(f)
    }

    /// Why this plan may not be applied to `desired`/`live` (`None`: it may).
    pub fn staleness(
        &self,
        controller_id: &str,
        desired: &DesiredState,
        live: &LiveState,
    ) -> Option<String> {
        if self.controller_id != controller_id {
            return Some(format!(
                "the plan was made for controller id {:?}, not {controller_id:?}",
                self.controller_id
            ));
        }
        let now: BTreeMap<String, String> = desired
            .clusters
            .iter()
            .map(|(n, d)| (n.clone(), d.spec_hash.clone()))
            .collect();
        if now != self.spec_hashes {
            return Some("the specs changed since the plan was made".into());
        }
        if live.digest != self.plan.observation_digest {
            return Some("the live state changed since the plan was made".into());
        }
        None
    }
}

/// Load the desired state once, printing per-file errors to stderr. Returns the snapshot
/// too, for [`guard_prune`].
pub(crate) async fn load_desired(source: &SourceArgs) -> anyhow::Result<(DesiredState, Snapshot)> {
    let src = source.build(&default_cache_base())?;
    let snapshot = src.load_once().await?;
    crate::telemetry::record_revision(&snapshot.revision);
    for e in &snapshot.errors {
        eprintln!("error: {e}");
    }
    for (name, file) in &snapshot.held {
        eprintln!(
            "note: cluster {name} is left untouched while {} fails to load",
            file.display()
        );
    }
    Ok((desired_from_snapshot(&snapshot), snapshot))
}

/// Set `desired`'s prune gate from the snapshot and the observation (mass-delete guard).
pub(crate) fn guard_prune(
    desired: &mut DesiredState,
    snapshot: &Snapshot,
    live: &LiveState,
    prune: &PruneArgs,
) {
    desired.prune = snapshot_prune_gate(snapshot, live, &prune.policy(), false);
}

/// Connect to OpenNebula from the environment (ONE_XMLRPC, ONEFLOW_URL, ONE_AUTH).
pub(crate) async fn connect(args: &ConnectArgs) -> anyhow::Result<Context> {
    crate::reconciler::context::context_from_env(&args.controller_id, None, args.ownership).await
}

/// Whether stdout gets colours.
pub(crate) fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Run `plan`.
pub async fn run(args: PlanArgs) -> ExitCode {
    match plan_command(&args).await {
        Ok(changes) if changes && args.detailed_exitcode => ExitCode::from(2),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn plan_command(args: &PlanArgs) -> anyhow::Result<bool> {
    let (mut desired, snapshot) = load_desired(&args.source).await?;
    let ctx = connect(&args.connect).await?;
    let live = observe(&ctx, Utc::now())
        .await
        .context("observing OpenNebula")?;
    guard_prune(&mut desired, &snapshot, &live, &args.prune);
    anyhow::ensure!(
        args.config.is_none() || (args.output == OutputFormat::Text && args.out.is_none()),
        "plan --config: the sites' plans are shown as text only, and are not saved (--out)"
    );
    let sites = super::sites::load(
        args.config.as_deref(),
        &args.connect,
        None,
        &mut desired,
        &live,
    )
    .await?;
    for w in &live.warnings {
        eprintln!(
            "warning: {}{}: {}",
            w.cluster.as_deref().unwrap_or("-"),
            w.vm_id.map(|v| format!(" VM {v}")).unwrap_or_default(),
            w.message
        );
    }
    let mut p = plan(&desired, &live, Utc::now());
    prepare(&ctx, &desired, &mut p).await?;
    match args.output {
        OutputFormat::Text => print!("{}", render_text(&p, TextOptions { color: colour() })),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&render_json(&p))?),
    }
    if let Some(out) = &args.out {
        let file = PlanFile::new(&ctx.controller_id, &desired, p.clone());
        std::fs::write(out, serde_json::to_vec_pretty(&file)?)
            .with_context(|| format!("writing {}", out.display()))?;
        if args.output == OutputFormat::Text {
            println!(
                "\nSaved the plan to {}. Apply exactly it with:\n  flower-reconcile apply {}",
                out.display(),
                out.display()
            );
        }
    } else if args.output == OutputFormat::Text && p.has_changes() {
        println!("\nNote: without --out, `apply` plans again and may do something else if OpenNebula changed.");
    }
    let mut changes = p.has_pending_changes();
    for site in super::sites::plan_sites(&sites, &snapshot, &live, &args.prune).await? {
        super::sites::print(&site);
        changes |= site
            .plan
            .as_ref()
            .is_ok_and(|(_, _, p)| p.has_pending_changes());
    }
    Ok(changes)
}
