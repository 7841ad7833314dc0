//! `flower-reconcile submit`: run a Flower App Bundle on a managed cluster with `flwr run`,
//! wiring the SuperLink's Control API address, the CA it published and the spec's `training`
//! section, so a user never copies addresses or certificates by hand.
//!
//! Guarantees:
//! - The user's app directory is never modified: `flwr` runs on a copy in a private temporary
//!   work dir (`flwr run` itself writes `.gitignore` and `.credentials` into the app dir).
//! - `flwr` runs as an argv array (no shell), with a private `FLWR_HOME` and telemetry off, in
//!   its own process group that is killed when the run ends, times out or this future is dropped.
//! - A CLI whose minor version differs from the cluster's is refused unless explicitly allowed
//!   (a 1.26 CLI against a 1.25 SuperLink fails at `StartRun`).
//!
//! Assumptions:
//! - The app's ServerApp reports metrics either with a `FLOWER_RECONCILE_METRICS {json}` line
//!   on stdout (see `e2e/apps/fedlinreg`) or through the stock strategies' log lines
//!   (`[ROUND n/N]` … `Aggregated MetricRecord: {...}`), both forwarded by `flwr run --stream`.
//!
//! Caveats:
//! - `flwr run` exits 0 even when the run fails; the outcome comes from `flwr ls --run-id`.
//! - Flower rejects run-config keys the app does not declare, so keys rendered from the spec
//!   that the app lacks are dropped with a warning.
//! - The 1.26+ federation mechanism (a config file under `FLWR_HOME`) follows Flower's
//!   documentation; only the 1.25 mechanism (pyproject table) is exercised by tests.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use regex::Regex;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::api::{ConfigValue, StrategyName, TrainingSpec};
use crate::protocol::{config_kv, endpoint, pem};

/// Prefix of the machine-readable metrics line an app's ServerApp prints.
pub const METRICS_PREFIX: &str = "FLOWER_RECONCILE_METRICS ";

/// Where and what to submit to: one cluster's SuperLink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitTarget {
    /// Cluster name; also the federation name given to `flwr`.
    pub cluster: String,
    /// `HOST:PORT` of the SuperLink Control API.
    pub control_address: String,
    /// PEM CA the SuperLink's certificate chains to; `None` means the cluster runs without TLS.
    pub ca_pem: Option<String>,
    /// Flower version the cluster runs (`X.Y.Z`).
    pub flower_version: String,
}

impl SubmitTarget {
    /// The target from what the SuperLink VM published: `FL_ENDPOINT` (`host:fleet-port`), the
    /// spec's Control API port and `FL_CA_CERT` (base64 of the PEM, absent without TLS).
    ///
    /// Integration point for `reconciler::observe`: call this with the live SuperLink VM's
    /// attributes. With `controlApi: loopback` the Control API is only reachable through an SSH
    /// tunnel; then pass the tunnel's local address as the target instead.
    pub fn from_published(
        cluster: &str,
        fl_endpoint: &str,
        control_port: u16,
        fl_ca_cert_b64: Option<&str>,
        flower_version: &str,
    ) -> Result<Self, SubmitError> {
        let fleet = endpoint::parse(fl_endpoint.trim()).map_err(|e| {
            SubmitError::Target(format!(
                "FL_ENDPOINT {fl_endpoint:?} of cluster {cluster}: {e}"
            ))
        })?;
        let ca_pem = match fl_ca_cert_b64.map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(b64) => Some(pem::decode_certificate(b64).map_err(|e| {
                SubmitError::Target(format!("FL_CA_CERT of cluster {cluster}: {e}"))
            })?),
        };
        Ok(Self {
            cluster: cluster.to_string(),
            control_address: fleet.with_port(control_port).to_string(),
            ca_pem,
            flower_version: flower_version.to_string(),
        })
    }
}

/// The submit target of `cluster` from one observation: the live state (as built by
/// [`crate::reconciler::build_live`]) and the raw VM records it was built from (the CA is not
/// kept in the live state). The newest service with a running SuperLink that published
/// `FL_ENDPOINT` wins; the Control API port and the Flower version come from the applied-spec
/// record (`FL_VERSION` first). With `controlApi: loopback` the Control API is reachable only
/// through a tunnel, so `address_override` (the tunnel's local end) is then required.
pub fn target_from_observation(
    cluster: &str,
    live: &crate::plan::LiveState,
    vms: &[crate::one::VmRecord],
    address_override: Option<&str>,
) -> Result<SubmitTarget, SubmitError> {
    let fail = |m: String| SubmitError::Target(format!("cluster {cluster}: {m}"));
    let services = live
        .clusters
        .get(cluster)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail("no managed OneFlow service (was it applied?)".into()))?;
    let (service, vm) = services
        .iter()
        .rev()
        .find_map(|svc| {
            svc.superlink
                .nodes
                .iter()
                .find(|vm| vm.is_running() && vm.attrs.endpoint.is_some())
                .map(|vm| (svc, vm))
        })
        .ok_or_else(|| fail("no running SuperLink has published FL_ENDPOINT yet".into()))?;
    let applied = |key: &str| {
        service
            .applied
            .as_ref()
            .and_then(|a| a.fields.get(key))
            .map(String::as_str)
    };
    let port = match applied("spec.superlink.ports.control") {
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| fail(format!("recorded Control API port {p:?} is not a port")))?,
        None => crate::api::SuperLinkPorts::default().control,
    };
    let version = vm
        .attrs
        .version
        .as_deref()
        .or_else(|| applied("spec.flowerVersion"))
        .unwrap_or(crate::api::DEFAULT_FLOWER_VERSION);
    let raw = vms.iter().find(|r| r.id == vm.id).map(|r| &r.user_template);
    let attr = |name: &str| raw.and_then(|t| t.get(name)).map(String::as_str);
    let ca = attr(crate::protocol::FL_CA_CERT);
    let tls = attr(crate::protocol::FL_TLS).and_then(crate::protocol::boolean::parse) == Some(true)
        || vm.attrs.ca_cert_present
        || applied("spec.tls.enabled") != Some("false");
    if tls && ca.is_none() {
        return Err(fail(format!(
            "the SuperLink (VM {}) runs TLS but has not published FL_CA_CERT",
            vm.id
        )));
    }
    let endpoint = vm.attrs.endpoint.as_deref().unwrap_or_default();
    let mut target = SubmitTarget::from_published(cluster, endpoint, port, ca, version)?;
    match address_override {
        Some(addr) => target.control_address = addr.to_string(),
        None if applied("spec.superlink.controlApi") != Some("network") => {
            return Err(fail(format!(
                "the Control API listens on the SuperLink VM's loopback (controlApi: loopback); \
                 open a tunnel (e.g. ssh -L 9093:127.0.0.1:{port} root@{}) and pass its local \
                 address with --address",
                endpoint::parse(endpoint).map_or(endpoint.to_string(), |e| e.host_text())
            )))
        }
        None => {}
    }
    Ok(target)
}

