//! The `image` runtime: each running VM boots its first disk's image as a
//! `systemd-nspawn --boot` machine, on its own network namespace plugged into a host bridge.
//!
//! Owns: the images' raw copies (`qemu-img convert`, cached by image identity under the cache
//! directory), their root partitions loop-mounted read-only (one per image, shared), each VM's
//! copy-on-write overlay (upper/work under `<base_dir>/vm-<id>/disk`), its network namespace
//! and veth pair (the lease's MAC on the inside end `eth0`, the host end `one<tag>-<id>` on the
//! NIC's bridge), the bridges it creates (address: the network's GATEWAY), the context CD's
//! files bind-mounted read-only at `/context` (where one-context and `flower-agent context`
//! look when no CD device exists), the nspawn process and its cgroup (`onesim-<tag>/vm-<id>`
//! in the cgroup2 hierarchy, below onesim's own), the base directory's lock and its record of
//! what exists on the host (`.onesim-host.json`).
//! Must not: touch a bridge, address, mount, namespace or cgroup it did not create (a BRIDGE
//! that exists, or a GATEWAY already on an interface, is refused; the start-up sweep removes
//! only what the dead runtime's record names, and keeps what no longer looks like it; a tag
//! is drawn unused by any runtime's cgroup, namespace or link, so its names are its own); let
//! a context value reach a shell (every command is an argv; names and addresses are validated
//! first).
//! Guarantees: the image file is never written (raw copy, read-only loop device, read-only
//! mount, overlay on top). VM actions map as oned's drivers have them
//! (`flower_image_vm_actions_map_onto_the_machine`): terminate removes the machine, its mounts,
//! namespace, veth and disk; poweroff and undeploy stop the machine and its network, keeping
//! the disk (resume boots the same disk); reboot asks the init to reboot (nspawn exits 133)
//! and boots it again, the VM RUNNING throughout; the `-hard` variants kill at once (oned's
//! cancel/reset). Killing is `cgroup.kill` on the machine's cgroup: every process goes,
//! including an init that outlived nspawn; the crash fault does that and keeps disk and
//! network, the VM RUNNING. One runtime per base directory (a lock); a runtime started on the
//! base directory of a dead one (SIGKILL) first removes what its record names: machines
//! (cgroup), overlay and image mounts, loop devices, namespaces, veths, bridges
//! (`flower_image_onesim_sigkilled_is_swept_by_the_next_one`). Shutdown and `Drop` remove
//! every machine, mount, loop device, namespace, veth, created bridge and cgroup
//! (`flower_image_onesim_sigterm_tears_down_and_exits_0`). Each VM's operations run in order
//! on its own worker thread, so a slow boot never blocks the simulator's lock. A VM without a
//! DISK image, a NIC, a BRIDGE or a GATEWAY in its NIC's network is refused with the reason
//! (`a_vm_without_disk_nic_or_gateway_is_refused_clearly`), shown in the control API's `/vms`,
//! as is a missing prerequisite (`flower_image_runtime_prerequisites_fail_clearly`).
//! Boot → READY (READY=YES or FL_READY through OneGate) and memory are measured per VM, logged
//! and shown in `/vms` (`machine.ready_ms`, `machine.memory_bytes`).
//! Assumptions: root, a cgroup2 hierarchy with `cgroup.kill` (Linux 5.14; hybrid hosts have it
//! at `/sys/fs/cgroup/unified`), nspawn run with `--keep-unit --register=no` (no systemd on
//! the host; it puts the machine in `payload/` below its own cgroup), the root filesystem is
//! the largest partition of an MBR or GPT disk.
//! Caveats: a SIGKILLed onesim takes nspawn with it (`setpriv --pdeathsig KILL`) but not the
//! machine's init, which runs on until the next runtime of the base directory sweeps it (or
//! an administrator kills the cgroup the record names). A SIGKILL between `losetup` and the
//! record's update leaves that loop device unnamed. nspawn reaches its cgroup through
//! `flock --no-fork` (util-linux 2.38) on a lock onesim holds until it has moved the process:
//! `pre_exec` would need unsafe code, and a move after exec races nspawn reading its cgroup.
//! Memory is the summed RSS of the machine's processes. A soft poweroff/terminate SIGKILLs
//! after the grace; oned's KVM driver may instead report a timeout and keep the VM.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The VM's first NIC, as the machine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineNic {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// `02:00:…`, the lease's MAC: one-context configures only the link carrying it.
    pub mac: String,
    /// The host bridge (the network's BRIDGE).
    pub bridge: String,
    /// The network's GATEWAY: the bridge's host address, where OneGate answers.
    pub gateway: Ipv4Addr,
}

/// Everything needed to boot one VM as a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSpec {
    pub id: i64,
    /// The first disk's image file (qcow2).
    pub image: PathBuf,
    pub nic: MachineNic,
    /// The context CD's files (name, content): `context.sh`, `token.txt`.
    pub cd: Vec<(String, String)>,
}

impl MachineSpec {
    /// The machine of a VM: its first DISK's image, its first NIC and its CD; a clear error
    /// when the VM lacks one, or the NIC's network lacks what the bridge needs.
    pub fn from_guest(g: &crate::guest::GuestSpec) -> Result<MachineSpec, String> {
        let id = g.id;
        let image = g.disk_source.clone().ok_or_else(|| {
            format!("VM {id} has no DISK with an image: the image runtime boots the first disk")
        })?;
        let nic = g.nics.first().ok_or_else(|| {
            format!("VM {id} has no NIC: the image runtime plugs NIC 0 into its network's bridge")
        })?;
        let ip: Ipv4Addr = nic
            .ip
            .parse()
            .map_err(|_| format!("VM {id}: NIC 0 has no IPv4 address ({:?})", nic.ip))?;
        if nic.bridge.is_empty() {
            return Err(format!("VM {id}: NIC 0's network has no BRIDGE"));
        }
        let gateway: Ipv4Addr = nic
            .gateway
            .as_deref()
            .ok_or_else(|| {
                format!(
                    "VM {id}: NIC 0's network has no GATEWAY: the image runtime gives bridge {} that address",
                    nic.bridge
                )
            })?
            .parse()
            .map_err(|_| format!("VM {id}: NIC 0's GATEWAY {:?} is not an IPv4 address", nic.gateway))?;
        let mask = u32::MAX
            .checked_shl(32 - u32::from(nic.prefix_len))
            .unwrap_or(0);
        if u32::from(ip) & mask != u32::from(gateway) & mask || ip == gateway {
            return Err(format!(
                "VM {id}: GATEWAY {gateway} is not another address of NIC 0's network {ip}/{}",
                nic.prefix_len
            ));
        }
        Ok(MachineSpec {
            id,
            image,
            nic: MachineNic {
                ip,
                prefix: nic.prefix_len,
                mac: nic.mac.clone(),
                bridge: nic.bridge.clone(),
                gateway,
            },
            cd: crate::guest::cd_files(g),
        })
    }
}

#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// Each VM's files under `base_dir/vm-<id>/`; the images' mounts under `base_dir/.images/`.
    pub base_dir: PathBuf,
    /// Raw copies of the images, kept across runs.
    pub cache_dir: PathBuf,
    /// Time between the orderly poweroff request and SIGKILL.
    pub grace: Duration,
}

/// What the control API shows of a machine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MachineStatus {
    /// The nspawn process while the machine runs.
    pub pid: Option<u32>,
    /// The last boot's start.
    pub booted: Option<Instant>,
    /// Boot → READY of the first boot.
    pub ready_after: Option<Duration>,
    /// Summed RSS of the machine's processes when READY was seen.
    pub memory_bytes: Option<u64>,
    /// Why the last operation failed.
    pub error: Option<String>,
}

enum Cmd {
    Start(Box<MachineSpec>),
    Restart(Box<MachineSpec>),
    /// Stop the machine; `destroy` also removes its disk (terminate).
    Stop {
        destroy: bool,
    },
    /// `reboot` (the machine's init reboots in order) or `reboot-hard` (kill and boot).
    Reboot(Box<MachineSpec>, bool),
    /// The VM cannot boot (recorded, nothing started).
    Fail(String),
    /// Kill every process of the machine at once; reply whether one ran.
    Crash(Option<mpsc::Sender<bool>>),
    Signal(Signal, mpsc::Sender<bool>),
    /// Stop and tear down everything but the disk, then end the worker.
    Shutdown {
        hard: bool,
    },
}

