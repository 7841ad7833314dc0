//! What `nvidia-smi` says about a SuperNode's GPUs: the start-up probe ([`detect`]: the
//! `FL_GPU` attribute, the `gpu_detected` event) and the metrics (#16 item 3: utilisation,
//! memory, temperature and power per device) come from one query and one parser.
//!
//! Owns: the `nvidia-smi` query (an argv array), the parser of its CSV answer, the rule for
//! names reported from it.
//! Must not: block the agent (the query has a 5 s timeout, at start-up too: a wedged
//! driver must not hang the SuperNode's configuration), or keep more than [`MAX_GPUS`].
//!
//! Assumptions: `nvidia-smi --query-gpu=… --format=csv,noheader,nounits` prints one line
//! per device, fields separated by `, `, `[N/A]` or `[Not Supported]` for a value the
//! device does not report; memory in MiB, power in W, temperature in °C
//! (`tests::parses_nvidia_smi_csv_output`).

use std::time::Duration;

/// Devices read at most.
pub const MAX_GPUS: usize = 16;
/// The fields queried, in order.
pub const QUERY: &str =
    "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw,driver_version";
const FIELDS: usize = 8;

/// One device. `None`: not reported.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSample {
    /// Device index.
    pub index: u32,
    /// Model name (letters, digits, ` ._-` only; at most 64 characters).
    pub name: String,
    /// Utilisation, percent.
    pub utilization_percent: Option<f64>,
    /// Memory used, bytes.
    pub memory_used_bytes: Option<f64>,
    /// Memory total, bytes.
    pub memory_total_bytes: Option<f64>,
    /// Temperature, °C.
    pub temperature_celsius: Option<f64>,
    /// Power draw, W.
    pub power_watts: Option<f64>,
    /// The driver's version ([`clean`]); `None` when not reported.
    pub driver: Option<String>,
}

/// What is reported from `nvidia-smi`'s text (names, driver versions): letters, digits and
/// ` ._-` only, at most 64 characters — it reaches OneGate, metrics labels and logs.
fn clean(field: &str) -> String {
    field
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || " ._-".contains(*c))
        .take(64)
        .collect::<String>()
        .trim()
        .to_string()
}

fn value(field: &str) -> Option<f64> {
    let v: f64 = field.trim().parse().ok()?;
    v.is_finite().then_some(v)
}

/// Parses `nvidia-smi`'s CSV answer to [`QUERY`]; malformed lines and devices without a
/// name are skipped.
pub fn parse(csv: &str) -> Vec<GpuSample> {
    csv.lines()
        .filter(|l| l.len() <= 1024)
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() != FIELDS {
                return None;
            }
            let mib = |s: &str| value(s).map(|v| v * 1024.0 * 1024.0);
            let name = clean(f[1]);
            let driver = clean(f[7]);
            Some(GpuSample {
                index: f[0].parse().ok()?,
                name: (!name.is_empty()).then_some(name)?,
                utilization_percent: value(f[2]),
                memory_used_bytes: mib(f[3]),
                memory_total_bytes: mib(f[4]),
                temperature_celsius: value(f[5]),
                power_watts: value(f[6]),
                // `[N/A]` cleans to `NA`: not a version.
                driver: (!driver.is_empty() && !f[7].starts_with('[')).then_some(driver),
            })
        })
        .take(MAX_GPUS)
        .collect()
}

/// The GPUs `nvidia-smi` listed at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuFound {
    /// Devices listed.
    pub count: usize,
    /// The first one's name.
    pub name: String,
    /// Its memory, MiB; `None` when not reported.
    pub memory_mb: Option<u64>,
    /// The driver's version; `None` when not reported.
    pub driver: Option<String>,
}

impl GpuFound {
    /// `1x Tesla T4`: what `FL_GPU` and the report show.
    pub fn describe(&self) -> String {
        format!("{}x {}", self.count, self.name)
    }

    /// The first device of a sample, and how many there are; `None` without one.
    pub fn from_samples(samples: &[GpuSample]) -> Option<Self> {
        let first = samples.first()?;
        Some(Self {
            count: samples.len(),
            name: first.name.clone(),
            memory_mb: first
                .memory_total_bytes
                .map(|b| (b / (1024.0 * 1024.0)).round() as u64),
            driver: first.driver.clone(),
        })
    }
}

