//! `flower-agent context`: a minimal one-context for images without the one-context package
//! (the offline image). It reads the OpenNebula CONTEXT CD and does what one-context does
//! for these appliances, nothing more.
//!
//! Owns: finding and mounting the CD (ISO 9660 labelled `CONTEXT`, or its files in `/context`), parsing `context.sh`
//! (`KEY='value'`, OpenNebula's quoting) and `token.txt`, the static or DHCP network of
//! every `ETH<n>` (systemd-networkd files in `/run/systemd/network`), `/etc/resolv.conf`,
//! the hostname, root's `authorized_keys`, and `/run/one-context/one_env` (mode 0400, with
//! `TOKENTXT`) that the agent and the one-apps lifecycle read.
//! Must not: run a shell, or let a context value reach a file without its allow-list
//! (IP addresses parse as IPs, MACs and hostnames match patterns, SSH keys are checked per
//! line). An invalid value is skipped with a warning naming the variable.
//! Covered (one-context script in brackets): network `ETH<n>_IP/_MASK/_GATEWAY/_DNS/_MAC/
//! _METHOD` with `static` and `dhcp` [loc-10-network], `SET_HOSTNAME` [net-15-hostname],
//! `SSH_PUBLIC_KEY` [loc-22-ssh_public_key], the exported environment with `TOKENTXT`
//! [loc-16-gen-env]. `READY=YES` is not sent here: the agent publishes it with `FL_READY`
//! once Flower serves, as one-apps' net-99-report-ready does after the bootstrap.
//! Not covered: IPv6 (`ETH<n>_IP6*`), aliases, VLANs and bonding, `_MTU`/`_METRIC`/routes,
//! `DNS_HOSTNAME`/`EC2_HOSTNAME`, `USERNAME`/`PASSWORD`/`CRYPTED_PASSWORD`, `START_SCRIPT*`,
//! `INIT_SCRIPTS`, `FILES_DS`, `GROW_FS`, `TIMEZONE`, `SET_HOST`, swap, and re-running on a
//! CONTEXT change (hot-plugged CD): the unit runs once per boot.
//! Caveats: the CD is looked for by label (udev) or as files already in `/context` (one-context's
//! own fallback; onesim's image runtime bind-mounts them there) for a while, then at `/dev/sr0`
//! (`find_context`, shown by `context_lookup_follows_one_context`).

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;

use super::context::{one_env_text, parse_one_env};
use super::error::IoError;
use super::paths::Paths;

/// Largest `context.sh` read (OpenNebula's own contexts are a few KiB; files go elsewhere).
pub const MAX_CONTEXT_BYTES: u64 = 1 << 20;
/// The directory one-context reads when no CONTEXT device exists ([`find_context`]).
pub const CONTEXT_DIR: &str = "/context";
/// NICs configured: `ETH0` … `ETH7`.
const MAX_NICS: usize = 8;

/// Why contextualization failed.
#[derive(Debug, thiserror::Error)]
pub enum ContextCdError {
    /// No CONTEXT CD appeared.
    #[error("no CONTEXT CD found (looked for /dev/disk/by-label/CONTEXT, /context/context.sh and /dev/sr0)")]
    NoCd,
    /// `mount`/`umount` failed.
    #[error("{0}")]
    Mount(String),
    /// A file larger than [`MAX_CONTEXT_BYTES`].
    #[error("{}: larger than {MAX_CONTEXT_BYTES} bytes", .0.display())]
    TooLarge(PathBuf),
    /// `context.sh` is not UTF-8.
    #[error("{}: not UTF-8", .0.display())]
    NotUtf8(PathBuf),
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] IoError),
}

static MAC_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$").expect("static regex"));
static HOSTNAME_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
        .expect("static regex")
});
static SSH_KEY_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) [A-Za-z0-9+/]+={0,3}( [\x20-\x7e]*)?$",
    )
    .expect("static regex")
});

/// One NIC's configuration, every value validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// `ETH<index>`.
    pub index: usize,
    /// Matched by MAC when given (OpenNebula always gives it); else by kernel order.
    pub mac: Option<String>,
    /// Static address and prefix, or `None` for DHCP.
    pub address: Option<(IpAddr, u8)>,
    /// Default gateway (static only).
    pub gateway: Option<IpAddr>,
    /// DNS servers.
    pub dns: Vec<IpAddr>,
}

