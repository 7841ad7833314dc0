//! The `flower-agent` command line.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::layer::SubscriberExt as _;

use super::context::{Config, Context, Role, Runtime};
use super::error::IoError;
use super::gate::{AnyGate, Gate, NoGate};
use super::node::{self, AgentError, AgentState, Node};
use super::paths::Paths;
use super::supervisor::{self, RunOptions, RunStatus};
use super::{flower, privilege, tls};
use crate::one::{OneGateClient, OneGateConfig};

/// flower-agent: runs and supervises Flower inside the SuperLink and SuperNode appliances.
#[derive(Debug, Parser)]
#[command(name = "flower-agent", version)]
pub struct Cli {
    /// one-context environment file (`export KEY="value"` lines).
    #[arg(long, global = true, default_value = "/run/one-context/one_env")]
    pub context: PathBuf,
    /// Prefix of every path the agent uses (/opt/flower, /etc/..., /var/log/...).
    #[arg(long, global = true, default_value = "/")]
    pub root: PathBuf,
    /// Agent log level (overrides ONEAPP_FL_LOG_LEVEL for the agent's own logs).
    #[arg(long, global = true, value_enum)]
    pub log_level: Option<LevelArg>,
    /// Node role (default: the installed role, ONEAPP_FL_ROLE, or OneGate's ROLE_NAME).
    #[arg(long, global = true, value_enum)]
    pub role: Option<RoleArg>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Agent log levels.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LevelArg {
    /// Everything.
    Debug,
    /// Normal.
    Info,
    /// Problems only.
    Warn,
    /// Errors only.
    Error,
}

/// Roles on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    /// The coordinator.
    Superlink,
    /// A training node.
    Supernode,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Superlink => Role::Superlink,
            RoleArg::Supernode => Role::Supernode,
        }
    }
}

/// Runtimes on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RuntimeArg {
    /// The image's Flower virtualenv.
    Process,
    /// Docker and the Flower container images.
    Docker,
}

impl RuntimeArg {
    fn as_str(self) -> &'static str {
        match self {
            RuntimeArg::Process => "process",
            RuntimeArg::Docker => "docker",
        }
    }
}

/// Output formats of `status`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputArg {
    /// Human-readable.
    Text,
    /// One JSON document.
    Json,
}

/// Subcommands (one-apps stages and the supervisor).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Image build time: prepare /opt/flower, record the role and the prebaked version.
    Install {
        /// Flower version baked into the image.
        #[arg(long, default_value = super::context::DEFAULT_FLOWER_VERSION)]
        flower_version: String,
        /// The runtime the image contains: the default when ONEAPP_FL_RUNTIME is unset.
        #[arg(long, value_enum, default_value = "process")]
        runtime: RuntimeArg,
    },
    /// Boot time, without one-context: read the CONTEXT CD, configure network, hostname and
    /// SSH keys, write the context environment file (see `agent::onecontext`).
    Context {
        /// Read context.sh and token.txt from this directory instead of the CD.
        #[arg(long)]
        from: Option<PathBuf>,
        /// How long to wait for the CD to appear, in seconds.
        #[arg(long, default_value_t = 30)]
        wait: u64,
    },
    /// Read the context, validate, write config/units/TLS, discover the SuperLink.
    Configure,
    /// Start Flower, wait until it serves, publish through OneGate, report READY.
    Bootstrap,
    /// Exit 0 only when Flower is serving.
    Health,
    /// Supervise Flower (configures and bootstraps first when needed).
    Run,
    /// Show the node's state.
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        output: OutputArg,
    },
}

/// Entry point of the `flower-agent` binary.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// [`main`] with an explicit command line (the first item is the program name). The
/// `flower-reconcile demo` runs the agent this way, through its hidden `agent` subcommand.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flower-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(real_main(cli))
}