struct Worker {
    tx: mpsc::Sender<Cmd>,
    thread: JoinHandle<()>,
    status: Arc<Mutex<MachineStatus>>,
}

/// One image, converted and mounted: the lower layer of its VMs' overlays.
struct Lower {
    loop_dev: String,
    /// The loop device's backing file: the image's raw copy.
    raw: PathBuf,
    mnt: PathBuf,
}

#[derive(Default)]
struct Host {
    lowers: HashMap<String, Lower>,
    /// Bridges this runtime created: name → gateway.
    bridges: HashMap<String, Ipv4Addr>,
    /// The partition fault's nftables table exists ([`Machines::partition`]).
    partition_table: bool,
    /// VMs cut off by the partition fault.
    cut: std::collections::BTreeSet<i64>,
}

struct Shared {
    cfg: MachineConfig,
    /// Distinguishes this simulator's namespaces and links from another's on the same host.
    tag: String,
    /// This runtime's cgroup (`onesim-<tag>`); each machine runs in `vm-<id>` below it.
    cgroup: PathBuf,
    /// Its path as `/proc/<pid>/cgroup` shows it.
    cgroup_rel: String,
    host: Mutex<Host>,
    /// Held for the runtime's life: one runtime per base directory.
    _lock: nix::fcntl::Flock<fs::File>,
}

/// What a runtime leaves on the host if it dies without tearing down (SIGKILL), written to
/// `<base_dir>/.onesim-host.json` before each is made: the next runtime of the same base
/// directory removes exactly these ([`sweep`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Record {
    /// Names the namespaces (`onesim-<tag>-<id>`), host veths (`one<tag>-<id>`) and cgroup.
    tag: String,
    /// The runtime's cgroup (`…/onesim-<tag>`).
    cgroup: PathBuf,
    /// Bridges it created: name → the GATEWAY it gave them.
    bridges: std::collections::BTreeMap<String, Ipv4Addr>,
    /// Loop devices it attached: device → backing raw copy.
    loops: std::collections::BTreeMap<String, PathBuf>,
    /// It made the partition fault's nftables table (`bridge onesim_<tag>`).
    #[serde(default)]
    partition_table: bool,
}

const RECORD: &str = ".onesim-host.json";
/// systemd-nspawn's exit status when the machine rebooted (`--keep-unit`: it does not boot
/// it again itself).
const NSPAWN_REBOOTED: i32 = 133;
const LOCK: &str = ".onesim.lock";

/// The image runtime: one worker per VM.
pub struct Machines {
    shared: Arc<Shared>,
    workers: Mutex<HashMap<i64, Worker>>,
}

/// The programs the runtime runs, found on PATH.
const TOOLS: [&str; 7] = [
    "systemd-nspawn",
    "flock",
    "qemu-img",
    "losetup",
    "mount",
    "umount",
    "ip",
];

/// Checks what the runtime needs before anything starts: root, the tools, overlayfs.
pub fn preflight() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the image runtime needs root (loop devices, mounts, network namespaces, systemd-nspawn)".into());
    }
    for tool in TOOLS {
        if which(tool).is_none() {
            let hint = match tool {
                "systemd-nspawn" => " (Debian: apt-get install systemd-container)",
                "qemu-img" => " (Debian: apt-get install qemu-utils)",
                "ip" => " (Debian: apt-get install iproute2)",
                "flock" => " (Debian: apt-get install util-linux)",
                _ => "",
            };
            return Err(format!(
                "the image runtime needs {tool}, which is not on PATH{hint}"
            ));
        }
    }
    let fs = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        return Err("the image runtime needs overlayfs, which this kernel lacks".into());
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Runs a program (no shell); its trimmed stdout, or an error naming the command.
fn run<S: AsRef<std::ffi::OsStr>>(prog: &str, args: &[S]) -> Result<String, String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        let argv: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        Err(format!(
            "{prog} {} failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes a host network interface; idempotent: an interface that is gone, before or
/// during the call, is what was asked for.
fn delete_link(name: &str) -> Result<(), String> {
    let exists = || Path::new("/sys/class/net").join(name).exists();
    if !exists() {
        return Ok(());
    }
    match run("ip", &["link", "delete", name]) {
        Err(_) if !exists() => Ok(()),
        r => r.map(drop),
    }
}

/// A Linux interface name: 1–15 characters, no `/`, whitespace or `:`.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A path safe inside mount options and nspawn's `SRC:DST` (no `,`, `:` or newline).
fn option_safe(p: &Path) -> Result<String, String> {
    let s = p
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8", p.display()))?;
    if s.contains([',', ':', '\n']) {
        return Err(format!("{s}: a path with ',' or ':' cannot be mounted"));
    }
    Ok(s.to_string())
}

/// The identity of an image: a hash of its content, the cache key of its raw copy (oned
/// copies every image into its datastore, so a path or inode would miss the cache).
fn image_key(image: &Path) -> Result<String, String> {
    let mut f =
        fs::File::open(image).map_err(|e| format!("image file {}: {e}", image.display()))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("image file {}: {e}", image.display()))?;
        if n == 0 {
            break;
        }
        buf[..n].hash(&mut h);
    }
    Ok(format!("{:016x}", h.finish()))
}

/// Raw copies kept in the cache; older ones are removed (a loop device still using one keeps
/// its data until detached).
const CACHED_RAWS: usize = 4;

fn prune_cache(dir: &Path) {
    let mut raws: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "raw"))
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    raws.sort_by_key(|r| std::cmp::Reverse(r.0));
    for (_, p) in raws.into_iter().skip(CACHED_RAWS) {
        let _ = fs::remove_file(p);
    }
}

/// Opens `image` and checks it is a qcow2 file; a clear error otherwise.
fn check_qcow2(image: &Path) -> Result<(), String> {
    fs::metadata(image).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("image file {} not found", image.display()),
        _ => format!("image file {}: {e}", image.display()),
    })?;
    let mut magic = [0u8; 4];
    fs::File::open(image)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| format!("image file {}: {e}", image.display()))?;
    if &magic != b"QFI\xfb" {
        return Err(format!(
            "image file {} is not a qcow2 image",
            image.display()
        ));
    }
    Ok(())
}

/// The root filesystem's byte range in a raw disk: the largest partition of an MBR or a GPT,
/// or the whole file when it has no partition table.
pub fn root_partition(raw: &Path) -> Result<(u64, u64), String> {
    let err = |e: std::io::Error| format!("{}: {e}", raw.display());
    let mut f = fs::File::open(raw).map_err(err)?;
    let len = f.metadata().map_err(err)?.len();
    let mut head = vec![0u8; 1024];
    f.read_exact(&mut head).map_err(err)?;
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(x)
    };
    if head[510..512] != [0x55, 0xaa] {
        return Ok((0, len));
    }
    let mut parts: Vec<(u64, u64)> = Vec::new();
    let mut gpt = false;
    for i in 0..4 {
        let e = &head[446 + 16 * i..446 + 16 * (i + 1)];
        match e[4] {
            0 => {}
            0xee => gpt = true,
            _ => parts.push((
                u64::from(u32_at(e, 8)) * 512,
                u64::from(u32_at(e, 12)) * 512,
            )),
        }
    }
    if gpt {
        if &head[512..520] != b"EFI PART" {
            return Err(format!("{}: protective MBR without a GPT", raw.display()));
        }
        let (lba, count, size) = (
            u64_at(&head, 512 + 72),
            u32_at(&head, 512 + 80) as usize,
            u32_at(&head, 512 + 84) as usize,
        );
        if !(128..=4096).contains(&size) || count > 1024 {
            return Err(format!("{}: implausible GPT header", raw.display()));
        }
        let mut table = vec![0u8; count * size];
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(lba * 512)).map_err(err)?;
        f.read_exact(&mut table).map_err(err)?;
        for e in table.chunks(size) {
            if e[..16].iter().all(|b| *b == 0) {
                continue;
            }
            let (first, last) = (u64_at(e, 32), u64_at(e, 40));
            if last >= first {
                parts.push((first * 512, (last - first + 1) * 512));
            }
        }
    }
    parts
        .into_iter()
        .filter(|(o, s)| *s > 0 && o + s <= len)
        .max_by_key(|(_, s)| *s)
        .ok_or_else(|| format!("{}: no partition inside the disk", raw.display()))
}

