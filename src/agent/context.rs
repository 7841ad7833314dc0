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

/// Extra subject alternative name for the server certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum San {
    /// `IP:<addr>`
    Ip(IpAddr),
    /// `DNS:<name>`
    Dns(String),
}

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
}

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

fn parse_san_list(v: &str) -> Result<Vec<San>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            if let Some(ip) = item.strip_prefix("IP:") {
                ip.parse::<IpAddr>()
                    .map(San::Ip)
                    .map_err(|_| format!("invalid IP SAN {ip:?}"))
            } else if let Some(name) = item.strip_prefix("DNS:") {
                if endpoint::is_dns_name(name) {
                    Ok(San::Dns(name.to_string()))
                } else {
                    Err("invalid DNS SAN".into())
                }
            } else {
                Err("entries must be IP:<addr> or DNS:<name>".into())
            }
        })
        .collect()
}

impl Config {
    /// Validates a context. Every problem is collected; any problem fails.
    pub fn from_context(c: &Context) -> Result<Config, ConfigErrors> {
        use ctx::*;
        let mut r = Reader {
            ctx: c,
            errors: Vec::new(),
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
        let tls_mode = r.parse(TLS_MODE, TlsMode::Auto, |v| {
            enum_of(
                v,
                &[("auto", TlsMode::Auto), ("provided", TlsMode::Provided)],
            )
        });
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
                r.err(
                    TLS_MODE,
                    format!("provided needs {SSL_CA_CERTFILE}, {SSL_CERTFILE} and {SSL_KEYFILE} (all valid)"),
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
        let extra_san = r.parse(CERT_EXTRA_SAN, Vec::new(), parse_san_list);
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
        let data_dir = r.parse(DATA_DIR, PathBuf::from("/opt/flower/data"), abs_path);
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
            })
        } else {
            Err(ConfigErrors(r.errors))
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

    #[test]
    fn local_addr_follows_loopback_vm_address() {
        let c = cfg(&[("ETH0_IP", "127.0.10.6")]).unwrap();
        assert_eq!(c.local_addr().to_string(), "127.0.10.6");
        let c = cfg(&[("ETH0_IP", "10.0.0.6")]).unwrap();
        assert_eq!(c.local_addr().to_string(), "127.0.0.1");
    }
}