/// The agent's subscriber: its log lines (stderr, and the agent log unless `to_file` is
/// off) at the configured level, JSON lines carrying trace and span ids, and the spans
/// exported by `provider` when there is one ([`super::trace`]).
fn subscriber(
    cli: &Cli,
    ctx: &Context,
    paths: &Paths,
    to_file: bool,
    provider: Option<&opentelemetry_sdk::trace::SdkTracerProvider>,
) -> tracing::Dispatch {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::Layer as _;
    let level = match cli.log_level {
        Some(LevelArg::Debug) => "debug",
        Some(LevelArg::Info) => "info",
        Some(LevelArg::Warn) => "warn",
        Some(LevelArg::Error) => "error",
        None => match ctx
            .get(crate::protocol::context::LOG_LEVEL)
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            Some("DEBUG") => "debug",
            Some("WARNING") => "warn",
            Some("ERROR") => "error",
            _ => "info",
        },
    };
    // Per layer, so that a quiet log level does not switch the spans off.
    let filter = || tracing_subscriber::EnvFilter::new(format!("warn,flower_reconcile={level}"));
    let json = ctx
        .get(crate::protocol::context::LOG_FORMAT)
        .is_some_and(|f| f.eq_ignore_ascii_case("json"));
    let file = to_file
        .then(|| {
            fs::create_dir_all(paths.log_dir()).ok()?;
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(paths.agent_log())
                .ok()
        })
        .flatten();
    let otel = provider.map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("flower_reconcile::agent"))
            .with_filter(Targets::new().with_target("flower_reconcile", LevelFilter::INFO))
    });
    let ids = crate::otel::TraceIds::default();
    use tracing_subscriber::fmt::layer;
    let reg = tracing_subscriber::registry().with(otel).with(ids.clone());
    if json {
        let json_format = || {
            crate::otel::JsonWithTrace::new(
                tracing_subscriber::fmt::format().with_target(false).json(),
                ids.clone(),
            )
        };
        let file_layer = file.map(|f| {
            layer()
                .json()
                .event_format(json_format())
                .with_writer(Mutex::new(f))
                .with_filter(filter())
        });
        tracing::Dispatch::new(
            reg.with(
                layer()
                    .json()
                    .event_format(json_format())
                    .with_writer(std::io::stderr)
                    .with_filter(filter()),
            )
            .with(file_layer),
        )
    } else {
        let file_layer = file.map(|f| {
            layer()
                .with_target(false)
                .with_ansi(false)
                .with_writer(Mutex::new(f))
                .with_filter(filter())
        });
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing::Dispatch::new(
            reg.with(
                layer()
                    .with_target(false)
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr)
                    .with_filter(filter()),
            )
            .with(file_layer),
        )
    }
}

