//! onesim: a faithful OpenNebula simulator (oned XML-RPC, OneFlow, OneGate) that boots VMs
//! as real processes, with fault injection.
//!
//! It shares no code with the `flower-reconcile` clients: its serialisation is written
//! from the reference independently, so a misunderstanding cannot cancel itself out.
//!
//! Start it in-process with [`start`]; the `onesim` binary wraps the same function.
#![forbid(unsafe_code)]

pub mod control;
pub mod elastic;
pub mod flow;
pub mod gate;
pub mod guest;
pub mod image;
pub mod lease;
pub mod machine;
pub mod oned;
pub mod render;
pub mod state;
pub mod template;
pub mod xml;
pub mod xmlrpc;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State as AxState;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::guest::{GuestNic, GuestSpec, Guests};
use crate::state::{Effect, State};
use crate::template::vec_get;
use crate::xmlrpc::Resp;

/// The version `one.system.version` reports.
pub const ONE_VERSION: &str = "7.4.0";

/// Request bodies above this size are refused on every API.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
pub enum Runtime {
    /// Nothing runs; `auto_ready` sets USER_TEMPLATE READY=YES that long after RUNNING.
    None { auto_ready: Option<Duration> },
    /// Each running VM is a process group started from `guest_cmd` (argv; placeholders
    /// `{vm_dir}`, `{context}`, `{vmid}`, `{ip}`), its files under `base_dir/vm-<id>/`.
    Process {
        guest_cmd: Vec<String>,
        base_dir: PathBuf,
    },
    /// Each running VM boots its first disk's image as a `systemd-nspawn --boot` machine
    /// ([`machine`]; root only), its files under `base_dir/vm-<id>/`, raw copies of the
    /// images in `cache_dir`. OneGate also listens on every address of the host (the
    /// bridges' gateways), like an `onegate-server.conf` with `:host: 0.0.0.0`.
    Image {
        base_dir: PathBuf,
        cache_dir: PathBuf,
    },
}

impl Runtime {
    /// Where the image runtime keeps raw copies of images unless told otherwise.
    pub fn default_image_cache() -> PathBuf {
        PathBuf::from("/var/tmp/onesim-images")
    }
}

#[derive(Debug, Clone)]
pub struct Timings {
    /// Duration of each transient VM state (PROLOG, BOOT, SHUTDOWN, EPILOG, …).
    pub vm_step: Duration,
    /// How often the OneFlow engine re-evaluates services.
    pub flow_interval: Duration,
    /// Role cooldown when the role does not set one (OneFlow's `default_cooldown`).
    pub default_cooldown: Duration,
    /// Time between SIGTERM and SIGKILL when a guest is stopped.
    pub kill_grace: Duration,
    /// How often OneFlow's autoscaler evaluates elasticity and scheduled policies
    /// (`oneflow-server.conf` `:autoscaler_interval:`, default 90 s).
    pub autoscaler_interval: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            vm_step: Duration::from_millis(500),
            flow_interval: Duration::from_millis(500),
            default_cooldown: Duration::from_secs(300),
            kill_grace: Duration::from_secs(5),
            autoscaler_interval: Duration::from_secs(90),
        }
    }
}

