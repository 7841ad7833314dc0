//! Sources of desired state: a watched directory or a Git repository.
//!
//! Owns: producing snapshots (revision + valid clusters + per-file errors), watching for
//! change, and keeping the last good revision when a fetch fails.
//!
//! Must not: decide anything about clusters whose file failed to parse (they are left
//! alone, never pruned).
//!
//! A [`Snapshot`] is published on a `tokio::sync::watch` channel as a [`SourceState`]; the
//! controller reconciles against the newest one. A cluster whose file turns invalid is
//! *held* ([`Snapshot::held`]): it is neither in [`Snapshot::clusters`] nor absent — the
//! controller leaves it exactly as it is until the file parses again.

mod args;
mod dir;
mod git;
mod load;
mod trust;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::api::{FlowerCluster, Position};

pub use args::{default_cache_base, Source, SourceArgs, DEFAULT_INTERVAL};
pub use dir::DirSource;
pub use git::{redact_url, GitError, GitSource};
pub use load::{FileLoad, ALLOW_DELETE_FILE};
pub use trust::{
    SigningKeys, SourceChecks, SourceCondition, TrustPolicy, FAST_FORWARD, SOURCE_VERIFIED,
};

/// One valid cluster and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourcedCluster {
    /// The parsed, validated spec.
    pub cluster: FlowerCluster,
    /// File it was read from, relative to the source root.
    pub file: PathBuf,
    /// Digest of the spec (changes whenever the desired state does).
    pub spec_hash: String,
}

/// One error of a file that failed to load (a broken file has one per problem, as
/// `validate` prints them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileError {
    /// File, relative to the source root.
    pub file: PathBuf,
    /// Line and column, where the parser can tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
    /// What is wrong, starting with the field path when there is one.
    pub message: String,
}

impl FileError {
    /// A file-level error (no position).
    pub fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            position: None,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FileError {
    /// `file:line:col: path: message`, like `validate`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(p) = self.position {
            write!(f, ":{}:{}", p.line, p.column)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Desired state at one revision.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Git commit sha, or `sha256:…` digest of a directory's spec files.
    pub revision: String,
    /// Valid clusters by name.
    pub clusters: BTreeMap<String, SourcedCluster>,
    /// Clusters whose file is broken, by name → the broken file. The controller must leave
    /// them alone: neither update nor prune.
    pub held: BTreeMap<String, PathBuf>,
    /// Per-file errors.
    pub errors: Vec<FileError>,
    /// The same revision was read by two consecutive scans (or fetches). `run` deletes
    /// nothing from an unconfirmed snapshot: a momentary state of the source (a share
    /// mounted late, a checkout half-written) must be seen twice before it destroys.
    pub confirmed: bool,
    /// The names in the allow-delete marker at the spec root, when there is one
    /// ([`crate::plan::prune`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_delete: Option<BTreeSet<String>>,
}

impl Snapshot {
    /// Every name this snapshot speaks for (valid or held).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.clusters
            .keys()
            .chain(self.held.keys())
            .map(String::as_str)
    }
}

/// What a source last published.
#[derive(Debug, Clone, Default)]
pub struct SourceState {
    /// The last good snapshot (`None` until the first complete load).
    pub snapshot: Option<Arc<Snapshot>>,
    /// The last fetch/scan error, cleared by the next success. While set, `snapshot`
    /// is the last good revision.
    pub error: Option<String>,
    /// Number of states published so far (1 after the first).
    pub generation: u64,
    /// Checks of the newest fetched revision (Git with `--verify-commits` or rollback
    /// detection); a refused revision is named here and is not in `snapshot`.
    pub checks: SourceChecks,
}

/// Turns per-file loads into snapshots, remembering which names each file defined in its
/// last good load, so a file that turns invalid holds its clusters instead of dropping them.
///
/// # Guarantees
/// - A name defined by a file's last good load, or still readable from the broken file,
///   is in [`Snapshot::held`] while that file fails — never silently absent.
/// - A name valid in some file is never held (moving a cluster between files works).
///
/// - [`Snapshot::confirmed`] is set when the previous assembly had the same revision.
///
/// # Caveats
/// - Deleting a broken file releases its names: deletion is an explicit user act.
/// - Memory of last good loads is per process: after a restart, only names readable from
///   the broken file are held (the loader reads `metadata.name` leniently for this). That
///   is why any file error also stops all pruning ([`crate::plan::DesiredState::complete`]).
#[derive(Debug, Default)]
pub struct Assembler {
    last_good: HashMap<PathBuf, BTreeSet<String>>,
    last_revision: Option<String>,
}

