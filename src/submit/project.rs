//! The `flwr` project a submission runs: a private copy of the user's app with the
//! federation (SuperLink connection) written where the CLI version looks for it.
//!
//! Owns: the work dir (app copy, CA file, `FLWR_HOME`), the app's declared run-config keys,
//! and the TOML edits — `[tool.flwr.federations.NAME]` in `pyproject.toml` (≤ 1.25) or
//! `[superlink.NAME]` in `$FLWR_HOME/config.toml` (≥ 1.26).
//! Must not: touch the user's app directory, or run `flwr`.
//!
//! Guarantees:
//! - The user's app directory is never modified: `flwr` runs on a copy in a private
//!   temporary work dir (`flwr run` itself writes `.gitignore` and `.credentials` into the
//!   app dir); VCS data, virtualenvs, caches and Flower credentials are not copied
//!   (`app_copy_leaves_out_caches_and_credentials`; `tests/flower_submit.rs` checks the
//!   app dir's digest).
//! - TOML is edited with `toml_edit`, so the user's layout and comments survive
//!   (`pyproject_federation_is_set_and_the_rest_kept`).
//!
//! Caveats: the 1.26+ mechanism follows Flower's documentation; only the 1.25 one is
//! exercised by tests.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::{io_err, FlowerVersion, SubmitError, SubmitTarget};

fn parse_toml(text: &str, what: &Path) -> Result<toml_edit::DocumentMut, SubmitError> {
    text.parse::<toml_edit::DocumentMut>()
        .map_err(|e| SubmitError::App {
            path: what.to_path_buf(),
            reason: format!("invalid TOML: {e}"),
        })
}

/// The run-config keys an app declares in `[tool.flwr.app.config]`, nested tables flattened
/// with dots as Flower does.
pub fn declared_config_keys(pyproject: &str, path: &Path) -> Result<BTreeSet<String>, SubmitError> {
    let doc = parse_toml(pyproject, path)?;
    let mut keys = BTreeSet::new();
    let config = doc
        .get("tool")
        .and_then(|t| t.get("flwr"))
        .and_then(|t| t.get("app"))
        .and_then(|t| t.get("config"));
    if let Some(table) = config.and_then(|c| c.as_table_like()) {
        flatten_keys(table, "", &mut keys);
    }
    Ok(keys)
}

fn flatten_keys(table: &dyn toml_edit::TableLike, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, item) in table.iter() {
        let key = if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        };
        match item.as_table_like() {
            Some(inner) => flatten_keys(inner, &key, out),
            None => {
                out.insert(key);
            }
        }
    }
}

/// How the `flwr` CLI learns about SuperLinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FederationMechanism {
    /// ≤ 1.25: a `[tool.flwr.federations.NAME]` table in the app's `pyproject.toml`.
    PyprojectTable,
    /// ≥ 1.26: `[superlink.NAME]` in `$FLWR_HOME/config.toml`.
    FlwrHomeConfig,
}

impl FederationMechanism {
    /// The mechanism the given CLI version reads.
    pub fn for_cli(version: &FlowerVersion) -> Self {
        if (version.major, version.minor) >= (1, 26) {
            Self::FlwrHomeConfig
        } else {
            Self::PyprojectTable
        }
    }
}

/// One federation (SuperLink connection) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Federation {
    /// Its name (the cluster name).
    pub name: String,
    /// Control API `HOST:PORT`.
    pub address: String,
    /// CA file; `None` writes `insecure = true`.
    pub root_certificates: Option<PathBuf>,
}

impl Federation {
    fn table(&self) -> toml_edit::Table {
        let mut t = toml_edit::Table::new();
        t.insert("address", toml_edit::value(self.address.as_str()));
        match &self.root_certificates {
            Some(ca) => t.insert(
                "root-certificates",
                toml_edit::value(ca.to_string_lossy().as_ref()),
            ),
            None => t.insert("insecure", toml_edit::value(true)),
        };
        t
    }
}

/// The app's `pyproject.toml` with `[tool.flwr.federations.<name>]` set to `fed` (replacing an
/// entry of that name; other federations and the rest of the file are kept).
pub fn with_pyproject_federation(
    pyproject: &str,
    path: &Path,
    fed: &Federation,
) -> Result<String, SubmitError> {
    let mut doc = parse_toml(pyproject, path)?;
    let bad = |what: &str| SubmitError::App {
        path: path.to_path_buf(),
        reason: format!("`{what}` is not a table"),
    };
    let mut table = doc.as_table_mut();
    for name in ["tool", "flwr", "federations"] {
        let entry = table.entry(name).or_insert_with(|| {
            let mut t = toml_edit::Table::new();
            t.set_implicit(true);
            toml_edit::Item::Table(t)
        });
        table = entry.as_table_mut().ok_or_else(|| bad(name))?;
    }
    table.insert(&fed.name, toml_edit::Item::Table(fed.table()));
    Ok(doc.to_string())
}