impl Timings {
    /// Fast timings for tests.
    pub fn fast() -> Self {
        Timings {
            vm_step: Duration::from_millis(50),
            flow_interval: Duration::from_millis(50),
            default_cooldown: Duration::from_millis(500),
            kill_grace: Duration::from_millis(500),
            autoscaler_interval: Duration::from_secs(90),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Ports {
    pub xmlrpc: u16,
    pub oneflow: u16,
    pub onegate: u16,
    pub control: u16,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bind: IpAddr,
    /// 0 picks a free port.
    pub ports: Ports,
    /// The oneadmin credentials (user, password).
    pub auth: (String, String),
    pub runtime: Runtime,
    pub timings: Timings,
    /// JSON file the state is persisted to and restored from.
    pub state_file: Option<PathBuf>,
    /// Seed of the fault rules' probability draws (random when `None`): the same seed and
    /// the same sequence of calls give the same faults.
    pub fault_seed: Option<u64>,
    /// OneGate's `onegate-server.conf` settings that matter to a guest.
    pub onegate: GateConfig,
    /// Where image copies go (`<dir>/1/<hex>`); `None`: `<base_dir>/datastores` for the
    /// process runtime, `<state_file>.datastores` with a state file, else a temporary
    /// directory removed when the simulator stops.
    pub datastore_dir: Option<PathBuf>,
}

/// The parts of `onegate-server.conf` onesim honours (OneGate 7.x `onegate-server.rb`:
/// `check_permissions` and `check_restricted_attrs`).
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// `:permissions: :vm: :update_by_id:` (default true): `PUT /vms/:id`.
    pub update_by_id: bool,
    /// `:restricted_attrs:` (default `SCHED_REQUIREMENTS`, `SERVICE_ID`, `ROLE_NAME`):
    /// attributes `PUT /vm` and `PUT /vms/:id` refuse to modify or delete.
    pub restricted_attrs: Vec<String>,
    /// oned.conf's `ONEGATE_ENDPOINT`: the URL written into a TOKEN=YES guest's context
    /// (OpenNebula `VirtualMachine::generate_token_context` copies it verbatim). `None`:
    /// onesim's own OneGate URL. A guest behind NAT (a QEMU boot test) needs another.
    pub advertised_endpoint: Option<String>,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            update_by_id: true,
            restricted_attrs: ["SCHED_REQUIREMENTS", "SERVICE_ID", "ROLE_NAME"]
                .map(String::from)
                .to_vec(),
            advertised_endpoint: None,
        }
    }
}

impl Config {
    /// Loopback, free ports, `none` runtime, fast timings.
    pub fn for_tests(password: &str) -> Config {
        Config {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ports: Ports::default(),
            auth: ("oneadmin".into(), password.into()),
            runtime: Runtime::None { auto_ready: None },
            timings: Timings::fast(),
            state_file: None,
            fault_seed: None,
            onegate: GateConfig::default(),
            datastore_dir: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Urls {
    pub xmlrpc: String,
    pub oneflow: String,
    pub onegate: String,
    pub control: String,
}

/// Finished image copies: (image id, result).
type CopyResults = Arc<Mutex<Vec<(i64, Result<(), String>)>>>;

/// Shared simulator state behind every listener.
pub struct Sim {
    pub st: Mutex<State>,
    pub cfg: Config,
    pub faults: Mutex<control::Faults>,
    pub events: Mutex<control::Events>,
    /// Every authenticated request served, by `fault` target (`one.vm.info`,
    /// `oneflow GET /service`, `onegate GET /vm`): what a client really cost.
    pub requests: Mutex<std::collections::BTreeMap<String, u64>>,
    pub guests: Option<Guests>,
    /// The image runtime's machines.
    pub machines: Option<machine::Machines>,
    pub urls: Urls,
    /// Image copies that ended: (image id, result), drained by the engine.
    copies: CopyResults,
    /// The datastore directory when onesim made a temporary one (removed on drop).
    temp_datastore: Option<PathBuf>,
    /// The oned, OneFlow and OneGate listeners, each closable (see [`Sim::api_down`]).
    slots: [Slot; 3],
    /// Holds this simulator's loopback net for its lifetime ([`reserve_loopback_net`]).
    _net_lock: std::net::TcpListener,
    shutdown_rx: watch::Receiver<bool>,
}

/// The front-end APIs whose listeners can be closed and reopened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    XmlRpc = 0,
    OneFlow = 1,
    OneGate = 2,
}

impl Api {
    pub const ALL: [Api; 3] = [Api::XmlRpc, Api::OneFlow, Api::OneGate];
}

/// A listener's address and, while open, its stop switch and task.
struct Slot {
    addr: SocketAddr,
    running: Mutex<Option<(watch::Sender<bool>, JoinHandle<()>)>>,
}

impl Sim {
    /// Runs `f` under the state lock, then applies the guest effects it queued.
    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (r, work) = {
            let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
            let r = f(&mut st);
            let effects = std::mem::take(&mut st.effects);
            let work: Vec<(Effect, Option<GuestSpec>, bool)> = effects
                .into_iter()
                .map(|e| {
                    let (spec, done) = match e {
                        Effect::Start(id) | Effect::Restart(id) | Effect::Reboot { id, .. } => {
                            (guest_spec(&st, id), false)
                        }
                        // A DONE VM's disk goes with it (oned's EPILOG deletes it).
                        Effect::Stop(id) => (
                            None,
                            st.vms.get(&id).is_none_or(|v| v.state == state::S_DONE),
                        ),
                        _ => (None, false),
                    };
                    (e, spec, done)
                })
                .collect();
            (r, work)
        };
        for (e, spec, done) in work {
            let restart = matches!(e, Effect::Restart(_));
            match (e, spec, &self.guests, &self.machines) {
                (Effect::Reboot { id, hard }, Some(spec), _, Some(m)) => {
                    match machine::MachineSpec::from_guest(&spec) {
                        Ok(ms) => m.reboot(ms, hard),
                        Err(msg) => m.fail(id, msg),
                    }
                }
                (Effect::Kill(id), _, Some(g), _) => {
                    g.crash(id);
                }
                (Effect::Kill(id), _, _, Some(m)) => m.kill(id),
                (Effect::CopyImage { id, from, to }, ..) => self.spawn_copy(id, from, to),
                (Effect::RemoveFile(path), ..) => {
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!("removing image file {}: {e}", path.display());
                    }
                }
                // A process guest restarts or reboots by starting again.
                (
                    Effect::Start(_) | Effect::Restart(_) | Effect::Reboot { .. },
                    Some(spec),
                    Some(g),
                    _,
                ) => {
                    if let Err(msg) = g.start(&spec) {
                        tracing::warn!(vm = spec.id, "guest start failed: {msg}");
                    }
                }
                (Effect::Stop(id), _, Some(g), _) => g.stop(id),
                (Effect::Start(id) | Effect::Restart(id), Some(spec), _, Some(m)) => {
                    match machine::MachineSpec::from_guest(&spec) {
                        Ok(ms) if restart => m.restart(ms),
                        Ok(ms) => m.start(ms),
                        Err(msg) => m.fail(id, msg),
                    }
                }
                (Effect::Stop(id), _, _, Some(m)) => m.stop(id, done),
                _ => {}
            }
        }
        r
    }

