//! A Git repository, fetched with the `git` command line into a cache directory.
//!
//! Why the git CLI rather than gix: it adds no dependency to the controller, and it
//! brings the authentication users already have — ssh keys and agents, `~/.ssh/config`,
//! credential helpers, `insteadOf` rewrites, proxies — with no re-implementation.
//! Arguments always go as an argv array (never a shell) and the URL after `--`.
//!
//! Every fetched HEAD passes [`super::trust`]'s checks before it is checked out: the
//! transport, the signature (with `--verify-commits`) and, for `run`, the continuity with
//! the last accepted revision. A refused revision is reported ([`SourceChecks`]) and the
//! last good snapshot stays published.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::dir::{publish, scan_with};
use super::trust::{self, Refused, SourceChecks, TrustPolicy};
use super::{Assembler, Snapshot, SourceState};

/// A failed git operation. The message never holds credentials from the URL.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// `git` could not be started.
    #[error("cannot run git: {0}")]
    Spawn(std::io::Error),
    /// `git` ran and failed.
    #[error("git {step} failed: {stderr}")]
    Failed {
        /// Which step (`fetch`, `checkout`, …).
        step: &'static str,
        /// Last lines of git's stderr, redacted.
        stderr: String,
    },
    /// The operation took longer than the timeout.
    #[error("git {0} timed out after {1:?}")]
    Timeout(&'static str, Duration),
    /// The configuration cannot work.
    #[error("{0}")]
    Invalid(String),
}

/// A Git repository holding `FlowerCluster` specs.
#[derive(Debug, Clone)]
pub struct GitSource {
    /// Clone URL (`https://`, `ssh://`, `git@host:path`, `file://`).
    pub url: String,
    /// Branch to follow; the remote's HEAD when `None`.
    pub branch: Option<String>,
    /// Directory (or file) inside the repository holding the specs.
    pub path: Option<PathBuf>,
    /// Fetch interval.
    pub interval: Duration,
    /// Where the repository is cloned to (created when missing).
    pub cache_dir: PathBuf,
    /// Bound on one git command (Flux uses 60 s).
    pub timeout: Duration,
    /// Which fetched revisions may be used.
    pub trust: TrustPolicy,
}

/// One fetch's outcome: the snapshot (or why there is none new) and the checks of the
/// fetched revision (`None` when nothing was fetched: what is published stays).
struct Loaded {
    asm: Assembler,
    result: Result<Snapshot, String>,
    checks: Option<SourceChecks>,
}

