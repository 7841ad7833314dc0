//! Reading spec files under a root into per-file loads.
//!
//! Parsing and validation of one file belong to [`crate::api`]; this file only walks the
//! tree, digests it into a revision and keeps going past broken files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::relative;
use crate::api::FlowerCluster;

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
        /// What is wrong.
        message: String,
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

/// Every `*.yaml` / `*.yml` under `root` (recursive, hidden entries skipped), sorted.
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
/// [`FileLoad`] per file. Only an unreadable `root` is an error: a broken file is a
/// [`FileLoad::Err`], and *all* its clusters are held (valid documents next to a broken
/// one included: the file as a whole is not trustworthy until fixed).
pub fn load_tree(root: &Path) -> Result<(String, Vec<FileLoad>), String> {
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
    for path in &files {
        // A file that vanished after listing simply is not part of the revision.
        if let Ok(bytes) = std::fs::read(path) {
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
        errors: Vec<String>,
        names: BTreeSet<String>,
    }
    let mut by_file: BTreeMap<PathBuf, Acc> = BTreeMap::new();
    for l in report.clusters {
        let acc = by_file.entry(relative(base, &l.source.file)).or_default();
        acc.names.insert(l.cluster.metadata.name.clone());
        acc.clusters.push(l.cluster);
    }
    for e in report.errors {
        let acc = by_file.entry(relative(base, &e.file)).or_default();
        acc.names.extend(e.cluster.clone());
        acc.errors.push(e.to_string());
    }
    for f in report.failed_files {
        let acc = by_file.entry(relative(base, &f.file)).or_default();
        acc.names.extend(f.names);
    }
    let loads = by_file
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
                    message: acc.errors.join("; "),
                    readable_names: acc.names.into_iter().collect(),
                }
            }
        })
        .collect();
    Ok((format!("sha256:{}", &hex(&digest.finalize())[..16]), loads))
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
        let (_, loads) = load_tree(dir.path()).unwrap();
        assert_eq!(loads.len(), 2);
        let FileLoad::Err {
            file,
            message,
            readable_names,
        } = &loads[0]
        else {
            panic!("two.yaml is broken: {loads:?}")
        };
        assert_eq!(file, &PathBuf::from("two.yaml"));
        assert!(message.contains("bogus"), "{message}");
        assert_eq!(
            readable_names,
            &vec!["alpha".to_string(), "beta".to_string()]
        );
        assert!(matches!(&loads[1], FileLoad::Err { .. }));
    }

    #[test]
    fn the_tree_digest_changes_with_content_and_files_are_relative() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.yaml"), spec_yaml("alpha", 2)).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let (r1, loads) = load_tree(dir.path()).unwrap();
        assert_eq!(loads.len(), 1);
        assert_eq!(loads[0].file(), &PathBuf::from("sub/a.yaml"));
        std::fs::write(dir.path().join("sub/a.yaml"), spec_yaml("alpha", 3)).unwrap();
        let (r2, _) = load_tree(dir.path()).unwrap();
        assert_ne!(r1, r2);
        assert!(r1.starts_with("sha256:"));
    }
}
