//! One code path for the Flower command line, and the two runtimes' wrappers around it:
//! `docker run` argv inside systemd units, or a direct process.
//!
//! Guarantees: every value placed in an argv has passed an allow-list in
//! [`super::context`] or comes from the agent itself; unit files are rendered with
//! systemd quoting and refuse control characters.
//! Caveats: inside a container Flower binds `0.0.0.0` on the container's private
//! interface; only the explicit `-p` publishes reach the host (9092 on the VM address,
//! 9093 on loopback or the VM address, 9091 never).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use super::context::{Config, ControlBind, Framework, HostPort, NodeConfig, Role, Runtime};
use super::error::IoError;
use super::paths::Paths;

/// Why Flower cannot be started, or its unit cannot be written. User-facing (VM logs,
/// `FL_ERROR`).
#[derive(Debug, thiserror::Error)]
pub enum FlowerError {
    /// A unit-file argument with a control character (it could start a new directive).
    #[error("control character in a unit-file argument")]
    ControlCharacter,
    /// A SuperNode whose SuperLink is not known yet.
    #[error("SuperLink address not resolved")]
    SuperlinkUnresolved,
    /// The Flower executable is not where the context says.
    #[error("{} not found: set {var} to the bin/ directory of a Flower installation", program.display())]
    NotInstalled {
        /// The executable looked for.
        program: PathBuf,
        /// The context variable that points at it.
        var: &'static str,
    },
    /// Spawning failed.
    #[error("starting {}: {source}", program.display())]
    Start {
        /// The executable.
        program: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The process was gone before its pid could be read.
    #[error("Flower exited immediately")]
    ExitedImmediately,
    /// A file or directory it needs.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Flower's identity, directories or their reach.
    #[error(transparent)]
    Privilege(#[from] super::privilege::PrivilegeError),
    /// The docker runtime found no digest for an image: it never runs a moving tag.
    #[error("{} names no digest for {image}: the docker runtime runs images pinned by digest (`NAME@sha256:<64 hex>`), recorded by the image build", lock.display())]
    NotPinned {
        /// The tag that has no digest.
        image: String,
        /// The lock file read.
        lock: PathBuf,
    },
    /// A line of the image lock that is not `TAG NAME@sha256:<64 hex>`.
    #[error("{}:{line}: {why}", lock.display())]
    BadLock {
        /// The lock file.
        lock: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
}

/// Where Flower sees its files: host paths (process) or container paths (docker).
#[derive(Debug, Clone)]
pub struct FileView {
    /// Directory with ca.crt / server.pem / server.key (SuperLink).
    pub certs_dir: String,
    /// CA bundle a SuperNode trusts.
    pub ca_file: String,
    /// SuperLink state directory.
    pub state_dir: String,
    /// `FLWR_HOME`: installed apps and what they keep between runs (checkpoints).
    pub flwr_home: String,
    /// SuperLink with node authentication: the `flwr` project the agent registers SuperNode
    /// keys through ([`super::node_auth::apply`]).
    pub node_auth_dir: String,
}

impl FileView {
    /// Host paths.
    pub fn host(paths: &Paths) -> Self {
        Self {
            certs_dir: paths.certs_dir().display().to_string(),
            ca_file: paths.certs_dir().join("ca.crt").display().to_string(),
            state_dir: paths.state_dir().display().to_string(),
            flwr_home: paths.flwr_home().display().to_string(),
            node_auth_dir: super::node_auth::project_dir(paths).display().to_string(),
        }
    }

    /// Paths inside the Flower containers.
    pub fn container() -> Self {
        Self {
            certs_dir: "/app/certificates".into(),
            ca_file: "/app/ca.crt".into(),
            state_dir: "/app/state".into(),
            flwr_home: "/app/.flwr".into(),
            node_auth_dir: "/app/node-auth".into(),
        }
    }
}

/// Binds for the three SuperLink APIs and the SuperNode ClientAppIo API.
#[derive(Debug, Clone, Copy)]
pub struct Binds {
    /// Fleet API host (SuperNodes dial it).
    pub fleet: IpAddr,
    /// Control API host.
    pub control: IpAddr,
    /// ServerAppIo / ClientAppIo host (loopback).
    pub local: IpAddr,
}

impl Binds {
    /// Process runtime: the VM address and the node's own loopback address.
    pub fn host(cfg: &Config) -> Self {
        let control = match cfg.control_bind {
            ControlBind::Loopback => cfg.local_addr(),
            ControlBind::Vm => cfg.vm_addr(),
        };
        Self {
            fleet: cfg.vm_addr(),
            control,
            local: cfg.local_addr(),
        }
    }

    /// Docker runtime: the container's private interface; publishes restrict exposure.
    pub fn container() -> Self {
        let any = IpAddr::from([0, 0, 0, 0]);
        Self {
            fleet: any,
            control: any,
            local: IpAddr::from([127, 0, 0, 1]),
        }
    }
}

/// What configure resolved for a SuperNode (persisted between stages).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeResolved {
    /// SuperLink Fleet address.
    pub superlink: Option<HostPort>,
    /// Whether to present this node's key ([`super::node_auth::supernode_presents_key`]).
    #[serde(default)]
    pub node_auth: bool,
    /// Node config (explicit or computed partition).
    pub node_config: Option<NodeConfig>,
    /// GPU usable (detected and requested).
    pub gpu: bool,
}

fn addr(ip: IpAddr, port: u16) -> String {
    HostPort::from_ip(ip, port).to_string()
}

/// `flower-superlink` arguments (without the program name).
pub fn superlink_args(cfg: &Config, view: &FileView, binds: Binds) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    if cfg.tls {
        a.extend([
            "--ssl-ca-certfile".into(),
            format!("{}/ca.crt", view.certs_dir),
            "--ssl-certfile".into(),
            format!("{}/server.pem", view.certs_dir),
            "--ssl-keyfile".into(),
            format!("{}/server.key", view.certs_dir),
        ]);
    } else {
        a.push("--insecure".into());
    }
    if super::node_auth::enabled(cfg, Role::Superlink) {
        // Only SuperNodes whose keys the agent registered may connect (#17 item 4).
        a.push("--enable-supernode-auth".into());
    }
    a.extend([
        "--isolation".into(),
        cfg.isolation.as_str().into(),
        "--serverappio-api-address".into(),
        addr(binds.local, cfg.serverappio_port),
        "--fleet-api-address".into(),
        addr(binds.fleet, cfg.fleet_port),
        "--control-api-address".into(),
        addr(binds.control, cfg.control_port),
    ]);
    if cfg.persistent_state {
        a.extend([
            "--database".into(),
            format!("{}/{}", view.state_dir, cfg.database),
        ]);
    }
    a
}

/// `flower-supernode` arguments (without the program name). `None` when the SuperLink
/// address is not resolved yet.
pub fn supernode_args(
    cfg: &Config,
    node: &NodeResolved,
    view: &FileView,
    binds: Binds,
) -> Option<Vec<String>> {
    let superlink = node.superlink.as_ref()?;
    let mut a: Vec<String> = Vec::new();
    if cfg.tls {
        a.extend(["--root-certificates".into(), view.ca_file.clone()]);
    } else {
        a.push("--insecure".into());
    }
    // `node_auth` is persisted state: the context is checked again.
    if node.node_auth && super::node_auth::enabled(cfg, Role::Supernode) {
        a.extend([
            "--auth-supernode-private-key".into(),
            format!("{}/supernode.key", view.certs_dir),
        ]);
    }
    a.extend([
        "--superlink".into(),
        superlink.to_string(),
        "--isolation".into(),
        cfg.isolation.as_str().into(),
        "--clientappio-api-address".into(),
        addr(binds.local, cfg.clientappio_port),
    ]);
    if let Some(nc) = &node.node_config {
        a.extend(["--node-config".into(), nc.flower_arg()]);
    }
    // Flower treats 0 literally (one try, zero seconds); our 0 means unlimited: omit the flag.
    if cfg.max_retries > 0 {
        a.extend(["--max-retries".into(), cfg.max_retries.to_string()]);
    }
    if cfg.max_wait_time > 0 {
        a.extend(["--max-wait-time".into(), cfg.max_wait_time.to_string()]);
    }
    Some(a)
}

/// Flower's environment (besides PATH/FLWR_HOME, which depend on the runtime).
pub fn flower_env(cfg: &Config, role: Role, node: &NodeResolved) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "FLWR_LOG_LEVEL".to_string(),
            cfg.log_level.as_str().to_string(),
        ),
        ("FLWR_TELEMETRY_ENABLED".to_string(), "0".to_string()),
    ];
    if role == Role::Supernode && node.gpu {
        if cfg.cuda_visible_devices != "all" {
            env.push((
                "CUDA_VISIBLE_DEVICES".into(),
                cfg.cuda_visible_devices.clone(),
            ));
        }
        env.push((
            "FL_GPU_MEMORY_FRACTION".into(),
            cfg.gpu_memory_fraction.to_string(),
        ));
    }
    env
}