    /// Copies an image file into the datastore on its own thread (oned's driver runs
    /// asynchronously: allocate has returned); the engine hands the result to
    /// [`State::image_copied`].
    fn spawn_copy(&self, id: i64, from: PathBuf, to: PathBuf) {
        let done = self.copies.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("onesim-image-{id}"))
            .spawn(move || {
                let r = image::copy_image(&from, &to);
                done.lock().unwrap_or_else(|e| e.into_inner()).push((id, r));
            });
        if let Err(e) = spawned {
            self.copies
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((id, Err(e.to_string())));
        }
    }

    /// Records a mutating call in the event log.
    /// `agent` is the caller's User-Agent, so tests can assert who mutated.
    pub fn log_event(
        &self,
        api: &str,
        call: &str,
        agent: &str,
        args: serde_json::Value,
        result: String,
    ) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(api, call, agent, args, result);
    }

    /// Counts the request (every API passes here once per request) and consults the
    /// fault rules for `target` as called by User-Agent `agent`, sleeping for any delay;
    /// returns an injected error.
    pub async fn fault(&self, target: &str, agent: &str) -> Option<control::FaultRule> {
        self.fault_from(target, None, agent).await
    }

    /// [`Sim::fault`] for a call made by VM `vm` (OneGate's `X-ONEGATE-VMID`).
    pub async fn fault_from(
        &self,
        target: &str,
        vm: Option<i64>,
        agent: &str,
    ) -> Option<control::FaultRule> {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(target.to_string())
            .or_default() += 1;
        let d = self
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check_from(target, vm, agent);
        if !d.delay.is_zero() {
            tokio::time::sleep(d.delay).await;
        }
        d.error
    }

    pub async fn onegate_down(&self) {
        self.api_down(Api::OneGate).await;
    }

    pub async fn onegate_up(self: &Arc<Self>) -> Result<(), String> {
        self.api_up(Api::OneGate).await
    }

    /// Close `api`'s listener: new connections are refused; requests in flight finish.
    pub async fn api_down(&self, api: Api) {
        let taken = self.slots[api as usize]
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((tx, task)) = taken {
            let _ = tx.send(true);
            let _ = task.await;
        }
    }

    /// Reopen `api`'s listener on the same address (no-op when open).
    pub async fn api_up(self: &Arc<Self>, api: Api) -> Result<(), String> {
        let slot = &self.slots[api as usize];
        if slot
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let l = TcpListener::bind(slot.addr)
            .await
            .map_err(|e| format!("rebinding {api:?}: {e}"))?;
        self.open(api, l);
        Ok(())
    }

    fn open(self: &Arc<Self>, api: Api, l: TcpListener) {
        let router = match api {
            Api::XmlRpc => Router::new()
                .route("/RPC2", post(rpc_handler))
                .fallback(|| async { (StatusCode::NOT_FOUND, "Not found") })
                .with_state(self.clone()),
            Api::OneFlow => flow::router(self.clone()),
            Api::OneGate => gate::router(self.clone()),
        };
        let running = serve(l, router, self.shutdown_rx.clone());
        *self.slots[api as usize]
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(running);
    }
}

