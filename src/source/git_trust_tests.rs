//! [`GitSource`] under a [`TrustPolicy`], against real repositories: commits signed with
//! real SSH keys (ssh-keygen) and OpenPGP keys (gpg in a temporary GNUPGHOME), force-push
//! rollbacks and rewrites, plaintext transports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::tests::{commit, git, git_env};
use super::*;
use crate::api::ConditionStatus;
use crate::source::load::tests::spec_yaml;
use crate::source::tests::next_state_where;
use crate::source::{SigningKeys, SourceArgs, FAST_FORWARD, SOURCE_VERIFIED};

fn source(repo: &Path, cache: &Path, trust: TrustPolicy) -> GitSource {
    GitSource {
        trust,
        ..super::tests::source(repo, cache)
    }
}

fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An ed25519 SSH key pair at `dir/name`; returns the private key's path and an
/// allowed-signers line for it.
fn ssh_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    run_ok(
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&key),
    );
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, format!("t@example.org {}", public.trim()))
}

/// Commit `files` signed with `key` in `format` (`ssh`: a key file; `openpgp`: a
/// fingerprint in the GNUPGHOME of `env`).
fn commit_signed(
    repo: &Path,
    files: &[(&str, &str)],
    format: &str,
    key: &str,
    env: &[(&str, &Path)],
) -> String {
    write(repo, files);
    let format = format!("gpg.format={format}");
    let signing = format!("user.signingkey={key}");
    let args = [
        "-c", &format, "-c", &signing, "commit", "-q", "-S", "-m", "signed",
    ];
    git_env(repo, &args, env);
    git(repo, &["rev-parse", "HEAD"])
}

/// Commit `files` signed with the SSH key `key`.
fn commit_ssh(repo: &Path, files: &[(&str, &str)], key: &Path) -> String {
    commit_signed(repo, files, "ssh", &key.display().to_string(), &[])
}

fn write(repo: &Path, files: &[(&str, &str)]) {
    for (name, text) in files {
        let path = repo.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    git(repo, &["add", "-A"]);
}

/// A GNUPGHOME with one signing key; its agent is stopped when dropped.
struct GpgSigner {
    home: tempfile::TempDir,
    fpr: String,
}

impl GpgSigner {
    fn new(uid: &str) -> GpgSigner {
        let home = tempfile::tempdir().unwrap();
        let gpg = |args: &[&str]| {
            run_ok(
                std::process::Command::new("gpg")
                    .args(["--batch", "--quiet", "--passphrase", "", "--homedir"])
                    .arg(home.path())
                    .args(args),
            )
        };
        gpg(&["--quick-gen-key", uid, "ed25519", "sign", "1y"]);
        let listing = gpg(&["--with-colons", "--list-keys"]);
        let fpr = listing
            .lines()
            .find_map(|l| l.strip_prefix("fpr:::::::::"))
            .and_then(|l| l.split(':').next())
            .unwrap()
            .to_string();
        GpgSigner { home, fpr }
    }

    fn gpg(&self, args: &[&str]) -> String {
        run_ok(
            std::process::Command::new("gpg")
                .args([
                    "--batch",
                    "--quiet",
                    "--passphrase",
                    "",
                    "--pinentry-mode",
                    "loopback",
                ])
                .arg("--homedir")
                .arg(self.home.path())
                .args(args),
        )
    }

    /// The public key, armored, written to `path`.
    fn export(&self, path: &Path) {
        std::fs::write(path, self.gpg(&["--armor", "--export", &self.fpr])).unwrap();
    }

    fn commit(&self, repo: &Path, files: &[(&str, &str)]) -> String {
        let env = [("GNUPGHOME", self.home.path())];
        commit_signed(repo, files, "openpgp", &self.fpr, &env)
    }

    /// The key with its revocation (the certificate gpg made at generation) applied.
    fn revoke(&self) {
        let rev = self
            .home
            .path()
            .join("openpgp-revocs.d")
            .join(format!("{}.rev", self.fpr));
        // gpg prefixes the armor line with ':' so that the certificate is not imported
        // by accident.
        let text = std::fs::read_to_string(&rev).unwrap().replace(
            ":-----BEGIN PGP PUBLIC KEY BLOCK-----",
            "-----BEGIN PGP PUBLIC KEY BLOCK-----",
        );
        std::fs::write(&rev, text).unwrap();
        self.gpg(&["--import", rev.to_str().unwrap()]);
    }
}

impl Drop for GpgSigner {
    fn drop(&mut self) {
        let _ = std::process::Command::new("gpgconf")
            .arg("--homedir")
            .arg(self.home.path())
            .args(["--kill", "gpg-agent"])
            .output();
    }
}

/// Print the median time of verifying `sha` in `repo` (a figure, not asserted).
async fn print_verify_median(label: &str, repo: &Path, sha: &str, keys: &SigningKeys) {
    let mut took = Vec::new();
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let c = super::trust::verify(repo, sha, keys, Duration::from_secs(30))
            .await
            .unwrap();
        took.push(t.elapsed());
        assert_eq!(c.status, ConditionStatus::True);
    }
    took.sort();
    println!("verify {label}: median {:?} of 5", took[2]);
}