/// Docker image for a role.
pub fn image(cfg: &Config, role: Role) -> String {
    match (role, cfg.framework) {
        (Role::Superlink, _) => format!("flwr/superlink:{}", cfg.version),
        (Role::Supernode, Framework::None) => format!("flwr/supernode:{}", cfg.version),
        (Role::Supernode, fw) => format!("flower-supernode-{}:{}", fw.as_str(), cfg.version),
    }
}

/// An image reference pinned by digest: `NAME[:TAG]@sha256:<64 lower-case hex>`. Docker
/// resolves such a reference to exactly that content or fails; a tag alone can move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedImage(String);

/// Largest image lock read (a few lines).
const MAX_LOCK: u64 = 16 * 1024;

impl PinnedImage {
    /// Parses `s`; a reference without `@sha256:` (tag-only) is refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some((name, digest)) = s.split_once("@sha256:") else {
            return Err(format!("{s}: not pinned by digest (no @sha256:)"));
        };
        let name_ok = !name.is_empty()
            && name.len() <= 255
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b))
            && !name.starts_with(['-', '/', ':']);
        if !name_ok {
            return Err(format!("{s}: not an image name"));
        }
        let hex_ok = digest.len() == 64
            && digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(format!("{s}: the digest is not 64 lower-case hex digits"));
        }
        Ok(Self(s.to_string()))
    }

    /// The reference.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The pinned reference of `tag` in the image lock text (`TAG PINNED` per line, `#`
