//! The process runtime: spawning `flower-superlink` / `flower-supernode` directly, in their
//! own process group, and stopping the whole group.
//!
//! Guarantees: Flower is started from an argv array (no shell), as the unprivileged Flower
//! user when the agent is root, with a cleared environment holding only
//! [`privilege::ENV_ALLOWED`] names (`PATH` led by the Flower bin directory: Flower spawns
//! `flower-superexec` by name; `FLWR_HOME` under the agent root; telemetry off), and only
//! after every file it is given was checked to be within its reach. `stop` sends SIGTERM to
//! the group, then SIGKILL after the grace period, so no Flower process (SuperExec,
//! ClientApp) outlives it.
//! Assumptions: nobody else uses the recorded process-group id meanwhile; a stale pid
//! file is only acted on when `/proc/<pid>/cmdline` names a Flower program.
//! Caveats: if the agent itself is SIGKILLed, Flower dies too only when `setpriv` exists
//! (parent-death signal); otherwise it runs until the next agent start kills the stale group.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::context::{Config, Role};
use super::error::IoError;
use super::flower::{self, FlowerError, NodeResolved};
use super::paths::Paths;
use super::privilege;

/// util-linux `setpriv`, used to set the parent-death signal and `no_new_privs` without
/// unsafe code (the user change itself is std's `CommandExt::uid`/`gid`, before it).
const SETPRIV: &str = "/usr/bin/setpriv";

/// A running Flower process (group leader).
#[derive(Debug)]
pub struct FlowerProcess {
    child: tokio::process::Child,
    pgid: Pid,
    log: PathBuf,
    log_start: u64,
    pid_file: PathBuf,
}

fn pid_file(paths: &Paths, role: Role) -> PathBuf {
    paths.run_dir().join(format!("flower-{role}.pgid"))
}

/// System directories after the Flower bin directory in Flower's `PATH`: fixed, so a
/// directory the agent's own `PATH` happens to name is never searched by Flower.
const SYSTEM_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The complete environment of the Flower process (it starts from an empty one): the
/// names of [`privilege::ENV_ALLOWED`], each set here or by [`flower::flower_env`]; any
/// other name is dropped.
pub fn process_env(
    cfg: &Config,
    role: Role,
    node: &NodeResolved,
    paths: &Paths,
    bin_dir: &Path,
) -> Vec<(String, String)> {
    let home = paths.flwr_home().display().to_string();
    let mut env = vec![
        (
            "PATH".to_string(),
            format!("{}:{SYSTEM_PATH}", bin_dir.display()),
        ),
        ("HOME".to_string(), home.clone()),
        ("USER".to_string(), privilege::FLOWER_USER.to_string()),
        ("LOGNAME".to_string(), privilege::FLOWER_USER.to_string()),
        ("LANG".to_string(), "C.UTF-8".to_string()),
        ("FLWR_HOME".to_string(), home),
    ];
    // A zone name or POSIX TZ string; anything odd is left out rather than passed on.
    if let Ok(tz) = std::env::var("TZ") {
        let plain = tz.len() <= 64
            && tz
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_+-:,.".contains(&b));
        if plain && !tz.is_empty() {
            env.push(("TZ".to_string(), tz));
        }
    }
    env.extend(flower::flower_env(cfg, role, node));
    env.retain(|(k, _)| privilege::env_allowed(k));
    env
}

