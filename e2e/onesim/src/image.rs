//! OpenNebula images and the DISKs that use them, as oned has them (OpenNebula/one
//! `src/rm/api/ImageAPI.cc`, `src/image/{ImagePool,Image,ImageManagerActions}.cc`,
//! `src/vm/VirtualMachineDisk.cc`; facts in docs/upstream-notes.md §1.9, §1.10).
//!
//! Owns: `one.image.allocate`'s checks and fields, the copy into onesim's datastore
//! directory (queued as [`Effect::CopyImage`], finished by [`State::image_copied`]), image
//! states LOCKED → READY ⇄ USED, `one.image.delete`, and DISK resolution at instantiate
//! ([`State::resolve_disks`]) with oned's DISK attributes, targets and errors.
//! Guarantees: an image is acquired only by an instantiate that succeeds and released when
//! its VM reaches DONE (`image_tests::disk_resolution_use_and_release`); an image in use is
//! never deleted (`images_follow_oned` in tests/xmlrpc.rs); the file at PATH is only read.
//! Caveats (deviations, README "Fidelity"): datastore 1 `default` has no SAFE_DIRS
//! restriction (oned's default copies only from /var/tmp): onesim runs as the user who
//! built the image; SOURCE's file name is random hex, not md5("<epoch>:<id>"); SIZE is
//! read from the qcow2 header or the file length (no compressed images); the datastores
//! are 0 `system` and 1 `default` only; delete removes the file and the image at once
//! (oned passes through DELETE while its driver runs `rm`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::{
    epoch_s, err, no_exists, Effect, Lock, OneErr, Op, Owner, State, ACTION, ALLOCATE,
    AUTHORIZATION, INTERNAL, S_PENDING,
};
use crate::template::{vec_get, vec_set, Template, Val};

pub const I_INIT: u32 = 0;
pub const I_READY: u32 = 1;
pub const I_USED: u32 = 2;
pub const I_LOCKED: u32 = 4;
pub const I_ERROR: u32 = 5;
pub const I_USED_PERS: u32 = 8;
pub const I_LOCKED_USED: u32 = 9;
pub const I_LOCKED_USED_PERS: u32 = 10;

/// `include/Image.h` ImageState names, by number.
pub const IMAGE_STATE_NAMES: [&str; 11] = [
    "INIT",
    "READY",
    "USED",
    "DISABLED",
    "LOCKED",
    "ERROR",
    "CLONE",
    "DELETE",
    "USED_PERS",
    "LOCKED_USED",
    "LOCKED_USED_PERS",
];

/// `Image::str_to_type` words, by TYPE number.
pub const IMAGE_TYPES: [&str; 8] = [
    "OS",
    "CDROM",
    "DATABLOCK",
    "KERNEL",
    "RAMDISK",
    "CONTEXT",
    "BACKUP",
    "FILESYSTEM",
];
const T_OS: u32 = 0;
const T_CDROM: u32 = 1;
const T_DATABLOCK: u32 = 2;

/// The image datastore every image lives in (`DatastorePool`'s `default`).
pub const DEFAULT_DS: i64 = 1;
pub const DEFAULT_DS_NAME: &str = "default";

/// VM state CLONING (a disk's image is still being copied) and CLONING_FAILURE.
pub const S_CLONING: u32 = 10;
pub const S_CLONING_FAILURE: u32 = 11;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub id: i64,
    pub own: Owner,
    pub name: String,
    pub lock: Option<Lock>,
    pub img_type: u32,
    pub persistent: bool,
    pub regtime: i64,
    pub modtime: i64,
    /// The copy in onesim's datastore directory; empty until the copy is done.
    pub source: String,
    pub path: String,
    /// `qcow2` or `raw`, known once the copy is done.
    pub format: String,
    /// MiB (virtual size for qcow2).
    pub size_mb: u64,
    pub state: u32,
    pub prev_state: u32,
    /// VMs using the image (`VMS`; `RUNNING_VMS` is its length).
    pub vms: BTreeSet<i64>,
    pub template: Template,
    /// While LOCKED: where the copy goes and the format it will have.
    pub pending: Option<PendingCopy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingCopy {
    pub to: String,
    pub format: String,
}

