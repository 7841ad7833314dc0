//! Command-line selection of a source, shared by `plan`, `apply` and `run`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::git::cache_dir_for;
use super::{DirSource, GitSource, SigningKeys, Snapshot, SourceState, TrustPolicy};
use crate::api::HumanDuration;

/// Where desired state comes from: `--specs DIR` or `--git URL [--branch B] [--path P]`.
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SourceArgs {
    /// Directory (recursive `*.yaml`/`*.yml`) or single file of FlowerCluster specs.
    #[arg(
        long,
        value_name = "DIR",
        env = "FLOWER_RECONCILE_SPECS",
        conflicts_with = "git"
    )]
    pub specs: Option<PathBuf>,
    /// Git repository holding the specs (https, ssh or file URL), fetched with the git CLI.
    #[arg(long, value_name = "URL", env = "FLOWER_RECONCILE_GIT")]
    pub git: Option<String>,
    /// Branch to follow (default: the remote's HEAD).
    #[arg(long, value_name = "BRANCH", env = "FLOWER_RECONCILE_GIT_BRANCH")]
    pub branch: Option<String>,
    /// Directory inside the repository holding the specs.
    #[arg(long = "path", value_name = "PATH", env = "FLOWER_RECONCILE_GIT_PATH")]
    #[serde(rename = "path")]
    pub git_path: Option<PathBuf>,
    /// How often to fetch the repository, or re-scan the directory (default 30s).
    #[arg(long, value_name = "DURATION", env = "FLOWER_RECONCILE_INTERVAL")]
    pub interval: Option<HumanDuration>,
    /// Where to clone the repository (default: a per-URL directory under the state or
    /// cache directory).
    #[arg(long, value_name = "DIR", env = "FLOWER_RECONCILE_GIT_CACHE")]
    pub git_cache: Option<PathBuf>,
    /// Use a fetched commit only when it is signed by one of the keys of
    /// `--allowed-signers` or `--gpg-keyring`; otherwise it is refused and reported, and the
    /// last good revision stays applied.
    #[arg(long)]
    #[serde(default)]
    pub verify_commits: bool,
    /// SSH keys allowed to sign, in git's `gpg.ssh.allowedSignersFile` format
    /// (`PRINCIPAL KEYTYPE KEY` per line).
    #[arg(long, value_name = "FILE", env = "FLOWER_RECONCILE_ALLOWED_SIGNERS")]
    pub allowed_signers: Option<PathBuf>,
    /// OpenPGP public keys allowed to sign: a file (armored or binary) or a directory of
    /// such files. Only these count, never the user's own keyring.
    #[arg(long, value_name = "FILE|DIR", env = "FLOWER_RECONCILE_GPG_KEYRING")]
    pub gpg_keyring: Option<PathBuf>,
    /// Accept plaintext `http://` and `git://` remotes (refused otherwise; warned on
    /// every fetch).
    #[arg(long)]
    #[serde(default)]
    pub allow_insecure_transport: bool,
    /// Apply a fetched HEAD that does not descend from the last accepted revision (a
    /// force-push rollback or rewrite). Without it, such a HEAD is reported and held.
    #[arg(long)]
    #[serde(default)]
    pub allow_rollback: bool,
}

/// A configured source.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory.
    Dir(DirSource),
    /// A Git repository.
    Git(GitSource),
}

/// Default fetch/re-scan interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

impl SourceArgs {
    /// Fill every unset field from `other` (command line over config file).
    pub fn or(self, other: SourceArgs) -> SourceArgs {
        SourceArgs {
            specs: self.specs.or(other.specs),
            git: self.git.or(other.git),
            branch: self.branch.or(other.branch),
            git_path: self.git_path.or(other.git_path),
            interval: self.interval.or(other.interval),
            git_cache: self.git_cache.or(other.git_cache),
            verify_commits: self.verify_commits || other.verify_commits,
            allowed_signers: self.allowed_signers.or(other.allowed_signers),
            gpg_keyring: self.gpg_keyring.or(other.gpg_keyring),
            allow_insecure_transport: self.allow_insecure_transport
                || other.allow_insecure_transport,
            allow_rollback: self.allow_rollback || other.allow_rollback,
        }
    }

