//! Reading the OpenNebula context (`one_env`) into a typed, validated [`Config`].
//!
//! Every value that can reach a command line, a unit file or OneGate goes through an
//! allow-list here; all problems are collected and reported together.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;

use super::error::IoError;

use crate::protocol::context as ctx;
use crate::protocol::{boolean, duration, endpoint, path, pem, version};

/// Parsed `one_env`: variable → value, empty values dropped (empty means unset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    vars: BTreeMap<String, String>,
}

impl Context {
    /// Builds a context from pairs (tests, onesim); empty values are dropped.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let vars = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(_, v): &(String, String)| !v.is_empty())
            .collect();
        Self { vars }
    }

    /// A variable's value; `None` when unset or empty.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// Every variable.
    pub fn vars(&self) -> &BTreeMap<String, String> {
        &self.vars
    }

    /// Sets `key` to `value` when the context leaves it unset (an image default).
    pub fn set_default(&mut self, key: &str, value: &str) {
        if !value.is_empty() {
            self.vars
                .entry(key.to_string())
                .or_insert_with(|| value.to_string());
        }
    }

    /// Reads and parses a one_env file.
    pub fn load(path: &Path) -> Result<(Self, Vec<String>), IoError> {
        let text = std::fs::read_to_string(path).map_err(IoError::at(path))?;
        Ok(parse_one_env(&text, &path.display().to_string()))
    }
}

static KEY_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*$").unwrap());

/// Parses one_env text: `export KEY="value"` lines (one-context writes values double-quoted
/// without escaping, multi-line values span lines); `KEY='v'` and `KEY=v` are tolerated.
/// Returns the context and warnings (`file:line: ...`) for lines that were skipped.
pub fn parse_one_env(text: &str, origin: &str) -> (Context, Vec<String>) {
    let mut vars = BTreeMap::new();
    let mut warnings = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let lineno = i + 1;
        let raw = lines[i].trim_start();
        i += 1;
        if raw.is_empty() || raw.starts_with('#') {
            continue;
        }
        let body = raw.strip_prefix("export ").unwrap_or(raw).trim_start();
        let Some((key, rest)) = body.split_once('=') else {
            warnings.push(format!("{origin}:{lineno}: skipped a line without '='"));
            continue;
        };
        if !KEY_RE.is_match(key) {
            warnings.push(format!(
                "{origin}:{lineno}: skipped an invalid variable name"
            ));
            continue;
        }
        let value = match rest.chars().next() {
            // Shell single quotes: OpenNebula's context.sh and the agent's own one_env
            // ([`one_env_text`]) escape a quote as `'\''`.
            Some('\'') => scan_single_quoted(&rest[1..], &lines, &mut i),
            Some(q @ '"') => {
                // Closing quote may be on a later line (multi-line values).
                let mut acc = rest[1..].to_string();
                loop {
                    if let Some(stripped) = acc.trim_end().strip_suffix(q) {
                        break Some(stripped.to_string());
                    }
                    if i >= lines.len() {
                        break None;
                    }
                    acc.push('\n');
                    acc.push_str(lines[i]);
                    i += 1;
                }
            }
            _ => Some(rest.trim_end().to_string()),
        };
        match value {
            Some(v) => {
                if v.is_empty() {
                    vars.remove(key);
                } else {
                    vars.insert(key.to_string(), v);
                }
            }
            None => warnings.push(format!(
                "{origin}:{lineno}: unterminated quoted value for {key}"
            )),
        }
    }
    (Context { vars }, warnings)
}

/// The value of a single-quoted assignment starting with `first` (after the opening
/// quote); continues over `lines[*i..]` for multi-line values. `None` when unterminated.
fn scan_single_quoted(first: &str, lines: &[&str], i: &mut usize) -> Option<String> {
    let mut out = String::new();
    let mut cur = first.to_string();
    loop {
        let mut rest = cur.as_str();
        while let Some(pos) = rest.find('\'') {
            out.push_str(&rest[..pos]);
            match rest[pos + 1..].strip_prefix("\\''") {
                Some(more) => {
                    out.push('\'');
                    rest = more;
                }
                // The closing quote; what follows it is not part of the value.
                None => return Some(out),
            }
        }
        out.push_str(rest);
        if *i >= lines.len() {
            return None;
        }
        out.push('\n');
        cur = lines[*i].to_string();
        *i += 1;
    }
}

/// `one_env` text for `vars`: `export KEY='value'` lines with quotes escaped as `'\''`, so
/// a POSIX shell (the one-apps lifecycle sources this file) and [`parse_one_env`] both read
/// back exactly `vars` (test `single_quotes_follow_the_shell_and_one_env_text_round_trips`).
/// Keys that are not shell names are skipped.
pub fn one_env_text(vars: &BTreeMap<String, String>) -> String {
    let mut s = String::from("# Written by flower-agent context.\n");
    for (k, v) in vars {
        if KEY_RE.is_match(k) {
            s.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
        }
    }
    s
}

/// Node role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The coordinator.
    Superlink,
    /// A training node.
    Supernode,
}

impl Role {
    /// Lower-case name, as published in `FL_ROLE` and used by OneFlow role names.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Superlink => "superlink",
            Role::Supernode => "supernode",
        }
    }

    /// Parses `superlink` / `supernode` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "superlink" => Some(Role::Superlink),
            "supernode" => Some(Role::Supernode),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the agent runs Flower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// systemd units running the Flower container images.
    Docker,
    /// The agent spawns `flower-superlink` / `flower-supernode` itself.
    Process,
}

/// Flower log level (`FLWR_LOG_LEVEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LogLevel {
    /// DEBUG
    Debug,
    /// INFO
    Info,
    /// WARNING
    Warning,
    /// ERROR
    Error,
}

impl LogLevel {
    /// Flower's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "DEBUG",
            LogLevel::Info => "INFO",
            LogLevel::Warning => "WARNING",
            LogLevel::Error => "ERROR",
        }
    }
}

/// Agent log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// JSON lines.
    Json,
}

/// Flower `--isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// ClientApp/ServerApp in a subprocess (default).
    Subprocess,
    /// Separate long-running process.
    Process,
}

impl Isolation {
    /// Flower's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Subprocess => "subprocess",
            Isolation::Process => "process",
        }
    }
}

/// Where the Control API listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlBind {
    /// Loopback only (reach it through an SSH tunnel).
    Loopback,
    /// The VM address (hosts submit runs directly).
    Vm,
}

/// TLS material source on the SuperLink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// The agent generates a CA and a server certificate.
    Auto,
    /// Certificates come from the context (base64 PEM).
    Provided,
}

/// SuperNode ML framework (selects the docker image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Framework {
    /// PyTorch image.
    Pytorch,
    /// TensorFlow image.
    Tensorflow,
    /// scikit-learn image.
    Sklearn,
    /// Plain `flwr/supernode` image.
    None,
}

impl Framework {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Framework::Pytorch => "pytorch",
            Framework::Tensorflow => "tensorflow",
            Framework::Sklearn => "sklearn",
            Framework::None => "none",
        }
    }
}

pub use crate::protocol::config_kv::NodeConfig;
pub use crate::protocol::endpoint::HostPort;

static DB_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9._-][A-Za-z0-9._/-]*$").unwrap());
static CUDA_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^(all|\d{1,3}(,\d{1,3})*)$").unwrap());
static NAME_RE: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[A-Za-z0-9._-]{1,63}$").unwrap());
static TOKEN_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9+/=_-]{1,4096}$").unwrap());

/// Extra subject alternative name for the server certificate (the protocol's codec).
pub use crate::protocol::san::San;

/// Secret value: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Certificates provided through the context (decoded PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvidedTls {
    /// CA certificate PEM.
    pub ca_pem: String,
    /// Server certificate (chain) PEM.
    pub cert_pem: String,
    /// Server key PEM.
    pub key_pem: Secret,
}