impl Image {
    pub fn state_name(&self) -> &'static str {
        IMAGE_STATE_NAMES
            .get(self.state as usize)
            .copied()
            .unwrap_or("UNKNOWN")
    }

    fn set_state(&mut self, s: u32) {
        self.prev_state = self.state;
        self.state = s;
        self.modtime = epoch_s();
    }
}

/// `PoolObjectSQL::name_is_valid`.
fn name_error(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("Invalid NAME, it cannot be empty")
    } else if name.chars().count() > 128 {
        Some("Invalid NAME, max length is 128 chars")
    } else if name.contains([
        '&', '|', ':', '\\', '"', ';', '/', '\'', '#', '{', '}', '$', '<', '>', '\t', '\n', '\r',
        '\x0b', '\x0c',
    ]) {
        Some("Invalid NAME, char '&|:\\\";/'#{}$<>' or whitespace are not allowed")
    } else {
        None
    }
}

/// The datastore driver's `stat`: the image's size in MiB (rounded up) and its format. A
/// qcow2 file's virtual size is at bytes 24..32 of its header (big-endian).
pub fn stat_file(path: &Path) -> Result<(u64, String), String> {
    let meta = std::fs::metadata(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "No such file or directory".to_string(),
            std::io::ErrorKind::PermissionDenied => "Permission denied".to_string(),
            _ => e.to_string(),
        };
        format!("cannot access '{}' ({why})", path.display())
    })?;
    if !meta.is_file() {
        return Err(format!("'{}' is not a regular file", path.display()));
    }
    let mut head = [0u8; 32];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| format!("cannot read '{}' ({e})", path.display()))?;
    let (bytes, format) = if n == 32 && head[..4] == *b"QFI\xfb" {
        let mut v = [0u8; 8];
        v.copy_from_slice(&head[24..32]);
        (u64::from_be_bytes(v), "qcow2")
    } else {
        (meta.len(), "raw")
    };
    Ok((bytes.div_ceil(1024 * 1024), format.to_string()))
}

fn alloc_err(msg: impl std::fmt::Display) -> OneErr {
    err(ALLOCATE, format!("Error allocating a new image. {msg}"))
}

/// A DISK resolved at instantiate: which image it takes (if any).
#[derive(Debug, Clone)]
pub struct DiskUse {
    pub image: i64,
}

impl State {
    pub fn image(&self, id: i64) -> Result<&Image, OneErr> {
        self.images.get(&id).ok_or_else(|| no_exists("image", id))
    }

    /// `one.image.allocate`: checks in oned's order, the image LOCKED, the copy queued.
    pub fn alloc_image(&mut self, tmpl: &str, ds: i64, uid: i64) -> Result<i64, OneErr> {
        let mut t = Template::parse(tmpl).map_err(|e| err(INTERNAL, e))?;
        match ds {
            DEFAULT_DS => {}
            0 => {
                return Err(alloc_err(
                    "New images can only be allocated in a files or image datastore.",
                ))
            }
            _ => return Err(no_exists("datastore", ds)),
        }
        let path = t.get("PATH").unwrap_or("").to_string();
        let source = t.get("SOURCE").unwrap_or("").to_string();
        if path.is_empty() {
            // Empty disks (mkfs) and SOURCE-only registrations are not simulated.
            return Err(err(
                INTERNAL,
                "onesim registers images from a local PATH only (no SOURCE, no empty disks)",
            ));
        }
        let (size_mb, format) = stat_file(Path::new(&path))
            .map_err(|e| err(INTERNAL, format!("Cannot parse image SIZE: {e}")))?;
        if !self.is_admin(uid) && !source.is_empty() {
            return Err(err(
                AUTHORIZATION,
                format!("User [{uid}] : Template includes a restricted attribute SOURCE."),
            ));
        }
        let name = t.get("NAME").unwrap_or("").to_string();
        if let Some(e) = name_error(&name) {
            return Err(alloc_err(e));
        }
        if let Some(other) = self
            .images
            .values()
            .find(|i| i.name == name && i.own.uid == uid)
        {
            return Err(alloc_err(format!(
                "NAME is already taken by IMAGE {}.",
                other.id
            )));
        }
        let img_type = match t.get("TYPE") {
            None => T_OS,
            Some(w) => IMAGE_TYPES
                .iter()
                .position(|x| x.eq_ignore_ascii_case(w.trim()))
                .ok_or_else(|| alloc_err("Unknown type "))? as u32,
        };
        if !matches!(img_type, T_OS | T_CDROM | T_DATABLOCK) {
            return Err(alloc_err(
                "IMAGE type not supported in datastore default (IMAGE_DS)",
            ));
        }
        let persistent = img_type != T_CDROM
            && t.get("PERSISTENT")
                .is_some_and(|v| v.eq_ignore_ascii_case("YES"));
        for k in [
            "NAME",
            "TYPE",
            "PERSISTENT",
            "SIZE",
            "FS",
            "PATH",
            "SOURCE",
            "FORMAT",
            "TM_MAD",
            "DRIVER",
        ] {
            t.remove(k);
        }
        if img_type == T_CDROM {
            t.remove("DEV_PREFIX");
        } else if !t.has("DEV_PREFIX") {
            t.set("DEV_PREFIX", "sd");
        }
        let id = self.next_image;
        self.next_image += 1;
        let to = self
            .knobs
            .datastore_dir
            .join(DEFAULT_DS.to_string())
            .join(crate::state::random_hex(16));
        let now = epoch_s();
        self.images.insert(
            id,
            Image {
                id,
                own: self.owner(uid),
                name,
                lock: None,
                img_type,
                persistent,
                regtime: now,
                modtime: now,
                source: String::new(),
                path: path.clone(),
                format: String::new(),
                size_mb,
                state: I_LOCKED,
                prev_state: I_INIT,
                vms: BTreeSet::new(),
                template: t,
                pending: Some(PendingCopy {
                    to: to.to_string_lossy().into_owned(),
                    format,
                }),
            },
        );
        self.effects.push(Effect::CopyImage {
            id,
            from: PathBuf::from(path),
            to,
        });
        self.dirty = true;
        Ok(id)
    }

