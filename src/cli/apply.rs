//! `flower-reconcile apply`: one reconcile pass (or exactly a saved plan), with
//! confirmation and an optional `--wait` that follows the clusters to Ready.

use std::collections::BTreeSet;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::Utc;

use super::plan::{colour, connect, load_desired, ConnectArgs, PlanFile};
use crate::controller::{observe, Applier, Context};
use crate::plan::{
    plan, render_text, Action, ActionKind, DesiredState, Plan, RedeployStep, TextOptions,
};
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
    /// Do not ask for confirmation.
    #[arg(long)]
    pub auto_approve: bool,
    /// Follow the clusters until they are Ready (continuing approved redeploys and
    /// replacements), showing progress.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "30m", value_name = "DURATION")]
    pub wait_timeout: crate::api::HumanDuration,
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
    let (desired, _revision) = load_desired(&args.source).await?;
    let ctx = connect(&args.connect).await?;
    let live = observe(&ctx, Utc::now())
        .await
        .context("observing OpenNebula")?;
    let p = match &args.plan_file {
        Some(path) => {
            let file = PlanFile::read(path)?;
            if let Some(why) = file.staleness(&ctx.controller_id, &desired, &live) {
                anyhow::bail!(
                    "refusing to apply {}: {why}; run `flower-reconcile plan` again",
                    path.display()
                );
            }
            file.plan
        }
        None => plan(&desired, &live, Utc::now()),
    };
    print!("{}", render_text(&p, TextOptions { color: colour() }));
    if !p.has_changes() && !args.wait {
        return Ok(());
    }
    if p.has_changes() && !args.auto_approve && !confirm()? {
        anyhow::bail!("apply cancelled");
    }
    execute(&ctx, &desired, &p.actions).await?;
    if args.wait {
        let approved: BTreeSet<String> = p.actions.iter().map(|a| a.cluster.clone()).collect();
        follow(args, &ctx, &desired, &approved).await?;
    }
    Ok(())
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
    for a in actions.iter().filter(|a| a.kind.is_change()) {
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

async fn follow(
    args: &ApplyArgs,
    ctx: &Context,
    desired: &DesiredState,
    approved: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_line = String::new();
    loop {
        let live = observe(ctx, Utc::now())
            .await
            .context("observing OpenNebula")?;
        let p: Plan = plan(desired, &live, Utc::now());
        let pending: Vec<&Action> = p
            .actions
            .iter()
            .filter(|a| approved.contains(&a.cluster))
            .collect();
        if pending.is_empty() {
            println!("All clusters are Ready ({}s).", started.elapsed().as_secs());
            return Ok(());
        }
        let continuing: Vec<Action> = pending
            .iter()
            .filter(|a| is_continuation(a))
            .map(|a| (*a).clone())
            .collect();
        execute(ctx, desired, &continuing).await?;
        let line = progress_line(&pending);
        if line != last_line {
            println!("[{:>4}s] {line}", started.elapsed().as_secs());
            last_line = line;
        }
        anyhow::ensure!(
            started.elapsed() < args.wait_timeout.get(),
            "clusters not Ready after {}: {last_line}",
            args.wait_timeout
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

fn progress_line(pending: &[&Action]) -> String {
    let mut per_cluster: Vec<String> = Vec::new();
    for a in pending {
        let entry = format!("{}: {}", a.cluster, a.reason);
        if !per_cluster.contains(&entry) {
            per_cluster.push(entry);
        }
    }
    per_cluster.join("; ")
}