/// The typed, validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// OpenNebula VM id (`VMID`).
    pub vmid: Option<u64>,
    /// OneGate base URL (`ONEGATE_ENDPOINT`).
    pub onegate_endpoint: Option<url::Url>,
    /// OneGate token (`TOKENTXT`).
    pub onegate_token: Option<Secret>,
    /// VM address (`ETH0_IP`).
    pub vm_ip: Option<IpAddr>,
    /// Flower version.
    pub version: String,
    /// TLS on.
    pub tls: bool,
    /// Flower log level.
    pub log_level: LogLevel,
    /// Agent log format.
    pub log_format: LogFormat,
    /// Flower isolation.
    pub isolation: Isolation,
    /// Runtime.
    pub runtime: Runtime,
    /// Process runtime: directory with the Flower executables.
    pub flower_bin_dir: Option<PathBuf>,
    /// FL_HEARTBEAT refresh interval.
    pub heartbeat_interval: Duration,
    /// Cluster name (logs only).
    pub cluster_name: Option<String>,
    /// Role given in context (`ONEAPP_FL_ROLE`), if any.
    pub role: Option<Role>,
    /// Fleet API port.
    pub fleet_port: u16,
    /// Control API port.
    pub control_port: u16,
    /// ServerAppIo port.
    pub serverappio_port: u16,
    /// Control API bind.
    pub control_bind: ControlBind,
    /// Persistent SuperLink state.
    pub persistent_state: bool,
    /// Relative database path inside the state dir.
    pub database: String,
    /// TLS mode.
    pub tls_mode: TlsMode,
    /// Provided certificates (SuperLink, provided mode).
    pub provided: Option<ProvidedTls>,
    /// Operator CA for SuperNodes (`ONEAPP_FL_SSL_CA_CERTFILE`).
    pub ca_override: Option<String>,
    /// Validity of generated certificates.
    pub cert_validity: Duration,
    /// Renew the serving certificate this long before expiry.
    pub cert_renew_before: Duration,
    /// Extra SANs.
    pub extra_san: Vec<San>,
    /// Metrics on.
    pub metrics_enabled: bool,
    /// Metrics port.
    pub metrics_port: u16,
    /// Framework (docker image choice).
    pub framework: Framework,
    /// Static SuperLink address.
    pub superlink_address: Option<HostPort>,
    /// Explicit node config.
    pub node_config: Option<NodeConfig>,
    /// `--max-retries`.
    pub max_retries: u32,
    /// `--max-wait-time`.
    pub max_wait_time: u32,
    /// Discovery timeout.
    pub discovery_timeout: Duration,
    /// Training data directory (absolute, on the VM).
    pub data_dir: PathBuf,
    /// ClientAppIo port.
    pub clientappio_port: u16,
    /// GPU requested.
    pub gpu_enabled: bool,
    /// `CUDA_VISIBLE_DEVICES`.
    pub cuda_visible_devices: String,
    /// GPU memory fraction.
    pub gpu_memory_fraction: f64,
    /// DCGM exporter on.
    pub dcgm_enabled: bool,
    /// SuperLink: the controller's Ed25519 public key (`ONEAPP_FL_CONTROLLER_KEY`, 32
    /// bytes). Rotation requests are acted on only with its valid signature.
    pub controller_key: Option<Vec<u8>>,
    /// SuperLink: the default run configuration its training variables describe
    /// (published as `FL_RUN_CONFIG`); the checkpoint path is the VM path.
    pub training: Training,
    /// SuperNode: waits between SuperLink discovery attempts.
    pub backoff: Backoff,
    /// Values accepted with a caveat, and unknown `ONEAPP_FL_*` names: logged, shown by
    /// `status`, published as `FL_WARNING`.
    pub warnings: Vec<ConfigError>,
}

/// Waits between SuperLink discovery attempts (`ONEAPP_FL_EDGE_BACKOFF`,
/// `ONEAPP_FL_EDGE_MAX_BACKOFF`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Backoff {
    /// Doubling from 0.5 s (`exponential`), or always `max` (`fixed`).
    pub exponential: bool,
    /// Longest wait.
    pub max: Duration,
}

impl Backoff {
    /// The wait before attempt `attempt + 1`.
    pub fn wait(&self, attempt: u32) -> Duration {
        if !self.exponential {
            return self.max;
        }
        let ms = 500u64.saturating_mul(1u64 << attempt.min(20));
        Duration::from_millis(ms).min(self.max)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            exponential: true,
            max: Duration::from_secs(5),
        }
    }
}

pub use crate::protocol::run_config::{Checkpoint, Training};

/// Default Flower version: the project's pinned version.
pub const DEFAULT_FLOWER_VERSION: &str = version::DEFAULT;

/// One validation problem: the variable and what is wrong (never the secret value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    /// Context variable name.
    pub var: String,
    /// What is wrong.
    pub message: String,
}

/// All validation problems of a context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} invalid context value(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Collects errors while reading variables with defaults.
struct Reader<'a> {
    ctx: &'a Context,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
}

impl Reader<'_> {
    fn err(&mut self, var: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            var: var.to_string(),
            message: message.into(),
        });
    }

    /// Reads `var` and converts it; on failure records an error (showing the value only
    /// when `show` is set) and returns `default`.
    fn parse<T>(&mut self, var: &str, default: T, f: impl FnOnce(&str) -> Result<T, String>) -> T {
        match self.ctx.get(var) {
            None => default,
            Some(v) => match f(v) {
                Ok(t) => t,
                Err(e) => {
                    let shown = shown_value(v);
                    self.err(var, format!("{e} (got {shown})"));
                    default
                }
            },
        }
    }

    fn warn(&mut self, var: &str, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            var: var.to_string(),
            message: message.into(),
        });
    }

    fn opt<T>(&mut self, var: &str, f: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        self.parse(var, None, |v| f(v).map(Some))
    }

    fn flag(&mut self, var: &str, default: bool) -> bool {
        self.parse(var, default, |v| {
            boolean::parse(v).ok_or_else(|| boolean::RULE.to_string())
        })
    }

    fn port(&mut self, var: &str, default: u16) -> u16 {
        self.parse(var, default, endpoint::parse_port)
    }

    fn duration(&mut self, var: &str, default: Duration) -> Duration {
        self.parse(var, default, duration::parse_positive)
    }

    fn secret_b64_pem(&mut self, var: &str) -> Option<String> {
        let v = self.ctx.get(var)?;
        match pem::decode(v) {
            Ok(p) => Some(p),
            Err(e) => {
                self.err(var, e);
                None
            }
        }
    }
}