/// The systemd-nspawn argv of a machine: every nspawn option is here.
fn nspawn_argv(root: &str, machine: &str, netns: &str, cd: &str) -> Vec<OsString> {
    [
        "--quiet".to_string(),
        "--boot".into(),
        // No systemd on the host: stay in onesim's cgroup, register nowhere.
        "--keep-unit".into(),
        "--register=no".into(),
        format!("--directory={root}"),
        format!("--machine={machine}"),
        format!("--network-namespace-path=/run/netns/{netns}"),
        // Its own namespace: the guest's networkd may configure it (as --private-network grants).
        "--capability=CAP_NET_ADMIN".into(),
        // The CD's files where one-context looks when no CONTEXT device exists.
        format!("--bind-ro={cd}:/context"),
        "--console=pipe".into(),
        "--link-journal=no".into(),
        // The guest's context writes resolv.conf and the time zone, as on a VM.
        "--resolv-conf=off".into(),
        "--timezone=off".into(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect()
}

/// The pids of `pid`'s descendants (not `pid` itself).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let kids = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for k in kids
                .split_whitespace()
                .filter_map(|k| k.parse::<u32>().ok())
            {
                if !out.contains(&k) {
                    out.push(k);
                    todo.push(k);
                }
            }
        }
    }
    out
}

/// This process's cgroup2: the hierarchy's mount (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a hybrid host) and `/proc/self/cgroup`'s `0::` path in it.
fn own_cgroup2() -> Result<(PathBuf, String), String> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("mountinfo: {e}"))?;
    let mnt = info
        .lines()
        .find_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            (tail.split_whitespace().next()? == "cgroup2").then(|| head.split_whitespace().nth(4))?
        })
        .ok_or("the image runtime needs a cgroup2 hierarchy mounted (it kills machines with cgroup.kill)")?;
    let own =
        fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("/proc/self/cgroup has no cgroup2 entry")?;
    Ok((PathBuf::from(mnt), path.trim_end_matches('/').to_string()))
}

/// True when nothing runs in the cgroup or below it (or it is gone).
fn cgroup_empty(cg: &Path) -> bool {
    fs::read_to_string(cg.join("cgroup.events"))
        .map(|t| t.lines().any(|l| l == "populated 0"))
        .unwrap_or(true)
}

/// Kills every process in the cgroup and below it (`cgroup.kill`: SIGKILL, no escape by
/// forking, a machine's own PID namespace included), waits until it is empty, and removes it
/// with its child cgroups.
fn kill_cgroup(cg: &Path) -> Result<(), String> {
    if !cg.exists() {
        return Ok(());
    }
    fs::write(cg.join("cgroup.kill"), "1")
        .map_err(|e| format!("{}: {e}", cg.join("cgroup.kill").display()))?;
    let t0 = Instant::now();
    while !cgroup_empty(cg) {
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(format!("{}: processes outlived cgroup.kill", cg.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    remove_cgroup(cg)
}

/// Removes an empty cgroup and its (empty) children, deepest first.
fn remove_cgroup(cg: &Path) -> Result<(), String> {
    for e in fs::read_dir(cg).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&e.path())?;
        }
    }
    match fs::remove_dir(cg) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("{}: {e}", cg.display())),
        _ => Ok(()),
    }
}

/// Moves `pid` into `cg` (`rel`: its path as `/proc/<pid>/cgroup` shows it) and checks it.
fn enter_cgroup(cg: &Path, rel: &str, pid: u32) -> Result<(), String> {
    let procs = cg.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(|e| format!("{}: {e}", procs.display()))?;
    let now = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    if now.lines().any(|l| l.strip_prefix("0::") == Some(rel)) {
        Ok(())
    } else {
        Err(format!(
            "{}: pid {pid} is not in it after the move",
            cg.display()
        ))
    }
}

/// What a [`sweep`] did.
#[derive(Debug, Default)]
struct Swept {
    removed: Vec<String>,
    /// Named by the record but no longer provably the dead runtime's: left alone.
    kept: Vec<String>,
    /// Provably its, but removing failed.
    failed: Vec<String>,
}

