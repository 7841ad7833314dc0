//! `flower-agent run`: the node-level reconciler. Keeps Flower up, detects the half-dead
//! SuperNode, publishes `FL_HEARTBEAT` (with Flower's own view for the controller's
//! corroboration: a SuperNode's `FL_FLOWER_NODE_ID`, the SuperLink's `FL_NODES_ONLINE`),
//! renews and rotates the server certificate, and follows SuperLink endpoint and CA changes.

use std::future::Future;
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::context::{LogFormat, Role, Runtime, TlsMode};
use super::discovery;
use super::error::IoError;
use super::flower;
use super::gate::Gate;
use super::linkstate;
use super::metrics::{self, AgentMetrics};
use super::node::{self, AgentError, AgentState, Node};
use super::process::{self, FlowerProcess, Registration};
use super::tls;
use crate::protocol;
use crate::protocol::activity::{self, ClientStatus};
use crate::protocol::nodes::NodesOnline;
use tokio::sync::watch;

/// Timing of the supervisor.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Loop period.
    pub tick: Duration,
    /// SIGTERM → SIGKILL grace when stopping Flower.
    pub grace: Duration,
    /// Time Flower has to become healthy after a start.
    pub start_timeout: Duration,
    /// Period of `GET /vm` (controller requests) and SuperLink re-discovery.
    pub watch_interval: Duration,
    /// Consecutive failed health checks before a restart.
    pub fail_threshold: u32,
    /// Period of the certificate renewal check.
    pub renew_check: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(500),
            grace: Duration::from_secs(15),
            start_timeout: Duration::from_secs(120),
            watch_interval: Duration::from_secs(5),
            fail_threshold: 6,
            renew_check: Duration::from_secs(300),
        }
    }
}

/// Where Flower is in its life, as the supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not running; start it now.
    Down,
    /// Waiting before the next start (after a failure).
    Backoff {
        /// When to start again.
        until: Instant,
    },
    /// Started, not healthy yet.
    Starting {
        /// Start time.
        since: Instant,
    },
    /// Healthy.
    Serving {
        /// Since when.
        since: Instant,
    },
}

impl Phase {
    /// Every phase's name, in the order of the variants (status output, metrics).
    pub const NAMES: [&'static str; 4] = ["down", "backoff", "starting", "serving"];

    /// Short name for status output.
    pub fn name(&self) -> &'static str {
        Self::NAMES[match self {
            Phase::Down => 0,
            Phase::Backoff { .. } => 1,
            Phase::Starting { .. } => 2,
            Phase::Serving { .. } => 3,
        }]
    }
}

/// Delay before restart number `n` (1-based): 1 s doubling to 30 s.
pub fn restart_backoff(n: u32) -> Duration {
    Duration::from_secs((1u64 << n.saturating_sub(1).min(5)).min(30))
}

/// The wait before restart `n`: [`restart_backoff`], at most 5 s when Flower refused the
/// SuperNode's key (the SuperLink's agent registers keys every 5 s).
pub fn restart_wait(n: u32, key_refused: bool) -> Duration {
    match key_refused {
        true => restart_backoff(n).min(Duration::from_secs(5)),
        false => restart_backoff(n),
    }
}

/// How Flower is run: a child process, or a systemd unit (docker).
enum Handle {
    Process(Option<Box<FlowerProcess>>),
    Docker { started: Instant },
}

impl Handle {
    async fn start<G: Gate>(&mut self, n: &Node<G>, st: &AgentState) -> Result<(), AgentError> {
        match self {
            Handle::Process(p) => {
                *p = Some(Box::new(FlowerProcess::spawn(
                    &n.cfg, n.role, &st.node, &n.paths,
                )?));
                Ok(())
            }
            Handle::Docker { started } => {
                *started = Instant::now();
                node::system(
                    &n.paths,
                    &[
                        "systemctl",
                        "restart",
                        &format!("{}.service", flower::unit_name(n.role)),
                    ],
                )
            }
        }
    }

    async fn stop(&mut self, grace: Duration) {
        if let Handle::Process(p) = self {
            if let Some(proc_) = p.take() {
                let status = proc_.stop(grace).await;
                tracing::info!(?status, "Flower stopped");
            }
        }
    }

    fn exited(&mut self) -> Option<String> {
        match self {
            Handle::Process(Some(p)) => p.try_exited().map(|s| s.to_string()),
            Handle::Process(None) => Some("not running".into()),
            Handle::Docker { .. } => None,
        }
    }

