//! Helpers shared by the integration tests: loopback servers and fixtures.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

/// Serve `router` on 127.0.0.1:0; returns the bound address.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

/// Path of a fixture under tests/fixtures/one/.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/one")
        .join(name)
}

/// Contents of a fixture under tests/fixtures/one/.
pub fn fixture(name: &str) -> String {
    let p = fixture_path(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

use std::sync::{Arc, Mutex};

/// One request as a [`recording_server`] saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: axum::http::HeaderMap,
    pub body: String,
}

/// What a [`recording_server`] answers: status, content type, body.
pub type Responder = Arc<dyn Fn(&Seen) -> (u16, &'static str, String) + Send + Sync>;

/// A loopback HTTP server that records every request and answers with `responder`.
pub async fn recording_server(responder: Responder) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    let router = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let log = log.clone();
        let responder = responder.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = axum::body::to_bytes(body, 64 * 1024 * 1024)
                .await
                .unwrap_or_default();
            let s = Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().map(str::to_string),
                headers: parts.headers,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            };
            let (code, ctype, text) = responder(&s);
            log.lock().unwrap().push(s);
            axum::response::Response::builder()
                .status(code)
                .header("content-type", ctype)
                .body(axum::body::Body::from(text))
                .unwrap()
        }
    });
    let addr = serve(router).await;
    (format!("http://{addr}"), seen)
}

/// Decode an `application/x-www-form-urlencoded` body.
pub fn form_fields(body: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The OpenNebula XSD directory: `$ONE_XSD_DIR`, else `<repo>/../shared/reference/
/// opennebula-xsd` (CI layout), else `<repo>/../../shared/…` (helper worktrees).
pub fn xsd_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ONE_XSD_DIR") {
        return PathBuf::from(d);
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        repo.join("../shared/reference/opennebula-xsd"),
        repo.join("../../shared/reference/opennebula-xsd"),
    ];
    for c in &candidates {
        if c.join("vm.xsd").is_file() {
            return c.clone();
        }
    }
    panic!(
        "OpenNebula XSDs not found (tried {:?}); set ONE_XSD_DIR to shared/reference/opennebula-xsd",
        candidates
    );
}