    /// The copy of image `id` ended (`ImageManager::_cp`): LOCKED → READY, LOCKED_USED →
    /// USED, the VMs waiting in CLONING go on; a failure leaves the image in ERROR with
    /// oned's message and its waiting VMs in CLONING_FAILURE.
    pub fn image_copied(&mut self, id: i64, result: Result<(), String>) {
        let Some(img) = self.images.get_mut(&id) else {
            return;
        };
        let Some(p) = img.pending.take() else {
            return;
        };
        let ok = result.is_ok();
        match result {
            Ok(()) => {
                img.source = p.to;
                img.format = p.format;
                let next = match img.state {
                    I_LOCKED_USED => I_USED,
                    I_LOCKED_USED_PERS => I_USED_PERS,
                    _ => I_READY,
                };
                img.set_state(next);
            }
            Err(e) => {
                img.set_state(I_ERROR);
                let date = chrono::Utc::now().format("%a %b %e %H:%M:%S %Y");
                img.template.set(
                    "ERROR",
                    &format!("{date} : Error copying image in the datastore: {e}"),
                );
            }
        }
        let (source, format, state) = (img.source.clone(), img.format.clone(), img.state);
        self.dirty = true;
        let waiting: Vec<i64> = self
            .vms
            .values()
            .filter(|v| v.state == S_CLONING)
            .map(|v| v.id)
            .collect();
        let sid = id.to_string();
        for vmid in waiting {
            let Some(vm) = self.vms.get_mut(&vmid) else {
                continue;
            };
            let mut still_cloning = false;
            for a in vm.template.attrs.iter_mut().filter(|a| a.name == "DISK") {
                let Val::V(d) = &mut a.val else { continue };
                if vec_get(d, "IMAGE_ID") == Some(sid.as_str()) && ok {
                    d.retain(|(k, _)| k != "CLONING");
                    vec_set(d, "SOURCE", &source);
                    vec_set(d, "IMAGE_STATE", &state.to_string());
                    if !format.is_empty() {
                        vec_set(d, "DRIVER", &format);
                        vec_set(d, "FORMAT", &format);
                    }
                }
                still_cloning |= vec_get(d, "CLONING").is_some();
            }
            if !ok {
                self.set_state(vmid, S_CLONING_FAILURE, 0);
            } else if !still_cloning {
                self.set_state(vmid, S_PENDING, 0);
            }
        }
    }

