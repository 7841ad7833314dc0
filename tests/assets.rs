//! Checks of the non-Rust assets: Packer templates and shell scripts.
//!
//! The tools come from Debian (`packer`, `shellcheck`); e2e/test-all.sh installs them. A
//! missing tool is a failure, not a skip, so CI can never pass without running the check.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(tool: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{tool}` ({e}); run e2e/test-all.sh to install it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "`{tool} {}` failed:\n{text}",
        args.join(" ")
    );
    text
}

fn files_with_suffix(dir: &Path, suffix: &str, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_with_suffix(&path, suffix, found);
        } else if path.to_string_lossy().ends_with(suffix) {
            found.push(path);
        }
    }
}

#[test]
fn packer_templates_pass_syntax_validation() {
    let mut templates = Vec::new();
    files_with_suffix(&repo().join("packer"), ".pkr.hcl", &mut templates);
    assert!(
        !templates.is_empty(),
        "no Packer template found under packer/"
    );
    for t in templates {
        let out = run(
            "packer",
            &["validate", "-syntax-only", t.to_str().unwrap()],
            &repo().join("packer"),
        );
        assert!(out.contains("Syntax-only check passed"), "{out}");
    }
}

#[test]
fn shell_scripts_are_shellcheck_clean() {
    let mut scripts = Vec::new();
    for dir in ["packer", "appliance", "e2e"] {
        files_with_suffix(&repo().join(dir), ".sh", &mut scripts);
    }
    scripts.push(repo().join(".ci/run"));
    scripts.retain(|p| !p.components().any(|c| c.as_os_str() == "target"));
    assert!(
        scripts.len() >= 3,
        "expected the project's scripts, found {scripts:?}"
    );
    let mut args = vec!["--severity=style".to_string()];
    args.extend(scripts.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("shellcheck", &args, &repo());
}