/// [`target_from_observation`] over a fresh observation through `ctx`: one service listing
/// plus the VM pool, as [`crate::reconciler::observe`] reads them (repeated here because the
/// CA value is only in the raw VM records, which `observe` does not return).
pub async fn discover_target(
    ctx: &crate::reconciler::Context,
    cluster: &str,
    address_override: Option<&str>,
) -> Result<SubmitTarget, SubmitError> {
    let backend = |e: crate::one::BackendError| {
        SubmitError::Target(format!("observing OpenNebula for cluster {cluster}: {e}"))
    };
    let services = ctx.backend.list_services().await.map_err(backend)?;
    let vms = ctx
        .backend
        .list_vms(ctx.options.vm_page_size.max(1))
        .await
        .map_err(backend)?;
    let live =
        crate::reconciler::build_live(&services, vms.clone(), ctx.trust(), chrono::Utc::now());
    target_from_observation(cluster, &live, &vms, address_override)
}

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

// ------------------------------------------------------------------------------------------
// Run config

/// The run-config entries for a `training` section, in a stable order: the standard keys,
/// the parameters of the chosen strategy, checkpointing when on, then `runConfig` verbatim
/// (which overrides a standard key of the same name).
pub fn run_config_entries(training: &TrainingSpec) -> IndexMap<String, ConfigValue> {
    let mut out = IndexMap::new();
    let mut put = |k: &str, v: ConfigValue| {
        out.insert(k.to_string(), v);
    };
    let int = |v: u32| ConfigValue::Int(i64::from(v));
    let s = &training.strategy;
    put("num-server-rounds", int(training.num_rounds));
    put(
        "strategy",
        ConfigValue::String(strategy_name(s.name).to_string()),
    );
    put("min-fit-clients", int(training.min_fit_clients));
    // Flower ≥ 1.21 calls it min_train_nodes; apps may declare either name.
    put("min-train-nodes", int(training.min_fit_clients));
    put("min-evaluate-clients", int(training.min_evaluate_clients));
    put("min-available-clients", int(training.min_available_clients));
    let float = |k: &str, v: Option<f64>| v.map(|v| (k.to_string(), ConfigValue::Float(v)));
    let params = match s.name {
        StrategyName::FedAvg => vec![],
        StrategyName::FedProx => vec![float("proximal-mu", s.proximal_mu)],
        StrategyName::FedAdam => vec![
            float("server-lr", s.server_learning_rate),
            float("client-lr", s.client_learning_rate),
        ],
        StrategyName::Krum | StrategyName::Bulyan => vec![s
            .num_malicious_clients
            .map(|n| ("num-malicious".to_string(), int(n)))],
        StrategyName::FedTrimmedAvg => vec![float("trim-beta", s.trim_beta)],
    };
    for (k, v) in params.into_iter().flatten() {
        put(&k, v);
    }
    if let Some(f) = s.fraction_train {
        put("fraction-train", ConfigValue::Float(f));
    }
    if let Some(f) = s.fraction_evaluate {
        put("fraction-evaluate", ConfigValue::Float(f));
    }
    let cp = &training.checkpointing;
    if cp.enabled {
        put("checkpoint-enabled", ConfigValue::Bool(true));
        put("checkpoint-interval", int(cp.interval));
        put("checkpoint-path", ConfigValue::String(cp.path.clone()));
    }
    for (k, v) in &training.run_config {
        put(k, v.clone());
    }
    out
}

fn strategy_name(name: StrategyName) -> &'static str {
    match name {
        StrategyName::FedAvg => "FedAvg",
        StrategyName::FedProx => "FedProx",
        StrategyName::FedAdam => "FedAdam",
        StrategyName::Krum => "Krum",
        StrategyName::Bulyan => "Bulyan",
        StrategyName::FedTrimmedAvg => "FedTrimmedAvg",
    }
}

/// Keeps the entries whose key the app declares; returns (kept, dropped keys).
pub fn select_declared(
    entries: IndexMap<String, ConfigValue>,
    declared: &BTreeSet<String>,
) -> (IndexMap<String, ConfigValue>, Vec<String>) {
    let (kept, dropped): (IndexMap<_, _>, IndexMap<_, _>) =
        entries.into_iter().partition(|(k, _)| declared.contains(k));
    (kept, dropped.into_keys().collect())
}

/// One `--run-config` argument: space-separated `key=value` pairs with TOML values, in the
/// subset Flower's parser (`(\S+?)=('[^']*'|"[^"]*"|\S+)`) reads back unchanged.
pub fn render_run_config(entries: &IndexMap<String, ConfigValue>) -> Result<String, SubmitError> {
    let mut parts = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let bad = |reason: &str| SubmitError::RunConfig {
            key: key.clone(),
            reason: reason.to_string(),
        };
        if !config_kv::is_key(key) {
            return Err(bad(&format!("keys may only hold {}", config_kv::KEY_RULE)));
        }
        let v = match value {
            ConfigValue::Bool(b) => b.to_string(),
            ConfigValue::Int(i) => i.to_string(),
            ConfigValue::Float(f) if !f.is_finite() => {
                return Err(bad("NaN and infinity cannot be passed"))
            }
            // Debug keeps a decimal point or exponent, so TOML reads a float back.
            ConfigValue::Float(f) => format!("{f:?}"),
            ConfigValue::String(s) => config_kv::toml_string(s).map_err(bad)?,
        };
        parts.push(format!("{key}={v}"));
    }
    Ok(parts.join(" "))
}