/// The checks of a fetch that fetched.
fn checks(checks: &Option<SourceChecks>) -> &SourceChecks {
    checks.as_ref().expect("a revision was fetched")
}

fn verifying(keys: SigningKeys) -> TrustPolicy {
    TrustPolicy {
        verify: Some(keys),
        ..TrustPolicy::default()
    }
}

/// The `SourceVerified` condition's reason of a refused fetch of `src`.
async fn refused_reason(src: &GitSource, sha: &str) -> (String, String) {
    let loaded = src.sync_and_load(Assembler::default(), None).await;
    let err = loaded.result.expect_err("refused");
    assert_eq!(
        checks(&loaded.checks).refused_revision.as_deref(),
        Some(sha),
        "{err}"
    );
    let c = checks(&loaded.checks)
        .refusal()
        .expect("a failed condition")
        .clone();
    assert_eq!(c.kind, SOURCE_VERIFIED);
    (c.reason, err)
}

#[tokio::test]
async fn ssh_signed_commits_are_applied_and_unsigned_or_unlisted_ones_refused_keeping_the_last_good(
) {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let (allowed, line) = ssh_key(tmp.path(), "allowed");
    let (other, _) = ssh_key(tmp.path(), "other");
    let signers = tmp.path().join("allowed_signers");
    std::fs::write(&signers, format!("{line}\n")).unwrap();
    commit(&repo, &[("README.md", "specs")]);
    let sha1 = commit_ssh(
        &repo,
        &[("clusters/a.yaml", &spec_yaml("alpha", 1))],
        &allowed,
    );
    let trust = verifying(SigningKeys {
        allowed_signers: Some(signers.clone()),
        gpg_keys: None,
    });
    let (tx, mut rx) = watch::channel(SourceState::default());
    let stop = CancellationToken::new();
    let task = tokio::spawn(source(&repo, &tmp.path().join("cache"), trust).run(tx, stop.clone()));

    let s = next_state_where(&mut rx, |s| s.snapshot.is_some()).await;
    assert_eq!(
        s.snapshot.unwrap().revision,
        sha1,
        "a signed commit is applied"
    );
    let c = &s.checks.conditions[0];
    assert_eq!(
        (c.kind.as_str(), c.status),
        (SOURCE_VERIFIED, ConditionStatus::True)
    );
    assert!(
        c.message.contains("SHA256:"),
        "names the key: {}",
        c.message
    );

    // Unsigned: refused, reported, the signed revision stays.
    let sha2 = commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 5))]);
    let s = next_state_where(&mut rx, |s| s.checks.refused_revision.is_some()).await;
    assert_eq!(s.checks.refused_revision.as_deref(), Some(sha2.as_str()));
    let c = s.checks.refusal().unwrap();
    assert_eq!(
        (c.status, c.reason.as_str()),
        (ConditionStatus::False, "Unsigned")
    );
    let snap = s.snapshot.unwrap();
    assert_eq!(snap.revision, sha1, "the last good revision stays");
    assert_eq!(snap.clusters["alpha"].cluster.spec.supernodes.count, 1);
    assert!(s.error.unwrap().contains("reason=Unsigned"));
    assert_eq!(
        git(&tmp.path().join("cache"), &["rev-parse", "HEAD"]),
        sha1,
        "a refused revision is not even checked out"
    );

    // A fetch that fails meanwhile checks nothing: the refusal stays reported.
    std::fs::rename(&repo, tmp.path().join("moved")).unwrap();
    let s = next_state_where(&mut rx, |s| {
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("git fetch failed"))
    })
    .await;
    assert_eq!(s.checks.refused_revision.as_deref(), Some(sha2.as_str()));
    std::fs::rename(tmp.path().join("moved"), &repo).unwrap();

    // Signed, but by a key not in the allowed signers.
    let sha3 = commit_ssh(
        &repo,
        &[("clusters/a.yaml", &spec_yaml("alpha", 6))],
        &other,
    );
    let s = next_state_where(&mut rx, |s| {
        s.checks.refused_revision.as_deref() == Some(&sha3)
    })
    .await;
    assert_eq!(s.checks.refusal().unwrap().reason, "UnknownKey");
    assert_eq!(s.snapshot.unwrap().revision, sha1);

    // Signed by the allowed key again: applied, nothing refused any more.
    let sha4 = commit_ssh(
        &repo,
        &[("clusters/a.yaml", &spec_yaml("alpha", 3))],
        &allowed,
    );
    let s = next_state_where(&mut rx, |s| {
        s.snapshot.as_ref().is_some_and(|x| x.revision == sha4)
    })
    .await;
    assert!(s.error.is_none() && s.checks.refused_revision.is_none());
    assert_eq!(
        s.snapshot.unwrap().clusters["alpha"]
            .cluster
            .spec
            .supernodes
            .count,
        3
    );
    stop.cancel();
    task.await.unwrap();
    let keys = SigningKeys {
        allowed_signers: Some(signers.clone()),
        gpg_keys: None,
    };
    print_verify_median("SSH", &tmp.path().join("cache"), &sha4, &keys).await;

    // A tampered signature: the same commit with its content changed under the signature.
    let raw = git(&repo, &["cat-file", "commit", &sha4]);
    let forged = raw.replacen("signed", "forged", 1);
    let forged_path = tmp.path().join("forged");
    std::fs::write(&forged_path, format!("{forged}\n")).unwrap();
    let bad = git(
        &repo,
        &[
            "hash-object",
            "-t",
            "commit",
            "-w",
            forged_path.to_str().unwrap(),
        ],
    );
    git(&repo, &["update-ref", "refs/heads/main", &bad]);
    let src = source(
        &repo,
        &tmp.path().join("cache"),
        verifying(SigningKeys {
            allowed_signers: Some(signers),
            gpg_keys: None,
        }),
    );
    assert_eq!(refused_reason(&src, &bad).await.0, "BadSignature");
}

