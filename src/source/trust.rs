//! Which fetched Git revisions may be used: the transport they came over, who signed
//! them, and whether they continue the history already applied.
//!
//! Owns: the transport policy (URL schemes and git's `protocol.*.allow`), commit signature
//! verification against the operator's keys only (an isolated GNUPGHOME and allowed-signers
//! file, never the user's trust database), the classification of a fetched HEAD against
//! the last accepted revision, and that revision's record on disk.
//!
//! Must not: fetch, check out or load specs (that is [`super::git`]), or run anything
//! through a shell: the git, gpg and ssh-keygen commands take argv arrays.
//!
//! Anchors: Flux's `GitRepository.spec.verify` (mode HEAD, keys from a secret, condition
//! `SourceVerified`) and Argo CD's refusal to sync from a source it cannot trust.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::api::ConditionStatus;

/// The flag that allows `http://` and `git://` remotes.
pub const INSECURE_FLAG: &str = "--allow-insecure-transport";
/// The flag that allows a fetched HEAD that does not continue the accepted history.
pub const ROLLBACK_FLAG: &str = "--allow-rollback";

/// The condition type of signature verification (Flux's name).
pub const SOURCE_VERIFIED: &str = "SourceVerified";
/// The condition type of history continuity: `True` when the fetched HEAD descends from
/// the last accepted revision.
pub const FAST_FORWARD: &str = "FastForward";

/// Largest key file read (an allowed-signers file or one OpenPGP key file).
const MAX_KEY_FILE: u64 = 1 << 20;
/// Most OpenPGP key files read from a keys directory.
const MAX_KEY_FILES: usize = 256;
/// Longest signer text kept from a signature (it is the committer's to choose).
const MAX_SIGNER: usize = 200;

/// How fetched revisions are checked before they are used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustPolicy {
    /// Verify the signature of every fetched HEAD against these keys.
    pub verify: Option<SigningKeys>,
    /// Accept `http://` and `git://` (warned on each fetch).
    pub allow_insecure_transport: bool,
    /// Apply a fetched HEAD that is not a fast-forward of the last accepted revision.
    pub allow_rollback: bool,
    /// Where the last accepted revision is remembered (`run` only: a one-shot command has
    /// no history to continue). `None`: no rollback detection.
    pub accepted_file: Option<PathBuf>,
}

/// The keys a verified revision must be signed with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SigningKeys {
    /// SSH keys, in git's `gpg.ssh.allowedSignersFile` format.
    pub allowed_signers: Option<PathBuf>,
    /// OpenPGP public keys: a file (armored or binary, one or more keys) or a directory of
    /// such files.
    pub gpg_keys: Option<PathBuf>,
}

/// One check of the newest fetched revision, shown with the source's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceCondition {
    /// [`SOURCE_VERIFIED`] or [`FAST_FORWARD`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether the check passed.
    pub status: ConditionStatus,
    /// One CamelCase word saying why.
    pub reason: String,
    /// A sentence for humans.
    pub message: String,
    /// The revision checked.
    pub revision: String,
}

/// The source's checks of its newest fetched revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceChecks {
    /// One per check configured (none for a directory, or Git without checks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<SourceCondition>,
    /// The newest fetched revision when it was refused: it is not applied, and the
    /// snapshot in use stays the last good one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_revision: Option<String>,
}

impl SourceChecks {
    /// The first failed condition, the one that refused [`Self::refused_revision`].
    pub fn refusal(&self) -> Option<&SourceCondition> {
        self.refused_revision.as_ref()?;
        self.conditions
            .iter()
            .find(|c| c.status != ConditionStatus::True)
    }
}

/// How a URL reaches its repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `https://`, `ssh://` (also `git+ssh://`), scp-like `host:path`, `file://` or a path.
    Secure,
    /// `http://` or `git://`: neither authenticated nor encrypted.
    Plaintext,
}

