//! Flower runs unprivileged (#17 item 5): the one identity it runs as in both runtimes, the
//! environment it gets, and the directories it owns or may read.
//!
//! Owns: [`FLOWER_ID`], the environment allow-list [`ENV_ALLOWED`], the ownership and
//! modes of Flower's directories ([`give_to_flower`], [`share_with_flower`]) and the check
//! that Flower can reach the files it is given ([`check_reachable`]).
//! Must not: give Flower the context, the OneGate token, the CA key, the agent's state or
//! configuration (all root-only: `/run/one-context/one_env` 0400, `/opt/flower/ca` 0700,
//! `/opt/flower/config` 0750 root:root), or an inherited variable.
//!
//! Guarantees: when the agent runs as root, Flower (process runtime) runs as
//! `FLOWER_ID:FLOWER_ID` with no supplementary groups (std's `CommandExt::uid` calls
//! `setgroups(0)` before `setuid`), `no_new_privs` when `setpriv` exists, and an
//! environment of [`ENV_ALLOWED`] names only (`env_clear` first); the docker runtime passes
//! `--user FLOWER_ID:FLOWER_ID`. Shown by `tests/agent_flower.rs`,
//! `flower_agent_runs_flower_unprivileged_with_an_allow_listed_environment_and_trains`.
//! Assumptions: no other account of the host uses UID or GID 49999 (it is the user of
//! Flower's own `flwr/*` container images; outside the images it has no password-database
//! entry, like systemd's `DynamicUser`); the context file the agent is given is root-only,
//! as one-context and onesim write it (0400).
//! Caveats: an agent that is not root cannot change user: Flower then runs as the agent's
//! own (unprivileged) user, and says so in the log. POSIX ACLs are not considered by
//! [`check_reachable`] (mode bits only).

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};

use super::error::IoError;

/// Why Flower's directories cannot be prepared, or its files not reached. User-facing (VM
/// logs, `FL_ERROR`).
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// Creating or setting the mode of a directory.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Giving a directory to the Flower user failed.
    #[error("chown {}: {source}", path.display())]
    Chown {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: nix::Error,
    },
    /// A symbolic link where a directory given to Flower should be, in a directory that
    /// not only root may write: never followed.
    #[error("{}: a symbolic link where a directory for Flower belongs, in a directory not root's alone: refused, not followed", path.display())]
    Symlink {
        /// The link.
        path: PathBuf,
    },
    /// A file Flower is given sits below a directory the Flower user cannot search.
    #[error(
        "{} is out of reach of the Flower user (UID {FLOWER_ID}): {} is not searchable by it (make it o+x, or move the file)",
        path.display(),
        dir.display()
    )]
    Unreachable {
        /// The file or directory Flower needs.
        path: PathBuf,
        /// The first directory on its way the Flower user cannot search.
        dir: PathBuf,
    },
}

/// UID and GID Flower runs as in both runtimes: the user of the `flwr/*` container images
/// (`app`), so a directory prepared for one runtime serves the other.
pub const FLOWER_ID: u32 = 49999;

/// The name `ps` shows for [`FLOWER_ID`] where the password database has it; also what
/// `USER`/`LOGNAME` say.
pub const FLOWER_USER: &str = "flower";

/// Every variable the Flower process may get, with why. The process runtime starts Flower
/// with a cleared environment and sets only these (`process::process_env`, test
/// `process_env_is_the_allow_list`). No OpenTelemetry variable is passed: the agent
/// exports its own spans and Flower 1.25 exports none.
pub const ENV_ALLOWED: &[(&str, &str)] = &[
    (
        "PATH",
        "the Flower bin directory first (Flower spawns flower-superexec, flwr-serverapp and flwr-clientapp by name), then the fixed system directories, never the agent's PATH",
    ),
    (
        "HOME",
        "Python and its libraries write caches under ~; the Flower user has no home elsewhere",
    ),
    ("USER", "getpass.getuser() reads it before the password database, which may have no entry for the Flower UID"),
    ("LOGNAME", "as USER"),
    ("LANG", "C.UTF-8: Python's stdio encoding, fixed rather than inherited"),
    ("TZ", "the agent's time zone, when it has a plain one: timestamps in Flower's log"),
    ("FLWR_HOME", "installed apps and what they keep between runs"),
    ("FLWR_LOG_LEVEL", "ONEAPP_FL_LOG_LEVEL"),
    ("FLWR_TELEMETRY_ENABLED", "always 0: no telemetry leaves the VM"),
    ("CUDA_VISIBLE_DEVICES", "GPU SuperNodes: ONEAPP_FL_CUDA_VISIBLE_DEVICES"),
    ("FL_GPU_MEMORY_FRACTION", "GPU SuperNodes: ONEAPP_FL_GPU_MEMORY_FRACTION"),
];

