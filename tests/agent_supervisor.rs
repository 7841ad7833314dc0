//! `flower-agent run` against a local OneGate with a stand-in `flower-supernode` (a small
//! test script that logs like Flower): half-dead detection, CA and endpoint changes, exits.
//! The real-Flower behaviour is covered by agent_flower.rs.

mod common;
mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::wait_for;
use flower_reconcile::agent::tls;
use flower_reconcile::protocol as p;
use support::FakeGate;

const FAKE_SUPERNODE: &str = r#"#!/bin/sh
# Stand-in for flower-supernode: counts its runs, logs its argv and a registration line.
n=$(cat runs 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" > runs
echo "ARGS: $*"
# Switches are files beside the script: Flower gets no environment from the agent.
FAKE_EXIT=$(cat "$(dirname "$0")/FAKE_EXIT" 2>/dev/null)
FAKE_HALF_DEAD=$(cat "$(dirname "$0")/FAKE_HALF_DEAD" 2>/dev/null)
[ -n "$FAKE_EXIT" ] && exit "$FAKE_EXIT"
echo "INFO :      SuperNode ID: 77"
if [ "$n" = 1 ] && [ -n "$FAKE_HALF_DEAD" ]; then
  sleep 1
  echo '	details = "Exception calling application: Node ID 77 not found"'
fi
exec sleep 1000
"#;

struct Agent {
    child: Child,
    root: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn runs(&self) -> u32 {
        std::fs::read_to_string(self.root.join("opt/flower/home/runs"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
    fn flower_log(&self) -> String {
        std::fs::read_to_string(self.root.join("var/log/one-appliance/flower-supernode.log"))
            .unwrap_or_default()
    }
}

fn ca() -> (String, tls::Issued) {
    let ca = tls::generate_ca(chrono::Utc::now(), Duration::from_secs(86400)).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&ca.cert_pem);
    (b64, ca)
}

async fn setup() -> (FakeGate, tempfile::TempDir, tls::Issued) {
    let g = FakeGate::start().await;
    g.add_vm(20, "superlink", "127.0.50.1");
    g.add_vm(21, "supernode", "127.0.50.2");
    let (b64, pem) = ca();
    g.set(20, p::FL_ENDPOINT, "127.0.50.1:9092");
    g.set(20, p::FL_CA_CERT, &b64);
    g.set(20, p::FL_READY, "YES");
    let dir = tempfile::tempdir().unwrap();
    // Flower runs as its own user: the test's directory must be searchable by it.
    common::lab::searchable(dir.path());
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("flower-supernode");
    std::fs::write(&script, FAKE_SUPERNODE).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (g, dir, pem)
}

fn start(g: &FakeGate, dir: &Path, env: &[(&str, &str)]) -> Agent {
    let root = dir.join("root");
    let bin = dir.join("bin");
    let ctx = dir.join("one_env");
    let vars = [
        ("ONEAPP_FL_RUNTIME", "process"),
        ("ONEAPP_FL_FLOWER_BIN_DIR", bin.to_str().unwrap()),
        ("ONEAPP_FL_HEARTBEAT_INTERVAL", "1s"),
        ("ONEAPP_FL_DISCOVERY_TIMEOUT", "20s"),
    ];
    std::fs::write(&ctx, g.one_env(21, &vars)).unwrap();
    for (k, v) in env {
        std::fs::write(bin.join(k), v).unwrap();
    }
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_flower-agent"))
        .args([
            "run",
            "--context",
            ctx.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Agent { child, root }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_restarts_a_half_dead_supernode() {
    let (g, dir, pem) = setup().await;
    let a = start(&g, dir.path(), &[("FAKE_HALF_DEAD", "1")]);
    wait_for("FL_NODE_READY=YES", Duration::from_secs(20), || {
        g.attr(21, p::FL_NODE_READY).as_deref() == Some("YES")
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(a.root.join("opt/flower/certs/ca.crt")).unwrap(),
        pem.cert_pem
    );
    // The first run logs "Node ID ... not found" while staying alive: it must be restarted.
    wait_for(
        "a restart of the half-dead SuperNode",
        Duration::from_secs(20),
        || a.runs() >= 2,
    )
    .await;
    // Readiness and the FL_ERROR deletion are two OneGate requests: wait for both.
    wait_for(
        "FL_NODE_READY=YES again and FL_ERROR removed",
        Duration::from_secs(20),
        || {
            g.attr(21, p::FL_NODE_READY).as_deref() == Some("YES")
                && g.attr(21, p::FL_ERROR).is_none()
        },
    )
    .await;
    let log = a.flower_log();
    assert!(
        log.contains("--root-certificates") && log.contains("--superlink 127.0.50.1:9092"),
        "{log}"
    );
    assert!(
        log.contains("--node-config partition-id=0 num-partitions=1"),
        "{log}"
    );
    assert!(g.attr(21, p::FL_HEARTBEAT).is_some());
}

/// A CA that `parent` signed: how a SuperLink could legitimately move to a new CA.
fn ca_signed_by(parent: &tls::Issued) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "Flower CA 2");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let parent_key = rcgen::KeyPair::from_pem(&parent.key_pem).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&parent.cert_pem, parent_key).unwrap();
    p.signed_by(&key, &issuer).unwrap().pem()
}

/// #12 item 11: any VM of the service can rewrite the SuperLink's FL_CA_CERT and
/// FL_ENDPOINT through OneGate (`PUT /vms/:id`). The SuperNode pins the CA it first
/// trusted and follows only a CA that CA signed, and only an endpoint on one of the
/// SuperLink VM's own NIC addresses (oned writes NICs; OneGate cannot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_pins_the_ca_and_follows_only_the_superlinks_own_address() {
    let (g, dir, first) = setup().await;
    let a = start(&g, dir.path(), &[]);
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    let trusted =
        || std::fs::read_to_string(a.root.join("opt/flower/certs/ca.crt")).unwrap_or_default();
    wait_for("FL_NODE_READY=YES", Duration::from_secs(20), || {
        g.attr(21, p::FL_NODE_READY).as_deref() == Some("YES")
    })
    .await;
    assert_eq!(a.runs(), 1);
    assert_eq!(trusted(), first.cert_pem);

    // A peer publishes its own CA: ignored, no restart.
    let (forged, _) = ca();
    g.set(20, p::FL_CA_CERT, &forged);
    wait_for("the forged CA refused", Duration::from_secs(20), || {
        agent_log().contains("ignoring a SuperLink CA change not signed by the pinned CA")
    })
    .await;
    assert_eq!(a.runs(), 1, "no restart for a forged CA");
    assert_eq!(trusted(), first.cert_pem, "the pinned CA stays");

    // A CA the pinned CA signed is followed.
    let next = ca_signed_by(&first);
    g.set(
        20,
        p::FL_CA_CERT,
        &base64::engine::general_purpose::STANDARD.encode(&next),
    );
    wait_for(
        "the signed CA trusted and Flower restarted",
        Duration::from_secs(20),
        || a.runs() >= 2 && trusted() == next,
    )
    .await;

    // A peer points FL_ENDPOINT at another address: ignored.
    let runs = a.runs();
    g.set(20, p::FL_ENDPOINT, "127.0.50.9:9092");
    wait_for(
        "the foreign endpoint refused",
        Duration::from_secs(20),
        || agent_log().contains("is not an address of that VM's NICs"),
    )
    .await;
    assert_eq!(a.runs(), runs, "no restart for a foreign endpoint");
    assert!(!a.flower_log().contains("--superlink 127.0.50.9:9092"));

    // The SuperLink VM's own address moved (oned changed its NIC): followed.
    g.set_ip(20, "127.0.50.9");
    wait_for(
        "re-discovery of the moved SuperLink",
        Duration::from_secs(20),
        || a.runs() > runs && a.flower_log().contains("--superlink 127.0.50.9:9092"),
    )
    .await;
    // A hostile endpoint is ignored (treated as absent): no restart, no use.
    let runs = a.runs();
    g.set(20, p::FL_ENDPOINT, "1.2.3.4:9092; rm -rf /");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(a.runs(), runs);
    assert!(!a.flower_log().contains("rm -rf"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervisor_reports_exits_and_keeps_restarting() {
    let (g, dir, _) = setup().await;
    let a = start(&g, dir.path(), &[("FAKE_EXIT", "3")]);
    wait_for("FL_ERROR about the exit", Duration::from_secs(20), || {
        g.attr(21, p::FL_ERROR)
            .is_some_and(|e| e.contains("Flower exited (exit status: 3)"))
    })
    .await;
    assert_eq!(g.attr(21, p::FL_NODE_READY).as_deref(), Some("NO"));
    wait_for("restarts with backoff", Duration::from_secs(20), || {
        a.runs() >= 3
    })
    .await;
    assert_eq!(
        g.attr(21, p::READY),
        None,
        "never READY while Flower cannot run"
    );
}