/// Classify `url`, refusing what git would hand to a transport helper (`ext::`, `fd::`,
/// `foo::…`) or a scheme it should not speak (`ftp`, `rsync`, …).
pub fn transport(url: &str) -> Result<Transport, String> {
    if url.contains("::") {
        return Err(format!(
            "git URL {:?} names a transport helper (`helper::address`); only https, ssh, \
             file and (with {INSECURE_FLAG}) http and git are accepted",
            super::redact_url(url)
        ));
    }
    let scheme = match url.find("://") {
        Some(i) => url[..i].to_ascii_lowercase(),
        // No scheme: an scp-like `[user@]host:path`, or a local path.
        None => return Ok(Transport::Secure),
    };
    match scheme.as_str() {
        "https" | "ssh" | "git+ssh" | "ssh+git" | "file" => Ok(Transport::Secure),
        "http" | "git" => Ok(Transport::Plaintext),
        other => Err(format!(
            "git URL {:?}: the {other}:// transport is not accepted; use https, ssh or file",
            super::redact_url(url)
        )),
    }
}

/// `url`'s transport under `policy`: a plaintext one is an error naming the flag unless
/// allowed.
pub fn check_transport(url: &str, policy: &TrustPolicy) -> Result<Transport, String> {
    let t = transport(url)?;
    if t == Transport::Plaintext && !policy.allow_insecure_transport {
        return Err(format!(
            "git URL {:?} is plaintext (http:// or git://): anyone on the path can change \
             the specs. Use https:// or ssh://, or pass {INSECURE_FLAG} to accept it",
            super::redact_url(url)
        ));
    }
    Ok(t)
}

/// git `-c` settings every command gets: only the accepted protocols, whatever the user's
/// configuration or an `insteadOf` rewrite says (git applies these after rewriting).
pub fn protocol_config(policy: &TrustPolicy) -> Vec<String> {
    let mut allowed = vec!["https", "ssh", "file"];
    if policy.allow_insecure_transport {
        allowed.extend(["http", "git"]);
    }
    let mut args = vec!["-c".to_string(), "protocol.allow=never".to_string()];
    for p in allowed {
        args.push("-c".into());
        args.push(format!("protocol.{p}.allow=always"));
    }
    args
}

/// A fetched revision refused, with the condition that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub SourceCondition);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "revision {} refused ({}={:?} reason={}): {}",
            short(&self.0.revision),
            self.0.kind,
            self.0.status,
            self.0.reason,
            self.0.message
        )
    }
}

fn short(rev: &str) -> &str {
    rev.get(..12).unwrap_or(rev)
}