/// comments): `Ok(None)` when the lock names no such tag.
pub fn lock_lookup(lock: &Path, text: &str, tag: &str) -> Result<Option<PinnedImage>, FlowerError> {
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: String| FlowerError::BadLock {
            lock: lock.to_path_buf(),
            line: i + 1,
            why,
        };
        let mut words = line.split_whitespace();
        let (Some(t), Some(pinned), None) = (words.next(), words.next(), words.next()) else {
            return Err(bad("expected `TAG NAME@sha256:<digest>`".into()));
        };
        if t == tag {
            return PinnedImage::parse(pinned).map(Some).map_err(bad);
        }
    }
    Ok(None)
}

/// The role's image ([`image`]) pinned by the image lock ([`Paths::images_lock`]): a
/// missing lock or tag is refused, never run by tag.
pub fn pinned_image(cfg: &Config, role: Role, paths: &Paths) -> Result<PinnedImage, FlowerError> {
    use std::io::Read as _;
    let lock = paths.images_lock();
    let tag = image(cfg, role);
    let not_pinned = || FlowerError::NotPinned {
        image: tag.clone(),
        lock: lock.clone(),
    };
    let mut text = String::new();
    match std::fs::File::open(&lock) {
        Ok(f) => {
            f.take(MAX_LOCK)
                .read_to_string(&mut text)
                .map_err(IoError::at(&lock))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_pinned()),
        Err(e) => return Err(IoError::at(&lock)(e).into()),
    }
    lock_lookup(&lock, &text, &tag)?.ok_or_else(not_pinned)
}

/// systemd unit / container name.
pub fn unit_name(role: Role) -> String {
    format!("flower-{role}")
}

/// The full `docker run` argv (foreground, no restart policy: systemd owns the lifecycle),
/// running `image` (pinned by digest) as the Flower user with no capability.
pub fn docker_run_argv(
    cfg: &Config,
    role: Role,
    node: &NodeResolved,
    paths: &Paths,
    image: &PinnedImage,
) -> Option<Vec<String>> {
    let p = |pb: PathBuf| pb.display().to_string();
    let mut a: Vec<String> = vec![
        "/usr/bin/docker".into(),
        "run".into(),
        "--name".into(),
        unit_name(role),
        "--cap-drop".into(),
        "ALL".into(),
        "--security-opt".into(),
        "no-new-privileges".into(),
        // The images' own user, stated: an image whose USER is root still runs unprivileged.
        "--user".into(),
        format!("{id}:{id}", id = super::privilege::FLOWER_ID),
        "--env-file".into(),
        p(paths.env_file()),
    ];
    let view = FileView::container();
    // Apps and their checkpoints outlive the container (systemd recreates it on restart).
    a.extend([
        "-e".into(),
        format!("FLWR_HOME={}", view.flwr_home),
        "-v".into(),
        format!("{}:{}", p(paths.flwr_home()), view.flwr_home),
    ]);
    let binds = Binds::container();
    let flower = match role {
        Role::Superlink => {
            a.extend([
                "-p".into(),
                format!(
                    "{}:{}:{}",
                    addr_host(cfg.vm_addr()),
                    cfg.fleet_port,
                    cfg.fleet_port
                ),
            ]);
            let control_host = match cfg.control_bind {
                ControlBind::Loopback => "127.0.0.1".to_string(),
                ControlBind::Vm => addr_host(cfg.vm_addr()),
            };
            a.extend([
                "-p".into(),
                format!("{control_host}:{}:{}", cfg.control_port, cfg.control_port),
            ]);
            a.extend([
                "-v".into(),
                format!("{}:{}", p(paths.state_dir()), view.state_dir),
            ]);
            // The ServerApp writes checkpoints where FL_RUN_CONFIG says: the same path.
            if let Some(cp) = &cfg.training.checkpoint {
                a.extend([
                    "-v".into(),
                    format!("{}:{}", p(paths.at(&cp.path)), cp.path),
                ]);
            }
            if cfg.tls {
                a.extend([
                    "-v".into(),
                    format!("{}:{}:ro", p(paths.certs_dir()), view.certs_dir),
                ]);
            }
            // `docker exec … flwr supernode register` reads its project and the key there,
            // and keeps its credentials in its `.flwr/` (node_auth::flwr_argv).
            if super::node_auth::enabled(cfg, Role::Superlink) {
                a.extend([
                    "-v".into(),
                    format!(
                        "{}:{}",
                        p(super::node_auth::project_dir(paths)),
                        view.node_auth_dir
                    ),
                ]);
            }
            a.push(image.as_str().to_string());
            superlink_args(cfg, &view, binds)
        }
        Role::Supernode => {
            a.extend([
                "-v".into(),
                format!(
                    "{}:/app/data:ro",
                    p(paths.at(&cfg.data_dir.display().to_string()))
                ),
            ]);
            if cfg.tls {
                a.extend([
                    "-v".into(),
                    format!(
                        "{}:{}:ro",
                        p(paths.certs_dir().join("ca.crt")),
                        view.ca_file
                    ),
                ]);
            }
            // The private key, read-only: only this file of the certificates directory.
            if super::node_auth::enabled(cfg, Role::Supernode) {
                a.extend([
                    "-v".into(),
                    format!(
                        "{}:{}/supernode.key:ro",
                        p(super::node_auth::key_file(paths)),
                        view.certs_dir
                    ),
                ]);
            }
            if node.gpu {
                a.extend(["--gpus".into(), "all".into()]);
            }
            a.push(image.as_str().to_string());
            supernode_args(cfg, node, &view, binds)?
        }
    };
    a.extend(flower);
    Some(a)
}