fn guest_spec(st: &State, id: i64) -> Option<GuestSpec> {
    let vm = st.vms.get(&id)?;
    let context = vm.template.get_vec("CONTEXT").cloned().unwrap_or_default();
    let nics: Vec<GuestNic> = vm
        .template
        .vecs("NIC")
        .map(|nic| {
            let own = |k: &str| vec_get(nic, k).unwrap_or("").to_string();
            let mask = st.nic_inherited(nic, "NETWORK_MASK");
            GuestNic {
                nic_id: own("NIC_ID").parse().unwrap_or(-1),
                ip: own("IP"),
                mac: own("MAC"),
                bridge: own("BRIDGE"),
                gateway: st.nic_inherited(nic, "GATEWAY"),
                prefix_len: mask.as_deref().and_then(guest::mask_prefix).unwrap_or(24),
                mask,
            }
        })
        .collect();
    let disk_source = vm
        .template
        .vecs("DISK")
        .next()
        .and_then(|d| vec_get(d, "SOURCE"))
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    Some(GuestSpec {
        id,
        ip: vm.ip.clone(),
        token: vm.token.clone(),
        endpoint: st.knobs.onegate_endpoint.clone(),
        context,
        disk_source,
        nics,
    })
}

/// A running simulator. Dropping it stops the listeners and kills every guest.
pub struct Handle {
    pub sim: Arc<Sim>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Handle {
    /// The second octet of this simulator's VM addresses ([`state::vm_ip`]).
    pub fn loopback_net(&self) -> u8 {
        self.sim.with(|st| st.knobs.loopback_net)
    }

    pub fn urls(&self) -> &Urls {
        &self.sim.urls
    }

    /// Stops the listeners, persists the state, stops every guest (TERM, then KILL).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        for api in Api::ALL {
            self.sim.api_down(api).await;
        }
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        save_state(&self.sim);
        if let Some(g) = &self.sim.guests {
            let g2 = self.sim.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(g) = &g2.guests {
                    g.stop_all();
                }
            })
            .await;
            g.kill_all();
        }
        if self.sim.machines.is_some() {
            let sim = self.sim.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(Err(e)) = sim.machines.as_ref().map(|m| m.shutdown(false)) {
                    tracing::error!("image runtime shutdown: {e}");
                }
            })
            .await;
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(g) = &self.sim.guests {
            g.kill_all();
            g.close();
        }
        if let Some(d) = &self.sim.temp_datastore {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(Err(e)) = self.sim.machines.as_ref().map(|m| m.shutdown(true)) {
            tracing::error!("image runtime teardown: {e}");
        }
    }
}