/// Detects an NVIDIA GPU at start-up: `/dev/nvidia0` and a working `nvidia-smi` (the same
/// query as the metrics, 5 s at most).
pub async fn detect() -> Option<GpuFound> {
    if !std::path::Path::new("/dev/nvidia0").exists() {
        return None;
    }
    GpuFound::from_samples(&sample().await?)
}

/// Runs `nvidia-smi` (5 s at most); `None` when it is absent or fails.
pub async fn sample() -> Option<Vec<GpuSample>> {
    let run = tokio::process::Command::new("nvidia-smi")
        .args([
            &format!("--query-gpu={QUERY}"),
            "--format=csv,noheader,nounits",
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .ok()?
        .ok()?;
    out.status
        .success()
        .then(|| parse(&String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_csv_output() {
        // The shape nvidia-smi prints for this query (`--help-query-gpu`; no GPU here to
        // record from): two devices, the second without a power reading, then junk.
        let csv = "0, Tesla T4, 35, 1024, 15360, 45, 27.50, 550.54.15\n\
                   1, NVIDIA A100-SXM4-40GB, 0, 4, 40960, 31, [N/A], 550.54.15\n\
                   garbage line\n\
                   2, <script>, [Not Supported], x, 1, 2, 3\n\
                   3, ;;, 1, 1, 1, 1, 1, 1\n";
        let g = parse(csv);
        assert_eq!(g.len(), 2, "{g:?}");
        assert_eq!(g[0].name, "Tesla T4");
        assert_eq!(g[0].utilization_percent, Some(35.0));
        assert_eq!(g[0].memory_used_bytes, Some(1024.0 * 1048576.0));
        assert_eq!(g[0].memory_total_bytes, Some(15360.0 * 1048576.0));
        assert_eq!(g[0].temperature_celsius, Some(45.0));
        assert_eq!(g[0].power_watts, Some(27.5));
        assert_eq!(g[0].driver.as_deref(), Some("550.54.15"));
        assert_eq!((g[1].index, g[1].power_watts), (1, None));
        assert_eq!(g[1].name, "NVIDIA A100-SXM4-40GB");
        let many = "0, G, 1, 1, 1, 1, 1, 1\n".repeat(100);
        assert_eq!(parse(&many).len(), MAX_GPUS);
    }

    /// Guarantee: a wedged `nvidia-smi` costs 5 s, not the agent: the query is killed and
    /// reads as no GPU. A working one is read through the same parser. (nextest runs each
    /// test in its own process, so this one's PATH is its own.)
    #[tokio::test]
    async fn a_hung_nvidia_smi_is_cut_off_and_a_working_one_is_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nvidia-smi");
        let path = format!(
            "{}:{}",
            dir.path().display(),
            std::env::var("PATH").unwrap()
        );
        std::env::set_var("PATH", path);
        let install = |body: &str| {
            std::fs::write(&fake, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        install("exec sleep 60");
        let started = std::time::Instant::now();
        assert_eq!(sample().await, None);
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(30), "waited {waited:?}");
        println!("a hung nvidia-smi was cut off after {waited:?}");
        install(
            r#"case "$1" in --query-gpu=*driver_version) echo "0, Tesla T4, 5, 1, 15360, 40, 20, 550.54.15";; *) exit 9;; esac"#,
        );
        let g = sample().await.expect("read");
        assert_eq!(
            GpuFound::from_samples(&g).unwrap().describe(),
            "1x Tesla T4"
        );
    }

    /// The start-up probe reads the same answer: the first device, the count, its memory in
    /// MiB and the driver; names keep only the reportable characters.
    #[test]
    fn the_start_up_probe_summarises_the_same_query() {
        let g = GpuFound::from_samples(&parse(
            "0, Tesla T4, 0, 0, 15360, 40, 20, 550.54.15\n1, Tesla T4, 0, 0, 15360, 40, 20, 550.54.15\n",
        ))
        .expect("found");
        assert_eq!(g.describe(), "2x Tesla T4");
        assert_eq!(
            (g.memory_mb, g.driver.as_deref()),
            (Some(15360), Some("550.54.15"))
        );
        let g = GpuFound::from_samples(&parse(
            "0, A100 <x>, [N/A], [N/A], [N/A], [N/A], [N/A], [N/A]\n",
        ))
        .expect("found");
        assert_eq!(
            (g.name.as_str(), g.memory_mb, g.driver),
            ("A100 x", None, None)
        );
        assert_eq!(
            GpuFound::from_samples(&parse("\n0, , 1, 1, 1, 1, 1, 1\nnot csv\n")),
            None
        );
    }
}
