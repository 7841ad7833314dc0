//! Debian's real `prometheus` server for tests: started with manifests/monitoring's
//! configuration rendered for a test's controller, queried through its HTTP API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// `manifests/monitoring/` and a file under it.
pub fn monitoring(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/monitoring")
        .join(path)
}

/// manifests/monitoring/prometheus/prometheus.yml for a controller at `controller`
/// (`host:port`), scraping and discovering every second instead of every 15/30 s.
/// Panics when the manifest no longer has what is replaced.
pub fn render_config(controller: &str) -> String {
    let mut text =
        std::fs::read_to_string(monitoring("prometheus/prometheus.yml")).expect("prometheus.yml");
    for (from, to) in [
        ("controller.example:9464", controller),
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
        ("refresh_interval: 30s", "refresh_interval: 1s"),
    ] {
        assert!(text.contains(from), "prometheus.yml has no {from:?}");
        text = text.replace(from, to);
    }
    text
}

/// A running Prometheus server; killed when dropped.
pub struct Prometheus {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    log: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` in `dir` with `config` (and the alert rules next to it).
    pub fn start(dir: &Path, config: &str) -> Prometheus {
        std::fs::create_dir_all(dir).expect("prometheus dir");
        std::fs::write(dir.join("prometheus.yml"), config).expect("config");
        std::fs::copy(monitoring("prometheus/alerts.yml"), dir.join("alerts.yml")).expect("alerts");
        let port = super::lab::free_port();
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).expect("log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "prometheus: {e} (Debian's `prometheus` package; e2e/test-all.sh installs it)"
                )
            });
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    /// GET `path` of the HTTP API; its `data`, or `None` (not up yet, an error answer).
    pub async fn api(&self, path: &str) -> Option<Value> {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        (v["status"] == "success").then(|| v["data"].clone())
    }

    /// The instant vector of `query`: (labels, value) per series.
    pub async fn query(&self, query: &str) -> Vec<(Value, f64)> {
        let q: String = url::form_urlencoded::byte_serialize(query.as_bytes()).collect();
        let Some(data) = self.api(&format!("/api/v1/query?query={q}")).await else {
            return Vec::new();
        };
        data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let v = s["value"][1].as_str()?.parse().ok()?;
                Some((s["metric"].clone(), v))
            })
            .collect()
    }

    /// Active targets of `job`.
    pub async fn targets(&self, job: &str) -> Vec<Value> {
        let Some(data) = self.api("/api/v1/targets?state=active").await else {
            return Vec::new();
        };
        data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["labels"]["job"] == job)
            .cloned()
            .collect()
    }

    /// The end of its log.
    pub fn log_tail(&self, n: usize) -> String {
        super::lab::log_tail(&self.log, n)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool check metrics` on `text`; its complaints, or a panic when it cannot run.
pub fn promtool_check_metrics(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool: {e} (Debian's `prometheus` package)"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}