/// The seed's variables beyond this agent's own spellings (seed-facts §1.4): addresses,
/// the training defaults, keepalive, unknown names.
impl Reader<'_> {
    /// `FLEET_API_ADDRESS` / `CONTROL_API_ADDRESS` onto the ports and the Control API bind;
    /// each conflicts with an explicit own-spelling variable that disagrees.
    fn seed_addresses(
        &mut self,
        vm_ip: Option<IpAddr>,
        fleet_port: u16,
        control_port: u16,
        control_bind: ControlBind,
    ) -> (u16, u16, ControlBind) {
        use ctx::*;
        let is_vm = |h: &str| vm_ip.is_some_and(|ip| h.parse::<IpAddr>().ok() == Some(ip));
        let any = |h: &str| matches!(h, "0.0.0.0" | "::");
        let mut fleet = fleet_port;
        if let Some(a) = self.opt(FLEET_API_ADDRESS, endpoint::parse) {
            if any(&a.host) {
                self.warn(
                    FLEET_API_ADDRESS,
                    "all interfaces narrowed to the VM address (Flower ports never listen on 0.0.0.0)",
                );
            } else if !is_vm(&a.host) {
                self.err(
                    FLEET_API_ADDRESS,
                    "the host must be 0.0.0.0 or the VM address (ETH0_IP)",
                );
            }
            if self.ctx.get(FLEET_PORT).is_some() && fleet_port != a.port {
                self.err(
                    FLEET_API_ADDRESS,
                    format!("its port disagrees with {FLEET_PORT}"),
                );
            }
            fleet = a.port;
        }
        let (mut control, mut bind) = (control_port, control_bind);
        if let Some(a) = self.opt(CONTROL_API_ADDRESS, endpoint::parse) {
            let wanted = if matches!(a.host.as_str(), "127.0.0.1" | "localhost" | "::1") {
                Some(ControlBind::Loopback)
            } else if is_vm(&a.host) {
                Some(ControlBind::Vm)
            } else if any(&a.host) {
                self.err(
                    CONTROL_API_ADDRESS,
                    "all interfaces are refused: the Control API runs submitted code; use 127.0.0.1:<port> (SSH tunnel) or <VM address>:<port>",
                );
                None
            } else {
                self.err(
                    CONTROL_API_ADDRESS,
                    "the host must be 127.0.0.1 or the VM address (ETH0_IP)",
                );
                None
            };
            if let Some(w) = wanted {
                if self.ctx.get(CONTROL_BIND).is_some() && w != control_bind {
                    self.err(
                        CONTROL_API_ADDRESS,
                        format!("its host disagrees with {CONTROL_BIND}"),
                    );
                }
                bind = w;
            }
            if self.ctx.get(CONTROL_PORT).is_some() && control_port != a.port {
                self.err(
                    CONTROL_API_ADDRESS,
                    format!("its port disagrees with {CONTROL_PORT}"),
                );
            }
            control = a.port;
        }
        (fleet, control, bind)
    }

    /// The training variables, with the rules `spec.training` obeys
    /// ([`crate::protocol::run_config`]).
    fn training(&mut self) -> Training {
        use crate::protocol::run_config::{check_param, malicious_need, uses, Param, STRATEGIES};
        use ctx::*;
        let rounds = self.parse(NUM_ROUNDS, 3, |v| bounded(v, 1, 1_000_000));
        let strategy = self.parse(STRATEGY, STRATEGIES[0], |v| {
            let options: Vec<(&str, &'static str)> = STRATEGIES.iter().map(|s| (*s, *s)).collect();
            enum_of(v, &options)
        });
        let fit = self.parse(MIN_FIT_CLIENTS, 2, |v| bounded(v, 1, 100_000));
        let eval = self.parse(MIN_EVALUATE_CLIENTS, 2, |v| bounded(v, 1, 100_000));
        let avail = self.parse(MIN_AVAILABLE_CLIENTS, 2, |v| bounded(v, 1, 100_000));
        for (var, n) in [(MIN_FIT_CLIENTS, fit), (MIN_EVALUATE_CLIENTS, eval)] {
            if n > avail && self.ctx.get(var).is_some() {
                self.warn(
                    var,
                    format!("larger than {MIN_AVAILABLE_CLIENTS} ({avail})"),
                );
            }
        }
        let float = |r: &mut Self, var: &str, p: Param| {
            let x = r.opt(var, |v| {
                let x = v
                    .parse::<f64>()
                    .ok()
                    .filter(|_| v.len() <= 32)
                    .ok_or_else(|| "must be a number".to_string())?;
                check_param(p, x)
                    .map(|()| x)
                    .map_err(|rule| format!("must be {rule}"))
            });
            if x.is_some() && !uses(strategy, p) {
                r.warn(var, format!("{strategy} does not use it: not published"));
            }
            x
        };
        let proximal_mu = float(self, PROXIMAL_MU, Param::ProximalMu);
        let server_lr = float(self, SERVER_LR, Param::ServerLr);
        let client_lr = float(self, CLIENT_LR, Param::ClientLr);
        let trim_beta = float(self, TRIM_BETA, Param::TrimBeta);
        let num_malicious = self.opt(NUM_MALICIOUS, |v| bounded(v, 0, 100_000));
        if num_malicious.is_some() && !uses(strategy, Param::NumMalicious) {
            self.warn(
                NUM_MALICIOUS,
                format!("{strategy} does not use it: not published"),
            );
        }
        if let Some((need, formula)) = malicious_need(strategy, num_malicious.unwrap_or(0)) {
            if u64::from(avail) < need {
                self.err(
                    NUM_MALICIOUS,
                    format!("{strategy} needs {MIN_AVAILABLE_CLIENTS} ≥ {formula} = {need}, found {avail}"),
                );
            }
        }
        let enabled = self.flag(CHECKPOINT_ENABLED, false);
        let interval = self.parse(CHECKPOINT_INTERVAL, 5, |v| bounded(v, 1, 1_000_000));
        let path = match self.ctx.get(CHECKPOINT_PATH) {
            None => CHECKPOINT_ROOT.trim_end_matches('/').to_string() + "/checkpoints",
            Some(p) => match checkpoint_path(p) {
                Ok(p) => p,
                Err(e) if enabled => {
                    self.err(CHECKPOINT_PATH, format!("{e} (got {})", shown_value(p)));
                    String::new()
                }
                Err(e) => {
                    self.warn(
                        CHECKPOINT_PATH,
                        format!("{e}; ignored while checkpointing is off"),
                    );
                    String::new()
                }
            },
        };
        Training {
            num_rounds: rounds,
            strategy,
            min_fit_clients: fit,
            min_evaluate_clients: eval,
            min_available_clients: avail,
            proximal_mu,
            server_lr,
            client_lr,
            num_malicious,
            trim_beta,
            fraction_train: None,
            fraction_evaluate: None,
            checkpoint: enabled.then_some(Checkpoint { interval, path }),
        }
    }

    /// gRPC keepalive: the seed's rules (SuperNode side, the stricter), then a warning that
    /// Flower 1.25 has no setting to take them.
    fn keepalive(&mut self) {
        use ctx::*;
        let time = self.opt(GRPC_KEEPALIVE_TIME, |v| bounded(v, 1, 86_400));
        let timeout = self.opt(GRPC_KEEPALIVE_TIMEOUT, |v| bounded(v, 1, 86_400));
        if let (Some(t), Some(o)) = (time.or(Some(60)), timeout) {
            if o >= t {
                self.err(
                    GRPC_KEEPALIVE_TIMEOUT,
                    format!("must be less than {GRPC_KEEPALIVE_TIME} ({t})"),
                );
            }
        }
        if time.is_some_and(|t| t < 10) {
            self.warn(
                GRPC_KEEPALIVE_TIME,
                "under 10 s: many servers refuse pings that frequent",
            );
        }
        for (var, set) in [
            (GRPC_KEEPALIVE_TIME, time.is_some()),
            (GRPC_KEEPALIVE_TIMEOUT, timeout.is_some()),
        ] {
            if set {
                self.warn(
                    var,
                    "not applied: Flower 1.25 has no keepalive option (its Fleet server pings after 210 s idle; SuperNodes heartbeat every ~30 s)",
                );
            }
        }
    }

    /// A warning for each `ONEAPP_FL_*` name the agent does not know, with the closest
    /// known name. Names only: the value may be a secret.
    fn unknown_names(&mut self) {
        use crate::protocol::variables::{did_you_mean, is_ours};
        let unknown: Vec<String> = self
            .ctx
            .vars()
            .keys()
            .filter(|k| is_ours(k) && !ctx::ALL.contains(&k.as_str()))
            .cloned()
            .collect();
        for k in unknown {
            let hint = did_you_mean(&k)
                .map(|m| format!(" (did you mean {m})"))
                .unwrap_or_default();
            self.warn(&k, format!("unknown variable ignored{hint}"));
        }
    }
}

/// Where checkpoint directories may be: the agent's tree, so the agent (root) never makes
/// a system directory Flower's.
pub const CHECKPOINT_ROOT: &str = "/opt/flower/";

fn checkpoint_path(v: &str) -> Result<String, String> {
    let rest = v.strip_prefix(CHECKPOINT_ROOT).unwrap_or("");
    if path::is_absolute_path(v)
        && !rest.is_empty()
        && !rest.split('/').any(|c| c == "." || c.is_empty())
    {
        // Inside the agent's tree, still never one of its own directories (the CA key's,
        // the configuration's): the agent gives this one to Flower.
        match path::protected_problem(v) {
            Some(why) => Err(why),
            None => Ok(v.to_string()),
        }
    } else {
        Err(format!("must be an absolute path under {CHECKPOINT_ROOT} of letters, digits and `._/+-`, without `.`/`..` components"))
    }
}

/// An integer in `min..=max`.
fn bounded(v: &str, min: u32, max: u32) -> Result<u32, String> {
    v.parse::<u32>()
        .ok()
        .filter(|n| {
            (min..=max).contains(n) && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit())
        })
        .ok_or_else(|| format!("must be an integer from {min} to {max}"))
}

/// A value quoted for an error message: truncated, control characters escaped.
fn shown_value(v: &str) -> String {
    let cut: String = v.chars().take(64).collect();
    let suffix = if v.chars().count() > 64 { "..." } else { "" };
    format!("{:?}{suffix}", cut)
}

fn enum_of<T: Copy>(v: &str, options: &[(&str, T)]) -> Result<T, String> {
    options
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(v))
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            format!(
                "must be one of {}",
                options
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join("|")
            )
        })
}

fn abs_path(v: &str) -> Result<PathBuf, String> {
    if path::is_absolute_path(v) {
        Ok(PathBuf::from(v))
    } else {
        Err(path::RULE.into())
    }
}

