//! `flower-reconcile status [NAME]`: cluster status from a running controller's API, or
//! computed directly from the specs and one observation of OpenNebula (`--direct`).

use std::fmt::Write as _;
use std::process::ExitCode;

use chrono::Utc;

use super::OutputFormat;
use crate::api::{ConditionStatus, ConditionType};
use crate::reconciler::driver::OneReconciler;
use crate::runtime::status::{compute, condition, ClusterTrack, ClusterView, StatusInput};
use crate::runtime::Reconciler;
use crate::service::auth::BearerToken;
use crate::service::http::{ApiClient, ClusterList};
use crate::source::{default_cache_base, SourceArgs};

/// `flower-reconcile status`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  flower-reconcile status
  flower-reconcile status demo --server http://10.0.0.5:9464
  flower-reconcile status --direct --specs clusters/ --output json")]
pub struct StatusArgs {
    /// One cluster (default: all).
    pub name: Option<String>,
    /// Base URL of a running controller.
    #[arg(
        long,
        value_name = "URL",
        env = "FLOWER_RECONCILE_SERVER",
        default_value = "http://127.0.0.1:9464",
        conflicts_with = "direct"
    )]
    pub server: String,
    /// File holding the controller's bearer token (its `auth-token-file`).
    #[arg(
        long,
        value_name = "FILE",
        env = "FLOWER_RECONCILE_TOKEN_FILE",
        conflicts_with = "direct"
    )]
    pub token_file: Option<std::path::PathBuf>,
    /// Compute the status here from the specs and one observation of OpenNebula
    /// (ONE_XMLRPC, ONEFLOW_URL, ONE_AUTH) instead of asking a controller. There is no
    /// reconcile history then.
    #[arg(long)]
    pub direct: bool,
    /// Specs, with `--direct`.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Ownership marker id, with `--direct`.
    #[arg(
        long,
        env = "FLOWER_RECONCILE_CONTROLLER_ID",
        default_value = "flower-reconcile"
    )]
    pub controller_id: String,
    /// Which OpenNebula owner is trusted, with `--direct`.
    #[command(flatten)]
    pub ownership: crate::reconciler::OwnershipOptions,
    /// `run`'s TOML configuration, with `--direct`: each `[sites.NAME]` is observed too and
    /// the clusters' parts there are shown under them (multi-site).
    #[arg(long, value_name = "FILE", requires = "direct")]
    pub config: Option<std::path::PathBuf>,
    /// Output format: set from the global `--output`.
    #[arg(skip)]
    pub output: OutputFormat,
}

