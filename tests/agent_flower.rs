//! flower-agent with real Flower (process runtime): a TLS SuperLink and two SuperNodes on
//! their own 127.0.x.y addresses, a local OneGate serving their /service and /vms views.
//!
//! Needs `FLOWER_VENV` (a virtualenv with flwr 1.25.0, see e2e/test-all.sh): the test fails,
//! never skips, without it.
//!
//! "Registered" is read from the SuperLink's own state database (`node` table): a node is
//! back after a SuperLink restart when its `online_until` (heartbeat time + 2 × 30 s) moved
//! past the restart time + 60 s, i.e. it sent a heartbeat to the new SuperLink process.

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::wait_for;
use flower_reconcile::protocol as p;
use support::FakeGate;

const LINK: u64 = 40;
const NODES: [u64; 2] = [41, 42];

fn venv() -> PathBuf {
    let v = std::env::var_os("FLOWER_VENV").unwrap_or_else(|| {
        panic!("FLOWER_VENV is not set: point it at a virtualenv with flwr==1.25.0 (e2e/test-all.sh creates target/flower-venv)")
    });
    let v = PathBuf::from(v);
    assert!(
        v.join("bin/flower-superlink").is_file() && v.join("bin/flower-supernode").is_file(),
        "FLOWER_VENV={} has no bin/flower-superlink / bin/flower-supernode",
        v.display()
    );
    v
}

/// A running agent; SIGTERM on drop (then SIGKILL), so a failing test leaves no Flower.
struct AgentProc {
    child: Child,
    root: PathBuf,
}