fn addr_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]"),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// Quotes one argument for a systemd `Exec*=` line. Control characters are refused.
pub fn systemd_quote(arg: &str) -> Result<String, FlowerError> {
    if arg.chars().any(|c| c.is_control()) {
        return Err(FlowerError::ControlCharacter);
    }
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/:=,+@-[]".contains(c));
    if plain {
        return Ok(arg.to_string());
    }
    let mut s = String::with_capacity(arg.len() + 2);
    s.push('"');
    for c in arg.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '%' => s.push_str("%%"),
            '$' => s.push_str("$$"),
            c => s.push(c),
        }
    }
    s.push('"');
    Ok(s)
}

/// One `Exec*=` value: program and subcommand first, then a flag and its value per line.
fn exec_line(argv: &[String]) -> Result<String, FlowerError> {
    let q = argv
        .iter()
        .map(|a| systemd_quote(a))
        .collect::<Result<Vec<_>, _>>()?;
    let mut lines: Vec<String> = Vec::new();
    let mut i = 0;
    while i < q.len() {
        let flag_with_value =
            argv[i].starts_with('-') && argv.get(i + 1).is_some_and(|n| !n.starts_with('-'));
        if i == 0 && q.len() > 1 && !argv[1].starts_with('-') {
            lines.push(format!("{} {}", q[0], q[1]));
            i += 2;
        } else if flag_with_value {
            lines.push(format!("{} {}", q[i], q[i + 1]));
            i += 2;
        } else {
            lines.push(q[i].clone());
            i += 1;
        }
    }
    Ok(lines.join(" \\\n    "))
}

/// The systemd unit that runs Flower in docker, from `image` ([`pinned_image`]).
pub fn flower_unit(
    cfg: &Config,
    role: Role,
    node: &NodeResolved,
    paths: &Paths,
    image: &PinnedImage,
) -> Result<String, FlowerError> {
    let argv =
        docker_run_argv(cfg, role, node, paths, image).ok_or(FlowerError::SuperlinkUnresolved)?;
    let desc = match role {
        Role::Superlink => "Flower SuperLink (Federated Learning Coordinator)",
        Role::Supernode => "Flower SuperNode (Federated Learning Client)",
    };
    let name = unit_name(role);
    Ok(format!(
        "# Written by flower-agent configure; do not edit.\n\
         [Unit]\n\
         Description={desc}\n\
         After=docker.service network-online.target\n\
         Requires=docker.service\n\
         \n\
         [Service]\n\
         Type=simple\n\
         Restart=always\n\
         RestartSec=10\n\
         TimeoutStartSec=120\n\
         TimeoutStopSec=45\n\
         ExecStartPre=-/usr/bin/docker rm -f {name}\n\
         ExecStart={}\n\
         ExecStop=/usr/bin/docker stop -t 30 {name}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        exec_line(&argv)?
    ))
}

