//! `flower-reconcile apply`: one reconcile pass (or exactly a saved plan), with
//! confirmation and an optional `--wait` that follows the clusters to Ready.
//!
//! Guarantees: a saved plan is never trusted. Its specs and observation digest must
//! match (`PlanFile::staleness`), and its changes must equal, action for action, the
//! changes the planner computes from the current specs and a fresh observation
//! ([`unplanned`]); otherwise nothing is executed. So a plan file cannot name a service or
//! VM that is not a current node of an owned service of that cluster, nor an action the
//! planner would not take (`tests/safety_ownership.rs`,
//! `a_tampered_saved_plan_is_refused_before_any_call`).
//!
//! When controllers elect a leader (a lease document exists for the controller id),
//! `apply` takes the lease for its run, fenced like the leader, and gives it back after;
//! it refuses while a live instance holds it, unless `--force` (warned)
//! (`tests/leader_election.rs`, `apply_refuses_while_a_leader_holds_the_lease`).

use std::collections::BTreeSet;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use chrono::Utc;

use super::plan::{colour, guard_prune, load_desired, ConnectArgs, PlanFile, PruneArgs};
use crate::plan::{
    plan, render_text, Action, ActionKind, DesiredState, Plan, RedeployStep, TextOptions,
};
use crate::reconciler::converge::{converge, ConvergeOptions, Hooks, Pass};
use crate::reconciler::{observe, prepare, Applier, Context};
use crate::source::SourceArgs;

/// `flower-reconcile apply`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  flower-reconcile apply --specs manifests/examples --auto-approve --wait
  flower-reconcile plan --specs specs/ --out plan.json && flower-reconcile apply plan.json")]
pub struct ApplyArgs {
    /// A plan saved with `plan --out FILE`: apply exactly it, or refuse if the specs or the
    /// live state changed since.
    #[arg(value_name = "FILE")]
    pub plan_file: Option<PathBuf>,
    /// Where the specs come from.
    #[command(flatten)]
    pub source: SourceArgs,
    /// OpenNebula connection and controller id.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Mass-delete guard.
    #[command(flatten)]
    pub prune: PruneArgs,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub auto_approve: bool,
    /// Act even while a running controller holds the leader lease (both then change
    /// OpenNebula: for emergencies only).
    #[arg(long)]
    pub force: bool,
    /// This run's id in the lease and the User-Agent [default: hostname-pid-random].
    #[arg(long, value_name = "ID", env = "FLOWER_RECONCILE_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Follow the clusters until they are Ready (continuing approved redeploys and
    /// replacements), showing progress.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "30m", value_name = "DURATION")]
    pub wait_timeout: crate::api::HumanDuration,
    /// How often `--wait` looks at OpenNebula.
    #[arg(long, default_value = "5s", value_name = "DURATION", hide = true)]
    pub wait_poll: crate::api::HumanDuration,
    /// OTLP/HTTP collector the new VMs' agents send their spans to (base URL, as in
    /// OTEL_EXPORTER_OTLP_ENDPOINT); their spans continue this command's trace.
    #[arg(long, value_name = "URL", env = "FLOWER_RECONCILE_VM_OTLP_ENDPOINT",
          value_parser = crate::protocol::trace_context::parse_otlp_endpoint)]
    pub vm_otlp_endpoint: Option<crate::protocol::trace_context::OtlpEndpoint>,
    /// `run`'s TOML configuration: its `[sites.NAME]` are applied too — each site's parts
    /// after the home site's plan, under one confirmation, and the home SuperLinks given
    /// the keys of their SuperNodes there. One pass: parts' SuperNodes publish their keys
    /// once booted, so a new part needs a second `apply --config` (or `run`) for its keys;
    /// `--wait` follows the home clusters only.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Run `apply`.
