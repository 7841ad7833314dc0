//! GPU metrics of a SuperNode from `nvidia-smi` (#16 item 3), when the node has a usable
//! GPU: utilisation, memory, temperature and power per device.
//!
//! Owns: the `nvidia-smi` query (an argv array) and the parser of its CSV answer.
//! Must not: block the agent (the query has a timeout), or keep more than [`MAX_GPUS`].
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
    "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw";

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
}

fn value(field: &str) -> Option<f64> {
    let v: f64 = field.trim().parse().ok()?;
    v.is_finite().then_some(v)
}

/// Parses `nvidia-smi`'s CSV answer to [`QUERY`]; malformed lines are skipped.
pub fn parse(csv: &str) -> Vec<GpuSample> {
    csv.lines()
        .filter(|l| l.len() <= 1024)
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() != 7 {
                return None;
            }
            let mib = |s: &str| value(s).map(|v| v * 1024.0 * 1024.0);
            Some(GpuSample {
                index: f[0].parse().ok()?,
                name: f[1]
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || " ._-".contains(*c))
                    .take(64)
                    .collect(),
                utilization_percent: value(f[2]),
                memory_used_bytes: mib(f[3]),
                memory_total_bytes: mib(f[4]),
                temperature_celsius: value(f[5]),
                power_watts: value(f[6]),
            })
        })
        .take(MAX_GPUS)
        .collect()
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
        let csv = "0, Tesla T4, 35, 1024, 15360, 45, 27.50\n\
                   1, NVIDIA A100-SXM4-40GB, 0, 4, 40960, 31, [N/A]\n\
                   garbage line\n\
                   2, <script>, [Not Supported], x, 1, 2\n";
        let g = parse(csv);
        assert_eq!(g.len(), 2, "{g:?}");
        assert_eq!(g[0].name, "Tesla T4");
        assert_eq!(g[0].utilization_percent, Some(35.0));
        assert_eq!(g[0].memory_used_bytes, Some(1024.0 * 1048576.0));
        assert_eq!(g[0].memory_total_bytes, Some(15360.0 * 1048576.0));
        assert_eq!(g[0].temperature_celsius, Some(45.0));
        assert_eq!(g[0].power_watts, Some(27.5));
        assert_eq!((g[1].index, g[1].power_watts), (1, None));
        assert_eq!(g[1].name, "NVIDIA A100-SXM4-40GB");
        let many = "0, G, 1, 1, 1, 1, 1\n".repeat(100);
        assert_eq!(parse(&many).len(), MAX_GPUS);
    }
}
