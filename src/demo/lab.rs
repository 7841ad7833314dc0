//! A one-machine OpenNebula "lab": onesim started in-process with the process runtime, plus
//! what an administrator would create by hand (the two appliance VM templates and a network).
//!
//! The demo and the end-to-end tests both stand on it. VMs boot as real processes running
//! `flower-agent`, which runs real Flower from the pinned virtualenv.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::one::{ApiBudget, ApiStats, Credentials, OneConfig, OnedClient};
use crate::protocol::context as ctx;

/// Names the example specs refer to (manifests/examples/basic.yaml).
pub const SUPERLINK_TEMPLATE: &str = "flower-superlink";
/// See [`SUPERLINK_TEMPLATE`].
pub const SUPERNODE_TEMPLATE: &str = "flower-supernode";
/// See [`SUPERLINK_TEMPLATE`].
pub const NETWORK: &str = "flower-net";

/// How the lab's VMs run: the one parameter between the demo's and the tests' runtimes.
#[derive(Debug, Clone)]
pub enum LabRuntime {
    /// onesim's process runtime: each VM is a `flower-agent` process, Flower runs from the
    /// host's virtualenv.
    Process {
        /// The guest argv prefix that runs the agent, e.g. `[".../flower-agent"]`; the lab
        /// appends `run --context {context} --root {vm_dir}`.
        agent: Vec<String>,
        /// The pinned Flower virtualenv.
        venv: PathBuf,
    },
}

/// How to start a lab.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Where VM directories, the auth file and logs go.
    pub base_dir: PathBuf,
    /// How VMs run.
    pub runtime: LabRuntime,
    /// Seconds between the agents' heartbeats.
    pub heartbeat_secs: u32,
    /// Duration of each simulated VM state transition.
    pub vm_step: Duration,
    /// OneGate's server settings (`update_by_id`, restricted attributes).
    pub onegate: onesim::GateConfig,
}

/// A running lab.
pub struct Lab {
    sim: onesim::Handle,
    /// oned XML-RPC, OneFlow, OneGate and the fault-injection control API.
    pub urls: onesim::Urls,
    /// The `ONE_AUTH` file (`oneadmin:<password>`, mode 0600).
    pub auth_file: PathBuf,
    /// The lab's directory.
    pub base_dir: PathBuf,
    password: String,
}

impl Lab {
    /// Start onesim and create the appliance templates and the network.
    pub async fn start(cfg: LabConfig) -> anyhow::Result<Lab> {
        std::fs::create_dir_all(&cfg.base_dir)?;
        let password = random_password();
        let mut sim_cfg = onesim::Config::for_tests(&password);
        sim_cfg.runtime = match &cfg.runtime {
            LabRuntime::Process { agent, .. } => {
                let mut guest = agent.clone();
                guest.extend(
                    ["run", "--context", "{context}", "--root", "{vm_dir}"]
                        .iter()
                        .map(|s| s.to_string()),
                );
                onesim::Runtime::Process {
                    guest_cmd: guest,
                    base_dir: cfg.base_dir.join("vms"),
                }
            }
        };
        sim_cfg.timings.vm_step = cfg.vm_step;
        sim_cfg.onegate = cfg.onegate.clone();
        let sim = onesim::start(sim_cfg).await?;
        let urls = sim.urls().clone();
        let auth_file = cfg.base_dir.join("one_auth");
        write_private(&auth_file, &format!("oneadmin:{password}\n"))?;
        let lab = Lab {
            sim,
            urls,
            auth_file,
            base_dir: cfg.base_dir.clone(),
            password,
        };
        lab.create_admin_objects(&cfg).await?;
        Ok(lab)
    }

    /// Client settings for this lab.
    pub fn one_config(&self) -> anyhow::Result<OneConfig> {
        let creds = Credentials::new("oneadmin", self.password.clone())?;
        Ok(OneConfig::new(
            self.urls.xmlrpc.parse()?,
            self.urls.oneflow.parse()?,
            creds,
        ))
    }

