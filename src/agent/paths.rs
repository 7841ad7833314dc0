//! Every file the agent touches, under `--root` (tests and onesim use a private root).

use std::path::{Path, PathBuf};

use super::context::Role;

/// File layout. All paths are `root` + the appliance path.
#[derive(Debug, Clone)]
pub struct Paths {
    root: PathBuf,
}

impl Paths {
    /// Layout under `root` (`/` in the images).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `root` + an absolute appliance path.
    pub fn at(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// The root itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `/opt/flower`.
    pub fn base(&self) -> PathBuf {
        self.at("/opt/flower")
    }
    /// Served TLS files (mounted read-only into the SuperLink container).
    pub fn certs_dir(&self) -> PathBuf {
        self.at("/opt/flower/certs")
    }
    /// The CA key: never mounted anywhere.
    pub fn ca_key(&self) -> PathBuf {
        self.at("/opt/flower/ca/ca.key")
    }
    /// SuperLink state (SQLite).
    pub fn state_dir(&self) -> PathBuf {
        self.at("/opt/flower/state")
    }
    /// Config written by `configure`.
    pub fn config_dir(&self) -> PathBuf {
        self.at("/opt/flower/config")
    }
    /// `FLWR_HOME` for the process runtime.
    pub fn flwr_home(&self) -> PathBuf {
        self.at("/opt/flower/home")
    }
    /// Persisted agent state (configure → bootstrap → run).
    pub fn agent_state(&self) -> PathBuf {
        self.config_dir().join("agent-state.json")
    }
    /// Environment file for Flower (docker `--env-file`).
    pub fn env_file(&self) -> PathBuf {
        self.config_dir().join("flower.env")
    }
    /// The role recorded at image build time.
    pub fn role_file(&self) -> PathBuf {
        self.at("/opt/flower/ROLE")
    }
    /// The runtime the image contains (`process` or `docker`), recorded at build time: the
    /// agent's default when the context sets no `ONEAPP_FL_RUNTIME`.
    pub fn image_runtime(&self) -> PathBuf {
        self.at("/opt/flower/RUNTIME")
    }
    /// The docker runtime's image lock: `TAG NAME@sha256:<digest>` per line, recorded by the
    /// image build for each image it pulled (packer/scripts/provision.sh).
    pub fn images_lock(&self) -> PathBuf {
        self.at("/opt/flower/images.lock")
    }
    /// `bin/` of the image's pinned Flower virtualenv (the process runtime's default).
    pub fn venv_bin(&self) -> PathBuf {
        self.at("/opt/flower/venv/bin")
    }
    /// The Flower version baked into the image.
    pub fn prebaked_version(&self) -> PathBuf {
        self.at("/opt/flower/PREBAKED_VERSION")
    }
    /// systemd unit directory.
    pub fn units_dir(&self) -> PathBuf {
        self.at("/etc/systemd/system")
    }
    /// one-apps log directory.
    pub fn log_dir(&self) -> PathBuf {
        self.at("/var/log/one-appliance")
    }
    /// Log of the Flower process (process runtime).
    pub fn flower_log(&self, role: Role) -> PathBuf {
        self.log_dir().join(format!("flower-{role}.log"))
    }
    /// Agent log.
    pub fn agent_log(&self) -> PathBuf {
        self.log_dir().join("flower-agent.log")
    }
    /// Runtime directory (pid files).
    pub fn run_dir(&self) -> PathBuf {
        self.at("/run/flower-agent")
    }
    /// one-apps service report.
    pub fn report(&self) -> PathBuf {
        self.at("/etc/one-appliance/config")
    }
}
