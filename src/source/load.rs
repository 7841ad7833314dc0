//! Reading spec files under a root into per-file loads.
//!
//! Parsing and validation of one file belong to [`crate::api`]; this file only walks the
//! tree, digests it into a revision and keeps going past broken files.

use std::path::{Path, PathBuf};

use serde::Deserialize;
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

/// Digest of a cluster's desired state (name and spec), `sha256:` + 16 hex digits.
pub fn spec_hash(cluster: &FlowerCluster) -> String {
    let json = serde_json::to_vec(&(&cluster.metadata.name, &cluster.spec)).unwrap_or_default();
    format!("sha256:{}", &hex(&Sha256::digest(&json))[..16])
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

/// Load every spec file under `root` (a directory, or a single file). Returns the digest
/// revision of the bytes read and one [`FileLoad`] per file. Only an unreadable `root`
/// is an error: a broken file is a [`FileLoad::Err`].
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
    let mut loads = Vec::with_capacity(files.len());
    for path in files {
        let file = relative(base, &path);
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            // Vanished between listing and reading: it is simply not there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                loads.push(FileLoad::Err {
                    file,
                    message: e.to_string(),
                    readable_names: Vec::new(),
                });
                continue;
            }
        };
        digest.update(file.to_string_lossy().as_bytes());
        digest.update([0]);
        digest.update(&text);
        digest.update([0]);
        let text = String::from_utf8_lossy(&text);
        loads.push(match parse_documents(&text) {
            Ok(clusters) => FileLoad::Ok { file, clusters },
            Err(message) => FileLoad::Err {
                file,
                message,
                readable_names: readable_names(&text),
            },
        });
    }
    Ok((format!("sha256:{}", &hex(&digest.finalize())[..16]), loads))
}

/// Parse every document of one file into clusters.
pub(crate) fn parse_documents(text: &str) -> Result<Vec<FlowerCluster>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_norway::Value::deserialize(doc)
            .map_err(|e| format!("document {}: {e}", i + 1))?;
        if value.is_null() {
            continue;
        }
        let cluster: FlowerCluster =
            serde_norway::from_value(value).map_err(|e| format!("document {}: {e}", i + 1))?;
        if cluster.metadata.name.is_empty() {
            return Err(format!("document {}: metadata.name is empty", i + 1));
        }
        out.push(cluster);
    }
    Ok(out)
}

/// `metadata.name` of every document that still parses as YAML, or, when the YAML itself
/// is broken, of every `name:` line directly under a top-level `metadata:` line.
fn readable_names(text: &str) -> Vec<String> {
    let structured: Result<Vec<String>, ()> = serde_norway::Deserializer::from_str(text)
        .map(|doc| {
            let v = serde_norway::Value::deserialize(doc).map_err(|_| ())?;
            Ok(v.get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .map(str::to_string)
                .unwrap_or_default())
        })
        .collect();
    if let Ok(names) = structured {
        return names.into_iter().filter(|n| !n.is_empty()).collect();
    }
    let mut names = Vec::new();
    let mut in_metadata = false;
    for line in text.lines() {
        if !line.starts_with([' ', '\t']) {
            in_metadata = line.trim_end() == "metadata:";
            continue;
        }
        if let Some(rest) = line
            .trim_start()
            .strip_prefix("name:")
            .filter(|_| in_metadata)
        {
            let name = rest.trim().trim_matches(['"', '\'']);
            if !name.is_empty() {
                names.push(name.to_string());
            }
        }
    }
    names
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
    fn names_stay_readable_from_broken_files() {
        let bad_field = format!("{}  bogus: 1\n", spec_yaml("alpha", 2));
        assert!(parse_documents(&bad_field).is_err());
        assert_eq!(readable_names(&bad_field), vec!["alpha"]);
        let bad_yaml = "metadata:\n  name: beta\nspec: [unclosed\n";
        assert_eq!(readable_names(bad_yaml), vec!["beta"]);
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
