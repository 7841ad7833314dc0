//! The `flower-agent` binary: install, context errors, status; and the appliance scripts'
//! parity with the protocol constants.

mod common;

use std::path::Path;
use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flower-agent"))
}

#[test]
fn appliance_scripts_only_use_protocol_names_and_call_the_agent() {
    let names = flower_reconcile::protocol::context::ALL;
    let re = regex::Regex::new(r"ONEAPP_[A-Z0-9_]+").unwrap();
    for role in ["superlink", "supernode"] {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("appliance/{role}/appliance.sh"));
        let text = std::fs::read_to_string(&path).unwrap();
        for m in re.find_iter(&text) {
            if m.as_str() == "ONEAPP_" {
                continue;
            }
            assert!(
                names.contains(&m.as_str()),
                "{}: {} is not in protocol::context::ALL",
                path.display(),
                m.as_str()
            );
        }
        for stage in ["install", "configure", "bootstrap"] {
            let f = format!("service_{stage}() {{\n    \"$FLOWER_AGENT\" {stage} --role {role}");
            assert!(
                text.contains(&f),
                "{}: service_{stage} must only call the agent",
                path.display()
            );
        }
    }
}

#[test]
fn install_prepares_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    common::run_ok(agent().args([
        "--root",
        dir.path().to_str().unwrap(),
        "--role",
        "supernode",
        "install",
        "--flower-version",
        "1.25.0",
    ]));
    let r = |p: &str| dir.path().join(p.trim_start_matches('/'));
    assert_eq!(
        std::fs::read_to_string(r("/opt/flower/ROLE")).unwrap(),
        "supernode\n"
    );
    assert_eq!(
        std::fs::read_to_string(r("/opt/flower/PREBAKED_VERSION")).unwrap(),
        "1.25.0\n"
    );
    assert!(r("/opt/flower/certs").is_dir() && r("/opt/flower/state").is_dir());
    // The image's default runtime is the one it contains (the venv unless built otherwise).
    assert_eq!(
        std::fs::read_to_string(r("/opt/flower/RUNTIME")).unwrap(),
        "process\n"
    );
    let cunit =
        std::fs::read_to_string(r("/etc/systemd/system/flower-agent-context.service")).unwrap();
    assert!(
        cunit.contains("ExecStart=/usr/local/bin/flower-agent context")
            && cunit.contains("ConditionPathExists=!/usr/sbin/one-contextd"),
        "{cunit}"
    );
    let unit = std::fs::read_to_string(r("/etc/systemd/system/flower-agent.service")).unwrap();
    assert!(unit.contains("After=network-online.target flower-agent-context.service"));
    assert!(
        unit.contains("ExecStart=/usr/local/bin/flower-agent run")
            && unit.contains("Restart=always")
    );
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(r("/opt/flower/certs"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o750,
        "the served files: Flower's group reads them (#17 item 5)"
    );
}

#[test]
fn invalid_context_reports_every_error_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("one_env");
    std::fs::write(
        &ctx,
        "export ONEAPP_FLOWER_VERSION=\"1.25.0; reboot\"\nexport ONEAPP_FL_NODE_CONFIG=\"a=$(id)\"\nexport ONEAPP_FL_LOG_LEVEL=\"\"\nexport ONEAPP_FL_SUPERLINK_ADDRESS=\"1.2.3.4:9092; rm -rf /\"\nexport ONEAPP_FL_EDGE_MAX_BACKOFF=\"0\"\n",
    )
    .unwrap();
    let out = agent()
        .args([
            "--root",
            dir.path().to_str().unwrap(),
            "--context",
            ctx.to_str().unwrap(),
            "--role",
            "supernode",
            "configure",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("4 invalid context value(s)"), "{err}");
    for v in [
        "ONEAPP_FL_EDGE_MAX_BACKOFF: must be an integer from 1 to 3600",
        "ONEAPP_FLOWER_VERSION",
        "ONEAPP_FL_NODE_CONFIG",
        "ONEAPP_FL_SUPERLINK_ADDRESS",
    ] {
        assert!(err.contains(v), "{v} in {err}");
    }
    assert!(
        !dir.path()
            .join("opt/flower/config/agent-state.json")
            .exists(),
        "boot aborted before any work"
    );
}

#[test]
fn static_insecure_supernode_configures_without_onegate_and_reports_status() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("one_env");
    std::fs::write(
        &ctx,
        "export ETH0_IP=\"10.0.0.7\"\nexport ONEAPP_FL_TLS_ENABLED=\"NO\"\nexport ONEAPP_FL_SUPERLINK_ADDRESS=\"10.0.0.5:9092\"\nexport ONEAPP_FL_NODE_CONFIG=\"partition-id=0 num-partitions=1\"\nexport ONEAPP_FL_EDGE_BACKOF=\"fixed\"\n",
    )
    .unwrap();
    let root = dir.path().join("root");
    // The docker runtime (the default here) runs only images pinned by the image build.
    std::fs::create_dir_all(root.join("opt/flower")).unwrap();
    std::fs::write(
        root.join("opt/flower/images.lock"),
        format!(
            "flower-supernode-pytorch:1.25.0 flower-supernode-pytorch@sha256:{}\n",
            "0".repeat(64)
        ),
    )
    .unwrap();
    let base = [
        "--root",
        root.to_str().unwrap(),
        "--context",
        ctx.to_str().unwrap(),
        "--role",
        "supernode",
    ];
    common::run_ok(agent().args(base).arg("configure"));
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/flower-supernode.service")).unwrap();
    assert!(
        unit.contains("--superlink 10.0.0.5:9092") && unit.contains("--insecure"),
        "{unit}"
    );
    let out = agent()
        .args(base)
        .args(["status", "--output", "json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["role"], "supernode");
    assert_eq!(doc["superlink"], "10.0.0.5:9092");
    assert_eq!(doc["node_config"], "partition-id=0 num-partitions=1");
    assert_eq!(doc["healthy"], false);
    assert_eq!(
        doc["warnings"],
        serde_json::json!([
            "ONEAPP_FL_EDGE_BACKOF: unknown variable ignored (did you mean ONEAPP_FL_EDGE_BACKOFF)"
        ]),
        "a misspelt variable is named in the status"
    );
    let out = agent().args(base).arg("health").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "not serving → health fails");
}