impl FlowerProcess {
    /// Starts Flower. Its stdout and stderr are appended to the role's log file.
    pub fn spawn(
        cfg: &Config,
        role: Role,
        node: &NodeResolved,
        paths: &Paths,
    ) -> Result<Self, FlowerError> {
        let (program, args) = flower::process_command(cfg, role, node, paths)
            .ok_or(FlowerError::SuperlinkUnresolved)?;
        if !program.is_file() {
            return Err(FlowerError::NotInstalled {
                program,
                var: crate::protocol::context::FLOWER_BIN_DIR,
            });
        }
        let bin_dir = program.parent().map(Path::to_path_buf).unwrap_or_default();
        for d in [paths.log_dir(), paths.run_dir()] {
            fs::create_dir_all(&d).map_err(IoError::at(&d))?;
        }
        // Flower writes only these (its database may sit in a subdirectory of the state).
        let db = paths.state_dir().join(&cfg.database);
        for d in [paths.flwr_home(), paths.state_dir()]
            .into_iter()
            .chain(db.parent().map(Path::to_path_buf))
        {
            privilege::give_to_flower(&d)?;
        }
        // Everything Flower opens by name: a test root under a private directory is named
        // here rather than in a Python traceback.
        let certs = paths.certs_dir();
        let mut reached = vec![program.clone(), paths.flwr_home(), db];
        // A script's interpreter too (a venv's python3 may link to a pyenv under /root).
        reached.extend(privilege::interpreter(&program));
        if cfg.tls {
            reached.extend([certs.join("ca.crt"), certs.join("server.key")]);
        }
        if role == Role::Supernode && super::node_auth::enabled(cfg, role) {
            reached.push(super::node_auth::key_file(paths));
        }
        if let (Role::Superlink, Some(cp)) = (role, &cfg.training.checkpoint) {
            reached.push(paths.at(&cp.path));
        }
        privilege::check_reachable(reached.iter().map(PathBuf::as_path))?;
        let log = paths.flower_log(role);
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(IoError::at(&log))?;
        let log_start = out.metadata().map(|m| m.len()).unwrap_or(0);
        let err = out.try_clone().map_err(IoError::at(&log))?;
        // With setpriv, Flower gets SIGKILL if the agent dies without stopping it (its
        // SuperExec children follow through their --parent-pid monitor), and can never
        // regain privileges through a set-user-ID program (`no_new_privs`). setpriv runs
        // after the user change, as the Flower user: neither needs a privilege.
        let mut cmd = match Path::new(SETPRIV).is_file() {
            true => {
                let mut c = tokio::process::Command::new(SETPRIV);
                c.args(["--pdeathsig", "KILL", "--no-new-privs", "--"])
                    .arg(&program);
                c
            }
            false => tokio::process::Command::new(&program),
        };
        match privilege::run_as() {
            // std clears the supplementary groups (setgroups(0)) before setuid.
            Some((uid, gid)) => {
                cmd.uid(uid.as_raw()).gid(gid.as_raw());
            }
            None => tracing::warn!(
                uid = nix::unistd::geteuid().as_raw(),
                "the agent is not root: Flower runs as the agent's own user"
            ),
        }
        cmd.args(&args)
            .env_clear()
            .envs(process_env(cfg, role, node, paths, &bin_dir))
            .current_dir(paths.flwr_home())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd.spawn().map_err(|source| FlowerError::Start {
            program: program.clone(),
            source,
        })?;
        let pid = child.id().ok_or(FlowerError::ExitedImmediately)?;
        let pgid = Pid::from_raw(pid as i32);
        let pid_file = pid_file(paths, role);
        let _ = fs::write(&pid_file, pid.to_string());
        tracing::info!(program = %program.display(), pid, args = ?args, "started Flower");
        Ok(Self {
            child,
            pgid,
            log,
            log_start,
            pid_file,
        })
    }

    /// Process id of the group leader.
    pub fn pid(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// Exit status if the leader has exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the leader to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Log written since this process started (bounded to the last `max` bytes).
    pub fn log_since_start(&self, max: u64) -> String {
        read_tail(&self.log, self.log_start, max)
    }

    /// SIGTERM to the group, SIGKILL after `grace`; then SIGKILL to leftovers of the group.
    pub async fn stop(mut self, grace: Duration) -> Option<ExitStatus> {
        let _ = killpg(self.pgid, Signal::SIGTERM);
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => s.ok(),
            Err(_) => {
                tracing::warn!(
                    pid = self.pgid.as_raw(),
                    "Flower did not stop in time; killing its process group"
                );
                let _ = killpg(self.pgid, Signal::SIGKILL);
                self.child.wait().await.ok()
            }
        };
        // Children (SuperExec, ClientApp) may survive the leader: end the whole group.
        let _ = killpg(self.pgid, Signal::SIGKILL);
        let _ = fs::remove_file(&self.pid_file);
        status
    }
}