    /// The source these arguments select. `cache_base` holds Git clones when
    /// `--git-cache` is not given.
    pub fn build(&self, cache_base: &std::path::Path) -> anyhow::Result<Source> {
        let interval = self.interval.map_or(DEFAULT_INTERVAL, HumanDuration::get);
        match (&self.specs, &self.git) {
            (Some(_), Some(_)) => anyhow::bail!("give either --specs or --git, not both"),
            (None, None) => anyhow::bail!("no source: give --specs DIR or --git URL"),
            (Some(dir), None) => {
                if self.branch.is_some() || self.git_path.is_some() || self.trust_flags() {
                    anyhow::bail!(
                        "--branch, --path, --verify-commits, --allowed-signers, \
                         --gpg-keyring, --allow-insecure-transport and --allow-rollback \
                         only apply to --git"
                    );
                }
                Ok(Source::Dir(DirSource {
                    rescan: interval,
                    ..DirSource::new(dir)
                }))
            }
            (None, Some(url)) => {
                let git = GitSource {
                    url: url.clone(),
                    branch: self.branch.clone(),
                    path: self.git_path.clone(),
                    interval,
                    cache_dir: self
                        .git_cache
                        .clone()
                        .unwrap_or_else(|| cache_dir_for(cache_base, url, self.branch.as_deref())),
                    timeout: Duration::from_secs(60),
                    trust: self.trust()?,
                };
                git.validate()?;
                Ok(Source::Git(git))
            }
        }
    }

    fn trust_flags(&self) -> bool {
        self.verify_commits
            || self.allowed_signers.is_some()
            || self.gpg_keyring.is_some()
            || self.allow_insecure_transport
            || self.allow_rollback
    }

    /// The trust policy of these flags (rollback memory is `run`'s:
    /// [`Source::remember_accepted_in`]).
    fn trust(&self) -> anyhow::Result<TrustPolicy> {
        let keys = self.allowed_signers.is_some() || self.gpg_keyring.is_some();
        if self.verify_commits && !keys {
            anyhow::bail!(
                "--verify-commits needs --allowed-signers FILE or --gpg-keyring FILE|DIR"
            );
        }
        if keys && !self.verify_commits {
            anyhow::bail!(
                "--allowed-signers and --gpg-keyring take effect with --verify-commits: add it"
            );
        }
        for (flag, path) in [
            ("--allowed-signers", &self.allowed_signers),
            ("--gpg-keyring", &self.gpg_keyring),
        ] {
            if let Some(p) = path.as_ref().filter(|p| !p.exists()) {
                anyhow::bail!("{flag} {}: no such file or directory", p.display());
            }
        }
        Ok(TrustPolicy {
            verify: self.verify_commits.then(|| SigningKeys {
                allowed_signers: self.allowed_signers.clone(),
                gpg_keys: self.gpg_keyring.clone(),
            }),
            allow_insecure_transport: self.allow_insecure_transport,
            allow_rollback: self.allow_rollback,
            accepted_file: None,
        })
    }
}

impl Source {
    /// Remember the last accepted Git revision under `base` (a file beside the clone's
    /// default directory), so that a rollback is detected across restarts. `run` does this;
    /// a one-shot command has no history to continue.
    pub fn remember_accepted_in(self, base: &std::path::Path) -> Source {
        match self {
            Source::Git(mut g) => {
                let dir = cache_dir_for(base, &g.url, g.branch.as_deref());
                g.trust.accepted_file = Some(dir.with_extension("accepted"));
                Source::Git(g)
            }
            dir => dir,
        }
    }

    /// Load once (for `plan` and `apply`).
    pub async fn load_once(&self) -> anyhow::Result<Snapshot> {
        match self {
            Source::Dir(d) => d.load_once().await,
            Source::Git(g) => g.load_once().await,
        }
    }

    /// Watch or poll until `shutdown`.
    pub async fn run(self, tx: watch::Sender<SourceState>, shutdown: CancellationToken) {
        match self {
            Source::Dir(d) => d.run(tx, shutdown).await,
            Source::Git(g) => g.run(tx, shutdown).await,
        }
    }

    /// A one-line description without credentials.
    pub fn describe(&self) -> String {
        match self {
            Source::Dir(d) => format!("dir:{}", d.root.display()),
            Source::Git(g) => format!(
                "git:{}{}",
                super::redact_url(&g.url),
                g.branch
                    .as_ref()
                    .map(|b| format!("@{b}"))
                    .unwrap_or_default()
            ),
        }
    }
}

/// The default base for Git clones of one-shot commands: `$XDG_CACHE_HOME` or
/// `~/.cache`, then `flower-reconcile/git`.
pub fn default_cache_base() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("flower-reconcile")
        .join("git")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        source: SourceArgs,
    }

    #[test]
    fn specs_and_git_are_exclusive_and_git_flags_parse() {
        assert!(Cli::try_parse_from(["x", "--specs", "d", "--git", "file:///r"]).is_err());
        let cli = Cli::try_parse_from([
            "x",
            "--git",
            "file:///r",
            "--branch",
            "prod",
            "--path",
            "clusters",
            "--interval",
            "5s",
        ])
        .unwrap();
        let Source::Git(g) = cli.source.build(std::path::Path::new("/cache")).unwrap() else {
            panic!("git source expected")
        };
        assert_eq!(g.branch.as_deref(), Some("prod"));
        assert_eq!(g.interval, Duration::from_secs(5));
        assert!(g.cache_dir.starts_with("/cache"));
        let none = SourceArgs::default().build(std::path::Path::new("/c"));
        assert!(none.unwrap_err().to_string().contains("--specs"));
    }
}