/// What the context asks of the guest, validated. Warnings name the skipped variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestPlan {
    /// Configured NICs.
    pub nics: Vec<Nic>,
    /// `SET_HOSTNAME`.
    pub hostname: Option<String>,
    /// Accepted `SSH_PUBLIC_KEY` lines.
    pub ssh_keys: Vec<String>,
    /// Skipped values (`VAR: reason`), never the value itself.
    pub warnings: Vec<String>,
}

fn mask_prefix(mask: &str) -> Option<u8> {
    if let Ok(n) = mask.parse::<u8>() {
        return (n <= 32).then_some(n);
    }
    let bits = u32::from(mask.parse::<Ipv4Addr>().ok()?);
    // A netmask is ones then zeros.
    (bits.leading_ones() + bits.trailing_zeros() == 32).then_some(bits.leading_ones() as u8)
}

/// The guest plan for a parsed context (pure; tests feed it variables directly).
pub fn plan(vars: &BTreeMap<String, String>) -> GuestPlan {
    let mut p = GuestPlan::default();
    let get = |k: &str| vars.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    for index in 0..MAX_NICS {
        let var = |s: &str| format!("ETH{index}_{s}");
        let ip = get(&var("IP"));
        let method = get(&var("METHOD")).map(str::to_ascii_lowercase);
        let mac = get(&var("MAC"));
        if ip.is_none() && mac.is_none() && method.is_none() {
            continue;
        }
        let mac = match mac {
            Some(m) if MAC_RE.is_match(m) => Some(m.to_ascii_lowercase()),
            Some(_) => {
                p.warnings
                    .push(format!("{}: not a MAC address", var("MAC")));
                continue;
            }
            None => None,
        };
        let dns = get(&var("DNS"))
            .or_else(|| get("DNS"))
            .map(|d| {
                d.split_whitespace()
                    .filter_map(|s| s.parse::<IpAddr>().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let mut nic = Nic {
            index,
            mac,
            address: None,
            gateway: None,
            dns,
        };
        if method.as_deref() != Some("dhcp") {
            let Some(ip) = ip.and_then(|v| v.parse::<IpAddr>().ok()) else {
                p.warnings
                    .push(format!("{}: missing or not an IP address", var("IP")));
                continue;
            };
            let prefix = match get(&var("MASK")) {
                Some(m) => match mask_prefix(m) {
                    Some(n) => n,
                    None => {
                        p.warnings.push(format!("{}: not a netmask", var("MASK")));
                        continue;
                    }
                },
                None => 24,
            };
            nic.address = Some((ip, prefix));
            nic.gateway = match get(&var("GATEWAY")) {
                Some(g) => match g.parse::<IpAddr>() {
                    Ok(g) => Some(g),
                    Err(_) => {
                        p.warnings
                            .push(format!("{}: not an IP address", var("GATEWAY")));
                        None
                    }
                },
                None => None,
            };
        }
        p.nics.push(nic);
    }
    match get("SET_HOSTNAME") {
        Some(h) if h.len() <= 253 && HOSTNAME_RE.is_match(h) => p.hostname = Some(h.to_string()),
        Some(_) => p
            .warnings
            .push("SET_HOSTNAME: not a valid host name".to_string()),
        None => {}
    }
    if let Some(keys) = get("SSH_PUBLIC_KEY") {
        for (n, line) in keys.lines().map(str::trim).enumerate() {
            if line.is_empty() {
                continue;
            }
            if SSH_KEY_RE.is_match(line) {
                p.ssh_keys.push(line.to_string());
            } else {
                p.warnings.push(format!(
                    "SSH_PUBLIC_KEY line {}: not an OpenSSH public key",
                    n + 1
                ));
            }
        }
    }
    p
}

/// The systemd-networkd file of one NIC. `fallback_name` matches when there is no MAC.
pub fn network_file(nic: &Nic, fallback_name: &str) -> String {
    let mut s = String::from("# Written by flower-agent context (OpenNebula CONTEXT).\n[Match]\n");
    match &nic.mac {
        Some(mac) => s.push_str(&format!("MACAddress={mac}\n")),
        None => s.push_str(&format!("Name={fallback_name}\n")),
    }
    s.push_str("\n[Network]\n");
    match nic.address {
        Some((ip, prefix)) => {
            s.push_str(&format!("Address={ip}/{prefix}\n"));
            if let Some(g) = nic.gateway {
                s.push_str(&format!("Gateway={g}\n"));
            }
        }
        None => s.push_str("DHCP=yes\n"),
    }
    for d in &nic.dns {
        s.push_str(&format!("DNS={d}\n"));
    }
    s
}

/// `/etc/resolv.conf` for the DNS servers of every NIC (first occurrence order).
pub fn resolv_conf(nics: &[Nic]) -> Option<String> {
    let mut seen = Vec::new();
    for d in nics.iter().flat_map(|n| &n.dns) {
        if !seen.contains(d) {
            seen.push(*d);
        }
    }
    (!seen.is_empty()).then(|| {
        let mut s = String::from("# Written by flower-agent context (OpenNebula CONTEXT).\n");
        for d in seen {
            s.push_str(&format!("nameserver {d}\n"));
        }
        s
    })
}

fn read_limited(path: &Path) -> Result<Option<String>, ContextCdError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(IoError::at(path)(e).into()),
    };
    if meta.len() > MAX_CONTEXT_BYTES {
        return Err(ContextCdError::TooLarge(path.to_path_buf()));
    }
    let bytes = fs::read(path).map_err(IoError::at(path))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| ContextCdError::NotUtf8(path.to_path_buf()))
}