/// The unit that runs `flower-agent run` (the node-level supervisor).
pub fn agent_unit(agent_bin: &Path, role: Role) -> Result<String, FlowerError> {
    let argv = vec![agent_bin.display().to_string(), "run".to_string()];
    let after = match role {
        Role::Superlink => "flower-superlink.service",
        Role::Supernode => "flower-supernode.service",
    };
    Ok(format!(
        "# Written by flower-agent; do not edit.\n\
         [Unit]\n\
         Description=flower-agent supervisor ({role})\n\
         Wants=network-online.target\n\
         After=network-online.target flower-agent-context.service {after}\n\
         \n\
         [Service]\n\
         Type=simple\n\
         Restart=always\n\
         RestartSec=5\n\
         ExecStart={}\n\
         KillMode=mixed\n\
         TimeoutStopSec=60\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        exec_line(&argv)?
    ))
}

/// The unit that runs `flower-agent context` once per boot, before the network, when the
/// one-context package is absent (the offline image); with one-context it does nothing.
pub fn context_unit(agent_bin: &Path) -> Result<String, FlowerError> {
    let argv = vec![agent_bin.display().to_string(), "context".to_string()];
    Ok(format!(
        "# Written by flower-agent; do not edit.\n\
         [Unit]\n\
         Description=OpenNebula contextualization by flower-agent (one-context absent)\n\
         DefaultDependencies=no\n\
         ConditionPathExists=!/usr/sbin/one-contextd\n\
         After=local-fs.target systemd-udev-trigger.service\n\
         Wants=network-pre.target\n\
         Before=network-pre.target systemd-networkd.service ssh.service flower-agent.service\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart={}\n\
         \n\
         [Install]\n\
         WantedBy=sysinit.target\n",
        exec_line(&argv)?
    ))
}

/// Optional DCGM exporter unit (GPU SuperNodes); created fresh by `docker run`, so no
/// ExecStartPre ever deletes what ExecStart attaches to.
pub fn dcgm_unit() -> String {
    "# Written by flower-agent configure; do not edit.\n\
     [Unit]\n\
     Description=NVIDIA DCGM exporter\n\
     After=docker.service flower-supernode.service\n\
     Requires=docker.service\n\
     PartOf=flower-supernode.service\n\
     \n\
     [Service]\n\
     Type=simple\n\
     Restart=always\n\
     RestartSec=10\n\
     ExecStartPre=-/usr/bin/docker rm -f dcgm-exporter\n\
     ExecStart=/usr/bin/docker run --name dcgm-exporter --gpus all --cap-drop ALL --cap-add SYS_ADMIN \\\n    \
     -p 9400:9400 nvcr.io/nvidia/k8s/dcgm-exporter:4.5.1-4.8.0-distroless\n\
     ExecStop=/usr/bin/docker stop -t 10 dcgm-exporter\n\
     \n\
     [Install]\n\
     WantedBy=multi-user.target\n"
        .to_string()
}

/// Env file content (`KEY=value` lines; values are allow-listed).
pub fn env_file(env: &[(String, String)]) -> String {
    let mut s = String::from("# Written by flower-agent configure.\n");
    for (k, v) in env {
        s.push_str(&format!("{k}={v}\n"));
    }
    s
}

/// Program and argv for the process runtime.
pub fn process_command(
    cfg: &Config,
    role: Role,
    node: &NodeResolved,
    paths: &Paths,
) -> Option<(PathBuf, Vec<String>)> {
    let bin_dir = cfg
        .flower_bin_dir
        .clone()
        .unwrap_or_else(|| paths.venv_bin());
    let view = FileView::host(paths);
    let binds = Binds::host(cfg);
    match role {
        Role::Superlink => Some((
            bin_dir.join("flower-superlink"),
            superlink_args(cfg, &view, binds),
        )),
        Role::Supernode => Some((
            bin_dir.join("flower-supernode"),
            supernode_args(cfg, node, &view, binds)?,
        )),
    }
}