/// Run `status`.
pub async fn run(args: StatusArgs) -> ExitCode {
    match status(&args).await {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Fetch or compute, then format.
pub async fn status(args: &StatusArgs) -> anyhow::Result<String> {
    let list = if args.direct {
        direct(args).await?
    } else {
        let token = args
            .token_file
            .as_deref()
            .map(BearerToken::from_file)
            .transpose()?;
        ApiClient::new(&args.server, token, std::time::Duration::from_secs(10))?
            .get_json::<ClusterList>("/api/v1/clusters")
            .await?
    };
    let views: Vec<&ClusterView> = match &args.name {
        Some(n) => {
            // A home cluster, or a part in another site (`<cluster>--<site>`).
            let v = list
                .clusters
                .iter()
                .chain(list.sites.values().flat_map(|s| &s.clusters))
                .find(|c| &c.name == n)
                .ok_or_else(|| anyhow::anyhow!("no cluster named {n:?}"))?;
            vec![v]
        }
        None => list.clusters.iter().collect(),
    };
    Ok(match args.output {
        OutputFormat::Json if args.name.is_some() => serde_json::to_string_pretty(views[0])? + "\n",
        OutputFormat::Json => serde_json::to_string_pretty(&list)? + "\n",
        OutputFormat::Text if args.name.is_some() => detail(views[0]),
        OutputFormat::Text => table(&list, &views),
    })
}

async fn direct(args: &StatusArgs) -> anyhow::Result<ClusterList> {
    let source = args.source.build(&default_cache_base())?;
    let snap = source.load_once().await?;
    crate::telemetry::record_revision(&snap.revision);
    let ctx =
        crate::reconciler::context::context_from_env(&args.controller_id, None, args.ownership)
            .await?;
    let r = OneReconciler::new(std::sync::Arc::new(ctx));
    let live = r.observe().await?;
    let clusters = views(&live, &snap, |name, desired| {
        r.summarize(&live, name, desired)
    });
    let mut sites = std::collections::BTreeMap::new();
    if let Some(config) = &args.config {
        let home = crate::source::SourceState {
            snapshot: Some(std::sync::Arc::new(snap.clone())),
            ..Default::default()
        };
        for site in
            super::sites::observe_sites(config, &args.controller_id, args.ownership, None).await?
        {
            let Some(derived) =
                crate::service::sites::derived_state(&site.name, &home, Some(&live))
                    .and_then(|s| s.snapshot)
            else {
                continue;
            };
            let mut list = crate::service::http::SiteList {
                source: crate::runtime::SourceView {
                    source: format!("parts in site {}", site.name),
                    revision: Some(snap.revision.clone()),
                    error: None,
                    file_errors: derived.errors.clone(),
                    checks: Default::default(),
                },
                ..Default::default()
            };
            match &site.observed {
                Err(why) => list.observe_error = Some(why.clone()),
                Ok((_, site_live)) => {
                    list.observed_at = Some(site_live.observed_at);
                    list.clusters = views(site_live, &derived, |name, desired| {
                        crate::reconciler::driver::summarize_cluster(
                            site_live,
                            name,
                            desired.map(|d| &d.cluster),
                        )
                    });
                }
            }
            sites.insert(site.name, list);
        }
    }
    Ok(ClusterList {
        source: crate::runtime::SourceView {
            source: source.describe(),
            revision: Some(snap.revision.clone()),
            error: None,
            file_errors: snap.errors.clone(),
            checks: Default::default(),
        },
        observed_at: Some(live.observed_at),
        observe_error: None,
        clusters,
        leadership: None,
        sites,
        unknown_sites: Default::default(),
    })
}

/// The views of the clusters `snap` specifies or `live` holds, summarized by `summarize`.
fn views(
    live: &crate::plan::LiveState,
    snap: &crate::source::Snapshot,
    summarize: impl Fn(
        &str,
        Option<&crate::source::SourcedCluster>,
    ) -> Option<crate::runtime::status::LiveSummary>,
) -> Vec<ClusterView> {
    let mut names: std::collections::BTreeSet<String> = live.clusters.keys().cloned().collect();
    names.extend(snap.names().map(str::to_string));
    let track = ClusterTrack::default();
    names
        .into_iter()
        .map(|name| {
            let held = snap.held.get(&name);
            let desired = snap.clusters.get(&name);
            let summary = summarize(&name, desired);
            ClusterView {
                metrics_targets: summary
                    .as_ref()
                    .map(|s| s.metrics_targets.clone())
                    .unwrap_or_default(),
                status: compute(StatusInput {
                    desired,
                    held_by: held.map(|p| p.as_path()),
                    live: summary.as_ref(),
                    track: &track,
                    now: Utc::now(),
                }),
                spec_file: desired.map(|d| d.file.clone()),
                held_by: held.cloned(),
                failures: 0,
                name,
            }
        })
        .collect()
}

fn cond_cell(v: &ClusterView, kind: ConditionType) -> String {
    match condition(&v.status, kind) {
        Some(c) if c.status == ConditionStatus::True => format!("True/{}", c.reason),
        Some(c) => format!("{:?}/{}", c.status, c.reason),
        None => "-".into(),
    }
}

fn short(rev: Option<&str>) -> &str {
    rev.map_or("-", |r| r.get(..12).unwrap_or(r))
}

/// The cluster table.
pub fn table(list: &ClusterList, views: &[&ClusterView]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "source {}  revision {}{}",
        list.source.source,
        short(list.source.revision.as_deref()),
        list.source
            .error
            .as_ref()
            .filter(|_| list.source.checks.refusal().is_none())
            .map(|e| format!("  (last fetch failed: {e})"))
            .unwrap_or_default()
    );
    if let Some(l) = list.leadership.as_ref().filter(|l| l.role != "single") {
        let holder = if l.holder.is_empty() {
            "none"
        } else {
            &l.holder
        };
        let since = if l.holder_since.is_empty() {
            "-"
        } else {
            &l.holder_since
        };
        let _ = writeln!(
            out,
            "leader {holder} since {since}  (this instance {}: {}; {} transitions)",
            l.identity, l.role, l.transitions
        );
    }
    // Grouped per cluster: its home row, then its parts in other sites (multi-site).
    let mut grouped: Vec<(&str, &str, &ClusterView)> = views
        .iter()
        .map(|v| (v.name.as_str(), "home", *v))
        .collect();
    if views.len() == list.clusters.len() {
        for (site, s) in &list.sites {
            for v in &s.clusters {
                let cluster = crate::plan::site::cluster_of_part(&v.name, site).unwrap_or(&v.name);
                grouped.push((cluster, site.as_str(), v));
            }
        }
    }
    grouped.sort_by_key(|(cluster, site, _)| (*cluster, *site != "home", *site));
    let with_sites = !list.sites.is_empty();
    let rows: Vec<[String; 7]> = grouped
        .iter()
        .map(|(_, site, v)| {
            let n = v.status.nodes;
            [
                site.to_string(),
                v.name.clone(),
                cond_cell(v, ConditionType::Ready),
                format!("{}/{}", n.ready, n.desired),
                v.status
                    .superlink_endpoint
                    .clone()
                    .unwrap_or_else(|| "-".into()),
                short(v.status.observed_revision.as_deref()).to_string(),
                cond_cell(v, ConditionType::Stalled),
            ]
        })
        .collect();
    let head = [
        "SITE", "NAME", "READY", "NODES", "ENDPOINT", "REVISION", "STALLED",
    ];
    let mut widths = head.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for cells in std::iter::once(head.map(String::from)).chain(rows) {
        // The SITE column only when sites are configured.
        let skip = usize::from(!with_sites);
        let line: Vec<String> = cells
            .iter()
            .zip(widths)
            .skip(skip)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    if let Some(c) = list.source.checks.refusal() {
        // The revision in use is the last good one; say which was refused and why.
        let _ = writeln!(
            out,
            "REFUSED revision {} ({}={:?} reason={}): {}",
            short(Some(&c.revision)),
            c.kind,
            c.status,
            c.reason,
            c.message
        );
    }
    let refusal = list.source.checks.refusal();
    for c in &list.source.checks.conditions {
        if Some(c) != refusal {
            let _ = writeln!(
                out,
                "{}={:?} reason={}: {}",
                c.kind, c.status, c.reason, c.message
            );
        }
    }
    for e in &list.source.file_errors {
        let _ = writeln!(out, "error: {e}");
    }
    for (site, s) in &list.sites {
        if let Some(e) = &s.observe_error {
            let _ = writeln!(
                out,
                "site {site}: cannot be observed, its parts are held: {e}"
            );
        }
        for e in &s.source.file_errors {
            let _ = writeln!(out, "site {site}: held: {}", e.message);
        }
    }
    for (site, clusters) in &list.unknown_sites {
        let names: Vec<&str> = clusters.iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "site {site}: not in the controller's configuration ([sites.{site}]); nothing is done there for {}",
            names.join(", ")
        );
    }
    out
}

/// One cluster in detail.
pub fn detail(v: &ClusterView) -> String {
    let s = &v.status;
    let mut out = String::new();
    let _ = writeln!(out, "cluster {}", v.name);
    if let Some(f) = &v.spec_file {
        let _ = writeln!(out, "  spec file:     {}", f.display());
    }
    if let Some(f) = &v.held_by {
        let _ = writeln!(
            out,
            "  HELD:          {} does not load; the cluster is left as it is",
            f.display()
        );
    }
    let _ = writeln!(
        out,
        "  revision:      {}",
        s.observed_revision.as_deref().unwrap_or("-")
    );
    if let Some(id) = s.service_id {
        let _ = writeln!(out, "  service:       {id}");
    }
    let _ = writeln!(
        out,
        "  endpoint:      {}",
        s.superlink_endpoint.as_deref().unwrap_or("-")
    );
    let n = s.nodes;
    let _ = writeln!(
        out,
        "  supernodes:    {} desired, {} running, {} ready, {} failed",
        n.desired, n.running, n.ready, n.failed
    );
    if let Some(t) = s.certificate_not_after {
        let _ = writeln!(out, "  cert expires:  {}", t.to_rfc3339());
    }
    if v.failures > 0 {
        let _ = writeln!(
            out,
            "  failures:      {} in a row (backing off)",
            v.failures
        );
    }
    let _ = writeln!(out, "  conditions:");
    for c in &s.conditions {
        let _ = writeln!(
            out,
            "    {:<12} {:<8} {:<20} {}",
            format!("{:?}", c.kind),
            format!("{:?}", c.status),
            c.reason,
            c.message
        );
    }
    if !s.last_reconciles.is_empty() {
        let _ = writeln!(out, "  last reconciles:");
        for r in &s.last_reconciles {
            let _ = writeln!(
                out,
                "    {}  {}  {}{}",
                r.time.format("%Y-%m-%d %H:%M:%S"),
                r.outcome,
                if r.actions.is_empty() {
                    "no changes".to_string()
                } else {
                    r.actions.join("; ")
                },
                r.trace_id
                    .as_ref()
                    .map(|t| format!("  trace {t}"))
                    .unwrap_or_default()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{FlowerClusterStatus, NodeCounts, ReconcileRecord};
    use crate::runtime::SourceView;
    use crate::source::SourceChecks;

    fn view() -> ClusterView {
        ClusterView {
            name: "demo".into(),
            spec_file: Some("demo.yaml".into()),
            held_by: None,
            metrics_targets: Vec::new(),
            failures: 0,
            status: FlowerClusterStatus {
                observed_revision: Some("0123456789abcdef0123".into()),
                superlink_endpoint: Some("10.0.0.2:9092".into()),
                nodes: NodeCounts {
                    desired: 3,
                    running: 3,
                    ready: 2,
                    failed: 0,
                },
                last_reconciles: vec![ReconcileRecord {
                    time: Utc::now(),
                    trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
                    actions: vec!["scale supernode 2 → 3".into()],
                    outcome: "ok".into(),
                }],
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_table_and_the_detail_show_revision_endpoint_counts_and_traces() {
        let v = view();
        let list = ClusterList {
            source: SourceView {
                source: "git:file:///r@main".into(),
                revision: Some("0123456789abcdef0123".into()),
                ..Default::default()
            },
            observed_at: None,
            observe_error: None,
            clusters: vec![v.clone()],
            leadership: None,
            sites: Default::default(),
            unknown_sites: Default::default(),
        };
        let t = table(&list, &[&v]);
        assert!(!t.contains("leader "), "no election, no leader line: {t}");
        let elected = ClusterList {
            leadership: Some(crate::runtime::election::LeaderView {
                role: "standby".into(),
                identity: "host-b-1-x".into(),
                holder: "host-a-7-y".into(),
                holder_since: "2026-12-03T09:00:00.000Z".into(),
                transitions: 2,
                lease_document: Some(4),
            }),
            ..list.clone()
        };
        let te = table(&elected, &[&v]);
        assert!(
            te.contains("leader host-a-7-y since 2026-12-03T09:00:00.000Z  (this instance host-b-1-x: standby; 2 transitions)"),
            "{te}"
        );
        assert!(
            t.contains("NAME") && t.contains("demo") && t.contains("2/3"),
            "{t}"
        );
        assert!(
            t.contains("0123456789ab") && t.contains("10.0.0.2:9092"),
            "{t}"
        );
        let d = detail(&v);
        assert!(d.contains("revision:      0123456789abcdef0123"), "{d}");
        assert!(d.contains("trace 4bf92f3577b34da6a3ce929d0e0e4736"), "{d}");
        assert!(d.contains("scale supernode 2 → 3"));
    }

    #[test]
    fn the_table_groups_each_clusters_parts_in_other_sites_under_it() {
        let home = view();
        let mut part = view();
        part.name = format!("{}--b", home.name);
        let mut other = view();
        other.name = "zeta".into();
        let mut list = ClusterList {
            source: SourceView::default(),
            observed_at: None,
            observe_error: None,
            clusters: vec![home.clone(), other.clone()],
            leadership: None,
            sites: Default::default(),
            unknown_sites: Default::default(),
        };
        let plain = table(&list, &[&home, &other]);
        assert!(!plain.contains("SITE"), "no sites, no SITE column: {plain}");
        list.sites.insert(
            "b".into(),
            crate::service::http::SiteList {
                observe_error: Some("connecting to site b: refused".into()),
                clusters: vec![part.clone()],
                ..Default::default()
            },
        );
        list.unknown_sites
            .insert("c".into(), ["zeta".to_string()].into());
        let t = table(&list, &[&home, &other]);
        let lines: Vec<&str> = t.lines().collect();
        let row = |name: &str| {
            lines
                .iter()
                .position(|l| l.split_whitespace().nth(1) == Some(name))
                .unwrap_or_else(|| panic!("no row {name}: {t}"))
        };
        assert!(lines.iter().any(|l| l.starts_with("SITE")), "{t}");
        assert!(lines[row(&home.name)].starts_with("home"), "{t}");
        assert!(lines[row(&part.name)].starts_with("b "), "{t}");
        assert_eq!(
            row(&part.name),
            row(&home.name) + 1,
            "the part follows its cluster: {t}"
        );
        assert!(row("zeta") > row(&part.name), "{t}");
        assert!(
            t.contains(
                "site b: cannot be observed, its parts are held: connecting to site b: refused"
            ),
            "{t}"
        );
        assert!(
            t.contains("site c: not in the controller's configuration"),
            "{t}"
        );
    }

    #[test]
    fn the_table_names_a_refused_revision_and_every_other_check() {
        let condition =
            |kind: &str, status, reason: &str, revision: &str| crate::source::SourceCondition {
                kind: kind.into(),
                status,
                reason: reason.into(),
                message: format!("{reason} message"),
                revision: revision.into(),
            };
        let mut list = ClusterList {
            source: SourceView {
                source: "git:file:///r@main".into(),
                revision: Some("aaaaaaaaaaaaaaaa".into()),
                error: Some("revision bbbbbbbbbbbb refused (…)".into()),
                checks: SourceChecks {
                    conditions: vec![condition(
                        crate::source::SOURCE_VERIFIED,
                        ConditionStatus::False,
                        "Unsigned",
                        "bbbbbbbbbbbbbbbb",
                    )],
                    refused_revision: Some("bbbbbbbbbbbbbbbb".into()),
                },
                ..Default::default()
            },
            observed_at: None,
            observe_error: None,
            clusters: Vec::new(),
            leadership: None,
            sites: Default::default(),
            unknown_sites: Default::default(),
        };
        let t = table(&list, &[]);
        assert!(t.contains("revision aaaaaaaaaaaa"), "the one in use: {t}");
        assert!(
            t.contains("REFUSED revision bbbbbbbbbbbb (SourceVerified=False reason=Unsigned)"),
            "{t}"
        );
        assert!(!t.contains("last fetch failed"), "said once: {t}");
        // A rollback applied with --allow-rollback is not a refusal, but still shown.
        list.source.error = None;
        list.source.checks = SourceChecks {
            conditions: vec![
                condition(
                    crate::source::SOURCE_VERIFIED,
                    ConditionStatus::True,
                    "Signed",
                    "c",
                ),
                condition(
                    crate::source::FAST_FORWARD,
                    ConditionStatus::False,
                    "Rollback",
                    "c",
                ),
            ],
            refused_revision: None,
        };
        let t = table(&list, &[]);
        assert!(!t.contains("REFUSED"), "{t}");
        assert!(t.contains("SourceVerified=True reason=Signed"), "{t}");
        assert!(
            t.contains("FastForward=False reason=Rollback: Rollback message"),
            "{t}"
        );
    }
}
