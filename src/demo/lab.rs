//! A one-machine OpenNebula "lab": onesim started in-process, plus what an administrator
//! would create by hand through oned's XML-RPC (the two appliance VM templates, a network and,
//! on the image runtime, the two appliance images).
//!
//! The demo and the end-to-end tests both stand on it, on either runtime:
//! - process: VMs boot as `flower-agent` processes, which run real Flower from the pinned
//!   virtualenv; the network lies in the simulator's loopback net.
//! - image: VMs boot the appliance QCOW2 images (`make -C packer image ROLE=…`) as
//!   systemd-nspawn machines ([`onesim::machine`]): the images' own agent, units, lifecycle
//!   and virtualenv; the network is a bridge with a gateway on a private range.
//!
//! Owns: the lab's onesim, its `ONE_AUTH` file, and the administrator's objects.
//! Must not: reach OpenNebula other than through its APIs (the images are registered with
//! `one.image.allocate` and a PATH, as `oneimage create --path` does).
//! Guarantees: a missing prerequisite of the image runtime (an image file, root,
//! systemd-nspawn) is an error that says how to get it, before anything starts
//! ([`check_image_runtime`]); [`Lab::host_marks`] names everything the lab may create on the
//! host, for checks that nothing is left behind.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::one::model::Image;
use crate::one::{ApiBudget, ApiStats, Credentials, OneConfig, OnedClient};
use crate::protocol::context as ctx;

/// Names the example specs refer to (manifests/examples/basic.yaml).
pub const SUPERLINK_TEMPLATE: &str = "flower-superlink";
/// See [`SUPERLINK_TEMPLATE`].
pub const SUPERNODE_TEMPLATE: &str = "flower-supernode";
/// See [`SUPERLINK_TEMPLATE`].
pub const NETWORK: &str = "flower-net";

/// The appliance roles: each has a VM template and, on the image runtime, an image, both
/// named after the image file `<name>.qcow2` that `make -C packer image ROLE=<role>` writes.
pub const APPLIANCES: [(&str, &str); 2] = [
    ("superlink", SUPERLINK_TEMPLATE),
    ("supernode", SUPERNODE_TEMPLATE),
];

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
    /// onesim's image runtime: each VM boots its appliance image as a systemd-nspawn machine
    /// (root only); the images' own agent runs Flower from the images' virtualenv.
    Image {
        /// Holds `flower-superlink.qcow2` and `flower-supernode.qcow2`.
        images: PathBuf,
        /// Where onesim keeps raw copies of the images between runs.
        cache_dir: PathBuf,
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
    /// How often OneFlow's autoscaler evaluates elasticity policies (OneFlow's default is
    /// [`DEFAULT_AUTOSCALER_INTERVAL`]; tests of elasticity use seconds).
    pub autoscaler_interval: Duration,
}

/// OneFlow's `:autoscaler_interval:` default.
pub const DEFAULT_AUTOSCALER_INTERVAL: Duration = Duration::from_secs(90);

/// A running lab.
pub struct Lab {
    sim: onesim::Handle,
    /// oned XML-RPC, OneFlow, OneGate and the fault-injection control API.
    pub urls: onesim::Urls,
    /// The `ONE_AUTH` file (`oneadmin:<password>`, mode 0600).
    pub auth_file: PathBuf,
    /// The lab's directory.
    pub base_dir: PathBuf,
    /// The image runtime's bridge and raw-image cache.
    bridged: Option<Bridged>,
    password: String,
}

/// What the image runtime puts on the host besides the lab's directory.
struct Bridged {
    net: BridgedNet,
    cache_dir: PathBuf,
}

/// The image runtime's network: a bridge of its own, the gateway its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgedNet {
    /// The host bridge onesim creates (`BRIDGE`).
    pub bridge: String,
    /// `10.200.<net>.0/24`'s first address: the bridge's, where OneGate answers.
    pub gateway: std::net::Ipv4Addr,
}