fn write_record(base: &Path, rec: &Record) -> Result<(), String> {
    let path = base.join(RECORD);
    let tmp = base.join(format!("{RECORD}.tmp"));
    let text = serde_json::to_string_pretty(rec).map_err(|e| e.to_string())?;
    fs::write(&tmp, text)
        .and_then(|_| fs::rename(&tmp, &path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A tag no runtime uses (live, or dead and not yet swept): no `onesim-<tag>` cgroup beside
/// the one this runtime makes, no namespace or link named after it. So a sweep by tag removes
/// only the dead runtime's namespaces and veths.
fn free_tag(cgroups: &Path) -> Result<String, String> {
    use rand::Rng as _;
    let names = |dir: &str| -> Vec<String> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    let (netns, links) = (names("/run/netns"), names("/sys/class/net"));
    for _ in 0..64 {
        let tag = format!("{:04x}", rand::rng().random::<u16>());
        let (ns, veth) = (format!("onesim-{tag}-"), format!("one{tag}-"));
        if !cgroups.join(format!("onesim-{tag}")).exists()
            && !netns.iter().any(|n| n.starts_with(&ns))
            && !links.iter().any(|l| l.starts_with(&veth))
        {
            return Ok(tag);
        }
    }
    Err("no free runtime tag: 64 draws were all in use".into())
}

fn valid_tag(tag: &str) -> bool {
    (1..=8).contains(&tag.len()) && tag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Removes what a dead runtime of the same base directory left, as its record names it, and
/// only that: its cgroup (killing the machines that survived it), the overlays and image
/// mounts under the base directory, the loop devices it attached (still on the recorded raw
/// copy, no longer mounted), its namespaces and veths (by its tag), and the bridges it made
/// (still with its GATEWAY and no foreign port). What does not look like it is kept.
fn sweep(base: &Path, rec: &Record) -> Swept {
    let mut out = Swept::default();
    let (done, kept, failed) = (&mut out.removed, &mut out.kept, &mut out.failed);
    if !valid_tag(&rec.tag) {
        kept.push(format!(
            "{RECORD}: tag {:?} is not one onesim writes",
            rec.tag
        ));
        return out;
    }
    // Processes first: a running machine holds its mounts and namespace.
    let cg_name = format!("onesim-{}", rec.tag);
    if rec
        .cgroup
        .file_name()
        .is_some_and(|n| n == cg_name.as_str())
        && own_cgroup2().is_ok_and(|(mnt, _)| rec.cgroup.starts_with(mnt))
    {
        if rec.cgroup.exists() {
            match kill_cgroup(&rec.cgroup) {
                Ok(()) => done.push(format!("cgroup {}", rec.cgroup.display())),
                Err(e) => failed.push(e),
            }
        }
    } else if rec.cgroup.exists() {
        kept.push(format!(
            "cgroup {}: not this onesim's",
            rec.cgroup.display()
        ));
    }
    // Mounts: overlays at vm-<n>/root and images at .images/<key>, deepest first.
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|m| {
            m.strip_prefix(base).is_ok_and(|rel| {
                let parts: Vec<_> = rel.iter().map(|c| c.to_string_lossy()).collect();
                matches!(parts.as_slice(), [vm, root] if vm.starts_with("vm-") && root == "root")
                    || matches!(parts.as_slice(), [i, _] if i == ".images")
            })
        })
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    for m in mounts {
        match umount(&m) {
            Ok(()) => done.push(format!("mount {}", m.display())),
            Err(e) => failed.push(e),
        }
    }
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for (dev, raw) in &rec.loops {
        let Some(name) = dev
            .strip_prefix("/dev/")
            .filter(|n| valid_ifname(n) && n.starts_with("loop"))
        else {
            kept.push(format!("loop device {dev:?}: not a loop device"));
            continue;
        };
        let backing = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
            .map(|b| PathBuf::from(b.trim()))
            .ok();
        if backing.as_deref() != Some(raw.as_path()) {
            continue; // detached since, or now someone else's
        }
        if info.lines().any(|l| {
            l.split(" - ")
                .nth(1)
                .is_some_and(|t| t.split_whitespace().nth(1) == Some(dev))
        }) {
            kept.push(format!("loop device {dev}: still mounted"));
            continue;
        }
        match run("losetup", &["-d", dev]) {
            Ok(_) => done.push(format!("loop device {dev}")),
            Err(e) => failed.push(e),
        }
    }
    // Veths (deleting the host end removes the pair), then the namespaces.
    let veth = format!("one{}-", rec.tag);
    for e in fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name
            .strip_prefix(&veth)
            .is_some_and(|id| id.parse::<i64>().is_ok())
        {
            match delete_link(&name) {
                Ok(()) => done.push(format!("link {name}")),
                Err(e) => failed.push(e),
            }
        }
    }
    let ns = format!("onesim-{}-", rec.tag);
    for e in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name
            .strip_prefix(&ns)
            .is_some_and(|id| id.parse::<i64>().is_ok())
        {
            match run("ip", &["netns", "delete", &name]) {
                Ok(_) => done.push(format!("netns {name}")),
                Err(e) => failed.push(e),
            }
        }
    }
    for (br, gw) in &rec.bridges {
        let dev = Path::new("/sys/class/net").join(br);
        if !valid_ifname(br) || !dev.exists() {
            continue;
        }
        if !dev.join("bridge").is_dir() {
            kept.push(format!("{br}: not a bridge"));
            continue;
        }
        let ports: Vec<String> = fs::read_dir(dev.join("brif"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let has_gw = run("ip", &["-o", "-4", "addr", "show", "dev", br]).is_ok_and(|a| {
            a.split_whitespace()
                .any(|w| w.split('/').next() == Some(&gw.to_string()))
        });
        if !ports.is_empty() || !has_gw {
            kept.push(format!(
                "bridge {br}: it no longer looks like this onesim's (ports {ports:?}, gateway {gw} {})",
                if has_gw { "present" } else { "absent" }
            ));
            continue;
        }
        match delete_link(br) {
            Ok(()) => done.push(format!("bridge {br}")),
            Err(e) => failed.push(e),
        }
    }
    if rec.partition_table {
        match delete_partition_table(&rec.tag) {
            Ok(()) => done.push(format!(
                "nftables table bridge {}",
                partition_table(&rec.tag)
            )),
            Err(e) => failed.push(e),
        }
    }
    out
}

/// The partition fault's nftables table: `bridge onesim_<tag>`, whose set `cut` holds the
/// host veths whose frames are dropped, in both directions, where they meet the bridge.
fn partition_table(tag: &str) -> String {
    format!("onesim_{tag}")
}

/// Creates the table (the tag is validated, so the script holds no foreign text).
fn create_partition_table(tag: &str) -> Result<(), String> {
    if which("nft").is_none() {
        return Err(
            "the partition fault needs nft (Debian package nftables) on the host".to_string(),
        );
    }
    let t = partition_table(tag);
    // Frames from a VM enter the bridge at prerouting, frames to it (forwarded or from the
    // host, where OneGate answers) leave at postrouting: both hooks see every frame.
    let script = format!(
        "table bridge {t} {{\n\
         \tset cut {{ type ifname; }}\n\
         \tchain pre {{ type filter hook prerouting priority 0; policy accept; iifname @cut drop; }}\n\
         \tchain post {{ type filter hook postrouting priority 0; policy accept; oifname @cut drop; }}\n\
         }}\n"
    );
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft -f - (table bridge {t}) failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes the table; idempotent (a table already gone is what was asked for).
fn delete_partition_table(tag: &str) -> Result<(), String> {
    let t = partition_table(tag);
    if which("nft").is_none() || run("nft", &["list", "table", "bridge", &t]).is_err() {
        return Ok(());
    }
    run("nft", &["delete", "table", "bridge", &t]).map(drop)
}

/// Everything of the host a machine could leave behind whose line names one of `marks`
/// (a base or cache directory, a tag, a bridge): processes (by command line or cgroup),
/// mounts, links, network namespaces, loop devices, each as `kind: line`. For checks that
/// nothing is left behind.
pub fn host_traces(marks: &[&str]) -> std::collections::BTreeSet<String> {
    let out_of = |prog: &str, args: &[&str]| run(prog, args).unwrap_or_default();
    let processes: String = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            // A zombie holds nothing (and the host's init may reap it late).
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            if stat.rsplit(')').next()?.trim_start().starts_with('Z') {
                return None;
            }
            let cmd = fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let cg = fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
            let cg = cg.lines().find(|l| l.starts_with("0::")).unwrap_or("");
            Some(format!(
                "{} {} [{cg}]\n",
                e.file_name().to_string_lossy(),
                cmd.trim()
            ))
        })
        .collect();
    let sources = [
        ("process", processes),
        (
            "mount",
            fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        ),
        ("link", out_of("ip", &["-o", "link", "show"])),
        ("netns", out_of("ip", &["netns", "list"])),
        ("loop", out_of("losetup", &["-a"])),
    ];
    sources
        .iter()
        .flat_map(|(kind, text)| {
            text.lines()
                .filter(|l| marks.iter().any(|m| l.contains(m)))
                .map(move |l| format!("{kind}: {l}"))
        })
        .collect()
}

/// The machine's init: the descendant of its nspawn process that is PID 1 in its own
/// PID namespace.
pub fn machine_init(nspawn: u32) -> Option<u32> {
    descendants(nspawn).into_iter().find(|p| {
        fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|ns| ns.split_whitespace().last() == Some("1"))
        })
    })
}

/// Summed RSS (bytes) of the machine's processes: nspawn's descendants.
pub fn machine_rss(nspawn: u32) -> u64 {
    descendants(nspawn)
        .into_iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .sum()
}

impl Shared {
    fn vm_dir(&self, id: i64) -> PathBuf {
        self.cfg.base_dir.join(format!("vm-{id}"))
    }
    fn netns(&self, id: i64) -> String {
        format!("onesim-{}-{id}", self.tag)
    }
    fn host_veth(&self, id: i64) -> String {
        format!("one{}-{id}", self.tag)
    }
    fn host(&self) -> std::sync::MutexGuard<'_, Host> {
        self.host.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn vm_cgroup(&self, id: i64) -> PathBuf {
        self.cgroup.join(format!("vm-{id}"))
    }

    /// Writes the record of what exists on the host now, plus `extra` about to be made.
    fn save_record(&self, host: &Host, extra: Option<(&str, &Path)>) -> Result<(), String> {
        let mut loops: std::collections::BTreeMap<String, PathBuf> = host
            .lowers
            .values()
            .map(|l| (l.loop_dev.clone(), l.raw.clone()))
            .collect();
        if let Some((dev, raw)) = extra {
            loops.insert(dev.to_string(), raw.to_path_buf());
        }
        write_record(
            &self.cfg.base_dir,
            &Record {
                tag: self.tag.clone(),
                cgroup: self.cgroup.clone(),
                bridges: host.bridges.iter().map(|(b, g)| (b.clone(), *g)).collect(),
                loops,
                partition_table: host.partition_table,
            },
        )
    }

    /// Cuts VM `id`'s veth off its bridge (`cut`) or lets it through again; idempotent.
    fn set_cut(&self, id: i64, cut: bool) -> Result<(), String> {
        let mut host = self.host();
        if cut == host.cut.contains(&id) {
            return Ok(());
        }
        if cut && !host.partition_table {
            // Recorded first, so a SIGKILL right after still has the table swept.
            host.partition_table = true;
            self.save_record(&host, None)?;
            create_partition_table(&self.tag)?;
        }
        let t = partition_table(&self.tag);
        let veth = format!("\"{}\"", self.host_veth(id));
        let verb = if cut { "add" } else { "delete" };
        run(
            "nft",
            &[verb, "element", "bridge", &t, "cut", "{", &veth, "}"],
        )?;
        if cut {
            host.cut.insert(id);
        } else {
            host.cut.remove(&id);
        }
        Ok(())
    }