fn serve(
    l: TcpListener,
    router: Router,
    mut global: watch::Receiver<bool>,
) -> (watch::Sender<bool>, JoinHandle<()>) {
    let (tx, mut rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let stop = async move {
            // A dropped local sender means "never stop locally"; a dropped global one
            // (Handle gone) means stop.
            let local = async move {
                if rx.wait_for(|v| *v).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = local => {}
                _ = global.wait_for(|v| *v) => {}
            }
        };
        if let Err(e) = axum::serve(l, router).with_graceful_shutdown(stop).await {
            tracing::warn!("listener failed: {e}");
        }
    });
    (tx, task)
}

/// Where a simulator marks its loopback net `127.<net>.0.0/16` as taken: a listener on
/// `127.<net>.0.1` (no VM gets a `127.<net>.0.x` address, [`state::vm_ip`]).
const NET_LOCK_PORT: u16 = 47_999;

/// Reserves a loopback net no other simulator on this host holds, by binding its lock
/// address (two listeners cannot share an address and port; the kernel frees it when the
/// process ends, so a crash leaves nothing behind). Without it every simulator gives VM 0
/// 127.0.1.1, and two labs on one host collide on Flower's fixed ports: the second
/// SuperLink exits "port in use" while its agent's probe reaches the first lab's
/// SuperLink (the SuperLink flapping of issue #13's follow-up; shown by
/// `tests::concurrent_simulators_get_distinct_loopback_nets`). Nets 1..=254 are tried
/// from a random start; net 0 is left to hand-written test addresses.
pub fn reserve_loopback_net() -> anyhow::Result<(u8, std::net::TcpListener)> {
    use rand::Rng as _;
    let start: u16 = rand::rng().random_range(0..254);
    for i in 0..254u16 {
        let net = (1 + (start + i) % 254) as u8;
        let lock = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, net, 0, 1)), NET_LOCK_PORT);
        if let Ok(l) = std::net::TcpListener::bind(lock) {
            return Ok((net, l));
        }
    }
    anyhow::bail!("no free loopback net: 127.1-254.0.1:{NET_LOCK_PORT} are all taken")
}

fn url(l: &TcpListener, path: &str) -> std::io::Result<String> {
    let a = l.local_addr()?;
    Ok(format!("http://{a}{path}"))
}