    /// The environment a `flower-reconcile` process needs to reach this lab.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("ONE_XMLRPC".into(), self.urls.xmlrpc.clone()),
            ("ONEFLOW_URL".into(), self.urls.oneflow.clone()),
            ("ONE_AUTH".into(), self.auth_file.display().to_string()),
        ]
    }

    /// The simulator, for fault injection and event-log queries.
    pub fn sim(&self) -> &onesim::Handle {
        &self.sim
    }

    /// Stop every VM process and the simulator.
    pub async fn shutdown(self) {
        self.sim.shutdown().await;
    }

    async fn create_admin_objects(&self, cfg: &LabConfig) -> anyhow::Result<()> {
        crate::one::http::ensure_crypto_provider();
        let one = OnedClient::new(
            &self.one_config()?,
            ApiBudget::default_shared(),
            ApiStats::new(),
        )?;
        one.vn_allocate(&network_template(self.sim.loopback_net()), -1)
            .await?;
        for (name, memory) in [(SUPERLINK_TEMPLATE, 1024), (SUPERNODE_TEMPLATE, 1024)] {
            one.template_allocate(&vm_template(name, memory, cfg))
                .await?;
        }
        Ok(())
    }
}

/// The lab's network as an administrator creates it for the process runtime: VMs bind their
/// leases on this host's loopback, so the address range lies in the loopback net this
/// simulator reserved (`127.<net>.0.0/16`, [`onesim::reserve_loopback_net`]), which no other
/// lab on the host uses.
fn network_template(net: u8) -> String {
    format!(
        "NAME = \"{NETWORK}\"\nVN_MAD = \"bridge\"\nBRIDGE = \"br-flower\"\n\
         NETWORK_MASK = \"255.255.0.0\"\n\
         AR = [ TYPE = \"IP4\", IP = \"127.{net}.1.1\", SIZE = \"250\" ]\n"
    )
}

/// An appliance VM template as an administrator would register it. Process runtime: the
/// agent runs Flower as processes from the lab's virtualenv.
fn vm_template(name: &str, memory: u32, cfg: &LabConfig) -> String {
    let runtime = match &cfg.runtime {
        LabRuntime::Process { venv, .. } => format!(
            "{runtime} = \"process\", {bin_dir} = \"{bin}\", ",
            runtime = ctx::RUNTIME,
            bin_dir = ctx::FLOWER_BIN_DIR,
            bin = venv.join("bin").display(),
        ),
    };
    format!(
        "NAME = \"{name}\"\nCPU = \"1\"\nVCPU = \"1\"\nMEMORY = \"{memory}\"\n\
         CONTEXT = [ NETWORK = \"YES\", TOKEN = \"YES\", REPORT_READY = \"YES\", \
         {runtime}{heartbeat} = \"{hb}\" ]\n",
        heartbeat = ctx::HEARTBEAT_INTERVAL,
        hb = cfg.heartbeat_secs,
    )
}

fn random_password() -> String {
    use std::hash::{BuildHasher, Hasher};
    // Not a secret worth a CSPRNG: onesim listens on loopback for the lab's lifetime only.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("lab-{:016x}", h.finish())
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_templates_carry_the_process_runtime_and_the_venv() {
        let cfg = LabConfig {
            base_dir: "/tmp/lab".into(),
            runtime: LabRuntime::Process {
                agent: vec!["flower-agent".into()],
                venv: "/tmp/venv".into(),
            },
            heartbeat_secs: 5,
            vm_step: Duration::from_millis(100),
            onegate: Default::default(),
        };
        let t = vm_template("flower-superlink", 1024, &cfg);
        assert!(t.contains("NAME = \"flower-superlink\""));
        assert!(t.contains("ONEAPP_FL_RUNTIME = \"process\""));
        assert!(t.contains("ONEAPP_FL_FLOWER_BIN_DIR = \"/tmp/venv/bin\""));
        assert!(t.contains("TOKEN = \"YES\""));
        assert!(t.contains("ONEAPP_FL_HEARTBEAT_INTERVAL = \"5\""));
    }
}