fn condition(kind: &str, ok: bool, reason: &str, message: String, rev: &str) -> SourceCondition {
    SourceCondition {
        kind: kind.into(),
        status: if ok {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason: reason.into(),
        message,
        revision: rev.into(),
    }
}

/// Verify that commit `sha` in the repository at `repo` is signed by one of `keys`.
///
/// # Guarantees
/// - Only `keys` count: gpg runs with a fresh GNUPGHOME holding just the given public keys
///   (marked trusted there, so a good signature reads `G`), git with
///   `gpg.ssh.allowedSignersFile` set to the given file (or an empty one), and the
///   programs are `gpg` and `ssh-keygen` whatever the user's git configuration names.
/// - Only `G` (a good signature by an allowed key) passes; unsigned, unknown key, bad
///   signature, expired signature or key, and revoked key each refuse with their reason.
/// - No gpg-agent is left running (`no-autostart`: public-key work needs none).
///
/// # Errors
/// `Err` when the keys cannot be read or imported (the message names the file).
pub async fn verify(
    repo: &Path,
    sha: &str,
    keys: &SigningKeys,
    timeout: Duration,
) -> Result<SourceCondition, String> {
    let home = tempfile::Builder::new()
        .prefix("flower-reconcile-verify")
        .tempdir()
        .map_err(|e| format!("cannot create a keyring directory: {e}"))?;
    let gnupg = home.path().join("gnupg");
    std::fs::create_dir(&gnupg).map_err(|e| format!("cannot create GNUPGHOME: {e}"))?;
    restrict(&gnupg)?;
    std::fs::write(gnupg.join("gpg.conf"), "no-autostart\n")
        .map_err(|e| format!("cannot write gpg.conf: {e}"))?;
    if let Some(src) = &keys.gpg_keys {
        import_gpg_keys(&gnupg, src, timeout).await?;
    }
    let signers = match &keys.allowed_signers {
        Some(f) => {
            check_size(f, "--allowed-signers")?;
            f.clone()
        }
        None => {
            let empty = home.path().join("allowed_signers");
            std::fs::write(&empty, "").map_err(|e| format!("cannot write {e}"))?;
            empty
        }
    };
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(repo);
    for (k, v) in [
        ("gpg.program", "gpg"),
        ("gpg.openpgp.program", "gpg"),
        ("gpg.ssh.program", "ssh-keygen"),
        ("gpg.minTrustLevel", "undefined"),
    ] {
        cmd.arg("-c").arg(format!("{k}={v}"));
    }
    cmd.arg("-c")
        .arg(format!("gpg.ssh.allowedSignersFile={}", signers.display()))
        .args([
            "log",
            "-1",
            "--no-walk",
            "--format=%G?%x00%GK%x00%GS",
            sha,
            "--",
        ])
        .env("GNUPGHOME", &gnupg)
        .env("LC_ALL", "C");
    let out = run(cmd, timeout, "git log (signature)").await?;
    let text = String::from_utf8_lossy(&out);
    let mut parts = text.trim_end_matches('\n').split('\0');
    let letter = parts.next().unwrap_or("").trim();
    let key = printable(parts.next().unwrap_or(""));
    let signer = printable(parts.next().unwrap_or(""));
    let by = match (key.is_empty(), signer.is_empty()) {
        (true, _) => String::new(),
        (false, true) => format!(" by key {key}"),
        (false, false) => format!(" by key {key} ({signer})"),
    };
    let s = short(sha);
    let (ok, reason, message) = match letter {
        "G" => (
            true,
            "Signed",
            format!("commit {s} is signed{by}, an allowed key"),
        ),
        "N" => (false, "Unsigned", format!("commit {s} is not signed")),
        "B" => (
            false,
            "BadSignature",
            format!("commit {s} has a bad signature{by}"),
        ),
        "U" | "E" => (
            false,
            "UnknownKey",
            format!("commit {s} is signed{by}, which is not among the allowed keys"),
        ),
        "X" => (
            false,
            "ExpiredSignature",
            format!("commit {s}'s signature{by} has expired"),
        ),
        "Y" => (
            false,
            "ExpiredKey",
            format!("commit {s} is signed{by}, which has expired"),
        ),
        "R" => (
            false,
            "RevokedKey",
            format!("commit {s} is signed{by}, which is revoked"),
        ),
        other => (
            false,
            "CannotCheck",
            format!("commit {s}: git reports signature state {other:?}"),
        ),
    };
    Ok(condition(SOURCE_VERIFIED, ok, reason, message, sha))
}

/// Import the OpenPGP keys at `src` (a file or a directory of files) into `gnupg` and
/// trust them there (ownertrust ultimate: in this keyring only the operator's keys exist).
async fn import_gpg_keys(gnupg: &Path, src: &Path, timeout: Duration) -> Result<(), String> {
    let files: Vec<PathBuf> = if src.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(src)
            .map_err(|e| format!("--gpg-keyring {}: {e}", src.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        if v.len() > MAX_KEY_FILES {
            return Err(format!(
                "--gpg-keyring {}: more than {MAX_KEY_FILES} files",
                src.display()
            ));
        }
        v
    } else {
        vec![src.to_path_buf()]
    };
    for f in &files {
        check_size(f, "--gpg-keyring")?;
        let mut cmd = Command::new("gpg");
        cmd.args(["--batch", "--quiet", "--no-tty", "--homedir"])
            .arg(gnupg)
            .args(["--import", "--"])
            .arg(f);
        run(cmd, timeout, "gpg --import")
            .await
            .map_err(|e| format!("--gpg-keyring {}: {e}", f.display()))?;
    }
    let mut cmd = Command::new("gpg");
    cmd.args(["--batch", "--no-tty", "--with-colons", "--homedir"])
        .arg(gnupg)
        .arg("--list-keys");
    let listing = run(cmd, timeout, "gpg --list-keys").await?;
    // A primary key's fingerprint is the `fpr` record right after its `pub` record.
    let mut trust = String::new();
    let mut after_pub = false;
    for line in String::from_utf8_lossy(&listing).lines() {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.first() {
            Some(&"pub") => after_pub = true,
            Some(&"fpr") if after_pub => {
                if let Some(fpr) = fields
                    .get(9)
                    .filter(|f| f.chars().all(|c| c.is_ascii_hexdigit()))
                {
                    trust.push_str(&format!("{fpr}:6:\n"));
                }
                after_pub = false;
            }
            _ => after_pub = false,
        }
    }
    if trust.is_empty() {
        return Err(format!(
            "--gpg-keyring {}: no OpenPGP public key found",
            src.display()
        ));
    }
    let trust_file = gnupg.join("ownertrust.txt");
    std::fs::write(&trust_file, trust).map_err(|e| format!("cannot write ownertrust: {e}"))?;
    let mut cmd = Command::new("gpg");
    cmd.args(["--batch", "--quiet", "--no-tty", "--homedir"])
        .arg(gnupg)
        .arg("--import-ownertrust")
        .arg(&trust_file);
    run(cmd, timeout, "gpg --import-ownertrust").await?;
    Ok(())
}

fn check_size(f: &Path, flag: &str) -> Result<(), String> {
    let meta = std::fs::metadata(f).map_err(|e| format!("{flag} {}: {e}", f.display()))?;
    if meta.len() > MAX_KEY_FILE {
        return Err(format!(
            "{flag} {}: larger than {MAX_KEY_FILE} bytes",
            f.display()
        ));
    }
    Ok(())
}

fn restrict(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))
}