/// The app's `pyproject.toml` without `[tool.flwr.federations]` (≥ 1.26 would migrate it into
/// the private config and could shadow the entry written there).
pub fn without_pyproject_federations(pyproject: &str, path: &Path) -> Result<String, SubmitError> {
    let mut doc = parse_toml(pyproject, path)?;
    if let Some(flwr) = doc
        .get_mut("tool")
        .and_then(|t| t.get_mut("flwr"))
        .and_then(|t| t.as_table_like_mut())
    {
        flwr.remove("federations");
    }
    Ok(doc.to_string())
}

/// `$FLWR_HOME/config.toml` (≥ 1.26) holding `fed` as the default SuperLink connection.
pub fn flwr_home_config(fed: &Federation) -> String {
    let mut doc = toml_edit::DocumentMut::new();
    let mut superlink = toml_edit::Table::new();
    superlink.insert("default", toml_edit::value(fed.name.as_str()));
    superlink.insert(&fed.name, toml_edit::Item::Table(fed.table()));
    doc.insert("superlink", toml_edit::Item::Table(superlink));
    doc.to_string()
}

/// The private work dir: a copy of the app, the CA file and `FLWR_HOME`.
pub(super) struct WorkDir {
    _dir: tempfile::TempDir,
    pub(super) app: PathBuf,
    pub(super) flwr_home: PathBuf,
}

pub(super) fn prepare_workdir(
    target: &SubmitTarget,
    app_dir: &Path,
    mechanism: FederationMechanism,
) -> Result<(WorkDir, BTreeSet<String>), SubmitError> {
    let pyproject_path = app_dir.join("pyproject.toml");
    if !pyproject_path.is_file() {
        return Err(SubmitError::App {
            path: app_dir.to_path_buf(),
            reason: "no pyproject.toml (not a Flower app directory)".into(),
        });
    }
    let dir = tempfile::Builder::new()
        .prefix("flower-submit-")
        .tempdir()
        .map_err(io_err("creating the work dir"))?;
    let app = dir.path().join("app");
    let flwr_home = dir.path().join("flwr-home");
    copy_app(app_dir, &app)?;
    std::fs::create_dir(&flwr_home).map_err(io_err("creating FLWR_HOME"))?;
    let ca_file = match &target.ca_pem {
        Some(pem) => {
            let p = dir.path().join("superlink-ca.pem");
            std::fs::write(&p, pem).map_err(io_err("writing the CA file"))?;
            Some(p)
        }
        None => None,
    };
    let fed = Federation {
        name: target.cluster.clone(),
        address: target.control_address.clone(),
        root_certificates: ca_file,
    };
    let copied = app.join("pyproject.toml");
    let text = std::fs::read_to_string(&copied).map_err(io_err("reading pyproject.toml"))?;
    let declared = declared_config_keys(&text, &pyproject_path)?;
    let edited = match mechanism {
        FederationMechanism::PyprojectTable => {
            with_pyproject_federation(&text, &pyproject_path, &fed)?
        }
        FederationMechanism::FlwrHomeConfig => {
            std::fs::write(flwr_home.join("config.toml"), flwr_home_config(&fed))
                .map_err(io_err("writing FLWR_HOME/config.toml"))?;
            without_pyproject_federations(&text, &pyproject_path)?
        }
    };
    std::fs::write(&copied, edited).map_err(io_err("writing the copied pyproject.toml"))?;
    Ok((
        WorkDir {
            _dir: dir,
            app,
            flwr_home,
        },
        declared,
    ))
}