/// `context`: one-context's job for these appliances ([`super::onecontext`]).
fn contextualize(paths: &Paths, from: Option<&Path>, wait: u64) -> ExitCode {
    use super::onecontext;
    let read = match from {
        Some(dir) => onecontext::read_dir(dir),
        None => onecontext::read_cd(paths, Duration::from_secs(wait)),
    };
    let (vars, mut warnings) = match read {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flower-agent context: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The kernel's host name only on a real guest (`--root /`), never in a test root.
    let real_root = paths.root() == Path::new("/");
    match onecontext::apply(paths, &vars, real_root) {
        Ok(w) => warnings.extend(w),
        Err(e) => {
            eprintln!("flower-agent context: {e}");
            return ExitCode::FAILURE;
        }
    }
    for w in &warnings {
        eprintln!("flower-agent context: skipped {w}");
    }
    eprintln!("flower-agent context: {} variables exported", vars.len());
    ExitCode::SUCCESS
}

async fn real_main(cli: Cli) -> ExitCode {
    let code = agent_main(cli).await;
    // Spans still batched leave before the process does.
    let _ = tokio::task::spawn_blocking(super::trace::shutdown).await;
    code
}

async fn agent_main(cli: Cli) -> ExitCode {
    let started = std::time::SystemTime::now();
    let paths = Paths::new(&cli.root);
    if let Command::Context { from, wait } = &cli.command {
        return contextualize(&paths, from.as_deref(), *wait);
    }
    let (mut ctx, warnings) = match Context::load(&cli.context) {
        Ok(c) => c,
        Err(e) if matches!(cli.command, Command::Install { .. }) => {
            let _ = e;
            (Context::default(), Vec::new())
        }
        Err(e) => {
            eprintln!("flower-agent: cannot read the context: {e}");
            return ExitCode::from(2);
        }
    };
    if let Ok(rt) = fs::read_to_string(paths.image_runtime()) {
        ctx.set_default(crate::protocol::context::RUNTIME, rt.trim());
    }
    let logs_to_file = !matches!(cli.command, Command::Health | Command::Status { .. });
    // Until the role is known (it names the agent's spans' service) the agent logs
    // through a subscriber of this thread; then through the process's, with the spans.
    let early =
        tracing::dispatcher::set_default(&subscriber(&cli, &ctx, &paths, logs_to_file, None));
    let (trace_settings, trace_warnings) = super::trace::Settings::from_context(&ctx);
    for w in warnings.into_iter().chain(trace_warnings) {
        tracing::warn!("{w}");
    }
    if let Command::Install {
        flower_version,
        runtime,
    } = &cli.command
    {
        let Some(role) = cli.role.map(Role::from) else {
            eprintln!("flower-agent install: --role superlink|supernode is required");
            return ExitCode::from(2);
        };
        return match install(&paths, role, flower_version, runtime.as_str()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("install failed: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut cfg = match Config::from_context(&ctx) {
        Ok(c) => c,
        Err(errors) => {
            tracing::error!("{}", errors.to_string().trim_end());
            eprintln!("flower-agent: {}", errors.to_string().trim_end());
            if let Ok(gate) = OneGateConfig::from_lookup(|k| ctx.get(k).map(String::from))
                .and_then(OneGateClient::new)
            {
                let line = node::error_line(&format!(
                    "invalid context: {}",
                    errors.0.first().map(|e| e.to_string()).unwrap_or_default()
                ));
                let _ = gate
                    .update_vm(&[(crate::protocol::FL_ERROR, line.as_str())])
                    .await;
            }
            return ExitCode::from(2);
        }
    };
    cfg.settle_version(fs::read_to_string(paths.prebaked_version()).ok().as_deref());
    for w in &cfg.warnings {
        tracing::warn!("context: {w}");
    }
    let gate = build_gate(&cfg);
    let role = match resolve_role(cli.role.map(Role::from), &paths, &cfg, &gate).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flower-agent: {e}");
            return ExitCode::from(2);
        }
    };
    drop(early);
    let tracing_on = matches!(
        cli.command,
        Command::Configure | Command::Bootstrap | Command::Run
    );
    let provider = match tracing_on {
        true => super::trace::init(&trace_settings, role, cfg.vmid, cfg.cluster_name.as_deref())
            .unwrap_or_else(|e| {
                eprintln!("flower-agent: spans are not exported: {e:#}");
                None
            }),
        false => None,
    };
    let _ = tracing::dispatcher::set_global_default(subscriber(
        &cli,
        &ctx,
        &paths,
        logs_to_file,
        provider.as_ref(),
    ));
    super::trace::record_context_read(started, role, ctx.vars().len());
    let context_path = cli.context.clone();
    let n = Node {
        paths,
        cfg,
        role,
        gate,
    };
    let result = match cli.command {
        Command::Install { .. } | Command::Context { .. } => Ok(()),
        Command::Configure => match n.configure().await {
            Ok(_) => Ok(()),
            Err(e) => {
                n.publish_error(&format!("configure: {e}")).await;
                Err(e)
            }
        },
        Command::Bootstrap => bootstrap(&n).await,
        Command::Health => match n.probe().await {
            Ok(()) => {
                println!("healthy");
                Ok(())
            }
            Err(e) => Err(e),
        },
        Command::Status { output } => {
            status(&n, output).await;
            Ok(())
        }
        Command::Run => run(&n, &context_path).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("flower-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn build_gate(cfg: &Config) -> AnyGate {
    let (Some(endpoint), Some(token), Some(vmid)) =
        (&cfg.onegate_endpoint, &cfg.onegate_token, cfg.vmid)
    else {
        return AnyGate::None(NoGate);
    };
    match OneGateConfig::new(endpoint.as_str(), &token.0, vmid)
        .map(|c| c.with_timeout(Duration::from_secs(10)))
        .and_then(OneGateClient::new)
    {
        Ok(c) => AnyGate::Real(c),
        Err(e) => {
            tracing::warn!(problem = %e, "OneGate not usable");
            AnyGate::None(NoGate)
        }
    }
}

async fn resolve_role(
    flag: Option<Role>,
    paths: &Paths,
    cfg: &Config,
    gate: &AnyGate,
) -> Result<Role, AgentError> {
    if let Some(r) = flag {
        return Ok(r);
    }
    if let Some(r) = fs::read_to_string(paths.role_file())
        .ok()
        .and_then(|t| Role::parse(&t))
    {
        return Ok(r);
    }
    if let Some(r) = cfg.role {
        return Ok(r);
    }
    if gate.is_configured() {
        if let Ok(vm) = gate.get_vm().await {
            if let Some(r) = vm.role_name().ok().flatten().and_then(Role::parse) {
                return Ok(r);
            }
        }
    }
    Err(AgentError::UnknownRole {
        var: crate::protocol::context::ROLE,
    })
}

/// `install`: the /opt/flower tree, role and prebaked version, the agent unit.
pub fn install(paths: &Paths, role: Role, version: &str, runtime: &str) -> Result<(), AgentError> {
    if let Err(e) = crate::protocol::version::FlowerVersion::parse(version) {
        return Err(AgentError::BadVersion(e));
    }
    for (dir, mode) in [
        (paths.base(), 0o755),
        (paths.at("/opt/flower/scripts"), 0o755),
        (paths.config_dir(), 0o750),
        (paths.at("/opt/flower/ca"), 0o700),
        (paths.at("/opt/flower/data"), 0o755),
        (paths.log_dir(), 0o755),
    ] {
        fs::create_dir_all(&dir).map_err(IoError::at(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).map_err(IoError::at(&dir))?;
    }
    // Flower (UID/GID 49999 in both runtimes) writes its state and FLWR_HOME and reads the
    // served certificates, never the CA key (#17 item 5).
    for d in [paths.state_dir(), paths.flwr_home()] {
        privilege::give_to_flower(&d)?;
    }
    privilege::share_with_flower(&paths.certs_dir())?;
    tls::write_file(&paths.role_file(), format!("{role}\n").as_bytes(), 0o644)?;
    tls::write_file(
        &paths.prebaked_version(),
        format!("{version}\n").as_bytes(),
        0o644,
    )?;
    tls::write_file(
        &paths.image_runtime(),
        format!("{runtime}\n").as_bytes(),
        0o644,
    )?;
    let bin = paths.at("/usr/local/bin/flower-agent");
    if let Ok(me) = std::env::current_exe() {
        if me != bin {
            let dir = bin.parent().unwrap_or(Path::new("/"));
            fs::create_dir_all(dir).map_err(IoError::at(dir))?;
            fs::copy(&me, &bin).map_err(IoError::at(&bin))?;
            fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))
                .map_err(IoError::at(&bin))?;
        }
    }
    let unit = flower::agent_unit(Path::new("/usr/local/bin/flower-agent"), role)?;
    tls::write_file(
        &paths.units_dir().join("flower-agent.service"),
        unit.as_bytes(),
        0o644,
    )?;
    let unit = flower::context_unit(Path::new("/usr/local/bin/flower-agent"))?;
    tls::write_file(
        &paths.units_dir().join("flower-agent-context.service"),
        unit.as_bytes(),
        0o644,
    )?;
    tracing::info!(%role, version, runtime, "installed");
    Ok(())
}

async fn wait_healthy<G: Gate>(n: &Node<G>, timeout: Duration) -> Result<(), AgentError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match n.probe().await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(AgentError::NotHealthy {
                    within: humantime::format_duration(timeout).to_string(),
                    last: Box::new(e),
                })
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    }
}

