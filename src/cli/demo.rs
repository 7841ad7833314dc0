//! `flower-reconcile demo`: onesim + real Flower on this machine, one training run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::demo::{self, DemoOptions, DemoRuntime};

/// Where the demo's VMs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeArg {
    /// Each VM is a flower-agent process on this host's loopback (no root needed).
    Process,
    /// Each VM boots the appliance image as a systemd-nspawn machine on a bridge (root).
    Image,
}

/// Arguments of `demo`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:
  cargo run --release -- demo              # plan, apply, Ready, one training run, teardown
  flower-reconcile demo --keep             # leave the cluster running and print how to use it
  flower-reconcile demo --spec my.yaml     # your own FlowerCluster instead of basic.yaml
  flower-reconcile demo --runtime image    # as root: VMs boot packer/build/flower-*.qcow2 (make -C packer image ROLE=…)")]
pub struct DemoArgs {
    /// Leave everything running (Ctrl-C tears it down) and print how to use it.
    #[arg(long)]
    pub keep: bool,
    /// A FlowerCluster spec instead of the embedded manifests/examples/basic.yaml.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Working directory for VM disks and logs (default: a temporary directory).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Flower virtualenv to use or create (default: $FLOWER_VENV, else target/flower-venv).
    #[arg(long)]
    pub venv: Option<PathBuf>,
    /// Give up when the cluster is not Ready after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
    /// Where the VMs run: `process` (flower-agent processes) or `image` (the appliance
    /// images booted as systemd-nspawn machines; needs root and the built images).
    #[arg(long, value_enum, default_value = "process")]
    pub runtime: RuntimeArg,
    /// `--runtime image`: the directory holding flower-superlink.qcow2 and
    /// flower-supernode.qcow2 (`make -C packer image ROLE=superlink`, then `ROLE=supernode`).
    #[arg(
        long,
        value_name = "DIR",
        env = "FLOWER_IMAGE_DIR",
        default_value = "packer/build"
    )]
    pub images: PathBuf,
    /// `--runtime image`: where raw copies of the images are kept between runs.
    #[arg(long, value_name = "DIR", default_value_os_t = onesim::Runtime::default_image_cache())]
    pub image_cache: PathBuf,
}

/// Run `demo`.
pub async fn run(args: DemoArgs) -> ExitCode {
    let runtime = match args.runtime {
        RuntimeArg::Process => DemoRuntime::Process,
        RuntimeArg::Image => DemoRuntime::Image {
            images: args.images,
            cache_dir: args.image_cache,
        },
    };
    let opts = DemoOptions {
        runtime,
        keep: args.keep,
        spec: args.spec,
        workdir: args.workdir,
        venv: args.venv,
        ready_timeout: args.ready_timeout,
        agent: demo::default_agent_argv(),
    };
    match demo::run(opts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