/// Signer text from a commit, made safe to show: printable, bounded.
fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .take(MAX_SIGNER)
        .collect::<String>()
        .trim()
        .to_string()
}

/// Run `cmd` (stdin closed) within `timeout`; its stdout, or an error with the last lines
/// of its stderr.
async fn run(mut cmd: Command, timeout: Duration, what: &str) -> Result<Vec<u8>, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| format!("{what} timed out after {timeout:?}"))?
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        let text = tail.into_iter().rev().collect::<Vec<_>>().join(" / ");
        return Err(format!("{what} failed: {text}"));
    }
    Ok(out.stdout)
}

/// How a fetched HEAD relates to the last accepted revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// The same commit, or a descendant: normal.
    FastForward,
    /// An ancestor of the accepted revision: a force-push rolled the branch back.
    Rollback,
    /// Neither: the history was rewritten, or the accepted commit is not in the fetched
    /// history at all.
    Rewritten,
}

/// Relate `head` to `accepted` in `repo` (full history fetched).
pub async fn history(
    repo: &Path,
    accepted: &str,
    head: &str,
    timeout: Duration,
) -> Result<History, String> {
    if accepted == head {
        return Ok(History::FastForward);
    }
    let present = is_true(
        repo,
        &["cat-file", "-e", &format!("{accepted}^{{commit}}")],
        timeout,
    )
    .await?;
    if !present {
        return Ok(History::Rewritten);
    }
    if is_true(
        repo,
        &["merge-base", "--is-ancestor", accepted, head],
        timeout,
    )
    .await?
    {
        return Ok(History::FastForward);
    }
    if is_true(
        repo,
        &["merge-base", "--is-ancestor", head, accepted],
        timeout,
    )
    .await?
    {
        return Ok(History::Rollback);
    }
    Ok(History::Rewritten)
}

/// Exit 0 → true, 1 → false (`cat-file -e` and `merge-base --is-ancestor` say "no"
/// that way; `cat-file -e` exits 128 for a missing object, which is also "no").
async fn is_true(repo: &Path, args: &[&str], timeout: Duration) -> Result<bool, String> {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(repo)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let status = tokio::time::timeout(timeout, cmd.status())
        .await
        .map_err(|_| format!("git {} timed out", args[0]))?
        .map_err(|e| format!("cannot run git: {e}"))?;
    match status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        Some(128) if args[0] == "cat-file" => Ok(false),
        _ => Err(format!("git {} failed ({status})", args[0])),
    }
}