/// `flower-agent context` on files laid out like OpenNebula's CONTEXT CD (context.sh from
/// `VirtualMachine::generate_context`: `KEY='value'`, `'` written as `'\''`; token.txt).
#[test]
fn context_applies_the_cd_and_exports_it_exactly() {
    use std::os::unix::fs::PermissionsExt as _;
    let root = tempfile::tempdir().unwrap();
    let cd = tempfile::tempdir().unwrap();
    std::fs::write(
        cd.path().join("context.sh"),
        "# Context variables generated by OpenNebula\n\
         DISK_ID='1'\n\
         ETH0_DNS='10.0.2.3'\n\
         ETH0_GATEWAY='10.0.2.2'\n\
         ETH0_IP='10.0.2.15'\n\
         ETH0_MAC='52:54:00:12:34:56'\n\
         ETH0_MASK='255.255.255.0'\n\
         ONEAPP_FL_CLUSTER_NAME='it'\\''s; $(reboot)'\n\
         ONEGATE_ENDPOINT='http://10.0.2.2:5030'\n\
         REPORT_READY='YES'\n\
         SET_HOSTNAME='flower-superlink'\n\
         SSH_PUBLIC_KEY='ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA k@h\n\
         rm -rf /'\n\
         TOKEN='YES'\n\
         VMID='7'\n",
    )
    .unwrap();
    std::fs::write(cd.path().join("token.txt"), "c2VjcmV0dG9rZW4=\n").unwrap();
    let r = |p: &str| root.path().join(p.trim_start_matches('/'));
    for _ in 0..2 {
        let out = common::run_ok(
            agent()
                .args(["--root", root.path().to_str().unwrap(), "context", "--from"])
                .arg(cd.path()),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("skipped SSH_PUBLIC_KEY line 2"), "{err}");
        assert!(
            !err.contains("rm -rf") && !err.contains("c2VjcmV0"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(r("/run/systemd/network/10-one-eth0.network")).unwrap(),
        "# Written by flower-agent context (OpenNebula CONTEXT).\n[Match]\n\
         MACAddress=52:54:00:12:34:56\n\n[Network]\nAddress=10.0.2.15/24\n\
         Gateway=10.0.2.2\nDNS=10.0.2.3\n"
    );
    assert_eq!(
        std::fs::read_to_string(r("/etc/resolv.conf")).unwrap(),
        "# Written by flower-agent context (OpenNebula CONTEXT).\nnameserver 10.0.2.3\n"
    );
    assert_eq!(
        std::fs::read_to_string(r("/etc/hostname")).unwrap(),
        "flower-superlink\n"
    );
    // Run twice: the key is there once.
    assert_eq!(
        std::fs::read_to_string(r("/root/.ssh/authorized_keys")).unwrap(),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA k@h\n"
    );
    let mode = |p: &str| std::fs::metadata(r(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("/root/.ssh/authorized_keys"), 0o600);
    assert_eq!(mode("/root/.ssh"), 0o700);
    assert_eq!(mode("/run/one-context/one_env"), 0o400);
    // The agent reads back every variable exactly, with the token.
    let text = std::fs::read_to_string(r("/run/one-context/one_env")).unwrap();
    let (ctx, w) = flower_reconcile::agent::context::parse_one_env(&text, "one_env");
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(ctx.get("TOKENTXT"), Some("c2VjcmV0dG9rZW4="));
    assert_eq!(ctx.get("ONEAPP_FL_CLUSTER_NAME"), Some("it's; $(reboot)"));
    assert_eq!(ctx.get("VMID"), Some("7"));
    assert_eq!(ctx.vars().len(), 14, "13 from context.sh + TOKENTXT");
    // A POSIX shell (the one-apps lifecycle) reads the same values and runs nothing.
    let sh = Command::new("sh")
        .arg("-c")
        .arg(". \"$1\" && printf '%s' \"$ONEAPP_FL_CLUSTER_NAME\"")
        .arg("sh")
        .arg(r("/run/one-context/one_env"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&sh.stdout), "it's; $(reboot)");
}

#[test]
fn context_without_a_cd_fails_and_names_it() {
    let root = tempfile::tempdir().unwrap();
    let out = agent()
        .args([
            "--root",
            root.path().to_str().unwrap(),
            "context",
            "--wait",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CONTEXT CD found"));
    assert!(!root.path().join("run/one-context/one_env").exists());
}
