//! `flower-reconcile demo` end to end: onesim + flower-agent + real Flower, one training run,
//! then teardown with no process left behind. Needs the pinned virtualenv (`FLOWER_VENV`,
//! created by e2e/test-all.sh); without it the test fails rather than passing vacuously.

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
    let mut child = demo(dir.path())
        .arg("--keep")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = stdout_lines(&mut child);
    let kept = Kept(child);
    let mut seen = Vec::new();
    let mut block: Option<Vec<String>> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no --keep block:\n{}", seen.join("\n")));
        seen.push(line.clone());
        if line.starts_with("==> Left running") {
            block = Some(Vec::new());
        } else if let Some(b) = &mut block {
            let last = line.starts_with("# VM logs and context:");
            b.push(line);
            if last {
                break;
            }
        }
    }
    let commands: Vec<String> = block
        .unwrap()
        .into_iter()
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