// ------------------------------------------------------------------------------------------
// pyproject.toml and federation config (TOML edited with toml_edit to keep the user's file
// layout and comments intact).

fn parse_toml(text: &str, what: &Path) -> Result<toml_edit::DocumentMut, SubmitError> {
    text.parse::<toml_edit::DocumentMut>()
        .map_err(|e| SubmitError::App {
            path: what.to_path_buf(),
            reason: format!("invalid TOML: {e}"),
        })
}

/// The run-config keys an app declares in `[tool.flwr.app.config]`, nested tables flattened
/// with dots as Flower does.
pub fn declared_config_keys(pyproject: &str, path: &Path) -> Result<BTreeSet<String>, SubmitError> {
    let doc = parse_toml(pyproject, path)?;
    let mut keys = BTreeSet::new();
    let config = doc
        .get("tool")
        .and_then(|t| t.get("flwr"))
        .and_then(|t| t.get("app"))
        .and_then(|t| t.get("config"));
    if let Some(table) = config.and_then(|c| c.as_table_like()) {
        flatten_keys(table, "", &mut keys);
    }
    Ok(keys)
}

fn flatten_keys(table: &dyn toml_edit::TableLike, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, item) in table.iter() {
        let key = if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        };
        match item.as_table_like() {
            Some(inner) => flatten_keys(inner, &key, out),
            None => {
                out.insert(key);
            }
        }
    }
}

/// How the `flwr` CLI learns about SuperLinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FederationMechanism {
    /// ≤ 1.25: a `[tool.flwr.federations.NAME]` table in the app's `pyproject.toml`.
    PyprojectTable,
    /// ≥ 1.26: `[superlink.NAME]` in `$FLWR_HOME/config.toml`.
    FlwrHomeConfig,
}

impl FederationMechanism {
    /// The mechanism the given CLI version reads.
    pub fn for_cli(version: &FlowerVersion) -> Self {
        if (version.major, version.minor) >= (1, 26) {
            Self::FlwrHomeConfig
        } else {
            Self::PyprojectTable
        }
    }
}

/// One federation (SuperLink connection) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Federation {
    /// Its name (the cluster name).
    pub name: String,
    /// Control API `HOST:PORT`.
    pub address: String,
    /// CA file; `None` writes `insecure = true`.
    pub root_certificates: Option<PathBuf>,
}

impl Federation {
    fn table(&self) -> toml_edit::Table {
        let mut t = toml_edit::Table::new();
        t.insert("address", toml_edit::value(self.address.as_str()));
        match &self.root_certificates {
            Some(ca) => t.insert(
                "root-certificates",
                toml_edit::value(ca.to_string_lossy().as_ref()),
            ),
            None => t.insert("insecure", toml_edit::value(true)),
        };
        t
    }
}

/// The app's `pyproject.toml` with `[tool.flwr.federations.<name>]` set to `fed` (replacing an
/// entry of that name; other federations and the rest of the file are kept).
pub fn with_pyproject_federation(
    pyproject: &str,
    path: &Path,
    fed: &Federation,
) -> Result<String, SubmitError> {
    let mut doc = parse_toml(pyproject, path)?;
    let bad = |what: &str| SubmitError::App {
        path: path.to_path_buf(),
        reason: format!("`{what}` is not a table"),
    };
    let mut table = doc.as_table_mut();
    for name in ["tool", "flwr", "federations"] {
        let entry = table.entry(name).or_insert_with(|| {
            let mut t = toml_edit::Table::new();
            t.set_implicit(true);
            toml_edit::Item::Table(t)
        });
        table = entry.as_table_mut().ok_or_else(|| bad(name))?;
    }
    table.insert(&fed.name, toml_edit::Item::Table(fed.table()));
    Ok(doc.to_string())
}

/// The app's `pyproject.toml` without `[tool.flwr.federations]` (≥ 1.26 would migrate it into
/// the private config and could shadow the entry written there).
pub fn without_pyproject_federations(pyproject: &str, path: &Path) -> Result<String, SubmitError> {
    let mut doc = parse_toml(pyproject, path)?;
    if let Some(flwr) = doc
        .get_mut("tool")
        .and_then(|t| t.get_mut("flwr"))
        .and_then(|t| t.as_table_like_mut())
    {
        flwr.remove("federations");
    }
    Ok(doc.to_string())
}

/// `$FLWR_HOME/config.toml` (≥ 1.26) holding `fed` as the default SuperLink connection.
pub fn flwr_home_config(fed: &Federation) -> String {
    let mut doc = toml_edit::DocumentMut::new();
    let mut superlink = toml_edit::Table::new();
    superlink.insert("default", toml_edit::value(fed.name.as_str()));
    superlink.insert(&fed.name, toml_edit::Item::Table(fed.table()));
    doc.insert("superlink", toml_edit::Item::Table(superlink));
    doc.to_string()
}

// ------------------------------------------------------------------------------------------
// The flwr executable and its version

pub use crate::protocol::version::FlowerVersion;

/// Checks the CLI against the cluster's Flower version: same `major.minor` passes (a patch
/// difference yields a note); a different minor is an error unless `allow_mismatch`, which
/// turns it into a warning.
pub fn check_versions(
    cli: FlowerVersion,
    cluster: &str,
    allow_mismatch: bool,
) -> Result<Option<String>, SubmitError> {
    let Ok(want) = FlowerVersion::parse(cluster) else {
        return Err(SubmitError::Target(format!(
            "cluster Flower version {cluster:?} is not X.Y.Z"
        )));
    };
    if cli.same_minor(want) {
        return Ok((cli != want).then(|| {
            format!("flwr CLI {cli} and cluster Flower {want} differ in patch version only")
        }));
    }
    if allow_mismatch {
        return Ok(Some(format!(
            "flwr CLI {cli} and cluster Flower {want} differ in minor version; the run may fail"
        )));
    }
    Err(SubmitError::VersionMismatch {
        cli,
        cluster: cluster.to_string(),
    })
}