    fn log(&self, role: Role) -> String {
        match self {
            Handle::Process(Some(p)) => p.log_since_start(256 * 1024),
            Handle::Process(None) => String::new(),
            Handle::Docker { .. } => {
                let out = std::process::Command::new("docker")
                    .args(["logs", "--tail", "2000", &flower::unit_name(role)])
                    .output();
                out.map(|o| {
                    format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                })
                .unwrap_or_default()
            }
        }
    }
}

/// Health verdict of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    Up,
    NotYet(String),
    Broken(String),
}

/// Status file content (read by `flower-agent status`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunStatus {
    /// Phase name.
    pub phase: String,
    /// Flower pid (process runtime).
    pub pid: Option<i32>,
    /// Restarts since the supervisor started.
    pub restarts: u32,
    /// Last problem seen.
    pub last_error: Option<String>,
    /// Last heartbeat published.
    pub last_heartbeat: Option<String>,
    /// Written at.
    pub updated: String,
}

struct Supervisor<'a, G: Gate> {
    n: &'a Node<G>,
    st: AgentState,
    opts: RunOptions,
    handle: Handle,
    phase: Phase,
    restarts: u32,
    failures: u32,
    ready_published: bool,
    pending_rotate_done: Option<u64>,
    /// The last unsigned rotation generation warned about (one warning per generation).
    ignored_rotation: Option<u64>,
    /// SuperNode: the last SuperLink CA change refused (by digest; one warning each).
    ignored_ca: Option<String>,
    /// SuperNode: the last SuperLink discovery problem logged (one warning each).
    watch_problem: Option<String>,
    /// The `flower start` span, open from the first start until Flower is first healthy
    /// ([`super::trace`]); `Some(None)` once closed.
    start_span: Option<Option<tracing::Span>>,
    last_error: Option<String>,
    last_heartbeat: Option<String>,
    /// SuperNode: registration as last read from Flower's log; kept across reads, since
    /// the bounded tail read loses the `SuperNode ID` line of a long-running node. Its id
    /// is the `FL_FLOWER_NODE_ID` published with each heartbeat.
    registration: Registration,
    /// SuperLink: the last problem reading Flower's node state (one warning each).
    nodes_problem: Option<String>,
    /// SuperLink: the last problem syncing the SuperNode keys (one warning each).
    keys_problem: Option<String>,
    /// Why `FL_SITE_NODE_KEYS` was last ignored (logged once per reason).
    ignored_site_keys: Option<&'static str>,
    next_heartbeat: Instant,
    next_watch: Instant,
    next_renew: Instant,
    /// The metrics endpoint's view, when metrics are on.
    metrics: Option<AgentMetrics>,
    /// SuperLink: the training activity the state reader last saw (`None` until read).
    activity: Option<metrics::ActivityRx>,
    /// SuperNode: the last message its log showed, and when it was last seen in hand.
    last_message: Option<process::LastMessage>,
    last_busy: Option<Instant>,
    /// The elasticity metrics as last published (published again only when changed).
    published: Vec<(&'static str, String)>,
}

/// How long a SuperNode stays `FL_CLIENT_STATUS` 2 (training) after its last message's
/// reply: the gap between a run's messages (the SuperLink aggregating, the SuperNode's
/// pull interval) is no idleness, and a status flapping within a round would cost a
/// OneGate PUT per message and make a role's average jitter.
pub const CLIENT_IDLE_GRACE: Duration = Duration::from_secs(10);

/// Runs the supervisor until `shutdown` resolves, then stops Flower.
pub async fn run<G: Gate>(
    n: &Node<G>,
    st: AgentState,
    opts: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let handle = match n.cfg.runtime {
        Runtime::Process => {
            process::kill_stale(&n.paths, n.role);
            Handle::Process(None)
        }
        Runtime::Docker => Handle::Docker {
            started: Instant::now(),
        },
    };
    let stop_metrics = tokio_util::sync::CancellationToken::new();
    let (metrics, activity) = start_metrics(n, &st, stop_metrics.clone()).await;
    let now = Instant::now();
    let mut s = Supervisor {
        n,
        st,
        handle,
        phase: Phase::Down,
        restarts: 0,
        failures: 0,
        ready_published: false,
        pending_rotate_done: None,
        ignored_rotation: None,
        ignored_ca: None,
        watch_problem: None,
        start_span: None,
        last_error: None,
        last_heartbeat: None,
        registration: Registration::Pending,
        nodes_problem: None,
        keys_problem: None,
        ignored_site_keys: None,
        next_heartbeat: now,
        next_watch: now,
        next_renew: now + opts.renew_check,
        opts,
        metrics,
        activity,
        last_message: None,
        last_busy: None,
        published: Vec::new(),
    };
    if n.cfg.runtime == Runtime::Docker {
        // systemd already runs Flower (bootstrap started it): supervise what is there.
        s.phase = Phase::Starting { since: now };
    }
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(s.opts.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        s.step().await;
    }
    tracing::info!("stopping Flower");
    s.handle.stop(s.opts.grace).await;
    s.write_status();
    stop_metrics.cancel();
    Ok(())
}