/// Reads `context.sh` and `token.txt` from a directory (the mounted CD). Returns the
/// variables (with `TOKENTXT` when the token file exists) and parser warnings.
pub fn read_dir(dir: &Path) -> Result<(BTreeMap<String, String>, Vec<String>), ContextCdError> {
    let ctx_path = dir.join("context.sh");
    let text = read_limited(&ctx_path)?.ok_or_else(|| {
        IoError::at(&ctx_path)(std::io::Error::from(std::io::ErrorKind::NotFound))
    })?;
    let (ctx, warnings) = parse_one_env(&text, &ctx_path.display().to_string());
    let mut vars: BTreeMap<String, String> = ctx.vars().clone();
    if let Some(token) = read_limited(&dir.join("token.txt"))? {
        let token = token.trim();
        if !token.is_empty() {
            vars.insert("TOKENTXT".into(), token.to_string());
        }
    }
    Ok((vars, warnings))
}

fn write(path: &Path, content: &str, mode: u32) -> Result<(), IoError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(IoError::at(dir))?;
    }
    // Write beside and rename: a reader never sees half a file.
    let tmp = path.with_extension("flower-agent-tmp");
    fs::write(&tmp, content).map_err(IoError::at(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(IoError::at(&tmp))?;
    fs::rename(&tmp, path).map_err(IoError::at(path))
}

/// Ethernet interfaces in kernel order (`/sys/class/net`, loopback and virtual ones left out).
fn ethernet_names(paths: &Paths) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(paths.at("/sys/class/net"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("device").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Applies `vars` under `paths`: network files, resolv.conf, hostname, authorized_keys and
/// one_env. Returns the warnings (invalid values skipped). Idempotent: every file is
/// rewritten whole; authorized_keys keeps existing lines and adds missing keys.
pub fn apply(
    paths: &Paths,
    vars: &BTreeMap<String, String>,
    set_kernel_hostname: bool,
) -> Result<Vec<String>, ContextCdError> {
    let p = plan(vars);
    let names = ethernet_names(paths);
    let net_dir = paths.at("/run/systemd/network");
    for nic in &p.nics {
        let fallback = names
            .get(nic.index)
            .cloned()
            .unwrap_or_else(|| format!("eth{}", nic.index));
        write(
            &net_dir.join(format!("10-one-eth{}.network", nic.index)),
            &network_file(nic, &fallback),
            0o644,
        )?;
    }
    if let Some(resolv) = resolv_conf(&p.nics) {
        let path = paths.at("/etc/resolv.conf");
        // A dangling symlink (resolved absent) would make the write fail.
        let _ = fs::remove_file(&path);
        write(&path, &resolv, 0o644)?;
    }
    if let Some(h) = &p.hostname {
        write(&paths.at("/etc/hostname"), &format!("{h}\n"), 0o644)?;
        if set_kernel_hostname {
            nix::unistd::sethostname(h)
                .map_err(|e| IoError::at("/proc/sys/kernel/hostname")(std::io::Error::from(e)))?;
        }
    }
    if !p.ssh_keys.is_empty() {
        let path = paths.at("/root/.ssh/authorized_keys");
        let dir = paths.at("/root/.ssh");
        fs::create_dir_all(&dir).map_err(IoError::at(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(IoError::at(&dir))?;
        let mut text = fs::read_to_string(&path).unwrap_or_default();
        for k in &p.ssh_keys {
            if !text.lines().any(|l| l.trim() == k) {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(k);
                text.push('\n');
            }
        }
        write(&path, &text, 0o600)?;
    }
    // Root-only: it holds the OneGate token.
    write(
        &paths.at("/run/one-context/one_env"),
        &one_env_text(vars),
        0o400,
    )?;
    Ok(p.warnings)
}

/// Where the context is: the CD's device, or a directory already holding its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextSource {
    /// The CD's block device, to mount.
    Device(PathBuf),
    /// A directory holding `context.sh` (and `token.txt`), read in place.
    Dir(PathBuf),
}

/// one-context's lookup (`get_new_context` in one-apps' `one-contextd`): the device
/// labelled CONTEXT first, else a `/context` directory holding the CD's files (the layout
/// OpenNebula's container drivers use, and onesim's image runtime bind-mounts read-only),
/// else, once `wait` has passed, the first CD drive. A real VM mounts the CD itself.
pub fn find_context(paths: &Paths, wait: Duration) -> Option<ContextSource> {
    let by_label = paths.at("/dev/disk/by-label/CONTEXT");
    let dir = paths.at(CONTEXT_DIR);
    let sr0 = paths.at("/dev/sr0");
    let deadline = std::time::Instant::now() + wait;
    loop {
        if by_label.exists() {
            return Some(ContextSource::Device(by_label));
        }
        if dir.join("context.sh").is_file() {
            return Some(ContextSource::Dir(dir));
        }
        if std::time::Instant::now() >= deadline {
            return sr0.exists().then_some(ContextSource::Device(sr0));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn run(argv: &[&str]) -> Result<(), ContextCdError> {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| ContextCdError::Mount(format!("{}: {e}", argv[0])))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ContextCdError::Mount(format!(
            "{} failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Finds the context ([`find_context`]) and reads it: a directory in place, a CD mounted
/// read-only, read and unmounted.
pub fn read_cd(
    paths: &Paths,
    wait: Duration,
) -> Result<(BTreeMap<String, String>, Vec<String>), ContextCdError> {
    let dev = match find_context(paths, wait).ok_or(ContextCdError::NoCd)? {
        ContextSource::Dir(dir) => return read_dir(&dir),
        ContextSource::Device(dev) => dev,
    };
    let mnt = paths.at("/run/flower-agent/context-cd");
    fs::create_dir_all(&mnt).map_err(IoError::at(&mnt))?;
    let (dev_s, mnt_s) = (dev.display().to_string(), mnt.display().to_string());
    run(&[
        "/bin/mount",
        "-t",
        "iso9660",
        "-o",
        "ro,nosuid,nodev,noexec",
        &dev_s,
        &mnt_s,
    ])?;
    let read = read_dir(&mnt);
    let unmounted = run(&["/bin/umount", &mnt_s]);
    let read = read?;
    unmounted?;
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn static_and_dhcp_nics_become_networkd_files() {
        let p = plan(&vars(&[
            ("ETH0_IP", "10.0.2.15"),
            ("ETH0_MASK", "255.255.255.0"),
            ("ETH0_GATEWAY", "10.0.2.2"),
            ("ETH0_DNS", "10.0.2.3 1.1.1.1 not-an-ip"),
            ("ETH0_MAC", "02:00:0A:00:02:0F"),
            ("ETH1_METHOD", "DHCP"),
            ("ETH1_MAC", "02:00:0a:00:03:01"),
        ]));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(
            network_file(&p.nics[0], "ens3"),
            "# Written by flower-agent context (OpenNebula CONTEXT).\n[Match]\n\
             MACAddress=02:00:0a:00:02:0f\n\n[Network]\nAddress=10.0.2.15/24\n\
             Gateway=10.0.2.2\nDNS=10.0.2.3\nDNS=1.1.1.1\n"
        );
        assert_eq!(
            network_file(&p.nics[1], "ens4"),
            "# Written by flower-agent context (OpenNebula CONTEXT).\n[Match]\n\
             MACAddress=02:00:0a:00:03:01\n\n[Network]\nDHCP=yes\n"
        );
        assert_eq!(
            resolv_conf(&p.nics).unwrap(),
            "# Written by flower-agent context (OpenNebula CONTEXT).\n\
             nameserver 10.0.2.3\nnameserver 1.1.1.1\n"
        );
    }

    #[test]
    fn masks_in_both_notations_and_bad_values_are_skipped_by_name() {
        assert_eq!(mask_prefix("255.255.240.0"), Some(20));
        assert_eq!(mask_prefix("16"), Some(16));
        assert_eq!(mask_prefix("255.0.255.0"), None);
        assert_eq!(mask_prefix("33"), None);
        let p = plan(&vars(&[
            ("ETH0_IP", "10.0.0.5\nAddress=1.2.3.4/8"),
            ("ETH1_IP", "10.0.1.5"),
            ("ETH1_MAC", "02:00:0a:00:01:05\n[Network]"),
            ("ETH2_IP", "10.0.2.5"),
            ("ETH2_MASK", "255.0.255.0"),
            ("SET_HOSTNAME", "bad host;reboot"),
            (
                "SSH_PUBLIC_KEY",
                "ssh-ed25519 AAAAC3Nza k@h\ncommand=\"x\" ssh-rsa AAAA\n\nssh-rsa AAAAB3== second",
            ),
        ]));
        assert!(p.nics.is_empty());
        assert_eq!(p.hostname, None);
        assert_eq!(
            p.ssh_keys,
            vec!["ssh-ed25519 AAAAC3Nza k@h", "ssh-rsa AAAAB3== second"]
        );
        assert_eq!(
            p.warnings,
            vec![
                "ETH0_IP: missing or not an IP address",
                "ETH1_MAC: not a MAC address",
                "ETH2_MASK: not a netmask",
                "SET_HOSTNAME: not a valid host name",
                "SSH_PUBLIC_KEY line 2: not an OpenSSH public key",
            ]
        );
        // No value reaches a warning.
        assert!(p
            .warnings
            .iter()
            .all(|w| !w.contains("reboot") && !w.contains("command")));
    }

    /// one-context's order: the CONTEXT device first, then `/context` with a `context.sh`,
    /// then (after the wait) `/dev/sr0`; an empty `/context` is no context.
    #[test]
    fn context_lookup_follows_one_context() {
        let root = tempfile::tempdir().unwrap();
        let paths = Paths::new(root.path());
        let now = Duration::ZERO;
        assert_eq!(find_context(&paths, now), None);
        fs::create_dir_all(paths.at("/context")).unwrap();
        assert_eq!(find_context(&paths, now), None, "an empty /context");
        fs::create_dir_all(paths.at("/dev")).unwrap();
        fs::write(paths.at("/dev/sr0"), "").unwrap();
        assert_eq!(
            find_context(&paths, now),
            Some(ContextSource::Device(paths.at("/dev/sr0")))
        );
        fs::write(
            paths.at("/context/context.sh"),
            "# Context variables generated by OpenNebula\nETH0_IP='10.0.0.5'\n",
        )
        .unwrap();
        fs::write(paths.at("/context/token.txt"), "tok\n").unwrap();
        assert_eq!(
            find_context(&paths, now),
            Some(ContextSource::Dir(paths.at("/context")))
        );
        let (vars, warnings) = read_cd(&paths, now).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(vars.get("ETH0_IP").map(String::as_str), Some("10.0.0.5"));
        assert_eq!(vars.get("TOKENTXT").map(String::as_str), Some("tok"));
        fs::create_dir_all(paths.at("/dev/disk/by-label")).unwrap();
        fs::write(paths.at("/dev/disk/by-label/CONTEXT"), "").unwrap();
        assert_eq!(
            find_context(&paths, now),
            Some(ContextSource::Device(
                paths.at("/dev/disk/by-label/CONTEXT")
            )),
            "the device comes first"
        );
    }
}