#[tokio::test]
async fn gpg_signed_commits_count_only_with_the_given_keys_and_revoked_or_expired_keys_refuse() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let signer = GpgSigner::new("Signer <s@example.org>");
    let stranger = GpgSigner::new("Stranger <x@example.org>");
    let keys = tmp.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    signer.export(&keys.join("signer.asc"));
    let trust = verifying(SigningKeys {
        allowed_signers: None,
        gpg_keys: Some(keys.clone()),
    });
    let src = source(&repo, &tmp.path().join("cache"), trust.clone());
    commit(&repo, &[("README.md", "specs")]);

    let sha = signer.commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 1))]);
    let loaded = src.sync_and_load(Assembler::default(), None).await;
    assert_eq!(loaded.result.unwrap().revision, sha);
    let keyring = trust.verify.clone().unwrap();
    print_verify_median("OpenPGP", &tmp.path().join("cache"), &sha, &keyring).await;
    assert!(checks(&loaded.checks).conditions[0]
        .message
        .contains(&signer.fpr[24..]));

    let sha = stranger.commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 2))]);
    assert_eq!(
        refused_reason(&src, &sha).await.0,
        "UnknownKey",
        "a key not given"
    );

    // Revoked after signing: refused.
    let sha = signer.commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 4))]);
    signer.revoke();
    signer.export(&keys.join("signer.asc"));
    assert_eq!(refused_reason(&src, &sha).await.0, "RevokedKey");

    // Expired after signing: refused.
    let late = GpgSigner::new("Late <l@example.org>");
    let sha = late.commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 5))]);
    late.gpg(&["--quick-set-expire", &late.fpr, "seconds=1"]);
    std::thread::sleep(Duration::from_millis(2100));
    late.export(&keys.join("late.asc"));
    assert_eq!(refused_reason(&src, &sha).await.0, "ExpiredKey");

    // A keyring that holds no key is a clear error, and refuses.
    let empty = tmp.path().join("empty.asc");
    std::fs::write(&empty, "not a key\n").unwrap();
    let mut bad = src.clone();
    bad.trust.verify = Some(SigningKeys {
        allowed_signers: None,
        gpg_keys: Some(empty),
    });
    let (reason, err) = refused_reason(&bad, &sha).await;
    assert_eq!(reason, "CannotCheck");
    assert!(
        err.contains("--gpg-keyring") && err.contains("empty.asc"),
        "{err}"
    );
}

