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

/// The project's files ending in `suffix` under `dir`. Build output is not the project's and
/// is never entered: packer/build holds whole root filesystems, possibly mid-build with
/// /proc mounted (walking into one slowed these tests to minutes and could keep mmdebstrap
/// from unmounting it).
fn files_with_suffix(dir: &Path, suffix: &str, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if matches!(entry.file_name().to_str(), Some("build" | "target")) {
                continue;
            }
            files_with_suffix(&path, suffix, found);
        } else if path.to_string_lossy().ends_with(suffix) {
            found.push(path);
        }
    }
}

/// The fuzz crate is its own workspace with its own lock file, which nothing else builds
/// until the test command's fuzz build, 20 minutes in: a dependency added to the main crate
/// without refreshing fuzz/Cargo.lock made every fuzz build re-resolve (twice so far).
/// `cargo metadata --locked` fails in a second when the lock file would change. Not
/// `--offline`: on a fresh machine the fuzz crate's own dependencies (libfuzzer-sys) are not
/// in the registry cache yet when this runs, and offline resolution then fails on them.
#[test]
fn the_fuzz_lock_file_is_current() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--format-version", "1"])
        .current_dir(repo().join("fuzz"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "fuzz/Cargo.lock is stale: run `cargo update --workspace` in fuzz/ and commit it\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    templates.retain(|t| *t != versions);
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

/// What the fake pip downloads (with echo's newline).
const FAKE_WHEEL: &str = "fake wheel\n";

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A copy of what build-image.sh reads, with fakes for the heavy tools (mmdebstrap, the
/// chroot step, the disk tools, pip) that log each call: the builder's own logic (caching
/// by inputs, locks, the shared base) runs for real in milliseconds.
struct FakeBuild {
    dir: tempfile::TempDir,
}

impl FakeBuild {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in [
            "packer/scripts/build-image.sh",
            "packer/scripts/provision.sh",
            "packer/scripts/finalize.sh",
            "packer/files/ssh-hostkeys.service",
            "appliance/superlink/appliance.sh",
            "appliance/supernode/appliance.sh",
            "e2e/requirements.lock",
        ] {
            let to = root.join("repo").join(f);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(repo().join(f), to).unwrap();
        }
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        // One line per call (the chroot step's arguments hold a multi-line script).
        let log = r#"echo "$(basename "$0") $(tr '\n' ' ' <<<"$*")" >>"$FAKE_LOG""#;
        let fakes = [
            // The base: a root with a kernel and an initrd; waits while $FAKE_HOLD exists.
            (
                "mmdebstrap",
                r#"target=""; n=$#; i=0
for a; do i=$((i+1)); [ $i -eq $((n-1)) ] && target=$a; done
mkdir -p "$target/boot" "$target/tmp" "$target/proc" "$target/sys" "$target/dev" "$target/etc"
touch "$target/boot/vmlinuz-6.1.0-fake" "$target/boot/initrd.img-6.1.0-fake"
while [ -e "$FAKE_HOLD" ]; do sleep 0.05; done"#,
            ),
            ("unshare", ""),
            ("sfdisk", "cat >/dev/null"),
            ("mkfs.ext4", ""),
            (
                "grub-mkimage",
                r#"while [ "$1" != -o ]; do shift; done; head -c 1024 /dev/zero >"$2""#,
            ),
            ("qemu-img", r#"for out; do :; done; echo qcow2 >"$out""#),
            // pip download: one fake wheel, pinned in the copy's packer/wheels.sha256.
            (
                "python3",
                r#"while [ "$1" != -d ]; do shift; done; mkdir -p "$2"; echo "$FAKE_WHEEL" >"$2/fake-1.0-py3-none-any.whl""#,
            ),
        ];
        for (name, body) in fakes {
            let path = bin.join(name);
            std::fs::write(&path, format!("#!/bin/bash\n{log}\n{body}\n")).unwrap();
            make_executable(&path);
        }
        std::fs::write(
            root.join("repo/packer/wheels.sha256"),
            format!(
                "# pins\n{}  fake-1.0-py3-none-any.whl\n",
                sha256_hex(FAKE_WHEEL)
            ),
        )
        .unwrap();
        let agent = root.join("flower-agent");
        std::fs::write(&agent, "#!/bin/sh\necho agent v1\n").unwrap();
        make_executable(&agent);
        FakeBuild { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Starts `build-image.sh ROLE`, its output to out-NAME.
    fn start(&self, role: &str, name: &str) -> std::process::Child {
        let out = std::fs::File::create(self.path(&format!("out-{name}"))).unwrap();
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap()
        );
        Command::new("bash")
            .arg(self.path("repo/packer/scripts/build-image.sh"))
            .arg(role)
            .env("PATH", path)
            .env("OUT", self.path("out"))
            .env("AGENT", self.path("flower-agent"))
            .env("FAKE_LOG", self.path("calls"))
            .env("FAKE_HOLD", self.path("hold"))
            .env("FAKE_WHEEL", FAKE_WHEEL.trim_end())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap()
    }

    fn run(&self, role: &str, name: &str) -> String {
        let status = self.start(role, name).wait().unwrap();
        let out = self.output(name);
        assert!(status.success(), "build-image.sh {role} failed:\n{out}");
        out
    }

    fn output(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("out-{name}"))).unwrap_or_default()
    }

    /// The heavy steps run so far: (base builds, role steps per role).
    fn calls(&self) -> (usize, Vec<String>) {
        let log = std::fs::read_to_string(self.path("calls")).unwrap_or_default();
        let bases = log.lines().filter(|l| l.starts_with("mmdebstrap ")).count();
        let roles = log
            .lines()
            .filter(|l| l.starts_with("unshare "))
            .map(|l| {
                let role = l.split_whitespace().find_map(|w| w.strip_prefix("ROLE="));
                role.unwrap_or("?").to_string()
            })
            .collect();
        (bases, roles)
    }

    /// Waits (bounded, as a liveness guard only) until `what` holds.
    fn wait_until(&self, what: &str, cond: impl Fn() -> bool) {
        for _ in 0..1200 {
            if cond() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("never saw: {what}");
    }

    fn edit(&self, rel: &str, append: &str) {
        let path = self.path(rel);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(path, text + append).unwrap();
    }
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn concurrent_image_builds_share_one_base_and_wait_for_each_other() {
    let b = FakeBuild::new();
    std::fs::write(b.path("hold"), "").unwrap();
    let mut first = b.start("superlink", "first");
    b.wait_until("the first build's mmdebstrap", || b.calls().0 == 1);
    // A second build of the same role waits for the first and then finds its image; a
    // build of the other role waits for the base and then uses it.
    let mut second = b.start("superlink", "second");
    b.wait_until("the second build waiting", || {
        b.output("second")
            .contains("waiting for another build of flower-superlink.qcow2")
    });
    let mut other = b.start("supernode", "other");
    b.wait_until("the supernode build waiting for the base", || {
        b.output("other")
            .contains("waiting for another build of the base root filesystem")
    });
    std::fs::remove_file(b.path("hold")).unwrap();
    for (child, name) in [
        (&mut first, "first"),
        (&mut second, "second"),
        (&mut other, "other"),
    ] {
        assert!(child.wait().unwrap().success(), "{}", b.output(name));
    }
    assert!(b
        .output("second")
        .contains("flower-superlink.qcow2: cached"));
    assert!(b.output("other").contains("base root filesystem: cached"));
    // One base; each role once (the two roles' steps may run in either order, together).
    let (bases, mut roles) = b.calls();
    roles.sort();
    assert_eq!(
        (bases, roles),
        (1, vec!["superlink".into(), "supernode".into()])
    );
    assert!(b.path("out/flower-superlink.qcow2").is_file());
    assert!(b.path("out/flower-supernode.qcow2").is_file());
    // Nothing of the builds' scratch space is left.
    let left: Vec<_> = std::fs::read_dir(b.path("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".work-") || n.ends_with(".new") || n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Guarantee: a downloaded wheel whose SHA-256 differs from packer/wheels.sha256, or one
/// the file does not list, fails the base build before anything is built from it; cached
/// wheels are checked on every use.
#[test]
fn downloaded_wheels_must_match_their_pinned_checksums() {
    let b = FakeBuild::new();
    let pins = b.path("repo/packer/wheels.sha256");
    let good = std::fs::read_to_string(&pins).unwrap();
    let out = b.run("base", "good");
    assert!(out.contains("wheels: 1 files match"), "{out}");

    for (name, text) in [
        (
            "tampered",
            good.replace(&sha256_hex(FAKE_WHEEL), &sha256_hex("other\n")),
        ),
        ("unlisted", "# pins\n".to_string()),
    ] {
        // New pins are a new base (its key covers them); the cached wheels are re-checked.
        std::fs::write(&pins, text).unwrap();
        let status = b.start("base", name).wait().unwrap();
        let out = b.output(name);
        assert!(!status.success(), "{name}: the build went on:\n{out}");
        assert!(
            out.contains("wheels.sha256"),
            "{name}: names the pins:\n{out}"
        );
        let (bases, _) = b.calls();
        assert_eq!(bases, 1, "{name}: no base was built from unchecked wheels");
    }
}

#[test]
fn image_caches_are_invalidated_by_exactly_their_inputs() {
    let b = FakeBuild::new();
    b.run("superlink", "1");
    b.run("supernode", "2");
    assert_eq!(b.calls(), (1, vec!["superlink".into(), "supernode".into()]));
    // Same inputs: both cached, nothing runs.
    assert!(b.run("superlink", "3").contains("cached"));
    assert!(b.run("base", "4").contains("cached"));
    assert_eq!(b.calls().1.len(), 2);

    // A role's own inputs (its appliance script; the agent; the builder's disk steps)
    // rebuild that role on the cached base.
    b.edit("repo/appliance/superlink/appliance.sh", "\n# changed\n");
    b.run("superlink", "5");
    assert!(b.run("supernode", "6").contains("cached"));
    assert_eq!(b.calls().0, 1);
    assert_eq!(b.calls().1.len(), 3);
    b.edit("flower-agent", "echo agent v2\n");
    b.run("supernode", "7");
    b.edit(
        "repo/packer/scripts/build-image.sh",
        "\n# a change outside build_base\n",
    );
    b.run("supernode", "8");
    assert_eq!(
        b.calls().0,
        1,
        "the base was rebuilt for a role-only change"
    );
    assert_eq!(b.calls().1.len(), 5);

    // The base's inputs (the recipe, the lock file, build_base's text) rebuild
    // the base, then the role.
    let mut bases = 1;
    for (file, change) in [
        ("repo/packer/scripts/provision.sh", "\n# changed\n"),
        ("repo/e2e/requirements.lock", "\n"),
    ] {
        b.edit(file, change);
        b.run("superlink", &format!("base-{bases}"));
        bases += 1;
        assert_eq!(b.calls().0, bases, "{file} did not rebuild the base");
    }
    let script = b.path("repo/packer/scripts/build-image.sh");
    let text = std::fs::read_to_string(&script).unwrap();
    assert!(text.contains("less,netbase"));
    std::fs::write(&script, text.replace("less,netbase", "less,netbase,vim")).unwrap();
    b.run("superlink", "include");
    assert_eq!(
        b.calls().0,
        bases + 1,
        "build_base's package list did not rebuild the base"
    );
    assert_eq!(b.calls().1.len(), 5 + bases);
}