/// `bootstrap`: start Flower through systemd, wait until it serves, publish, READY.
async fn bootstrap<G: Gate>(n: &Node<G>) -> Result<(), AgentError> {
    let mut st = match AgentState::load(&n.paths)? {
        Some(st) if st.configured_at.is_some() => st,
        _ => n.configure().await?,
    };
    if n.cfg.runtime == Runtime::Process && n.paths.root() != Path::new("/") {
        return Err(AgentError::ProcessUnderRoot);
    }
    let unit = match n.cfg.runtime {
        Runtime::Docker => format!("{}.service", flower::unit_name(n.role)),
        Runtime::Process => "flower-agent.service".to_string(),
    };
    node::system(&n.paths, &["systemctl", "daemon-reload"])?;
    node::system(&n.paths, &["systemctl", "enable", "--now", &unit])?;
    if let Err(e) = wait_healthy(n, Duration::from_secs(120)).await {
        n.publish_error(&e.to_string()).await;
        return Err(e);
    }
    if let Err(e) = n.publish_ready(&st).await {
        tracing::warn!(problem = %e, "cannot publish through OneGate (SuperNodes need a static address)");
    }
    if n.cfg.runtime == Runtime::Docker {
        node::system(
            &n.paths,
            &["systemctl", "enable", "--now", "flower-agent.service"],
        )?;
    }
    st.bootstrapped_at = Some(node::now_rfc3339());
    st.save(&n.paths)
}

