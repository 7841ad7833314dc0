//! The `process` runtime: VM directories, one_env context, guest process groups following the
//! VM state machine, a guest reporting READY through OneGate, crash/freeze faults, and no
//! process outliving onesim.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use onesim::xml;
use serde_json::json;

/// Alive and not a zombie.
fn alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next()),
            Some("Z") | None
        ),
        Err(_) => false,
    }
}

fn proc_state(pid: i64) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    s.rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("")
        .to_string()
}

/// The guest: sources its context, reports READY through OneGate with curl, starts a
/// grandchild and records pids.
const GUEST: &str = r#"
ctx="$1"; dir="$2"
. "$ctx"
echo "guest vm=$VMID ip=$ETH0_IP dir=$ONESIM_VM_DIR argdir=$dir"
sleep 1000 & echo $! > "$dir/grandchild.pid"
echo $$ > "$dir/guest.pid"
curl -s -f -X PUT "$ONEGATE_ENDPOINT/vm" -H "X-ONEGATE-TOKEN: $TOKENTXT" -H "X-ONEGATE-VMID: $VMID" -d "READY=YES" && echo reported
wait
"#;

async fn start_process(base: &Path) -> onesim::Handle {
    let mut cfg = onesim::Config::for_tests(PASS);
    cfg.timings.kill_grace = Duration::from_millis(300);
    cfg.runtime = onesim::Runtime::Process {
        guest_cmd: vec![
            "/bin/sh".into(),
            "-c".into(),
            GUEST.into(),
            "guest".into(),
            "{context}".into(),
            "{vm_dir}".into(),
        ],
        base_dir: base.to_path_buf(),
    };
    onesim::start(cfg).await.unwrap()
}

