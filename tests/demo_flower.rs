//! `flower-reconcile demo` end to end: onesim + flower-agent + real Flower, one training run,
//! then teardown with no process left behind. Needs the pinned virtualenv (`FLOWER_VENV`,
//! created by e2e/test-all.sh); without it the test fails rather than passing vacuously.
//! `demo --runtime image` boots the appliance images (`ONESIM_TEST_IMAGES`, default
//! `packer/build`) as systemd-nspawn machines: its test needs root and the images, and
//! fails naming what is missing.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

fn venv() -> PathBuf {
    common::flower_venv()
}

fn demo(workdir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flower-reconcile"));
    cmd.arg("demo")
        .arg("--workdir")
        .arg(workdir)
        .arg("--venv")
        .arg(venv())
        .env("FLWR_TELEMETRY_ENABLED", "0")
        .stdin(Stdio::null());
    cmd
}

fn assert_nothing_left(workdir: &Path) {
    common::assert_no_process_mentioning(&workdir.display().to_string());
}

/// Loss values of the metrics table the demo prints (`round  train loss  eval loss`).
fn eval_losses(out: &str) -> Vec<f64> {
    out.lines()
        .skip_while(|l| !l.contains("round  train loss"))
        .skip(1)
        .map_while(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            match cols.as_slice() {
                [round, _, eval] if round.parse::<u32>().is_ok() => eval.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn flower_demo_trains_for_real_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = demo(dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for step in [
        "Plan for cluster \"basic\"",
        "Plan: 1 to create",
        "Training metrics",
        "completed",
        "Tearing down",
        // Each step says how long it took.
        "    (Flower virtualenv: ",
        "    (Applying, then following the cluster to Ready: ",
        "    (Submitting a training run: ",
        "    (Tearing down: ",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
    let losses = eval_losses(&stdout);
    assert_eq!(
        losses.len(),
        3,
        "three rounds of metrics expected:\n{stdout}"
    );
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]),
        "eval loss must decrease: {losses:?}"
    );
    assert_nothing_left(dir.path());
}

/// The lines of the child's stdout, read on a thread for the child's whole life: a closed
/// pipe would make the demo die of EPIPE instead of tearing down on SIGINT.
fn stdout_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

#[test]
fn flower_demo_interrupted_midway_tears_everything_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = demo(dir.path()).stdout(Stdio::piped()).spawn().unwrap();
    let rx = stdout_lines(&mut child);
    let mut seen = Vec::new();
    // Interrupt once VMs and Flower processes exist.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no VM came up:\n{}", seen.join("\n")));
        let booted = line.contains(", serving");
        seen.push(line);
        if booted {
            break;
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "an interrupted demo reports failure\n{}",
        seen.join("\n")
    );
    assert_nothing_left(dir.path());
}

/// A `demo --keep` child, interrupted (its teardown) and waited for when dropped, so a
/// failed assertion leaves no lab behind.
struct Kept(std::process::Child);

impl Drop for Kept {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.0.wait();
    }
}

/// Starts `cmd --keep` and reads its stdout up to the end of the `--keep` block (the
/// `# VM logs and context:` line), for at most 10 minutes: the running demo and every line.
fn keep_until_block(cmd: &mut Command) -> (Kept, Vec<String>) {
    let mut child = cmd.arg("--keep").stdout(Stdio::piped()).spawn().unwrap();
    let rx = stdout_lines(&mut child);
    let kept = Kept(child);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no --keep block:\n{}", seen.join("\n")));
        let last = line.starts_with("# VM logs and context:");
        seen.push(line);
        if last {
            return (kept, seen);
        }
    }
}

/// `demo --keep` prints commands that work as printed (issue #13 item 5): after the
/// training run the printed `status` sees the demo's cluster Ready, the printed `plan`
/// proposes nothing (exit 0 with `--detailed-exitcode`) and the printed `submit` runs.
///
/// Each command runs through `sh -c` on its exact printed text, preceded by the printed
/// `export` line: that is what a user pasting them does, so the shell quoting is tested
/// too, and the values are the demo's own output (paths and loopback URLs), not untrusted
/// input. The environment is emptied but for PATH, HOME and Flower's telemetry switch:
/// the printed block alone must reach the demo.
#[test]
fn flower_demo_keep_prints_commands_that_work_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, seen) = keep_until_block(&mut demo(dir.path()));
    let commands: Vec<String> = seen
        .into_iter()
        .skip_while(|l| !l.starts_with("==> Left running"))
        .skip(1)
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    let [export, status, plan, submit] = commands.as_slice() else {
        panic!("export, status, plan and submit expected:\n{commands:#?}");
    };
    assert!(export.starts_with("export "), "{export}");
    assert!(
        export.contains("FLOWER_RECONCILE_CONTROLLER_ID=flower-reconcile-demo"),
        "{export}"
    );
    let run = |line: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{export}\n{line}"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("FLWR_TELEMETRY_ENABLED", "0")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{line}\n--- stdout\n{}--- stderr\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            text,
        )
    };

    assert!(status.contains(" status --direct "), "{status}");
    let (code, out, text) = run(status);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        out.lines().any(|l| l
            .split_whitespace()
            .take(3)
            .eq(["Ready", "True", "Available"])),
        "the printed status sees the demo's cluster Ready: {text}"
    );

    assert!(
        plan.contains(" plan ") && plan.contains("--detailed-exitcode"),
        "{plan}"
    );
    let (code, out, text) = run(plan);
    assert_eq!(code, Some(0), "the printed plan proposes nothing: {text}");
    assert!(out.contains("No changes"), "{text}");

    assert!(
        submit.contains(" submit basic ") && submit.contains(" --spec "),
        "{submit}"
    );
    let (code, _, text) = run(submit);
    assert_eq!(code, Some(0), "the printed submit runs: {text}");

    drop(kept);
    assert_nothing_left(dir.path());
}