/// Whether `run` must (re)configure: no state yet, or the context is newer than it.
fn needs_configure(paths: &Paths, context: Option<&Path>) -> bool {
    let Ok(Some(st)) = AgentState::load(paths) else {
        return true;
    };
    if st.configured_at.is_none() {
        return true;
    }
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    match (context.and_then(mtime), mtime(&paths.agent_state())) {
        (Some(c), Some(s)) => c > s,
        _ => false,
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// `run`: configure when needed (retrying until it works), then supervise.
async fn run<G: Gate>(n: &Node<G>, context_path: &Path) -> Result<(), AgentError> {
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut attempt = 0u32;
    let st = loop {
        if !needs_configure(&n.paths, Some(context_path)) {
            if let Ok(Some(st)) = AgentState::load(&n.paths) {
                break st;
            }
        }
        let result = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = n.configure() => r,
        };
        match result {
            Ok(st) => break st,
            Err(e) => {
                attempt += 1;
                tracing::error!(attempt, "configure failed: {e}");
                n.publish_error(&format!("configure: {e}")).await;
                let wait = supervisor::restart_backoff(attempt);
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    };
    supervisor::run(n, st, RunOptions::default(), shutdown).await
}

async fn status<G: Gate>(n: &Node<G>, output: OutputArg) {
    let st = AgentState::load(&n.paths)
        .ok()
        .flatten()
        .unwrap_or_default();
    let run: Option<RunStatus> = fs::read_to_string(n.paths.run_dir().join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let health = n.probe().await;
    let cert = fs::read_to_string(n.server_cert())
        .ok()
        .and_then(|p| tls::inspect(&p).ok());
    let doc = serde_json::json!({
        "role": n.role.as_str(),
        "runtime": n.cfg.runtime,
        "version": n.cfg.version,
        "tls": n.cfg.tls,
        "healthy": health.is_ok(),
        "health": health.as_ref().err().map(ToString::to_string),
        "configured_at": st.configured_at,
        "bootstrapped_at": st.bootstrapped_at,
        "endpoint": (n.role == Role::Superlink).then(|| n.endpoint()),
        "superlink": st.node.superlink.as_ref().map(|s| s.to_string()),
        "node_config": st.node.node_config.as_ref().map(|c| c.as_context()),
        "partition_computed": st.partition_computed,
        "gpu": st.gpu,
        "cert_not_after": cert.map(|c| c.not_after.to_rfc3339()),
        "rotate_done": st.rotate_done,
        "run_config": (n.role == Role::Superlink).then(|| n.run_config()),
        "warnings": n.cfg.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "supervisor": run,
    });
    if output == OutputArg::Json {
        println!("{doc}");
        return;
    }
    if let Some(map) = doc.as_object() {
        for (k, v) in map {
            match v {
                serde_json::Value::Null => {}
                serde_json::Value::String(s) => println!("{k:18} {s}"),
                other => println!("{k:18} {other}"),
            }
        }
    }
}