#[tokio::test]
async fn a_rollback_or_rewrite_is_held_across_restarts_and_applied_only_when_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let cache = tmp.path().join("cache");
    let accepted = tmp.path().join("state/accepted");
    let remembering = |allow_rollback| TrustPolicy {
        accepted_file: Some(accepted.clone()),
        allow_rollback,
        ..TrustPolicy::default()
    };
    let src = source(&repo, &cache, remembering(false));
    let sha1 = commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 1))]);
    assert_eq!(src.load_once().await.unwrap().revision, sha1);
    let sha2 = commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 2))]);
    let loaded = src.sync_and_load(Assembler::default(), None).await;
    assert_eq!(loaded.result.unwrap().revision, sha2, "a fast-forward");
    assert_eq!(checks(&loaded.checks).conditions[0].reason, "FastForward");
    assert_eq!(std::fs::read_to_string(&accepted).unwrap().trim(), sha2);

    // Force-push back to sha1: held (a fresh source, as after a restart: the record is
    // on disk).
    git(&repo, &["reset", "-q", "--hard", &sha1]);
    let src = source(&repo, &cache, remembering(false));
    let loaded = src.sync_and_load(Assembler::default(), None).await;
    let err = loaded.result.unwrap_err();
    let c = checks(&loaded.checks).refusal().unwrap();
    assert_eq!(
        (c.kind.as_str(), c.reason.as_str()),
        (FAST_FORWARD, "Rollback")
    );
    assert!(err.contains("--allow-rollback"), "names the flag: {err}");
    assert_eq!(std::fs::read_to_string(&accepted).unwrap().trim(), sha2);

    // Unrelated history pushed as main: held too.
    git(&repo, &["checkout", "-q", "--orphan", "rewrite"]);
    let sha3 = commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 7))]);
    git(&repo, &["branch", "-q", "-M", "rewrite", "main"]);
    let loaded = src.sync_and_load(Assembler::default(), None).await;
    assert_eq!(
        checks(&loaded.checks).refused_revision.as_deref(),
        Some(sha3.as_str())
    );
    assert_eq!(
        checks(&loaded.checks).refusal().unwrap().reason,
        "HistoryRewritten"
    );

    // With the flag: applied, reported, and the new history is the accepted one.
    let allowed = source(&repo, &cache, remembering(true));
    let loaded = allowed.sync_and_load(Assembler::default(), None).await;
    assert_eq!(loaded.result.unwrap().revision, sha3);
    let c = &checks(&loaded.checks).conditions[0];
    assert_eq!(
        (c.status, c.reason.as_str()),
        (ConditionStatus::False, "HistoryRewritten")
    );
    assert!(c.message.contains("applied"), "{}", c.message);
    assert_eq!(std::fs::read_to_string(&accepted).unwrap().trim(), sha3);
    let sha4 = commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 8))]);
    assert_eq!(
        src.load_once().await.unwrap().revision,
        sha4,
        "fast-forward again"
    );
}

#[tokio::test]
async fn plaintext_transports_are_refused_unless_allowed_and_helpers_always() {
    let args = |url: &str, insecure: bool| SourceArgs {
        git: Some(url.into()),
        allow_insecure_transport: insecure,
        ..SourceArgs::default()
    };
    let base = Path::new("/tmp/unused");
    let err = args("http://bob:tok@example.org/specs.git", false)
        .build(base)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--allow-insecure-transport"), "{err}");
    assert!(!err.contains("tok"), "no credential in the error: {err}");
    assert!(args("git://example.org/specs.git", false)
        .build(base)
        .is_err());
    assert!(args("git://example.org/specs.git", true)
        .build(base)
        .is_ok());
    let err = args("ext::sh -c touch% /tmp/pwned", true)
        .build(base)
        .unwrap_err()
        .to_string();
    assert!(err.contains("transport helper"), "{err}");

    // An `insteadOf` rewrite to http in the user's configuration does not get past
    // protocol.allow: git refuses the rewritten URL.
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    commit(&repo, &[("clusters/a.yaml", &spec_yaml("alpha", 1))]);
    let cache = tmp.path().join("cache");
    let src = source(&repo, &cache, TrustPolicy::default());
    src.load_once().await.unwrap();
    git(
        &cache,
        &["config", "url.http://127.0.0.1:9/.insteadOf", "file:///"],
    );
    let err = src.load_once().await.unwrap_err().to_string();
    assert!(err.contains("transport 'http' not allowed"), "{err}");
}

#[tokio::test]
async fn flags_need_each_other_and_only_apply_to_git() {
    let base = Path::new("/tmp/unused");
    let git = |f: fn(&mut SourceArgs)| {
        let mut a = SourceArgs {
            git: Some("https://example.org/specs.git".into()),
            ..SourceArgs::default()
        };
        f(&mut a);
        a.build(base).map(|_| ()).map_err(|e| e.to_string())
    };
    let err = git(|a| a.verify_commits = true).unwrap_err();
    assert!(err.contains("--allowed-signers"), "{err}");
    let err = git(|a| a.allowed_signers = Some("/etc/hostname".into())).unwrap_err();
    assert!(err.contains("--verify-commits"), "{err}");
    let err = git(|a| {
        a.verify_commits = true;
        a.gpg_keyring = Some("/no/such/keys".into());
    })
    .unwrap_err();
    assert!(err.contains("/no/such/keys"), "{err}");
    let dir = SourceArgs {
        specs: Some("/tmp".into()),
        allow_rollback: true,
        ..SourceArgs::default()
    };
    assert!(dir
        .build(base)
        .unwrap_err()
        .to_string()
        .contains("only apply to --git"));
}