/// Reads `path` from `start` (at most the last `max` bytes).
pub fn read_tail(path: &Path, start: u64, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = start.max(len.saturating_sub(max)).min(len);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Kills a Flower process group left behind by an earlier agent (pid file + cmdline check).
pub fn kill_stale(paths: &Paths, role: Role) {
    let file = pid_file(paths, role);
    let Ok(text) = fs::read_to_string(&file) else {
        return;
    };
    let _ = fs::remove_file(&file);
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    if pid <= 1 {
        return;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("flower-") {
        tracing::warn!(
            pid,
            "killing a Flower process group left by an earlier agent"
        );
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Registration state of a SuperNode, read from its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Not registered yet.
    Pending,
    /// Registered (`SuperNode ID: <id>`), with the id.
    Registered(u64),
    /// Registered once, then the SuperLink forgot the node ("Node ID ... not found") or the
    /// node gave up reconnecting: alive or not, it will never serve again.
    Lost,
}

/// Reads a SuperNode log (from its start) for registration and the half-dead markers.
pub fn registration(log: &str) -> Registration {
    registration_after(Registration::Pending, log)
}

/// [`registration`] continued from `prev`, the state an earlier read of the same log
/// found. The supervisor reads a bounded tail of the log: once a long-running SuperNode
/// has logged more than that since it registered, its `SuperNode ID` line is out of the
/// tail, and a fresh read would say "not registered yet" — which restarted a healthy
/// SuperNode mid-round (#13 item 7: the training run then waits forever for its reply).
/// Shown by `tests::registration_survives_the_id_line_leaving_the_tail`.
pub fn registration_after(prev: Registration, log: &str) -> Registration {
    let mut state = prev;
    for line in log.lines() {
        if let Some(rest) = line.split("SuperNode ID: ").nth(1) {
            let id: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(id) = id.parse() {
                state = Registration::Registered(id);
            }
        } else if ((line.contains("Node ID") && line.contains("not found"))
            || line.contains("Giving up reconnection"))
            && matches!(state, Registration::Registered(_))
        {
            state = Registration::Lost;
        }
    }
    state
}

/// The last message a SuperNode's log shows it received, for `FL_CLIENT_STATUS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastMessage {
    /// Flower's message id (unique per message, so a message received and answered
    /// between two reads is still told from the one before).
    pub id: String,
    /// Its handling ended: the reply was sent (`Sent successfully`) or the run was no
    /// longer running (`Ignoring`).
    pub done: bool,
}

/// The last message in `log`, from the lines flwr 1.25 prints
/// (`supernode/start_client_internal.py`, read in the installed package):
/// `_pull_and_store_message` logs `Receiving: <type> message (ID: <id>)` when it pulls one
/// (then `Received successfully` once its content is stored, and the ClientApp runs);
/// `_push_messages` logs `Sent successfully` once the reply is pushed, or `Run ID <run> is
/// not in `RUNNING` status. Ignoring …` / `Failed to … message …` when it gave up on it.
/// `None` when the log shows none.
pub fn last_message(log: &str) -> Option<LastMessage> {
    let mut last: Option<LastMessage> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Receiving: ").nth(1) {
            let id = rest
                .split(" message (ID: ")
                .nth(1)
                .map(|id| {
                    id.trim_end()
                        .trim_end_matches(')')
                        .chars()
                        .take(128)
                        .collect::<String>()
                })
                .filter(|id| !id.is_empty());
            if let Some(id) = id {
                last = Some(LastMessage { id, done: false });
            }
        } else if line.contains("Sent successfully")
            || line.contains("Ignoring")
            || line.contains("Failed to receive message")
            || line.contains("Failed to send message")
        {
            if let Some(m) = last.as_mut() {
                m.done = true;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_message_follows_receiving_and_sent() {
        // The lines flwr 1.25.0's SuperNode prints, as a real run's log has them (ids shortened).
        assert_eq!(last_message("INFO :      SuperNode ID: 7\n"), None);
        let got = "\x1b[92mINFO \x1b[0m:      [RUN 3, ROUND 1]\n\x1b[92mINFO \x1b[0m:      Receiving: train message (ID: 0a1b)\n";
        let busy = Some(LastMessage {
            id: "0a1b".into(),
            done: false,
        });
        assert_eq!(last_message(got), busy);
        // Stored and handed to the ClientApp: still in hand.
        let stored = format!("{got}INFO :      Received successfully\n");
        assert_eq!(last_message(&stored), busy);
        let sent = format!(
            "{stored}INFO :      [RUN 3, ROUND 1]\nINFO :      Sending: train message (ID: 9f9f)\nINFO :      Sent successfully\n"
        );
        assert_eq!(last_message(&sent).map(|m| m.done), Some(true));
        let next = format!("{sent}INFO :      Receiving: evaluate message (ID: 0a1c)\n");
        assert_eq!(
            last_message(&next),
            Some(LastMessage {
                id: "0a1c".into(),
                done: false
            })
        );
        for gave_up in [
            "INFO :      Run ID 3 is not in `RUNNING` status. Ignoring reply message 0a1c.",
            "INFO :      Run ID 3 is not in `RUNNING` status. Ignoring message 0a1c.",
            "ERROR :     Failed to send message 0a1c: boom",
            "ERROR :     Failed to receive message 0a1c: boom",
        ] {
            let log = format!("{next}{gave_up}\n");
            assert_eq!(last_message(&log).map(|m| m.done), Some(true), "{gave_up}");
        }
        // The aggregation lines of a SuperLink log are no message, nor is a line without id.
        assert_eq!(
            last_message("INFO :      aggregate_train: Received 2 results and 0 failures\n"),
            None
        );
        assert_eq!(last_message("INFO :      Receiving: train message\n"), None);
    }

    #[test]
    fn registration_from_log() {
        assert_eq!(
            registration("INFO : Starting Flower SuperNode\n"),
            Registration::Pending
        );
        let ok = "\x1b[92mINFO \x1b[0m:      SuperNode ID: 15644467414316882310\n";
        assert_eq!(
            registration(ok),
            Registration::Registered(15644467414316882310)
        );
        let lost = format!(
            "{ok}WARNING : Giving up reconnection after 2.30 seconds and 4 tries.\n\tdetails = \"Exception calling application: Node ID 15644467414316882310 not found\"\n"
        );
        assert_eq!(registration(&lost), Registration::Lost);
        let again = format!("{lost}INFO : SuperNode ID: 7\n");
        assert_eq!(registration(&again), Registration::Registered(7));
    }

    #[test]
    fn registration_survives_the_id_line_leaving_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("flower.log");
        let mut text = "INFO :      SuperNode ID: 42\n".to_string();
        // A long training session: far more than the tail the supervisor reads.
        for i in 0..20_000 {
            text.push_str(&format!(
                "INFO :      [RUN 1, ROUND {i}] Receiving: train message (ID: {i})\n"
            ));
        }
        std::fs::write(&log, &text).unwrap();
        let tail = read_tail(&log, 0, 256 * 1024);
        assert!(!tail.contains("SuperNode ID"), "the id line left the tail");
        assert_eq!(
            registration(&tail),
            Registration::Pending,
            "a fresh read is fooled"
        );
        let prev = registration(&read_tail(&log, 0, u64::MAX));
        assert_eq!(prev, Registration::Registered(42));
        assert_eq!(
            registration_after(prev, &tail),
            Registration::Registered(42)
        );
        // The half-dead markers still count after the id line is gone.
        let lost = format!("{tail}ERROR :     Node ID 42 not found\n");
        assert_eq!(registration_after(prev, &lost), Registration::Lost);
    }

    #[test]
    fn tail_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("log");
        fs::write(&f, "0123456789").unwrap();
        assert_eq!(read_tail(&f, 2, 100), "23456789");
        assert_eq!(read_tail(&f, 0, 3), "789");
        assert_eq!(read_tail(&dir.path().join("none"), 0, 3), "");
    }
}