/// Starts every listener and the engine. Fails if a port cannot be bound or the state file
/// cannot be read.
pub async fn start(cfg: Config) -> anyhow::Result<Handle> {
    let machines = match &cfg.runtime {
        Runtime::Image {
            base_dir,
            cache_dir,
        } => {
            machine::preflight().map_err(|e| anyhow::anyhow!(e))?;
            Some(
                machine::Machines::new(machine::MachineConfig {
                    base_dir: base_dir.clone(),
                    cache_dir: cache_dir.clone(),
                    grace: cfg.timings.kill_grace,
                })
                .map_err(|e| anyhow::anyhow!(e))?,
            )
        }
        _ => None,
    };
    let bind = |p: u16| TcpListener::bind(SocketAddr::new(cfg.bind, p));
    // Image machines reach OneGate at their bridge's gateway, a host address.
    let gate_bind = match machines {
        Some(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        None => cfg.bind,
    };
    let (lx, lf, lg, lc) = (
        bind(cfg.ports.xmlrpc).await?,
        bind(cfg.ports.oneflow).await?,
        TcpListener::bind(SocketAddr::new(gate_bind, cfg.ports.onegate)).await?,
        bind(cfg.ports.control).await?,
    );
    let gate_port = lg.local_addr()?.port();
    let urls = Urls {
        xmlrpc: url(&lx, "/RPC2")?,
        oneflow: url(&lf, "")?,
        onegate: format!("http://{}", SocketAddr::new(cfg.bind, gate_port)),
        control: url(&lc, "")?,
    };
    let mut st = match &cfg.state_file {
        Some(p) if p.exists() => {
            let text =
                std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            let mut st: State =
                serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            st.after_load();
            st
        }
        _ => State::new(&cfg.auth.0, &cfg.auth.1),
    };
    if let Some(admin) = st.users.get_mut(&0) {
        admin.name = cfg.auth.0.clone();
        admin.password = cfg.auth.1.clone();
    }
    let (net, net_lock) = reserve_loopback_net()?;
    st.knobs.loopback_net = net;
    st.knobs.loopback_only = matches!(cfg.runtime, Runtime::Process { .. });
    let (datastore_dir, temp_datastore) = match (&cfg.datastore_dir, &cfg.runtime, &cfg.state_file)
    {
        (Some(d), _, _) => (d.clone(), None),
        (None, Runtime::Process { base_dir, .. } | Runtime::Image { base_dir, .. }, _) => {
            (base_dir.join("datastores"), None)
        }
        (None, _, Some(f)) => (PathBuf::from(format!("{}.datastores", f.display())), None),
        (None, _, None) => {
            let d = std::env::temp_dir()
                .join(format!("onesim-datastores-{}-{net}", std::process::id()));
            (d.clone(), Some(d))
        }
    };
    st.knobs.datastore_dir = datastore_dir;
    st.knobs.vm_step_ms = cfg.timings.vm_step.as_millis() as u64;
    st.knobs.onegate_endpoint = cfg
        .onegate
        .advertised_endpoint
        .clone()
        .unwrap_or_else(|| urls.onegate.clone());
    // Without oned.conf's ONEGATE_ENDPOINT, a machine reaches OneGate (listening on every
    // host address) at its bridge's gateway.
    st.knobs.onegate_gateway_port = match (&cfg.runtime, &cfg.onegate.advertised_endpoint) {
        (Runtime::Image { .. }, None) => Some(gate_port),
        _ => None,
    };
    st.knobs.auto_ready_ms = match &cfg.runtime {
        Runtime::None { auto_ready } => auto_ready.map(|d| d.as_millis() as u64),
        Runtime::Process { .. } | Runtime::Image { .. } => None,
    };
    let guests = match &cfg.runtime {
        Runtime::Process {
            guest_cmd,
            base_dir,
        } => {
            if guest_cmd.is_empty() {
                anyhow::bail!("the process runtime needs a guest command");
            }
            std::fs::create_dir_all(base_dir)
                .map_err(|e| anyhow::anyhow!("{}: {e}", base_dir.display()))?;
            Some(Guests::new(
                guest_cmd.clone(),
                base_dir.clone(),
                cfg.timings.kill_grace,
            ))
        }
        Runtime::None { .. } | Runtime::Image { .. } => None,
    };
    let (shutdown, shutdown_rx) = watch::channel(false);
    let slot = |l: &TcpListener| -> std::io::Result<Slot> {
        Ok(Slot {
            addr: l.local_addr()?,
            running: Mutex::new(None),
        })
    };
    let slots = [slot(&lx)?, slot(&lf)?, slot(&lg)?];
    let sim = Arc::new(Sim {
        st: Mutex::new(st),
        cfg: cfg.clone(),
        faults: Mutex::new(control::Faults::new(cfg.fault_seed)),
        events: Mutex::default(),
        requests: Mutex::default(),
        guests,
        machines,
        urls,
        copies: Arc::default(),
        temp_datastore,
        slots,
        _net_lock: net_lock,
        shutdown_rx: shutdown_rx.clone(),
    });
    // Restart guests of VMs restored as RUNNING.
    sim.with(|_| ());
    let mut tasks = Vec::new();
    sim.open(Api::XmlRpc, lx);
    sim.open(Api::OneFlow, lf);
    sim.open(Api::OneGate, lg);
    tasks.push(serve(lc, control::router(sim.clone()), shutdown_rx.clone()).1);
    tasks.push(tokio::spawn(engine(sim.clone(), shutdown_rx)));
    Ok(Handle {
        sim,
        shutdown,
        tasks,
    })
}

/// The event log's User-Agent for scales OneFlow's autoscaler made (no client did).
pub const AUTOSCALER_AGENT: &str = "oneflow-autoscaler";

/// Drives VM transitions, auto-ready, the OneFlow engine, guest reaping and persistence.
async fn engine(sim: Arc<Sim>, mut stop: watch::Receiver<bool>) {
    let t = &sim.cfg.timings;
    let tick = (t.vm_step.min(t.flow_interval) / 4)
        .clamp(Duration::from_millis(5), Duration::from_millis(100));
    let mut last_flow = tokio::time::Instant::now();
    let mut last_save = tokio::time::Instant::now();
    // OneFlow's autoscaler loop evaluates, then sleeps `autoscaler_interval`; onesim's
    // first pass comes one interval after start (services rarely exist at start).
    let mut last_autoscale = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.wait_for(|v| *v) => break,
        }
        let run_flow = last_flow.elapsed() >= t.flow_interval;
        if run_flow {
            last_flow = tokio::time::Instant::now();
        }
        let autoscale = last_autoscale.elapsed() >= t.autoscaler_interval;
        if autoscale {
            last_autoscale = tokio::time::Instant::now();
        }
        let cooldown = t.default_cooldown;
        let mut scaled = Vec::new();
        let copied = std::mem::take(&mut *sim.copies.lock().unwrap_or_else(|e| e.into_inner()));
        sim.with(|st| {
            for (id, r) in copied {
                st.image_copied(id, r);
            }
            st.tick();
            if run_flow {
                flow::step(st, cooldown);
            }
            if autoscale {
                scaled = flow::autoscale(st, cooldown);
            }
        });
        for (sid, role, card, result) in scaled {
            tracing::info!(service = sid, role, card, "autoscaler: {result}");
            sim.log_event(
                "oneflow",
                &format!("AUTOSCALE /service/{sid}/scale"),
                AUTOSCALER_AGENT,
                serde_json::json!({"role_name": role, "cardinality": card}),
                result,
            );
        }
        if let Some(g) = &sim.guests {
            for (id, status) in g.reap() {
                tracing::info!(vm = id, "guest exited: {status}");
            }
        }
        if let Some(m) = &sim.machines {
            note_ready_machines(&sim, m);
        }
        if last_save.elapsed() >= Duration::from_millis(500) {
            last_save = tokio::time::Instant::now();
            save_state(&sim);
        }
    }
}