/// Starts the metrics endpoint when the context asks for it: on the VM address, reading
/// Flower's state (SuperLink with persistent state), the certificate and the GPUs; and the
/// training events when the log format is JSON (then with or without metrics). A SuperLink
/// with persistent state follows its state in any case, for `FL_TRAINING_ACTIVE` and
/// `FL_ROUND_NUMBER` (the receiver returned).
async fn start_metrics<G: Gate>(
    n: &Node<G>,
    st: &AgentState,
    stop: tokio_util::sync::CancellationToken,
) -> (Option<AgentMetrics>, Option<metrics::ActivityRx>) {
    let database = (n.role == Role::Superlink && n.cfg.persistent_state)
        .then(|| n.paths.state_dir().join(&n.cfg.database));
    // The seed's training events are part of its JSON logs (docs/metrics.md).
    let events = n.cfg.log_format == LogFormat::Json && database.is_some();
    let (tx, rx) = match database {
        Some(_) => {
            let (tx, rx) = watch::channel(None);
            (Some(std::sync::Arc::new(tx)), Some(rx))
        }
        None => (None, None),
    };
    if !n.cfg.metrics_enabled {
        if let (Some(db), Some(tx)) = (database, tx) {
            metrics::start_tracking(db, events, tx, stop);
        }
        return (None, rx);
    }
    let m = AgentMetrics::new(n.role);
    let sources = metrics::Sources {
        database,
        events,
        activity: tx,
        cert: n.cfg.tls.then(|| match n.role {
            Role::Superlink => n.server_cert(),
            Role::Supernode => n.tls_paths().ca_crt(),
        }),
        gpu: n.role == Role::Supernode && st.node.gpu,
    };
    let addr = std::net::SocketAddr::new(n.cfg.vm_addr(), n.cfg.metrics_port);
    metrics::start(addr, m.clone(), sources, stop).await;
    (Some(m), rx)
}