impl BridgedNet {
    /// The network of the simulator holding loopback net `net`: no other lab on this host
    /// holds the same `net` ([`onesim::reserve_loopback_net`]), so bridge and range are the
    /// lab's alone.
    pub fn for_net(net: u8) -> BridgedNet {
        BridgedNet {
            bridge: format!("flbr{net}"),
            gateway: std::net::Ipv4Addr::new(10, 200, net, 1),
        }
    }
}

/// The appliance image of `role` in `dir`, or an error saying how to build it.
pub fn appliance_image(dir: &Path, role: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("flower-{role}.qcow2"));
    if !path.is_file() {
        anyhow::bail!(
            "appliance image {} not found: build it with `make -C packer image ROLE={role}` \
             (from the repository's root; both roles are needed)",
            path.display()
        );
    }
    // oned reads PATH itself: an absolute path, and no quote to break the template.
    let path = std::fs::canonicalize(&path).with_context(|| path.display().to_string())?;
    if path.to_str().is_none_or(|p| p.contains(['"', '\\', '\n'])) {
        anyhow::bail!(
            "appliance image path {} cannot be written into an image template",
            path.display()
        );
    }
    Ok(path)
}

/// Everything the image runtime needs, checked before anything starts: both images in
/// `images`, root, systemd-nspawn and the other tools ([`onesim::machine::preflight`]).
pub fn check_image_runtime(images: &Path) -> anyhow::Result<()> {
    for (role, _) in APPLIANCES {
        appliance_image(images, role)?;
    }
    onesim::machine::preflight().map_err(|e| anyhow::anyhow!("{e}"))
}

/// The process runtime's agents run Flower as its own unprivileged user when they are
/// root (#17 item 5), and Flower reads its files under the VMs' directories: the lab's
/// directory is made searchable (0711, nothing listed) and every directory above it must
/// be, or the lab refuses to start, naming the one that is not.
fn check_flower_reach(base_dir: &std::path::Path) -> anyhow::Result<()> {
    use crate::agent::privilege::{first_unreachable, run_as, FLOWER_ID};
    use std::os::unix::fs::PermissionsExt as _;
    if run_as().is_none() {
        return Ok(());
    }
    std::fs::set_permissions(base_dir, std::fs::Permissions::from_mode(0o711))?;
    match first_unreachable(&base_dir.join("vms"), FLOWER_ID, FLOWER_ID) {
        None => Ok(()),
        Some(dir) => anyhow::bail!(
            "{} is not searchable by the Flower user (UID {FLOWER_ID}), which the VMs' Flower runs as: make it o+x or put the lab elsewhere",
            dir.display()
        ),
    }
}