/// Whether the runtime is docker.
pub fn is_docker(cfg: &Config) -> bool {
    cfg.runtime == Runtime::Docker
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::context::Context;
    use crate::protocol::context as ctx;

    fn cfg(pairs: &[(&str, &str)]) -> Config {
        Config::from_context(&Context::from_pairs(pairs.iter().copied())).unwrap()
    }

    fn pinned(role: Role) -> PinnedImage {
        PinnedImage::parse(&format!("flwr/{role}:1.25.0@sha256:{}", "ab".repeat(32))).unwrap()
    }

    fn node() -> NodeResolved {
        NodeResolved {
            superlink: Some("10.0.0.5:9092".to_string().try_into().unwrap()),
            node_config: Some(NodeConfig::partition(1, 2)),
            gpu: false,
            node_auth: true,
        }
    }

    /// Compares with tests/golden/NAME; `BLESS=1` rewrites the file.
    fn golden(name: &str, actual: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("BLESS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, actual).unwrap();
        }
        let expected =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            actual,
            expected,
            "golden file {} differs (BLESS=1 to update)",
            path.display()
        );
    }

    #[test]
    fn superlink_unit_golden() {
        let c = cfg(&[("ETH0_IP", "10.0.0.5")]);
        let unit = flower_unit(
            &c,
            Role::Superlink,
            &NodeResolved::default(),
            &Paths::new("/"),
            &pinned(Role::Superlink),
        )
        .unwrap();
        golden("flower-superlink.service", &unit);
    }

    #[test]
    fn supernode_unit_golden() {
        let c = cfg(&[("ETH0_IP", "10.0.0.7"), (ctx::MAX_RETRIES, "3")]);
        let unit = flower_unit(
            &c,
            Role::Supernode,
            &node(),
            &Paths::new("/"),
            &pinned(Role::Supernode),
        )
        .unwrap();
        golden("flower-supernode.service", &unit);
    }

    #[test]
    fn hardening_in_docker_argv() {
        let c = cfg(&[("ETH0_IP", "10.0.0.5")]);
        let a = docker_run_argv(
            &c,
            Role::Superlink,
            &NodeResolved::default(),
            &Paths::new("/"),
            &pinned(Role::Superlink),
        )
        .unwrap();
        let s = a.join(" ");
        assert!(s.contains("--cap-drop ALL --security-opt no-new-privileges --user 49999:49999 "));
        // The pinned reference is the image argument, never the bare tag.
        let at = a.iter().position(|x| x == pinned(Role::Superlink).as_str());
        assert_eq!(a[at.unwrap() + 1], "--ssl-ca-certfile");
        assert!(!a.iter().any(|x| x == "flwr/superlink:1.25.0"));
        assert!(s.contains("-p 10.0.0.5:9092:9092") && s.contains("-p 127.0.0.1:9093:9093"));
        assert!(!s.contains(":9091:") && !s.contains("--restart"));
        assert!(s.contains("-v /opt/flower/certs:/app/certificates:ro"));
        assert!(!s.contains("ca.key") && !s.contains("/opt/flower/ca"));
        assert!(s.contains("--database /app/state/state.db"));
        // State and FLWR_HOME (apps, checkpoints) are host directories, in every role.
        assert!(s.contains("-v /opt/flower/state:/app/state "));
        for role in [Role::Superlink, Role::Supernode] {
            let s = docker_run_argv(&c, role, &node(), &Paths::new("/"), &pinned(role))
                .unwrap()
                .join(" ");
            assert!(s.contains("--cap-drop ALL") && s.contains("--user 49999:49999"));
            assert!(
                s.contains("-e FLWR_HOME=/app/.flwr -v /opt/flower/home:/app/.flwr "),
                "{s}"
            );
        }
        let c = cfg(&[
            ("ETH0_IP", "10.0.0.5"),
            (ctx::CONTROL_BIND, "vm"),
            (ctx::TLS_ENABLED, "NO"),
        ]);
        let s = docker_run_argv(
            &c,
            Role::Superlink,
            &NodeResolved::default(),
            &Paths::new("/"),
            &pinned(Role::Superlink),
        )
        .unwrap()
        .join(" ");
        assert!(
            s.contains("-p 10.0.0.5:9093:9093")
                && s.contains("--insecure")
                && !s.contains("certificates")
        );
    }

    #[test]
    fn process_argv_binds_explicit_addresses() {
        let c = cfg(&[
            ("ETH0_IP", "127.0.10.5"),
            (ctx::FLOWER_BIN_DIR, "/tmp/venv/bin"),
            (ctx::RUNTIME, "process"),
            (ctx::CONTROL_BIND, "vm"),
        ]);
        let paths = Paths::new("/tmp/vm1");
        let (prog, args) =
            process_command(&c, Role::Superlink, &NodeResolved::default(), &paths).unwrap();
        assert_eq!(prog, PathBuf::from("/tmp/venv/bin/flower-superlink"));
        assert_eq!(
            args,
            [
                "--ssl-ca-certfile",
                "/tmp/vm1/opt/flower/certs/ca.crt",
                "--ssl-certfile",
                "/tmp/vm1/opt/flower/certs/server.pem",
                "--ssl-keyfile",
                "/tmp/vm1/opt/flower/certs/server.key",
                // TLS, persistent state, the process runtime: node authentication (#17 item 4).
                "--enable-supernode-auth",
                "--isolation",
                "subprocess",
                "--serverappio-api-address",
                "127.0.10.5:9091",
                "--fleet-api-address",
                "127.0.10.5:9092",
                "--control-api-address",
                "127.0.10.5:9093",
                "--database",
                "/tmp/vm1/opt/flower/state/state.db",
            ]
        );
        assert!(!args.iter().any(|a| a.contains("0.0.0.0")));
        let c = cfg(&[
            ("ETH0_IP", "10.1.1.1"),
            (ctx::PERSISTENT_STATE, "NO"),
            (ctx::TLS_ENABLED, "NO"),
        ]);
        let (_, args) =
            process_command(&c, Role::Superlink, &NodeResolved::default(), &paths).unwrap();
        assert!(
            args.contains(&"127.0.0.1:9093".to_string())
                && args.contains(&"10.1.1.1:9092".to_string())
        );
        assert!(
            !args.contains(&"--database".to_string()) && args.contains(&"--insecure".to_string())
        );
        assert!(!args.contains(&"--enable-supernode-auth".to_string()));
        // TLS without persistent state: the registered keys could not be read back.
        let c = cfg(&[("ETH0_IP", "10.1.1.1"), (ctx::PERSISTENT_STATE, "NO")]);
        let (_, args) =
            process_command(&c, Role::Superlink, &NodeResolved::default(), &paths).unwrap();
        assert!(!args.contains(&"--enable-supernode-auth".to_string()));
        // A TLS SuperNode authenticates with its own key.
        let c = cfg(&[("ETH0_IP", "127.0.10.6"), (ctx::RUNTIME, "process")]);
        let (_, args) = process_command(&c, Role::Supernode, &node(), &paths).unwrap();
        let at = args
            .iter()
            .position(|a| a == "--auth-supernode-private-key");
        assert_eq!(
            at.map(|i| args[i + 1].as_str()),
            Some("/tmp/vm1/opt/flower/certs/supernode.key")
        );
        // Not to a SuperLink that does not authenticate (FL_NODE_AUTH=NO): Flower 1.25
        // refuses a key such a SuperLink was not told about.
        let n = NodeResolved {
            node_auth: super::super::node_auth::supernode_presents_key(&c, Some(false)),
            ..node()
        };
        let (_, args) = process_command(&c, Role::Supernode, &n, &paths).unwrap();
        assert!(!args.contains(&"--auth-supernode-private-key".to_string()));
        // A SuperLink given by address alone (another site) is taken to authenticate.
        assert!(super::super::node_auth::supernode_presents_key(&c, None));
        let c = cfg(&[("ETH0_IP", "127.0.10.6"), (ctx::TLS_ENABLED, "NO")]);
        let (prog, args) = process_command(&c, Role::Supernode, &node(), &paths).unwrap();
        // Without FLOWER_BIN_DIR: the image's pinned virtualenv.
        assert_eq!(
            prog,
            PathBuf::from("/tmp/vm1/opt/flower/venv/bin/flower-supernode")
        );
        assert_eq!(
            args,
            [
                "--insecure",
                "--superlink",
                "10.0.0.5:9092",
                "--isolation",
                "subprocess",
                "--clientappio-api-address",
                "127.0.10.6:9094",
                "--node-config",
                "partition-id=1 num-partitions=2",
            ]
        );
        assert!(process_command(&c, Role::Supernode, &NodeResolved::default(), &paths).is_none());
    }

    #[test]
    fn systemd_quoting() {
        assert_eq!(systemd_quote("--x").unwrap(), "--x");
        assert_eq!(systemd_quote("a b").unwrap(), "\"a b\"");
        assert_eq!(systemd_quote("%h$x\"\\").unwrap(), "\"%%h$$x\\\"\\\\\"");
        assert!(systemd_quote("a\nExecStartPre=/bin/sh").is_err());
        assert!(systemd_quote("a\rb").is_err());
    }

    /// `docker run` argv of `role` on a root of `/`, the SuperNode with [`node`].
    fn docker_argv(c: &Config, role: Role) -> Vec<String> {
        let n = match role {
            Role::Superlink => NodeResolved::default(),
            Role::Supernode => node(),
        };
        docker_run_argv(c, role, &n, &Paths::new("/"), &pinned(role)).unwrap()
    }

    #[test]
    fn node_auth_in_docker_argv() {
        // TLS and persistent state are the defaults: node authentication is on (#17 item 4).
        let c = cfg(&[("ETH0_IP", "10.0.0.5")]);
        assert!(super::super::node_auth::enabled(&c, Role::Superlink));
        let a = docker_argv(&c, Role::Supernode);
        let s = a.join(" ");
        // The private key alone, read-only, where the argument points.
        assert!(
            s.contains("-v /opt/flower/certs/supernode.key:/app/certificates/supernode.key:ro "),
            "{s}"
        );
        assert!(
            !s.contains("-v /opt/flower/certs:"),
            "not the whole directory: {s}"
        );
        let at = |x: &str| a.iter().position(|y| y == x).unwrap();
        let key_at = at("--auth-supernode-private-key");
        assert!(
            key_at > at(pinned(Role::Supernode).as_str()),
            "a Flower argument"
        );
        assert_eq!(a[key_at + 1], "/app/certificates/supernode.key");
        let s = docker_argv(&c, Role::Superlink).join(" ");
        assert!(s.contains("--enable-supernode-auth"), "{s}");
        assert!(
            s.contains("-v /opt/flower/node-auth:/app/node-auth "),
            "{s}"
        );
        // Off without TLS, or (SuperLink) without persistent state: no flag, no mount.
        for (pair, role) in [
            ((ctx::TLS_ENABLED, "NO"), Role::Supernode),
            ((ctx::TLS_ENABLED, "NO"), Role::Superlink),
            ((ctx::PERSISTENT_STATE, "NO"), Role::Superlink),
        ] {
            let s = docker_argv(&cfg(&[pair]), role).join(" ");
            assert!(
                !s.contains("supernode.key") && !s.contains("node-auth"),
                "{pair:?}: {s}"
            );
            assert!(!s.contains("supernode-auth"), "{pair:?}: {s}");
        }
    }

    #[test]
    fn gpu_env_and_images() {
        let c = cfg(&[
            (ctx::CUDA_VISIBLE_DEVICES, "0,1"),
            (ctx::GPU_MEMORY_FRACTION, "0.5"),
            (ctx::FRAMEWORK, "none"),
        ]);
        let n = NodeResolved {
            gpu: true,
            ..node()
        };
        let env = flower_env(&c, Role::Supernode, &n);
        assert!(env.contains(&("CUDA_VISIBLE_DEVICES".into(), "0,1".into())));
        assert!(env.contains(&("FL_GPU_MEMORY_FRACTION".into(), "0.5".into())));
        assert!(env.contains(&("FLWR_TELEMETRY_ENABLED".into(), "0".into())));
        assert_eq!(image(&c, Role::Supernode), "flwr/supernode:1.25.0");
        assert_eq!(
            image(&cfg(&[]), Role::Supernode),
            "flower-supernode-pytorch:1.25.0"
        );
        assert_eq!(image(&cfg(&[]), Role::Superlink), "flwr/superlink:1.25.0");
        let s = docker_run_argv(
            &c,
            Role::Supernode,
            &n,
            &Paths::new("/"),
            &pinned(Role::Supernode),
        )
        .unwrap()
        .join(" ");
        assert!(s.contains("--gpus all"));
    }

    #[test]
    fn docker_images_run_pinned_by_digest_only() {
        let digest = "0123456789abcdef".repeat(4);
        for ok in [
            format!("flwr/superlink@sha256:{digest}"),
            format!("flwr/superlink:1.25.0@sha256:{digest}"),
            format!("registry.example:5000/flwr/supernode:1.25.0@sha256:{digest}"),
        ] {
            assert_eq!(PinnedImage::parse(&ok).unwrap().as_str(), ok);
        }
        for bad in [
            "flwr/superlink:1.25.0".to_string(),
            "flwr/superlink:latest".to_string(),
            format!("flwr/superlink@sha256:{}", &digest[1..]),
            format!("flwr/superlink@sha256:{}", digest.to_uppercase()),
            format!("--privileged@sha256:{digest}"),
            format!("flwr/superlink @sha256:{digest}"),
        ] {
            assert!(PinnedImage::parse(&bad).is_err(), "{bad}");
        }
        // The lock: a missing file or tag is refused, naming the file and the image.
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let c = cfg(&[("ETH0_IP", "10.0.0.5")]);
        let e = pinned_image(&c, Role::Superlink, &paths)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("opt/flower/images.lock names no digest for flwr/superlink:1.25.0"),
            "{e}"
        );
        let lock = paths.images_lock();
        std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
        let line = format!("flwr/superlink:1.25.0 flwr/superlink@sha256:{digest}");
        std::fs::write(&lock, format!("# recorded by the image build\n{line}\n")).unwrap();
        assert_eq!(
            pinned_image(&c, Role::Superlink, &paths).unwrap().as_str(),
            format!("flwr/superlink@sha256:{digest}")
        );
        assert!(matches!(
            pinned_image(&c, Role::Supernode, &paths),
            Err(FlowerError::NotPinned { .. })
        ));
        // A tag-only entry is no pin: refused with its line.
        std::fs::write(&lock, "\nflwr/superlink:1.25.0 flwr/superlink:1.25.0\n").unwrap();
        let e = pinned_image(&c, Role::Superlink, &paths)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("images.lock:2: ") && e.contains("not pinned"),
            "{e}"
        );
    }
}
