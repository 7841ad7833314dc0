//! The `flwr` executable: finding it, checking its version against the cluster's, and
//! running its short commands (`--version`, `ls`, `stop`) bounded in time.
//!
//! Owns: the choice of executable (`--flwr`, `$FLOWER_VENV`, `PATH`), the version policy,
//! and how any `flwr` process is started and ended.
//! Must not: parse a run's streamed output ([`super::output`]) or write project files.
//!
//! Guarantees:
//! - `flwr` runs as an argv array (no shell), with a private `FLWR_HOME`, telemetry off and
//!   stdin closed, in its own process group that is killed when the command ends, times out
//!   or its future is dropped ([`GroupGuard`]).
//! - A CLI whose minor version differs from the cluster's is refused unless explicitly
//!   allowed: a 1.26 CLI against a 1.25 SuperLink fails at `StartRun`
//!   (`version_check_refuses_a_minor_mismatch`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::output::{parse_ls_status, strip_ansi};
use super::project::WorkDir;
use super::report::RunStatus;
use super::{io_err, SubmitError};

use super::FlowerVersion;

/// Checks the CLI against the cluster's Flower version: same `major.minor` passes (a patch
/// difference yields a note); a different minor is an error unless `allow_mismatch`, which
/// turns it into a warning.
pub fn check_versions(
    cli: FlowerVersion,
    cluster: &str,
    allow_mismatch: bool,
) -> Result<Option<String>, SubmitError> {
    let Ok(want) = FlowerVersion::parse(cluster) else {
        return Err(SubmitError::Target(format!(
            "cluster Flower version {cluster:?} is not X.Y.Z"
        )));
    };
    if cli.same_minor(want) {
        return Ok((cli != want).then(|| {
            format!("flwr CLI {cli} and cluster Flower {want} differ in patch version only")
        }));
    }
    if allow_mismatch {
        return Ok(Some(format!(
            "flwr CLI {cli} and cluster Flower {want} differ in minor version; the run may fail"
        )));
    }
    Err(SubmitError::VersionMismatch {
        cli,
        cluster: cluster.to_string(),
    })
}