impl Lab {
    /// Start onesim and create what an administrator would: images (image runtime), the
    /// network and the appliance templates.
    pub async fn start(cfg: LabConfig) -> anyhow::Result<Lab> {
        if let LabRuntime::Image { images, .. } = &cfg.runtime {
            check_image_runtime(images)?;
        }
        std::fs::create_dir_all(&cfg.base_dir)?;
        if let LabRuntime::Process { .. } = &cfg.runtime {
            check_flower_reach(&cfg.base_dir)?;
        }
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
            LabRuntime::Image { cache_dir, .. } => onesim::Runtime::Image {
                base_dir: cfg.base_dir.join("vms"),
                cache_dir: cache_dir.clone(),
            },
        };
        sim_cfg.timings.vm_step = cfg.vm_step;
        sim_cfg.timings.autoscaler_interval = cfg.autoscaler_interval;
        if let LabRuntime::Image { .. } = cfg.runtime {
            // A machine's systemd powers off in a few seconds; SIGKILL only when it hangs.
            sim_cfg.timings.kill_grace = Duration::from_secs(10);
        }
        sim_cfg.onegate = cfg.onegate.clone();
        let sim = onesim::start(sim_cfg).await?;
        let urls = sim.urls().clone();
        let auth_file = cfg.base_dir.join("one_auth");
        write_private(&auth_file, &format!("oneadmin:{password}\n"))?;
        let bridged = match &cfg.runtime {
            LabRuntime::Process { .. } => None,
            LabRuntime::Image { cache_dir, .. } => Some(Bridged {
                net: BridgedNet::for_net(sim.loopback_net()),
                cache_dir: cache_dir.clone(),
            }),
        };
        let lab = Lab {
            sim,
            urls,
            auth_file,
            base_dir: cfg.base_dir.clone(),
            bridged,
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

    /// The image runtime's network (bridge and gateway); `None` on the process runtime.
    pub fn bridged_net(&self) -> Option<&BridgedNet> {
        self.bridged.as_ref().map(|b| &b.net)
    }

    /// What names everything this lab may create on the host: its directory (processes,
    /// mounts) and, on the image runtime, its bridge, its machines' tag (namespaces, veths)
    /// and the raw-image cache (loop devices). For [`onesim::machine::host_traces`].
    pub fn host_marks(&self) -> Vec<String> {
        let mut marks = vec![self.base_dir.display().to_string()];
        if let Some(b) = &self.bridged {
            marks.push(b.net.bridge.clone());
            marks.push(b.cache_dir.display().to_string());
        }
        if let Some(m) = &self.sim.sim.machines {
            // Namespaces are `onesim-<tag>-<id>`, host veths `one<tag>-<id>`.
            marks.push(format!("onesim-{}-", m.tag()));
            marks.push(format!("one{}-", m.tag()));
        }
        marks
    }

    /// Stop every VM (process or machine) and the simulator.
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
        let network = match (&cfg.runtime, &self.bridged) {
            (LabRuntime::Image { images, .. }, Some(b)) => {
                for (role, name) in APPLIANCES {
                    let path = appliance_image(images, role)?;
                    register_image(&one, name, &path).await?;
                }
                bridged_network_template(&b.net)
            }
            _ => network_template(self.sim.loopback_net()),
        };
        one.vn_allocate(&network, -1).await?;
        for (_, name) in APPLIANCES {
            one.template_allocate(&vm_template(name, 1024, cfg)).await?;
        }
        Ok(())
    }
}