    /// `one.image.delete` (`ImageAPI::del_image`): refused while locked (without force) or
    /// used; otherwise the image and its datastore file go.
    pub fn delete_image(&mut self, id: i64, force: bool, uid: i64) -> Result<i64, OneErr> {
        let img = self.image(id)?;
        let locked = matches!(img.state, I_LOCKED | I_LOCKED_USED | I_LOCKED_USED_PERS);
        if locked && !force {
            return Err(err(
                INTERNAL,
                "Image locked, use --force flag to remove the image. Force delete may leave some files on Datastore",
            )
            .with_id(id));
        }
        self.authorize(uid, &img.own, Op::Manage, "image")?;
        if !img.vms.is_empty() || matches!(img.state, I_USED | I_USED_PERS) {
            return Err(err(
                ACTION,
                format!(
                    "Cannot delete image. There are {} VMs using it.",
                    img.vms.len()
                ),
            )
            .with_id(id));
        }
        if let Some(img) = self.images.remove(&id) {
            let file = img.pending.map(|p| p.to).unwrap_or(img.source);
            if !file.is_empty() {
                self.effects.push(Effect::RemoveFile(PathBuf::from(file)));
            }
        }
        self.dirty = true;
        Ok(id)
    }

    /// Resolves every DISK of a VM being built (`VirtualMachineDisks::get_images`), fills
    /// the DISK attributes as oned writes them and assigns targets; returns the images to
    /// acquire (nothing is changed: [`State::acquire_images`] commits once the VM exists)
    /// and the context CD's TARGET.
    pub fn resolve_disks(
        &self,
        sys: &mut Template,
        uid: i64,
    ) -> Result<(Vec<DiskUse>, String), OneErr> {
        let fail = |i: usize, m: String| {
            err(
                ALLOCATE,
                format!("Error allocating a new virtual machine template. DISK {i}: {m}"),
            )
        };
        let mut uses = Vec::new();
        // (attr index, image type or None for a volatile disk) in DISK order.
        let mut kinds: Vec<(usize, Option<u32>)> = Vec::new();
        let mut used_targets: BTreeSet<String> = BTreeSet::new();
        let mut i = 0usize;
        for (ai, a) in sys.attrs.iter_mut().enumerate() {
            if a.name != "DISK" {
                continue;
            }
            let Val::V(d) = &mut a.val else {
                continue;
            };
            let img = if let Some(iid) = vec_get(d, "IMAGE_ID") {
                let n: i64 = iid.trim().parse().map_err(|_| {
                    fail(i, format!("Image with ID: {} does not exist", iid.trim()))
                })?;
                Some(
                    self.images
                        .get(&n)
                        .ok_or_else(|| fail(i, format!("Image with ID: {n} does not exist")))?,
                )
            } else if let Some(name) = vec_get(d, "IMAGE") {
                let owner = vec_get(d, "IMAGE_UID")
                    .and_then(|u| u.trim().parse::<i64>().ok())
                    .or_else(|| {
                        vec_get(d, "IMAGE_UNAME")
                            .and_then(|n| self.users.values().find(|u| u.name == n).map(|u| u.id))
                    })
                    .unwrap_or(uid);
                Some(
                    self.images
                        .values()
                        .find(|x| x.name == name && x.own.uid == owner)
                        .ok_or_else(|| {
                            fail(i, format!("User {owner} does not own an image with name: {name} . Set IMAGE_UNAME or IMAGE_UID of owner in DISK."))
                        })?,
                )
            } else {
                None
            };
            let Some(img) = img else {
                vec_set(d, "DISK_ID", &i.to_string());
                if let Some(t) = vec_get(d, "TARGET") {
                    used_targets.insert(t.to_string());
                }
                kinds.push((ai, None));
                i += 1;
                continue;
            };
            if !self.may(uid, &img.own, Op::Use) {
                return Err(err(
                    AUTHORIZATION,
                    format!(
                        "User [{uid}] : Not authorized to perform USE IMAGE [{}].",
                        img.id
                    ),
                ));
            }
            let cloning = match img.state {
                I_READY | I_USED => false,
                I_LOCKED | I_LOCKED_USED => true,
                I_USED_PERS | I_LOCKED_USED_PERS => {
                    return Err(fail(
                        i,
                        format!(
                            "Cannot acquire image {}, it is persistent and already in use",
                            img.id
                        ),
                    ))
                }
                _ => {
                    return Err(fail(
                        i,
                        format!(
                            "Cannot acquire image {}, it is in state: {}",
                            img.id,
                            img.state_name()
                        ),
                    ))
                }
            };
            if img.persistent
                && (!img.vms.is_empty() || uses.iter().any(|u: &DiskUse| u.image == img.id))
            {
                return Err(fail(
                    i,
                    format!(
                        "Cannot acquire image {}, it is persistent and already in use",
                        img.id
                    ),
                ));
            }
            // The state the image will be in once this VM holds it (IMAGE_STATE).
            let after = match (cloning, img.persistent) {
                (false, false) => I_USED,
                (false, true) => I_USED_PERS,
                (true, false) => I_LOCKED_USED,
                (true, true) => I_LOCKED_USED_PERS,
            };
            let size = img.size_mb.to_string();
            let mut set = |k: &str, v: &str| vec_set(d, k, v);
            set("ALLOW_ORPHANS", "FORMAT");
            set("CLONE_TARGET", "SYSTEM");
            set("CLUSTER_ID", "0");
            set("DATASTORE", DEFAULT_DS_NAME);
            set("DATASTORE_ID", &DEFAULT_DS.to_string());
            set("DISK_ID", &i.to_string());
            set("DISK_SNAPSHOT_TOTAL_SIZE", "0");
            set("IMAGE", &img.name);
            set("IMAGE_ID", &img.id.to_string());
            set("IMAGE_STATE", &after.to_string());
            set("LN_TARGET", "SYSTEM");
            set("ORIGINAL_SIZE", &size);
            set("PERSISTENT_SNAPSHOTS", "YES");
            set("SOURCE", &img.source);
            set("TM_MAD", "local");
            if cloning {
                set("CLONING", "YES");
            }
            if !img.format.is_empty() {
                set("DRIVER", &img.format);
                set("FORMAT", &img.format);
            }
            if img.img_type == T_CDROM {
                set("CLONE", "NO");
                set("READONLY", "YES");
                set("SAVE", "NO");
                set("TYPE", "CDROM");
            } else {
                set("CLONE", if img.persistent { "NO" } else { "YES" });
                set("READONLY", "NO");
                set("SAVE", if img.persistent { "YES" } else { "NO" });
                set("TYPE", "FILE");
                if img.persistent {
                    set("PERSISTENT", "YES");
                }
                if vec_get(d, "DEV_PREFIX").is_none() {
                    if let Some(p) = img.template.get("DEV_PREFIX") {
                        vec_set(d, "DEV_PREFIX", p);
                    }
                }
            }
            match vec_get(d, "SIZE").and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(s) if s < img.size_mb => {
                    return Err(fail(
                        i,
                        format!(
                            "SIZE of {s}MB is less than the image [{}] size of {}MB.",
                            img.id, img.size_mb
                        ),
                    ))
                }
                Some(_) => {}
                None => vec_set(d, "SIZE", &size),
            }
            let target = vec_get(d, "TARGET")
                .or_else(|| img.template.get("TARGET"))
                .map(str::to_string);
            if let Some(t) = target {
                if !used_targets.insert(t.clone()) {
                    return Err(fail(
                        i,
                        format!("Two disks have defined the same target {t}"),
                    ));
                }
                vec_set(d, "TARGET", &t);
            }
            kinds.push((ai, Some(img.img_type)));
            uses.push(DiskUse { image: img.id });
            i += 1;
        }
        // Targets (`assign_disk_targets`): the first OS disk, the CDROMs, the context CD,
        // then the rest, each taking the first free letter of its prefix.
        let first_os = kinds.iter().position(|(_, k)| *k == Some(T_OS));
        let mut order: Vec<Option<usize>> = Vec::new();
        order.extend(first_os.map(|p| Some(kinds[p].0)));
        order.extend(
            kinds
                .iter()
                .filter(|(_, k)| *k == Some(T_CDROM))
                .map(|(ai, _)| Some(*ai)),
        );
        order.push(None); // the context CD
        order.extend(
            kinds
                .iter()
                .enumerate()
                .filter(|(p, (_, k))| Some(*p) != first_os && *k != Some(T_CDROM))
                .map(|(_, (ai, _))| Some(*ai)),
        );
        let mut context_target = String::new();
        for slot in order {
            let Some(ai) = slot else {
                context_target = next_target("hd", &mut used_targets);
                continue;
            };
            let Val::V(d) = &mut sys.attrs[ai].val else {
                continue;
            };
            if vec_get(d, "TARGET").is_some() {
                continue;
            }
            let prefix = if vec_get(d, "TYPE") == Some("CDROM") {
                "hd".to_string()
            } else {
                vec_get(d, "DEV_PREFIX").unwrap_or("sd").to_string()
            };
            let t = next_target(&prefix, &mut used_targets);
            vec_set(d, "TARGET", &t);
        }
        Ok((uses, context_target))
    }

    /// Commits the DISK resolution of VM `vmid` (`ImageManager::acquire_image`).
    pub fn acquire_images(&mut self, vmid: i64, uses: &[DiskUse]) {
        for u in uses {
            if let Some(img) = self.images.get_mut(&u.image) {
                img.vms.insert(vmid);
                let next = match (img.state, img.persistent) {
                    (I_LOCKED | I_LOCKED_USED, false) => I_LOCKED_USED,
                    (I_LOCKED | I_LOCKED_USED_PERS, true) => I_LOCKED_USED_PERS,
                    (_, false) => I_USED,
                    (_, true) => I_USED_PERS,
                };
                if next != img.state {
                    img.set_state(next);
                }
                self.dirty = true;
            }
        }
    }

    /// Gives back the images of VM `vmid` (`release_disk_images`, when it reaches DONE):
    /// RUNNING_VMS − 1, and an unused image is READY again.
    pub fn release_images(&mut self, vmid: i64) {
        for img in self.images.values_mut() {
            if !img.vms.remove(&vmid) {
                continue;
            }
            if img.vms.is_empty() {
                let next = match img.state {
                    I_USED | I_USED_PERS => Some(I_READY),
                    I_LOCKED_USED | I_LOCKED_USED_PERS => Some(I_LOCKED),
                    _ => None,
                };
                if let Some(s) = next {
                    img.set_state(s);
                }
            }
            self.dirty = true;
        }
    }

    /// After loading a state file: copies interrupted by a restart start again.
    pub fn restart_copies(&mut self) {
        for img in self.images.values() {
            if let Some(p) = &img.pending {
                self.effects.push(Effect::CopyImage {
                    id: img.id,
                    from: PathBuf::from(&img.path),
                    to: PathBuf::from(&p.to),
                });
            }
        }
    }
}