/// [`abs_path`], and never a system or agent directory ([`path::protected_problem`]).
fn data_dir(v: &str) -> Result<PathBuf, String> {
    let p = abs_path(v)?;
    match path::protected_problem(v) {
        Some(why) => Err(why),
        None => Ok(p),
    }
}

impl Config {
    /// Validates a context. Every problem is collected; any problem fails.
    pub fn from_context(c: &Context) -> Result<Config, ConfigErrors> {
        use ctx::*;
        let mut r = Reader {
            ctx: c,
            errors: Vec::new(),
            warnings: Vec::new(),
        };
        let vmid = r.opt("VMID", |v| {
            v.parse::<u64>().map_err(|_| "must be a number".into())
        });
        let onegate_endpoint = r.opt("ONEGATE_ENDPOINT", |v| {
            let u = url::Url::parse(v).map_err(|_| "must be a URL".to_string())?;
            match u.scheme() {
                "http" | "https" if u.host().is_some() => Ok(u),
                _ => Err("must be an http(s) URL".into()),
            }
        });
        let onegate_token = match c.get("TOKENTXT") {
            Some(t) if TOKEN_RE.is_match(t.trim()) => Some(Secret(t.trim().to_string())),
            Some(_) => {
                r.err("TOKENTXT", "must be a base64 token");
                None
            }
            None => None,
        };
        let vm_ip = r.opt("ETH0_IP", |v| {
            v.parse::<IpAddr>()
                .map_err(|_| "must be an IP address".into())
        });
        let version = r.parse(FLOWER_VERSION, DEFAULT_FLOWER_VERSION.to_string(), |v| {
            version::FlowerVersion::parse(v).map(|v| v.to_string())
        });
        let tls = r.flag(TLS_ENABLED, true);
        let log_level = r.parse(LOG_LEVEL, LogLevel::Info, |v| {
            enum_of(
                v,
                &[
                    ("DEBUG", LogLevel::Debug),
                    ("INFO", LogLevel::Info),
                    ("WARNING", LogLevel::Warning),
                    ("ERROR", LogLevel::Error),
                ],
            )
        });
        let log_format = r.parse(LOG_FORMAT, LogFormat::Text, |v| {
            enum_of(v, &[("text", LogFormat::Text), ("json", LogFormat::Json)])
        });
        let isolation = r.parse(ISOLATION, Isolation::Subprocess, |v| {
            enum_of(
                v,
                &[
                    ("subprocess", Isolation::Subprocess),
                    ("process", Isolation::Process),
                ],
            )
        });
        let runtime = r.parse(RUNTIME, Runtime::Docker, |v| {
            enum_of(
                v,
                &[("docker", Runtime::Docker), ("process", Runtime::Process)],
            )
        });
        let flower_bin_dir = r.opt(FLOWER_BIN_DIR, abs_path);
        let heartbeat_interval = r.duration(HEARTBEAT_INTERVAL, Duration::from_secs(30));
        let cluster_name = r.opt(CLUSTER_NAME, |v| {
            if NAME_RE.is_match(v) {
                Ok(v.to_string())
            } else {
                Err("must be 1-63 characters of [A-Za-z0-9._-]".into())
            }
        });
        let role = r.opt(ROLE, |v| {
            Role::parse(v).ok_or_else(|| "must be superlink or supernode".into())
        });
        let fleet_port = r.port(FLEET_PORT, 9092);
        let control_port = r.port(CONTROL_PORT, 9093);
        let serverappio_port = r.port(SERVERAPPIO_PORT, 9091);
        let control_bind = r.parse(CONTROL_BIND, ControlBind::Loopback, |v| {
            enum_of(
                v,
                &[("loopback", ControlBind::Loopback), ("vm", ControlBind::Vm)],
            )
        });
        let persistent_state = r.flag(PERSISTENT_STATE, true);
        let database = r.parse(DATABASE, "state.db".to_string(), |v| {
            if DB_RE.is_match(v) && !v.split('/').any(|c| c == ".." || c == ".") && v.len() <= 255 {
                Ok(v.to_string())
            } else {
                Err("must be a relative path of [A-Za-z0-9._/-] without '..'".into())
            }
        });
        // The seed has no mode variable: a server certificate or key given means operator
        // TLS, all or none (seed-facts §1.4). An explicit TLS_MODE wins.
        let pair_given = c.get(SSL_CERTFILE).is_some() || c.get(SSL_KEYFILE).is_some();
        let implied = if pair_given {
            TlsMode::Provided
        } else {
            TlsMode::Auto
        };
        let tls_mode = r.parse(TLS_MODE, implied, |v| {
            enum_of(
                v,
                &[("auto", TlsMode::Auto), ("provided", TlsMode::Provided)],
            )
        });
        if tls && tls_mode == TlsMode::Auto && pair_given && c.get(TLS_MODE).is_some() {
            // Never ignore given certificates silently (the seed's complaint).
            r.err(
                TLS_MODE,
                format!(
                    "auto conflicts with {SSL_CERTFILE}/{SSL_KEYFILE}: set provided, or clear them"
                ),
            );
        }
        let ca_override = r.secret_b64_pem(SSL_CA_CERTFILE);
        let cert_pem = r.secret_b64_pem(SSL_CERTFILE);
        let key_pem = r.secret_b64_pem(SSL_KEYFILE);
        let provided = match (tls_mode, ca_override.clone(), cert_pem, key_pem) {
            (TlsMode::Provided, Some(ca_pem), Some(cert_pem), Some(key)) => Some(ProvidedTls {
                ca_pem,
                cert_pem,
                key_pem: Secret(key),
            }),
            (TlsMode::Provided, ..) if tls && role != Some(Role::Supernode) => {
                let missing: Vec<&str> = [SSL_CA_CERTFILE, SSL_CERTFILE, SSL_KEYFILE]
                    .into_iter()
                    .filter(|k| c.get(k).is_none())
                    .collect();
                // Named after what the operator set: TLS_MODE, or the first missing SSL_*.
                let var = match (c.get(TLS_MODE), missing.first()) {
                    (None, Some(first)) => *first,
                    _ => TLS_MODE,
                };
                r.err(
                    var,
                    format!(
                        "operator TLS needs {SSL_CA_CERTFILE}, {SSL_CERTFILE} and {SSL_KEYFILE}, all valid (all or none){}",
                        if missing.is_empty() {
                            String::new()
                        } else {
                            format!("; missing: {}", missing.join(", "))
                        }
                    ),
                );
                None
            }
            _ => None,
        };
        let cert_validity = r.duration(CERT_VALIDITY, Duration::from_secs(365 * 86400));
        if cert_validity > crate::protocol::MAX_CERT_VALIDITY {
            r.err(CERT_VALIDITY, "must be at most 20 years (175200h)");
        }
        let cert_renew_before = r.duration(CERT_RENEW_BEFORE, Duration::from_secs(30 * 86400));
        // Only generated certificates have the context's validity; a provided one has its own.
        if tls_mode == TlsMode::Auto && cert_renew_before >= cert_validity {
            r.err(
                CERT_RENEW_BEFORE,
                "must be shorter than the certificate validity",
            );
        }
        let extra_san = r.parse(CERT_EXTRA_SAN, Vec::new(), crate::protocol::san::parse_list);
        let metrics_enabled = r.flag(METRICS_ENABLED, false);
        let metrics_port = r.port(METRICS_PORT, 9101);
        let framework = r.parse(FRAMEWORK, Framework::Pytorch, |v| {
            enum_of(
                v,
                &[
                    ("pytorch", Framework::Pytorch),
                    ("tensorflow", Framework::Tensorflow),
                    ("sklearn", Framework::Sklearn),
                    ("none", Framework::None),
                ],
            )
        });
        let superlink_address = r.opt(SUPERLINK_ADDRESS, endpoint::parse);
        let node_config = r.opt(NODE_CONFIG, NodeConfig::parse);
        let count = |v: &str| -> Result<u32, String> {
            if v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()) {
                v.parse()
                    .map_err(|_| "must be a non-negative integer".into())
            } else {
                Err("must be a non-negative integer".into())
            }
        };
        let max_retries = r.parse(MAX_RETRIES, 0, count);
        let max_wait_time = r.parse(MAX_WAIT_TIME, 0, count);
        let discovery_timeout = r.duration(DISCOVERY_TIMEOUT, Duration::from_secs(600));
        let data_dir = r.parse(DATA_DIR, PathBuf::from("/opt/flower/data"), data_dir);
        let clientappio_port = r.port(CLIENTAPPIO_PORT, 9094);
        let gpu_enabled = r.flag(GPU_ENABLED, false);
        let cuda_visible_devices = r.parse(CUDA_VISIBLE_DEVICES, "all".to_string(), |v| {
            if CUDA_RE.is_match(v) {
                Ok(v.to_string())
            } else {
                Err("must be all or a comma-separated list of GPU indices".into())
            }
        });
        let gpu_memory_fraction = r.parse(GPU_MEMORY_FRACTION, 0.8, |v| match v.parse::<f64>() {
            Ok(f) if f > 0.0 && f <= 1.0 && v.len() <= 32 => Ok(f),
            _ => Err("must be a number in (0, 1]".into()),
        });
        let dcgm_enabled = r.flag(DCGM_ENABLED, false);
        let controller_key = r.opt(CONTROLLER_KEY, crate::protocol::signing::parse_public_key);
        let (fleet_port, control_port, control_bind) =
            r.seed_addresses(vm_ip, fleet_port, control_port, control_bind);
        let training = r.training();
        r.keepalive();
        let backoff = Backoff {
            exponential: r.parse(EDGE_BACKOFF, true, |v| {
                enum_of(v, &[("exponential", true), ("fixed", false)])
            }),
            max: Duration::from_secs(u64::from(
                r.parse(EDGE_MAX_BACKOFF, 5, |v| bounded(v, 1, 3600)),
            )),
        };
        if dcgm_enabled && !gpu_enabled {
            r.warn(
                DCGM_ENABLED,
                "YES without ONEAPP_FL_GPU_ENABLED=YES: no exporter runs",
            );
        }
        if !tls
            && [SSL_CA_CERTFILE, SSL_CERTFILE, SSL_KEYFILE]
                .iter()
                .any(|k| c.get(k).is_some())
        {
            r.warn(TLS_ENABLED, "NO: the SSL_* certificates given are not used");
        }
        r.unknown_names();
        let ports = [
            (FLEET_PORT, fleet_port),
            (CONTROL_PORT, control_port),
            (SERVERAPPIO_PORT, serverappio_port),
        ];
        for (i, (name, p)) in ports.iter().enumerate() {
            if ports[..i].iter().any(|(_, q)| q == p) {
                r.err(name, "must differ from the other SuperLink ports");
            }
        }
        if r.errors.is_empty() {
            Ok(Config {
                vmid,
                onegate_endpoint,
                onegate_token,
                vm_ip,
                version,
                tls,
                log_level,
                log_format,
                isolation,
                runtime,
                flower_bin_dir,
                heartbeat_interval,
                cluster_name,
                role,
                fleet_port,
                control_port,
                serverappio_port,
                control_bind,
                persistent_state,
                database,
                tls_mode,
                provided,
                ca_override,
                cert_validity,
                cert_renew_before,
                extra_san,
                metrics_enabled,
                metrics_port,
                framework,
                superlink_address,
                node_config,
                max_retries,
                max_wait_time,
                discovery_timeout,
                data_dir,
                clientappio_port,
                gpu_enabled,
                cuda_visible_devices,
                controller_key,
                gpu_memory_fraction,
                dcgm_enabled,
                training,
                backoff,
                warnings: r.warnings,
            })
        } else {
            Err(ConfigErrors(r.errors))
        }
    }

    /// The process runtime runs the one Flower installed in the image: a different
    /// `ONEAPP_FLOWER_VERSION` falls back to it with a warning (the seed SuperNode's rule),
    /// so `FL_VERSION` tells the truth. The docker runtime runs the image tag asked for.
    pub fn settle_version(&mut self, installed: Option<&str>) {
        let Some(installed) = installed.map(str::trim).filter(|v| version::is_version(v)) else {
            return;
        };
        if self.runtime == Runtime::Process && self.version != installed {
            self.warnings.push(ConfigError {
                var: ctx::FLOWER_VERSION.into(),
                message: format!(
                    "{} is not installed in this image: running the installed {installed}",
                    self.version
                ),
            });
            self.version = installed.to_string();
        }
    }

    /// The address Flower serves on (`ETH0_IP`, loopback when unknown: fail closed).
    pub fn vm_addr(&self) -> IpAddr {
        self.vm_ip
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
    }

    /// Address for loopback-only listeners. When the VM address itself is a loopback
    /// address (several simulated nodes on one machine) each node uses its own.
    pub fn local_addr(&self) -> IpAddr {
        let vm = self.vm_addr();
        if vm.is_loopback() {
            vm
        } else {
            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        Config::from_context(&Context::from_pairs(pairs.iter().copied()))
    }

    #[test]
    fn a_system_data_dir_is_refused_naming_the_variable_and_why() {
        use ctx::*;
        let e = cfg(&[(DATA_DIR, "/")]).unwrap_err().to_string();
        assert!(
            e.contains(DATA_DIR) && e.contains("root of the file system"),
            "{e}"
        );
        let e = cfg(&[(DATA_DIR, "/var/lib/one")]).unwrap_err().to_string();
        assert!(e.contains(DATA_DIR) && e.contains("inside /var/lib"), "{e}");
        assert_eq!(
            cfg(&[(DATA_DIR, "/srv/data")]).unwrap().data_dir,
            PathBuf::from("/srv/data")
        );
    }

    fn err_vars(pairs: &[(&str, &str)]) -> Vec<String> {
        cfg(pairs)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.var)
            .collect()
    }

    #[test]
    fn parses_one_env_quoting_styles() {
        let text = "# header\nexport TOKENTXT=\"abc+/=\"\nexport VMID=\"7\"\nexport ONEAPP_FL_LOG_LEVEL=''\nONEAPP_FLOWER_VERSION='1.25.0'\nETH0_IP=10.0.0.5\nexport SSH_PUBLIC_KEY=\"ssh-ed25519 AAA a\nssh-ed25519 BBB b\"\nexport ONEAPP_FL_ISOLATION=\"process\"\nbad line\n";
        let (c, warnings) = parse_one_env(text, "one_env");
        assert_eq!(c.get("TOKENTXT"), Some("abc+/="));
        assert_eq!(c.get("VMID"), Some("7"));
        assert_eq!(c.get("ONEAPP_FL_LOG_LEVEL"), None, "empty means unset");
        assert_eq!(c.get("ONEAPP_FLOWER_VERSION"), Some("1.25.0"));
        assert_eq!(c.get("ETH0_IP"), Some("10.0.0.5"));
        assert_eq!(
            c.get("SSH_PUBLIC_KEY"),
            Some("ssh-ed25519 AAA a\nssh-ed25519 BBB b")
        );
        assert_eq!(c.get("ONEAPP_FL_ISOLATION"), Some("process"));
        assert_eq!(
            warnings,
            vec!["one_env:10: skipped a line without '='".to_string()]
        );
    }

    #[test]
    fn single_quotes_follow_the_shell_and_one_env_text_round_trips() {
        // OpenNebula's context.sh escaping, multi-line values, blanks after the quote.
        let text = r"A='it'\''s'
B='x
y'
C='1' 
D=''\'''
";
        let (c, w) = parse_one_env(text, "context.sh");
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.get("A"), Some("it's"));
        assert_eq!(c.get("B"), Some("x\ny"));
        assert_eq!(c.get("C"), Some("1"));
        assert_eq!(c.get("D"), Some("'"));
        let (c, w) = parse_one_env("A='x", "f");
        assert_eq!(c.get("A"), None);
        assert_eq!(w, vec!["f:1: unterminated quoted value for A".to_string()]);
        let vars: BTreeMap<String, String> = [
            ("A", "it's"),
            ("B", "line1\nline2 'q' \"d\""),
            ("C", "'"),
            ("D", r"x'\''y"),
            ("E", "trailing '"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (back, w) = parse_one_env(&one_env_text(&vars), "one_env");
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(back.vars, vars);
    }

    #[test]
    fn unterminated_quote_is_reported() {
        let (c, w) = parse_one_env("export A=\"x\nexport B=\"y\"", "f");
        // A swallows the rest: the closing quote of B ends A's value.
        assert_eq!(c.get("A"), Some("x\nexport B=\"y"));
        assert!(w.is_empty());
        let (c, w) = parse_one_env("export A=\"x", "f");
        assert_eq!(c.get("A"), None);
        assert_eq!(w, vec!["f:1: unterminated quoted value for A".to_string()]);
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.version, "1.25.0");
        assert!(c.tls);
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.isolation, Isolation::Subprocess);
        assert_eq!(c.runtime, Runtime::Docker);
        assert!(c.persistent_state);
        assert_eq!(c.database, "state.db");
        assert_eq!(c.framework, Framework::Pytorch);
        assert_eq!((c.max_retries, c.max_wait_time), (0, 0));
        assert_eq!(
            (
                c.fleet_port,
                c.control_port,
                c.serverappio_port,
                c.clientappio_port
            ),
            (9092, 9093, 9091, 9094)
        );
        assert_eq!(c.control_bind, ControlBind::Loopback);
        assert_eq!(c.tls_mode, TlsMode::Auto);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(c.discovery_timeout, Duration::from_secs(600));
        assert_eq!(c.cert_validity, Duration::from_secs(365 * 86400));
        assert_eq!(c.cuda_visible_devices, "all");
        assert_eq!(c.gpu_memory_fraction, 0.8);
        assert!(!c.gpu_enabled && !c.dcgm_enabled && !c.metrics_enabled);
        assert_eq!(c.data_dir, PathBuf::from("/opt/flower/data"));
        assert_eq!(c.vm_addr().to_string(), "127.0.0.1");
        assert!(c.superlink_address.is_none() && c.node_config.is_none() && c.role.is_none());
    }

    #[test]
    fn every_variable_is_read() {
        use ctx::*;
        let ca = crate::protocol::pem::encode(b"-----BEGIN CERTIFICATE-----\nx\n");
        let c = cfg(&[
            ("VMID", "12"),
            ("ONEGATE_ENDPOINT", "http://169.254.16.9:5030"),
            ("TOKENTXT", "dG9rZW4="),
            ("ETH0_IP", "10.1.2.3"),
            (FLOWER_VERSION, "1.31.0"),
            (TLS_ENABLED, "NO"),
            (LOG_LEVEL, "DEBUG"),
            (LOG_FORMAT, "json"),
            (ISOLATION, "process"),
            (RUNTIME, "process"),
            (FLOWER_BIN_DIR, "/tmp/venv/bin"),
            (HEARTBEAT_INTERVAL, "5s"),
            (CLUSTER_NAME, "demo-1"),
            (ROLE, "supernode"),
            (FLEET_PORT, "19092"),
            (CONTROL_PORT, "19093"),
            (SERVERAPPIO_PORT, "19091"),
            (CONTROL_BIND, "vm"),
            (PERSISTENT_STATE, "NO"),
            (DATABASE, "db/link.db"),
            (SSL_CA_CERTFILE, &ca),
            (CERT_VALIDITY, "48h"),
            (CERT_RENEW_BEFORE, "1h"),
            (CERT_EXTRA_SAN, "IP:100.64.0.1,DNS:link.example.org"),
            (METRICS_ENABLED, "YES"),
            (METRICS_PORT, "9200"),
            (FRAMEWORK, "sklearn"),
            (SUPERLINK_ADDRESS, "link.example.org:9092"),
            (NODE_CONFIG, "partition-id=1  num-partitions=4"),
            (MAX_RETRIES, "5"),
            (MAX_WAIT_TIME, "60"),
            (DISCOVERY_TIMEOUT, "2m"),
            (DATA_DIR, "/srv/data"),
            (CLIENTAPPIO_PORT, "19094"),
            (GPU_ENABLED, "YES"),
            (CUDA_VISIBLE_DEVICES, "0,1"),
            (GPU_MEMORY_FRACTION, "0.5"),
            (DCGM_ENABLED, "YES"),
        ])
        .unwrap();
        assert_eq!(c.vmid, Some(12));
        assert_eq!(
            c.onegate_endpoint.as_ref().unwrap().as_str(),
            "http://169.254.16.9:5030/"
        );
        assert_eq!(c.onegate_token.as_ref().unwrap().0, "dG9rZW4=");
        assert_eq!(c.vm_ip.unwrap().to_string(), "10.1.2.3");
        assert_eq!(c.version, "1.31.0");
        assert!(!c.tls);
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.isolation, Isolation::Process);
        assert_eq!(c.runtime, Runtime::Process);
        assert_eq!(c.flower_bin_dir, Some(PathBuf::from("/tmp/venv/bin")));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.cluster_name.as_deref(), Some("demo-1"));
        assert_eq!(c.role, Some(Role::Supernode));
        assert_eq!(
            (c.fleet_port, c.control_port, c.serverappio_port),
            (19092, 19093, 19091)
        );
        assert_eq!(c.control_bind, ControlBind::Vm);
        assert!(!c.persistent_state);
        assert_eq!(c.database, "db/link.db");
        assert!(c
            .ca_override
            .as_ref()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(c.cert_validity, Duration::from_secs(48 * 3600));
        assert_eq!(c.cert_renew_before, Duration::from_secs(3600));
        assert_eq!(
            c.extra_san,
            vec![
                San::Ip("100.64.0.1".parse().unwrap()),
                San::Dns("link.example.org".into())
            ]
        );
        assert!(c.metrics_enabled);
        assert_eq!(c.metrics_port, 9200);
        assert_eq!(c.framework, Framework::Sklearn);
        assert_eq!(
            c.superlink_address.as_ref().unwrap().to_string(),
            "link.example.org:9092"
        );
        assert_eq!(
            c.node_config.as_ref().unwrap().as_context(),
            "partition-id=1 num-partitions=4"
        );
        assert_eq!((c.max_retries, c.max_wait_time), (5, 60));
        assert_eq!(c.discovery_timeout, Duration::from_secs(120));
        assert_eq!(c.data_dir, PathBuf::from("/srv/data"));
        assert_eq!(c.clientappio_port, 19094);
        assert!(c.gpu_enabled && c.dcgm_enabled);
        assert_eq!(c.cuda_visible_devices, "0,1");
        assert_eq!(c.gpu_memory_fraction, 0.5);
    }

    #[test]
    fn empty_values_mean_defaults() {
        let (c, _) = parse_one_env(
            "export ONEAPP_FL_LOG_LEVEL=\"\"\nexport ONEAPP_FLOWER_VERSION=\"\"\nexport ONEAPP_FL_TLS_ENABLED=\"\"\n",
            "f",
        );
        let c = Config::from_context(&c).unwrap();
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.version, DEFAULT_FLOWER_VERSION);
        assert!(c.tls);
    }

    #[test]
    fn all_errors_reported_together() {
        let e = cfg(&[
            (ctx::FLOWER_VERSION, "latest"),
            (ctx::LOG_LEVEL, "LOUD"),
            (ctx::TLS_ENABLED, "maybe"),
            (ctx::MAX_RETRIES, "-1"),
            (ctx::FLEET_PORT, "0"),
        ])
        .unwrap_err();
        assert_eq!(e.0.len(), 5, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("ONEAPP_FLOWER_VERSION: must be a Flower version X.Y.Z such as 1.25.0 (got \"latest\")"),
            "{text}"
        );
        assert!(text.contains("ONEAPP_FL_LOG_LEVEL"), "{text}");
    }

    #[test]
    fn a_validity_beyond_20_years_is_refused_not_overflowed() {
        for huge in ["584000000000y", "18446744073709551615", "175201h"] {
            let e = cfg(&[(ctx::CERT_VALIDITY, huge)]).unwrap_err().to_string();
            assert!(e.contains("ONEAPP_FL_CERT_VALIDITY"), "{huge}: {e}");
        }
        let c = cfg(&[(ctx::CERT_VALIDITY, "175200h")]).unwrap();
        assert_eq!(c.cert_validity, crate::protocol::MAX_CERT_VALIDITY);
    }

    #[test]
    fn injection_attempts_are_rejected() {
        use ctx::*;
        let hostile = [
            (FLOWER_VERSION, "1.25.0; rm -rf /"),
            (FLOWER_VERSION, "1.25.0\nExecStartPre=/bin/sh"),
            (SUPERLINK_ADDRESS, "1.2.3.4:9092; rm -rf /"),
            (SUPERLINK_ADDRESS, "$(id):9092"),
            (SUPERLINK_ADDRESS, "host:9092\r\n"),
            (NODE_CONFIG, "a=1 b=$(reboot)"),
            (NODE_CONFIG, "a=`id`"),
            (NODE_CONFIG, "a=\"x y\""),
            (NODE_CONFIG, "a=1\nb=2"),
            (NODE_CONFIG, "a=1;b=2"),
            (NODE_CONFIG, "a=1|b"),
            (NODE_CONFIG, "a=x>y"),
            (NODE_CONFIG, "justakey"),
            (DATABASE, "/etc/shadow"),
            (DATABASE, "../../etc/x"),
            (DATABASE, "state db"),
            (FLOWER_BIN_DIR, "relative/bin"),
            (FLOWER_BIN_DIR, "/opt/$HOME/bin"),
            (FLOWER_BIN_DIR, "/opt/../bin"),
            (DATA_DIR, "/data dir"),
            // Never a system or agent directory (#17 item 5): mounted into Flower's container.
            (DATA_DIR, "/"),
            (DATA_DIR, "/etc"),
            (DATA_DIR, "/opt"),
            (DATA_DIR, "/opt/flower/ca"),
            (CUDA_VISIBLE_DEVICES, "0;1"),
            (CLUSTER_NAME, "a b"),
            (CERT_EXTRA_SAN, "DNS:evil;x"),
            (GPU_MEMORY_FRACTION, "1.5"),
            ("ONEGATE_ENDPOINT", "file:///etc/passwd"),
            ("TOKENTXT", "abc\ndef"),
            ("ETH0_IP", "10.0.0.1; id"),
        ];
        for (var, value) in hostile {
            assert_eq!(
                err_vars(&[(var, value)]),
                vec![var.to_string()],
                "{var}={value:?} must be rejected"
            );
        }
    }

    #[test]
    fn secrets_are_not_echoed() {
        let e = cfg(&[(ctx::SSL_KEYFILE, "c2VjcmV0LWtleS1tYXRlcmlhbA==")]).unwrap_err();
        assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
        assert!(!format!("{:?}", Secret("x".into())).contains('x'));
    }

    #[test]
    fn provided_mode_needs_all_three() {
        let vars = err_vars(&[(ctx::TLS_MODE, "provided")]);
        assert_eq!(vars, vec![ctx::TLS_MODE.to_string()]);
    }

    #[test]
    fn a_static_superlink_address_may_be_ipv6_in_brackets() {
        let c = cfg(&[(ctx::SUPERLINK_ADDRESS, "[fd00::5]:9092")]).unwrap();
        let a = c.superlink_address.unwrap();
        assert_eq!((a.host.as_str(), a.port), ("fd00::5", 9092));
        assert_eq!(
            err_vars(&[(ctx::SUPERLINK_ADDRESS, "fd00::5:9092")]),
            vec![ctx::SUPERLINK_ADDRESS.to_string()]
        );
    }

    fn warn_vars(pairs: &[(&str, &str)]) -> Vec<String> {
        cfg(pairs)
            .unwrap()
            .warnings
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn every_table_default_is_the_agents_default() {
        let base = format!("{:?}", cfg(&[]).unwrap());
        for v in crate::protocol::variables::VARIABLES {
            if v.default.is_empty() {
                continue;
            }
            let c = cfg(&[(v.name, v.default)])
                .unwrap_or_else(|e| panic!("{}={}: {e}", v.name, v.default));
            assert!(c.warnings.is_empty(), "{}: {:?}", v.name, c.warnings);
            assert_eq!(
                format!("{c:?}"),
                base,
                "{}: table default {:?}",
                v.name,
                v.default
            );
        }
    }

    #[test]
    fn a_seed_only_context_is_honoured() {
        use ctx::*;
        // Only the seed's names (seed-facts §1.4), with values other than the defaults.
        let c = cfg(&[
            ("ETH0_IP", "10.0.0.5"),
            (FLOWER_VERSION, "1.25.0"),
            (TLS_ENABLED, "YES"),
            (LOG_LEVEL, "WARNING"),
            (ISOLATION, "process"),
            (DATABASE, "state/state.db"),
            (FLEET_API_ADDRESS, "10.0.0.5:19092"),
            (CONTROL_API_ADDRESS, "127.0.0.1:19093"),
            (NUM_ROUNDS, "7"),
            (STRATEGY, "FedProx"),
            (MIN_FIT_CLIENTS, "3"),
            (MIN_EVALUATE_CLIENTS, "3"),
            (MIN_AVAILABLE_CLIENTS, "4"),
            (PROXIMAL_MU, "0.5"),
            (CHECKPOINT_ENABLED, "YES"),
            (CHECKPOINT_INTERVAL, "2"),
            (CHECKPOINT_PATH, "/opt/flower/ckpt"),
            (CERT_EXTRA_SAN, "DNS:link.example.org"),
            (METRICS_ENABLED, "YES"),
            (METRICS_PORT, "9101"),
            (EDGE_BACKOFF, "fixed"),
            (EDGE_MAX_BACKOFF, "300"),
        ])
        .unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!((c.fleet_port, c.control_port), (19092, 19093));
        assert_eq!(c.control_bind, ControlBind::Loopback);
        assert_eq!(c.database, "state/state.db");
        let t = &c.training;
        assert_eq!(
            (t.num_rounds, t.strategy, t.proximal_mu),
            (7, "FedProx", Some(0.5))
        );
        assert_eq!(
            (
                t.min_fit_clients,
                t.min_evaluate_clients,
                t.min_available_clients
            ),
            (3, 3, 4)
        );
        assert_eq!(
            t.checkpoint,
            Some(Checkpoint {
                interval: 2,
                path: "/opt/flower/ckpt".into()
            })
        );
        assert_eq!(
            c.backoff,
            Backoff {
                exponential: false,
                max: Duration::from_secs(300)
            }
        );
    }

    #[test]
    fn training_rules_follow_the_seed_and_are_tighter_where_it_had_gaps() {
        use ctx::*;
        for (var, bad) in [
            (NUM_ROUNDS, "0"),
            (NUM_ROUNDS, "-1"),
            (NUM_ROUNDS, "3.5"),
            (STRATEGY, "FedMedian"),
            (MIN_FIT_CLIENTS, "0"),
            (MIN_EVALUATE_CLIENTS, "x"),
            (MIN_AVAILABLE_CLIENTS, "99999999999"),
            (PROXIMAL_MU, "-0.1"),
            (SERVER_LR, "0"),
            (CLIENT_LR, "nan"),
            (TRIM_BETA, "0.5"),
            (NUM_MALICIOUS, "-1"),
            (CHECKPOINT_INTERVAL, "0"),
            (CHECKPOINT_ENABLED, "maybe"),
        ] {
            assert_eq!(
                err_vars(&[(var, bad)]),
                vec![var.to_string()],
                "{var}={bad}"
            );
        }
        // Krum tolerating f needs 2f+3 available clients, Bulyan 4f+3.
        let e = cfg(&[
            (STRATEGY, "Krum"),
            (NUM_MALICIOUS, "1"),
            (MIN_AVAILABLE_CLIENTS, "4"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("ONEAPP_FL_NUM_MALICIOUS: Krum needs ONEAPP_FL_MIN_AVAILABLE_CLIENTS ≥ 2f+3 = 5, found 4"), "{e}");
        assert!(cfg(&[
            (STRATEGY, "krum"),
            (NUM_MALICIOUS, "1"),
            (MIN_AVAILABLE_CLIENTS, "5")
        ])
        .is_ok());
        assert_eq!(
            err_vars(&[
                (STRATEGY, "Bulyan"),
                (NUM_MALICIOUS, "1"),
                (MIN_AVAILABLE_CLIENTS, "6")
            ]),
            vec![NUM_MALICIOUS]
        );
        // The seed's warnings: a parameter the strategy ignores, more sampled than available.
        let w = warn_vars(&[(PROXIMAL_MU, "1.0"), (MIN_FIT_CLIENTS, "5")]);
        assert!(
            w.iter()
                .any(|w| w.starts_with("ONEAPP_FL_PROXIMAL_MU: FedAvg does not use it")),
            "{w:?}"
        );
        assert!(
            w.iter()
                .any(|w| w.starts_with("ONEAPP_FL_MIN_FIT_CLIENTS: larger than")),
            "{w:?}"
        );
    }

    #[test]
    fn checkpoint_paths_stay_in_the_agents_tree() {
        use ctx::*;
        for bad in [
            "/app/checkpoints",
            "/etc",
            "/opt/flower/",
            "/opt/flower/../etc",
            "relative",
            "/opt/flower/a b",
            "/opt/flower//x",
            "/opt/flower/ca",
            "/opt/flower/config/ckpt",
            "/opt/flower/certs",
        ] {
            assert_eq!(
                err_vars(&[(CHECKPOINT_ENABLED, "YES"), (CHECKPOINT_PATH, bad)]),
                vec![CHECKPOINT_PATH.to_string()],
                "{bad:?}"
            );
            // Off: the seed's template default is harmless, and said so.
            let w = warn_vars(&[(CHECKPOINT_PATH, bad)]);
            assert!(w[0].contains("ignored while checkpointing is off"), "{w:?}");
        }
        let c = cfg(&[(CHECKPOINT_ENABLED, "YES")]).unwrap();
        assert_eq!(
            c.training.checkpoint.unwrap().path,
            "/opt/flower/checkpoints"
        );
    }

    #[test]
    fn seed_addresses_map_onto_ports_and_the_control_bind() {
        use ctx::*;
        let vm = ("ETH0_IP", "10.0.0.5");
        let c = cfg(&[vm, (CONTROL_API_ADDRESS, "10.0.0.5:9443")]).unwrap();
        assert_eq!((c.control_bind, c.control_port), (ControlBind::Vm, 9443));
        // All interfaces: narrowed for the Fleet API (warning), refused for the Control API.
        let c = cfg(&[vm, (FLEET_API_ADDRESS, "0.0.0.0:9092")]).unwrap();
        assert_eq!(c.fleet_port, 9092);
        assert!(c.warnings[0]
            .to_string()
            .contains("narrowed to the VM address"));
        let e = cfg(&[vm, (CONTROL_API_ADDRESS, "0.0.0.0:9093")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ONEAPP_FL_CONTROL_API_ADDRESS: all interfaces are refused"),
            "{e}"
        );
        for (var, v) in [
            (FLEET_API_ADDRESS, "10.9.9.9:9092"),
            (FLEET_API_ADDRESS, "host"),
            (CONTROL_API_ADDRESS, "evil.example.org:9093"),
        ] {
            assert_eq!(
                err_vars(&[vm, (var, v)]),
                vec![var.to_string()],
                "{var}={v}"
            );
        }
        // Both spellings given and disagreeing.
        assert_eq!(
            err_vars(&[
                vm,
                (FLEET_API_ADDRESS, "10.0.0.5:9000"),
                (FLEET_PORT, "9092")
            ]),
            vec![FLEET_API_ADDRESS.to_string()]
        );
        assert_eq!(
            err_vars(&[
                vm,
                (CONTROL_API_ADDRESS, "127.0.0.1:9093"),
                (CONTROL_BIND, "vm")
            ]),
            vec![CONTROL_API_ADDRESS.to_string()]
        );
    }

    #[test]
    fn keepalive_is_validated_and_reported_as_not_applied() {
        use ctx::*;
        assert_eq!(
            err_vars(&[(GRPC_KEEPALIVE_TIME, "30"), (GRPC_KEEPALIVE_TIMEOUT, "30")]),
            vec![GRPC_KEEPALIVE_TIMEOUT.to_string()]
        );
        assert_eq!(
            err_vars(&[(GRPC_KEEPALIVE_TIMEOUT, "60")]),
            vec![GRPC_KEEPALIVE_TIMEOUT]
        );
        assert_eq!(
            err_vars(&[(GRPC_KEEPALIVE_TIME, "0")]),
            vec![GRPC_KEEPALIVE_TIME]
        );
        let w = warn_vars(&[(GRPC_KEEPALIVE_TIME, "5"), (GRPC_KEEPALIVE_TIMEOUT, "2")]);
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w.iter().all(|w| w.starts_with("ONEAPP_FL_GRPC_KEEPALIVE_")));
        assert!(w
            .iter()
            .any(|w| w.contains("Flower 1.25 has no keepalive option")));
        assert!(warn_vars(&[]).is_empty());
    }

    #[test]
    fn edge_backoff_rules() {
        use ctx::*;
        for (var, bad) in [
            (EDGE_BACKOFF, "linear"),
            (EDGE_MAX_BACKOFF, "0"),
            (EDGE_MAX_BACKOFF, "3601"),
        ] {
            assert_eq!(
                err_vars(&[(var, bad)]),
                vec![var.to_string()],
                "{var}={bad}"
            );
        }
        assert_eq!(cfg(&[]).unwrap().backoff, Backoff::default());
    }

    #[test]
    fn ssl_variables_imply_operator_tls_all_or_none() {
        use ctx::*;
        let pem = crate::protocol::pem::encode(b"-----BEGIN CERTIFICATE-----\nx\n");
        // A server certificate or key alone means operator TLS; the missing ones are named.
        let e = cfg(&[(SSL_CERTFILE, &pem)]).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].var, SSL_CA_CERTFILE);
        assert!(
            e.0[0]
                .message
                .contains("missing: ONEAPP_FL_SSL_CA_CERTFILE, ONEAPP_FL_SSL_KEYFILE"),
            "{e}"
        );
        let c = cfg(&[
            (SSL_CA_CERTFILE, &pem),
            (SSL_CERTFILE, &pem),
            (SSL_KEYFILE, &pem),
        ])
        .unwrap();
        assert_eq!(c.tls_mode, TlsMode::Provided);
        assert!(c.provided.is_some());
        // An explicit auto with certificates given is a conflict, never a silent choice;
        // TLS off ignores the files, with a warning.
        assert_eq!(
            err_vars(&[(TLS_MODE, "auto"), (SSL_KEYFILE, &pem)]),
            vec![TLS_MODE]
        );
        let w = warn_vars(&[(TLS_ENABLED, "NO"), (SSL_CERTFILE, &pem)]);
        assert!(w[0].contains("not used"), "{w:?}");
        // A SuperNode trusts a CA alone (its all-or-none half is checked on the SuperLink).
        let c = cfg(&[(ROLE, "supernode"), (SSL_CA_CERTFILE, &pem)]).unwrap();
        assert_eq!(c.tls_mode, TlsMode::Auto);
        assert!(c.ca_override.is_some());
    }

    #[test]
    fn unknown_names_get_a_did_you_mean_and_never_their_value() {
        let w = warn_vars(&[
            ("ONEAPP_FL_NUM_ROUND", "5"),
            ("ONEAPP_FL_AGG_STRATEGY", "c2VjcmV0"),
            ("ONEAPP_FLOWER_VERSIO", "1.25.0"),
            ("ONEAPP_OTHER_APP", "x"),
        ]);
        assert_eq!(
            w,
            vec![
                "ONEAPP_FLOWER_VERSIO: unknown variable ignored (did you mean ONEAPP_FLOWER_VERSION)",
                "ONEAPP_FL_AGG_STRATEGY: unknown variable ignored (did you mean ONEAPP_FL_STRATEGY)",
                "ONEAPP_FL_NUM_ROUND: unknown variable ignored (did you mean ONEAPP_FL_NUM_ROUNDS)",
            ]
        );
    }

    #[test]
    fn the_process_runtime_runs_the_installed_version() {
        let mut c = cfg(&[(ctx::RUNTIME, "process"), (ctx::FLOWER_VERSION, "1.31.0")]).unwrap();
        c.settle_version(Some("1.25.0\n"));
        assert_eq!(c.version, "1.25.0");
        assert_eq!(
            c.warnings[0].to_string(),
            "ONEAPP_FLOWER_VERSION: 1.31.0 is not installed in this image: running the installed 1.25.0"
        );
        let mut c = cfg(&[(ctx::RUNTIME, "docker"), (ctx::FLOWER_VERSION, "1.31.0")]).unwrap();
        c.settle_version(Some("1.25.0"));
        assert_eq!((c.version.as_str(), c.warnings.len()), ("1.31.0", 0));
        let mut c = cfg(&[(ctx::RUNTIME, "process")]).unwrap();
        c.settle_version(Some("garbage"));
        c.settle_version(None);
        assert_eq!((c.version.as_str(), c.warnings.len()), ("1.25.0", 0));
    }

    #[test]
    fn local_addr_follows_loopback_vm_address() {
        let c = cfg(&[("ETH0_IP", "127.0.10.6")]).unwrap();
        assert_eq!(c.local_addr().to_string(), "127.0.10.6");
        let c = cfg(&[("ETH0_IP", "10.0.0.6")]).unwrap();
        assert_eq!(c.local_addr().to_string(), "127.0.0.1");
    }
}