/// The `flwr` to use: `explicit` (`--flwr`), else `$FLOWER_VENV/bin/flwr`, else the first
/// `flwr` on `PATH`.
pub fn find_flwr(
    explicit: Option<&Path>,
    flower_venv: Option<&OsStr>,
    path_var: Option<&OsStr>,
) -> Result<PathBuf, SubmitError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(SubmitError::FlwrNotFound {
                tried: vec![format!("--flwr {}", p.display())],
            })
        };
    }
    let mut tried = Vec::new();
    if let Some(venv) = flower_venv.filter(|v| !v.is_empty()) {
        let p = Path::new(venv).join("bin").join("flwr");
        if p.is_file() {
            return Ok(p);
        }
        tried.push(format!("$FLOWER_VENV/bin/flwr ({})", p.display()));
    }
    if let Some(path) = path_var {
        for dir in std::env::split_paths(path) {
            let p = dir.join("flwr");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    tried.push("flwr on PATH".into());
    Err(SubmitError::FlwrNotFound { tried })
}

/// Kills a process group when dropped (unless disarmed): no `flwr` outlives its caller.
pub(super) struct GroupGuard(pub(super) Option<nix::unistd::Pid>);

impl GroupGuard {
    pub(super) fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH (already gone) is fine.
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(super) fn flwr_command(flwr: &Path, home: &Path) -> Command {
    let mut cmd = Command::new(flwr);
    cmd.env("FLWR_HOME", home)
        .env("FLWR_TELEMETRY_ENABLED", "0")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .process_group(0);
    cmd
}

/// Runs a short `flwr` command to completion (bounded), returning stdout.
async fn flwr_output(
    flwr: &Path,
    home: &Path,
    args: &[&OsStr],
    limit: Duration,
) -> Result<String, String> {
    let mut cmd = flwr_command(flwr, home);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| e.to_string())?;
    let mut guard = GroupGuard(child.id().map(|id| nix::unistd::Pid::from_raw(id as i32)));
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| format!("no answer within {}s", limit.as_secs()))?
        .map_err(|e| e.to_string())?;
    guard.kill();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{}: {}", out.status, strip_ansi(err.trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The version of a `flwr` executable (`flwr --version`).
pub async fn flwr_version(flwr: &Path) -> Result<FlowerVersion, SubmitError> {
    let home = tempfile::tempdir().map_err(io_err("creating a temporary FLWR_HOME"))?;
    let fail = |reason: String| SubmitError::FlwrVersion {
        path: flwr.to_path_buf(),
        reason,
    };
    let out = flwr_output(
        flwr,
        home.path(),
        &[OsStr::new("--version")],
        Duration::from_secs(60),
    )
    .await
    .map_err(fail)?;
    FlowerVersion::find_in(&out).ok_or_else(|| fail(format!("unexpected output {:?}", out.trim())))
}

/// The final status of a run, from `flwr ls --run-id`.
pub(super) async fn run_status(
    flwr: &Path,
    work: &WorkDir,
    federation: &str,
    run_id: u64,
) -> RunStatus {
    let id = run_id.to_string();
    let args = [
        OsStr::new("ls"),
        work.app.as_os_str(),
        OsStr::new(federation),
        OsStr::new("--run-id"),
        OsStr::new(&id),
        OsStr::new("--format"),
        OsStr::new("json"),
    ];
    match flwr_output(flwr, &work.flwr_home, &args, Duration::from_secs(60)).await {
        Ok(out) => parse_ls_status(&out),
        Err(e) => RunStatus::Unknown(format!("flwr ls failed: {e}")),
    }
}

/// Best effort: asks the SuperLink to stop a run we gave up waiting for.
pub(super) async fn stop_run(flwr: &Path, work: &WorkDir, federation: &str, run_id: u64) {
    let id = run_id.to_string();
    let args = [
        OsStr::new("stop"),
        OsStr::new(&id),
        work.app.as_os_str(),
        OsStr::new(federation),
    ];
    if let Err(e) = flwr_output(flwr, &work.flwr_home, &args, Duration::from_secs(30)).await {
        tracing::warn!(run_id, error = %e, "could not stop the timed-out run");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> FlowerVersion {
        FlowerVersion {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn version_check_refuses_a_minor_mismatch() {
        assert_eq!(
            FlowerVersion::find_in("Flower version: 1.25.0\n"),
            Some(v(1, 25, 0))
        );
        assert_eq!(FlowerVersion::find_in("Flower version: dev"), None);
        assert_eq!(check_versions(v(1, 25, 0), "1.25.0", false).unwrap(), None);
        assert!(check_versions(v(1, 25, 2), "1.25.0", false)
            .unwrap()
            .unwrap()
            .contains("patch"));
        let err = check_versions(v(1, 26, 0), "1.25.0", false).unwrap_err();
        assert!(matches!(err, SubmitError::VersionMismatch { .. }));
        assert!(err
            .to_string()
            .contains("flwr CLI 1.26.0 and cluster Flower 1.25.0"));
        assert!(check_versions(v(1, 26, 0), "1.25.0", true)
            .unwrap()
            .unwrap()
            .contains("may fail"));
        assert!(check_versions(v(1, 25, 0), "latest", false).is_err());
    }

    #[test]
    fn flwr_is_found_explicitly_then_in_the_venv_then_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let venv_bin = dir.path().join("venv/bin");
        let path_dir = dir.path().join("path");
        std::fs::create_dir_all(&venv_bin).unwrap();
        std::fs::create_dir_all(&path_dir).unwrap();
        std::fs::write(path_dir.join("flwr"), "").unwrap();
        let venv = dir.path().join("venv");
        let path_var = std::env::join_paths([dir.path().join("none"), path_dir.clone()]).unwrap();
        // venv without flwr: falls through to PATH.
        assert_eq!(
            find_flwr(None, Some(venv.as_os_str()), Some(&path_var)).unwrap(),
            path_dir.join("flwr")
        );
        std::fs::write(venv_bin.join("flwr"), "").unwrap();
        assert_eq!(
            find_flwr(None, Some(venv.as_os_str()), Some(&path_var)).unwrap(),
            venv_bin.join("flwr")
        );
        let missing = dir.path().join("nope");
        let err = find_flwr(Some(&missing), Some(venv.as_os_str()), Some(&path_var)).unwrap_err();
        assert!(err.to_string().contains("--flwr"), "{err}");
        let err = find_flwr(None, None, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "flwr executable not found (tried: flwr on PATH)"
        );
    }
}