/// `prefix` + the first free letter sequence (`a` … `z`, `aa`, …), marked used.
fn next_target(prefix: &str, used: &mut BTreeSet<String>) -> String {
    for n in 0.. {
        let mut s = String::new();
        let mut k = n;
        loop {
            s.insert(0, (b'a' + (k % 26) as u8) as char);
            if k < 26 {
                break;
            }
            k = k / 26 - 1;
        }
        let t = format!("{prefix}{s}");
        if used.insert(t.clone()) {
            return t;
        }
    }
    unreachable!("the target space is unbounded")
}

/// Copies an image file into the datastore (a temporary name first, so a crash never
/// leaves a half-copied SOURCE), as the fs driver's `cp` does. Runs off the state lock.
pub fn copy_image(from: &Path, to: &Path) -> Result<(), String> {
    let dir = to.parent().ok_or("datastore path has no directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = to.with_extension("part");
    std::fs::copy(from, &tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("Error copying {} to {}: {e}", from.display(), to.display())
    })?;
    std::fs::rename(&tmp, to).map_err(|e| format!("{}: {e}", to.display()))
}

/// The images' entries of the persisted counters (a state file from before images has none).
pub type ImageMap = BTreeMap<i64, Image>;

#[cfg(test)]
mod image_tests {
    use super::*;
    use crate::state::{S_DONE, S_HOLD};