    /// The image's root filesystem, mounted read-only (converted and mounted on first use).
    fn lower(&self, image: &Path) -> Result<PathBuf, String> {
        check_qcow2(image)?;
        let key = image_key(image)?;
        // Held across the conversion: two VMs of one image convert it once.
        let mut host = self.host();
        if let Some(l) = host.lowers.get(&key) {
            return Ok(l.mnt.clone());
        }
        fs::create_dir_all(&self.cfg.cache_dir)
            .map_err(|e| format!("{}: {e}", self.cfg.cache_dir.display()))?;
        let raw = self.cfg.cache_dir.join(format!("{key}.raw"));
        if !raw.exists() {
            let t0 = Instant::now();
            let tmp = self
                .cfg
                .cache_dir
                .join(format!("{key}.raw.{}.tmp", std::process::id()));
            let converted = run(
                "qemu-img",
                &[
                    OsString::from("convert"),
                    "-f".into(),
                    "qcow2".into(),
                    "-O".into(),
                    "raw".into(),
                    image.into(),
                    tmp.clone().into(),
                ],
            );
            if let Err(e) = converted {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            fs::rename(&tmp, &raw).map_err(|e| format!("{}: {e}", raw.display()))?;
            prune_cache(&self.cfg.cache_dir);
            tracing::info!(
                "image {}: raw copy {} in {:.1} s",
                image.display(),
                raw.display(),
                t0.elapsed().as_secs_f64()
            );
        }
        // Most recently used first when pruning.
        let _ = fs::File::open(&raw).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        let (offset, size) = root_partition(&raw)?;
        let loop_dev = run(
            "losetup",
            &[
                OsString::from("--find"),
                "--show".into(),
                "--read-only".into(),
                format!("--offset={offset}").into(),
                format!("--sizelimit={size}").into(),
                raw.clone().into(),
            ],
        )?;
        // Recorded before the mount: a SIGKILL from here on leaves nothing unnamed.
        if let Err(e) = self.save_record(&host, Some((&loop_dev, &raw))) {
            let _ = run("losetup", &["-d", &loop_dev]);
            return Err(e);
        }
        let mnt = self.cfg.base_dir.join(".images").join(&key);
        let mounted = fs::create_dir_all(&mnt)
            .map_err(|e| format!("{}: {e}", mnt.display()))
            .and_then(|_| {
                run(
                    "mount",
                    &[
                        OsString::from("-o"),
                        "ro".into(),
                        loop_dev.clone().into(),
                        mnt.clone().into(),
                    ],
                )
            });
        if let Err(e) = mounted {
            let _ = run("losetup", &["-d", &loop_dev]);
            let _ = fs::remove_dir(&mnt);
            return Err(format!(
                "image {}: its root partition does not mount: {e}",
                image.display()
            ));
        }
        host.lowers.insert(
            key,
            Lower {
                loop_dev,
                raw,
                mnt: mnt.clone(),
            },
        );
        Ok(mnt)
    }

    /// The NIC's bridge, created with the gateway as its address unless this runtime made it.
    fn bridge(&self, nic: &MachineNic) -> Result<(), String> {
        let mut host = self.host();
        if host.bridges.contains_key(&nic.bridge) {
            return Ok(());
        }
        if Path::new("/sys/class/net").join(&nic.bridge).exists() {
            return Err(format!(
                "bridge {} exists and was not created by this onesim: give the network another BRIDGE",
                nic.bridge
            ));
        }
        let addrs = run("ip", &["-o", "-4", "addr", "show"])?;
        let gw = nic.gateway.to_string();
        if let Some(line) = addrs.lines().find(|l| {
            l.split_whitespace()
                .nth(3)
                .and_then(|a| a.split('/').next())
                == Some(gw.as_str())
        }) {
            let dev = line.split_whitespace().nth(1).unwrap_or("?");
            return Err(format!(
                "address {gw} (the network's GATEWAY) is already in use on {dev}"
            ));
        }
        host.bridges.insert(nic.bridge.clone(), nic.gateway);
        if let Err(e) = self.save_record(&host, None) {
            host.bridges.remove(&nic.bridge);
            return Err(e);
        }
        // A fixed MAC, derived from the gateway: a bridge left to pick its own takes the
        // lowest MAC among its ports, so a VM leaving or joining changed the gateway's MAC
        // under every other VM, whose ARP entries then pointed nowhere for 15–45 s (their
        // OneGate heartbeats stalled together, seen in the image e2e after a replacement).
        let o = nic.gateway.octets();
        let mac = format!("02:fe:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
        if let Err(e) = run(
            "ip",
            &[
                "link",
                "add",
                "name",
                &nic.bridge,
                "address",
                &mac,
                "type",
                "bridge",
            ],
        ) {
            host.bridges.remove(&nic.bridge);
            return Err(e);
        }
        let cidr = format!("{gw}/{}", nic.prefix);
        run("ip", &["addr", "add", &cidr, "dev", &nic.bridge])?;
        run("ip", &["link", "set", &nic.bridge, "up"])?;
        Ok(())
    }
}

/// A VM's machine, as its worker holds it.
struct Vm {
    id: i64,
    shared: Arc<Shared>,
    status: Arc<Mutex<MachineStatus>>,
    netns: bool,
    overlay: bool,
    child: Option<Child>,
}

impl Vm {
    fn dir(&self) -> PathBuf {
        self.shared.vm_dir(self.id)
    }

    fn set_status(&self, f: impl FnOnce(&mut MachineStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Disk, network and CD, then the machine.
    fn start(&mut self, spec: &MachineSpec) -> Result<(), String> {
        if !valid_ifname(&spec.nic.bridge) {
            return Err(format!(
                "BRIDGE {:?} is not an interface name",
                spec.nic.bridge
            ));
        }
        if !valid_mac(&spec.nic.mac) {
            return Err(format!("MAC {:?} is not a MAC address", spec.nic.mac));
        }
        let dir = self.dir();
        let lower = self.shared.lower(&spec.image)?;
        self.shared.bridge(&spec.nic)?;
        let root = dir.join("root");
        if !self.overlay {
            let (upper, work) = (dir.join("disk/upper"), dir.join("disk/work"));
            for d in [&upper, &work, &root] {
                fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            }
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                option_safe(&lower)?,
                option_safe(&upper)?,
                option_safe(&work)?
            );
            run(
                "mount",
                &[
                    OsString::from("-t"),
                    "overlay".into(),
                    "overlay".into(),
                    "-o".into(),
                    opts.into(),
                    root.clone().into(),
                ],
            )?;
            self.overlay = true;
        }
        if !self.netns {
            let (ns, veth) = (self.shared.netns(self.id), self.shared.host_veth(self.id));
            run("ip", &["netns", "add", &ns])?;
            self.netns = true;
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "address",
                    &spec.nic.mac,
                    "netns",
                    &ns,
                ],
            )?;
            run("ip", &["link", "set", &veth, "master", &spec.nic.bridge])?;
            run("ip", &["link", "set", &veth, "up"])?;
        }
        self.write_cd(spec)?;
        self.spawn()
    }

    fn write_cd(&self, spec: &MachineSpec) -> Result<(), String> {
        let cd = self.dir().join("cd");
        fs::create_dir_all(&cd).map_err(|e| format!("{}: {e}", cd.display()))?;
        crate::guest::write_files(&cd, &spec.cd)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let dir = self.dir();
        let argv = nspawn_argv(
            &option_safe(&dir.join("root"))?,
            &format!("one-{}", self.id),
            &self.shared.netns(self.id),
            &option_safe(&dir.join("cd"))?,
        );
        let nspawn = which("systemd-nspawn").ok_or("systemd-nspawn is not on PATH")?;
        let flock = which("flock").ok_or("flock is not on PATH")?;
        // nspawn must start in the machine's cgroup: it makes its payload/ and supervisor/
        // cgroups below the one it starts in. Safe Rust cannot place a child before exec, so
        // it waits on a lock held here (`flock --no-fork` execs nspawn, same pid, once
        // given the lock), is moved, then released.
        let gate = dir.join("cgroup.gate");
        let held = fs::File::create(&gate)
            .map_err(|e| format!("{}: {e}", gate.display()))
            .and_then(|f| {
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, e)| format!("{}: {e}", gate.display()))
            })?;
        let argv: Vec<OsString> = [
            flock.into_os_string(),
            "--no-fork".into(),
            gate.into_os_string(),
            nspawn.into_os_string(),
        ]
        .into_iter()
        .chain(argv)
        .collect();
        // The worker thread spawns and outlives the machine: PDEATHSIG follows onesim.
        let setpriv = crate::guest::find_setpriv();
        let mut cmd =
            crate::guest::logged_command(setpriv.as_deref(), &argv, &dir.join("console.log"))?;
        let cg = self.shared.vm_cgroup(self.id);
        match fs::create_dir(&cg) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(format!("cgroup {}: {e}", cg.display()))
            }
            _ => {}
        }
        let mut child = cmd.spawn().map_err(|e| format!("systemd-nspawn: {e}"))?;
        let pid = child.id();
        let rel = format!("{}/vm-{}", self.shared.cgroup_rel, self.id);
        if let Err(e) = enter_cgroup(&cg, &rel, pid) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = child.wait();
            let _ = kill_cgroup(&cg);
            return Err(e);
        }
        drop(held);
        self.child = Some(child);
        self.set_status(|s| {
            s.pid = Some(pid);
            s.booted = Some(Instant::now());
            s.error = None;
        });
        Ok(())
    }

    /// Stops the machine: an orderly poweroff (nspawn turns SIGTERM into SIGRTMIN+3 for the
    /// machine's systemd), SIGKILL after the grace, or at once when `hard`.
    fn stop_machine(&mut self, hard: bool) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        if !hard {
            let _ = kill(pid, Signal::SIGTERM);
            let t0 = Instant::now();
            while t0.elapsed() < self.shared.cfg.grace {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill_hard(&mut child);
        self.set_status(|s| s.pid = None);
    }

    fn init_pid(&self) -> Option<u32> {
        machine_init(self.child.as_ref()?.id())
    }

    /// Reboots the machine on its disk. In order: the init is asked to reboot (SIGINT, as
    /// Ctrl-Alt-Del), nspawn exits when it has ([`NSPAWN_REBOOTED`]) and the machine boots
    /// again; one that has not within the grace is reset. Hard (`reboot-hard`, or no machine
    /// running): killed and booted again at once.
    fn reboot(&mut self, spec: &MachineSpec, hard: bool) -> Result<(), String> {
        let (Some(init), false) = (self.init_pid(), hard) else {
            self.stop_machine(true);
            return if self.overlay && self.netns {
                self.write_cd(spec).and_then(|_| self.spawn())
            } else {
                self.start(spec)
            };
        };
        self.write_cd(spec)?;
        kill(Pid::from_raw(init as i32), Signal::SIGINT)
            .map_err(|e| format!("signalling the machine's init: {e}"))?;
        let t0 = Instant::now();
        let status = loop {
            std::thread::sleep(Duration::from_millis(100));
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(None)) if t0.elapsed() < self.shared.cfg.grace => {}
                Some(Ok(Some(st))) => break st.to_string(),
                _ => break "no reboot within the grace: reset".into(),
            }
        };
        tracing::info!(
            vm = self.id,
            "machine rebooting ({status}) after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        self.stop_machine(true);
        self.spawn()
    }

    /// SIGKILLs every process of the machine, nspawn included, through its cgroup (the
    /// machine's init may have outlived nspawn), and removes the cgroup.
    fn kill_hard(&self, child: &mut Child) {
        let cg = self.shared.vm_cgroup(self.id);
        if let Err(e) = kill_cgroup(&cg) {
            tracing::error!(vm = self.id, "killing the machine: {e}");
            for p in descendants(child.id()) {
                let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
            }
        }
        // nspawn itself is in the cgroup; never wait on a child that might not be dead.
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
    }

    /// Machine, network and overlay down; the disk too when `destroy`. Every step is tried.
    fn teardown(&mut self, destroy: bool, hard: bool) -> Result<(), String> {
        self.stop_machine(hard);
        let mut errors = Vec::new();
        if self.netns {
            // The host end first: deleting it removes both ends at once. Deleting the
            // namespace first removes them too, but later (the kernel's asynchronous netns
            // clean-up), and a delete racing that found no device.
            if let Err(e) = delete_link(&self.shared.host_veth(self.id)) {
                errors.push(e);
            }
            // A partition ends with the VM's network: a resumed VM comes back connected.
            if let Err(e) = self.shared.set_cut(self.id, false) {
                errors.push(e);
            }
            match run("ip", &["netns", "delete", &self.shared.netns(self.id)]) {
                Ok(_) => self.netns = false,
                Err(e) => errors.push(e),
            }
        }
        if self.overlay {
            match umount(&self.dir().join("root")) {
                Ok(()) => self.overlay = false,
                Err(e) => errors.push(e),
            }
        }
        if destroy && !self.overlay {
            for d in ["disk", "root", "cd"] {
                let p = self.dir().join(d);
                if p.exists() {
                    if let Err(e) = fs::remove_dir_all(&p) {
                        errors.push(format!("{}: {e}", p.display()));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn reap(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                tracing::info!(vm = self.id, "machine exited: {st}");
                // Whatever of the machine outlived nspawn goes with it.
                if let Err(e) = kill_cgroup(&self.shared.vm_cgroup(self.id)) {
                    tracing::error!(vm = self.id, "{e}");
                }
                self.child = None;
                self.set_status(|s| s.pid = None);
                // nspawn exits 133 when the guest reboots itself: a VM boots again.
                if st.code() == Some(NSPAWN_REBOOTED) && self.overlay && self.netns {
                    let r = self.spawn();
                    self.report("cannot boot again after the guest's reboot", r);
                }
            }
        }
    }

    fn signal_all(&self, sig: Signal) -> bool {
        let Some(c) = &self.child else { return false };
        for p in descendants(c.id()) {
            let _ = kill(Pid::from_raw(p as i32), sig);
        }
        true
    }

    fn report(&self, what: &str, r: Result<(), String>) {
        if let Err(e) = r {
            tracing::error!(vm = self.id, "{what}: {e}");
            self.set_status(|s| s.error = Some(format!("{what}: {e}")));
        }
    }

    fn work(mut self, rx: mpsc::Receiver<Cmd>) {
        loop {
            let cmd = match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.reap();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => Cmd::Shutdown { hard: true },
            };
            match cmd {
                Cmd::Start(spec) => {
                    self.stop_machine(false);
                    let r = self.start(&spec);
                    self.report("cannot boot", r);
                }
                Cmd::Restart(spec) => {
                    self.stop_machine(false);
                    let r = if self.overlay && self.netns {
                        self.write_cd(&spec).and_then(|_| self.spawn())
                    } else {
                        self.start(&spec)
                    };
                    self.report("cannot reboot", r);
                }
                Cmd::Stop { destroy } => {
                    let r = self.teardown(destroy, false);
                    self.report("cannot stop", r);
                }
                Cmd::Fail(msg) => self.report("cannot boot", Err(msg)),
                Cmd::Reboot(spec, hard) => {
                    let r = self.reboot(&spec, hard);
                    self.report("cannot reboot", r);
                }
                Cmd::Crash(reply) => {
                    let ran = match self.child.take() {
                        Some(mut c) => {
                            self.kill_hard(&mut c);
                            self.set_status(|s| s.pid = None);
                            true
                        }
                        None => false,
                    };
                    if let Some(reply) = reply {
                        let _ = reply.send(ran);
                    }
                }
                Cmd::Signal(sig, reply) => {
                    let _ = reply.send(self.signal_all(sig));
                }
                Cmd::Shutdown { hard } => {
                    let r = self.teardown(false, hard);
                    self.report("cannot shut down", r);
                    return;
                }
            }
        }
    }
}

fn umount(p: &Path) -> Result<(), String> {
    // A machine's processes may still be leaving: retry briefly.
    let mut last = String::new();
    for _ in 0..20 {
        match run("umount", &[p]) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

impl Machines {
    /// A runtime with nothing running yet; [`preflight`] first. It takes the base directory
    /// (one runtime per base directory: another live one is refused) and first removes what
    /// a dead runtime of the same base directory left on the host ([`sweep`]).
    pub fn new(cfg: MachineConfig) -> Result<Machines, String> {
        fs::create_dir_all(&cfg.base_dir)
            .map_err(|e| format!("{}: {e}", cfg.base_dir.display()))?;
        option_safe(&cfg.base_dir)?;
        let base = fs::canonicalize(&cfg.base_dir)
            .map_err(|e| format!("{}: {e}", cfg.base_dir.display()))?;
        let cfg = MachineConfig {
            base_dir: base.clone(),
            ..cfg
        };
        let lock_path = base.join(LOCK);
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        // Released by the kernel when this process dies, however it dies.
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| match e {
                nix::errno::Errno::EWOULDBLOCK => format!(
                    "base directory {} is in use by another onesim's image runtime",
                    base.display()
                ),
                e => format!("{}: {e}", lock_path.display()),
            })?;
        let record = base.join(RECORD);
        match fs::read_to_string(&record) {
            Ok(text) => {
                let old: Record = serde_json::from_str(&text)
                    .map_err(|e| format!("{}: {e}", record.display()))?;
                let swept = sweep(&base, &old);
                for (what, list) in [("removed", &swept.removed), ("kept", &swept.kept)] {
                    if !list.is_empty() {
                        tracing::warn!(
                            "image runtime: {what} what a dead onesim of {} left: {}",
                            base.display(),
                            list.join("; ")
                        );
                    }
                }
                if !swept.failed.is_empty() {
                    return Err(format!(
                        "{}: a dead onesim's leftovers could not all be removed: {}",
                        record.display(),
                        swept.failed.join("; ")
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", record.display())),
        }
        let (mnt, own) = own_cgroup2()?;
        let tag = free_tag(&mnt.join(own.trim_start_matches('/')))?;
        let cgroup_rel = format!("{own}/onesim-{tag}");
        let cgroup = mnt.join(cgroup_rel.trim_start_matches('/'));
        let shared = Shared {
            cfg,
            tag,
            cgroup,
            cgroup_rel,
            host: Mutex::new(Host::default()),
            _lock: lock,
        };
        shared.save_record(&shared.host(), None)?;
        fs::create_dir(&shared.cgroup)
            .map_err(|e| format!("cgroup {}: {e}", shared.cgroup.display()))?;
        if !shared.cgroup.join("cgroup.kill").exists() {
            let _ = fs::remove_dir(&shared.cgroup);
            return Err(format!(
                "cgroup {} has no cgroup.kill: the image runtime needs Linux 5.14 or later",
                shared.cgroup.display()
            ));
        }
        Ok(Machines {
            shared: Arc::new(shared),
            workers: Mutex::new(HashMap::new()),
        })
    }

    /// This runtime's tag: in its namespace (`onesim-<tag>-<id>`) and veth (`one<tag>-<id>`) names.
    pub fn tag(&self) -> &str {
        &self.shared.tag
    }

    pub fn vm_dir(&self, id: i64) -> PathBuf {
        self.shared.vm_dir(id)
    }

    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Worker>> {
        self.workers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, id: i64, cmd: Cmd) {
        let mut w = self.workers();
        let worker = w.entry(id).or_insert_with(|| {
            let (tx, rx) = mpsc::channel();
            let status = Arc::new(Mutex::new(MachineStatus::default()));
            let vm = Vm {
                id,
                shared: self.shared.clone(),
                status: status.clone(),
                netns: false,
                overlay: false,
                child: None,
            };
            let thread = std::thread::Builder::new()
                .name(format!("onesim-vm-{id}"))
                .spawn(move || vm.work(rx))
                .expect("spawning a thread");
            Worker { tx, thread, status }
        });
        let _ = worker.tx.send(cmd);
    }

    /// Boots the machine (stopping a previous one first).
    pub fn start(&self, spec: MachineSpec) {
        self.send(spec.id, Cmd::Start(Box::new(spec)));
    }

    /// Reboots with a fresh CD (reboot, or a CONTEXT change).
    pub fn restart(&self, spec: MachineSpec) {
        self.send(spec.id, Cmd::Restart(Box::new(spec)));
    }

    /// Stops the machine; `destroy` (the VM is DONE) removes its disk too.
    pub fn stop(&self, id: i64, destroy: bool) {
        if self.workers().contains_key(&id) {
            self.send(id, Cmd::Stop { destroy });
        }
    }

    /// A boot that cannot even be described (no DISK, no NIC, …): recorded like a failed boot.
    pub fn fail(&self, id: i64, msg: String) {
        self.send(id, Cmd::Fail(msg));
    }

    fn ask(&self, id: i64, cmd: impl FnOnce(mpsc::Sender<bool>) -> Cmd) -> bool {
        let (tx, rx) = mpsc::channel();
        {
            let w = self.workers();
            let Some(worker) = w.get(&id) else {
                return false;
            };
            if worker.tx.send(cmd(tx)).is_err() {
                return false;
            }
        }
        rx.recv().unwrap_or(false)
    }

    /// Kills the machine hard (fault injection); the VM keeps its state and its disk.
    pub fn crash(&self, id: i64) -> bool {
        self.ask(id, |r| Cmd::Crash(Some(r)))
    }

    /// Kills the machine at once, without waiting (the `-hard` actions; a `stop` follows).
    pub fn kill(&self, id: i64) {
        if self.workers().contains_key(&id) {
            self.send(id, Cmd::Crash(None));
        }
    }

    /// `reboot`: the machine's init reboots in order (SIGINT, as Ctrl-Alt-Del), and boots
    /// again on the same disk; `hard` (`reboot-hard`, a reset): killed and booted again.
    pub fn reboot(&self, spec: MachineSpec, hard: bool) {
        self.send(spec.id, Cmd::Reboot(Box::new(spec), hard));
    }

    /// Signals every process of the machine (freeze/thaw).
    pub fn signal(&self, id: i64, sig: Signal) -> bool {
        self.ask(id, |r| Cmd::Signal(sig, r))
    }

    /// The network-partition fault: every frame to and from VM `id` is dropped where its
    /// veth meets the bridge (`cut`), or passes again. The machine runs on, cut off from
    /// OneGate, the SuperLink and every peer, as behind a failed link; TCP peers see
    /// silence, not resets. `Ok(false)`: VM `id` has no machine with a network now.
    /// Shown by `flower_image_edge_node_partitioned_rejoins_without_replacement`.
    pub fn partition(&self, id: i64, cut: bool) -> Result<bool, String> {
        if !Path::new("/sys/class/net")
            .join(self.shared.host_veth(id))
            .exists()
        {
            return Ok(false);
        }
        self.shared.set_cut(id, cut)?;
        Ok(true)
    }

    /// Whether VM `id` is cut off by the partition fault.
    pub fn partitioned(&self, id: i64) -> bool {
        self.shared.host().cut.contains(&id)
    }

    pub fn status(&self, id: i64) -> Option<MachineStatus> {
        self.workers()
            .get(&id)
            .map(|w| w.status.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// VMs whose machine runs and has not been seen READY yet.
    pub fn awaiting_ready(&self) -> Vec<i64> {
        self.workers()
            .iter()
            .filter(|(_, w)| {
                let s = w.status.lock().unwrap_or_else(|e| e.into_inner());
                s.pid.is_some() && s.ready_after.is_none()
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Records and prints boot → READY and the memory of a machine that just became READY.
    pub fn note_ready(&self, id: i64) {
        let w = self.workers();
        let Some(worker) = w.get(&id) else { return };
        let mut s = worker.status.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(pid), Some(booted), None) = (s.pid, s.booted, s.ready_after) else {
            return;
        };
        let after = booted.elapsed();
        let mem = machine_rss(pid);
        s.ready_after = Some(after);
        s.memory_bytes = Some(mem);
        tracing::info!(
            vm = id,
            "machine READY {:.1} s after boot, memory {} MiB (RSS of its processes)",
            after.as_secs_f64(),
            mem >> 20
        );
    }

    /// Stops every machine (orderly, or SIGKILL when `hard`) and removes every mount, loop
    /// device, namespace, veth and created bridge. Disks stay. Idempotent.
    pub fn shutdown(&self, hard: bool) -> Result<(), String> {
        let workers: Vec<Worker> = self.workers().drain().map(|(_, w)| w).collect();
        for w in &workers {
            let _ = w.tx.send(Cmd::Shutdown { hard });
        }
        for w in workers {
            let _ = w.thread.join();
        }
        let mut errors = Vec::new();
        let mut host = self.shared.host();
        for (_, l) in host.lowers.drain() {
            if let Err(e) = umount(&l.mnt) {
                errors.push(e);
                continue;
            }
            let _ = fs::remove_dir(&l.mnt);
            if let Err(e) = run("losetup", &["-d", &l.loop_dev]) {
                errors.push(e);
            }
        }
        for (br, _) in host.bridges.drain() {
            if let Err(e) = delete_link(&br) {
                errors.push(e);
            }
        }
        if host.partition_table {
            match delete_partition_table(&self.shared.tag) {
                Ok(()) => {
                    host.partition_table = false;
                    host.cut.clear();
                }
                Err(e) => errors.push(e),
            }
        }
        if let Err(e) = kill_cgroup(&self.shared.cgroup) {
            errors.push(e);
        }
        if errors.is_empty() {
            // Nothing left to sweep.
            match fs::remove_file(self.shared.cfg.base_dir.join(RECORD)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    errors.push(format!("{RECORD}: {e}"))
                }
                _ => {}
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl Drop for Machines {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(true) {
            tracing::error!("image runtime teardown: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_are_checked_before_use() {
        assert!(valid_ifname("onebr0") && valid_ifname("br-flower.1"));
        assert!(!valid_ifname("") && !valid_ifname("a-very-long-bridge0") && !valid_ifname("br 0"));
        assert!(!valid_ifname("br0;reboot") && !valid_ifname("../x"));
        assert!(
            valid_mac("02:00:0a:0a:00:0a")
                && !valid_mac("02:00:0a:0a:00")
                && !valid_mac("02:00:0a:0a:00:zz")
        );
        assert!(option_safe(Path::new("/tmp/a,upperdir=/")).is_err());
        assert!(option_safe(Path::new("/tmp/a:b")).is_err());
        assert_eq!(
            option_safe(Path::new("/tmp/vm-1/root")).unwrap(),
            "/tmp/vm-1/root"
        );
    }

    #[test]
    fn the_root_partition_is_the_largest_mbr_or_gpt_partition() {
        let dir = tempfile::tempdir().unwrap();
        // MBR: a 1 MiB partition at sector 2048 and a 2 MiB one after it.
        let mbr = dir.path().join("mbr.raw");
        let mut d = vec![0u8; 8 << 20];
        let entry = |d: &mut Vec<u8>, i: usize, ty: u8, start: u32, count: u32| {
            let o = 446 + 16 * i;
            d[o + 4] = ty;
            d[o + 8..o + 12].copy_from_slice(&start.to_le_bytes());
            d[o + 12..o + 16].copy_from_slice(&count.to_le_bytes());
        };
        entry(&mut d, 0, 0x83, 2048, 2048);
        entry(&mut d, 1, 0x83, 4096, 4096);
        d[510] = 0x55;
        d[511] = 0xaa;
        fs::write(&mbr, &d).unwrap();
        assert_eq!(root_partition(&mbr).unwrap(), (4096 * 512, 4096 * 512));
        // GPT behind a protective MBR: entries at LBA 2.
        let gpt = dir.path().join("gpt.raw");
        let mut d = vec![0u8; 8 << 20];
        entry(&mut d, 0, 0xee, 1, 16383);
        d[510] = 0x55;
        d[511] = 0xaa;
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        d[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let gentry = |d: &mut Vec<u8>, i: usize, first: u64, last: u64| {
            let o = 1024 + 128 * i;
            d[o] = 1;
            d[o + 32..o + 40].copy_from_slice(&first.to_le_bytes());
            d[o + 40..o + 48].copy_from_slice(&last.to_le_bytes());
        };
        gentry(&mut d, 0, 2048, 4095);
        gentry(&mut d, 1, 4096, 14335);
        fs::write(&gpt, &d).unwrap();
        assert_eq!(root_partition(&gpt).unwrap(), (4096 * 512, 10240 * 512));
        // No table: the whole file is the filesystem.
        let bare = dir.path().join("bare.raw");
        fs::write(&bare, vec![0u8; 4096]).unwrap();
        assert_eq!(root_partition(&bare).unwrap(), (0, 4096));
        // A partition past the end of the disk is refused.
        let bad = dir.path().join("bad.raw");
        let mut d = vec![0u8; 1 << 20];
        entry(&mut d, 0, 0x83, 2048, 1 << 20);
        d[510] = 0x55;
        d[511] = 0xaa;
        fs::write(&bad, &d).unwrap();
        assert!(root_partition(&bad)
            .unwrap_err()
            .contains("no partition inside the disk"));
    }

    #[test]
    fn images_must_exist_and_be_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.qcow2");
        assert_eq!(
            check_qcow2(&missing).unwrap_err(),
            format!("image file {} not found", missing.display())
        );
        let raw = dir.path().join("disk.raw");
        fs::write(&raw, b"not a qcow2").unwrap();
        assert_eq!(
            check_qcow2(&raw).unwrap_err(),
            format!("image file {} is not a qcow2 image", raw.display())
        );
        let q = dir.path().join("disk.qcow2");
        fs::write(&q, b"QFI\xfb\0\0\0\x03").unwrap();
        assert!(check_qcow2(&q).is_ok());
    }

    #[test]
    fn nspawn_boots_with_its_own_network_and_the_cd_at_context() {
        let argv: Vec<String> = nspawn_argv("/b/vm-3/root", "one-3", "onesim-ab12-3", "/b/vm-3/cd")
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        for want in [
            "--boot",
            "--keep-unit",
            "--register=no",
            "--directory=/b/vm-3/root",
            "--machine=one-3",
            "--network-namespace-path=/run/netns/onesim-ab12-3",
            "--bind-ro=/b/vm-3/cd:/context",
        ] {
            assert!(argv.iter().any(|a| a == want), "{want} missing in {argv:?}");
        }
    }

    /// The sweep acts only on what the record proves the dead runtime's: a foreign tag,
    /// cgroup, loop device or non-bridge named in a record is kept, untouched.
    /// (Root: it reads the cgroup2 mount and the host's links.)
    #[test]
    fn the_sweep_touches_only_what_the_record_proves_ours() {
        let base = tempfile::tempdir().unwrap();
        let bad_tag = Record {
            tag: "zz;x".into(),
            ..Record::default()
        };
        let swept = sweep(base.path(), &bad_tag);
        assert!(swept.removed.is_empty() && swept.failed.is_empty());
        assert!(
            swept.kept[0].contains("is not one onesim writes"),
            "{swept:?}"
        );
        let Ok((mnt, _)) = own_cgroup2() else {
            panic!("no cgroup2 hierarchy: the image runtime's tests need one");
        };
        let foreign = mnt.join(format!("h2-foreign-{}", std::process::id()));
        fs::create_dir(&foreign).unwrap();
        let rec = Record {
            tag: "ab12".into(),
            cgroup: foreign.clone(),
            bridges: [("lo".to_string(), Ipv4Addr::LOCALHOST)].into(),
            loops: [("/dev/sda".to_string(), PathBuf::from("/x.raw"))].into(),
            partition_table: false,
        };
        let swept = sweep(base.path(), &rec);
        let still = foreign.is_dir();
        fs::remove_dir(&foreign).unwrap();
        assert!(still, "a cgroup not named onesim-<tag> was removed");
        assert!(
            swept.removed.is_empty() && swept.failed.is_empty(),
            "{swept:?}"
        );
        assert_eq!(
            swept.kept,
            [
                format!("cgroup {}: not this onesim's", foreign.display()),
                "loop device \"/dev/sda\": not a loop device".to_string(),
                "lo: not a bridge".to_string(),
            ]
        );
        assert!(Path::new("/sys/class/net/lo").exists());
    }

    fn guest() -> crate::guest::GuestSpec {
        crate::guest::GuestSpec {
            id: 7,
            ip: "10.10.0.10".into(),
            token: "tok".into(),
            endpoint: "http://10.10.0.1:5030".into(),
            context: vec![("ETH0_IP".into(), "10.10.0.10".into())],
            disk_source: Some(PathBuf::from("/ds/1/abc")),
            nics: vec![crate::guest::GuestNic {
                nic_id: 0,
                ip: "10.10.0.10".into(),
                mac: "02:00:0a:0a:00:0a".into(),
                bridge: "onebr7".into(),
                gateway: Some("10.10.0.1".into()),
                mask: Some("255.255.255.0".into()),
                prefix_len: 24,
            }],
        }
    }

    /// A VM maps onto its first disk and NIC; one that cannot boot says why, naming the VM.
    #[test]
    fn a_vm_without_disk_nic_or_gateway_is_refused_clearly() {
        let m = MachineSpec::from_guest(&guest()).unwrap();
        assert_eq!(m.image, PathBuf::from("/ds/1/abc"));
        assert_eq!(
            m.nic,
            MachineNic {
                ip: Ipv4Addr::new(10, 10, 0, 10),
                prefix: 24,
                mac: "02:00:0a:0a:00:0a".into(),
                bridge: "onebr7".into(),
                gateway: Ipv4Addr::new(10, 10, 0, 1),
            }
        );
        assert_eq!(m.cd[0].0, "context.sh");
        assert_eq!(m.cd[1], ("token.txt".to_string(), "tok".to_string()));
        let err = |f: &dyn Fn(&mut crate::guest::GuestSpec)| {
            let mut g = guest();
            f(&mut g);
            MachineSpec::from_guest(&g).unwrap_err()
        };
        assert_eq!(
            err(&|g| g.disk_source = None),
            "VM 7 has no DISK with an image: the image runtime boots the first disk"
        );
        assert_eq!(
            err(&|g| g.nics.clear()),
            "VM 7 has no NIC: the image runtime plugs NIC 0 into its network's bridge"
        );
        assert_eq!(
            err(&|g| g.nics[0].gateway = None),
            "VM 7: NIC 0's network has no GATEWAY: the image runtime gives bridge onebr7 that address"
        );
        assert_eq!(
            err(&|g| g.nics[0].gateway = Some("10.11.0.1".into())),
            "VM 7: GATEWAY 10.11.0.1 is not another address of NIC 0's network 10.10.0.10/24"
        );
        assert_eq!(
            err(&|g| g.nics[0].bridge.clear()),
            "VM 7: NIC 0's network has no BRIDGE"
        );
    }
}
