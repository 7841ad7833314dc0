//! The simulated front-end's state: users, VM templates, networks, documents and VMs, and the
//! VM state machine (oned's LCM). Pure data plus transitions; side effects on guest
//! processes are queued as [`Effect`]s and applied by the caller after releasing the lock.
//!
//! Ownership follows oned: every object has an owner, a group and permission bits (new
//! objects `600`, oned.conf's `DEFAULT_UMASK = 177`); [`State::visible`] is
//! `PoolSQL::usr_filter` (src/pool/PoolSQL.cc) and [`State::may`] the USE/MANAGE check,
//! both without ACL rules (`pool_filters_and_permissions_follow_oned`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::template::{vec_get, vec_set, Attr, Template, Val};

pub const AUTHENTICATION: i32 = 0x0100;
pub const AUTHORIZATION: i32 = 0x0200;
pub const NO_EXISTS: i32 = 0x0400;
pub const ACTION: i32 = 0x0800;
pub const RPC_API: i32 = 0x1000;
pub const INTERNAL: i32 = 0x2000;
pub const ALLOCATE: i32 = 0x4000;
pub const LOCKED: i32 = 0x8000;

/// An OpenNebula error: code, message (without the `[method]` prefix) and resp_id.
#[derive(Debug, Clone, PartialEq)]
pub struct OneErr {
    pub code: i32,
    pub msg: String,
    pub resp_id: i64,
}

pub fn err(code: i32, msg: impl Into<String>) -> OneErr {
    OneErr {
        code,
        msg: msg.into(),
        resp_id: -1,
    }
}

pub fn no_exists(what: &str, id: i64) -> OneErr {
    OneErr {
        code: NO_EXISTS,
        msg: format!("Error getting {what} [{id}]."),
        resp_id: id,
    }
}

// VM states (subset used by the simulator; numbers per include/VirtualMachine.h).
pub const S_INIT: u32 = 0;
pub const S_PENDING: u32 = 1;
pub const S_HOLD: u32 = 2;
pub const S_ACTIVE: u32 = 3;
pub const S_STOPPED: u32 = 4;
pub const S_SUSPENDED: u32 = 5;
pub const S_DONE: u32 = 6;
pub const S_POWEROFF: u32 = 8;
pub const S_UNDEPLOYED: u32 = 9;

pub const L_INIT: u32 = 0;
pub const L_PROLOG: u32 = 1;
pub const L_BOOT: u32 = 2;
pub const L_RUNNING: u32 = 3;
pub const L_EPILOG: u32 = 11;
pub const L_SHUTDOWN: u32 = 12;
pub const L_UNKNOWN: u32 = 16;
pub const L_BOOT_FAILURE: u32 = 36;
pub const L_PROLOG_FAILURE: u32 = 39;
pub const L_EPILOG_FAILURE: u32 = 40;

pub const STATE_NAMES: [&str; 12] = [
    "INIT",
    "PENDING",
    "HOLD",
    "ACTIVE",
    "STOPPED",
    "SUSPENDED",
    "DONE",
    "FAILED",
    "POWEROFF",
    "UNDEPLOYED",
    "CLONING",
    "CLONING_FAILURE",
];

pub const LCM_NAMES: [&str; 72] = [
    "LCM_INIT",
    "PROLOG",
    "BOOT",
    "RUNNING",
    "MIGRATE",
    "SAVE_STOP",
    "SAVE_SUSPEND",
    "SAVE_MIGRATE",
    "PROLOG_MIGRATE",
    "PROLOG_RESUME",
    "EPILOG_STOP",
    "EPILOG",
    "SHUTDOWN",
    "CANCEL",
    "FAILURE",
    "CLEANUP_RESUBMIT",
    "UNKNOWN",
    "HOTPLUG",
    "SHUTDOWN_POWEROFF",
    "BOOT_UNKNOWN",
    "BOOT_POWEROFF",
    "BOOT_SUSPENDED",
    "BOOT_STOPPED",
    "CLEANUP_DELETE",
    "HOTPLUG_SNAPSHOT",
    "HOTPLUG_NIC",
    "HOTPLUG_SAVEAS",
    "HOTPLUG_SAVEAS_POWEROFF",
    "HOTPLUG_SAVEAS_SUSPENDED",
    "SHUTDOWN_UNDEPLOY",
    "EPILOG_UNDEPLOY",
    "PROLOG_UNDEPLOY",
    "BOOT_UNDEPLOY",
    "HOTPLUG_PROLOG_POWEROFF",
    "HOTPLUG_EPILOG_POWEROFF",
    "BOOT_MIGRATE",
    "BOOT_FAILURE",
    "BOOT_MIGRATE_FAILURE",
    "PROLOG_MIGRATE_FAILURE",
    "PROLOG_FAILURE",
    "EPILOG_FAILURE",
    "EPILOG_STOP_FAILURE",
    "EPILOG_UNDEPLOY_FAILURE",
    "PROLOG_MIGRATE_POWEROFF",
    "PROLOG_MIGRATE_POWEROFF_FAILURE",
    "PROLOG_MIGRATE_SUSPEND",
    "PROLOG_MIGRATE_SUSPEND_FAILURE",
    "BOOT_UNDEPLOY_FAILURE",
    "BOOT_STOPPED_FAILURE",
    "PROLOG_RESUME_FAILURE",
    "PROLOG_UNDEPLOY_FAILURE",
    "DISK_SNAPSHOT_POWEROFF",
    "DISK_SNAPSHOT_REVERT_POWEROFF",
    "DISK_SNAPSHOT_DELETE_POWEROFF",
    "DISK_SNAPSHOT_SUSPENDED",
    "DISK_SNAPSHOT_REVERT_SUSPENDED",
    "DISK_SNAPSHOT_DELETE_SUSPENDED",
    "DISK_SNAPSHOT",
    "DISK_SNAPSHOT_REVERT",
    "DISK_SNAPSHOT_DELETE",
    "PROLOG_MIGRATE_UNKNOWN",
    "PROLOG_MIGRATE_UNKNOWN_FAILURE",
    "DISK_RESIZE",
    "DISK_RESIZE_POWEROFF",
    "DISK_RESIZE_UNDEPLOYED",
    "HOTPLUG_NIC_POWEROFF",
    "HOTPLUG_RESIZE",
    "HOTPLUG_SAVEAS_UNDEPLOYED",
    "HOTPLUG_SAVEAS_STOPPED",
    "BACKUP",
    "BACKUP_POWEROFF",
    "RESTORE",
];

/// The 14 `*_FAILURE` LCM states OneFlow treats as failures.
pub const FAILURE_LCM: [u32; 14] = [36, 37, 38, 39, 40, 41, 42, 44, 46, 47, 48, 49, 50, 61];

pub fn is_failure(state: u32, lcm: u32) -> bool {
    state == S_ACTIVE && FAILURE_LCM.contains(&lcm)
}

pub fn lcm_by_name(name: &str) -> Option<u32> {
    LCM_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|p| p as u32)
}

pub fn state_by_name(name: &str) -> Option<u32> {
    STATE_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|p| p as u32)
}

