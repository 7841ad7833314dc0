//! Reading spec files under a root into per-file loads.
//!
//! Parsing and validation of one file belong to [`crate::api`]; this file only walks the
//! tree, digests it into a revision and keeps going past broken files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{relative, FileError};
use crate::api::FlowerCluster;
pub use crate::plan::prune::ALLOW_DELETE_FILE;

/// The result of loading one spec file.
#[derive(Debug, Clone, PartialEq)]
pub enum FileLoad {
    /// Every document parsed and validated.
    Ok {
        /// File, relative to the source root.
        file: PathBuf,
        /// Its clusters.
        clusters: Vec<FlowerCluster>,
    },
    /// The file is broken; its clusters are held.
    Err {
        /// File, relative to the source root.
        file: PathBuf,
        /// Everything wrong with it, in the loader's order.
        errors: Vec<FileError>,
        /// `metadata.name` values still readable from the broken text.
        readable_names: Vec<String>,
    },
}

impl FileLoad {
    /// The file this load is about.
    pub fn file(&self) -> &PathBuf {
        match self {
            FileLoad::Ok { file, .. } | FileLoad::Err { file, .. } => file,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every `*.yaml` / `*.yml` under `root` (recursive, hidden entries and symlinks skipped:
/// a link in a Git checkout may point anywhere on the host), sorted.
fn spec_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_symlink() {
                continue;
            }
            if kind.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Load every spec file under `root` (a directory, or a single file) with
/// [`crate::api::load_paths`]. Returns the digest revision of the bytes read and one
/// [`FileLoad`] per file, plus the names of the allow-delete marker
/// ([`ALLOW_DELETE_FILE`]) when `root` holds one. Only an unreadable `root` is an error: a
/// broken file is a [`FileLoad::Err`], and *all* its clusters are held (valid documents
/// next to a broken one included: the file as a whole is not trustworthy until fixed).
/// An unreadable marker is a [`FileLoad::Err`] too (an error in the snapshot: nothing is
/// pruned).
pub fn load_tree(root: &Path) -> Result<Tree, String> {
    let files = if root.is_file() {
        vec![root.to_path_buf()]
    } else {
        spec_files(root).map_err(|e| format!("{}: {e}", root.display()))?
    };
    let base = if root.is_file() {
        root.parent().unwrap_or(root)
    } else {
        root
    };
    let mut digest = Sha256::new();
    let marker = root.join(ALLOW_DELETE_FILE);
    let marker = (root.is_dir() && marker.is_file()).then(|| read_marker(&marker));
    if let Some(Ok(names)) = &marker {
        for n in names {
            digest.update(format!("{ALLOW_DELETE_FILE}:{n}\0").as_bytes());
        }
    }
    for path in &files {
        // A file that vanished after listing simply is not part of the revision; one over
        // the size cap (refused by the loader) counts by its length, never read whole.
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        let bytes = if len > crate::api::load::MAX_FILE_BYTES {
            Ok(format!("too large: {len}").into_bytes())
        } else {
            std::fs::read(path)
        };
        if let Ok(bytes) = bytes {
            digest.update(relative(base, path).to_string_lossy().as_bytes());
            digest.update([0]);
            digest.update(&bytes);
            digest.update([0]);
        }
    }
    let report = crate::api::load_paths(&[root.to_path_buf()]);
    #[derive(Default)]
    struct Acc {
        clusters: Vec<FlowerCluster>,
        errors: Vec<FileError>,
        names: BTreeSet<String>,
    }
    let mut by_file: BTreeMap<PathBuf, Acc> = BTreeMap::new();
    for l in report.clusters {
        let acc = by_file.entry(relative(base, &l.source.file)).or_default();
        acc.names.insert(l.cluster.metadata.name.clone());
        acc.clusters.push(l.cluster);
    }
    for e in report.errors {
        let file = relative(base, &e.file);
        let acc = by_file.entry(file.clone()).or_default();
        acc.names.extend(e.cluster.clone());
        acc.errors.push(FileError {
            file,
            position: e.position,
            message: e.what(),
        });
    }
    for f in report.failed_files {
        let acc = by_file.entry(relative(base, &f.file)).or_default();
        acc.names.extend(f.names);
    }
    let mut loads: Vec<FileLoad> = by_file
        .into_iter()
        .map(|(file, acc)| {
            if acc.errors.is_empty() {
                FileLoad::Ok {
                    file,
                    clusters: acc.clusters,
                }
            } else {
                FileLoad::Err {
                    file,
                    errors: acc.errors,
                    readable_names: acc.names.into_iter().collect(),
                }
            }
        })
        .collect();
    let allow_delete = match marker {
        None => None,
        Some(Ok(names)) => Some(names),
        Some(Err(message)) => {
            loads.push(FileLoad::Err {
                file: PathBuf::from(ALLOW_DELETE_FILE),
                errors: vec![FileError::file(ALLOW_DELETE_FILE, message)],
                readable_names: Vec::new(),
            });
            None
        }
    };
    Ok(Tree {
        revision: format!("sha256:{}", &hex(&digest.finalize())[..16]),
        loads,
        allow_delete,
    })
}

/// What [`load_tree`] read.
#[derive(Debug, Clone, PartialEq)]
pub struct Tree {
    /// Digest of the spec files (and the marker's names).
    pub revision: String,
    /// One load per spec file.
    pub loads: Vec<FileLoad>,
    /// The allow-delete marker's cluster names, when there is a readable marker.
    pub allow_delete: Option<BTreeSet<String>>,
}

/// Largest allow-delete marker read.
const MAX_MARKER_BYTES: u64 = 64 * 1024;

/// The cluster names of an allow-delete marker: one per line, `#` comments, blank lines
/// ignored. Refused (never partly used): non-UTF-8, too large, or a line that is not a
/// cluster name — the error names the line.
fn read_marker(path: &Path) -> Result<BTreeSet<String>, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.file_type().is_symlink() || meta.len() > MAX_MARKER_BYTES {
        return Err(format!(
            "must be a regular file of at most {} KiB",
            MAX_MARKER_BYTES / 1024
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let mut names = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or_default().trim();
        if name.is_empty() {
            continue;
        }
        if !crate::api::is_cluster_name(name) {
            return Err(format!(
                "line {}: not a cluster name (one DNS-1123 label per line)",
                i + 1
            ));
        }
        names.insert(name.to_string());
    }
    Ok(names)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid spec for `name` with `count` SuperNodes.
    pub(crate) fn spec_yaml(name: &str, count: u32) -> String {
        format!(
            "apiVersion: flower.opennebula.io/v1alpha1\nkind: FlowerCluster\nmetadata:\n  name: {name}\nspec:\n  opennebula:\n    templates: {{superlink: flower-superlink, supernode: flower-supernode}}\n    network: private\n  supernodes:\n    count: {count}\n"
        )
    }

    #[test]
    fn broken_files_hold_every_readable_name_and_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let bad_field = format!("{}  bogus: 1\n", spec_yaml("alpha", 2));
        let two = format!("{}---\n{bad_field}", spec_yaml("beta", 1));
        std::fs::write(dir.path().join("two.yaml"), two).unwrap();
        std::fs::write(
            dir.path().join("yaml.yaml"),
            "metadata:\n  name: gamma\nspec: [unclosed\n",
        )
        .unwrap();
        let loads = load_tree(dir.path()).unwrap().loads;
        assert_eq!(loads.len(), 2);
        let FileLoad::Err {
            file,
            errors,
            readable_names,
        } = &loads[0]
        else {
            panic!("two.yaml is broken: {loads:?}")
        };
        assert_eq!(file, &PathBuf::from("two.yaml"));
        assert!(errors[0].message.contains("bogus"), "{errors:?}");
        assert_eq!(errors[0].file, PathBuf::from("two.yaml"));
        assert_eq!(
            readable_names,
            &vec!["alpha".to_string(), "beta".to_string()]
        );
        assert!(matches!(&loads[1], FileLoad::Err { .. }));
    }

    #[test]
    fn symlinks_are_skipped_and_the_allow_delete_marker_is_read_strictly() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("x.yaml"), spec_yaml("outside", 1)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), spec_yaml("alpha", 2)).unwrap();
        std::os::unix::fs::symlink(outside.path().join("x.yaml"), dir.path().join("x.yaml"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linked")).unwrap();
        let tree = load_tree(dir.path()).unwrap();
        let files: Vec<&PathBuf> = tree.loads.iter().map(FileLoad::file).collect();
        assert_eq!(
            files,
            vec![&PathBuf::from("a.yaml")],
            "links are not followed"
        );
        assert_eq!(tree.allow_delete, None);

        let marker = dir.path().join(ALLOW_DELETE_FILE);
        std::fs::write(&marker, "# pilots\nbeta  # gone\n\ngamma\n").unwrap();
        let with = load_tree(dir.path()).unwrap();
        let names: Vec<&str> = with
            .allow_delete
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        assert_eq!(names, ["beta", "gamma"]);
        assert_ne!(
            with.revision, tree.revision,
            "the marker is part of the revision"
        );
        std::fs::write(&marker, "beta\nrm -rf /\n").unwrap();
        let bad = load_tree(dir.path()).unwrap();
        assert_eq!(bad.allow_delete, None, "never partly used");
        let err = bad
            .loads
            .iter()
            .find_map(|l| match l {
                FileLoad::Err { file, errors, .. } if file == Path::new(ALLOW_DELETE_FILE) => {
                    Some(errors[0].to_string())
                }
                _ => None,
            })
            .expect("marker error");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn the_tree_digest_changes_with_content_and_files_are_relative() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.yaml"), spec_yaml("alpha", 2)).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let Tree {
            revision: r1,
            loads,
            ..
        } = load_tree(dir.path()).unwrap();
        assert_eq!(loads.len(), 1);
        assert_eq!(loads[0].file(), &PathBuf::from("sub/a.yaml"));
        std::fs::write(dir.path().join("sub/a.yaml"), spec_yaml("alpha", 3)).unwrap();
        let r2 = load_tree(dir.path()).unwrap().revision;
        assert_ne!(r1, r2);
        assert!(r1.starts_with("sha256:"));
    }
}