/// The [`FAST_FORWARD`] condition for `history`, and whether the revision may be used.
pub fn history_condition(
    history: History,
    accepted: &str,
    head: &str,
    allow_rollback: bool,
) -> (SourceCondition, bool) {
    let (a, h) = (short(accepted), short(head));
    let (reason, what) = match history {
        History::FastForward => {
            let msg = if accepted == head {
                format!("{h} is the accepted revision")
            } else {
                format!("{h} descends from the accepted revision {a}")
            };
            return (
                condition(FAST_FORWARD, true, "FastForward", msg, head),
                true,
            );
        }
        History::Rollback => (
            "Rollback",
            format!("{h} is an ancestor of the accepted revision {a} (the branch was rolled back)"),
        ),
        History::Rewritten => (
            "HistoryRewritten",
            format!(
                "{h} does not descend from the accepted revision {a} (the history was rewritten)"
            ),
        ),
    };
    let message = if allow_rollback {
        format!("{what}; applied ({ROLLBACK_FLAG})")
    } else {
        format!("{what}; held: {a} stays applied. Pass {ROLLBACK_FLAG} to apply it")
    };
    (
        condition(FAST_FORWARD, false, reason, message, head),
        allow_rollback,
    )
}

/// The last accepted revision recorded at `file`, if any (a missing file: none yet).
pub fn read_accepted(file: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(file) {
        Ok(s) => {
            let sha = s.trim();
            if sha.len() > 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) || sha.is_empty() {
                return Err(format!(
                    "{}: not a commit id; remove it to accept the fetched revision",
                    file.display()
                ));
            }
            Ok(Some(sha.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", file.display())),
    }
}

/// Record `sha` as the last accepted revision at `file` (atomically: a crash leaves the
/// old record or the new one).
pub fn write_accepted(file: &Path, sha: &str) -> Result<(), String> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, format!("{sha}\n").as_bytes())
        .map_err(|e| format!("{}: {e}", file.display()))?;
    tmp.persist(file)
        .map_err(|e| format!("{}: {}", file.display(), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_are_classified_and_helpers_refused() {
        for url in [
            "https://h/x.git",
            "ssh://git@h/x",
            "git@h:org/x.git",
            "file:///srv/x",
            "/srv/x",
            "git+ssh://h/x",
        ] {
            assert_eq!(transport(url), Ok(Transport::Secure), "{url}");
        }
        for url in ["http://h/x", "git://h/x", "HTTP://h/x"] {
            assert_eq!(transport(url), Ok(Transport::Plaintext), "{url}");
        }
        for url in [
            "ext::sh -c touch% /tmp/pwned",
            "fd::3",
            "ftp://h/x",
            "rsync://h/x",
        ] {
            assert!(transport(url).is_err(), "{url}");
        }
        let strict = TrustPolicy::default();
        let err = check_transport("http://bob:pw@h/x", &strict).unwrap_err();
        assert!(err.contains(INSECURE_FLAG), "{err}");
        assert!(!err.contains("pw"), "no credential: {err}");
        let loose = TrustPolicy {
            allow_insecure_transport: true,
            ..TrustPolicy::default()
        };
        assert_eq!(
            check_transport("git://h/x", &loose),
            Ok(Transport::Plaintext)
        );
        assert!(check_transport("ext::x", &loose).is_err());
        let cfg = protocol_config(&strict).join(" ");
        assert!(cfg.starts_with("-c protocol.allow=never"), "{cfg}");
        assert!(!cfg.contains("http.allow"), "{cfg}");
        assert!(protocol_config(&loose)
            .join(" ")
            .contains("protocol.http.allow=always"));
    }

    #[test]
    fn the_accepted_revision_round_trips_and_a_corrupt_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub/x.accepted");
        assert_eq!(read_accepted(&f), Ok(None));
        write_accepted(&f, "0123abcd").unwrap();
        assert_eq!(read_accepted(&f), Ok(Some("0123abcd".into())));
        std::fs::write(&f, "$(reboot)").unwrap();
        let err = read_accepted(&f).unwrap_err();
        assert!(err.contains("x.accepted"), "{err}");
    }
}