    fn st_with_file(dir: &Path, bytes: usize) -> (State, PathBuf) {
        let mut s = State::new("oneadmin", "pw");
        s.knobs.vm_step_ms = 0;
        s.knobs.datastore_dir = dir.join("ds");
        let f = dir.join("disk.raw");
        std::fs::write(&f, vec![0u8; bytes]).unwrap();
        (s, f)
    }

    fn copy_now(s: &mut State) {
        for e in std::mem::take(&mut s.effects) {
            if let Effect::CopyImage { id, from, to } = e {
                let r = copy_image(&from, &to);
                s.image_copied(id, r);
            }
        }
    }

    #[test]
    fn next_target_letters() {
        let mut used: BTreeSet<String> = ["vda".to_string()].into();
        assert_eq!(next_target("vd", &mut used), "vdb");
        let mut many = BTreeSet::new();
        let last = (0..27).map(|_| next_target("sd", &mut many)).last();
        assert_eq!(last.as_deref(), Some("sdaa"));
    }

    /// DISK=[IMAGE=…] by the instantiating user's name, oned's DISK keys and targets,
    /// USED while a VM holds it, READY again at DONE; a held VM keeps it.
    #[test]
    fn disk_resolution_use_and_release() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, f) = st_with_file(tmp.path(), 3 * 1024 * 1024 + 1);
        let img = s
            .alloc_image(
                &format!("NAME=img\nPATH=\"{}\"\nDEV_PREFIX=vd", f.display()),
                1,
                0,
            )
            .unwrap();
        assert_eq!(s.images[&img].state, I_LOCKED);
        assert!(s.images[&img].source.is_empty());
        copy_now(&mut s);
        let i = &s.images[&img];
        assert_eq!((i.state, i.size_mb, i.format.as_str()), (I_READY, 4, "raw"));
        assert!(Path::new(&i.source).is_file());
        let t = s
            .alloc_template(
                "NAME=t\nMEMORY=64\nDISK=[IMAGE=img]\nCONTEXT=[TOKEN=YES]",
                0,
            )
            .unwrap();
        let vm = s.instantiate(t, "", false, "", 0).unwrap();
        let d = s.vms[&vm].template.get_vec("DISK").unwrap().clone();
        for (k, v) in [
            ("IMAGE", "img"),
            ("IMAGE_ID", &img.to_string()[..]),
            ("TARGET", "vda"),
            ("DISK_ID", "0"),
            ("DATASTORE", "default"),
            ("DATASTORE_ID", "1"),
            ("SOURCE", &s.images[&img].source[..]),
            ("FORMAT", "raw"),
            ("IMAGE_STATE", "2"),
            ("SIZE", "4"),
            ("CLONE", "YES"),
            ("TYPE", "FILE"),
        ] {
            assert_eq!(vec_get(&d, k), Some(v), "{k}");
        }
        let ctx = s.vms[&vm].template.get_vec("CONTEXT").unwrap();
        assert_eq!(vec_get(ctx, "TARGET"), Some("hda"));
        assert_eq!(vec_get(ctx, "DISK_ID"), Some("1"));
        assert_eq!(s.images[&img].state, I_USED);
        let held = s.instantiate(t, "", true, "", 0).unwrap();
        assert_eq!(s.vms[&held].state, S_HOLD);
        assert_eq!(s.images[&img].vms.len(), 2);
        let e = s.delete_image(img, false, 0).unwrap_err();
        assert_eq!(e.msg, "Cannot delete image. There are 2 VMs using it.");
        assert_eq!(e.code, ACTION);
        s.vm_action("terminate", vm).unwrap();
        for _ in 0..10 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            s.tick();
        }
        assert_eq!(s.vms[&vm].state, S_DONE);
        assert_eq!(s.images[&img].state, I_USED, "the held VM still uses it");
        s.vm_action("terminate", held).unwrap();
        assert_eq!(s.images[&img].state, I_READY);
        assert!(s.images[&img].vms.is_empty());
        let src = PathBuf::from(&s.images[&img].source);
        s.delete_image(img, false, 0).unwrap();
        assert!(!s.images.contains_key(&img));
        assert!(s
            .effects
            .iter()
            .any(|e| *e == Effect::RemoveFile(src.clone())));
    }

    /// Instantiating on an image still being copied: the VM waits in CLONING, the image is
    /// LOCKED_USED, and both go on when the copy ends.
    #[test]
    fn cloning_waits_for_the_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, f) = st_with_file(tmp.path(), 10);
        let img = s
            .alloc_image(&format!("NAME=img\nPATH=\"{}\"", f.display()), 1, 0)
            .unwrap();
        let t = s
            .alloc_template(&format!("NAME=t\nDISK=[IMAGE_ID={img}]"), 0)
            .unwrap();
        let vm = s.instantiate(t, "", false, "", 0).unwrap();
        assert_eq!(s.vms[&vm].state, S_CLONING);
        assert_eq!(s.images[&img].state, I_LOCKED_USED);
        let d = s.vms[&vm].template.get_vec("DISK").unwrap();
        assert_eq!(vec_get(d, "CLONING"), Some("YES"));
        assert_eq!(
            vec_get(d, "TARGET"),
            Some("sda"),
            "DEV_PREFIX sd by default"
        );
        copy_now(&mut s);
        assert_eq!(s.vms[&vm].state, S_PENDING);
        assert_eq!(s.images[&img].state, I_USED);
        let d = s.vms[&vm].template.get_vec("DISK").unwrap();
        assert_eq!(vec_get(d, "CLONING"), None);
        assert_eq!(vec_get(d, "SOURCE"), Some(&s.images[&img].source[..]));
    }

    /// oned's texts for a missing image (by name: the owner searched; by id), a missing
    /// PATH, a duplicate name, a locked image's delete; a failed instantiate takes nothing.
    #[test]
    fn image_errors_follow_oned() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut s, f) = st_with_file(tmp.path(), 10);
        let u = s.alloc_user("alice", "pw", "core").unwrap();
        let img = s
            .alloc_image(&format!("NAME=img\nPATH=\"{}\"", f.display()), 1, 0)
            .unwrap();
        let e = s.delete_image(img, false, 0).unwrap_err();
        assert_eq!(e.code, INTERNAL);
        assert!(e.msg.starts_with("Image locked, use --force flag"));
        copy_now(&mut s);
        let dup = s
            .alloc_image(&format!("NAME=img\nPATH=\"{}\"", f.display()), 1, 0)
            .unwrap_err();
        assert_eq!(
            (dup.code, dup.msg.as_str()),
            (
                ALLOCATE,
                "Error allocating a new image. NAME is already taken by IMAGE 0."
            )
        );
        s.alloc_image(&format!("NAME=img\nPATH=\"{}\"", f.display()), 1, u)
            .expect("names are unique per owner");
        let missing = s
            .alloc_image("NAME=x\nPATH=/nonexistent/disk.qcow2", 1, 0)
            .unwrap_err();
        assert_eq!(
            (missing.code, missing.msg.as_str()),
            (INTERNAL, "Cannot parse image SIZE: cannot access '/nonexistent/disk.qcow2' (No such file or directory)")
        );
        let t = s.alloc_template("NAME=t\nDISK=[IMAGE=nope]", 0).unwrap();
        let e = s.instantiate(t, "", false, "", 0).unwrap_err();
        assert_eq!(e.code, ALLOCATE);
        assert_eq!(e.msg, "Error allocating a new virtual machine template. DISK 0: User 0 does not own an image with name: nope . Set IMAGE_UNAME or IMAGE_UID of owner in DISK.");
        // A template of oneadmin's names the instantiating user's image, not oneadmin's.
        s.templates.get_mut(&t).unwrap().template = Template::parse("DISK=[IMAGE_ID=5]").unwrap();
        let e = s.instantiate(t, "", false, "", 0).unwrap_err();
        assert_eq!(e.msg, "Error allocating a new virtual machine template. DISK 0: Image with ID: 5 does not exist");
        s.templates.get_mut(&t).unwrap().template =
            Template::parse("DISK=[IMAGE=img]\nDISK=[IMAGE=img,IMAGE_UNAME=alice]").unwrap();
        // alice instantiates oneadmin's template: DISK 0 resolves to alice's img (1).
        let vm = s.instantiate(t, "", false, "", u).unwrap();
        let ids: Vec<_> = s.vms[&vm]
            .template
            .vecs("DISK")
            .map(|d| vec_get(d, "IMAGE_ID").unwrap().to_string())
            .collect();
        assert_eq!(ids, ["1", "1"]);
        let before = s.images[&0].vms.len();
        s.templates.get_mut(&t).unwrap().template =
            Template::parse("DISK=[IMAGE_ID=0]\nDISK=[IMAGE=nope]").unwrap();
        assert!(s.instantiate(t, "", false, "", 0).is_err());
        assert_eq!(
            s.images[&0].vms.len(),
            before,
            "a failed instantiate acquires nothing"
        );
        assert_eq!(s.images[&0].state, I_READY);
    }
}