/// The `flwr` to use: `explicit` (`--flwr`), else `$FLOWER_VENV/bin/flwr`, else the first
/// `flwr` on `PATH`.
pub fn find_flwr(
    explicit: Option<&Path>,
    flower_venv: Option<&OsStr>,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, SubmitError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(SubmitError::FlwrNotFound {
                tried: vec![format!("--flwr {}", p.display())],
            })
        };
    }
    let mut tried = Vec::new();
    if let Some(venv) = flower_venv.filter(|v| !v.is_empty()) {
        let p = Path::new(venv).join("bin").join("flwr");
        if p.is_file() {
            return Ok(p);
        }
        tried.push(format!("$FLOWER_VENV/bin/flwr ({})", p.display()));
    }
    if let Some(path) = path_var {
        for dir in std::env::split_paths(path) {
            let p = dir.join("flwr");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    tried.push("flwr on PATH".into());
    Err(SubmitError::FlwrNotFound { tried })
}

// ------------------------------------------------------------------------------------------
// Streamed output: run id and metrics

/// Metrics of one round, by phase (`train` and `evaluate` aggregated client metrics).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RoundMetrics {
    /// Round number, from 1.
    pub round: u32,
    /// Aggregated ClientApp train metrics.
    #[serde(default)]
    pub train: BTreeMap<String, f64>,
    /// Aggregated ClientApp evaluate metrics.
    #[serde(default)]
    pub evaluate: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Deserialize)]
struct MetricsReport {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    rounds: Vec<RoundMetrics>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Train,
    Evaluate,
}

/// Reads `flwr run --stream` output line by line.
#[derive(Debug, Default)]
pub struct StreamParser {
    run_id: Option<u64>,
    report: Option<MetricsReport>,
    logged: BTreeMap<u32, RoundMetrics>,
    round: Option<u32>,
    phase: Option<Phase>,
}

static ANSI: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\x1b\[[0-9;?]*[ -/]*[@-~]").unwrap_or_else(|e| unreachable!("{e}"))
});
static STARTED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"Successfully started run (\d+)").unwrap_or_else(|e| unreachable!("{e}"))
});
static ROUND: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\[ROUND (\d+)(?:/\d+)?\]").unwrap_or_else(|e| unreachable!("{e}"))
});
static METRIC: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"'([^']+)':\s*'?([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)'?")
        .unwrap_or_else(|e| unreachable!("{e}"))
});

/// `line` without ANSI colour sequences (Flower colours its log lines).
pub fn strip_ansi(line: &str) -> std::borrow::Cow<'_, str> {
    ANSI.replace_all(line, "")
}

impl StreamParser {
    /// Feeds one output line (ANSI sequences are ignored).
    pub fn feed(&mut self, raw: &str) {
        let line = strip_ansi(raw);
        if let Some(rest) = line
            .find(METRICS_PREFIX)
            .map(|i| &line[i + METRICS_PREFIX.len()..])
        {
            if let Ok(report) = serde_json::from_str::<MetricsReport>(rest.trim()) {
                self.report = Some(report);
            }
            return;
        }
        if let Some(c) = STARTED.captures(&line) {
            self.run_id = c[1].parse().ok();
        } else if let Some(c) = ROUND.captures(&line) {
            self.round = c[1].parse().ok();
            self.phase = None;
        } else if line.contains("aggregate_train:") {
            self.phase = Some(Phase::Train);
        } else if line.contains("aggregate_evaluate:") {
            self.phase = Some(Phase::Evaluate);
        } else if let (Some(round), Some(phase), Some(i)) = (
            self.round,
            self.phase,
            line.find("Aggregated MetricRecord:"),
        ) {
            let entry = self.logged.entry(round).or_insert_with(|| RoundMetrics {
                round,
                ..RoundMetrics::default()
            });
            let map = match phase {
                Phase::Train => &mut entry.train,
                Phase::Evaluate => &mut entry.evaluate,
            };
            for c in METRIC.captures_iter(&line[i..]) {
                if let Ok(v) = c[2].parse::<f64>() {
                    map.insert(c[1].to_string(), v);
                }
            }
            self.phase = None;
        }
    }

    /// The run id `flwr run` printed.
    pub fn run_id(&self) -> Option<u64> {
        self.run_id
    }

    /// Per-round metrics: the app's report if it printed one, else the strategy's log lines.
    pub fn rounds(&self) -> Vec<RoundMetrics> {
        match &self.report {
            Some(r) => r.rounds.clone(),
            None => self.logged.values().cloned().collect(),
        }
    }

    /// The status the app reported in its metrics line.
    pub fn app_status(&self) -> Option<&str> {
        self.report.as_ref().and_then(|r| r.status.as_deref())
    }
}

// ------------------------------------------------------------------------------------------
// Running flwr

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
}