impl<G: Gate> Supervisor<'_, G> {
    async fn step(&mut self) {
        let now = Instant::now();
        if !matches!(self.phase, Phase::Down | Phase::Backoff { .. }) {
            if let Some(status) = self.handle.exited() {
                self.fail(format!("Flower exited ({status})")).await;
            }
        }
        match self.phase {
            Phase::Down => self.start().await,
            Phase::Backoff { until } if now >= until => self.start().await,
            Phase::Backoff { .. } => {}
            Phase::Starting { since } => match self.health().await {
                Health::Up => self.became_healthy().await,
                Health::Broken(why) => self.fail(why).await,
                Health::NotYet(why) if now.duration_since(since) > self.opts.start_timeout => {
                    self.fail(format!("Flower did not become healthy: {why}"))
                        .await
                }
                Health::NotYet(_) => {}
            },
            Phase::Serving { since } => match self.health().await {
                Health::Up => {
                    self.failures = 0;
                    if now.duration_since(since) > Duration::from_secs(60) {
                        self.restarts = 0;
                    }
                }
                Health::Broken(why) => self.fail(why).await,
                Health::NotYet(why) => {
                    self.failures += 1;
                    if self.failures >= self.opts.fail_threshold {
                        self.fail(format!(
                            "health check failed {} times: {why}",
                            self.failures
                        ))
                        .await;
                    }
                }
            },
        }
        if matches!(self.phase, Phase::Serving { .. }) && now >= self.next_heartbeat {
            self.heartbeat().await;
        }
        // From the first readiness on (a SuperNode that fails later says so: 3).
        if self.ready_published || !self.published.is_empty() {
            self.publish_activity(now).await;
        }
        if now >= self.next_watch {
            self.next_watch = now + self.opts.watch_interval;
            self.watch().await;
        }
        if now >= self.next_renew {
            self.next_renew = now + self.opts.renew_check;
            self.renew_if_due().await;
        }
        self.write_status();
    }

    async fn start(&mut self) {
        // A new Flower process registers afresh (its log is read from its own start).
        self.registration = Registration::Pending;
        let role = self.n.role.as_str();
        let span = self.start_span.get_or_insert_with(|| {
            Some(super::trace::stage(tracing::info_span!(
                parent: None,
                "flower start",
                flower.role = role,
                restarts = tracing::field::Empty,
            )))
        });
        let span = span.clone().unwrap_or_else(tracing::Span::none);
        match self.handle.start(self.n, &self.st).instrument(span).await {
            Ok(()) => {
                self.phase = Phase::Starting {
                    since: Instant::now(),
                };
                self.failures = 0;
            }
            Err(e) => self.fail(format!("cannot start Flower: {e}")).await,
        }
    }

    /// Deliberate restart (new certificate, new endpoint): no backoff.
    async fn restart(&mut self, why: &str) {
        tracing::info!(reason = why, "restarting Flower");
        self.handle.stop(self.opts.grace).await;
        self.phase = Phase::Down;
        self.start().await;
    }

    async fn fail(&mut self, mut why: String) {
        // A SuperNode refused because the SuperLink has not registered its key yet (it does
        // within seconds of the key's publication): retry soon, not after a growing backoff.
        let key_refused = self.n.role == Role::Supernode
            && super::node_auth::enabled(&self.n.cfg, Role::Supernode)
            && self
                .handle
                .log(self.n.role)
                .contains(super::node_auth::REFUSED);
        if key_refused {
            why.push_str(": the SuperLink does not accept this SuperNode's key (yet)");
        }
        tracing::warn!(problem = %why, restarts = self.restarts, "Flower is not healthy; restarting");
        self.handle.stop(self.opts.grace).await;
        self.restarts += 1;
        let wait = restart_wait(self.restarts, key_refused);
        self.phase = Phase::Backoff {
            until: Instant::now() + wait,
        };
        if self.ready_published || self.last_error.as_deref() != Some(&why) {
            self.n.publish_error(&why).await;
        }
        self.ready_published = false;
        self.last_error = Some(why);
    }

    async fn health(&mut self) -> Health {
        match self.n.role {
            // Caveat: a connect cannot tell whose listener answers; a foreign one on our
            // address makes this Up until our Flower exits "port in use" (two onesim labs
            // once shared addresses: onesim::reserve_loopback_net).
            Role::Superlink => match node::probe_tcp(self.n.fleet_socket()).await {
                Ok(()) => Health::Up,
                Err(e) => Health::NotYet(e.to_string()),
            },
            Role::Supernode => match self.registration_now() {
                Registration::Registered(_) => Health::Up,
                Registration::Pending => {
                    Health::NotYet("not registered with the SuperLink yet".into())
                }
                Registration::Lost => Health::Broken(
                    "the SuperNode lost its registration (SuperLink restarted without its state)"
                        .into(),
                ),
            },
        }
    }

    /// Flower serves: in phase serving and, for a SuperNode, registered.
    fn is_healthy(&self) -> bool {
        matches!(self.phase, Phase::Serving { .. })
            && (self.n.role == Role::Superlink
                || matches!(self.registration, Registration::Registered(_)))
    }

    /// The SuperNode's registration: the last state, continued with its log's tail. The
    /// same read tells whether a message is in hand (a new one, or one not yet answered).
    fn registration_now(&mut self) -> Registration {
        let log = self.handle.log(self.n.role);
        self.registration = process::registration_after(self.registration, &log);
        if let Some(m) = process::last_message(&log) {
            let new = self.last_message.as_ref().is_none_or(|l| l.id != m.id);
            if new || !m.done {
                self.last_busy = Some(Instant::now());
            }
            self.last_message = Some(m);
        }
        self.registration
    }

    /// SuperNode: `FL_CLIENT_STATUS` now.
    fn client_status(&self, now: Instant) -> ClientStatus {
        if !self.is_healthy() {
            ClientStatus::Disconnected
        } else if self
            .last_busy
            .is_some_and(|t| now.duration_since(t) < CLIENT_IDLE_GRACE)
        {
            ClientStatus::Training
        } else {
            ClientStatus::Idle
        }
    }

    /// Publishes the elasticity metrics OneFlow's policies read, each only when it changed
    /// (one PUT for all that did): a SuperNode's `FL_CLIENT_STATUS`, a SuperLink's
    /// `FL_TRAINING_ACTIVE` and `FL_ROUND_NUMBER` once its state was read. A failed PUT is
    /// retried on the next tick.
    async fn publish_activity(&mut self, now: Instant) {
        if !self.n.gate.is_configured() {
            return;
        }
        let want: Vec<(&'static str, String)> = match self.n.role {
            Role::Supernode => vec![(
                protocol::FL_CLIENT_STATUS,
                self.client_status(now).format().to_string(),
            )],
            Role::Superlink => match self.activity.as_ref().and_then(|rx| *rx.borrow()) {
                Some((active, round)) => vec![
                    (
                        protocol::FL_TRAINING_ACTIVE,
                        activity::format_active(active).to_string(),
                    ),
                    (protocol::FL_ROUND_NUMBER, activity::format_round(round)),
                ],
                None => Vec::new(),
            },
        };
        let changed: Vec<(&str, &str)> = want
            .iter()
            .filter(|(k, v)| !self.published.iter().any(|(pk, pv)| pk == k && pv == v))
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        if changed.is_empty() {
            return;
        }
        match self.n.gate.update_vm(&changed).await {
            Ok(()) => {
                tracing::info!(?changed, "published training activity");
                self.published = want;
            }
            Err(e) => tracing::warn!(problem = %e, "cannot publish training activity; will retry"),
        }
    }

    async fn became_healthy(&mut self) {
        tracing::info!(phase = "serving", "Flower is healthy");
        self.phase = Phase::Serving {
            since: Instant::now(),
        };
        self.failures = 0;
        // The first time: close `flower start`, and trace the readiness published.
        let Some(Some(start)) = self.start_span.replace(None) else {
            return self.publish_ready().await;
        };
        start.record("restarts", self.restarts);
        drop(start);
        let span = super::trace::stage(match self.n.role {
            Role::Superlink => {
                tracing::info_span!(parent: None, "superlink serving", flower.endpoint = %self.n.endpoint())
            }
            Role::Supernode => {
                let span = tracing::info_span!(
                    parent: None,
                    "supernode registered",
                    flower.node_id = tracing::field::Empty,
                );
                if let Registration::Registered(id) = self.registration {
                    span.record("flower.node_id", id);
                }
                span
            }
        });
        self.publish_ready().instrument(span).await;
    }

    async fn publish_ready(&mut self) {
        match self.n.publish_ready(&self.st).await {
            Ok(()) => {
                self.ready_published = true;
                self.last_error = None;
                self.last_heartbeat = Some(node::now_rfc3339());
                self.next_heartbeat = Instant::now() + self.n.cfg.heartbeat_interval;
                if self.st.bootstrapped_at.is_none() {
                    self.st.bootstrapped_at = Some(node::now_rfc3339());
                    let _ = self.st.save(&self.n.paths);
                }
            }
            Err(e) => {
                tracing::warn!(problem = %e, "cannot publish readiness through OneGate; will retry");
                self.next_heartbeat = Instant::now() + Duration::from_secs(2);
            }
        }
        if let Some(generation) = self.pending_rotate_done {
            let value = generation.to_string();
            match self
                .n
                .gate
                .update_vm(&[(protocol::FL_ROTATE_DONE, value.as_str())])
                .await
            {
                Ok(()) => {
                    tracing::info!(generation, "rotation done");
                    self.pending_rotate_done = None;
                }
                Err(e) => tracing::warn!(problem = %e, "cannot publish FL_ROTATE_DONE; will retry"),
            }
        }
    }

    async fn heartbeat(&mut self) {
        if !self.ready_published || self.pending_rotate_done.is_some() {
            self.publish_ready().await;
            return;
        }
        let now = node::now_rfc3339();
        if !self.n.gate.is_configured() {
            self.last_heartbeat = Some(now);
            self.next_heartbeat = Instant::now() + self.n.cfg.heartbeat_interval;
            return;
        }
        let flower = self.flower_view().await;
        let mut attrs = vec![(protocol::FL_HEARTBEAT, now.as_str())];
        attrs.extend(flower.iter().map(|(k, v)| (*k, v.as_str())));
        match self.n.gate.update_vm(&attrs).await {
            Ok(()) => {
                self.last_heartbeat = Some(now);
                self.next_heartbeat = Instant::now() + self.n.cfg.heartbeat_interval;
            }
            Err(e) => {
                tracing::warn!(problem = %e, "cannot publish FL_HEARTBEAT");
                self.next_heartbeat = Instant::now() + Duration::from_secs(2);
            }
        }
    }

    /// What Flower itself knows, published with each heartbeat for the controller's
    /// corroboration of a stale heartbeat (#12 item 4c): a SuperNode's Flower node id, the
    /// SuperLink's online node ids. Nothing when unknown (the controller then goes by the
    /// heartbeat alone).
    async fn flower_view(&mut self) -> Vec<(&'static str, String)> {
        match self.n.role {
            Role::Supernode => match self.registration {
                Registration::Registered(id) => vec![(protocol::FL_FLOWER_NODE_ID, id.to_string())],
                Registration::Pending | Registration::Lost => Vec::new(),
            },
            Role::Superlink if self.n.cfg.persistent_state => {
                let db = self.n.paths.state_dir().join(&self.n.cfg.database);
                let at = Utc::now();
                let now = at.timestamp_micros() as f64 / 1e6;
                let read = tokio::task::spawn_blocking(move || linkstate::online_nodes(&db, now))
                    .await
                    .map_err(|e| format!("reading Flower's state: {e}"))
                    .and_then(|r| r.map_err(|e| e.to_string()));
                match read {
                    Ok(ids) => {
                        self.nodes_problem = None;
                        let list = NodesOnline { at, ids };
                        vec![(protocol::FL_NODES_ONLINE, list.encode())]
                    }
                    Err(e) => {
                        if self.nodes_problem.as_deref() != Some(&e) {
                            tracing::warn!(problem = %e, "cannot list the SuperNodes Flower holds online");
                            self.nodes_problem = Some(e);
                        }
                        Vec::new()
                    }
                }
            }
            Role::Superlink => Vec::new(),
        }
    }

    async fn watch(&mut self) {
        match self.n.role {
            Role::Superlink => {
                self.watch_rotation().await;
                self.sync_node_keys().await;
            }
            Role::Supernode => self.watch_superlink().await,
        }
    }

    /// SuperLink with node authentication: Flower's registered SuperNode keys made to match
    /// the `FL_NODE_PUBKEY`s of the service's SuperNode VMs (#17 item 4). What Flower holds
    /// is read from its state each time; OneGate unreachable means no change at all.
    async fn sync_node_keys(&mut self) {
        use super::node_auth::{self, Action};
        if !node_auth::enabled(&self.n.cfg, Role::Superlink)
            || !matches!(self.phase, Phase::Serving { .. })
            || !self.n.gate.is_configured()
        {
            return;
        }
        let result: Result<usize, String> = async {
            // Extended: only the full VM documents carry the user templates (the keys).
            let service = self
                .n
                .gate
                .get_service(true)
                .await
                .map_err(|e| format!("OneGate: {e}"))?;
            let (mut wanted, mut complete) = node_auth::wanted(&service);
            // The other sites' SuperNodes, as the controller signed them onto this VM.
            match self.n.gate.get_vm().await {
                Ok(vm) => match node_auth::site_keys(
                    vm.attr(protocol::FL_SITE_NODE_KEYS),
                    vm.attr(protocol::FL_SITE_NODE_KEYS_SIG),
                    self.n.cfg.controller_key.as_deref(),
                    self.n.cfg.vmid,
                ) {
                    Ok(site) => {
                        wanted.extend(site);
                        self.ignored_site_keys = None;
                    }
                    Err(why) => {
                        complete = false;
                        if self.ignored_site_keys != Some(why) {
                            self.ignored_site_keys = Some(why);
                            tracing::warn!(
                                reason = why,
                                "ignoring FL_SITE_NODE_KEYS: no SuperNode key is unregistered until the controller's signed set is back"
                            );
                        }
                    }
                },
                Err(e) => {
                    complete = false;
                    tracing::debug!(problem = %e, "cannot read own VM for FL_SITE_NODE_KEYS");
                }
            }
            let db = self.n.paths.state_dir().join(&self.n.cfg.database);
            let held = tokio::task::spawn_blocking(move || node_auth::registered(&db))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let mut owned = node_auth::read_owned(&self.n.paths);
            let actions = node_auth::plan(&wanted, &held, &owned, complete);
            // A few per round: each is a `flwr` run (about a second), and the supervisor
            // keeps watching Flower's health meanwhile; the rest follow 5 s later.
            for a in actions.iter().take(node_auth::ACTIONS_PER_ROUND) {
                // Recorded as ours before Flower holds it: a crash in between leaves a
                // recorded key Flower never held, which is harmless.
                if let Action::Register(k) = a {
                    owned.insert(k.clone());
                    node_auth::write_owned(&self.n.paths, &owned).map_err(|e| e.to_string())?;
                }
                node_auth::apply(&self.n.cfg, &self.n.paths, a)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Action::Unregister { key: Some(k), .. } = a {
                    owned.remove(k);
                    node_auth::write_owned(&self.n.paths, &owned).map_err(|e| e.to_string())?;
                }
                match a {
                    Action::Register(k) => {
                        tracing::info!(key = %k.fingerprint(), "registered a SuperNode key with Flower")
                    }
                    Action::Unregister { node_id, key } => tracing::info!(
                        node_id,
                        key = key.as_ref().map(|k| k.fingerprint()).unwrap_or_default(),
                        "unregistered a SuperNode key no longer wanted (its node left the service, or the controller dropped it from the other sites' set)"
                    ),
                }
            }
            Ok(actions.len())
        }
        .await;
        match result {
            Ok(_) => self.keys_problem = None,
            Err(e) => {
                if self.keys_problem.as_deref() != Some(e.as_str()) {
                    tracing::warn!(problem = %e, "cannot sync the SuperNode keys with Flower");
                    self.keys_problem = Some(e);
                }
            }
        }
    }

    /// `FL_ROTATE_REQUEST=<generation>` → new server certificate (same CA), restart,
    /// `FL_ROTATE_DONE=<generation>` once serving again.
    async fn watch_rotation(&mut self) {
        if !self.n.cfg.tls || self.n.cfg.tls_mode != TlsMode::Auto {
            return;
        }
        let vm = match self.n.gate.get_vm().await {
            Ok(vm) => vm,
            Err(e) => {
                tracing::debug!(problem = %e, "cannot read own VM");
                return;
            }
        };
        let Some(request) = vm.attr(protocol::FL_ROTATE_REQUEST) else {
            return;
        };
        let Some(generation) = protocol::signing::parse_generation(request) else {
            tracing::warn!("ignoring an invalid FL_ROTATE_REQUEST (not a generation number)");
            return;
        };
        // Only what this agent itself carried out: FL_ROTATE_DONE is writable by peers, and
        // a forged high value would make every later request look done.
        let done = self.st.rotate_done.max(self.pending_rotate_done);
        if done.is_some_and(|d| generation <= d) {
            return;
        }
        // Any VM of the service can write this VM's user template through OneGate: act
        // only on what the controller signed (tests/safety_peers.rs).
        let validity = vm.attr(protocol::FL_ROTATE_VALIDITY);
        let signed = match (&self.n.cfg.controller_key, vm.attr(protocol::FL_ROTATE_SIG)) {
            (Some(key), Some(sig)) => self.n.cfg.vmid.is_some_and(|id| {
                protocol::signing::verify_rotation(key, sig, id, generation, validity)
            }),
            _ => false,
        };
        if !signed {
            if self.ignored_rotation != Some(generation) {
                self.ignored_rotation = Some(generation);
                let why = if self.n.cfg.controller_key.is_none() {
                    "no ONEAPP_FL_CONTROLLER_KEY in the context"
                } else {
                    "FL_ROTATE_SIG is missing or is not the controller's signature"
                };
                tracing::warn!(
                    generation,
                    reason = why,
                    "ignoring an unsigned rotation request"
                );
            }
            return;
        }
        let mut auto = self.n.auto_tls();
        match validity.map(protocol::signing::parse_validity) {
            Some(Some(v)) => auto.validity = v,
            Some(None) => tracing::warn!(
                "ignoring an invalid FL_ROTATE_VALIDITY (not a duration between 1m and 20 years)"
            ),
            None => {}
        }
        tracing::info!(generation, validity = ?auto.validity, "certificate rotation requested");
        match tls::ensure_auto(&self.n.tls_paths(), &auto, Utc::now(), true) {
            Ok(action) => {
                tracing::info!(?action, "new server certificate");
                self.st.rotate_done = Some(generation);
                let _ = self.st.save(&self.n.paths);
                self.pending_rotate_done = Some(generation);
                self.restart("certificate rotation").await;
            }
            Err(e) => {
                self.n
                    .publish_error(&format!("certificate rotation failed: {e}"))
                    .await
            }
        }
    }

    /// SuperNode: follow the SuperLink's endpoint (when discovered) and CA.
    async fn watch_superlink(&mut self) {
        let cfg = &self.n.cfg;
        let need_ca = cfg.tls && cfg.ca_override.is_none();
        if cfg.superlink_address.is_some() && !need_ca {
            return;
        }
        let view = match discovery::discover_once(&self.n.gate, need_ca).await {
            Ok(v) => {
                self.watch_problem = None;
                v
            }
            Err(e) => {
                let e = e.to_string();
                // Once per distinct problem: a forged FL_ENDPOINT shows up here.
                if self.watch_problem.as_deref() != Some(e.as_str()) {
                    tracing::warn!(problem = %e, "SuperLink not usable now; keeping the current one");
                    self.watch_problem = Some(e);
                }
                return;
            }
        };
        let mut why = None;
        if cfg.superlink_address.is_none()
            && self.st.node.superlink.as_ref() != Some(&view.endpoint)
        {
            tracing::info!(endpoint = %view.endpoint, "the SuperLink endpoint changed");
            self.st.node.superlink = Some(view.endpoint.clone());
            self.st.superlink_vm = Some(view.vm_id);
            why = Some("SuperLink endpoint changed");
        }
        let node_auth = super::node_auth::supernode_presents_key(cfg, Some(view.node_auth));
        if cfg.superlink_address.is_none() && self.st.node.node_auth != node_auth {
            tracing::info!(node_auth, "the SuperLink's node authentication changed");
            self.st.node.node_auth = node_auth;
            why = Some("SuperLink node authentication changed");
        }
        if let (true, Some(ca)) = (need_ca, &view.ca_pem) {
            let digest = node::sha256_hex(ca.as_bytes());
            if self.st.ca_sha256.as_deref() != Some(digest.as_str()) {
                // The CA first trusted is pinned: any VM of the service can rewrite the
                // SuperLink's FL_CA_CERT through OneGate, so a new CA is taken only when
                // the pinned one signed it (tests/safety_peers.rs).
                if let Err(why) = self.ca_continues_pinned(ca) {
                    if self.ignored_ca.as_deref() != Some(digest.as_str()) {
                        tracing::warn!(problem = %why, "ignoring a SuperLink CA change not signed by the pinned CA");
                        self.ignored_ca = Some(digest);
                    }
                    return;
                }
                tracing::info!(
                    "the SuperLink CA changed to one the pinned CA signed; reloading trust"
                );
                let mut st = self.st.clone();
                if let Err(e) = self.n.install_ca(&mut st, ca) {
                    tracing::warn!(problem = %e, "cannot install the new CA");
                    return;
                }
                self.st = st;
                why = Some("SuperLink CA changed");
            }
        }
        if let Some(why) = why {
            let _ = self.st.save(&self.n.paths);
            if cfg.runtime == Runtime::Docker {
                if let Err(e) = self.n.configure_files(&self.st) {
                    tracing::warn!(problem = %e, "cannot rewrite units");
                }
            }
            self.restart(why).await;
        }
    }

    /// Ok when the SuperNode trusts no CA yet, or the pinned CA signed `new_ca_pem`.
    fn ca_continues_pinned(&self, new_ca_pem: &str) -> Result<(), AgentError> {
        if self.st.ca_sha256.is_none() {
            return Ok(());
        }
        let path = self.n.tls_paths().ca_crt();
        let pinned = std::fs::read_to_string(&path)
            .map_err(|e| AgentError::PinnedCa(IoError::at(&path)(e)))?;
        Ok(tls::verify_chain(&pinned, new_ca_pem, Utc::now())?)
    }

    async fn renew_if_due(&mut self) {
        if self.n.role != Role::Superlink || !self.n.cfg.tls || self.n.cfg.tls_mode != TlsMode::Auto
        {
            return;
        }
        match tls::ensure_auto(&self.n.tls_paths(), &self.n.auto_tls(), Utc::now(), false) {
            Ok(tls::TlsAction::Reused) => {}
            Ok(action) => {
                tracing::info!(?action, "server certificate renewed");
                self.ready_published = false;
                self.restart("certificate renewal").await;
            }
            Err(e) => {
                self.n
                    .publish_error(&format!("certificate renewal failed: {e}"))
                    .await
            }
        }
    }

    fn write_status(&self) {
        if let Some(m) = &self.metrics {
            let (phase, healthy) = (self.phase.name(), self.is_healthy());
            m.update(|v| {
                v.phase = phase;
                v.healthy = healthy;
            });
        }
        let pid = match &self.handle {
            Handle::Process(Some(p)) => Some(p.pid()),
            _ => None,
        };
        let s = RunStatus {
            phase: self.phase.name().into(),
            pid,
            restarts: self.restarts,
            last_error: self.last_error.clone(),
            last_heartbeat: self.last_heartbeat.clone(),
            updated: node::now_rfc3339(),
        };
        if let Ok(text) = serde_json::to_string(&s) {
            let _ = tls::write_file(
                &self.n.paths.run_dir().join("status.json"),
                text.as_bytes(),
                0o644,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_key_is_retried_within_5_s() {
        assert_eq!(restart_wait(1, true), Duration::from_secs(1));
        assert_eq!(restart_wait(6, true), Duration::from_secs(5));
        assert_eq!(restart_wait(6, false), Duration::from_secs(30));
    }

    #[test]
    fn restart_backoff_is_capped() {
        assert_eq!(restart_backoff(1), Duration::from_secs(1));
        assert_eq!(restart_backoff(2), Duration::from_secs(2));
        assert_eq!(restart_backoff(6), Duration::from_secs(30));
        assert_eq!(restart_backoff(100), Duration::from_secs(30));
    }
}
