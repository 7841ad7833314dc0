//! The lifecycle stages of one node: configure (context → files, TLS, discovery),
//! bootstrap (start, wait for health, publish), health, status.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use chrono::{SecondsFormat, Utc};
use sha2::{Digest as _, Sha256};
use tracing::Instrument as _;

use super::context::{Config, Role, Runtime, TlsMode};
use super::discovery::{self, DiscoveryError};
use super::error::IoError;
use super::flower::{self, FlowerError, NodeResolved};
use super::gate::Gate;
use super::paths::Paths;
use super::process::{self, Registration};
use super::tls::{self, AutoTls, TlsError, TlsPaths};
use crate::one::OneGateError;
use crate::protocol;

/// Why a node step (configure, bootstrap, run, a probe) failed. User-facing: VM logs and
/// `FL_ERROR` show these messages.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Starting Flower or writing its units.
    #[error(transparent)]
    Flower(#[from] FlowerError),
    /// Flower's identity, directories or their reach.
    #[error(transparent)]
    Privilege(#[from] super::privilege::PrivilegeError),
    /// A file or directory.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The SuperNode's authentication key.
    #[error(transparent)]
    NodeAuth(#[from] super::node_auth::NodeAuthError),
    /// OneGate refused or was unreachable.
    #[error("OneGate: {0}")]
    Gate(#[from] OneGateError),
    /// SuperLink discovery.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The state file does not parse.
    #[error("{}: {source}", path.display())]
    State {
        /// The state file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A command could not be run.
    #[error("{argv}: {source}")]
    Spawn {
        /// The command line.
        argv: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{argv} failed with {status}")]
    Command {
        /// The command line.
        argv: String,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// A SuperNode with neither an address nor discovery.
    #[error("no SuperLink address and no discovery")]
    NoSuperlink,
    /// The SuperLink was given a CA without its server certificate and key (seed rule:
    /// operator TLS is all or none).
    #[error(
        "{}: operator TLS needs {} and {} too (all or none)",
        protocol::context::SSL_CA_CERTFILE,
        protocol::context::SSL_CERTFILE,
        protocol::context::SSL_KEYFILE
    )]
    CaWithoutCertificate,
    /// TLS on, but nothing to trust.
    #[error("TLS is on but no CA to trust (fail closed)")]
    NoCa,
    /// A context CA that is not usable.
    #[error("{var}: {source}")]
    ContextCa {
        /// The context variable.
        var: &'static str,
        /// Why.
        source: TlsError,
    },
    /// `VMID` missing from the context.
    #[error("VMID is not set")]
    NoVmid,
    /// The SuperNode's log shows no registration yet.
    #[error("the SuperNode has not registered with the SuperLink")]
    NotRegistered,
    /// The SuperNode's log shows a lost registration.
    #[error("the SuperNode lost its registration (SuperLink restarted)")]
    LostRegistration,
    /// A TCP probe failed.
    #[error("{addr}: {source}")]
    Connect {
        /// The address probed.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A TCP probe timed out.
    #[error("{0}: connect timed out")]
    ConnectTimeout(SocketAddr),
    /// Flower did not serve in time.
    #[error("Flower did not become healthy within {within}: {last}")]
    NotHealthy {
        /// The wait.
        within: String,
        /// The last probe's failure.
        last: Box<AgentError>,
    },
    /// `bootstrap` with the process runtime under a test root.
    #[error("process runtime under --root: use `flower-agent run`, which owns the Flower process")]
    ProcessUnderRoot,
    /// `install --flower-version` that is not a Flower version (the codec's reason).
    #[error("--flower-version {0}")]
    BadVersion(String),
    /// The CA a SuperNode pinned cannot be read.
    #[error("cannot read the pinned CA {0}")]
    PinnedCa(IoError),
    /// No way to tell the role.
    #[error("unknown role: pass --role, install the image with a role, set {var} or run inside a OneFlow role named superlink/supernode")]
    UnknownRole {
        /// The context variable that names it.
        var: &'static str,
    },
}

/// State persisted between stages (configure → bootstrap → run), 0600 JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentState {
    /// Role of this node.
    pub role: Option<Role>,
    /// SuperNode: resolved address, node config (explicit or computed) and GPU use.
    #[serde(default)]
    pub node: NodeResolved,
    /// Whether the node config was computed from the role (not given).
    #[serde(default)]
    pub partition_computed: bool,
    /// SuperNode: `FL_GPU` value.
    #[serde(default)]
    pub gpu: Option<String>,
    /// SHA-256 of the CA the node trusts / serves.
    #[serde(default)]
    pub ca_sha256: Option<String>,
    /// SuperLink: VM id of the SuperLink this SuperNode follows.
    #[serde(default)]
    pub superlink_vm: Option<u64>,
    /// SuperLink: last rotation generation done.
    #[serde(default)]
    pub rotate_done: Option<u64>,
    /// When configure last succeeded (RFC 3339).
    #[serde(default)]
    pub configured_at: Option<String>,
    /// When bootstrap last succeeded (RFC 3339).
    #[serde(default)]
    pub bootstrapped_at: Option<String>,
}

impl AgentState {
    /// Loads the state file; missing file → `None`.
    pub fn load(paths: &Paths) -> Result<Option<Self>, AgentError> {
        let path = paths.agent_state();
        match fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|source| AgentError::State { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(IoError::at(path)(e).into()),
        }
    }

    /// Saves the state file (0600).
    pub fn save(&self, paths: &Paths) -> Result<(), AgentError> {
        let path = paths.agent_state();
        let text = serde_json::to_string_pretty(self).map_err(|source| AgentError::State {
            path: path.clone(),
            source,
        })?;
        Ok(tls::write_file(&path, text.as_bytes(), 0o600)?)
    }
}

/// Now, RFC 3339 UTC with seconds.
pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// One line for `FL_ERROR`: a conservative character set, at most 200 characters.
pub fn error_line(msg: &str) -> String {
    safe_line(msg, 200)
}

/// One line of `msg` in a character set OneGate stores unquoted and a shell or template
/// never interprets, at most `max` characters.
fn safe_line(msg: &str, max: usize) -> String {
    let cleaned: String = msg
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " ._:/()'+-@#".contains(c) {
                c
            } else {
                ' '
            }
        })
        .collect();
    let squeezed = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    squeezed.chars().take(max).collect()
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs a system command (argv) when the agent manages the real machine (root `/`); under
/// another root (tests, onesim) it is only logged.
pub fn system(paths: &Paths, argv: &[&str]) -> Result<(), AgentError> {
    if paths.root() != std::path::Path::new("/") {
        tracing::debug!(?argv, "skipped system command (root is not /)");
        return Ok(());
    }
    let status = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .status()
        .map_err(|source| AgentError::Spawn {
            argv: argv.join(" "),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(AgentError::Command {
            argv: argv.join(" "),
            status,
        })
    }
}

/// `FL_RUN_CONFIG`: the default run configuration of a SuperLink's context, the checkpoint
/// path as the ServerApp sees it (the docker runtime mounts it at the same path; the
/// process runtime sees it under `paths`' root).
pub fn published_run_config(cfg: &Config, paths: &Paths) -> String {
    let mut t = cfg.training.clone();
    if let Some(cp) = &mut t.checkpoint {
        if !flower::is_docker(cfg) {
            cp.path = paths.at(&cp.path).display().to_string();
        }
    }
    // Every value passed the context's rules; a root path holding a quote and an
    // apostrophe cannot be rendered, and then nothing is published.
    protocol::run_config::render(&protocol::run_config::entries(&t)).unwrap_or_default()
}

/// One node: configuration, files and OneGate.
pub struct Node<G: Gate> {
    /// Layout.
    pub paths: Paths,
    /// Validated context.
    pub cfg: Config,
    /// Role.
    pub role: Role,
    /// OneGate.
    pub gate: G,
}

impl<G: Gate> Node<G> {
    /// TLS file locations.
    pub fn tls_paths(&self) -> TlsPaths {
        TlsPaths {
            certs_dir: self.paths.certs_dir(),
            ca_key: self.paths.ca_key(),
        }
    }

    /// Auto-mode TLS settings of this node.
    pub fn auto_tls(&self) -> AutoTls<'_> {
        AutoTls {
            addr: self.cfg.vm_addr(),
            extra: &self.cfg.extra_san,
            validity: self.cfg.cert_validity,
            renew_before: self.cfg.cert_renew_before,
        }
    }

    /// `configure`: validates, prepares files, TLS, discovery; persists the result.
    pub async fn configure(&self) -> Result<AgentState, AgentError> {
        let mut st = AgentState::load(&self.paths)
            .ok()
            .flatten()
            .unwrap_or_default();
        st.role = Some(self.role);
        for d in [
            self.paths.base(),
            self.paths.config_dir(),
            self.paths.log_dir(),
        ] {
            fs::create_dir_all(&d).map_err(IoError::at(&d))?;
        }
        // Root's only: the agent's state and Flower's env file, never Flower's to read.
        let _ = fs::set_permissions(self.paths.config_dir(), fs::Permissions::from_mode(0o750));
        super::privilege::give_to_flower(&self.paths.flwr_home())?;
        match self.role {
            Role::Superlink => self.configure_superlink(&mut st)?,
            Role::Supernode => self.configure_supernode(&mut st).await?,
        }
        self.configure_files(&st)?;
        st.configured_at = Some(now_rfc3339());
        st.save(&self.paths)?;
        self.write_report(&st);
        Ok(st)
    }

    /// Writes the Flower env file and, for docker, the units (also after a change in `run`).
    pub fn configure_files(&self, st: &AgentState) -> Result<(), AgentError> {
        let env = flower::env_file(&flower::flower_env(&self.cfg, self.role, &st.node));
        tls::write_file(&self.paths.env_file(), env.as_bytes(), 0o600)?;
        self.write_units(st)
    }

    fn configure_superlink(&self, st: &mut AgentState) -> Result<(), AgentError> {
        let state_dir = self.paths.state_dir();
        // The database may sit in a subdirectory (the seed's `state/state.db`).
        let db_dir = state_dir
            .join(&self.cfg.database)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| state_dir.clone());
        // Flower writes its database there (it runs as the Flower user, #17 item 5).
        for d in [&state_dir, &db_dir] {
            super::privilege::give_to_flower(d)?;
        }
        if let Some(cp) = &self.cfg.training.checkpoint {
            self.prepare_checkpoints(&cp.path)?;
        }
        if self.cfg.tls && self.cfg.tls_mode == TlsMode::Auto && self.cfg.ca_override.is_some() {
            // Seed rule: a CA given on the SuperLink means operator certificates, all or none.
            return Err(AgentError::CaWithoutCertificate);
        }
        if !self.cfg.tls {
            tracing::warn!("TLS is off: SuperNodes connect in plaintext");
            return Ok(());
        }
        let span = super::trace::stage(tracing::info_span!(
            parent: None,
            "agent tls",
            flower.role = "superlink",
            tls.mode = match self.cfg.tls_mode {
                TlsMode::Auto => "auto",
                TlsMode::Provided => "provided",
            },
        ));
        let _tls = span.enter();
        match (self.cfg.tls_mode, &self.cfg.provided) {
            (TlsMode::Provided, Some(p)) => {
                tls::install_provided(
                    &self.tls_paths(),
                    &p.ca_pem,
                    &p.cert_pem,
                    &p.key_pem.0,
                    self.cfg.vm_addr(),
                    Utc::now(),
                )?;
            }
            _ => {
                let action =
                    tls::ensure_auto(&self.tls_paths(), &self.auto_tls(), Utc::now(), false)?;
                tracing::info!(?action, "TLS material ready");
            }
        }
        let ca_crt = self.tls_paths().ca_crt();
        let ca = fs::read(&ca_crt).map_err(IoError::at(&ca_crt))?;
        st.ca_sha256 = Some(sha256_hex(&ca));
        Ok(())
    }

    /// The checkpoint directory: created, and Flower's when the agent runs as root.
    fn prepare_checkpoints(&self, vm_path: &str) -> Result<(), AgentError> {
        Ok(super::privilege::give_to_flower(&self.paths.at(vm_path))?)
    }

    /// `FL_RUN_CONFIG` ([`published_run_config`]).
    pub fn run_config(&self) -> String {
        published_run_config(&self.cfg, &self.paths)
    }

    /// The context's warnings as one `FL_WARNING` line, ` -- `-separated, in `FL_ERROR`'s
    /// character set, at most 1,000 characters (empty when none).
    pub fn warning_line(&self) -> String {
        let all: Vec<String> = self.cfg.warnings.iter().map(ToString::to_string).collect();
        safe_line(&all.join(" -- "), 1000)
    }

    async fn configure_supernode(&self, st: &mut AgentState) -> Result<(), AgentError> {
        let need_ca_from_gate = self.cfg.tls && self.cfg.ca_override.is_none();
        let view = match (&self.cfg.superlink_address, need_ca_from_gate) {
            (Some(_), false) => None,
            _ => Some(
                discovery::discover(
                    &self.gate,
                    need_ca_from_gate,
                    self.cfg.discovery_timeout,
                    self.cfg.backoff,
                )
                .instrument(super::trace::stage(tracing::info_span!(
                    parent: None,
                    "agent discovery"
                )))
                .await?,
            ),
        };
        st.node.superlink = match (&self.cfg.superlink_address, &view) {
            (Some(addr), _) => Some(addr.clone()),
            (None, Some(v)) => Some(v.endpoint.clone()),
            (None, None) => return Err(AgentError::NoSuperlink),
        };
        st.superlink_vm = view.as_ref().map(|v| v.vm_id);
        st.node.node_auth =
            super::node_auth::supernode_presents_key(&self.cfg, view.as_ref().map(|v| v.node_auth));
        if let Some(v) = &view {
            if !self.cfg.tls && v.tls == Some(true) {
                tracing::warn!("the SuperLink advertises TLS but TLS is off here; staying insecure (operator intent wins)");
            }
        }
        if self.cfg.tls {
            let span = super::trace::stage(tracing::info_span!(
                parent: None,
                "agent tls",
                flower.role = "supernode",
                tls.ca = if self.cfg.ca_override.is_some() { "context" } else { "onegate" },
            ));
            let _tls = span.enter();
            let ca = match (
                &self.cfg.ca_override,
                view.as_ref().and_then(|v| v.ca_pem.clone()),
            ) {
                (Some(ca), _) => {
                    tls::validate_ca(ca, Utc::now()).map_err(|source| AgentError::ContextCa {
                        var: protocol::context::SSL_CA_CERTFILE,
                        source,
                    })?;
                    ca.clone()
                }
                (None, Some(ca)) => ca,
                (None, None) => return Err(AgentError::NoCa),
            };
            self.install_ca(st, &ca)?;
        }
        if super::node_auth::enabled(&self.cfg, Role::Supernode) {
            let key = super::node_auth::ensure_key(&self.paths)?;
            tracing::info!(key = %key.fingerprint(), "SuperNode authentication key ready");
            // Published before Flower starts, so the SuperLink registers it meanwhile.
            if self.gate.is_configured() {
                let value = key.encode();
                if let Err(e) = self
                    .gate
                    .update_vm(&[(protocol::FL_NODE_PUBKEY, value.as_str())])
                    .await
                {
                    tracing::warn!(problem = %e, "cannot publish the SuperNode key yet; it goes with readiness");
                }
            }
        }
        st.partition_computed = false;
        st.node.node_config = match &self.cfg.node_config {
            Some(nc) => Some(nc.clone()),
            None => match self.compute_partition().await {
                Ok(nc) => {
                    st.partition_computed = true;
                    Some(nc)
                }
                Err(e) => {
                    tracing::warn!(problem = %e, "cannot compute partition-id/num-partitions; starting without node config");
                    None
                }
            },
        };
        let gpu = if self.cfg.gpu_enabled {
            let found = super::gpu::detect().await;
            super::events::log(&super::events::gpu(found.as_ref()), self.role.as_str());
            if found.is_none() {
                tracing::warn!("GPU requested but none usable (no /dev/nvidia0 or nvidia-smi failed): falling back to CPU");
            }
            found.map(|g| g.describe())
        } else {
            None
        };
        st.node.gpu = gpu.is_some();
        st.gpu = Some(gpu.unwrap_or_else(|| "NONE".into()));
        Ok(())
    }

    /// Writes the CA a SuperNode trusts (0644) and records its digest.
    pub fn install_ca(&self, st: &mut AgentState, ca_pem: &str) -> Result<(), AgentError> {
        let certs = self.paths.certs_dir();
        fs::create_dir_all(&certs).map_err(IoError::at(&certs))?;
        tls::write_file(&self.tls_paths().ca_crt(), ca_pem.as_bytes(), 0o644)?;
        st.ca_sha256 = Some(sha256_hex(ca_pem.as_bytes()));
        Ok(())
    }

    async fn compute_partition(&self) -> Result<super::context::NodeConfig, AgentError> {
        let vmid = self.cfg.vmid.ok_or(AgentError::NoVmid)?;
        let service = self.gate.get_service(false).await?;
        Ok(discovery::partition_of(&service, Role::Supernode, vmid)?)
    }

    fn write_units(&self, st: &AgentState) -> Result<(), AgentError> {
        let units = self.paths.units_dir();
        let agent = flower::agent_unit(
            std::path::Path::new("/usr/local/bin/flower-agent"),
            self.role,
        )?;
        tls::write_file(&units.join("flower-agent.service"), agent.as_bytes(), 0o644)?;
        if self.cfg.runtime == Runtime::Process {
            return system(&self.paths, &["systemctl", "daemon-reload"]);
        }
        let name = flower::unit_name(self.role);
        let image = flower::pinned_image(&self.cfg, self.role, &self.paths)?;
        match flower::flower_unit(&self.cfg, self.role, &st.node, &self.paths, &image) {
            Ok(unit) => tls::write_file(
                &units.join(format!("{name}.service")),
                unit.as_bytes(),
                0o644,
            )?,
            // A SuperNode whose SuperLink is not known yet gets its unit in `run`.
            Err(FlowerError::SuperlinkUnresolved) => {}
            // An unpinned image, a bad argument: refused, never a unit with a guess.
            Err(e) => return Err(e.into()),
        }
        let dcgm = self.role == Role::Supernode && self.cfg.dcgm_enabled && st.node.gpu;
        if dcgm {
            tls::write_file(
                &units.join("dcgm-exporter.service"),
                flower::dcgm_unit().as_bytes(),
                0o644,
            )?;
        } else if self.role == Role::Supernode && self.cfg.dcgm_enabled {
            tracing::warn!("DCGM exporter requested without a usable GPU: not installed");
        }
        system(&self.paths, &["systemctl", "daemon-reload"])?;
        if dcgm {
            // Written is not running (#16 item 3): enabled for the next boots, started now.
            system(
                &self.paths,
                &["systemctl", "enable", "--now", "dcgm-exporter.service"],
            )?;
        }
        Ok(())
    }

    fn write_report(&self, st: &AgentState) {
        let mut r = format!(
            "[Flower {}]\nversion = {}\ntls = {}\nruntime = {:?}\n",
            self.role, self.cfg.version, self.cfg.tls, self.cfg.runtime
        );
        match self.role {
            Role::Superlink => {
                r.push_str(&format!("fleet_api = {}\n", self.endpoint()));
                r.push_str(&format!(
                    "control_api = {}:{}\n",
                    flower::Binds::host(&self.cfg).control,
                    self.cfg.control_port
                ));
            }
            Role::Supernode => {
                if let Some(s) = &st.node.superlink {
                    r.push_str(&format!("superlink = {s}\n"));
                }
                if let Some(nc) = &st.node.node_config {
                    r.push_str(&format!("node_config = {}\n", nc.as_context()));
                }
                r.push_str(&format!("gpu = {}\n", st.gpu.as_deref().unwrap_or("NONE")));
            }
        }
        if let Err(e) = tls::write_file(&self.paths.report(), r.as_bytes(), 0o600) {
            tracing::warn!(problem = %e, "cannot write the service report");
        }
    }

    /// `FL_ENDPOINT`: the VM address and the Fleet port.
    pub fn endpoint(&self) -> String {
        crate::protocol::endpoint::HostPort::from_ip(self.cfg.vm_addr(), self.cfg.fleet_port)
            .to_string()
    }

    /// Attributes that say "serving" for this role.
    pub fn ready_attributes(&self, st: &AgentState) -> Vec<(String, String)> {
        let mut a: Vec<(String, String)> = vec![
            (protocol::FL_ROLE.into(), self.role.as_str().into()),
            (protocol::FL_VERSION.into(), self.cfg.version.clone()),
        ];
        match self.role {
            Role::Superlink => {
                a.push((protocol::FL_READY.into(), "YES".into()));
                a.push((protocol::FL_ENDPOINT.into(), self.endpoint()));
                a.push((
                    protocol::FL_RUN_CONFIG.into(),
                    protocol::run_config::encode_attribute(&self.run_config()),
                ));
                a.push((
                    protocol::FL_TLS.into(),
                    if self.cfg.tls { "YES" } else { "NO" }.into(),
                ));
                a.push((
                    protocol::FL_NODE_AUTH.into(),
                    if super::node_auth::enabled(&self.cfg, Role::Superlink) {
                        "YES"
                    } else {
                        "NO"
                    }
                    .into(),
                ));
                if self.cfg.tls {
                    let tp = self.tls_paths();
                    if let Ok(ca) = fs::read(tp.ca_crt()) {
                        a.push((
                            protocol::FL_CA_CERT.into(),
                            base64::engine::general_purpose::STANDARD.encode(ca),
                        ));
                    }
                    if let Some(info) = fs::read_to_string(tp.server_pem())
                        .ok()
                        .and_then(|p| tls::inspect(&p).ok())
                    {
                        a.push((
                            protocol::FL_CERT_NOT_AFTER.into(),
                            info.not_after.to_rfc3339_opts(SecondsFormat::Secs, true),
                        ));
                    }
                }
            }
            Role::Supernode => {
                a.push((protocol::FL_NODE_READY.into(), "YES".into()));
                let id = self
                    .cfg
                    .vmid
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "unknown".into());
                a.push((protocol::FL_NODE_ID.into(), id));
                a.push((
                    protocol::FL_GPU.into(),
                    st.gpu.clone().unwrap_or_else(|| "NONE".into()),
                ));
                if super::node_auth::enabled(&self.cfg, Role::Supernode) {
                    if let Some(key) = super::node_auth::public_key(&self.paths) {
                        a.push((protocol::FL_NODE_PUBKEY.into(), key.encode()));
                    }
                }
            }
        }
        let warnings = self.warning_line();
        if !warnings.is_empty() {
            a.push((protocol::FL_WARNING.into(), warnings));
        }
        a.push((protocol::FL_HEARTBEAT.into(), now_rfc3339()));
        a
    }

    /// Publishes readiness (+ `READY=YES`) and removes a stale `FL_ERROR`. OneGate failures
    /// are returned for the caller to log and retry.
    pub async fn publish_ready(&self, st: &AgentState) -> Result<(), AgentError> {
        if !self.gate.is_configured() {
            return Ok(());
        }
        let mut attrs = self.ready_attributes(st);
        attrs.push((protocol::READY.into(), "YES".into()));
        let pairs: Vec<(&str, &str)> = attrs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.gate.update_vm(&pairs).await?;
        self.clear_error().await
    }

    /// Deletes `FL_ERROR` if the VM has it (OneGate answers 500 for an absent attribute).
    pub async fn clear_error(&self) -> Result<(), AgentError> {
        let vm = self.gate.get_vm().await?;
        if vm.attr(protocol::FL_ERROR).is_some() {
            self.gate.delete_vm_attribute(protocol::FL_ERROR).await?;
        }
        // Warnings of an earlier context that this one no longer has.
        if self.cfg.warnings.is_empty() && vm.attr(protocol::FL_WARNING).is_some() {
            self.gate.delete_vm_attribute(protocol::FL_WARNING).await?;
        }
        Ok(())
    }

    /// Publishes a failure: `FL_ERROR` and the role's readiness `NO` (best effort).
    pub async fn publish_error(&self, msg: &str) {
        let ready_key = match self.role {
            Role::Superlink => protocol::FL_READY,
            Role::Supernode => protocol::FL_NODE_READY,
        };
        let line = error_line(msg);
        if !self.gate.is_configured() {
            return;
        }
        let attrs = [
            (protocol::FL_ERROR, line.as_str()),
            (ready_key, "NO"),
            (protocol::FL_ROLE, self.role.as_str()),
        ];
        if let Err(e) = self.gate.update_vm(&attrs).await {
            tracing::warn!(problem = %e, "cannot publish FL_ERROR");
        }
    }

    /// Whether Flower serves, checked from outside (the `health` probe).
    pub async fn probe(&self) -> Result<(), AgentError> {
        match self.role {
            Role::Superlink => probe_tcp(self.fleet_socket()).await,
            Role::Supernode => {
                let log = match self.cfg.runtime {
                    Runtime::Process => {
                        process::read_tail(&self.paths.flower_log(Role::Supernode), 0, 256 * 1024)
                    }
                    Runtime::Docker => docker_logs("flower-supernode")?,
                };
                match process::registration(&log) {
                    Registration::Registered(_) => Ok(()),
                    Registration::Pending => Err(AgentError::NotRegistered),
                    Registration::Lost => Err(AgentError::LostRegistration),
                }
            }
        }
    }

    /// The Fleet API socket this node serves (SuperLink).
    pub fn fleet_socket(&self) -> SocketAddr {
        SocketAddr::new(self.cfg.vm_addr(), self.cfg.fleet_port)
    }

    /// Path of the server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.tls_paths().server_pem()
    }
}