/// Boot → READY and memory of each machine whose VM just reported READY=YES (or FL_READY)
/// through OneGate.
fn note_ready_machines(sim: &Sim, m: &machine::Machines) {
    let waiting = m.awaiting_ready();
    if waiting.is_empty() {
        return;
    }
    let ready: Vec<i64> = {
        let st = sim.st.lock().unwrap_or_else(|e| e.into_inner());
        waiting
            .into_iter()
            .filter(|id| {
                st.vms.get(id).is_some_and(|v| {
                    ["READY", "FL_READY"].iter().any(|k| {
                        v.user_template
                            .get(k)
                            .is_some_and(|x| x.eq_ignore_ascii_case("YES"))
                    })
                })
            })
            .collect()
    };
    for id in ready {
        m.note_ready(id);
    }
}

/// Writes the state file (atomically) if anything changed since the last save.
fn save_state(sim: &Sim) {
    let Some(path) = &sim.cfg.state_file else {
        return;
    };
    let text = {
        let mut st = sim.st.lock().unwrap_or_else(|e| e.into_inner());
        if !st.dirty {
            return;
        }
        st.dirty = false;
        match serde_json::to_string(&*st) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("serialising state: {e}");
                return;
            }
        }
    };
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)) {
        tracing::warn!("writing {}: {e}", path.display());
    }
}

/// Run a request's work as its own task, so that it completes even when the client
/// disconnects (hyper drops the handler future then). `None` if the task panicked.
pub(crate) async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    tokio::spawn(work).await.ok()
}

fn xml_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The caller's User-Agent, as the event log and fault rules see it (bounded, printable).
pub(crate) fn user_agent(headers: &axum::http::HeaderMap) -> String {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(256)
        .collect()
}