impl GitSource {
    /// Reject configurations git would misread as options, and refused transports.
    pub fn validate(&self) -> Result<(), GitError> {
        if self.url.starts_with('-') || self.url.trim().is_empty() {
            return Err(GitError::Invalid(format!(
                "invalid git URL {:?}",
                redact_url(&self.url)
            )));
        }
        trust::check_transport(&self.url, &self.trust).map_err(GitError::Invalid)?;
        if let Some(b) = &self.branch {
            if b.starts_with('-') || b.contains("..") || b.chars().any(char::is_whitespace) {
                return Err(GitError::Invalid(format!("invalid branch name {b:?}")));
            }
        }
        if let Some(p) = &self.path {
            if p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(GitError::Invalid(format!(
                    "--path {} must be relative and stay inside the repository",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    async fn git(&self, step: &'static str, args: &[&str]) -> Result<String, GitError> {
        let mut cmd = Command::new("git");
        cmd.args(trust::protocol_config(&self.trust))
            .arg("-C")
            .arg(&self.cache_dir)
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let out = tokio::time::timeout(self.timeout, cmd.output())
            .await
            .map_err(|_| GitError::Timeout(step, self.timeout))?
            .map_err(GitError::Spawn)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            let text = tail.into_iter().rev().collect::<Vec<_>>().join(" / ");
            return Err(GitError::Failed {
                step,
                stderr: redact_url_in_text(&text, &self.url),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Fetch the branch tip (not checked out yet). Returns the commit sha.
    async fn fetch(&self) -> Result<String, GitError> {
        self.validate()?;
        if trust::transport(&self.url).ok() == Some(trust::Transport::Plaintext) {
            tracing::warn!(
                url = %redact_url(&self.url),
                "fetching specs over a plaintext transport ({}): anyone on the path can \
                 change them",
                trust::INSECURE_FLAG
            );
        }
        if !self.cache_dir.join(".git").exists() {
            std::fs::create_dir_all(&self.cache_dir).map_err(GitError::Spawn)?;
            self.git("init", &["init", "--quiet"]).await?;
        }
        let refspec = self
            .branch
            .as_ref()
            .map_or_else(|| "HEAD".to_string(), |b| format!("refs/heads/{b}"));
        // Rollback detection needs the history between the accepted revision and HEAD; a
        // one-shot command needs only the tip.
        let depth: &[&str] = if self.trust.accepted_file.is_none() {
            &["--depth", "1"]
        } else if self.cache_dir.join(".git/shallow").exists() {
            &["--unshallow"]
        } else {
            &[]
        };
        let mut args = vec!["fetch", "--quiet", "--no-tags"];
        args.extend(depth);
        args.extend(["--", &self.url, &refspec]);
        self.git("fetch", &args).await?;
        self.git(
            "rev-parse",
            &["rev-parse", "--verify", "FETCH_HEAD^{commit}"],
        )
        .await
    }

    /// Check `sha` out (after its checks passed).
    async fn checkout(&self, sha: &str) -> Result<(), GitError> {
        self.git(
            "checkout",
            &["checkout", "--quiet", "--force", "--detach", sha],
        )
        .await?;
        Ok(())
    }

    /// The checks of fetched revision `sha` under [`GitSource::trust`]; a failed one sets
    /// [`SourceChecks::refused_revision`].
    async fn check(&self, sha: &str) -> SourceChecks {
        let mut checks = SourceChecks::default();
        let refuse = |mut checks: SourceChecks, c: trust::SourceCondition| {
            checks.conditions.push(c);
            checks.refused_revision = Some(sha.to_string());
            checks
        };
        let cannot = |kind: &str, e: String| trust::SourceCondition {
            kind: kind.into(),
            status: crate::api::ConditionStatus::False,
            reason: "CannotCheck".into(),
            message: e,
            revision: sha.into(),
        };
        if let Some(keys) = &self.trust.verify {
            match trust::verify(&self.cache_dir, sha, keys, self.timeout).await {
                Ok(c) if c.status == crate::api::ConditionStatus::True => checks.conditions.push(c),
                Ok(c) => return refuse(checks, c),
                Err(e) => return refuse(checks, cannot(trust::SOURCE_VERIFIED, e)),
            }
        }
        if let Some(file) = &self.trust.accepted_file {
            let accepted = match trust::read_accepted(file) {
                Ok(a) => a,
                Err(e) => return refuse(checks, cannot(trust::FAST_FORWARD, e)),
            };
            if let Some(accepted) = accepted {
                let history =
                    match trust::history(&self.cache_dir, &accepted, sha, self.timeout).await {
                        Ok(h) => h,
                        Err(e) => return refuse(checks, cannot(trust::FAST_FORWARD, e)),
                    };
                let (c, usable) =
                    trust::history_condition(history, &accepted, sha, self.trust.allow_rollback);
                if !usable {
                    return refuse(checks, c);
                }
                if history != trust::History::FastForward {
                    tracing::warn!(revision = %sha, reason = %c.reason, "{}", c.message);
                }
                checks.conditions.push(c);
            }
        }
        checks
    }

    /// Remember `sha` as the last accepted revision (the record, and a ref that keeps its
    /// objects in the cache for the next ancestry check).
    async fn accept(&self, sha: &str) -> Result<(), String> {
        let Some(file) = &self.trust.accepted_file else {
            return Ok(());
        };
        trust::write_accepted(file, sha)?;
        self.git(
            "update-ref",
            &["update-ref", "refs/flower-reconcile/accepted", sha],
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn spec_root(&self) -> PathBuf {
        match &self.path {
            Some(p) => self.cache_dir.join(p),
            None => self.cache_dir.clone(),
        }
    }

    /// Fetch, check, then load the tree unless the commit is `previous`'s: the same sha is
    /// the same bytes, already checked, so it only confirms `previous` (no re-parse every
    /// interval) and keeps its checks.
    async fn sync_and_load(
        &self,
        asm: Assembler,
        previous: Option<&(Snapshot, SourceChecks)>,
    ) -> Loaded {
        let fail = |asm, e: String, checks| Loaded {
            asm,
            result: Err(e),
            checks,
        };
        let sha = match self.fetch().await {
            Ok(sha) => sha,
            Err(e) => return fail(asm, e.to_string(), None),
        };
        if let Some((prev, checks)) = previous.filter(|p| p.0.revision == sha) {
            let confirmed = Snapshot {
                confirmed: true,
                ..prev.clone()
            };
            return Loaded {
                asm,
                result: Ok(confirmed),
                checks: Some(checks.clone()),
            };
        }
        let checks = self.check(&sha).await;
        if let Some(c) = checks.refusal() {
            let e = Refused(c.clone()).to_string();
            return fail(asm, e, Some(checks));
        }
        if let Err(e) = self.checkout(&sha).await {
            return fail(asm, e.to_string(), Some(checks));
        }
        let root = self.spec_root();
        if !root.is_dir() {
            // Git keeps no empty directories: removing the last spec removes the path. Safer
            // to report it than to read it as "no clusters" and prune (a --path typo would
            // look the same).
            let path = self.path.as_deref().unwrap_or(Path::new("."));
            let e = format!(
                "{} is not a directory at revision {}; nothing is pruned (when removing \
                 the last spec, keep the directory, e.g. with a .gitkeep file)",
                path.display(),
                &sha[..sha.len().min(12)]
            );
            return fail(asm, e, Some(checks));
        }
        let (asm, result) = scan_with(asm, root, Some(sha.clone())).await;
        if result.is_ok() {
            if let Err(e) = self.accept(&sha).await {
                return fail(
                    asm,
                    format!("cannot record the accepted revision: {e}"),
                    Some(checks),
                );
            }
        }
        Loaded {
            asm,
            result,
            checks: Some(checks),
        }
    }

    /// Fetch, check and load once (for `plan` and `apply`).
    pub async fn load_once(&self) -> anyhow::Result<Snapshot> {
        self.sync_and_load(Assembler::default(), None)
            .await
            .result
            .map_err(anyhow::Error::msg)
    }

    /// Fetch every `interval` until `shutdown`. A failed fetch or a refused revision keeps
    /// the last good snapshot published and sets [`SourceState::error`] (and, when refused,
    /// [`SourceState::checks`]). An unchanged sha is not parsed again.
    pub async fn run(self, tx: watch::Sender<SourceState>, shutdown: CancellationToken) {
        let mut asm = Assembler::default();
        let mut last: Option<(Snapshot, SourceChecks)> = None;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let loaded = tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.sync_and_load(asm, last.as_ref()) => r,
            };
            asm = loaded.asm;
            match &loaded.result {
                Ok(snap) => last = Some((snap.clone(), loaded.checks.clone().unwrap_or_default())),
                Err(e) => match loaded.checks.as_ref().and_then(SourceChecks::refusal) {
                    Some(c) => tracing::warn!(
                        url = %redact_url(&self.url),
                        revision = %c.revision,
                        condition = %c.kind,
                        reason = %c.reason,
                        error = %e,
                        "refused the fetched revision; keeping the last good revision"
                    ),
                    None => tracing::warn!(
                        url = %redact_url(&self.url),
                        error = %e,
                        "cannot use the Git source; keeping the last good revision"
                    ),
                },
            }
            publish(&tx, loaded.result, loaded.checks);
        }
    }
}

/// `url` without a password or token in its user-info part.
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else {
        return url.to_string();
    };
    // An HTTP user name is often a token; an ssh user name (`git@`) is not a secret.
    let secret_user = matches!(u.scheme(), "http" | "https") && !u.username().is_empty();
    if u.password().is_none() && !secret_user {
        return url.to_string();
    }
    let _ = u.set_password(None);
    if secret_user {
        let _ = u.set_username("");
    }
    u.to_string()
}

fn redact_url_in_text(text: &str, url: &str) -> String {
    let redacted = redact_url(url);
    let mut out = text.replace(url, &redacted);
    if let Ok(u) = url::Url::parse(url) {
        if let Some(p) = u.password().filter(|p| !p.is_empty()) {
            out = out.replace(p, "***");
        }
    }
    out
}

/// The default cache directory for `url`/`branch` under `base`.
pub(super) fn cache_dir_for(base: &Path, url: &str, branch: Option<&str>) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{url}\n{}", branch.unwrap_or("")).as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    base.join(hex)
}

#[cfg(test)]
#[path = "git_trust_tests.rs"]
mod trust_tests;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::source::load::tests::spec_yaml;
    use crate::source::tests::{next_state, next_state_where};

    /// Run git with `args` in `dir`, panicking on failure (test set-up only).
    pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
        git_env(dir, args, &[])
    }

    /// [`git`] with more variables in its environment.
    pub(crate) fn git_env(dir: &Path, args: &[&str], env: &[(&str, &Path)]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .envs(env.iter().copied())
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.org")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.org")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A repository at `dir` on branch `main` with `files` committed; returns the sha.
    pub(crate) fn commit(dir: &Path, files: &[(&str, &str)]) -> String {
        if !dir.join(".git").exists() {
            std::fs::create_dir_all(dir).unwrap();
            git(dir, &["init", "--quiet", "--initial-branch=main"]);
        }
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        git(dir, &["add", "-A"]);
        git(dir, &["commit", "--quiet", "-m", "specs"]);
        git(dir, &["rev-parse", "HEAD"])
    }

    pub(crate) fn source(repo: &Path, cache: &Path) -> GitSource {
        GitSource {
            url: format!("file://{}", repo.display()),
            branch: Some("main".into()),
            path: Some("clusters".into()),
            interval: Duration::from_millis(200),
            cache_dir: cache.to_path_buf(),
            timeout: Duration::from_secs(30),
            trust: TrustPolicy::default(),
        }
    }

    #[tokio::test]
    async fn git_source_picks_up_commits_and_keeps_the_last_good_revision_on_fetch_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repo");
        let sha1 = commit(
            &repo,
            &[
                ("clusters/a.yaml", &spec_yaml("alpha", 2)),
                ("README.md", "not a spec"),
            ],
        );
        let (tx, mut rx) = watch::channel(SourceState::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(source(&repo, &tmp.path().join("cache")).run(tx, stop.clone()));

        let s = next_state(&mut rx).await;
        let snap = s.snapshot.unwrap();
        assert_eq!(snap.revision, sha1, "the commit sha is the revision");
        assert_eq!(snap.clusters["alpha"].cluster.spec.supernodes.count, 2);
        assert!(s.error.is_none());

        // (The next fetch of the same sha republishes it confirmed: skipped by `_where`.)
        let sha2 = commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 4))]);
        let revision_is = |sha: &str| {
            let sha = sha.to_string();
            move |s: &SourceState| s.snapshot.as_ref().is_some_and(|x| x.revision == sha)
        };
        let snap = next_state_where(&mut rx, revision_is(&sha2))
            .await
            .snapshot
            .unwrap();
        assert_eq!(snap.clusters["alpha"].cluster.spec.supernodes.count, 4);

        // The repository moves away: the last good revision stays, the error is reported.
        std::fs::rename(&repo, tmp.path().join("moved")).unwrap();
        let s = next_state_where(&mut rx, |s| s.error.is_some()).await;
        assert_eq!(s.snapshot.unwrap().revision, sha2);
        let err = s.error.expect("fetch error reported");
        assert!(err.contains("fetch"), "{err}");

        // Back again with a new commit: recovers.
        std::fs::rename(tmp.path().join("moved"), &repo).unwrap();
        let sha3 = commit(&repo, &[("clusters/b.yaml", &spec_yaml("beta", 1))]);
        let s = next_state_where(&mut rx, revision_is(&sha3)).await;
        assert!(s.error.is_none());
        let snap = s.snapshot.unwrap();
        assert_eq!(snap.revision, sha3);
        assert_eq!(snap.clusters.len(), 2);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_spec_path_gone_from_the_commit_is_an_error_not_an_empty_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repo");
        commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 2))]);
        let src = source(&repo, &tmp.path().join("cache"));
        assert_eq!(src.load_once().await.unwrap().clusters.len(), 1);
        // Removing the last spec removes the directory from Git.
        git(&repo, &["rm", "-q", "clusters/a.yaml"]);
        git(&repo, &["commit", "--quiet", "-m", "remove"]);
        let err = src.load_once().await.unwrap_err().to_string();
        assert!(
            err.contains("clusters is not a directory at revision"),
            "{err}"
        );
        assert!(err.contains(".gitkeep"), "{err}");
        // With the directory kept, the removal is a snapshot without the cluster.
        let sha = commit(&repo, &[("clusters/.gitkeep", "")]);
        let snap = src.load_once().await.unwrap();
        assert_eq!(snap.revision, sha);
        assert!(snap.clusters.is_empty());
    }

    #[tokio::test]
    async fn an_unchanged_sha_is_confirmed_without_parsing_again() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repo");
        let cache = tmp.path().join("cache");
        let sha = commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 2))]);
        let src = source(&repo, &cache);
        let loaded = src.sync_and_load(Assembler::default(), None).await;
        let (asm, first) = (loaded.asm, loaded.result.unwrap());
        assert_eq!(first.revision, sha);
        assert!(!first.confirmed, "one read is not a confirmation");
        // An untracked broken file in the checkout: a re-parse would report it.
        std::fs::write(cache.join("clusters/junk.yaml"), "metadata: [\n").unwrap();
        let previous = (first.clone(), SourceChecks::default());
        let second = src
            .sync_and_load(asm, Some(&previous))
            .await
            .result
            .unwrap();
        assert!(second.confirmed, "the same sha fetched again confirms it");
        assert!(
            second.errors.is_empty(),
            "not parsed again: {:?}",
            second.errors
        );
        assert_eq!(second.clusters, first.clusters);
    }

    #[test]
    fn urls_lose_their_credentials_and_options_are_refused() {
        assert_eq!(
            redact_url("https://bob:s3cret@git.example.org/x.git"),
            "https://git.example.org/x.git"
        );
        assert_eq!(redact_url("git@host:org/x.git"), "git@host:org/x.git");
        let text = redact_url_in_text(
            "fatal: could not read from https://bob:s3cret@h/x",
            "https://bob:s3cret@h/x",
        );
        assert!(!text.contains("s3cret"), "{text}");
        let mut s = source(Path::new("/nowhere"), Path::new("/tmp/x"));
        s.url = "--upload-pack=touch /tmp/pwned".into();
        assert!(matches!(s.validate(), Err(GitError::Invalid(_))));
        s.url = "file:///x".into();
        s.path = Some("../etc".into());
        assert!(matches!(s.validate(), Err(GitError::Invalid(_))));
    }
}