/// The images and raw-image cache the tests' image runtime uses (`ONESIM_TEST_IMAGES`).
fn test_images() -> (PathBuf, PathBuf) {
    match common::lab::image_runtime() {
        flower_reconcile::demo::lab::LabRuntime::Image { images, cache_dir } => (images, cache_dir),
        other => unreachable!("{other:?}"),
    }
}

/// `demo --runtime image --keep`, interrupted (Ctrl-C) once the cluster is Ready and has
/// trained: the machines ran (their namespaces and mounts were on the host) and nothing of
/// them is left: no process, machine, mount, namespace, veth, bridge or loop device.
#[test]
fn flower_demo_on_the_images_interrupted_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (images, cache) = test_images();
    // Before: what names the demo's directory or the image cache. Its bridge and machine
    // tag (printed once the lab runs) name nothing yet: a taken bridge is refused, the
    // tag is fresh.
    let mut marks = vec![
        dir.path().display().to_string(),
        cache.display().to_string(),
    ];
    let before = common::lab::host_traces(&marks);
    let (kept, seen) = keep_until_block(
        demo(dir.path())
            .args(["--runtime", "image", "--images"])
            .arg(&images)
            .arg("--image-cache")
            .arg(&cache),
    );
    for line in &seen {
        if let Some((_, named)) = line.split_once("on the host they are named after: ") {
            marks.extend(named.split_whitespace().map(str::to_string));
        }
    }
    let out = seen.join("\n");
    assert!(out.contains("Training metrics"), "{out}");
    assert!(
        marks.iter().any(|m| m.starts_with("flbr")),
        "the demo names its bridge: {out}"
    );
    let running = common::lab::host_traces(&marks);
    for kind in ["netns: ", "mount: ", "link: ", "process: "] {
        assert!(
            running.iter().any(|t| t.starts_with(kind)),
            "the running demo shows {kind:?} on the host: {running:#?}"
        );
    }
    let t = Instant::now();
    drop(kept);
    println!(
        "image demo: Ctrl-C → exited in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    // A loop device can outlive its detach for a while: the kernel lets it go once the
    // last machine's mount namespace is released (seen once after >10 s under load).
    let gone = common::assert_gone_within(
        "left behind by the interrupted image demo",
        Duration::from_secs(60),
        || {
            common::lab::host_traces(&marks)
                .difference(&before)
                .cloned()
                .collect()
        },
    );
    println!(
        "image demo: nothing left on the host {:.1}s after it exited",
        gone.as_secs_f64()
    );
}

/// `demo --runtime image` without the images stops before anything starts, saying how to
/// build them.
#[test]
fn demo_on_the_images_without_them_says_how_to_build_them() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused(
        demo(dir.path())
            .args(["--runtime", "image", "--images"])
            .arg(dir.path().join("none")),
    );
    assert!(
        stderr.contains("flower-superlink.qcow2 not found")
            && stderr.contains("make -C packer image ROLE=superlink"),
        "{stderr}"
    );
}

/// Runs a demo that must refuse to start: exit 1, no step begun. Its stderr.
fn refused(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(!stdout.contains("==> "), "nothing started: {stdout}");
    stderr.into_owned()
}

/// `demo --runtime image` as a regular user (this test drops to `nobody` when it runs as
/// root) stops before anything starts, saying the image runtime needs root.
#[test]
fn demo_on_the_images_as_a_regular_user_says_it_needs_root() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    // Images that exist: the root check is what must answer.
    for role in ["superlink", "supernode"] {
        std::fs::write(dir.path().join(format!("flower-{role}.qcow2")), "QFI\u{fb}").unwrap();
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = env!("CARGO_BIN_EXE_flower-reconcile");
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", exe]);
        c
    } else {
        Command::new(exe)
    };
    let stderr = refused(
        cmd.args(["demo", "--runtime", "image", "--images"])
            .arg(dir.path())
            .arg("--workdir")
            .arg(dir.path().join("work"))
            .env("FLWR_TELEMETRY_ENABLED", "0")
            .stdin(Stdio::null()),
    );
    assert!(
        stderr.contains("--runtime image: the image runtime needs root"),
        "{stderr}"
    );
    assert!(!dir.path().join("work").exists(), "nothing created");
}