pub async fn run(args: ApplyArgs) -> ExitCode {
    match apply_command(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn apply_command(args: &ApplyArgs) -> anyhow::Result<()> {
    let (desired, snapshot) = load_desired(&args.source).await?;
    let instance = crate::runtime::election::instance_id(args.instance_id.as_deref())
        .map_err(|e| anyhow::anyhow!("--{e}"))?;
    let one_cfg = crate::reconciler::context::one_config_from_env(Some(&instance))?;
    let mut ctx = crate::reconciler::context::context_for(
        one_cfg.clone(),
        &args.connect.controller_id,
        None,
        args.connect.ownership,
    )
    .await?;
    let lease = crate::runtime::election::OneShotLease::take(
        &one_cfg,
        &args.connect.controller_id,
        &instance,
        args.force,
    )
    .await?;
    if let Some(l) = &lease {
        ctx.backend = Arc::new(crate::runtime::election::FencedBackend::new(
            ctx.backend.clone(),
            l.leadership(),
        ));
    }
    let result = apply_leased(
        args,
        ctx,
        desired,
        snapshot,
        lease.as_ref().map(|l| l.leadership()),
    )
    .await;
    if let Some(l) = lease {
        l.release().await;
    }
    result
}

async fn apply_leased(
    args: &ApplyArgs,
    mut ctx: Context,
    mut desired: DesiredState,
    snapshot: crate::source::Snapshot,
    lease: Option<Arc<crate::runtime::election::Leadership>>,
) -> anyhow::Result<()> {
    ctx.options.vm_tracing = crate::reconciler::VmTracing::new(
        args.vm_otlp_endpoint.clone(),
        crate::telemetry::exports_spans(),
    );
    let live = observe(&ctx, Utc::now())
        .await
        .context("observing OpenNebula")?;
    guard_prune(&mut desired, &snapshot, &live, &args.prune);
    anyhow::ensure!(
        args.config.is_none() || args.plan_file.is_none(),
        "apply --config plans the sites afresh: it takes no saved plan"
    );
    let sites = super::sites::load(
        args.config.as_deref(),
        &args.connect,
        lease,
        &mut desired,
        &live,
    )
    .await?;
    let saved = args
        .plan_file
        .as_ref()
        .map(|path| Ok::<_, anyhow::Error>((path, PlanFile::read(path)?)));
    let saved = saved.transpose()?;
    let refuse = |path: &std::path::Path, why: String| {
        anyhow::anyhow!(
            "refusing to apply {}: {why}; run `flower-reconcile plan` again",
            path.display()
        )
    };
    if let Some((path, file)) = &saved {
        if let Some(why) = file.staleness(&ctx.controller_id, &desired, &live) {
            return Err(refuse(path, why));
        }
    }
    let mut p = plan(&desired, &live, Utc::now());
    prepare(&ctx, &desired, &mut p).await?;
    if let Some((path, file)) = &saved {
        // The fresh plan is what runs: it equals the saved one (bodies by ids and
        // digest), and only it holds the bodies, which a saved plan never does.
        if let Some(why) = unplanned(&file.plan, &p) {
            return Err(refuse(path, why));
        }
    }
    print!("{}", render_text(&p, TextOptions { color: colour() }));
    let site_plans = super::sites::plan_sites(&sites, &snapshot, &live, &args.prune).await?;
    site_plans.iter().for_each(super::sites::print);
    let site_changes = site_plans
        .iter()
        .any(|s| s.plan.as_ref().is_ok_and(|(_, _, p)| p.has_changes()));
    let changes = p.has_changes() || site_changes;
    if !changes && !args.wait {
        return Ok(());
    }
    if changes && !args.auto_approve && !confirm()? {
        anyhow::bail!("apply cancelled");
    }
    execute(&ctx, &desired, &p.actions).await?;
    for site in &site_plans {
        if let Ok((site_ctx, site_desired, site_plan)) = &site.plan {
            execute(site_ctx, site_desired, &site_plan.actions)
                .await
                .with_context(|| format!("site {}", site.name))?;
        }
    }
    if args.wait {
        let approved: BTreeSet<String> = p.actions.iter().map(|a| a.cluster.clone()).collect();
        follow(args, &ctx, &desired, approved).await?;
    }
    Ok(())
}

/// Why the changes of a saved plan are not exactly those of `fresh`, the plan of the
/// current specs over a fresh observation (`None`: they are). Re-planning rather than
/// checking ids one by one: the digest check already pins the observation, so equality
/// also rules out actions the planner would never take (a `Delete` of a cluster whose
/// policy is `Retain`, a terminate of a healthy node) besides foreign ids. Reasons and
/// diffs are text for humans and are not compared; carried bodies compare by their
/// resolved ids and digest.
pub fn unplanned(saved: &Plan, fresh: &Plan) -> Option<String> {
    let changes = |p: &Plan| -> Vec<(String, ActionKind)> {
        p.actions
            .iter()
            .filter(|a| a.is_executable())
            .map(|a| (a.cluster.clone(), a.kind.clone()))
            .collect()
    };
    let (saved, fresh) = (changes(saved), changes(fresh));
    if saved == fresh {
        return None;
    }
    let first = saved.iter().find(|a| !fresh.contains(a));
    Some(match first {
        Some((cluster, kind)) => format!(
            "its action `{} {cluster}` ({}) is not what the current specs and OpenNebula call for",
            kind.verb(),
            serde_json::to_string(kind).unwrap_or_default()
        ),
        None => "it leaves out changes the current specs and OpenNebula call for".into(),
    })
}

/// Ask on the terminal; refuse when stdin is not a terminal.
fn confirm() -> anyhow::Result<bool> {
    anyhow::ensure!(
        std::io::stdin().is_terminal(),
        "stdin is not a terminal: pass --auto-approve to apply without confirmation"
    );
    print!(
        "\nDo you want to perform these actions? Only 'yes' will be accepted.\n  Enter a value: "
    );
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == "yes")
}

async fn execute(ctx: &Context, desired: &DesiredState, actions: &[Action]) -> anyhow::Result<()> {
    let mut applier = Applier::new(ctx, desired);
    for a in actions.iter().filter(|a| a.is_executable()) {
        let done = applier
            .apply(a)
            .await
            .with_context(|| format!("applying: {}", a.one_line()))?;
        println!("{}: {}", a.cluster, done.summary);
    }
    Ok(())
}

/// Continuations of approved work that `--wait` may apply without asking again.
fn is_continuation(a: &Action) -> bool {
    matches!(
        a.kind,
        ActionKind::Scale { .. } | ActionKind::Redeploy(RedeployStep::UndeployOld { .. })
    )
}

/// `--wait`: what it prints as the clusters progress.
#[derive(Default)]
struct WaitProgress {
    last_line: String,
}

impl Hooks for WaitProgress {
    fn on_pass(&mut self, pass: &Pass) {
        let line = pass.waiting().join("; ");
        if !line.is_empty() && line != self.last_line {
            println!("[{:>4}s] {line}", pass.elapsed.as_secs());
            self.last_line = line;
        }
    }

    fn on_applied(&mut self, cluster: &str, lines: &[String]) {
        for line in lines {
            println!("{cluster}: {line}");
        }
    }
}

/// Follow the approved clusters with the converge loop until each is Ready with nothing
/// pending, applying only continuations of approved work.
async fn follow(
    args: &ApplyArgs,
    ctx: &Context,
    desired: &DesiredState,
    approved: BTreeSet<String>,
) -> anyhow::Result<()> {
    let opts = ConvergeOptions {
        scope: Some(approved),
        timeout: args.wait_timeout.get(),
        poll: args.wait_poll.get(),
        allow: &is_continuation,
    };
    let pass = converge(ctx, desired, &opts, &mut WaitProgress::default()).await?;
    for (name, c) in &pass.clusters {
        if let Some(r) = &c.readiness {
            println!("{name}: Ready ({})", r.message);
        }
    }
    println!("All clusters are Ready ({}s).", pass.elapsed.as_secs());
    Ok(())
}
