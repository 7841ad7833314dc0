//! Checks of the non-Rust assets: Packer templates, shell scripts and the images' systemd
//! units; and that each check fails on a broken temporary copy (a check that cannot fail
//! proves nothing).
//!
//! The tools come from Debian (`packer`, `shellcheck`, `systemd-analyze`); e2e/test-all.sh
//! installs them. A
//! missing tool is a failure, not a skip, so CI can never pass without running the check.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(tool: &str, args: &[&str], dir: &Path) -> String {
    let out = common::run_ok(Command::new(tool).args(args).current_dir(dir));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
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
    // versions.pkr.hcl holds `required_plugins` for Packer >= 1.7, which 1.6.6 rejects.
    let versions = repo().join("packer/versions.pkr.hcl");
    assert!(std::fs::read_to_string(&versions)
        .unwrap()
        .contains("source  = \"github.com/hashicorp/qemu\""));
    templates.retain(|t| *t != versions && !t.components().any(|c| c.as_os_str() == "build"));
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
    // Build output (packer/build holds whole root filesystems) is not the project's.
    scripts.retain(|p| {
        !p.components()
            .any(|c| c.as_os_str() == "target" || c.as_os_str() == "build")
    });
    assert!(
        scripts.len() >= 3,
        "expected the project's scripts, found {scripts:?}"
    );
    let mut args = vec!["--severity=style".to_string()];
    args.extend(scripts.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("shellcheck", &args, &repo());
}

fn fails(tool: &str, args: &[&str], env: &[(&str, &Path)]) -> String {
    let out = Command::new(tool)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{tool}` ({e})"));
    assert!(
        !out.status.success(),
        "`{tool} {}` passed on a broken copy",
        args.join(" ")
    );
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

#[test]
fn image_units_verify() {
    let out = common::run_ok(
        Command::new("bash")
            .arg("packer/scripts/check-units.sh")
            .env("AGENT", env!("CARGO_BIN_EXE_flower-agent"))
            .current_dir(repo()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for unit in [
        "flower-agent.service",
        "flower-agent-context.service",
        "flower-ssh-hostkeys.service",
    ] {
        assert!(text.contains(unit), "{unit} not verified: {text}");
    }
}

#[test]
fn broken_copies_of_recipe_template_and_units_fail_the_checks() {
    let tmp = tempfile::tempdir().unwrap();
    // The provisioning recipe with a shell error.
    let script = tmp.path().join("provision.sh");
    let text = std::fs::read_to_string(repo().join("packer/scripts/provision.sh")).unwrap();
    std::fs::write(&script, text.replace("fi\n", "\n")).unwrap();
    fails("shellcheck", &[script.to_str().unwrap()], &[]);
    // The template without the closing brace of its build block.
    let tpl = tmp.path().join("flower-appliance.pkr.hcl");
    let text = std::fs::read_to_string(repo().join("packer/flower-appliance.pkr.hcl")).unwrap();
    let cut = text.trim_end().strip_suffix('}').unwrap();
    std::fs::write(&tpl, cut).unwrap();
    fails(
        "packer",
        &["validate", "-syntax-only", tpl.to_str().unwrap()],
        &[],
    );
    // A unit with a misspelt directive and one whose program does not exist.
    for (from, to) in [
        ("ExecStart=", "ExecStrat="),
        ("/usr/bin/ssh-keygen", "/usr/bin/no-such-keygen"),
    ] {
        let files = tmp.path().join(format!("files-{}", to.len()));
        std::fs::create_dir_all(&files).unwrap();
        let unit =
            std::fs::read_to_string(repo().join("packer/files/ssh-hostkeys.service")).unwrap();
        assert!(unit.contains(from));
        std::fs::write(files.join("ssh-hostkeys.service"), unit.replace(from, to)).unwrap();
        let agent = PathBuf::from(env!("CARGO_BIN_EXE_flower-agent"));
        let err = fails(
            "bash",
            &["packer/scripts/check-units.sh"],
            &[("AGENT", &agent), ("FILES", &files)],
        );
        assert!(err.contains("flower-ssh-hostkeys.service"), "{err}");
    }
}