/// TCP connect within 2 s.
pub async fn probe_tcp(addr: SocketAddr) -> Result<(), AgentError> {
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(AgentError::Connect { addr, source }),
        Err(_) => Err(AgentError::ConnectTimeout(addr)),
    }
}

fn docker_logs(container: &str) -> Result<String, AgentError> {
    let argv = format!("docker logs {container}");
    let out = std::process::Command::new("docker")
        .args(["logs", "--tail", "2000", container])
        .output()
        .map_err(|source| AgentError::Spawn {
            argv: argv.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(AgentError::Command {
            argv,
            status: out.status,
        });
    }
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(root: &Path, pairs: &[(&str, &str)]) -> Node<super::super::gate::NoGate> {
        use crate::protocol::context as ctx;
        let mut all = vec![(ctx::RUNTIME, "process"), ("ETH0_IP", "127.0.0.1")];
        all.extend_from_slice(pairs);
        let cfg = Config::from_context(&super::super::context::Context::from_pairs(all)).unwrap();
        Node {
            paths: Paths::new(root),
            cfg,
            role: Role::Superlink,
            gate: super::super::gate::NoGate,
        }
    }

    #[tokio::test]
    async fn seed_variables_reach_the_superlinks_files_and_attributes() {
        use crate::protocol::context as ctx;
        let dir = tempfile::tempdir().unwrap();
        let n = node(
            dir.path(),
            &[
                (ctx::DATABASE, "state/state.db"),
                (ctx::CERT_EXTRA_SAN, "DNS:link.example.org,IP:100.64.0.9"),
                (ctx::NUM_ROUNDS, "4"),
                (ctx::STRATEGY, "FedAdam"),
                (ctx::SERVER_LR, "0.01"),
                (ctx::CHECKPOINT_ENABLED, "YES"),
                ("ONEAPP_FL_NUM_ROUND", "5"),
            ],
        );
        let st = n.configure().await.unwrap();
        // The seed's database path: its directory exists for Flower to create the file.
        assert!(dir.path().join("opt/flower/state/state").is_dir());
        // CERT_EXTRA_SAN reaches the serving certificate.
        let pem = fs::read_to_string(n.server_cert()).unwrap();
        let info = tls::inspect(&pem).unwrap();
        assert!(
            info.dns.iter().any(|d| d == "link.example.org"),
            "{:?}",
            info.dns
        );
        assert!(
            info.ips.contains(&"100.64.0.9".parse().unwrap()),
            "{:?}",
            info.ips
        );
        // Checkpointing: the directory exists, and FL_RUN_CONFIG names it as the
        // (process-runtime) ServerApp sees it.
        let cp = dir.path().join("opt/flower/checkpoints");
        assert!(cp.is_dir());
        let attrs: std::collections::BTreeMap<String, String> =
            n.ready_attributes(&st).into_iter().collect();
        let text = protocol::run_config::decode_attribute(&attrs[protocol::FL_RUN_CONFIG]).unwrap();
        assert_eq!(
            text,
            format!(
                "num-server-rounds=4 strategy=\"FedAdam\" min-fit-clients=2 min-train-nodes=2 \
                 min-evaluate-clients=2 min-available-clients=2 server-lr=0.01 \
                 checkpoint-enabled=true checkpoint-interval=5 checkpoint-path=\"{}\"",
                cp.display()
            )
        );
        // The misspelt variable is named in FL_WARNING, with the right name.
        assert_eq!(
            attrs[protocol::FL_WARNING],
            "ONEAPP_FL_NUM_ROUND: unknown variable ignored (did you mean ONEAPP_FL_NUM_ROUNDS)"
        );
        // A clean context publishes no FL_WARNING.
        let clean = node(dir.path(), &[]);
        assert!(!clean
            .ready_attributes(&st)
            .iter()
            .any(|(k, _)| k == protocol::FL_WARNING));
    }

    #[tokio::test]
    async fn a_superlink_given_only_a_ca_refuses_to_boot() {
        use crate::protocol::context as ctx;
        let dir = tempfile::tempdir().unwrap();
        let ca = tls::generate_ca(Utc::now(), Duration::from_secs(86400)).unwrap();
        let n = node(
            dir.path(),
            &[(
                ctx::SSL_CA_CERTFILE,
                &protocol::pem::encode(ca.cert_pem.as_bytes()),
            )],
        );
        let e = n.configure().await.unwrap_err().to_string();
        assert_eq!(
            e,
            "ONEAPP_FL_SSL_CA_CERTFILE: operator TLS needs ONEAPP_FL_SSL_CERTFILE and ONEAPP_FL_SSL_KEYFILE too (all or none)"
        );
    }

    #[test]
    fn error_line_is_one_safe_line() {
        let l = error_line("bad\nthing; rm -rf / \"quoted\" \\ = , ] ok");
        assert!(
            !l.contains('\n')
                && !l.contains(';')
                && !l.contains('\\')
                && !l.contains('=')
                && !l.contains(',')
        );
        assert_eq!(l, "bad thing rm -rf / quoted ok");
        assert_eq!(error_line(&"x".repeat(500)).len(), 200);
    }
}
