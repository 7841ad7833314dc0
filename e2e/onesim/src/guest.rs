//! The `process` runtime: each running VM is a real process group started from the guest
//! command, with its "disk" under `<base_dir>/vm-<id>/` and its context in `context/one_env`.
//!
//! Guarantees: every guest runs in its own process group, is killed (TERM, then KILL after a
//! grace) when its VM stops, and is SIGKILLed by [`Guests::kill_all`] (shutdown and Drop).
//! Guests are spawned from one long-lived thread through `setpriv --pdeathsig KILL` when
//! available, so a SIGKILLed onesim takes them with it.
//! Assumptions: guests do not leave their process group (no setsid/daemonising).
//! Caveats: without setpriv, a SIGKILLed onesim leaves its guests running.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Everything needed to boot one guest, captured under the state lock.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub id: i64,
    /// The first NIC's address (`nics[0].ip`), or the simulator's loopback address of the VM
    /// when it has no NIC.
    pub ip: String,
    pub token: String,
    pub endpoint: String,
    /// CONTEXT variables, sorted by name.
    pub context: Vec<(String, String)>,
    /// The first DISK's image file: its SOURCE, the copy in onesim's datastore directory
    /// (`one.image.allocate`). `None` when the VM has no image disk.
    pub disk_source: Option<PathBuf>,
    /// The VM's NICs in NIC_ID order, as leased at instantiate.
    pub nics: Vec<GuestNic>,
}

/// One NIC of a guest, read from the VM's TEMPLATE/NIC (what oned gives the hypervisor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNic {
    pub nic_id: i64,
    /// The leased IPv4 address (NIC/IP).
    pub ip: String,
    /// The lease's MAC (NIC/MAC): one-context configures only the link carrying it.
    pub mac: String,
    /// The host bridge the NIC plugs into (NIC/BRIDGE, the vnet's BRIDGE).
    pub bridge: String,
    /// The default gateway (NIC, else its AR, else the vnet: oned's inheritance); `None`
    /// when none sets it.
    pub gateway: Option<String>,
    /// NETWORK_MASK (NIC, else AR, else vnet) as written; `None` when unset (oned derives
    /// nothing, the guest's `ETH<n>_MASK` is empty).
    pub mask: Option<String>,
    /// The prefix length of `mask`; 24 (one-context's default 255.255.255.0) when `mask` is
    /// unset or not a contiguous IPv4 mask.
    pub prefix_len: u8,
}