/// `oneimage create --name NAME --path PATH --prefix vd` into the default datastore, then
/// wait for oned's copy: the image is LOCKED until READY (or ERROR, with oned's reason).
async fn register_image(one: &OnedClient, name: &str, path: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let template = format!(
        "NAME = \"{name}\"\nPATH = \"{}\"\nTYPE = \"OS\"\nDEV_PREFIX = \"vd\"\n",
        path.display()
    );
    let id = one
        .image_allocate(&template, 1)
        .await
        .with_context(|| format!("registering image {name} from {}", path.display()))?;
    loop {
        let image = one.image_info(id).await?;
        match image.state {
            Image::READY => return Ok(()),
            Image::ERROR => anyhow::bail!("image {name} ({}): copy failed", path.display()),
            _ if t0.elapsed() > Duration::from_secs(300) => {
                anyhow::bail!("image {name}: still state {} after 300 s", image.state)
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
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

/// The lab's network for the image runtime: a bridge onesim creates with the GATEWAY as its
/// address (the host end of every machine's link, where OneGate answers), and a range after it.
fn bridged_network_template(b: &BridgedNet) -> String {
    let [a, b2, c, _] = b.gateway.octets();
    format!(
        "NAME = \"{NETWORK}\"\nVN_MAD = \"bridge\"\nBRIDGE = \"{bridge}\"\n\
         GATEWAY = \"{gw}\"\nNETWORK_MASK = \"255.255.255.0\"\n\
         AR = [ TYPE = \"IP4\", IP = \"{a}.{b2}.{c}.10\", SIZE = \"200\" ]\n",
        bridge = b.bridge,
        gw = b.gateway,
    )
}

/// An appliance VM template as an administrator would register it. Process runtime: the
/// agent runs Flower as processes from the lab's virtualenv. Image runtime: the VM boots the
/// appliance image of the same name, whose agent runs Flower from the image's virtualenv.
fn vm_template(name: &str, memory: u32, cfg: &LabConfig) -> String {
    let (disk, runtime) = match &cfg.runtime {
        LabRuntime::Process { venv, .. } => (
            String::new(),
            format!(
                "{runtime} = \"process\", {bin_dir} = \"{bin}\", ",
                runtime = ctx::RUNTIME,
                bin_dir = ctx::FLOWER_BIN_DIR,
                bin = venv.join("bin").display(),
            ),
        ),
        LabRuntime::Image { .. } => (format!("DISK = [ IMAGE = \"{name}\" ]\n"), String::new()),
    };
    format!(
        "NAME = \"{name}\"\nCPU = \"1\"\nVCPU = \"1\"\nMEMORY = \"{memory}\"\n{disk}\
         CONTEXT = [ NETWORK = \"YES\", TOKEN = \"YES\", REPORT_READY = \"YES\", \
         {runtime}{heartbeat} = \"{hb}\" ]\n",
        heartbeat = ctx::HEARTBEAT_INTERVAL,
        hb = cfg.heartbeat_secs,
    )
}

fn random_password() -> String {
    // Not a secret worth a CSPRNG: onesim listens on loopback for the lab's lifetime only.
    format!("lab-{:016x}", crate::runtime::election::random_u64())
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
            autoscaler_interval: DEFAULT_AUTOSCALER_INTERVAL,
        };
        let t = vm_template("flower-superlink", 1024, &cfg);
        assert!(t.contains("NAME = \"flower-superlink\""));
        assert!(t.contains("ONEAPP_FL_RUNTIME = \"process\""));
        assert!(t.contains("ONEAPP_FL_FLOWER_BIN_DIR = \"/tmp/venv/bin\""));
        assert!(t.contains("TOKEN = \"YES\""));
        assert!(t.contains("ONEAPP_FL_HEARTBEAT_INTERVAL = \"5\""));
    }

    #[test]
    fn image_runtime_templates_boot_the_image_and_the_network_has_a_gateway() {
        let cfg = LabConfig {
            base_dir: "/tmp/lab".into(),
            runtime: LabRuntime::Image {
                images: "/tmp/images".into(),
                cache_dir: "/tmp/cache".into(),
            },
            heartbeat_secs: 2,
            vm_step: Duration::from_millis(100),
            onegate: Default::default(),
            autoscaler_interval: DEFAULT_AUTOSCALER_INTERVAL,
        };
        let t = vm_template("flower-supernode", 1024, &cfg);
        assert!(t.contains("DISK = [ IMAGE = \"flower-supernode\" ]"), "{t}");
        // The image's own virtualenv: no host path reaches the VM.
        assert!(!t.contains(ctx::FLOWER_BIN_DIR), "{t}");
        assert!(t.contains("REPORT_READY = \"YES\""));
        let net = BridgedNet::for_net(37);
        assert_eq!(net.bridge, "flbr37");
        assert!(onesim::machine::valid_ifname(
            &BridgedNet::for_net(254).bridge
        ));
        let n = bridged_network_template(&net);
        assert!(n.contains("BRIDGE = \"flbr37\""), "{n}");
        assert!(n.contains("GATEWAY = \"10.200.37.1\""), "{n}");
        assert!(n.contains("IP = \"10.200.37.10\""), "{n}");
    }

    #[test]
    fn a_missing_image_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_image_runtime(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("flower-superlink.qcow2 not found")
                && err.contains("make -C packer image ROLE=superlink"),
            "{err}"
        );
        std::fs::write(dir.path().join("flower-superlink.qcow2"), "x").unwrap();
        let err = check_image_runtime(dir.path()).unwrap_err().to_string();
        assert!(err.contains("make -C packer image ROLE=supernode"), "{err}");
    }
}