/// Attribute names oned keeps in the system TEMPLATE (vm.xsd TEMPLATE elements plus CPU_MODEL);
/// everything else of an instantiated template lands in USER_TEMPLATE.
pub const SYSTEM_ATTRS: &[&str] = &[
    "AUTOMATIC_DS_REQUIREMENTS",
    "AUTOMATIC_NIC_REQUIREMENTS",
    "AUTOMATIC_REQUIREMENTS",
    "CLONING_TEMPLATE_ID",
    "CONTEXT",
    "CPU",
    "CPU_COST",
    "CPU_MODEL",
    "DISK",
    "DISK_COST",
    "EMULATOR",
    "FEATURES",
    "HYPERV_OPTIONS",
    "GRAPHICS",
    "VIDEO",
    "IMPORTED",
    "INPUT",
    "MEMORY",
    "MEMORY_COST",
    "MEMORY_MAX",
    "MEMORY_SLOTS",
    "MEMORY_RESIZE_MODE",
    "NIC",
    "NIC_ALIAS",
    "NIC_DEFAULT",
    "NUMA_NODE",
    "OS",
    "PCI",
    "QEMU_GA_EXEC",
    "RAW",
    "SECURITY_GROUP_RULE",
    "SNAPSHOT",
    "SPICE_OPTIONS",
    "SUBMIT_ON_HOLD",
    "TEMPLATE_ID",
    "TM_MAD_SYSTEM",
    "TOPOLOGY",
    "TPM",
    "MEMORY_ENCRYPTION",
    "VCPU",
    "VCPU_MAX",
    "VMGROUP",
    "VMID",
    "VROUTER_ID",
    "VROUTER_KEEPALIVED_ID",
    "VROUTER_KEEPALIVED_PASSWORD",
];