/// Validate `xml` against `<xsd_dir>/<schema>` with xmllint, after putting OpenNebula's
/// namespace on the root element (oned's XML carries none). Panics with xmllint's output.
pub fn assert_valid_xsd(label: &str, xml: &str, schema: &str) {
    let xml = xml.trim_start();
    let end = xml.find('>').expect("root element");
    let (head, rest) = xml.split_at(end);
    let head = head.trim_end_matches('/');
    let self_closing = xml[..=end].ends_with("/>");
    let with_ns = format!(
        "{head} xmlns=\"http://opennebula.org/XMLSchema\"{}{}",
        if self_closing { "/" } else { "" },
        rest
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("doc.xml");
    std::fs::write(&file, with_ns).expect("write temp xml");
    let xsd = xsd_dir().join(schema);
    let out = match std::process::Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(&xsd)
        .arg(&file)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!(
            "xmllint is not available ({e}); run e2e/test-all.sh, which installs libxml2-utils"
        ),
    };
    assert!(
        out.status.success(),
        "{label} does not validate against {}:\n{}",
        xsd.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub mod lab;
pub mod multisite;
pub mod onesim_env;
pub mod otlp;
pub mod prometheus;
pub mod rpcserver;
pub mod secrets;

/// The pinned Flower virtualenv (`FLOWER_VENV`, created by e2e/test-all.sh). Tests that run
/// real Flower fail without it rather than passing vacuously.
pub fn flower_venv() -> PathBuf {
    let v = std::env::var_os("FLOWER_VENV").map(PathBuf::from).expect(
        "FLOWER_VENV is not set: run e2e/test-all.sh, which creates the pinned Flower virtualenv",
    );
    assert!(
        v.join("bin/flower-superlink").is_file(),
        "FLOWER_VENV={} has no flower-superlink",
        v.display()
    );
    v
}

/// Flower program `exe` of the virtualenv `venv`, set up the way the tests start one by
/// hand: its own `FLWR_HOME` (`work/home-NAME`), the venv first on `PATH` (Flower spawns
/// `flower-superexec`, `flwr-serverapp`, `flwr-clientapp` by name), no telemetry, stdin
/// closed, stdout and stderr to `work/NAME.log` (returned), in its own process group.
pub fn flower_command(
    venv: &std::path::Path,
    exe: &str,
    work: &std::path::Path,
    name: &str,
) -> (std::process::Command, PathBuf) {
    use std::os::unix::process::CommandExt as _;
    let home = work.join(format!("home-{name}"));
    std::fs::create_dir_all(&home).unwrap();
    let log = work.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let path = std::env::join_paths(std::iter::once(venv.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let mut cmd = std::process::Command::new(venv.join("bin").join(exe));
    cmd.env("PATH", path)
        .env("FLWR_HOME", &home)
        .env("FLWR_TELEMETRY_ENABLED", "0")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0);
    (cmd, log)
}

/// Processes (other than this one) whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.chars().all(|c| c.is_ascii_digit()) || name == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

/// Fails unless, within 10 s, no process mentions `needle` (e.g. a lab's directory).
pub fn assert_no_process_mentioning(needle: &str) {
    assert_gone_within_10s("processes left behind", || processes_mentioning(needle));
}

/// Fails, listing what `left` still returns, unless it returns nothing within 10 s
/// (teardown is asynchronous: processes are reaped, mounts and links removed, after a stop).
pub fn assert_gone_within_10s(what: &str, left: impl Fn() -> Vec<String>) {
    assert_gone_within(what, std::time::Duration::from_secs(10), left);
}

/// Fails, listing what `left` still returns, unless it returns nothing within `limit`;
/// returns how long that took.
pub fn assert_gone_within(
    what: &str,
    limit: std::time::Duration,
    left: impl Fn() -> Vec<String>,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    loop {
        let still = left();
        if still.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{what} (after {limit:?}):\n{}",
            still.join("\n")
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `GET {control}{path}` on onesim's control API, as JSON (e.g. `/events?since=3`, `/vms`).
pub async fn onesim_get(control: &str, path: &str) -> serde_json::Value {
    reqwest::get(format!("{control}{path}"))
        .await
        .unwrap_or_else(|e| panic!("onesim {path}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("onesim {path} JSON: {e}"))
}

/// Every VM onesim runs, with its directory (`GET /vms`).
pub async fn vm_dirs(control: &str) -> Vec<(u64, PathBuf)> {
    onesim_get(control, "/vms").await["vms"]
        .as_array()
        .expect("onesim /vms lists VMs")
        .iter()
        .map(|v| {
            (
                v["id"].as_u64().expect("VM id"),
                PathBuf::from(v["vm_dir"].as_str().expect("VM directory")),
            )
        })
        .collect()
}

/// Every regular file under `dir` (recursively, symbolic links not followed).
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => files.push(e.path()),
                _ => {}
            }
        }
    }
    files
}

/// Run `git -C dir ARGS` with a fixed test identity and no signing; its trimmed stdout.
/// Panics with git's stderr when it fails.
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.org",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Polls `ok` every 100 ms until it holds, and returns how long that took; panics naming
/// `what` after `timeout`. A deadline, not a timing assertion: it returns at once when `ok`.
pub async fn wait_for(
    what: &str,
    timeout: std::time::Duration,
    mut ok: impl FnMut() -> bool,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if ok() {
            return start.elapsed();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Runs `cmd` to its end; panics with the program, its exit status, stdout and stderr
/// unless it succeeded (a missing program names itself too). Returns its output.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run `{program}` ({e}); e2e/test-all.sh installs what the tests need")
    });
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}\n{}",
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `flower-reconcile apply --specs SPECS --auto-approve --wait` against a lab whose
/// environment is `env` (`Lab::env`); panics with its output when it fails.
pub fn apply_and_wait(env: Vec<(String, String)>, specs: &std::path::Path, timeout: &str) {
    run_ok(
        std::process::Command::new(env!("CARGO_BIN_EXE_flower-reconcile"))
            .args(["apply", "--specs"])
            .arg(specs)
            .args(["--auto-approve", "--wait", "--wait-timeout", timeout])
            .envs(env),
    );
}
