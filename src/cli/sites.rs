//! `plan --config` and `apply --config`: the other sites of `run`'s configuration, in one
//! shot (multi-site federation, docs/multi-site.md).
//!
//! Owns: observing each configured site once, the home clusters' SuperNode keys in those
//! sites ([`with_site_keys`]), and each site's plan of the parts derived from the home
//! snapshot and observation, as `run` derives them ([`plan_sites`]).
//! Must not: plan or render (that is [`crate::plan::site`]), or take a site's endpoint or
//! credentials from anywhere but the controller's configuration.
//!
//! Guarantees: a site that cannot be observed is reported and left as it is, and keeps
//! every key the home SuperLink holds for its nodes (`plan::site::wanted_site_keys`).
//! Caveats: one pass. A part's SuperNodes publish their keys once they boot, after this
//! pass created them: the next `apply --config` (or `run`) hands them to the home SuperLink.

use std::path::Path;
use std::sync::Arc;

use chrono::Utc;

use super::plan::{guard_prune, PruneArgs};
use crate::plan::{plan, DesiredState, LiveState, Plan};
use crate::reconciler::{desired_from_snapshot, observe, prepare, Context};
use crate::runtime::election::{FencedBackend, Leadership};
use crate::source::{Snapshot, SourceState};

/// One configured site, observed (or why not).
pub struct Site {
    /// Its name in the configuration.
    pub name: String,
    /// Its connection and newest observation; `Err`: why it could not be observed.
    pub observed: Result<(Context, Arc<LiveState>), String>,
}

/// Connect to and observe every site of `config` as `controller_id`; a site's mutations
/// are fenced by `lease` (the home one) when given.
pub async fn observe_sites(
    config: &Path,
    controller_id: &str,
    ownership: crate::reconciler::context::OwnershipOptions,
    lease: Option<Arc<Leadership>>,
) -> anyhow::Result<Vec<Site>> {
    let mut out = Vec::new();
    for (name, one_cfg) in crate::service::config::load_sites(config)? {
        let observed = async {
            let mut ctx =
                crate::reconciler::context::context_for(one_cfg, controller_id, None, ownership)
                    .await?;
            if let Some(l) = &lease {
                ctx.backend = Arc::new(FencedBackend::new(ctx.backend.clone(), l.clone()));
            }
            let live = observe(&ctx, Utc::now()).await?;
            anyhow::Ok((ctx, Arc::new(live)))
        }
        .await
        .map_err(|e| format!("{e:#}"));
        out.push(Site { name, observed });
    }
    Ok(out)
}

/// The sites of `config` (none without one), observed, and `desired`'s home clusters
/// given the keys of their SuperNodes there ([`with_site_keys`]).
pub async fn load(
    config: Option<&Path>,
    connect: &super::plan::ConnectArgs,
    lease: Option<Arc<Leadership>>,
    desired: &mut DesiredState,
    home_live: &LiveState,
) -> anyhow::Result<Vec<Site>> {
    let Some(config) = config else {
        return Ok(Vec::new());
    };
    let sites = observe_sites(config, &connect.controller_id, connect.ownership, lease).await?;
    with_site_keys(desired, home_live, &sites);
    Ok(sites)
}

/// Give each home cluster the keys of its SuperNodes in `sites` (what its SuperLink must
/// accept); a site not observed keeps the keys the SuperLink holds.
pub fn with_site_keys(desired: &mut DesiredState, home_live: &LiveState, sites: &[Site]) {
    for d in desired.clusters.values_mut() {
        d.site_node_keys = crate::plan::site::wanted_site_keys(&d.cluster, home_live, |name| {
            sites
                .iter()
                .find(|s| s.name == name)
                .and_then(|s| s.observed.as_ref().ok())
                .map(|(_, live)| live.clone())
        });
    }
}

/// One site's pass: its parts' desired state and plan, with the notes to print first.
pub struct SitePlan<'a> {
    /// The site's name.
    pub name: &'a str,
    /// Parts held (waiting for the home SuperLink, a broken home spec) and why.
    pub held: Vec<String>,
    /// `None`: the site could not be observed (why), its parts are left as they are.
    pub plan: Result<(&'a Context, DesiredState, Plan), &'a str>,
}

/// Each observed site's plan of the parts derived from the home `snapshot` and `home_live`.
pub async fn plan_sites<'a>(
    sites: &'a [Site],
    snapshot: &Snapshot,
    home_live: &LiveState,
    prune: &PruneArgs,
) -> anyhow::Result<Vec<SitePlan<'a>>> {
    let home = SourceState {
        snapshot: Some(Arc::new(snapshot.clone())),
        ..Default::default()
    };
    let mut out = Vec::new();
    for site in sites {
        let Some(derived) =
            crate::service::sites::derived_state(&site.name, &home, Some(home_live))
                .and_then(|s| s.snapshot)
        else {
            continue;
        };
        let held = derived.errors.iter().map(|e| e.message.clone()).collect();
        let plan = match &site.observed {
            Err(why) => Err(why.as_str()),
            Ok((ctx, live)) => {
                let mut desired = desired_from_snapshot(&derived);
                guard_prune(&mut desired, &derived, live, prune);
                let mut p = plan(&desired, live, Utc::now());
                prepare(ctx, &desired, &mut p).await?;
                Ok((ctx, desired, p))
            }
        };
        out.push(SitePlan {
            name: &site.name,
            held,
            plan,
        });
    }
    Ok(out)
}

/// Print a site's pass (text), as `plan` prints the home one.
pub fn print(site: &SitePlan<'_>) {
    println!("\nSite {}:", site.name);
    for h in &site.held {
        println!("  held: {h}");
    }
    match &site.plan {
        Err(why) => println!("  cannot be observed ({why}): its parts are left as they are"),
        Ok((_, _, p)) => print!(
            "{}",
            crate::plan::render_text(
                p,
                crate::plan::TextOptions {
                    color: super::plan::colour()
                }
            )
        ),
    }
}