/// Reads a pid file, waiting (briefly) for the guest to finish writing it.
fn read_pid(p: &Path) -> i64 {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(pid) = std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.strip_suffix('\n').and_then(|x| x.parse().ok()))
        {
            return pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no pid in {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

async fn wait_file(p: &Path) {
    wait_for(
        &format!("{}", p.display()),
        Duration::from_secs(10),
        || async { p.exists().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn guests_follow_the_vm() {
    let base = tempfile::tempdir().unwrap();
    let h = start_process(base.path()).await;
    let (x, c) = (h.urls().xmlrpc.clone(), h.urls().control.clone());
    let tid = basic_template(&x, "p", h.loopback_net()).await;
    let id = rpc(
        &x,
        "one.template.instantiate",
        &[
            P::S(AUTH),
            P::I(tid),
            P::S("g"),
            P::B(false),
            P::S(""),
            P::B(false),
        ],
    )
    .await
    .ok_int();
    wait_vm(&x, id, (3, 3)).await;
    let dir = base.path().join(format!("vm-{id}"));
    // The context file, one-context style, read-only.
    let env_path = dir.join("context/one_env");
    wait_file(&env_path).await;
    let env = std::fs::read_to_string(&env_path).unwrap();
    let lines: Vec<&str> = env.lines().collect();
    assert!(lines[0].starts_with("export TOKENTXT=\""));
    assert_eq!(lines[1], format!("export VMID=\"{id}\""));
    assert_eq!(
        lines[2],
        format!("export ONEGATE_ENDPOINT=\"{}\"", h.urls().onegate)
    );
    let ip = onesim::state::vm_ip(h.loopback_net(), id);
    assert!(env.contains(&format!("export ETH0_IP=\"{ip}\"\n")), "{env}");
    assert!(env.contains("export ONEAPP_X=\"x1\"\n"));
    assert_eq!(
        std::fs::metadata(&env_path).unwrap().permissions().mode() & 0o777,
        0o400
    );
    // The guest reported READY=YES through OneGate.
    wait_for("READY via OneGate", Duration::from_secs(10), || async {
        let e = xml::parse(
            rpc(&x, "one.vm.info", &[P::S(AUTH), P::I(id)])
                .await
                .ok_str(),
        )
        .unwrap();
        e.child("USER_TEMPLATE")
            .unwrap()
            .child("READY")
            .map(|r| r.text.clone())
            .filter(|r| r == "YES")
    })
    .await;
    let log = std::fs::read_to_string(dir.join("guest.log")).unwrap();
    assert!(
        log.contains(&format!(
            "guest vm={id} ip={ip} dir={} argdir={}",
            dir.display(),
            dir.display()
        )),
        "{log}"
    );
    wait_file(&dir.join("grandchild.pid")).await;
    let (pid, grandchild) = (
        read_pid(&dir.join("guest.pid")),
        read_pid(&dir.join("grandchild.pid")),
    );
    assert!(alive(pid) && alive(grandchild));
    let (_, vms) = control_json(&c, "GET", "/vms", None).await;
    assert_eq!(vms["vms"][0]["pid"].as_i64(), Some(pid));

    // Freeze / thaw.
    assert_eq!(
        control_json(&c, "POST", &format!("/vm/{id}/freeze"), None)
            .await
            .0,
        204
    );
    wait_for("stopped", Duration::from_secs(5), || async {
        (proc_state(pid) == "T").then_some(())
    })
    .await;
    assert_eq!(
        control_json(&c, "POST", &format!("/vm/{id}/thaw"), None)
            .await
            .0,
        204
    );
    wait_for("thawed", Duration::from_secs(5), || async {
        (proc_state(pid) != "T").then_some(())
    })
    .await;

    // Poweroff stops the whole group; resume boots a fresh guest.
    rpc(
        &x,
        "one.vm.action",
        &[P::S(AUTH), P::S("poweroff"), P::I(id)],
    )
    .await
    .ok_int();
    wait_vm(&x, id, (8, 0)).await;
    wait_for("guest group gone", Duration::from_secs(5), || async {
        (!alive(pid) && !alive(grandchild)).then_some(())
    })
    .await;
    std::fs::remove_file(dir.join("guest.pid")).unwrap();
    rpc(&x, "one.vm.action", &[P::S(AUTH), P::S("resume"), P::I(id)])
        .await
        .ok_int();
    wait_vm(&x, id, (3, 3)).await;
    wait_file(&dir.join("guest.pid")).await;
    let pid2 = read_pid(&dir.join("guest.pid"));
    assert_ne!(pid, pid2);
    assert!(alive(pid2));

    // Crash: processes die, the VM stays RUNNING as far as oned knows.
    assert_eq!(
        control_json(&c, "POST", &format!("/vm/{id}/crash"), None)
            .await
            .0,
        204
    );
    wait_for("crashed", Duration::from_secs(5), || async {
        (!alive(pid2)).then_some(())
    })
    .await;
    assert_eq!(vm_state(&x, id).await, (3, 3));
    assert_eq!(
        control_json(&c, "POST", &format!("/vm/{id}/crash"), None)
            .await
            .0,
        409
    );

    // Reboot restarts it; terminate kills it for good.
    std::fs::remove_file(dir.join("guest.pid")).unwrap();
    rpc(&x, "one.vm.action", &[P::S(AUTH), P::S("reboot"), P::I(id)])
        .await
        .ok_int();
    wait_file(&dir.join("guest.pid")).await;
    let pid3 = read_pid(&dir.join("guest.pid"));
    wait_file(&dir.join("grandchild.pid")).await;
    rpc(
        &x,
        "one.vm.action",
        &[P::S(AUTH), P::S("terminate"), P::I(id)],
    )
    .await
    .ok_int();
    wait_vm(&x, id, (6, 0)).await;
    wait_for("terminated guest gone", Duration::from_secs(5), || async {
        (!alive(pid3)).then_some(())
    })
    .await;

    // Shutdown kills every remaining guest.
    let other = rpc(
        &x,
        "one.template.instantiate",
        &[
            P::S(AUTH),
            P::I(tid),
            P::S("o"),
            P::B(false),
            P::S(""),
            P::B(false),
        ],
    )
    .await
    .ok_int();
    wait_vm(&x, other, (3, 3)).await;
    let odir = base.path().join(format!("vm-{other}"));
    wait_file(&odir.join("grandchild.pid")).await;
    let (op, og) = (
        read_pid(&odir.join("guest.pid")),
        read_pid(&odir.join("grandchild.pid")),
    );
    h.shutdown().await;
    // Signals are delivered asynchronously; give the kernel a moment, not the guests.
    wait_for(
        "no guest may outlive onesim",
        Duration::from_secs(2),
        || async { (!alive(op) && !alive(og)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn dropping_the_handle_kills_guests() {
    let base = tempfile::tempdir().unwrap();
    let h = start_process(base.path()).await;
    let x = h.urls().xmlrpc.clone();
    let tid = basic_template(&x, "d", h.loopback_net()).await;
    let id = rpc(
        &x,
        "one.template.instantiate",
        &[
            P::S(AUTH),
            P::I(tid),
            P::S("d"),
            P::B(false),
            P::S(""),
            P::B(false),
        ],
    )
    .await
    .ok_int();
    wait_vm(&x, id, (3, 3)).await;
    let dir = base.path().join(format!("vm-{id}"));
    wait_file(&dir.join("grandchild.pid")).await;
    let (pid, gc) = (
        read_pid(&dir.join("guest.pid")),
        read_pid(&dir.join("grandchild.pid")),
    );
    assert!(alive(pid));
    drop(h);
    wait_for("guests killed on drop", Duration::from_secs(5), || async {
        (!alive(pid) && !alive(gc)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn bad_guest_command_leaves_vm_running() {
    let base = tempfile::tempdir().unwrap();
    let mut cfg = onesim::Config::for_tests(PASS);
    cfg.runtime = onesim::Runtime::Process {
        guest_cmd: vec!["/nonexistent/guest".into()],
        base_dir: base.path().to_path_buf(),
    };
    let h = onesim::start(cfg).await.unwrap();
    let x = h.urls().xmlrpc.clone();
    let tid = basic_template(&x, "b", h.loopback_net()).await;
    let id = rpc(
        &x,
        "one.template.instantiate",
        &[
            P::S(AUTH),
            P::I(tid),
            P::S("b"),
            P::B(false),
            P::S(""),
            P::B(false),
        ],
    )
    .await
    .ok_int();
    wait_vm(&x, id, (3, 3)).await;
    // (With setpriv the launcher starts and then fails to exec; either way no guest remains.)
    wait_for("no guest", Duration::from_secs(5), || async {
        let (_, vms) = control_json(&h.urls().control, "GET", "/vms", None).await;
        (vms["vms"][0]["pid"] == json!(null)).then_some(())
    })
    .await;
    assert_eq!(vm_state(&x, id).await, (3, 3));
    h.shutdown().await;
}
