//! The single-instance lock taken before the controller mutates anything.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// An exclusive `flock(2)` on `STATE_DIR/controller.lock`, held for the life of the
/// controller.
///
/// # Guarantees
/// - While one process holds it, no other process that uses the same state directory
///   can acquire it: two controllers sharing a state dir never act at once.
/// - The kernel drops it when the process ends, however it ends (kill -9 included), so
///   a crash never leaves a stale lock behind.
///
/// # Assumptions
/// - Every controller that may act on the same OpenNebula clusters runs on this host
///   with this state directory (the systemd unit's `StateDirectory`).
///
/// # Caveats
/// - It does not fence controllers on different hosts: that is the OpenNebula lease of
///   [`super::election`] (`--leader-elect`), kept beside this lock, which still protects
///   the state directory.
/// - `flock` on some network file systems is advisory or local-only: keep the state
///   directory on a local disk.
#[derive(Debug)]
pub struct InstanceLock {
    _lock: Flock<File>,
    path: PathBuf,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another controller holds it.
    #[error("another flower-reconcile holds {path} (pid {holder}); refusing to run two controllers at once")]
    Held {
        /// Lock file.
        path: PathBuf,
        /// What the holder wrote into it.
        holder: String,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot lock {path}: {source}")]
    Io {
        /// Lock file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

impl InstanceLock {
    /// Take the lock in `state_dir` (created if missing), without waiting.
    pub fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        let path = state_dir.join("controller.lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(LockError::Held {
                    path,
                    holder: holder.trim().to_string(),
                });
            }
            Err((_, e)) => return Err(io(std::io::Error::from(e))),
        };
        lock.set_len(0).map_err(io)?;
        writeln!(lock, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _lock: lock, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_controller_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = InstanceLock::acquire(dir.path()).unwrap();
        let err = InstanceLock::acquire(dir.path()).unwrap_err();
        assert!(
            matches!(&err, LockError::Held { holder, .. } if *holder == std::process::id().to_string()),
            "{err}"
        );
        drop(first);
        let again = InstanceLock::acquire(dir.path()).unwrap();
        assert!(again.path().ends_with("controller.lock"));
    }
}