impl Assembler {
    /// Build the snapshot for `revision` from the loads of every spec file present.
    pub fn assemble(&mut self, revision: String, loads: Vec<FileLoad>) -> Snapshot {
        let confirmed = self.last_revision.as_ref() == Some(&revision);
        self.last_revision = Some(revision.clone());
        let present: BTreeSet<&PathBuf> = loads.iter().map(FileLoad::file).collect();
        self.last_good.retain(|f, _| present.contains(f));
        let mut clusters = BTreeMap::new();
        let mut held = BTreeMap::new();
        let mut errors = Vec::new();
        for load in loads {
            match load {
                FileLoad::Ok { file, clusters: cs } => {
                    let names = cs.iter().map(|c| c.metadata.name.clone()).collect();
                    self.last_good.insert(file.clone(), names);
                    for cluster in cs {
                        let spec_hash = crate::api::spec_hash(&cluster);
                        clusters.insert(
                            cluster.metadata.name.clone(),
                            SourcedCluster {
                                cluster,
                                file: file.clone(),
                                spec_hash,
                            },
                        );
                    }
                }
                FileLoad::Err {
                    file,
                    errors: file_errors,
                    readable_names,
                } => {
                    let remembered = self.last_good.get(&file).into_iter().flatten();
                    for name in remembered.chain(readable_names.iter()) {
                        held.insert(name.clone(), file.clone());
                    }
                    errors.extend(file_errors);
                }
            }
        }
        held.retain(|name, _| !clusters.contains_key(name));
        Snapshot {
            revision,
            clusters,
            held,
            errors,
            confirmed,
            allow_delete: None,
        }
    }
}

/// Relative display path of `file` under `root`.
fn relative(root: &Path, file: &Path) -> PathBuf {
    file.strip_prefix(root).unwrap_or(file).to_path_buf()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid spec for `name` with `count` SuperNodes.
    pub(crate) fn spec_yaml_for(name: &str, count: u32) -> String {
        load::tests::spec_yaml(name, count)
    }

    /// The next published state, failing after 20 s.
    pub(crate) async fn next_state(
        rx: &mut tokio::sync::watch::Receiver<SourceState>,
    ) -> SourceState {
        tokio::time::timeout(std::time::Duration::from_secs(20), rx.changed())
            .await
            .expect("a new state within 20 s")
            .unwrap();
        rx.borrow_and_update().clone()
    }

    /// The next published state satisfying `pred`, failing after 20 s.
    pub(crate) async fn next_state_where(
        rx: &mut tokio::sync::watch::Receiver<SourceState>,
        pred: impl Fn(&SourceState) -> bool,
    ) -> SourceState {
        loop {
            let s = next_state(rx).await;
            if pred(&s) {
                return s;
            }
        }
    }

    fn cluster(name: &str) -> FlowerCluster {
        serde_norway::from_str(&load::tests::spec_yaml(name, 2)).unwrap()
    }

    fn ok(file: &str, names: &[&str]) -> FileLoad {
        FileLoad::Ok {
            file: file.into(),
            clusters: names.iter().map(|n| cluster(n)).collect(),
        }
    }

    fn broken(file: &str, readable: &[&str]) -> FileLoad {
        FileLoad::Err {
            file: file.into(),
            errors: vec![FileError::file(file, "bad")],
            readable_names: readable.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_file_turning_invalid_holds_the_names_of_its_last_good_load() {
        let mut asm = Assembler::default();
        let s1 = asm.assemble("r1".into(), vec![ok("a.yaml", &["alpha", "beta"])]);
        assert_eq!(s1.clusters.len(), 2);
        // Now broken so badly that no name is readable: both stay held.
        let s2 = asm.assemble("r2".into(), vec![broken("a.yaml", &[])]);
        assert!(s2.clusters.is_empty());
        assert_eq!(
            s2.held.keys().collect::<Vec<_>>(),
            vec!["alpha", "beta"],
            "names from the last good load are held"
        );
        assert_eq!(s2.errors[0].file, PathBuf::from("a.yaml"));
        // Still broken on the next scan: still held (the last good load is remembered).
        let s3 = asm.assemble("r3".into(), vec![broken("a.yaml", &["gamma"])]);
        assert_eq!(s3.held.len(), 3);
        // Fixed: back to valid, nothing held.
        let s4 = asm.assemble("r4".into(), vec![ok("a.yaml", &["alpha"])]);
        assert!(s4.held.is_empty());
        assert_eq!(s4.clusters.keys().collect::<Vec<_>>(), vec!["alpha"]);
    }

    #[test]
    fn a_revision_read_twice_in_a_row_is_confirmed() {
        let mut asm = Assembler::default();
        assert!(
            !asm.assemble("r1".into(), vec![ok("a.yaml", &["alpha"])])
                .confirmed
        );
        assert!(
            asm.assemble("r1".into(), vec![ok("a.yaml", &["alpha"])])
                .confirmed
        );
        assert!(
            !asm.assemble("r2".into(), vec![]).confirmed,
            "a new revision"
        );
        assert!(asm.assemble("r2".into(), vec![]).confirmed);
    }

    #[test]
    fn a_cluster_moved_to_a_valid_file_is_not_held_and_deleted_files_release_names() {
        let mut asm = Assembler::default();
        asm.assemble("r1".into(), vec![ok("a.yaml", &["alpha"])]);
        let s = asm.assemble(
            "r2".into(),
            vec![broken("a.yaml", &[]), ok("b.yaml", &["alpha"])],
        );
        assert!(s.held.is_empty());
        assert!(s.clusters.contains_key("alpha"));
        let s = asm.assemble("r3".into(), vec![broken("c.yaml", &["zeta"])]);
        assert_eq!(s.held.keys().collect::<Vec<_>>(), vec!["zeta"]);
        assert!(s.clusters.is_empty(), "a.yaml and b.yaml were deleted");
    }
}