async fn rpc_handler(
    AxState(sim): AxState<Arc<Sim>>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let agent = user_agent(&headers);
    let fault = |status, code, msg: String| {
        xml_response(status, xmlrpc::render(&Resp::Fault { code, msg }))
    };
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return fault(
                StatusCode::PAYLOAD_TOO_LARGE,
                xmlrpc::FAULT_LIMIT,
                "XML-RPC request too large".into(),
            );
        }
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return fault(
            StatusCode::OK,
            -510,
            "Invalid UTF-8 in XML-RPC request".into(),
        );
    };
    let call = match xmlrpc::parse_call(text) {
        Ok(c) => c,
        Err(e) => {
            return fault(
                StatusCode::OK,
                xmlrpc::FAULT_PARSE,
                format!("XML-RPC parse error: {e}"),
            )
        }
    };
    // Like oned, finish the call even if the client hung up (e.g. timed out during an
    // injected delay): a lost answer must not mean a lost mutation.
    let resp = detached(async move {
        let pre = {
            let st = sim.st.lock().unwrap_or_else(|e| e.into_inner());
            oned::precheck(&st, &call.method, &call.params)
        };
        let resp = match pre {
            Err(r) => r,
            Ok(uid) => match sim.fault(&call.method, &agent).await {
                Some(rule) => Resp::Err {
                    msg: format!(
                        "[{}] {}",
                        call.method,
                        rule.message.unwrap_or_else(|| "Injected fault".into())
                    ),
                    code: rule.code.unwrap_or(state::INTERNAL),
                    resp_id: -1,
                },
                None => sim.with(|st| oned::dispatch(st, &call.method, &call.params, uid)),
            },
        };
        if oned::is_mutating(&call.method) && oned::arity(&call.method).is_some() {
            let result = match &resp {
                Resp::Ok(_) => "ok".to_string(),
                Resp::Err { msg, .. } => msg.clone(),
                Resp::Fault { msg, .. } => format!("fault: {msg}"),
            };
            sim.log_event(
                "xmlrpc",
                &call.method,
                &agent,
                oned::log_args(&call.method, &call.params),
                result,
            );
        }
        resp
    })
    .await;
    let Some(resp) = resp else {
        return fault(
            StatusCode::INTERNAL_SERVER_ERROR,
            state::INTERNAL,
            "internal error".into(),
        );
    };
    xml_response(StatusCode::OK, xmlrpc::render(&resp))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a runtime boots from: the first disk's SOURCE and each NIC's lease, bridge,
    /// gateway and mask, inherited NIC → AR → vnet as oned does.
    #[test]
    fn guest_spec_carries_disk_and_nic_network() {
        let mut st = State::new("oneadmin", "pw");
        st.alloc_vnet(
            "NAME=n\nVN_MAD=bridge\nBRIDGE=onebr0\nGATEWAY=10.9.0.1\nNETWORK_MASK=255.255.0.0\n\
             AR=[TYPE=IP4,IP=10.9.0.10,SIZE=5,GATEWAY=10.9.0.254]",
            0,
        )
        .unwrap();
        let t = st
            .alloc_template(
                "NAME=t\nMEMORY=64\nNIC=[NETWORK_ID=0]\nDISK=[SOURCE=\"/ds/1/abc\"]\nDISK=[SOURCE=\"/ds/1/def\"]",
                0,
            )
            .unwrap();
        let id = st.instantiate(t, "", false, "", 0).unwrap();
        let spec = guest_spec(&st, id).unwrap();
        assert_eq!(spec.disk_source, Some(PathBuf::from("/ds/1/abc")));
        assert_eq!(spec.nics.len(), 1);
        let nic = &spec.nics[0];
        assert_eq!(nic.nic_id, 0);
        assert_eq!(nic.ip, spec.ip);
        assert_eq!(nic.bridge, "onebr0");
        assert_eq!(nic.gateway.as_deref(), Some("10.9.0.254"), "the AR's wins");
        assert_eq!(nic.mask.as_deref(), Some("255.255.0.0"));
        assert_eq!(nic.prefix_len, 16);
        assert!(nic.mac.starts_with("02:00:"), "{}", nic.mac);
    }

    #[test]
    fn mask_prefixes() {
        assert_eq!(guest::mask_prefix("255.255.255.0"), Some(24));
        assert_eq!(guest::mask_prefix("255.0.0.0"), Some(8));
        assert_eq!(guest::mask_prefix("0.0.0.0"), Some(0));
        assert_eq!(guest::mask_prefix("255.255.255.255"), Some(32));
        assert_eq!(guest::mask_prefix("255.0.255.0"), None);
        assert_eq!(guest::mask_prefix("24"), None);
    }
}
