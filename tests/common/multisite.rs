//! Two labs as two sites (docs/multi-site.md): what the multi-site tests share — reading a
//! site's VMs, the forwarder standing in for the hub in front of site A, and the
//! operator's `flwr supernode register` through site A's Control API.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use flower_reconcile::demo::lab::Lab;
use flower_reconcile::protocol as p;
use serde_json::Value;

/// A user-template attribute of a VM of `lab`'s simulator.
pub fn attr(lab: &Lab, vm: i64, key: &str) -> Option<String> {
    lab.sim().sim.with(|st| {
        st.vms
            .get(&vm)
            .and_then(|v| v.user_template.get(key).map(str::to_string))
    })
}

/// The id of `lab`'s VM whose name contains `part`.
pub fn vm_named(lab: &Lab, part: &str) -> Option<i64> {
    lab.sim().sim.with(|st| {
        st.vms
            .values()
            .find(|v| v.name.contains(part))
            .map(|v| v.id)
    })
}

/// Forwards every connection to `listen` on to `to`: the hub or NAT in front of site A.
pub async fn forwarder(listen: SocketAddr, to: SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = tokio::net::TcpListener::bind(listen)
        .await
        .unwrap_or_else(|e| panic!("forwarder on {listen}: {e}"));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    })
}

pub async fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Site A's Control API: the SuperLink VM's address (`controlApi: network`), port 9093.
pub fn link_control(fleet: &SocketAddr) -> SocketAddr {
    SocketAddr::new(fleet.ip(), 9093)
}

/// Site A's CA as PEM (its `FL_CA_CERT` is base64 of it).
pub fn ca_pem(lab: &Lab, link: i64) -> String {
    let b64 = attr(lab, link, p::FL_CA_CERT).expect("FL_CA_CERT");
    p::pem::decode(&b64).expect("FL_CA_CERT decodes")
}

/// `flwr supernode register` of `key` as an operator runs it: a project whose federation
/// is site A's Control API over TLS.
pub fn register_key(work: &Path, venv_bin: &Path, control: SocketAddr, ca: &str, key: &str) {
    let dir = work.join("operator");
    std::fs::create_dir_all(&dir).expect("operator dir");
    std::fs::write(dir.join("ca.crt"), ca).expect("ca");
    std::fs::write(dir.join("node.pub"), format!("{key}\n")).expect("key");
    std::fs::write(
        dir.join("pyproject.toml"),
        format!(
            "[project]\nname = \"operator\"\nversion = \"1.0.0\"\n\n[tool.flwr.app]\n\
             publisher = \"operator\"\n\n[tool.flwr.app.components]\nserverapp = \"none:app\"\n\
             clientapp = \"none:app\"\n\n[tool.flwr.federations]\ndefault = \"site-a\"\n\n\
             [tool.flwr.federations.site-a]\naddress = \"{control}\"\n\
             root-certificates = \"{}\"\n",
            dir.join("ca.crt").display()
        ),
    )
    .expect("pyproject");
    let out = std::process::Command::new(venv_bin.join("flwr"))
        .args(["supernode", "register", "node.pub", "."])
        .args(["site-a", "--format", "json"])
        .current_dir(&dir)
        .env("FLWR_HOME", dir.join("home"))
        .env("FLWR_TELEMETRY_ENABLED", "0")
        .output()
        .expect("flwr runs");
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "flwr supernode register: no JSON ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(answer["success"], true, "flwr supernode register: {answer}");
}

/// No Flower process of either site outlives its lab.
pub fn assert_nothing_left(work: &Path) {
    let needle = work.to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect();
    assert!(left.is_empty(), "processes left: {left:#?}");
}

/// Submit a 2-round run of `app` to `cluster` in `site_a` that needs both sites' SuperNodes;
/// asserts it completes and returns how long it took.
pub fn train_across(site_a: &Lab, cluster: &str, app: &Path, spec: &Path) -> Duration {
    let t = Instant::now();
    crate::common::lab::submit_completed(site_a, cluster, app, spec, 2, String::new);
    let took = t.elapsed();
    println!(
        "multisite timing: a 2-round run over both sites: {:.1}s",
        took.as_secs_f64()
    );
    took
}

/// Two labs (process runtime) under `work/a` and `work/b`, and the hub address: where
/// site B reaches site A's SuperLink, an address of site B's own net (no VM leases
/// 127.<net>.200.x), as a WireGuard hub or a NAT address is to a real remote site.
pub async fn two_sites(work: &Path) -> (Lab, Lab, SocketAddr) {
    let (dir_a, dir_b) = (work.join("a"), work.join("b"));
    for d in [&dir_a, &dir_b] {
        std::fs::create_dir_all(d).expect("site dir");
    }
    let step = Duration::from_millis(200);
    let site_a =
        crate::common::lab::start(&dir_a, crate::common::lab::Runtime::Process, step).await;
    let site_b =
        crate::common::lab::start(&dir_b, crate::common::lab::Runtime::Process, step).await;
    let hub: SocketAddr = format!("127.{}.200.1:9092", site_b.sim().loopback_net())
        .parse()
        .expect("hub address");
    (site_a, site_b, hub)
}

/// The embedded app under `work/app` and `spec` written to `work/specs/twosites.yaml`:
/// (app, specs dir, spec file).
pub fn app_and_spec(
    work: &Path,
    spec: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let app = crate::common::lab::write_app(work);
    let specs = work.join("specs");
    std::fs::create_dir_all(&specs).expect("specs dir");
    let file = specs.join("twosites.yaml");
    std::fs::write(&file, spec).expect("spec");
    (app, specs, file)
}

/// Register site B's VM `remote`'s key with site A's SuperLink (VM `link`, serving at
/// `fleet`) as the operator does (docs/multi-site.md step 4), once the VM publishes it.
pub async fn register_remote_key(
    work: &Path,
    site_a: &Lab,
    link: i64,
    fleet: &SocketAddr,
    site_b: &Lab,
    remote: i64,
) {
    let remote_key = wait_for(
        "the remote SuperNode's FL_NODE_PUBKEY",
        Duration::from_secs(60),
        || attr(site_b, remote, p::FL_NODE_PUBKEY),
    )
    .await;
    register_key(
        work,
        &crate::common::flower_venv().join("bin"),
        link_control(fleet),
        &ca_pem(site_a, link),
        &remote_key,
    );
}
