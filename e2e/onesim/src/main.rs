//! The `onesim` binary: starts the simulator and prints one ready line on stdout.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use onesim::{Config, Ports, Runtime, Timings};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RuntimeKind {
    None,
    Process,
    /// VMs boot their first disk's image as systemd-nspawn machines (root only).
    Image,
}

/// A faithful OpenNebula simulator (oned XML-RPC, OneFlow, OneGate) with fault injection.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    /// Port 0 picks a free port (likewise for the other ports).
    #[arg(long, default_value_t = 2633)]
    xmlrpc_port: u16,
    #[arg(long, default_value_t = 2474)]
    oneflow_port: u16,
    #[arg(long, default_value_t = 5030)]
    onegate_port: u16,
    #[arg(long, default_value_t = 2475)]
    control_port: u16,
    /// oneadmin credentials, USER:PASSWORD.
    #[arg(long, env = "ONESIM_AUTH")]
    auth: String,
    #[arg(long, value_enum, default_value = "none")]
    runtime: RuntimeKind,
    /// `none` runtime: set READY=YES this long after a VM reaches RUNNING (e.g. 2s, 500ms).
    #[arg(long, value_parser = parse_duration)]
    auto_ready: Option<Duration>,
    /// Persist the state to this JSON file and restore it on start.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Seed of the fault rules' probability draws (reproducible fault sequences).
    #[arg(long)]
    fault_seed: Option<u64>,
    /// `process` and `image` runtimes: directory holding each VM's files (default: a
    /// temporary directory).
    #[arg(long)]
    base_dir: Option<PathBuf>,
    /// `image` runtime: where raw copies of the images are kept between runs.
    #[arg(long, default_value_os_t = Runtime::default_image_cache())]
    image_cache: PathBuf,
    /// Where `one.image.allocate` copies image files (default: `<base_dir>/datastores`,
    /// `<state_file>.datastores`, or a temporary directory removed at exit).
    #[arg(long)]
    datastore_dir: Option<PathBuf>,
    /// Duration of each transient VM state.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    vm_step: Duration,
    /// OneFlow evaluation interval.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    flow_interval: Duration,
    /// Default role cooldown.
    #[arg(long, value_parser = parse_duration, default_value = "300s")]
    cooldown: Duration,
    /// OneFlow's autoscaler interval (`:autoscaler_interval:`): how often elasticity and
    /// scheduled policies are evaluated.
    #[arg(long, value_parser = parse_duration, default_value = "90s")]
    autoscaler_interval: Duration,
    /// Grace between SIGTERM and SIGKILL when a guest stops.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    kill_grace: Duration,
    /// oned.conf's ONEGATE_ENDPOINT: the OneGate URL guests are given (default: onesim's
    /// own OneGate URL).
    #[arg(long)]
    onegate_endpoint: Option<String>,
    /// `process` runtime: the guest argv (must come last; placeholders {vm_dir}, {context},
    /// {vmid}, {ip}).
    #[arg(long, num_args = 1.., allow_hyphen_values = true)]
    guest_cmd: Vec<String>,
}

/// `500ms`, `2s`, `1m`, `1h`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration '{s}'"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in '{s}' (use ms, s, m or h)"
            ))
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

fn default_base_dir() -> PathBuf {
    std::env::temp_dir().join(format!("onesim-{}", std::process::id()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ONESIM_LOG")
                // The image runtime's figures (boot → READY, memory) are printed.
                .unwrap_or_else(|_| "warn,onesim::machine=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let Some((user, pass)) = a.auth.split_once(':') else {
        anyhow::bail!("--auth must be USER:PASSWORD");
    };
    let runtime = match a.runtime {
        RuntimeKind::None => Runtime::None {
            auto_ready: a.auto_ready,
        },
        RuntimeKind::Process => {
            if a.guest_cmd.is_empty() {
                anyhow::bail!("--runtime process needs --guest-cmd ARGV...");
            }
            Runtime::Process {
                guest_cmd: a.guest_cmd,
                base_dir: a.base_dir.unwrap_or_else(default_base_dir),
            }
        }
        RuntimeKind::Image => Runtime::Image {
            base_dir: a.base_dir.unwrap_or_else(default_base_dir),
            cache_dir: a.image_cache,
        },
    };
    let cfg = Config {
        bind: a.bind,
        ports: Ports {
            xmlrpc: a.xmlrpc_port,
            oneflow: a.oneflow_port,
            onegate: a.onegate_port,
            control: a.control_port,
        },
        auth: (user.to_string(), pass.to_string()),
        runtime,
        timings: Timings {
            vm_step: a.vm_step,
            flow_interval: a.flow_interval,
            default_cooldown: a.cooldown,
            kill_grace: a.kill_grace,
            autoscaler_interval: a.autoscaler_interval,
        },
        state_file: a.state_file,
        fault_seed: a.fault_seed,
        datastore_dir: a.datastore_dir,
        onegate: onesim::GateConfig {
            advertised_endpoint: a.onegate_endpoint,
            ..Default::default()
        },
    };
    let handle = onesim::start(cfg).await?;
    let u = handle.urls().clone();
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "onesim ready xmlrpc={} oneflow={} onegate={} control={}",
            u.xmlrpc, u.oneflow, u.onegate, u.control
        )?;
        out.flush()?;
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn guest_cmd_takes_the_rest() {
        let a = Args::try_parse_from([
            "onesim",
            "--auth",
            "a:b",
            "--runtime",
            "process",
            "--guest-cmd",
            "flower-agent",
            "run",
            "--context",
            "{context}",
            "--root",
            "{vm_dir}",
        ])
        .unwrap();
        assert_eq!(
            a.guest_cmd,
            [
                "flower-agent",
                "run",
                "--context",
                "{context}",
                "--root",
                "{vm_dir}"
            ]
        );
    }
}