/// The prefix length of a dotted IPv4 netmask (`255.255.0.0` → 16); `None` unless the mask
/// is contiguous ones then zeros.
pub fn mask_prefix(mask: &str) -> Option<u8> {
    let m: std::net::Ipv4Addr = mask.trim().parse().ok()?;
    let bits = u32::from(m);
    let ones = bits.leading_ones();
    (bits.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

struct Proc {
    child: Child,
    pgid: i32,
}

type SpawnReq = (Command, mpsc::Sender<std::io::Result<Child>>);

pub struct Guests {
    procs: Mutex<HashMap<i64, Proc>>,
    spawner: Mutex<Option<mpsc::Sender<SpawnReq>>>,
    cmd: Vec<String>,
    base_dir: PathBuf,
    grace: Duration,
    setpriv: Option<PathBuf>,
}

pub(crate) fn find_setpriv() -> Option<PathBuf> {
    ["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Guests {
    pub fn new(cmd: Vec<String>, base_dir: PathBuf, grace: Duration) -> Guests {
        let (tx, rx) = mpsc::channel::<SpawnReq>();
        // PDEATHSIG fires when the *thread* that forked exits: spawn from one thread that lives
        // as long as this runtime.
        let _ = std::thread::Builder::new()
            .name("onesim-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        Guests {
            procs: Mutex::new(HashMap::new()),
            spawner: Mutex::new(Some(tx)),
            cmd,
            base_dir,
            grace,
            setpriv: find_setpriv(),
        }
    }

    pub fn vm_dir(&self, id: i64) -> PathBuf {
        self.base_dir.join(format!("vm-{id}"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Proc>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pid(&self, id: i64) -> Option<u32> {
        self.lock().get(&id).map(|p| p.child.id())
    }

    pub fn running(&self) -> Vec<(i64, u32)> {
        let mut v: Vec<(i64, u32)> = self
            .lock()
            .iter()
            .map(|(k, p)| (*k, p.child.id()))
            .collect();
        v.sort_unstable();
        v
    }

    /// Writes the context files and starts the guest (restarting it if already running).
    pub fn start(&self, spec: &GuestSpec) -> Result<(), String> {
        self.stop(spec.id);
        let dir = self.vm_dir(spec.id);
        let ctx_dir = dir.join("context");
        fs::create_dir_all(&ctx_dir).map_err(|e| format!("{}: {e}", ctx_dir.display()))?;
        write_ro(&ctx_dir.join("one_env"), &one_env(spec))?;
        write_files(&ctx_dir, &cd_files(spec))?;
        let argv: Vec<String> = self
            .cmd
            .iter()
            .map(|a| subst(a, spec, &dir, &ctx_dir))
            .collect();
        let Some(prog) = argv.first() else {
            return Err("empty guest command".into());
        };
        let mut cmd = logged_command(self.setpriv.as_deref(), &argv, &dir.join("guest.log"))?;
        cmd.current_dir(&dir).env("ONESIM_VM_DIR", &dir);
        let (tx, rx) = mpsc::channel();
        let spawner = self
            .spawner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let spawner = spawner.ok_or("onesim is shutting down")?;
        spawner
            .send((cmd, tx))
            .map_err(|_| "spawner thread gone".to_string())?;
        let child = rx
            .recv()
            .map_err(|_| "spawner thread gone".to_string())?
            .map_err(|e| format!("{prog}: {e}"))?;
        let pgid = child.id() as i32;
        self.lock().insert(spec.id, Proc { child, pgid });
        Ok(())
    }

    /// TERM the guest's process group now, KILL it after the grace period (in the background).
    pub fn stop(&self, id: i64) {
        let Some(mut p) = self.lock().remove(&id) else {
            return;
        };
        let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGTERM);
        let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGCONT);
        let grace = self.grace;
        let _ = std::thread::Builder::new()
            .name(format!("onesim-stop-{id}"))
            .spawn(move || {
                let t0 = Instant::now();
                while t0.elapsed() < grace {
                    if let Ok(Some(_)) = p.child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGKILL);
                let _ = p.child.wait();
            });
    }

    /// Kills the guest's processes at once (fault injection); the VM keeps its state.
    pub fn crash(&self, id: i64) -> bool {
        let Some(mut p) = self.lock().remove(&id) else {
            return false;
        };
        let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGKILL);
        let _ = p.child.wait();
        true
    }

    pub fn signal(&self, id: i64, sig: Signal) -> bool {
        match self.lock().get(&id) {
            Some(p) => killpg(Pid::from_raw(p.pgid), sig).is_ok(),
            None => false,
        }
    }

    /// Reaps guests that exited on their own; returns (vm id, exit status).
    pub fn reap(&self) -> Vec<(i64, String)> {
        let mut procs = self.lock();
        let mut gone = Vec::new();
        for (id, p) in procs.iter_mut() {
            if let Ok(Some(st)) = p.child.try_wait() {
                gone.push((*id, st.to_string()));
            }
        }
        for (id, _) in &gone {
            if let Some(p) = procs.remove(id) {
                // The leader exited; make sure nothing of its group lingers.
                let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGKILL);
            }
        }
        gone
    }

    /// SIGKILLs every guest group and waits for the leaders. Used by shutdown and Drop.
    pub fn kill_all(&self) {
        let procs: Vec<Proc> = self.lock().drain().map(|(_, p)| p).collect();
        for p in &procs {
            let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGKILL);
        }
        for mut p in procs {
            let _ = p.child.wait();
        }
    }

    /// Graceful variant: TERM everyone, wait up to the grace, then KILL.
    pub fn stop_all(&self) {
        let mut procs: Vec<Proc> = self.lock().drain().map(|(_, p)| p).collect();
        for p in &procs {
            let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGTERM);
            let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGCONT);
        }
        let t0 = Instant::now();
        while t0.elapsed() < self.grace {
            let mut procs_done = true;
            for p in procs.iter_mut() {
                let _ = p.child.try_wait();
                procs_done &= killpg(Pid::from_raw(p.pgid), None).is_err();
            }
            if procs_done {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left of each group (the leader or its children) is killed.
        for mut p in procs {
            let _ = killpg(Pid::from_raw(p.pgid), Signal::SIGKILL);
            let _ = p.child.wait();
        }
    }

    pub fn close(&self) {
        self.spawner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

impl Drop for Guests {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn subst(arg: &str, spec: &GuestSpec, dir: &Path, ctx: &Path) -> String {
    arg.replace("{vm_dir}", &dir.to_string_lossy())
        .replace("{context}", &ctx.join("one_env").to_string_lossy())
        .replace("{vmid}", &spec.id.to_string())
        .replace("{ip}", &spec.ip)
}

/// one-context's `loc-16-gen-env` format: double-quoted, unescaped values.
pub fn one_env(spec: &GuestSpec) -> String {
    let mut s = String::new();
    s.push_str(&format!("export TOKENTXT=\"{}\"\n", spec.token));
    s.push_str(&format!("export VMID=\"{}\"\n", spec.id));
    s.push_str(&format!("export ONEGATE_ENDPOINT=\"{}\"\n", spec.endpoint));
    for (k, v) in &spec.context {
        s.push_str(&format!("export {k}=\"{v}\"\n"));
    }
    s
}

/// `argv` as a command of its own process group, started through `setpriv --pdeathsig KILL`
/// when given (the process dies with the thread that spawns it), stdin closed, stdout and
/// stderr appended to `log`.
pub(crate) fn logged_command<S: AsRef<std::ffi::OsStr>>(
    setpriv: Option<&Path>,
    argv: &[S],
    log: &Path,
) -> Result<Command, String> {
    let Some(prog) = argv.first() else {
        return Err("empty command".into());
    };
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = match setpriv {
        Some(sp) => {
            let mut c = Command::new(sp);
            c.args(["--pdeathsig", "KILL", "--"]).args(argv);
            c
        }
        None => {
            let mut c = Command::new(prog);
            c.args(&argv[1..]);
            c
        }
    };
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    Ok(cmd)
}

/// The context CD's files, as oned writes them (`generate_context`): `context.sh` and
/// `token.txt`.
pub fn cd_files(spec: &GuestSpec) -> Vec<(String, String)> {
    vec![
        ("context.sh".to_string(), context_sh(spec)),
        ("token.txt".to_string(), spec.token.clone()),
    ]
}

/// Writes each (name, content) under `dir`, read-only (mode 0400).
pub(crate) fn write_files(dir: &Path, files: &[(String, String)]) -> Result<(), String> {
    for (name, content) in files {
        write_ro(&dir.join(name), content)?;
    }
    Ok(())
}

fn context_sh(spec: &GuestSpec) -> String {
    let mut s = String::from("# Context variables generated by OpenNebula\n");
    for (k, v) in &spec.context {
        s.push_str(&format!("{k}='{}'\n", v.replace('\'', "'\\''")));
    }
    s
}

/// Writes a file with mode 0400 (replacing a previous read-only copy).
fn write_ro(path: &Path, content: &str) -> Result<(), String> {
    let _ = fs::remove_file(path);
    let mut f = fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(content.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o400))
        .map_err(|e| format!("{}: {e}", path.display()))
}