impl Default for SubmitOptions {
    fn default() -> Self {
        Self {
            flwr: None,
            flwr_args: Vec::new(),
            timeout: Duration::from_secs(30 * 60),
            allow_version_mismatch: false,
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

/// Final state of a run as the SuperLink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunStatus {
    /// `finished:completed`.
    Completed,
    /// Any other final status (`finished:failed`, `finished:stopped`), as reported.
    Failed(String),
    /// The status could not be read; the reason.
    Unknown(String),
}

/// What a submitted run produced.
#[derive(Debug, Clone)]
pub struct SubmitOutcome {
    /// The run id, when the run started.
    pub run_id: Option<u64>,
    /// The SuperLink's verdict.
    pub status: RunStatus,
    /// Per-round metrics.
    pub rounds: Vec<RoundMetrics>,
    /// The `--run-config` passed.
    pub run_config: String,
    /// The CLI version used.
    pub flwr_version: FlowerVersion,
    /// Things the user should know (dropped run-config keys, version notes).
    pub warnings: Vec<String>,
    /// Wall time of `flwr run`.
    pub elapsed: Duration,
}

impl SubmitOutcome {
    /// True when the run completed.
    pub fn succeeded(&self) -> bool {
        self.status == RunStatus::Completed
    }

    /// `(round, value)` of an evaluate metric (or, failing that, a train metric) named `key`.
    pub fn series(&self, key: &str) -> Vec<(u32, f64)> {
        self.rounds
            .iter()
            .filter_map(|r| {
                r.evaluate
                    .get(key)
                    .or_else(|| r.train.get(key))
                    .map(|v| (r.round, *v))
            })
            .collect()
    }
}

/// Kills a process group when dropped (unless disarmed): no `flwr` outlives its caller.
struct GroupGuard(Option<nix::unistd::Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (already gone) is fine.
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The private work dir: a copy of the app, the CA file and `FLWR_HOME`.
struct WorkDir {
    _dir: tempfile::TempDir,
    app: PathBuf,
    flwr_home: PathBuf,
}

fn prepare_workdir(
    target: &SubmitTarget,
    app_dir: &Path,
    mechanism: FederationMechanism,
) -> Result<(WorkDir, BTreeSet<String>), SubmitError> {
    let pyproject_path = app_dir.join("pyproject.toml");
    if !pyproject_path.is_file() {
        return Err(SubmitError::App {
            path: app_dir.to_path_buf(),
            reason: "no pyproject.toml (not a Flower app directory)".into(),
        });
    }
    let dir = tempfile::Builder::new()
        .prefix("flower-submit-")
        .tempdir()
        .map_err(io_err("creating the work dir"))?;
    let app = dir.path().join("app");
    let flwr_home = dir.path().join("flwr-home");
    copy_app(app_dir, &app)?;
    std::fs::create_dir(&flwr_home).map_err(io_err("creating FLWR_HOME"))?;
    let ca_file = match &target.ca_pem {
        Some(pem) => {
            let p = dir.path().join("superlink-ca.pem");
            std::fs::write(&p, pem).map_err(io_err("writing the CA file"))?;
            Some(p)
        }
        None => None,
    };
    let fed = Federation {
        name: target.cluster.clone(),
        address: target.control_address.clone(),
        root_certificates: ca_file,
    };
    let copied = app.join("pyproject.toml");
    let text = std::fs::read_to_string(&copied).map_err(io_err("reading pyproject.toml"))?;
    let declared = declared_config_keys(&text, &pyproject_path)?;
    let edited = match mechanism {
        FederationMechanism::PyprojectTable => {
            with_pyproject_federation(&text, &pyproject_path, &fed)?
        }
        FederationMechanism::FlwrHomeConfig => {
            std::fs::write(flwr_home.join("config.toml"), flwr_home_config(&fed))
                .map_err(io_err("writing FLWR_HOME/config.toml"))?;
            without_pyproject_federations(&text, &pyproject_path)?
        }
    };
    std::fs::write(&copied, edited).map_err(io_err("writing the copied pyproject.toml"))?;
    Ok((
        WorkDir {
            _dir: dir,
            app,
            flwr_home,
        },
        declared,
    ))
}

/// Copies an app tree, leaving out VCS data, virtualenvs, caches and Flower credentials;
/// directory symlinks are skipped (no loops), file symlinks are copied as files.
fn copy_app(from: &Path, to: &Path) -> Result<(), SubmitError> {
    const SKIP: &[&str] = &[
        ".git",
        ".venv",
        "venv",
        "__pycache__",
        ".flwr",
        ".credentials",
    ];
    std::fs::create_dir_all(to).map_err(io_err(format!("creating {}", to.display())))?;
    let entries = std::fs::read_dir(from).map_err(io_err(format!("reading {}", from.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", from.display())))?;
        let name = entry.file_name();
        if SKIP.iter().any(|s| OsStr::new(s) == name) {
            continue;
        }
        let src = entry.path();
        let dst = to.join(&name);
        let file_type = entry
            .file_type()
            .map_err(io_err(format!("inspecting {}", src.display())))?;
        if file_type.is_dir() {
            copy_app(&src, &dst)?;
        } else if src.is_file() {
            std::fs::copy(&src, &dst).map_err(io_err(format!("copying {}", src.display())))?;
        }
    }
    Ok(())
}

fn flwr_command(flwr: &Path, home: &Path) -> Command {
    let mut cmd = Command::new(flwr);
    cmd.env("FLWR_HOME", home)
        .env("FLWR_TELEMETRY_ENABLED", "0")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .process_group(0);
    cmd
}

/// Runs a short `flwr` command to completion (bounded), returning stdout.
async fn flwr_output(
    flwr: &Path,
    home: &Path,
    args: &[&OsStr],
    limit: Duration,
) -> Result<String, String> {
    let mut cmd = flwr_command(flwr, home);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| e.to_string())?;
    let mut guard = GroupGuard(child.id().map(|id| nix::unistd::Pid::from_raw(id as i32)));
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| format!("no answer within {}s", limit.as_secs()))?
        .map_err(|e| e.to_string())?;
    guard.kill();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{}: {}", out.status, strip_ansi(err.trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The version of a `flwr` executable (`flwr --version`).
pub async fn flwr_version(flwr: &Path) -> Result<FlowerVersion, SubmitError> {
    let home = tempfile::tempdir().map_err(io_err("creating a temporary FLWR_HOME"))?;
    let fail = |reason: String| SubmitError::FlwrVersion {
        path: flwr.to_path_buf(),
        reason,
    };
    let out = flwr_output(
        flwr,
        home.path(),
        &[OsStr::new("--version")],
        Duration::from_secs(60),
    )
    .await
    .map_err(fail)?;
    FlowerVersion::find_in(&out).ok_or_else(|| fail(format!("unexpected output {:?}", out.trim())))
}

/// The final status of a run, from `flwr ls --run-id`.
async fn run_status(flwr: &Path, work: &WorkDir, federation: &str, run_id: u64) -> RunStatus {
    let id = run_id.to_string();
    let args = [
        OsStr::new("ls"),
        work.app.as_os_str(),
        OsStr::new(federation),
        OsStr::new("--run-id"),
        OsStr::new(&id),
        OsStr::new("--format"),
        OsStr::new("json"),
    ];
    match flwr_output(flwr, &work.flwr_home, &args, Duration::from_secs(60)).await {
        Ok(out) => parse_ls_status(&out),
        Err(e) => RunStatus::Unknown(format!("flwr ls failed: {e}")),
    }
}

/// The status of the first run in `flwr ls --format json` output.
pub fn parse_ls_status(json: &str) -> RunStatus {
    #[derive(Deserialize)]
    struct Ls {
        #[serde(default)]
        runs: Vec<LsRun>,
    }
    #[derive(Deserialize)]
    struct LsRun {
        status: String,
    }
    match serde_json::from_str::<Ls>(json.trim()) {
        Ok(ls) => match ls.runs.first() {
            Some(r) if r.status == "finished:completed" => RunStatus::Completed,
            Some(r) => RunStatus::Failed(r.status.clone()),
            None => RunStatus::Unknown("flwr ls listed no run".into()),
        },
        Err(e) => RunStatus::Unknown(format!("unreadable flwr ls output: {e}")),
    }
}

/// Submits `app_dir` to `target` with the run config rendered from `training`, streaming each
/// output line (ANSI-stripped) to `on_line`, and returns the run's outcome and metrics.
pub async fn submit(
    target: &SubmitTarget,
    training: &TrainingSpec,
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
    let (entries, dropped) = select_declared(run_config_entries(training), &declared);
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

/// Best effort: asks the SuperLink to stop a run we gave up waiting for.
async fn stop_run(flwr: &Path, work: &WorkDir, federation: &str, run_id: u64) {
    let id = run_id.to_string();
    let args = [
        OsStr::new("stop"),
        OsStr::new(&id),
        work.app.as_os_str(),
        OsStr::new(federation),
    ];
    if let Err(e) = flwr_output(flwr, &work.flwr_home, &args, Duration::from_secs(30)).await {
        tracing::warn!(run_id, error = %e, "could not stop the timed-out run");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StrategySpec;

    fn v(major: u32, minor: u32, patch: u32) -> FlowerVersion {
        FlowerVersion {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn run_config_defaults_render_flower_parsable_pairs() {
        let rc = render_run_config(&run_config_entries(&TrainingSpec::default())).unwrap();
        assert_eq!(
            rc,
            "num-server-rounds=3 strategy=\"FedAvg\" min-fit-clients=2 min-train-nodes=2 \
             min-evaluate-clients=2 min-available-clients=2"
        );
    }

    #[test]
    fn run_config_carries_strategy_parameters_checkpoints_and_overrides() {
        let mut t = TrainingSpec {
            strategy: StrategySpec {
                name: StrategyName::FedAdam,
                server_learning_rate: Some(0.01),
                client_learning_rate: Some(1e-5),
                proximal_mu: Some(3.0), // not FedProx: left out
                fraction_evaluate: Some(0.5),
                ..StrategySpec::default()
            },
            num_rounds: 7,
            ..TrainingSpec::default()
        };
        t.checkpointing.enabled = true;
        t.run_config
            .insert("num-server-rounds".into(), ConfigValue::Int(9));
        t.run_config
            .insert("note".into(), ConfigValue::String("it's \"x\"".into()));
        let entries = run_config_entries(&t);
        assert_eq!(entries["num-server-rounds"], ConfigValue::Int(9));
        assert!(!entries.contains_key("proximal-mu"));
        let err = render_run_config(&entries).unwrap_err().to_string();
        assert!(err.starts_with("training.runConfig.note:"), "{err}");
        t.run_config
            .insert("note".into(), ConfigValue::String("say \"hi\"".into()));
        let rc = render_run_config(&run_config_entries(&t)).unwrap();
        assert!(
            rc.contains(" server-lr=0.01 client-lr=1e-5 fraction-evaluate=0.5 "),
            "{rc}"
        );
        assert!(rc.contains("checkpoint-enabled=true checkpoint-interval=5 checkpoint-path=\"/opt/flower/checkpoints\""), "{rc}");
        assert!(rc.starts_with("num-server-rounds=9 "), "{rc}");
        assert!(rc.ends_with(" note='say \"hi\"'"), "{rc}");
    }

    #[test]
    fn run_config_values_round_trip_through_toml() {
        let mut entries = IndexMap::new();
        entries.insert("a".to_string(), ConfigValue::Float(1.0));
        entries.insert("b".to_string(), ConfigValue::Float(-2.5e-7));
        entries.insert("c".to_string(), ConfigValue::String("x y\\z".into()));
        entries.insert("d.e".to_string(), ConfigValue::Bool(false));
        let rc = render_run_config(&entries).unwrap();
        // What Flower does: split on its regex, join as TOML lines, parse.
        let re = Regex::new(r#"(\S+?)=('[^']*'|"[^"]*"|\S+)"#).unwrap();
        let toml: String = re
            .captures_iter(&rc)
            .map(|c| format!("{} = {}\n", &c[1], &c[2]))
            .collect();
        let doc: toml_edit::DocumentMut = toml.parse().unwrap();
        assert_eq!(doc["a"].as_float(), Some(1.0));
        assert_eq!(doc["b"].as_float(), Some(-2.5e-7));
        assert_eq!(doc["c"].as_str(), Some("x y\\z"));
        assert_eq!(doc["d"]["e"].as_bool(), Some(false));
    }

    #[test]
    fn run_config_rejects_what_flower_cannot_read() {
        for (key, value) in [
            ("bad key", ConfigValue::Int(1)),
            ("a..b", ConfigValue::Int(1)),
            ("x", ConfigValue::Float(f64::NAN)),
            ("x", ConfigValue::String("two\nlines".into())),
        ] {
            let mut m = IndexMap::new();
            m.insert(key.to_string(), value);
            let err = render_run_config(&m).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("training.runConfig.{key}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn only_declared_keys_are_passed() {
        let toml = "[tool.flwr.app.config]\nnum-server-rounds = 3\nstrategy = \"FedAvg\"\n\
                    [tool.flwr.app.config.opt]\nlr = 0.1\n";
        let declared = declared_config_keys(toml, Path::new("p.toml")).unwrap();
        assert_eq!(
            declared.iter().map(String::as_str).collect::<Vec<_>>(),
            ["num-server-rounds", "opt.lr", "strategy"]
        );
        let (kept, dropped) =
            select_declared(run_config_entries(&TrainingSpec::default()), &declared);
        assert_eq!(
            kept.keys().collect::<Vec<_>>(),
            ["num-server-rounds", "strategy"]
        );
        assert!(dropped.contains(&"min-fit-clients".to_string()));
    }

    const PYPROJECT: &str = "# my app\n[project]\nname = \"x\" # keep me\n\n\
        [tool.flwr.app]\npublisher = \"me\"\n\n\
        [tool.flwr.federations]\ndefault = \"local\"\n\n\
        [tool.flwr.federations.local]\noptions.num-supernodes = 2\n\n\
        [tool.flwr.federations.demo]\naddress = \"old:1\"\ninsecure = true\n";

    #[test]
    fn pyproject_federation_is_set_and_the_rest_kept() {
        let fed = Federation {
            name: "demo".into(),
            address: "127.0.9.1:9093".into(),
            root_certificates: Some(PathBuf::from("/w/ca.pem")),
        };
        let out = with_pyproject_federation(PYPROJECT, Path::new("p"), &fed).unwrap();
        assert!(
            out.starts_with("# my app\n[project]\nname = \"x\" # keep me\n"),
            "{out}"
        );
        let doc: toml_edit::DocumentMut = out.parse().unwrap();
        let feds = &doc["tool"]["flwr"]["federations"];
        assert_eq!(feds["default"].as_str(), Some("local"));
        assert_eq!(
            feds["local"]["options"]["num-supernodes"].as_integer(),
            Some(2)
        );
        assert_eq!(feds["demo"]["address"].as_str(), Some("127.0.9.1:9093"));
        assert_eq!(
            feds["demo"]["root-certificates"].as_str(),
            Some("/w/ca.pem")
        );
        assert!(feds["demo"].get("insecure").is_none());

        // No federations table yet, insecure target.
        let bare = "[project]\nname = \"x\"\n";
        let fed = Federation {
            root_certificates: None,
            ..fed
        };
        let out = with_pyproject_federation(bare, Path::new("p"), &fed).unwrap();
        assert_eq!(
            out,
            "[project]\nname = \"x\"\n\n[tool.flwr.federations.demo]\naddress = \"127.0.9.1:9093\"\ninsecure = true\n"
        );
        let err = with_pyproject_federation("tool = 1\n", Path::new("p.toml"), &fed)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "app p.toml: `tool` is not a table");
        let err = with_pyproject_federation("[x\n", Path::new("p.toml"), &fed)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("app p.toml: invalid TOML"), "{err}");
    }

    #[test]
    fn flwr_home_config_for_newer_clis() {
        let fed = Federation {
            name: "demo".into(),
            address: "h:9093".into(),
            root_certificates: Some(PathBuf::from("/w/ca.pem")),
        };
        assert_eq!(
            flwr_home_config(&fed),
            "[superlink]\ndefault = \"demo\"\n\n[superlink.demo]\naddress = \"h:9093\"\nroot-certificates = \"/w/ca.pem\"\n"
        );
        let out = without_pyproject_federations(PYPROJECT, Path::new("p")).unwrap();
        assert!(!out.contains("federations"), "{out}");
        assert!(out.contains("publisher = \"me\""));
        assert_eq!(
            FederationMechanism::for_cli(&v(1, 25, 0)),
            FederationMechanism::PyprojectTable
        );
        assert_eq!(
            FederationMechanism::for_cli(&v(1, 26, 0)),
            FederationMechanism::FlwrHomeConfig
        );
        assert_eq!(
            FederationMechanism::for_cli(&v(2, 0, 0)),
            FederationMechanism::FlwrHomeConfig
        );
    }

    #[test]
    fn version_check_refuses_a_minor_mismatch() {
        assert_eq!(
            FlowerVersion::find_in("Flower version: 1.25.0\n"),
            Some(v(1, 25, 0))
        );
        assert_eq!(FlowerVersion::find_in("Flower version: dev"), None);
        assert_eq!(check_versions(v(1, 25, 0), "1.25.0", false).unwrap(), None);
        assert!(check_versions(v(1, 25, 2), "1.25.0", false)
            .unwrap()
            .unwrap()
            .contains("patch"));
        let err = check_versions(v(1, 26, 0), "1.25.0", false).unwrap_err();
        assert!(matches!(err, SubmitError::VersionMismatch { .. }));
        assert!(err
            .to_string()
            .contains("flwr CLI 1.26.0 and cluster Flower 1.25.0"));
        assert!(check_versions(v(1, 26, 0), "1.25.0", true)
            .unwrap()
            .unwrap()
            .contains("may fail"));
        assert!(check_versions(v(1, 25, 0), "latest", false).is_err());
    }

    #[test]
    fn flwr_is_found_explicitly_then_in_the_venv_then_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let venv_bin = dir.path().join("venv/bin");
        let path_dir = dir.path().join("path");
        std::fs::create_dir_all(&venv_bin).unwrap();
        std::fs::create_dir_all(&path_dir).unwrap();
        std::fs::write(path_dir.join("flwr"), "").unwrap();
        let venv = dir.path().join("venv");
        let path_var = std::env::join_paths([dir.path().join("none"), path_dir.clone()]).unwrap();
        // venv without flwr: falls through to PATH.
        assert_eq!(
            find_flwr(None, Some(venv.as_os_str()), Some(&path_var)).unwrap(),
            path_dir.join("flwr")
        );
        std::fs::write(venv_bin.join("flwr"), "").unwrap();
        assert_eq!(
            find_flwr(None, Some(venv.as_os_str()), Some(&path_var)).unwrap(),
            venv_bin.join("flwr")
        );
        let missing = dir.path().join("nope");
        let err = find_flwr(Some(&missing), Some(venv.as_os_str()), Some(&path_var)).unwrap_err();
        assert!(err.to_string().contains("--flwr"), "{err}");
        let err = find_flwr(None, None, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "flwr executable not found (tried: flwr on PATH)"
        );
    }

    #[test]
    fn target_from_published_attributes() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let b64 = pem::encode(pem.as_bytes());
        let t = SubmitTarget::from_published("c1", "10.0.0.5:9092", 9093, Some(&b64), "1.25.0")
            .unwrap();
        assert_eq!(t.control_address, "10.0.0.5:9093");
        assert_eq!(t.ca_pem.as_deref(), Some(pem));
        let t = SubmitTarget::from_published("c1", "[fd00::5]:9092", 9000, None, "1.25.0").unwrap();
        assert_eq!(
            (t.control_address.as_str(), t.ca_pem),
            ("[fd00::5]:9000", None)
        );
        assert!(SubmitTarget::from_published("c1", "10.0.0.5", 9093, None, "1.25.0").is_err());
        let err = SubmitTarget::from_published("c1", "h:1", 9093, Some("!!"), "1.25.0")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("FL_CA_CERT of cluster c1: is not base64"),
            "{err}"
        );
    }

    fn observation(control_api: &str) -> (crate::plan::LiveState, Vec<crate::one::VmRecord>) {
        use crate::plan::{
            AgentAttributes, AppliedSpec, LcmState, LiveRole, LiveService, LiveVm, Owner,
            ServiceState, VmState,
        };
        let vm = LiveVm {
            id: 42,
            name: "superlink_0".into(),
            state: VmState::Active,
            lcm_state: LcmState::Running,
            stime: None,
            attrs: AgentAttributes {
                endpoint: Some("10.0.0.5:9092".into()),
                version: Some("1.25.1".into()),
                ca_cert_present: true,
                ..AgentAttributes::default()
            },
        };
        let fields = [
            ("spec.superlink.ports.control", "9443"),
            ("spec.superlink.controlApi", control_api),
            ("spec.flowerVersion", "1.25.0"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
        let service = LiveService {
            service_id: 7,
            name: "c1".into(),
            owner: Owner {
                cluster: "c1".into(),
                spec_hash: "h".into(),
                controller: "ctl".into(),
            },
            state: ServiceState::Running,
            applied: Some(AppliedSpec { format: 1, fields }),
            superlink: LiveRole {
                cardinality: 1,
                nodes: vec![vm],
                ..LiveRole::default()
            },
            supernode: LiveRole::default(),
        };
        let mut live = crate::plan::LiveState::default();
        live.clusters.insert("c1".into(), vec![service]);
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let record = crate::one::VmRecord {
            id: 42,
            uid: 0,
            name: "superlink_0".into(),
            state: crate::one::model::VmState::Active,
            lcm_state: crate::one::model::LcmState::Running,
            stime: 0,
            user_template: [
                ("FL_TLS", "YES".to_string()),
                ("FL_CA_CERT", pem::encode(pem.as_bytes())),
            ]
            .map(|(k, v)| (k.to_string(), v))
            .into(),
        };
        (live, vec![record])
    }

    #[test]
    fn target_from_an_observation() {
        let (live, vms) = observation("network");
        let t = target_from_observation("c1", &live, &vms, None).unwrap();
        assert_eq!(t.control_address, "10.0.0.5:9443");
        assert_eq!(t.flower_version, "1.25.1");
        assert!(t.ca_pem.unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
        let err = target_from_observation("c2", &live, &vms, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "target: cluster c2: no managed OneFlow service (was it applied?)"
        );
        // TLS on but no CA published yet.
        let err = target_from_observation("c1", &live, &vms[..0], None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "target: cluster c1: the SuperLink (VM 42) runs TLS but has not published FL_CA_CERT"
        );

        let (live, vms) = observation("loopback");
        let err = target_from_observation("c1", &live, &vms, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ssh -L 9093:127.0.0.1:9443 root@10.0.0.5"),
            "{err}"
        );
        let t = target_from_observation("c1", &live, &vms, Some("127.0.0.1:9093")).unwrap();
        assert_eq!(t.control_address, "127.0.0.1:9093");
    }

    #[test]
    fn stream_parser_reads_run_id_report_and_strategy_logs() {
        let lines = [
            "\u{1b}[92m🎊 Successfully started run 4297816583992648364\u{1b}[0m",
            "\u{1b}[92mINFO \u{1b}[0m:      [ROUND 1/2]",
            "INFO :      aggregate_train: Received 2 results and 0 failures",
            "INFO :      \t└──> Aggregated MetricRecord: {'train_loss': 1.28, 'acc': 5}",
            "INFO :      aggregate_evaluate: Received 2 results and 0 failures",
            "INFO :      \t└──> Aggregated MetricRecord: {'eval_loss': 0.23}",
            "INFO :      [ROUND 2/2]",
            "INFO :      aggregate_evaluate: Received 2 results and 0 failures",
            "INFO :      \t└──> Aggregated MetricRecord: {'eval_loss': 2.8e-02}",
        ];
        let mut p = StreamParser::default();
        for l in lines {
            p.feed(l);
        }
        assert_eq!(p.run_id(), Some(4297816583992648364));
        let rounds = p.rounds();
        assert_eq!(rounds.len(), 2);
        assert_eq!(rounds[0].train["train_loss"], 1.28);
        assert_eq!(rounds[0].train["acc"], 5.0);
        assert_eq!(rounds[1].evaluate["eval_loss"], 0.028);
        assert_eq!(p.app_status(), None);

        // The app's report wins over log scraping.
        p.feed(r#"FLOWER_RECONCILE_METRICS {"status":"completed","rounds":[{"round":1,"train":{"train_loss":2.0},"evaluate":{"eval_loss":1.0}}]}"#);
        assert_eq!(p.app_status(), Some("completed"));
        assert_eq!(p.rounds().len(), 1);
        assert_eq!(p.rounds()[0].evaluate["eval_loss"], 1.0);
    }

    #[test]
    fn ls_status_is_parsed() {
        let ok = r#"{"success": true, "runs": [{"run-id": "1", "status": "finished:completed"}]}"#;
        assert_eq!(parse_ls_status(ok), RunStatus::Completed);
        let failed = r#"{"runs": [{"status": "finished:failed"}]}"#;
        assert_eq!(
            parse_ls_status(failed),
            RunStatus::Failed("finished:failed".into())
        );
        assert!(matches!(
            parse_ls_status("{\"runs\": []}"),
            RunStatus::Unknown(_)
        ));
        assert!(matches!(parse_ls_status("oops"), RunStatus::Unknown(_)));
    }

    #[test]
    fn app_copy_leaves_out_caches_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for d in ["pkg/__pycache__", ".git", ".venv/lib", ".flwr"] {
            std::fs::create_dir_all(src.join(d)).unwrap();
        }
        std::fs::write(src.join("pyproject.toml"), "[project]\n").unwrap();
        std::fs::write(src.join("pkg/m.py"), "x = 1\n").unwrap();
        std::fs::write(src.join("pkg/__pycache__/m.pyc"), "").unwrap();
        std::fs::write(src.join(".credentials"), "secret").unwrap();
        let dst = dir.path().join("dst");
        copy_app(&src, &dst).unwrap();
        assert!(dst.join("pkg/m.py").is_file());
        for gone in ["pkg/__pycache__", ".git", ".venv", ".flwr", ".credentials"] {
            assert!(!dst.join(gone).exists(), "{gone} copied");
        }
    }
}