/// Whether `name` is in [`ENV_ALLOWED`].
pub fn env_allowed(name: &str) -> bool {
    ENV_ALLOWED.iter().any(|(n, _)| *n == name)
}

/// The identity to start Flower as: `Some` when the agent is root (it drops to
/// [`FLOWER_ID`]), `None` when it is not (Flower runs as the agent's own user).
pub fn run_as() -> Option<(Uid, Gid)> {
    nix::unistd::geteuid()
        .is_root()
        .then(|| (Uid::from_raw(FLOWER_ID), Gid::from_raw(FLOWER_ID)))
}

/// A directory Flower writes (its state, `FLWR_HOME`, checkpoints): created, mode 0750,
/// owned by [`FLOWER_ID`] when the agent is root. Only the directory itself: what is
/// inside was written by Flower (a recursive chown by root of a tree another user can
/// change could be led through a symlink). For the same reason the directory is changed
/// through a descriptor opened without following a symbolic link, and a symbolic link on
/// the way, in a directory root does not own alone, is refused (Flower could have planted
/// it in its state directory to have `/etc` chowned) — test
/// `a_planted_symlink_is_refused_not_followed`.
pub fn give_to_flower(dir: &Path) -> Result<(), PrivilegeError> {
    let d = open_dir(dir)?;
    d.set_permissions(fs::Permissions::from_mode(0o750))
        .map_err(IoError::at(dir))?;
    if run_as().is_some() {
        fchown(&d, dir, FLOWER_ID, FLOWER_ID)?;
    }
    Ok(())
}

/// A directory Flower only reads (the served TLS files): mode 0750, root's, group
/// [`FLOWER_ID`] when the agent is root, so Flower reads it and cannot replace a file in it.
pub fn share_with_flower(dir: &Path) -> Result<(), PrivilegeError> {
    let d = open_dir(dir)?;
    d.set_permissions(fs::Permissions::from_mode(0o750))
        .map_err(IoError::at(dir))?;
    if run_as().is_some() {
        fchown(&d, dir, 0, FLOWER_ID)?;
    }
    Ok(())
}

fn fchown(d: &fs::File, dir: &Path, uid: u32, gid: u32) -> Result<(), PrivilegeError> {
    nix::unistd::fchown(d, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(|source| {
        PrivilegeError::Chown {
            path: dir.to_path_buf(),
            source,
        }
    })
}

/// Creates `dir` and opens it (`O_DIRECTORY | O_NOFOLLOW`), after checking that no
/// component is a symbolic link inside a directory someone besides root may write.
fn open_dir(dir: &Path) -> Result<fs::File, PrivilegeError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::create_dir_all(dir).map_err(IoError::at(dir))?;
    let mut at = PathBuf::new();
    for c in dir.components() {
        let parent = at.clone();
        at.push(c);
        let meta = fs::symlink_metadata(&at).map_err(IoError::at(&at))?;
        if meta.file_type().is_symlink() {
            let p = fs::metadata(&parent).map_err(IoError::at(&parent))?;
            let roots_alone = p.uid() == 0 && p.mode() & 0o022 == 0;
            if !roots_alone {
                return Err(PrivilegeError::Symlink { path: at });
            }
        }
    }
    let flags = nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_NOFOLLOW;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(dir)
        .map_err(|e| IoError::at(dir)(e).into())
}

