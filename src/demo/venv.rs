//! The pinned Flower virtualenv the demo and the end-to-end tests run Flower from.
//!
//! It lives under the cargo target directory (`target/flower-venv`), the same place the test
//! command (`e2e/test-all.sh`) creates it, so the two share one install. The pin list is
//! `e2e/requirements.lock`, embedded here; a venv built from another list is rebuilt.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// Exact versions of every Python package (flwr, pyone and their dependencies).
pub const REQUIREMENTS_LOCK: &str = include_str!("../../e2e/requirements.lock");

/// Marker file recording which pin list a venv was built from.
const MARKER: &str = ".requirements.lock";

/// Where the venv goes when `FLOWER_VENV` does not say: `<target dir>/flower-venv`, the target
/// dir being the one this executable was built into (`target/release/flower-reconcile`).
pub fn default_location() -> PathBuf {
    if let Some(v) = std::env::var_os("FLOWER_VENV") {
        return PathBuf::from(v);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(|target| target.join("flower-venv"))
        .unwrap_or_else(|| PathBuf::from("flower-venv"))
}

/// The Python the venv is made from: the system's (`/usr/bin/python3`, as in the images)
/// when present, else `python3` on PATH. The agents run Flower as an unprivileged user
/// (#17 item 5), which cannot run an interpreter under `/root` (pyenv).
fn python() -> PathBuf {
    let system = PathBuf::from("/usr/bin/python3");
    if system.is_file() {
        system
    } else {
        PathBuf::from("python3")
    }
}

/// Whether the unprivileged Flower user can reach the venv's interpreter (its real path):
/// always when this process is not root (Flower then runs as this user).
fn runnable_by_flower(venv: &Path) -> bool {
    use crate::agent::privilege::{first_unreachable, run_as, FLOWER_ID};
    if run_as().is_none() {
        return true;
    }
    let Ok(real) = std::fs::canonicalize(venv.join("bin/python3")) else {
        return false;
    };
    first_unreachable(&real, FLOWER_ID, FLOWER_ID).is_none()
        && first_unreachable(&venv.join("bin/python3"), FLOWER_ID, FLOWER_ID).is_none()
}

/// Whether `venv` holds exactly the pinned packages (and the Flower executables), with an
/// interpreter the Flower user can run.
pub fn is_ready(venv: &Path) -> bool {
    let marker = std::fs::read_to_string(venv.join(MARKER)).unwrap_or_default();
    marker == REQUIREMENTS_LOCK
        && runnable_by_flower(venv)
        && [
            "flwr",
            "flower-superlink",
            "flower-supernode",
            "flower-superexec",
        ]
        .iter()
        .all(|b| venv.join("bin").join(b).is_file())
}

/// Create or refresh the venv at `venv`, reporting each step through `progress`.
///
/// Guarantees: on success `venv/bin` holds the pinned Flower; a half-built venv is never
/// marked ready (the marker is written last). Assumptions: `/usr/bin/python3` (else
/// `python3` on PATH) has the `venv` module and the package registry is reachable. Caveats: the first run downloads about
/// 100 MB and takes a minute or two.
pub async fn ensure(venv: &Path, mut progress: impl FnMut(&str)) -> anyhow::Result<PathBuf> {
    if is_ready(venv) {
        progress(&format!("Flower virtualenv ready at {}", venv.display()));
        return Ok(venv.to_path_buf());
    }
    progress(&format!(
        "creating the Flower virtualenv at {} (pinned flwr, first run only)",
        venv.display()
    ));
    if venv.exists() {
        std::fs::remove_dir_all(venv)?;
    }
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent)?;
    }
    run(Command::new(python()).arg("-m").arg("venv").arg(venv)).await?;
    let lock = venv.join("requirements.lock");
    std::fs::write(&lock, REQUIREMENTS_LOCK)?;
    progress("installing pinned packages with pip (about a minute)");
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&lock))
    .await?;
    std::fs::write(venv.join(MARKER), REQUIREMENTS_LOCK)?;
    progress("Flower virtualenv ready");
    Ok(venv.to_path_buf())
}

async fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("cannot start {:?}: {e}", cmd.as_std().get_program()))?;
    if !out.status.success() {
        anyhow::bail!(
            "{:?} failed ({}):\n{}",
            cmd.as_std().get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_venv_without_the_marker_or_with_another_pin_list_is_not_ready() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let venv = dir.path().join("v");
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        for b in [
            "python3",
            "flwr",
            "flower-superlink",
            "flower-supernode",
            "flower-superexec",
        ] {
            std::fs::write(venv.join("bin").join(b), "").unwrap();
        }
        assert!(!is_ready(&venv));
        std::fs::write(venv.join(MARKER), "flwr==0.0.1\n").unwrap();
        assert!(!is_ready(&venv));
        std::fs::write(venv.join(MARKER), REQUIREMENTS_LOCK).unwrap();
        assert!(is_ready(&venv));
        // An interpreter under a directory only root can search (pyenv under /root):
        // the Flower user could not run it.
        let private = dir.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::rename(venv.join("bin/python3"), private.join("python3.11")).unwrap();
        std::os::unix::fs::symlink(private.join("python3.11"), venv.join("bin/python3")).unwrap();
        assert_eq!(
            is_ready(&venv),
            crate::agent::privilege::run_as().is_none(),
            "as root, a venv whose Python the Flower user cannot reach is rebuilt"
        );
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert!(is_ready(&venv));
        std::fs::remove_file(venv.join("bin/flower-superexec")).unwrap();
        assert!(!is_ready(&venv), "every Flower executable is required");
    }

    #[test]
    fn the_embedded_pins_hold_flwr_and_pyone() {
        assert!(REQUIREMENTS_LOCK.lines().any(|l| l == "flwr==1.25.0"));
        assert!(REQUIREMENTS_LOCK.lines().any(|l| l.starts_with("pyone==")));
    }
}
