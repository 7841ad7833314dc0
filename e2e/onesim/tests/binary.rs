//! The `onesim` binary's start-up contract, signals, and guests dying with a SIGKILLed onesim.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[tokio::test]
async fn startup_contract_and_auto_ready() {
    let mut child = spawn_onesim(0, &["--runtime", "none", "--auto-ready", "200ms"]);
    let (rest, [x, f, _, c]) = ready_line(&mut child);
    assert_eq!(
        rpc(&x, "one.system.version", &[P::S(AUTH)]).await.ok_str(),
        "7.4.0"
    );
    // Empty except oneadmin.
    let pool = rpc(&x, "one.userpool.info", &[P::S(AUTH)]).await;
    assert_eq!(pool.ok_str().matches("<USER>").count(), 1);
    assert_eq!(
        rpc(
            &x,
            "one.vmpool.info",
            &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1), P::I(-2)]
        )
        .await
        .ok_str(),
        "<VM_POOL></VM_POOL>"
    );
    assert_eq!(
        flow(&f, "GET", "/service_template", None).await.1,
        "{\"DOCUMENT_POOL\":{}}"
    );
    let tid = basic_template(&x, "b", loopback_net(&c).await).await;
    let id = instantiate(&x, tid).await;
    wait_for("auto READY", Duration::from_secs(10), || async {
        rpc(&x, "one.vm.info", &[P::S(AUTH), P::I(id)])
            .await
            .ok_str()
            .contains("<READY><![CDATA[YES]]></READY>")
            .then_some(())
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        rest.recv_timeout(Duration::from_secs(5)).unwrap(),
        "",
        "exactly one line on stdout"
    );
}

#[test]
fn bad_arguments_fail_clearly() {
    let out = Command::new(BIN)
        .args(["--runtime", "none"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--auth"));
    let out = Command::new(BIN)
        .args(["--auth", "nopass"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("USER:PASSWORD"));
    let out = Command::new(BIN)
        .args(["--auth", "a:b", "--runtime", "process"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--guest-cmd"));
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn sigkilled_onesim_takes_guests_along() {
    if !std::path::Path::new("/usr/bin/setpriv").exists()
        && !std::path::Path::new("/bin/setpriv").exists()
    {
        panic!("setpriv (util-linux) is required: run e2e/test-all.sh");
    }
    let base = tempfile::tempdir().unwrap();
    let base_s = base.path().to_string_lossy().to_string();
    let mut child = spawn_onesim(
        0,
        &[
            "--runtime",
            "process",
            "--base-dir",
            &base_s,
            "--guest-cmd",
            "/bin/sh",
            "-c",
            "echo $$ > \"$ONESIM_VM_DIR/g.pid\"; exec sleep 1000",
        ],
    );
    let (_, [x, _, _, c]) = ready_line(&mut child);
    let tid = basic_template(&x, "k", loopback_net(&c).await).await;
    let id = instantiate(&x, tid).await;
    let pidfile = base.path().join(format!("vm-{id}/g.pid"));
    wait_for("guest pid", Duration::from_secs(10), || async {
        std::fs::read_to_string(&pidfile)
            .ok()
            .filter(|s| s.ends_with('\n'))
    })
    .await;
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for(
        "guest killed by PDEATHSIG",
        Duration::from_secs(5),
        || async { (!alive(pid)).then_some(()) },
    )
    .await;
}