impl AgentProc {
    fn start(
        gate: &FakeGate,
        id: u64,
        dir: &Path,
        venv: &Path,
        extra: &[(&str, &str)],
    ) -> AgentProc {
        let root = dir.join(format!("vm{id}"));
        std::fs::create_dir_all(&root).unwrap();
        let bin = venv.join("bin");
        let mut vars = vec![
            ("ONEAPP_FL_RUNTIME", "process"),
            ("ONEAPP_FL_FLOWER_BIN_DIR", bin.to_str().unwrap()),
            ("ONEAPP_FL_HEARTBEAT_INTERVAL", "2s"),
            ("ONEAPP_FL_DISCOVERY_TIMEOUT", "60s"),
            ("ONEAPP_FL_CONTROL_BIND", "vm"),
        ];
        vars.extend_from_slice(extra);
        let ctx = dir.join(format!("one_env.{id}"));
        std::fs::write(&ctx, gate.one_env(id, &vars)).unwrap();
        // Root's only, as one-context writes it: it holds the OneGate token.
        std::fs::set_permissions(&ctx, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .unwrap();
        let log = std::fs::File::create(dir.join(format!("agent{id}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flower-agent"))
            .args([
                "run",
                "--context",
                ctx.to_str().unwrap(),
                "--root",
                root.to_str().unwrap(),
                "--log-level",
                "debug",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        AgentProc { child, root }
    }

    fn status(&self) -> serde_json::Value {
        std::fs::read_to_string(self.root.join("run/flower-agent/status.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    fn stop(&mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(25);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// (node id, status, online_until) rows of the SuperLink's state database.
fn link_nodes(venv: &Path, db: &Path) -> Vec<(i64, String, f64)> {
    let script = "import json,sqlite3,sys\ncon=sqlite3.connect(sys.argv[1])\nprint(json.dumps([list(r) for r in con.execute('SELECT node_id,status,online_until FROM node')]))";
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", script, db.to_str().unwrap()])
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice::<Vec<(i64, String, Option<f64>)>>(&out.stdout)
        .unwrap_or_default()
        .into_iter()
        .map(|(id, s, t)| (id, s, t.unwrap_or(0.0)))
        .collect()
}

/// A process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Both SuperNodes sent a heartbeat to the SuperLink after `since` (epoch seconds).
fn both_heartbeat_after(venv: &Path, db: &Path, since: f64) -> bool {
    let rows = link_nodes(venv, db);
    rows.iter()
        .filter(|(_, s, until)| s == "online" && *until > since + 60.0)
        .count()
        >= 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_agent_process_runtime_tls_cluster_heals_and_rotates() {
    let venv = venv();
    let gate = FakeGate::start().await;
    gate.add_vm(LINK, "superlink", "127.0.40.1");
    gate.add_vm(NODES[0], "supernode", "127.0.40.2");
    gate.add_vm(NODES[1], "supernode", "127.0.40.3");
    let dir = tempfile::tempdir().unwrap();
    common::lab::searchable(dir.path());
    let t0 = Instant::now();

    // SuperNodes first: they wait for the SuperLink through OneGate.
    let mut n1 = AgentProc::start(&gate, NODES[0], dir.path(), &venv, &[]);
    let mut n2 = AgentProc::start(&gate, NODES[1], dir.path(), &venv, &[]);
    // The controller's signing key: the SuperLink acts only on requests it signed.
    let seed = flower_reconcile::protocol::signing::SigningSeed::generate().unwrap();
    let public = seed.public_key();
    let mut link = AgentProc::start(
        &gate,
        LINK,
        dir.path(),
        &venv,
        &[
            ("ONEAPP_FL_ROLE", "superlink"),
            ("ONEAPP_FL_CONTROLLER_KEY", public.as_str()),
        ],
    );

    wait_for(
        "the SuperLink to publish FL_READY=YES",
        Duration::from_secs(60),
        || gate.attr(LINK, p::FL_READY).as_deref() == Some("YES"),
    )
    .await;
    assert_eq!(gate.attr(LINK, p::READY).as_deref(), Some("YES"));
    assert_eq!(
        gate.attr(LINK, p::FL_ENDPOINT).as_deref(),
        Some("127.0.40.1:9092")
    );
    assert_eq!(gate.attr(LINK, p::FL_TLS).as_deref(), Some("YES"));
    for id in NODES {
        wait_for(
            "the SuperNodes to register (FL_NODE_READY=YES)",
            Duration::from_secs(90),
            || gate.attr(id, p::FL_NODE_READY).as_deref() == Some("YES"),
        )
        .await;
        assert_eq!(gate.attr(id, p::READY).as_deref(), Some("YES"));
        assert_eq!(gate.attr(id, p::FL_ROLE).as_deref(), Some("supernode"));
    }
    let up = t0.elapsed();
    // Partitions computed from the role and persisted.
    for (i, id) in NODES.iter().enumerate() {
        let st: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                dir.path()
                    .join(format!("vm{id}/opt/flower/config/agent-state.json")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            st["node"]["node_config"],
            format!("partition-id={i} num-partitions=2")
        );
    }
    let db = link.root.join("opt/flower/state/state.db");
    let since = epoch() - 61.0;
    wait_for(
        "both SuperNodes online in the SuperLink database",
        Duration::from_secs(30),
        || both_heartbeat_after(&venv, &db, since),
    )
    .await;
    // Heartbeats flow.
    let hb = gate.attr(LINK, p::FL_HEARTBEAT).unwrap();
    wait_for("a newer FL_HEARTBEAT", Duration::from_secs(10), || {
        gate.attr(LINK, p::FL_HEARTBEAT).as_deref() != Some(hb.as_str())
    })
    .await;

    // Kill the SuperLink's Flower process: the supervisor restarts it, the nodes come back.
    let old_pid = link.status()["pid"]
        .as_i64()
        .expect("SuperLink pid in status.json") as i32;
    let killed_at = epoch();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(
        "the supervisor to restart the SuperLink",
        Duration::from_secs(30),
        || {
            let s = link.status();
            s["phase"] == "serving" && s["pid"].as_i64().is_some_and(|p| p as i32 != old_pid)
        },
    )
    .await;
    let healed = wait_for(
        "both SuperNodes registered again (within 60 s)",
        Duration::from_secs(60),
        || both_heartbeat_after(&venv, &db, killed_at),
    )
    .await;
    assert_eq!(gate.attr(LINK, p::FL_READY).as_deref(), Some("YES"));
    assert_eq!(
        gate.attr(LINK, p::FL_ERROR),
        None,
        "FL_ERROR cleared once serving again"
    );

    // Rotation request: new server certificate, same CA, answered, nodes keep working.
    let ca_before = std::fs::read(link.root.join("opt/flower/certs/ca.crt")).unwrap();
    let cert_before = std::fs::read(link.root.join("opt/flower/certs/server.pem")).unwrap();
    let rotated_at = epoch();
    gate.set(LINK, p::FL_ROTATE_REQUEST, "1");
    gate.set(LINK, p::FL_ROTATE_SIG, &seed.sign_rotation(LINK, 1, None));
    wait_for("FL_ROTATE_DONE=1", Duration::from_secs(60), || {
        gate.attr(LINK, p::FL_ROTATE_DONE).as_deref() == Some("1")
    })
    .await;
    assert_ne!(
        std::fs::read(link.root.join("opt/flower/certs/server.pem")).unwrap(),
        cert_before
    );
    assert_eq!(
        std::fs::read(link.root.join("opt/flower/certs/ca.crt")).unwrap(),
        ca_before
    );
    let after_rotation = wait_for(
        "both SuperNodes working after the rotation",
        Duration::from_secs(60),
        || both_heartbeat_after(&venv, &db, rotated_at),
    )
    .await;
    // Idempotent: the same generation again does nothing.
    let pid = link.status()["pid"].clone();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        link.status()["pid"],
        pid,
        "a satisfied rotation request does not restart Flower"
    );

    // Graceful stop (SIGTERM) and a killed agent (SIGKILL): no Flower process survives.
    let pids: Vec<i32> = [&link, &n1, &n2]
        .iter()
        .filter_map(|a| a.status()["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    assert_eq!(pids.len(), 3);
    for a in [&mut link, &mut n1] {
        assert_eq!(a.stop(), Some(0), "agent exits 0 on SIGTERM");
    }
    n2.child.kill().unwrap();
    n2.child.wait().unwrap();
    for pid in pids {
        wait_for(
            "Flower to end with its agent",
            Duration::from_secs(10),
            || !alive(pid),
        )
        .await;
    }
    eprintln!(
        "flower cluster: up in {up:?}, re-registered {healed:?} after the SuperLink kill, {after_rotation:?} after rotation, total {:?}",
        t0.elapsed()
    );
}

/// Ids of the processes of process group `pgid` (the Flower program and what it spawned).
fn group_members(pgid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name: state, ppid, pgrp.
        let rest: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if rest.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) {
            v.push(pid);
        }
    }
    v
}

/// The value of `key:` in /proc/PID/status.
fn status_field(pid: i32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `PROGRAM FILE` as the Flower user (no group, empty environment): Ok(stdout) or
/// Err(stderr).
fn as_flower(program: &str, file: &Path) -> Result<String, String> {
    let id = flower_reconcile::agent::privilege::FLOWER_ID.to_string();
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            "--",
            program,
        ])
        .arg(file)
        .env_clear()
        .output()
        .unwrap();
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// #17 item 5, process runtime with the agent as root: Flower and everything it spawns runs
/// as the unprivileged Flower user (UID/GID 49999, no supplementary group, no capability,
/// no_new_privs) with only the allow-listed environment; that user cannot read the CA key,
/// the context with the OneGate token, or the agent's state and Flower env file, nor write
/// the served certificates; and a federated run still trains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flower_agent_runs_flower_unprivileged_with_an_allow_listed_environment_and_trains() {
    use flower_reconcile::agent::privilege::{env_allowed, FLOWER_ID};
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test checks the drop from root to the Flower user: run it as root (e2e/test-all.sh does)"
    );
    const L: u64 = 43;
    const N: u64 = 44;
    let venv = venv();
    let gate = FakeGate::start().await;
    gate.add_vm(L, "superlink", "127.0.43.1");
    gate.add_vm(N, "supernode", "127.0.43.2");
    let dir = tempfile::tempdir().unwrap();
    common::lab::searchable(dir.path());
    let t0 = Instant::now();
    let mut node = AgentProc::start(&gate, N, dir.path(), &venv, &[]);
    let mut link = AgentProc::start(
        &gate,
        L,
        dir.path(),
        &venv,
        &[("ONEAPP_FL_ROLE", "superlink")],
    );
    wait_for(
        "the SuperLink FL_READY=YES",
        Duration::from_secs(90),
        || gate.attr(L, p::FL_READY).as_deref() == Some("YES"),
    )
    .await;
    wait_for(
        "the SuperNode FL_NODE_READY=YES",
        Duration::from_secs(90),
        || gate.attr(N, p::FL_NODE_READY).as_deref() == Some("YES"),
    )
    .await;
    let up = t0.elapsed();

    let token = "dG9rZW4tZm9yLXZt"; // FakeGate's TOKENTXT
    let id = FLOWER_ID.to_string();
    let mut checked = 0;
    for (name, agent) in [("superlink", &link), ("supernode", &node)] {
        let leader = agent.status()["pid"].as_i64().expect("pid in status.json") as i32;
        let agent_env: Vec<String> = String::from_utf8_lossy(
            &std::fs::read(format!("/proc/{}/environ", agent.child.id())).unwrap(),
        )
        .split('\0')
        .filter_map(|e| e.split('=').next().map(str::to_string))
        .filter(|n| !n.is_empty())
        .collect();
        assert!(
            agent_env.iter().any(|n| n == "FLOWER_VENV"),
            "the agent's own environment is richer: {agent_env:?}"
        );
        let members = group_members(leader);
        assert!(members.contains(&leader), "{name}: {members:?}");
        for pid in members {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let what = format!("{name} pid {pid} ({cmd})");
            assert_eq!(
                status_field(pid, "Uid"),
                format!("{id} {id} {id} {id}"),
                "{what}"
            );
            assert_eq!(
                status_field(pid, "Gid"),
                format!("{id} {id} {id} {id}"),
                "{what}"
            );
            assert_eq!(
                status_field(pid, "Groups"),
                "",
                "{what}: no supplementary group"
            );
            assert_eq!(status_field(pid, "CapEff"), "0000000000000000", "{what}");
            assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{what}");
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            let environ = String::from_utf8_lossy(&environ).into_owned();
            assert!(
                !environ.contains(token),
                "{what}: the OneGate token in its environment"
            );
            let names: Vec<&str> = environ
                .split('\0')
                .filter(|e| !e.is_empty())
                .map(|e| e.split('=').next().unwrap())
                .collect();
            assert!(
                names.contains(&"PATH") && names.contains(&"FLWR_HOME"),
                "{what}: {names:?}"
            );
            for n in &names {
                // The program the agent started has exactly the allow-list; what it spawns
                // may add Flower's own settings (SuperExec gets GRPC_VERBOSITY from Flower)
                // but nothing of the agent's environment beyond the allow-list.
                let inherited = agent_env.iter().any(|a| a == n);
                assert!(
                    env_allowed(n) || (pid != leader && !inherited),
                    "{what}: {n} is not on the allow-list ({names:?})"
                );
            }
            checked += 1;
        }
    }

    // What the Flower user can and cannot read or change. The same command reads the
    // server key, so a refusal below is the files' protection, not a broken command.
    let certs = link.root.join("opt/flower/certs");
    assert!(as_flower("cat", &certs.join("server.key"))
        .unwrap()
        .contains("PRIVATE KEY"));
    let secret = [
        link.root.join("opt/flower/ca/ca.key"),
        dir.path().join(format!("one_env.{L}")),
        dir.path().join(format!("one_env.{N}")),
        link.root.join("opt/flower/config/agent-state.json"),
        link.root.join("opt/flower/config/flower.env"),
        node.root.join("opt/flower/config/agent-state.json"),
    ];
    for f in &secret {
        assert!(f.is_file(), "{} exists", f.display());
        let e = as_flower("cat", f).expect_err(&format!("{} readable by Flower", f.display()));
        assert!(e.contains("Permission denied"), "{}: {e}", f.display());
    }
    let touch = as_flower("touch", &certs.join("ca.crt"));
    assert!(
        touch.is_err_and(|e| e.contains("Permission denied")),
        "the Flower user cannot change the served CA"
    );
    // Flower wrote its database as its own user.
    let db = std::fs::metadata(link.root.join("opt/flower/state/state.db")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&db), FLOWER_ID);

    // A federated run trains under the unprivileged user: one round, one SuperNode.
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/apps/fedlinreg");
    let target = flower_reconcile::submit::SubmitTarget {
        cluster: "unprivileged".into(),
        control_address: "127.0.43.1:9093".into(),
        ca_pem: Some(std::fs::read_to_string(certs.join("ca.crt")).unwrap()),
        flower_version: "1.25.0".into(),
        default_run_config: None,
    };
    let mut opts = flower_reconcile::submit::SubmitOptions {
        timeout: Duration::from_secs(180),
        ..Default::default()
    };
    for k in [
        "num-server-rounds",
        "min-train-nodes",
        "min-fit-clients",
        "min-evaluate-clients",
        "min-available-clients",
    ] {
        opts.run_config
            .insert(k.into(), flower_reconcile::api::ConfigValue::Int(1));
    }
    let mut output = Vec::new();
    let outcome = flower_reconcile::submit::submit(&target, None, &app, &opts, &mut |_, line| {
        output.push(line.to_string())
    })
    .await
    .unwrap_or_else(|e| panic!("submit: {e}\n{}", output.join("\n")));
    assert_eq!(
        outcome.status,
        flower_reconcile::submit::RunStatus::Completed,
        "{}",
        output.join("\n")
    );
    assert!(
        output.iter().any(|l| l.contains("[ROUND 1")),
        "{}",
        output.join("\n")
    );
    eprintln!(
        "flower unprivileged: up in {up:?}, {checked} Flower processes checked, 1-round run {:?}, total {:?}",
        outcome.elapsed,
        t0.elapsed()
    );
    for a in [&mut link, &mut node] {
        assert_eq!(a.stop(), Some(0), "agent exits 0 on SIGTERM");
    }
}