/// Whether `(uid, gid)` without supplementary groups may search (`x`) a directory with
/// `meta`, by its mode bits (owner, else group, else others; root is not special here).
fn searchable(meta: &fs::Metadata, uid: u32, gid: u32) -> bool {
    let mode = meta.mode();
    if meta.uid() == uid {
        mode & 0o100 != 0
    } else if meta.gid() == gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// The first directory on the way to `path` (from `/`) that `(uid, gid)` cannot search,
/// if any. Missing components end the walk: there is nothing to check below them.
pub fn first_unreachable(path: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
    let mut at = PathBuf::new();
    let parents: Vec<_> = path.parent()?.components().collect();
    for c in parents {
        at.push(c);
        match fs::metadata(&at) {
            Ok(m) if m.is_dir() && !searchable(&m, uid, gid) => return Some(at),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// The interpreter of a `#!` script (`flower-superlink` is one: its venv's `python3`), or
/// `None`. Reads at most the first 256 bytes.
pub fn interpreter(script: &Path) -> Option<PathBuf> {
    use std::io::Read as _;
    let mut head = Vec::new();
    fs::File::open(script)
        .ok()?
        .take(256)
        .read_to_end(&mut head)
        .ok()?;
    let line = head.strip_prefix(b"#!")?.split(|b| *b == b'\n').next()?;
    let line = String::from_utf8_lossy(line);
    let prog = line.split_whitespace().next()?;
    prog.starts_with('/').then(|| PathBuf::from(prog))
}

/// Fails, naming the directory, when the Flower user could not reach one of `paths` or
/// where its symbolic links lead (a test root under a private temporary directory, a venv
/// whose `python3` links to a pyenv under `/root`): Flower would otherwise die on its first
/// read with a Python traceback, or exit 126.
pub fn check_reachable<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
) -> Result<(), PrivilegeError> {
    let Some((uid, gid)) = run_as() else {
        return Ok(());
    };
    for p in paths {
        let real = fs::canonicalize(p).ok();
        for q in std::iter::once(p).chain(real.as_deref()) {
            if let Some(dir) = first_unreachable(q, uid.as_raw(), gid.as_raw()) {
                return Err(PrivilegeError::Unreachable {
                    path: p.to_path_buf(),
                    dir,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searchable_follows_owner_then_group_then_others() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        fs::create_dir(&d).unwrap();
        let m = |mode| {
            fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
            fs::metadata(&d).unwrap()
        };
        let (uid, gid) = (m(0o700).uid(), m(0o700).gid());
        assert!(searchable(&m(0o700), uid, gid));
        assert!(!searchable(&m(0o070), uid, gid), "the owner's bits decide");
        assert!(searchable(&m(0o010), uid + 1, gid));
        assert!(
            !searchable(&m(0o701), uid + 1, gid),
            "the group's bits decide"
        );
        assert!(searchable(&m(0o001), uid + 1, gid + 1));
        assert!(!searchable(&m(0o770), uid + 1, gid + 1));
    }

    #[test]
    fn first_unreachable_names_the_closed_directory() {
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        let file = closed.join("open/f");
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(&file, "x").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o700)).unwrap();
        let other = fs::metadata(&closed).unwrap().uid() + 1;
        assert_eq!(first_unreachable(&file, other, other), Some(closed.clone()));
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(first_unreachable(&file, other, other), None);
        // A missing component ends the walk.
        assert_eq!(
            first_unreachable(&closed.join("none/deeper/f"), other, other),
            None
        );
    }

    #[test]
    fn a_planted_symlink_is_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        give_to_flower(&state).unwrap();
        assert_eq!(fs::metadata(&state).unwrap().mode() & 0o777, 0o750);
        if run_as().is_some() {
            assert_eq!(fs::metadata(&state).unwrap().uid(), FLOWER_ID);
        }
        // What Flower could do in its own directory: a link to a directory of root's.
        let target = dir.path().join("etc");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        let link = state.join("db");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        if run_as().is_some() {
            let e = give_to_flower(&link).unwrap_err();
            assert!(matches!(e, PrivilegeError::Symlink { .. }), "{e}");
            assert!(e.to_string().contains("state/db"), "{e}");
            let t = fs::metadata(&target).unwrap();
            assert_eq!(
                (t.uid(), t.mode() & 0o777),
                (0, 0o755),
                "the target is untouched"
            );
        }
        // Even where links are allowed on the way, the last one is never followed.
        let root_link = dir.path().join("direct");
        std::os::unix::fs::symlink(&target, &root_link).unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        assert!(give_to_flower(&root_link).is_err());
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o755);
    }

    #[test]
    fn a_scripts_interpreter_is_read_from_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("flower-superlink");
        fs::write(&f, "#!/opt/venv/bin/python3 -s\nimport sys\n").unwrap();
        assert_eq!(
            interpreter(&f),
            Some(PathBuf::from("/opt/venv/bin/python3"))
        );
        fs::write(&f, "#!python3\n").unwrap();
        assert_eq!(interpreter(&f), None, "only absolute interpreters");
        fs::write(&f, [0x7f, b'E', b'L', b'F']).unwrap();
        assert_eq!(interpreter(&f), None);
        assert_eq!(interpreter(&dir.path().join("none")), None);
    }

    #[test]
    fn the_allow_list_names_each_variable_once_with_a_reason() {
        let mut names: Vec<_> = ENV_ALLOWED.iter().map(|(n, _)| *n).collect();
        assert!(ENV_ALLOWED.iter().all(|(_, why)| !why.is_empty()));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ENV_ALLOWED.len());
        for secret in ["TOKENTXT", "ONEGATE_TOKEN", "ONE_AUTH", "ONEGATE_ENDPOINT"] {
            assert!(!env_allowed(secret), "{secret}");
        }
    }
}