/// Copies an app tree, leaving out VCS data, virtualenvs, caches and Flower credentials;
/// directory symlinks are skipped (no loops), file symlinks are copied as files.
fn copy_app(from: &Path, to: &Path) -> Result<(), SubmitError> {
    const SKIP: &[&str] = &[
        ".git",
        ".venv",
        "venv",
        "__pycache__",
        ".flwr",
        ".credentials",
    ];
    std::fs::create_dir_all(to).map_err(io_err(format!("creating {}", to.display())))?;
    let entries = std::fs::read_dir(from).map_err(io_err(format!("reading {}", from.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_err(format!("reading {}", from.display())))?;
        let name = entry.file_name();
        if SKIP.iter().any(|s| OsStr::new(s) == name) {
            continue;
        }
        let src = entry.path();
        let dst = to.join(&name);
        let file_type = entry
            .file_type()
            .map_err(io_err(format!("inspecting {}", src.display())))?;
        if file_type.is_dir() {
            copy_app(&src, &dst)?;
        } else if src.is_file() {
            std::fs::copy(&src, &dst).map_err(io_err(format!("copying {}", src.display())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PYPROJECT: &str = "# my app\n[project]\nname = \"x\" # keep me\n\n\
        [tool.flwr.app]\npublisher = \"me\"\n\n\
        [tool.flwr.federations]\ndefault = \"local\"\n\n\
        [tool.flwr.federations.local]\noptions.num-supernodes = 2\n\n\
        [tool.flwr.federations.demo]\naddress = \"old:1\"\ninsecure = true\n";

    #[test]
    fn pyproject_federation_is_set_and_the_rest_kept() {
        let fed = Federation {
            name: "demo".into(),
            address: "127.0.9.1:9093".into(),
            root_certificates: Some(PathBuf::from("/w/ca.pem")),
        };
        let out = with_pyproject_federation(PYPROJECT, Path::new("p"), &fed).unwrap();
        assert!(
            out.starts_with("# my app\n[project]\nname = \"x\" # keep me\n"),
            "{out}"
        );
        let doc: toml_edit::DocumentMut = out.parse().unwrap();
        let feds = &doc["tool"]["flwr"]["federations"];
        assert_eq!(feds["default"].as_str(), Some("local"));
        assert_eq!(
            feds["local"]["options"]["num-supernodes"].as_integer(),
            Some(2)
        );
        assert_eq!(feds["demo"]["address"].as_str(), Some("127.0.9.1:9093"));
        assert_eq!(
            feds["demo"]["root-certificates"].as_str(),
            Some("/w/ca.pem")
        );
        assert!(feds["demo"].get("insecure").is_none());

        // No federations table yet, insecure target.
        let bare = "[project]\nname = \"x\"\n";
        let fed = Federation {
            root_certificates: None,
            ..fed
        };
        let out = with_pyproject_federation(bare, Path::new("p"), &fed).unwrap();
        assert_eq!(
            out,
            "[project]\nname = \"x\"\n\n[tool.flwr.federations.demo]\naddress = \"127.0.9.1:9093\"\ninsecure = true\n"
        );
        let err = with_pyproject_federation("tool = 1\n", Path::new("p.toml"), &fed)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "app p.toml: `tool` is not a table");
        let err = with_pyproject_federation("[x\n", Path::new("p.toml"), &fed)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("app p.toml: invalid TOML"), "{err}");
    }

    #[test]
    fn flwr_home_config_for_newer_clis() {
        let fed = Federation {
            name: "demo".into(),
            address: "h:9093".into(),
            root_certificates: Some(PathBuf::from("/w/ca.pem")),
        };
        assert_eq!(
            flwr_home_config(&fed),
            "[superlink]\ndefault = \"demo\"\n\n[superlink.demo]\naddress = \"h:9093\"\nroot-certificates = \"/w/ca.pem\"\n"
        );
        let out = without_pyproject_federations(PYPROJECT, Path::new("p")).unwrap();
        assert!(!out.contains("federations"), "{out}");
        assert!(out.contains("publisher = \"me\""));
        assert_eq!(
            FederationMechanism::for_cli(&FlowerVersion::parse("1.25.0").unwrap()),
            FederationMechanism::PyprojectTable
        );
        assert_eq!(
            FederationMechanism::for_cli(&FlowerVersion::parse("1.26.0").unwrap()),
            FederationMechanism::FlwrHomeConfig
        );
        assert_eq!(
            FederationMechanism::for_cli(&FlowerVersion::parse("2.0.0").unwrap()),
            FederationMechanism::FlwrHomeConfig
        );
    }

    #[test]
    fn app_copy_leaves_out_caches_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for d in ["pkg/__pycache__", ".git", ".venv/lib", ".flwr"] {
            std::fs::create_dir_all(src.join(d)).unwrap();
        }
        std::fs::write(src.join("pyproject.toml"), "[project]\n").unwrap();
        std::fs::write(src.join("pkg/m.py"), "x = 1\n").unwrap();
        std::fs::write(src.join("pkg/__pycache__/m.pyc"), "").unwrap();
        std::fs::write(src.join(".credentials"), "secret").unwrap();
        let dst = dir.path().join("dst");
        copy_app(&src, &dst).unwrap();
        assert!(dst.join("pkg/m.py").is_file());
        for gone in ["pkg/__pycache__", ".git", ".venv", ".flwr", ".credentials"] {
            assert!(!dst.join(gone).exists(), "{gone} copied");
        }
    }
}