/// Sections `one.vm.updateconf` may change.
pub const UPDATECONF_ATTRS: &[&str] = &[
    "OS",
    "CPU_MODEL",
    "FEATURES",
    "INPUT",
    "GRAPHICS",
    "VIDEO",
    "RAW",
    "CONTEXT",
    "BACKUP_CONFIG",
];

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub password: String,
    pub gid: i64,
    pub gname: String,
    pub driver: String,
    pub enabled: bool,
    pub template: Template,
    /// Login tokens (token, expiration epoch seconds; -1 never expires).
    pub tokens: Vec<(String, i64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lock {
    pub level: i64,
    pub owner: i64,
    pub time: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Owner {
    pub uid: i64,
    pub gid: i64,
    pub uname: String,
    pub gname: String,
    /// Permission bits as an octet (`0o640`: owner um-, group u--): OWNER, GROUP, OTHER
    /// digits of USE (4), MANAGE (2), ADMIN (1).
    #[serde(default = "default_perms")]
    pub perms: u16,
}

/// oned.conf's shipped `DEFAULT_UMASK = 177`: new objects are `600`.
pub fn default_perms() -> u16 {
    0o600
}

/// `perms` after a `chmod` of the nine flags OWNER_U … OTHER_A (-1 keeps a flag).
pub fn chmod_flags(perms: u16, flags: [i64; 9]) -> u16 {
    let mut p = perms;
    for (i, f) in flags.iter().enumerate() {
        let bit = 1u16 << (8 - i);
        match f {
            -1 => {}
            0 => p &= !bit,
            _ => p |= bit,
        }
    }
    p
}

/// What a request needs on an object (`AuthRequest::Operation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Use,
    Manage,
}

impl Owner {
    /// The nine `PERMISSIONS` flags, OWNER_U … OTHER_A.
    pub fn perm_flags(&self) -> [u8; 9] {
        let mut f = [0u8; 9];
        for (i, flag) in f.iter_mut().enumerate() {
            *flag = u8::from(self.perms & (1 << (8 - i)) != 0);
        }
        f
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmTemplate {
    pub id: i64,
    pub own: Owner,
    pub name: String,
    pub regtime: i64,
    pub template: Template,
    pub lock: Option<Lock>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vnet {
    pub id: i64,
    pub own: Owner,
    pub name: String,
    pub template: Template,
    pub lock: Option<Lock>,
    /// One lease table per AR of `template`, in AR order.
    #[serde(default)]
    pub ar_leases: Vec<crate::lease::ArLeases>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Doc {
    pub id: i64,
    pub own: Owner,
    pub name: String,
    pub doc_type: i64,
    /// The JSON body OneFlow keeps in TEMPLATE/BODY (null for documents of other
    /// clients, which have no BODY).
    pub body: serde_json::Value,
    /// TEMPLATE attributes besides BODY (`one.document.allocate` / `update`).
    #[serde(default)]
    pub template: crate::template::Template,
    pub lock: Option<Lock>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    pub seq: i64,
    pub stime: i64,
    pub etime: i64,
    pub pstime: i64,
    pub petime: i64,
    pub rstime: i64,
    pub retime: i64,
    pub estime: i64,
    pub eetime: i64,
    pub action: i64,
    pub uid: i64,
    pub gid: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vm {
    pub id: i64,
    pub own: Owner,
    pub name: String,
    pub state: u32,
    pub lcm: u32,
    pub prev_state: u32,
    pub prev_lcm: u32,
    pub resched: u32,
    pub stime: i64,
    pub etime: i64,
    pub deploy_id: String,
    pub lock: Option<Lock>,
    pub template: Template,
    pub user_template: Template,
    pub history: Vec<History>,
    /// When the current transient state ends (epoch ms).
    pub due: Option<u64>,
    /// `--auto-ready`: when READY=YES is set (epoch ms).
    pub ready_at: Option<u64>,
    /// OneGate token (token.txt); checked against X-ONEGATE-VMID.
    pub token: String,
    pub ip: String,
    pub last_poll: i64,
}

impl Vm {
    pub fn is_running(&self) -> bool {
        self.state == S_ACTIVE && self.lcm == L_RUNNING
    }
    pub fn state_name(&self) -> &'static str {
        if self.state == S_ACTIVE {
            LCM_NAMES
                .get(self.lcm as usize)
                .copied()
                .unwrap_or("UNKNOWN")
        } else {
            STATE_NAMES
                .get(self.state as usize)
                .copied()
                .unwrap_or("UNKNOWN")
        }
    }
}

/// A VM built from a template, with the images and leases (and whether each was asked
/// for by IP) it will take.
type BuiltVm = (
    Vm,
    Vec<crate::image::DiskUse>,
    Vec<(crate::lease::Lease, bool)>,
);

/// Guest-side consequences of a transition, applied outside the state lock.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Start(i64),
    Stop(i64),
    /// The guest sees a changed context (a process guest restarts; a machine reboots).
    Restart(i64),
    /// `reboot` (the guest's init reboots in order) or `reboot-hard` (a reset).
    Reboot {
        id: i64,
        hard: bool,
    },
    /// The `-hard` actions: oned's driver cancels (destroys) the VM at once instead of asking
    /// the guest to shut down; the `Stop` that follows removes the rest.
    Kill(i64),
    /// Copy an image's file into the datastore, then [`State::image_copied`].
    CopyImage {
        id: i64,
        from: std::path::PathBuf,
        to: std::path::PathBuf,
    },
    /// Remove a deleted image's datastore file.
    RemoveFile(std::path::PathBuf),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Counters {
    pub user: i64,
    pub vm: i64,
    pub template: i64,
    pub vnet: i64,
    pub doc: i64,
}

/// Knobs the state machine needs (copied from the configuration).
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    pub vm_step_ms: u64,
    pub auto_ready_ms: Option<u64>,
    pub onegate_endpoint: String,
    /// The second octet of the simulator's loopback net `127.<net>.0.0/16`; 0 unless
    /// reserved at start.
    pub loopback_net: u8,
    /// The process runtime: VMs bind their leases on this host, so only 127.0.0.0/8 leases
    /// are handed out ([`State::pick_lease`]).
    pub loopback_only: bool,
    /// The image runtime without an advertised endpoint: OneGate's port, given to each VM at
    /// its NIC 0 gateway ([`State::onegate_endpoint_for`]).
    pub onegate_gateway_port: Option<u16>,
    /// Where image copies go (`<dir>/<datastore id>/<hex>`).
    pub datastore_dir: std::path::PathBuf,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    pub users: BTreeMap<i64, User>,
    pub vms: BTreeMap<i64, Vm>,
    pub templates: BTreeMap<i64, VmTemplate>,
    pub vnets: BTreeMap<i64, Vnet>,
    pub docs: BTreeMap<i64, Doc>,
    #[serde(default)]
    pub images: crate::image::ImageMap,
    pub next: Counters,
    #[serde(default)]
    pub next_image: i64,
    /// Injected: the next N VM boots end in BOOT_FAILURE.
    pub boot_failures: u32,
    #[serde(skip)]
    pub effects: Vec<Effect>,
    #[serde(skip)]
    pub dirty: bool,
    #[serde(skip)]
    pub knobs: Knobs,
    #[serde(skip)]
    timers: BTreeSet<(u64, i64)>,
    #[serde(skip)]
    ready_timers: BTreeSet<(u64, i64)>,
}

pub fn epoch_s() -> i64 {
    (now_ms() / 1000) as i64
}

/// The loopback address of VM `id` in the simulator's loopback net `127.<net>.0.0/16`:
/// unique within one simulator, and across the simulators of one host because each
/// reserves its own `net` (`crate::reserve_loopback_net`). Never 127.0.0.1, never a
/// `127.<net>.0.x` address (the reservation's).
pub fn vm_ip(net: u8, id: i64) -> String {
    let n = id.max(0) as u64;
    format!("127.{net}.{}.{}", 1 + (n / 254) % 255, 1 + n % 254)
}

pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl State {
    pub fn new(admin_user: &str, admin_pass: &str) -> State {
        let mut users = BTreeMap::new();
        let mut tpl = Template::default();
        tpl.set("TOKEN_PASSWORD", &random_hex(32));
        users.insert(
            0,
            User {
                id: 0,
                name: admin_user.to_string(),
                password: admin_pass.to_string(),
                gid: 0,
                gname: "oneadmin".into(),
                driver: "core".into(),
                enabled: true,
                template: tpl,
                tokens: vec![],
            },
        );
        State {
            users,
            vms: BTreeMap::new(),
            templates: BTreeMap::new(),
            vnets: BTreeMap::new(),
            docs: BTreeMap::new(),
            images: BTreeMap::new(),
            next_image: 0,
            next: Counters {
                user: 1,
                vm: 0,
                template: 0,
                vnet: 0,
                doc: 0,
            },
            boot_failures: 0,
            effects: vec![],
            dirty: true,
            knobs: Knobs::default(),
            timers: BTreeSet::new(),
            ready_timers: BTreeSet::new(),
        }
    }

    /// After loading from a state file: rebuild timers and restart guests of running VMs.
    pub fn after_load(&mut self) {
        let ids: Vec<(i64, Option<u64>, Option<u64>, bool)> = self
            .vms
            .values()
            .map(|v| (v.id, v.due, v.ready_at, v.is_running()))
            .collect();
        for (id, due, ready, running) in ids {
            if let Some(d) = due {
                self.timers.insert((d, id));
            }
            if let Some(r) = ready {
                self.ready_timers.insert((r, id));
            }
            if running {
                self.effects.push(Effect::Start(id));
            }
        }
        self.restart_copies();
    }

    /// Authenticates `user:password` (or a login token). Returns the user id.
    pub fn auth(&self, session: &str) -> Option<i64> {
        let (u, p) = session.split_once(':')?;
        let user = self.users.values().find(|x| x.name == u && x.enabled)?;
        let now = epoch_s();
        let token_ok = user
            .tokens
            .iter()
            .any(|(t, exp)| t == p && (*exp < 0 || *exp > now));
        (user.password == p || token_ok).then_some(user.id)
    }

    pub fn owner(&self, uid: i64) -> Owner {
        match self.users.get(&uid) {
            Some(u) => Owner {
                uid,
                gid: u.gid,
                uname: u.name.clone(),
                gname: u.gname.clone(),
                perms: default_perms(),
            },
            None => Owner {
                uid,
                gid: 0,
                uname: "oneadmin".into(),
                gname: "oneadmin".into(),
                perms: default_perms(),
            },
        }
    }

    /// Whether `uid` is an admin: oneadmin or a member of group 0 (`PoolSQL::acl_filter`).
    pub fn is_admin(&self, uid: i64) -> bool {
        uid == 0 || self.users.get(&uid).is_some_and(|u| u.gid == 0)
    }

    /// `op` on `o` is granted to `uid` by ownership or the GROUP/OTHER bits (no ACLs).
    pub fn may(&self, uid: i64, o: &Owner, op: Op) -> bool {
        let (group_bit, other_bit) = match op {
            Op::Use => (0o040, 0o004),
            Op::Manage => (0o020, 0o002),
        };
        let gid = self.users.get(&uid).map(|u| u.gid);
        self.is_admin(uid)
            || o.uid == uid
            || o.perms & other_bit != 0
            || (gid == Some(o.gid) && o.perms & group_bit != 0)
    }

    /// Pool filter `filter` for `uid` (`PoolSQL::usr_filter`, without ACLs): -3 mine, -2
    /// all visible, -1 mine and my group's visible, -4 my group's visible, N ≥ 0 user N's
    /// visible ones.
    pub fn visible(&self, uid: i64, filter: i64, o: &Owner) -> bool {
        let admin = self.is_admin(uid);
        let gid = self.users.get(&uid).map_or(-1, |u| u.gid);
        let shared = || o.perms & 0o004 != 0 || (o.gid == gid && o.perms & 0o040 != 0);
        match filter {
            -3 => o.uid == uid,
            -2 => admin || o.uid == uid || shared(),
            -1 => o.uid == uid || (o.gid == gid && (admin || shared())),
            -4 => o.gid == gid && (admin || o.uid == uid || shared()),
            n => o.uid == n && (n == uid || admin || shared()),
        }
    }

    /// The error oned gives when `op` on `o` is not granted to `uid`.
    pub fn authorize(&self, uid: i64, o: &Owner, op: Op, what: &str) -> Result<(), OneErr> {
        if self.may(uid, o, op) {
            Ok(())
        } else {
            Err(err(
                AUTHORIZATION,
                format!("User [{uid}] not authorized to perform action on {what}."),
            ))
        }
    }

    /// A NIC attribute oned inherits (`INHERIT_VNET_ATTR`, `ETH<n>_*` context): the NIC's
    /// own value, else its address range's, else the vnet template's; `None` when none has
    /// a non-empty one.
    pub fn nic_inherited(&self, nic: &[(String, String)], key: &str) -> Option<String> {
        let nonempty = |v: Option<&str>| v.filter(|x| !x.is_empty()).map(str::to_string);
        if let Some(v) = nonempty(vec_get(nic, key)) {
            return Some(v);
        }
        let net = vec_get(nic, "NETWORK_ID")
            .and_then(|n| n.parse::<i64>().ok())
            .and_then(|n| self.vnets.get(&n))?;
        let ar = vec_get(nic, "AR_ID")
            .and_then(|a| a.parse::<usize>().ok())
            .and_then(|a| net.template.vecs("AR").nth(a));
        ar.and_then(|ar| nonempty(vec_get(ar, key)))
            .or_else(|| nonempty(net.template.get(key)))
    }

    pub fn vm(&self, id: i64) -> Result<&Vm, OneErr> {
        self.vms
            .get(&id)
            .ok_or_else(|| no_exists("virtual machine", id))
    }

    pub fn vm_mut(&mut self, id: i64) -> Result<&mut Vm, OneErr> {
        self.vms
            .get_mut(&id)
            .ok_or_else(|| no_exists("virtual machine", id))
    }

    fn schedule(&mut self, id: i64, due: Option<u64>) {
        if let Some(vm) = self.vms.get_mut(&id) {
            if let Some(old) = vm.due.take() {
                self.timers.remove(&(old, id));
            }
            vm.due = due;
            if let Some(d) = due {
                self.timers.insert((d, id));
            }
        }
    }

    /// Moves a VM to (state, lcm), arming the timer of transient states and queuing guest
    /// effects. The single place where VM states change.
    pub fn set_state(&mut self, id: i64, state: u32, lcm: u32) {
        let now = now_ms();
        let step = self.knobs.vm_step_ms;
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        let was_running = vm.is_running();
        vm.prev_state = vm.state;
        vm.prev_lcm = vm.lcm;
        vm.state = state;
        vm.lcm = if state == S_ACTIVE { lcm } else { 0 };
        let secs = (now / 1000) as i64;
        if let Some(h) = vm.history.last_mut() {
            match (state, lcm) {
                (S_ACTIVE, L_BOOT) => {
                    h.petime = secs;
                    h.rstime = secs;
                }
                (S_ACTIVE, L_EPILOG) => {
                    h.retime = secs;
                    h.estime = secs;
                }
                (S_DONE, _) => {
                    h.eetime = secs;
                    h.etime = secs;
                }
                _ => {}
            }
        }
        if state == S_ACTIVE && lcm == L_PROLOG && vm.history.is_empty() {
            vm.history.push(History {
                seq: 0,
                stime: secs,
                etime: 0,
                pstime: secs,
                petime: 0,
                rstime: 0,
                retime: 0,
                estime: 0,
                eetime: 0,
                action: 0,
                uid: -1,
                gid: -1,
            });
            vm.deploy_id = format!("one-{id}");
        }
        if state == S_DONE {
            vm.etime = secs;
        }
        let is_running = vm.is_running();
        let transient = next_of(state, lcm).is_some();
        self.dirty = true;
        self.schedule(id, transient.then_some(now + step));
        if is_running && !was_running {
            self.effects.push(Effect::Start(id));
            if let Some(d) = self.knobs.auto_ready_ms {
                let at = now + d;
                if let Some(vm) = self.vms.get_mut(&id) {
                    vm.ready_at = Some(at);
                }
                self.ready_timers.insert((at, id));
            }
        } else if !is_running && was_running && lcm != L_UNKNOWN {
            self.effects.push(Effect::Stop(id));
        }
        if state == S_DONE {
            self.effects.push(Effect::Stop(id));
            // `free_vm_resources`: a VM in DONE gives back its leases and images.
            self.release_leases(id);
            self.release_images(id);
        }
    }

    /// Advances every VM whose transient state is due, and applies due auto-ready timers.
    /// Returns true when anything changed.
    pub fn tick(&mut self) -> bool {
        let now = now_ms();
        let mut changed = false;
        while let Some(&(due, id)) = self.timers.first() {
            if due > now {
                break;
            }
            self.timers.remove(&(due, id));
            let Some(vm) = self.vms.get_mut(&id) else {
                continue;
            };
            if vm.due != Some(due) {
                continue;
            }
            vm.due = None;
            let (s, l) = (vm.state, vm.lcm);
            if let Some((ns, nl)) = next_of(s, l) {
                let (ns, nl) = if nl == L_RUNNING && l == L_BOOT && self.boot_failures > 0 {
                    self.boot_failures -= 1;
                    (S_ACTIVE, L_BOOT_FAILURE)
                } else {
                    (ns, nl)
                };
                self.set_state(id, ns, nl);
                changed = true;
            }
        }
        while let Some(&(at, id)) = self.ready_timers.first() {
            if at > now {
                break;
            }
            self.ready_timers.remove(&(at, id));
            if let Some(vm) = self.vms.get_mut(&id) {
                if vm.ready_at == Some(at) {
                    vm.ready_at = None;
                    if vm.is_running() {
                        vm.user_template.set("READY", "YES");
                        self.dirty = true;
                        changed = true;
                    }
                }
            }
        }
        changed
    }

    /// `one.vm.action`.
    pub fn vm_action(&mut self, action: &str, id: i64) -> Result<i64, OneErr> {
        let vm = self.vm(id)?;
        let (s, l) = (vm.state, vm.lcm);
        let running = s == S_ACTIVE && l == L_RUNNING;
        let unknown = s == S_ACTIVE && l == L_UNKNOWN;
        let failed = is_failure(s, l);
        let bad = || {
            let name = if s == S_ACTIVE {
                LCM_NAMES[l as usize]
            } else {
                STATE_NAMES[s as usize]
            };
            err(ACTION, format!("Error performing action \"{action}\": This action is not available for state {name}"))
                .with_id(id)
        };
        match action {
            "terminate" | "terminate-hard" => {
                let hard = action == "terminate-hard";
                if matches!(
                    s,
                    S_PENDING | S_HOLD | crate::image::S_CLONING | crate::image::S_CLONING_FAILURE
                ) {
                    self.set_state(id, S_DONE, 0);
                } else if running || unknown || (hard && failed) {
                    self.kill_if_hard(action, id);
                    self.set_state(id, S_ACTIVE, L_SHUTDOWN);
                } else if matches!(s, S_POWEROFF | S_UNDEPLOYED | S_STOPPED | S_SUSPENDED) {
                    self.set_state(id, S_ACTIVE, L_EPILOG);
                } else {
                    return Err(bad());
                }
            }
            "poweroff" | "poweroff-hard" if running || unknown => {
                self.kill_if_hard(action, id);
                self.set_state(id, S_ACTIVE, 18)
            }
            "undeploy" | "undeploy-hard" if running || unknown => {
                self.kill_if_hard(action, id);
                self.set_state(id, S_ACTIVE, 29)
            }
            "undeploy" | "undeploy-hard" if s == S_POWEROFF => self.set_state(id, S_ACTIVE, 30),
            "stop" if running => self.set_state(id, S_ACTIVE, 5),
            "suspend" if running => self.set_state(id, S_ACTIVE, 6),
            "resume" if s == S_POWEROFF => self.set_state(id, S_ACTIVE, 20),
            "resume" if s == S_UNDEPLOYED => self.set_state(id, S_ACTIVE, 31),
            "resume" if s == S_STOPPED => self.set_state(id, S_ACTIVE, 9),
            "resume" if s == S_SUSPENDED => self.set_state(id, S_ACTIVE, 21),
            "reboot" | "reboot-hard" if running || (unknown && action == "reboot-hard") => {
                if unknown {
                    self.set_state(id, S_ACTIVE, L_RUNNING);
                } else {
                    let hard = action == "reboot-hard";
                    self.effects.push(Effect::Reboot { id, hard });
                }
            }
            "hold" if s == S_PENDING => self.set_state(id, S_HOLD, 0),
            "release" if s == S_HOLD => self.set_state(id, S_PENDING, 0),
            "resched" | "unresched" if running || s == S_POWEROFF => {
                let v = u32::from(action == "resched");
                self.vm_mut(id)?.resched = v;
                self.dirty = true;
            }
            "undeploy" | "undeploy-hard" | "poweroff" | "poweroff-hard" | "reboot"
            | "reboot-hard" | "hold" | "release" | "stop" | "suspend" | "resume" | "resched"
            | "unresched" => return Err(bad()),
            other => {
                return Err(err(ACTION, format!("Action \"{other}\" is not supported")).with_id(id))
            }
        }
        Ok(id)
    }

    /// The `-hard` variants of terminate, poweroff and undeploy: `vmm->trigger_cancel`
    /// rather than `trigger_shutdown` (LifeCycleManager::trigger_shutdown & co.).
    fn kill_if_hard(&mut self, action: &str, id: i64) {
        if action.ends_with("-hard") {
            self.effects.push(Effect::Kill(id));
        }
    }

    /// `one.vm.recover`: 0 failure, 1 success, 2 retry, 3 delete, 4 delete-recreate, 5 delete-db.
    pub fn vm_recover(&mut self, id: i64, op: i64) -> Result<i64, OneErr> {
        let vm = self.vm(id)?;
        let (s, l) = (vm.state, vm.lcm);
        let bad = |what: &str| err(ACTION, format!("Error recovering VM: {what}")).with_id(id);
        if s == S_DONE {
            return Err(bad("VM is in DONE state"));
        }
        let boot_like = matches!(
            l,
            L_PROLOG | L_BOOT | L_UNKNOWN | 20 | 21 | 22 | 31 | 32 | 9
        ) || matches!(l, L_BOOT_FAILURE | L_PROLOG_FAILURE | 47 | 48 | 49 | 50);
        let down_like = matches!(
            l,
            L_SHUTDOWN | L_EPILOG | L_EPILOG_FAILURE | 18 | 29 | 30 | 41 | 42 | 5 | 6 | 10
        );
        match op {
            0..=2 if s != S_ACTIVE || !(boot_like || down_like) => {
                return Err(bad(&format!(
                    "Cannot recover VM in state {}",
                    self.vms[&id].state_name()
                )))
            }
            0 => {
                let f = if l == L_PROLOG || l == L_PROLOG_FAILURE {
                    L_PROLOG_FAILURE
                } else if boot_like {
                    L_BOOT_FAILURE
                } else {
                    L_EPILOG_FAILURE
                };
                self.set_state(id, S_ACTIVE, f);
            }
            1 => {
                if boot_like {
                    self.set_state(id, S_ACTIVE, L_RUNNING);
                } else {
                    self.set_state(id, S_DONE, 0);
                }
            }
            2 => {
                let to = match l {
                    L_BOOT_FAILURE | 47 | 48 => L_BOOT,
                    L_PROLOG_FAILURE | 49 | 50 => L_PROLOG,
                    L_EPILOG_FAILURE | 41 | 42 => L_EPILOG,
                    L_UNKNOWN => L_RUNNING,
                    other => other,
                };
                self.set_state(id, S_ACTIVE, to);
            }
            3 | 5 => self.set_state(id, S_DONE, 0),
            4 => {
                self.effects.push(Effect::Stop(id));
                let vm = self.vm_mut(id)?;
                vm.user_template.remove("READY");
                vm.history.clear();
                vm.deploy_id.clear();
                self.set_state(id, S_PENDING, 0);
            }
            _ => return Err(err(RPC_API, "Wrong recover operation code").with_id(id)),
        }
        Ok(id)
    }

    /// `one.vm.update` on USER_TEMPLATE: 0 replace, 1 merge.
    pub fn vm_update(&mut self, id: i64, tmpl: &str, kind: i64) -> Result<i64, OneErr> {
        if kind != 0 && kind != 1 {
            return Err(err(RPC_API, "Wrong update type").with_id(id));
        }
        let t = Template::parse(tmpl).map_err(|e| err(INTERNAL, e).with_id(id))?;
        let vm = self.vm_mut(id)?;
        if kind == 0 {
            vm.user_template = t;
        } else {
            vm.user_template.merge(&t);
        }
        self.dirty = true;
        Ok(id)
    }

    /// `one.vm.updateconf` on the whitelisted system sections.
    pub fn vm_updateconf(&mut self, id: i64, tmpl: &str, kind: i64) -> Result<i64, OneErr> {
        if kind != 0 && kind != 1 {
            return Err(err(RPC_API, "Wrong update type").with_id(id));
        }
        let t = Template::parse(tmpl).map_err(|e| err(INTERNAL, e).with_id(id))?;
        let vm = self.vm(id)?;
        let allowed = matches!(
            vm.state,
            S_PENDING | S_HOLD | S_POWEROFF | S_UNDEPLOYED | 10 | 11
        ) || (vm.state == S_ACTIVE
            && (matches!(
                vm.lcm,
                L_INIT | L_PROLOG | L_RUNNING | L_EPILOG | L_SHUTDOWN | 18 | 20
            ) || FAILURE_LCM.contains(&vm.lcm)));
        if !allowed {
            return Err(err(
                ACTION,
                format!("Error performing action \"updateconf\": configuration cannot be updated in state {}", vm.state_name()),
            )
            .with_id(id));
        }
        if let Some(ctx) = t.get_vec("CONTEXT") {
            if ctx.iter().any(|(k, _)| k.starts_with("ETH")) {
                return Err(err(
                    INTERNAL,
                    "Cannot update ETH* attributes, update NIC to update network context",
                )
                .with_id(id));
            }
            if !vm.template.has("CONTEXT") {
                return Err(err(
                    INTERNAL,
                    "Virtual machine does not have context, cannot add a new one.",
                )
                .with_id(id));
            }
        }
        let vm = self.vm_mut(id)?;
        for sec in UPDATECONF_ATTRS {
            let new = t.attrs.iter().find(|a| a.name == *sec);
            match (new, *sec) {
                (Some(a), "CONTEXT") => {
                    let Val::V(newv) = &a.val else { continue };
                    let Some(cur) = vm.template.get_vec_mut("CONTEXT") else {
                        continue;
                    };
                    if kind == 0 {
                        // Replace keeps the generated keys, NETWORK=YES regenerates ETH*.
                        let kept: Vec<(String, String)> = cur
                            .iter()
                            .filter(|(k, _)| {
                                matches!(
                                    k.as_str(),
                                    "TARGET" | "DISK_ID" | "ONEGATE_ENDPOINT" | "VMID"
                                ) || k.starts_with("ETH")
                            })
                            .cloned()
                            .collect();
                        *cur = kept;
                    }
                    for (k, v) in newv {
                        vec_set(cur, k, v);
                    }
                }
                (Some(a), _) => {
                    if kind == 1 {
                        if let (Some(cur), Val::V(newv)) = (vm.template.get_vec_mut(sec), &a.val) {
                            for (k, v) in newv {
                                vec_set(cur, k, v);
                            }
                            continue;
                        }
                    }
                    vm.template.remove(sec);
                    vm.template.push(a.clone());
                }
                (None, "CONTEXT" | "BACKUP_CONFIG") => {}
                (None, _) if kind == 0 => {
                    vm.template.remove(sec);
                }
                (None, _) => {}
            }
        }
        self.dirty = true;
        // A changed context is visible to a running guest: rewrite its context files.
        if self.vms.get(&id).is_some_and(Vm::is_running) && t.has("CONTEXT") {
            self.effects.push(Effect::Restart(id));
        }
        Ok(id)
    }

    /// `one.template.instantiate` (also used by OneFlow). `uid` owns the VM.
    pub fn instantiate(
        &mut self,
        tid: i64,
        name: &str,
        hold: bool,
        extra: &str,
        uid: i64,
    ) -> Result<i64, OneErr> {
        let tmpl = self
            .templates
            .get(&tid)
            .ok_or_else(|| no_exists("virtual machine template", tid))?;
        let extra = Template::parse(extra).map_err(|e| {
            err(INTERNAL, format!("Error parsing extra template: {e}")).with_id(tid)
        })?;
        let mut merged = tmpl.template.clone();
        merged.merge(&extra);
        let tname = tmpl.name.clone();
        let id = self.next.vm;
        let (vm, disks, leases) = self.build_vm(id, tid, &tname, name, merged, uid)?;
        self.next.vm += 1;
        let cloning = vm
            .template
            .vecs("DISK")
            .any(|d| vec_get(d, "CLONING").is_some());
        self.vms.insert(id, vm);
        self.take_leases(id, &leases);
        self.acquire_images(id, &disks);
        self.dirty = true;
        if cloning {
            self.set_state(id, crate::image::S_CLONING, 0);
            return Ok(id);
        }
        let hold = hold
            || self.vms[&id]
                .template
                .get("SUBMIT_ON_HOLD")
                .is_some_and(|v| v.eq_ignore_ascii_case("YES"));
        if hold {
            self.set_state(id, S_HOLD, 0);
        } else {
            self.set_state(id, S_PENDING, 0);
        }
        Ok(id)
    }

    /// Builds VM `id` from a merged template without changing anything: the NICs' leases
    /// and the DISKs' images are picked, and returned for the caller to take once the VM
    /// exists (so a failed instantiate takes nothing, as oned gives them back).
    fn build_vm(
        &self,
        id: i64,
        tid: i64,
        tname: &str,
        name: &str,
        merged: Template,
        uid: i64,
    ) -> Result<BuiltVm, OneErr> {
        let mut sys = Template::default();
        let mut user = Template::default();
        for a in merged.attrs {
            if a.name == "NAME" {
                continue;
            }
            if SYSTEM_ATTRS.contains(&a.name.as_str()) {
                sys.push(a);
            } else {
                user.push(a);
            }
        }
        let fail = |m: String| {
            err(
                ALLOCATE,
                format!("Error allocating a new virtual machine template. {m}"),
            )
        };
        // NICs (`get_network_leases`): resolve networks, lease addresses.
        let mut leases: Vec<(crate::lease::Lease, bool)> = Vec::new();
        let mut nic_id = 0usize;
        let mut eth: Vec<(String, String)> = Vec::new();
        for a in sys.attrs.iter_mut().filter(|a| a.name == "NIC") {
            let Val::V(nic) = &mut a.val else { continue };
            let net = if let Some(nid) = vec_get(nic, "NETWORK_ID") {
                let n: Option<i64> = nid.trim().parse().ok();
                Some(n.and_then(|n| self.vnets.get(&n)).ok_or_else(|| {
                    fail(format!(
                        "Virtual network with ID: {} does not exist",
                        nid.trim()
                    ))
                })?)
            } else if let Some(nn) = vec_get(nic, "NETWORK") {
                let owner = vec_get(nic, "NETWORK_UID")
                    .and_then(|u| u.trim().parse::<i64>().ok())
                    .or_else(|| {
                        vec_get(nic, "NETWORK_UNAME")
                            .and_then(|n| self.users.values().find(|u| u.name == n).map(|u| u.id))
                    })
                    .unwrap_or(uid);
                // oned looks among the owner's networks only; onesim falls back to any
                // user's (README "Fidelity").
                let found = self
                    .vnets
                    .values()
                    .find(|v| v.name == nn && v.own.uid == owner)
                    .or_else(|| self.vnets.values().find(|v| v.name == nn));
                Some(found.ok_or_else(|| {
                    fail(format!("User {owner} does not own a network with name: {nn} . Set NETWORK_UNAME or NETWORK_UID of owner in NIC."))
                })?)
            } else {
                None
            };
            if let Some(n) = net {
                let pending: Vec<crate::lease::Lease> =
                    leases.iter().map(|(l, _)| l.clone()).collect();
                let want = vec_get(nic, "IP").map(str::to_string);
                let lease = self.pick_lease(n, want.as_deref(), &pending, nic_id)?;
                vec_set(nic, "AR_ID", &lease.ar.to_string());
                vec_set(nic, "IP", &lease.ip.to_string());
                vec_set(nic, "MAC", &lease.mac);
                vec_set(nic, "BRIDGE", n.template.get("BRIDGE").unwrap_or("br0"));
                vec_set(nic, "BRIDGE_TYPE", "linux");
                vec_set(nic, "CLUSTER_ID", "0");
                vec_set(nic, "NETWORK", &n.name);
                vec_set(nic, "NETWORK_ID", &n.id.to_string());
                vec_set(nic, "VN_MAD", n.template.get("VN_MAD").unwrap_or("bridge"));
                if let Some(p) = n.template.get("PHYDEV") {
                    vec_set(nic, "PHYDEV", p);
                }
                if let Some(v) = n.template.get("VLAN_ID") {
                    vec_set(nic, "VLAN_ID", v);
                }
                leases.push((lease, want.is_some()));
                // INHERIT_VNET_ATTR: copied into the NIC when it has none (AR, then vnet).
                for k in ["DNS", "GATEWAY", "METHOD", "METRIC"] {
                    if vec_get(nic, k).is_none() {
                        if let Some(v) = self.nic_inherited(nic, k) {
                            vec_set(nic, k, &v);
                        }
                    }
                }
            }
            let nic_name = match vec_get(nic, "NAME") {
                None => format!("NIC{nic_id}"),
                Some(n) if n.starts_with("NIC") && n[3..].bytes().all(|b| b.is_ascii_digit()) => {
                    format!("_{n}")
                }
                Some(n) => n.to_string(),
            };
            vec_set(nic, "NAME", &nic_name);
            vec_set(nic, "NIC_ID", &nic_id.to_string());
            vec_set(nic, "SECURITY_GROUPS", "0");
            vec_set(nic, "TARGET", &format!("one-{id}-{nic_id}"));
            // `generate_network_context`: the 22 ETH<n>_ keys, empty when unknown.
            let own = |k: &str| vec_get(nic, k).unwrap_or("").to_string();
            let inh = |k: &str| self.nic_inherited(nic, k).unwrap_or_default();
            let ip6 = vec_get(nic, "IP6_GLOBAL")
                .or_else(|| vec_get(nic, "IP6"))
                .unwrap_or("")
                .to_string();
            let p = format!("ETH{nic_id}_");
            for (k, v) in [
                ("IP", own("IP")),
                ("MAC", own("MAC")),
                ("MASK", inh("NETWORK_MASK")),
                ("NETWORK", inh("NETWORK_ADDRESS")),
                ("GATEWAY", inh("GATEWAY")),
                ("DNS", inh("DNS")),
                ("SEARCH_DOMAIN", inh("SEARCH_DOMAIN")),
                ("MTU", inh("GUEST_MTU")),
                ("METRIC", inh("METRIC")),
                ("METHOD", inh("METHOD")),
                ("VLAN_ID", inh("VLAN_ID")),
                ("VROUTER_IP", own("VROUTER_IP")),
                ("VROUTER_MANAGEMENT", own("VROUTER_MANAGEMENT")),
                ("EXTERNAL", own("EXTERNAL")),
                ("ROUTES", inh("ROUTES")),
                ("IP6", ip6),
                ("IP6_ULA", own("IP6_ULA")),
                ("IP6_GATEWAY", inh("GATEWAY6")),
                ("IP6_METRIC", inh("IP6_METRIC")),
                ("IP6_METHOD", inh("IP6_METHOD")),
                ("IP6_PREFIX_LENGTH", inh("PREFIX_LENGTH")),
                ("VROUTER_IP6", own("VROUTER_IP6")),
            ] {
                eth.push((format!("{p}{k}"), v));
            }
            nic_id += 1;
        }
        let ip = leases
            .first()
            .map(|(l, _)| l.ip.to_string())
            .unwrap_or_else(|| vm_ip(self.knobs.loopback_net, id));
        let (disks, context_target) = self.resolve_disks(&mut sys, uid)?;
        sys.set("TEMPLATE_ID", &tid.to_string());
        sys.set("TM_MAD_SYSTEM", "ssh");
        sys.set("VMID", &id.to_string());
        sys.set(
            "AUTOMATIC_REQUIREMENTS",
            "!(PUBLIC_CLOUD = YES) & !(PIN_POLICY = PINNED)",
        );
        let token = random_hex(16);
        // CONTEXT the way oned generates it for one-context.
        let lookup = |k: &str| sys.get(k).or_else(|| user.get(k)).map(str::to_string);
        let ctx = match sys.get_vec("CONTEXT") {
            Some(c) => {
                let mut c = c.clone();
                for (_, v) in c.iter_mut() {
                    *v = substitute(v, &lookup);
                }
                if vec_get(&c, "NETWORK").is_some_and(|v| v.eq_ignore_ascii_case("YES")) {
                    for (k, v) in &eth {
                        vec_set(&mut c, k, v);
                    }
                }
                if vec_get(&c, "TOKEN").is_some_and(|v| v.eq_ignore_ascii_case("YES")) {
                    vec_set(&mut c, "ONEGATE_ENDPOINT", &self.onegate_endpoint_for(&eth));
                    vec_set(&mut c, "VMID", &id.to_string());
                }
                let n_disks = sys.attrs.iter().filter(|a| a.name == "DISK").count();
                vec_set(&mut c, "DISK_ID", &n_disks.to_string());
                vec_set(&mut c, "TARGET", &context_target);
                Some(c)
            }
            None => None,
        };
        if let Some(c) = ctx {
            sys.remove("CONTEXT");
            sys.push(Attr {
                name: "CONTEXT".into(),
                val: Val::V(c),
            });
        }
        let name = if name.is_empty() {
            format!("{tname}-{id}")
        } else {
            name.to_string()
        };
        let vm = Vm {
            id,
            own: self.owner(uid),
            name,
            state: S_INIT,
            lcm: 0,
            prev_state: 0,
            prev_lcm: 0,
            resched: 0,
            stime: epoch_s(),
            etime: 0,
            deploy_id: String::new(),
            lock: None,
            template: sys,
            user_template: user,
            history: vec![],
            due: None,
            ready_at: None,
            token,
            ip,
            last_poll: 0,
        };
        Ok((vm, disks, leases))
    }

    /// The ONEGATE_ENDPOINT a VM is given: oned.conf's, or, in the image runtime without one,
    /// OneGate on NIC 0's gateway (the bridge's host address), which the machine reaches
    /// on its own link (`Knobs::onegate_gateway_port`).
    fn onegate_endpoint_for(&self, eth: &[(String, String)]) -> String {
        let gw = eth
            .iter()
            .find(|(k, _)| k == "ETH0_GATEWAY")
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty());
        match (self.knobs.onegate_gateway_port, gw) {
            (Some(port), Some(gw)) => format!("http://{gw}:{port}"),
            _ => self.knobs.onegate_endpoint.clone(),
        }
    }

    /// `one.user.allocate`: a new user in group 1 (`users`), as oned places users
    /// created without a group.
    pub fn alloc_user(&mut self, name: &str, pass: &str, driver: &str) -> Result<i64, OneErr> {
        if name.is_empty() || name.contains([':', ' ']) {
            return Err(err(ALLOCATE, "Error allocating a new user. Invalid NAME"));
        }
        if let Some(u) = self.users.values().find(|u| u.name == name) {
            return Err(err(
                ALLOCATE,
                format!(
                    "Error allocating a new user. NAME is already taken by USER {}.",
                    u.id
                ),
            ));
        }
        let id = self.next.user;
        self.next.user += 1;
        let mut t = Template::default();
        t.set("TOKEN_PASSWORD", &random_hex(32));
        let driver = if driver.is_empty() { "core" } else { driver }.to_string();
        self.users.insert(
            id,
            User {
                id,
                name: name.to_string(),
                password: pass.to_string(),
                gid: 1,
                gname: "users".into(),
                driver,
                enabled: true,
                template: t,
                tokens: vec![],
            },
        );
        self.dirty = true;
        Ok(id)
    }

    pub fn alloc_template(&mut self, tmpl: &str, uid: i64) -> Result<i64, OneErr> {
        let t = Template::parse(tmpl).map_err(|e| err(INTERNAL, e))?;
        let id = self.next.template;
        let name = t
            .get("NAME")
            .map(str::to_string)
            .unwrap_or_else(|| format!("template-{id}"));
        if self
            .templates
            .values()
            .any(|x| x.name == name && x.own.uid == uid)
        {
            return Err(err(
                ALLOCATE,
                format!("Error allocating a new virtual machine template. NAME is already taken by TEMPLATE {}.",
                    self.templates.values().find(|x| x.name == name).map(|x| x.id).unwrap_or(-1)),
            ));
        }
        let mut t = t;
        t.remove("NAME");
        self.next.template += 1;
        let own = self.owner(uid);
        self.templates.insert(
            id,
            VmTemplate {
                id,
                own,
                name,
                regtime: epoch_s(),
                template: t,
                lock: None,
            },
        );
        self.dirty = true;
        Ok(id)
    }

    pub fn alloc_vnet(&mut self, tmpl: &str, uid: i64) -> Result<i64, OneErr> {
        let mut t = Template::parse(tmpl).map_err(|e| err(INTERNAL, e))?;
        let Some(name) = t.get("NAME").map(str::to_string) else {
            return Err(err(
                ALLOCATE,
                "Error allocating a new virtual network. No NAME in template.",
            ));
        };
        if self
            .vnets
            .values()
            .any(|x| x.name == name && x.own.uid == uid)
        {
            return Err(err(
                ALLOCATE,
                "Error allocating a new virtual network. NAME is already taken.",
            ));
        }
        t.remove("NAME");
        if !t.has("VN_MAD") && !t.has("BRIDGE") {
            return Err(err(
                ALLOCATE,
                "Error allocating a new virtual network. No VN_MAD in template",
            ));
        }
        let ar_leases = crate::lease::init_ars(&mut t)?;
        let id = self.next.vnet;
        self.next.vnet += 1;
        let own = self.owner(uid);
        self.vnets.insert(
            id,
            Vnet {
                id,
                own,
                name,
                template: t,
                lock: None,
                ar_leases,
            },
        );
        self.dirty = true;
        Ok(id)
    }

    pub fn alloc_doc(
        &mut self,
        name: &str,
        doc_type: i64,
        body: serde_json::Value,
        uid: i64,
    ) -> i64 {
        let id = self.next.doc;
        self.next.doc += 1;
        let own = self.owner(uid);
        self.docs.insert(
            id,
            Doc {
                id,
                own,
                name: name.to_string(),
                doc_type,
                body,
                template: Default::default(),
                lock: None,
            },
        );
        self.dirty = true;
        id
    }
}

impl OneErr {
    pub fn with_id(mut self, id: i64) -> OneErr {
        self.resp_id = id;
        self
    }
}

/// Next state of a transient state, or None for a stable one.
pub fn next_of(state: u32, lcm: u32) -> Option<(u32, u32)> {
    Some(match (state, lcm) {
        (S_PENDING, _) => (S_ACTIVE, L_PROLOG),
        (S_ACTIVE, L_PROLOG) => (S_ACTIVE, L_BOOT),
        (S_ACTIVE, L_BOOT) => (S_ACTIVE, L_RUNNING),
        (S_ACTIVE, L_SHUTDOWN) => (S_ACTIVE, L_EPILOG),
        (S_ACTIVE, L_EPILOG) => (S_DONE, 0),
        (S_ACTIVE, 18) => (S_POWEROFF, 0),
        (S_ACTIVE, 20) | (S_ACTIVE, 21) | (S_ACTIVE, 22) | (S_ACTIVE, 32) => (S_ACTIVE, L_RUNNING),
        (S_ACTIVE, 29) => (S_ACTIVE, 30),
        (S_ACTIVE, 30) => (S_UNDEPLOYED, 0),
        (S_ACTIVE, 31) => (S_ACTIVE, 32),
        (S_ACTIVE, 5) => (S_ACTIVE, 10),
        (S_ACTIVE, 10) => (S_STOPPED, 0),
        (S_ACTIVE, 6) => (S_SUSPENDED, 0),
        (S_ACTIVE, 9) => (S_ACTIVE, 22),
        _ => return None,
    })
}

/// Replaces `$NAME` references with template values (unknown references are kept).
pub fn substitute(v: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(v.len());
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let start = i + 1;
            let mut j = start;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            if j > start {
                let name = &v[start..j];
                if let Some(val) = lookup(&name.to_ascii_uppercase()) {
                    out.push_str(&val);
                    i = j;
                    continue;
                }
            }
        }
        let ch = v[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st() -> State {
        let mut s = State::new("oneadmin", "pw");
        s.knobs.vm_step_ms = 0;
        s.knobs.onegate_endpoint = "http://127.0.0.1:5030".into();
        s
    }

    fn run_until_stable(s: &mut State) {
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            s.tick();
        }
    }

    #[test]
    fn lifecycle_and_actions() {
        let mut s = st();
        s.alloc_vnet(
            "NAME=net\nVN_MAD=bridge\nBRIDGE=br0\nAR=[TYPE=IP4,IP=127.0.1.1,SIZE=10]",
            0,
        )
        .unwrap();
        let t = s
            .alloc_template("NAME=t\nCPU=1\nMEMORY=64\nNIC=[NETWORK_ID=0]\nCONTEXT=[NETWORK=YES,TOKEN=YES,X=\"$MYVAR\"]\nMYVAR=v", 0)
            .unwrap();
        let id = s.instantiate(t, "", false, "", 0).unwrap();
        assert_eq!(s.vms[&id].name, "t-0");
        assert_eq!(s.vms[&id].state, S_PENDING);
        run_until_stable(&mut s);
        let vm = &s.vms[&id];
        assert!(vm.is_running());
        let ctx = vm.template.get_vec("CONTEXT").unwrap();
        assert_eq!(vec_get(ctx, "ETH0_IP"), Some("127.0.1.1"));
        assert_eq!(vec_get(ctx, "X"), Some("v"));
        assert_eq!(vec_get(ctx, "VMID"), Some("0"));
        assert_eq!(vm.user_template.get("MYVAR"), Some("v"));
        assert_eq!(s.effects, vec![Effect::Start(id)]);
        assert!(s
            .vm_action("resume", id)
            .unwrap_err()
            .msg
            .contains("not available for state RUNNING"));
        assert_eq!(s.vm_action("bogus", id).unwrap_err().code, ACTION);
        s.vm_action("poweroff", id).unwrap();
        run_until_stable(&mut s);
        assert_eq!(s.vms[&id].state, S_POWEROFF);
        s.vm_action("resume", id).unwrap();
        run_until_stable(&mut s);
        assert!(s.vms[&id].is_running());
        // The guest is asked to stop (Stop), or killed first with the -hard variants.
        s.effects.clear();
        s.vm_action("poweroff-hard", id).unwrap();
        assert_eq!(s.effects, vec![Effect::Kill(id), Effect::Stop(id)]);
        run_until_stable(&mut s);
        s.vm_action("resume", id).unwrap();
        run_until_stable(&mut s);
        s.effects.clear();
        s.vm_action("reboot", id).unwrap();
        s.vm_action("reboot-hard", id).unwrap();
        assert_eq!(
            s.effects,
            vec![
                Effect::Reboot { id, hard: false },
                Effect::Reboot { id, hard: true }
            ]
        );
        assert!(s.vms[&id].is_running(), "a reboot keeps the VM RUNNING");
        s.effects.clear();
        s.vm_action("terminate-hard", id).unwrap();
        assert_eq!(s.effects, vec![Effect::Kill(id), Effect::Stop(id)]);
        assert_eq!(s.vms[&id].lcm, L_SHUTDOWN);
        run_until_stable(&mut s);
        assert_eq!(s.vms[&id].state, S_DONE);
        assert!(s.vms[&id].etime > 0);
    }

    #[test]
    fn boot_failure_and_recover() {
        let mut s = st();
        let t = s.alloc_template("NAME=t\nCPU=1\nMEMORY=64", 0).unwrap();
        s.boot_failures = 1;
        let id = s.instantiate(t, "x", false, "", 0).unwrap();
        run_until_stable(&mut s);
        assert_eq!(s.vms[&id].lcm, L_BOOT_FAILURE);
        s.vm_recover(id, 2).unwrap();
        run_until_stable(&mut s);
        assert!(s.vms[&id].is_running());
        assert!(s.vm_recover(id, 2).is_err());
    }

    #[test]
    fn substitute_refs() {
        let f = |k: &str| (k == "A").then(|| "1".to_string());
        assert_eq!(substitute("x$A-$B$", &f), "x1-$B$");
    }

    /// `PoolSQL::usr_filter` and the USE/MANAGE bits: a non-admin sees another user's
    /// object only once it is shared; "mine" (-3) never shows it, even to oneadmin.
    #[test]
    fn pool_filters_and_permissions_follow_oned() {
        let mut s = st();
        let a = s.alloc_user("a", "pw", "core").unwrap();
        let b = s.alloc_user("b", "pw", "core").unwrap();
        let mut o = s.owner(b);
        assert_eq!(o.perms, 0o600);
        assert!(!s.visible(a, -2, &o) && !s.visible(a, b, &o) && !s.visible(a, -4, &o));
        assert!(s.visible(0, -2, &o) && !s.visible(0, -3, &o) && s.visible(0, b, &o));
        assert!(s.visible(b, -3, &o) && s.visible(b, -2, &o));
        o.perms = chmod_flags(o.perms, [-1, -1, -1, -1, -1, -1, 1, -1, -1]);
        assert_eq!(o.perms, 0o604);
        assert!(s.visible(a, -2, &o) && s.visible(a, b, &o) && s.visible(a, -4, &o));
        assert!(!s.visible(a, -3, &o));
        assert!(s.may(a, &o, Op::Use) && !s.may(a, &o, Op::Manage));
        o.perms = 0o660;
        assert!(s.visible(a, -1, &o), "same group, GROUP_U");
        assert!(s.may(a, &o, Op::Manage));
        assert_eq!(o.perm_flags(), [1, 1, 0, 1, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn chmod_through_xml_rpc_needs_manage_and_shares_the_object() {
        use crate::xmlrpc::{Resp, XVal};
        let mut s = st();
        let a = s.alloc_user("a", "pw", "core").unwrap();
        let b = s.alloc_user("b", "pw", "core").unwrap();
        let t = s.alloc_template("NAME=\"t\"", b).unwrap();
        let chmod = |other_u: i64| {
            let mut p = vec![XVal::Str("s".into()), XVal::Int(t)];
            p.extend([-1, -1, -1, -1, -1, -1, other_u, -1, -1].map(XVal::Int));
            p
        };
        let pool = [-2, -1, -1].map(XVal::Int);
        let list = |s: &mut State| {
            let mut p = vec![XVal::Str("s".into())];
            p.extend(pool.clone());
            match crate::oned::dispatch(s, "one.templatepool.info", &p, a) {
                Resp::Ok(crate::xmlrpc::OkVal::Str(x)) => x,
                other => panic!("{other:?}"),
            }
        };
        assert!(!list(&mut s).contains("<NAME>t</NAME>"));
        let denied = crate::oned::dispatch(&mut s, "one.template.chmod", &chmod(1), a);
        assert!(
            matches!(
                denied,
                Resp::Err {
                    code: AUTHORIZATION,
                    ..
                }
            ),
            "{denied:?}"
        );
        let ok = crate::oned::dispatch(&mut s, "one.template.chmod", &chmod(1), b);
        assert!(matches!(ok, Resp::Ok(_)), "{ok:?}");
        let listed = list(&mut s);
        assert!(listed.contains("<NAME>t</NAME>") && listed.contains("<OTHER_U>1</OTHER_U>"));
    }
}
