//! Configuration of `flower-reconcile run`: command-line flags, environment variables
//! and an optional TOML file (`--config`), in that order of precedence, then defaults.
//! The home site's OpenNebula credentials are not configured here: the clients read
//! `ONE_XMLRPC`, `ONEFLOW_URL` and `ONE_AUTH` like every OpenNebula tool. Other sites
//! (multi-site federation, docs/multi-site.md) are named only here, in `[sites.NAME]`
//! tables, never in a spec: a spec's author must not be able to point the controller's
//! credentials at an endpoint of their choosing, nor make it read a local file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

use super::auth::BearerToken;
use crate::api::HumanDuration;
use crate::http_server::Limits;
use crate::plan::PrunePolicy;
use crate::reconciler::context::OwnershipOptions;
use crate::runtime::backoff::BackoffPolicy;
use crate::runtime::RuntimeConfig;
use crate::source::SourceArgs;
use crate::telemetry::LogFormat;

/// The controller id when none is configured.
pub const DEFAULT_CONTROLLER_ID: &str = "flower-reconcile";

/// Flags of `run` (each also settable by env var or in the config file).
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RunSettings {
    /// Where the specs come from (`[source]` table in the config file).
    #[command(flatten)]
    #[serde(default)]
    pub source: SourceArgs,
    /// Id written into (and required in) the ownership marker of managed services. Set it
    /// explicitly: two controllers with the same id and different spec trees see each
    /// other's clusters as removed (a warning is logged when the default is used).
    #[arg(long, env = "FLOWER_RECONCILE_CONTROLLER_ID")]
    pub controller_id: Option<String>,
    /// Largest share (0 to 1) of the managed clusters one source change may remove before
    /// deletions are blocked; removing all of them is always blocked [default: 0.5].
    #[arg(long, value_name = "SHARE", env = "FLOWER_RECONCILE_MAX_DELETE_SHARE", value_parser = crate::plan::prune::parse_share)]
    pub max_delete_share: Option<f64>,
    /// Address of the HTTP server (health, metrics, API) [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR", env = "FLOWER_RECONCILE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// State directory: lock file and Git cache [default: $STATE_DIRECTORY or
    /// /var/lib/flower-reconcile].
    #[arg(long, value_name = "DIR", env = "FLOWER_RECONCILE_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Live-state poll interval [default: 10s].
    #[arg(long, value_name = "DURATION", env = "FLOWER_RECONCILE_POLL_INTERVAL")]
    pub poll_interval: Option<HumanDuration>,
    /// Full resync interval: every cluster is reconciled at least this often [default: 10m].
    #[arg(
        long,
        value_name = "DURATION",
        env = "FLOWER_RECONCILE_RESYNC_INTERVAL"
    )]
    pub resync_interval: Option<HumanDuration>,
    /// Reconciles running at once across clusters [default: 4].
    #[arg(long, value_name = "N", env = "FLOWER_RECONCILE_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// OpenNebula API requests per second, shared by all clusters [default: 10].
    #[arg(long, value_name = "N", env = "FLOWER_RECONCILE_API_RATE")]
    pub api_rate: Option<NonZeroU32>,
    /// Longest backoff after repeated errors [default: 5m].
    #[arg(long, value_name = "DURATION", env = "FLOWER_RECONCILE_MAX_BACKOFF")]
    pub max_backoff: Option<HumanDuration>,
    /// Oldest observation a destructive or clock-driven action may be planned on
    /// [default: 3 × poll-interval].
    #[arg(long, value_name = "DURATION", env = "FLOWER_RECONCILE_MAX_VIEW_AGE")]
    pub max_view_age: Option<HumanDuration>,
    /// Log format [default: text].
    #[arg(long, value_enum, env = "FLOWER_RECONCILE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// OTLP/HTTP collector the VMs' agents send their spans to (base URL, as in
    /// OTEL_EXPORTER_OTLP_ENDPOINT: `/v1/traces` is appended); their spans continue the
    /// reconcile that created the VMs [default: none, the agents export nothing].
    #[arg(long, value_name = "URL", env = "FLOWER_RECONCILE_VM_OTLP_ENDPOINT")]
    pub vm_otlp_endpoint: Option<String>,
    /// Trusted owner and name resolution (`[ownership]` table in the config file).
    #[command(flatten)]
    #[serde(default)]
    pub ownership: OwnershipOptions,
    /// The HTTP server's limits and authentication (`[http]` table in the config file).
    #[command(flatten)]
    #[serde(default)]
    pub http: HttpSettings,
    /// Leader election among instances sharing one OpenNebula (`[leader-election]` table).
    #[command(flatten)]
    #[serde(default)]
    pub leader_election: LeaderElectionSettings,
    /// Other OpenNebula sites SuperNode groups may be placed in (`[sites.NAME]` tables;
    /// config file only).
    #[arg(skip)]
    #[serde(default)]
    pub sites: BTreeMap<String, SiteSettings>,
}

/// One remote OpenNebula site (`[sites.NAME]`): its endpoints and where its credentials
/// are. The credentials file is read like `ONE_AUTH` and never logged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SiteSettings {
    /// oned's XML-RPC endpoint (as `ONE_XMLRPC`).
    pub xmlrpc: String,
    /// OneFlow's endpoint (as `ONEFLOW_URL`).
    pub oneflow: String,
    /// File holding `user:password` (as `ONE_AUTH`; mode 600).
    pub auth_file: PathBuf,
    /// PEM file of extra CA certificates for https endpoints.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// The resolved remote sites by name.
pub type Sites = BTreeMap<String, crate::one::OneConfig>;

/// Resolve `[sites.*]`: names are DNS labels (a site part is named
/// `<cluster>--<site>`), endpoints URLs, credentials read from their files. Errors name
/// the table and field, never a credential.
pub fn resolve_sites(sites: &BTreeMap<String, SiteSettings>) -> anyhow::Result<Sites> {
    let mut out = Sites::new();
    for (name, s) in sites {
        let at = format!("sites.{name}");
        anyhow::ensure!(
            crate::api::validate::is_site_name(name),
            "{at}: a site name must be a DNS label of at most {} characters (a-z, 0-9, -)",
            crate::api::validate::MAX_SITE_NAME
        );
        let cfg = crate::one::OneConfig::for_site(
            &at,
            &s.xmlrpc,
            &s.oneflow,
            &s.auth_file,
            s.ca.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        out.insert(name.clone(), cfg);
    }
    Ok(out)
}

/// The sites of a config file: the one loader `run`, `plan`, `apply` and `status` share.
pub fn load_sites(path: &Path) -> anyhow::Result<Sites> {
    resolve_sites(&RunSettings::from_file(path)?.sites)
}

/// Leader election (issue #17): a lease in an OpenNebula document; defaults: client-go's.
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LeaderElectionSettings {
    /// Stand by unless holding the lease in OpenNebula: for several instances on
    /// different hosts sharing one OpenNebula and one spec source [default: off].
    #[arg(long = "leader-elect", env = "FLOWER_RECONCILE_LEADER_ELECT")]
    #[serde(default)]
    pub enabled: bool,
    /// This instance's id in the lease and in every request's User-Agent
    /// [default: hostname-pid-random].
    #[arg(long, value_name = "ID", env = "FLOWER_RECONCILE_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// How long a standby waits, from its last observed change of the lease, before it
    /// takes it [default: 15s].
    #[arg(long, value_name = "DURATION")]
    pub lease_duration: Option<HumanDuration>,
    /// How long after its last renew the leader still changes OpenNebula [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub renew_deadline: Option<HumanDuration>,
    /// Period of the lease rounds [default: 2s].
    #[arg(long, value_name = "DURATION")]
    pub retry_period: Option<HumanDuration>,
}

impl LeaderElectionSettings {
    /// Fill every unset field from `file`.
    pub fn or(self, file: LeaderElectionSettings) -> LeaderElectionSettings {
        LeaderElectionSettings {
            enabled: self.enabled || file.enabled,
            instance_id: self.instance_id.or(file.instance_id),
            lease_duration: self.lease_duration.or(file.lease_duration),
            renew_deadline: self.renew_deadline.or(file.renew_deadline),
            retry_period: self.retry_period.or(file.retry_period),
        }
    }

    /// The timing, defaults filled in and checked as client-go does.
    pub fn timing(&self) -> anyhow::Result<crate::runtime::election::ElectionTiming> {
        let d = crate::runtime::election::ElectionTiming::default();
        let pick = |v: Option<HumanDuration>, default| v.map_or(default, HumanDuration::get);
        let t = crate::runtime::election::ElectionTiming {
            lease_duration: pick(self.lease_duration, d.lease_duration),
            renew_deadline: pick(self.renew_deadline, d.renew_deadline),
            retry_period: pick(self.retry_period, d.retry_period),
        };
        t.validate()
            .map_err(|e| anyhow::anyhow!("leader-election: {e}"))?;
        Ok(t)
    }
}

/// Resolved leader-election settings.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// Whether instances elect a leader.
    pub enabled: bool,
    /// This instance's id.
    pub instance_id: String,
    /// Timing.
    pub timing: crate::runtime::election::ElectionTiming,
}

/// Limits and authentication of the HTTP server; defaults: [`Limits::default`].
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HttpSettings {
    /// Longest time a client may take to send a request head, and longest idle
    /// keep-alive wait [default: 10s].
    #[arg(long = "http-header-read-timeout", value_name = "DURATION")]
    pub header_read_timeout: Option<HumanDuration>,
    /// Longest time a request may take; then 503 [default: 30s].
    #[arg(long = "http-request-timeout", value_name = "DURATION")]
    pub request_timeout: Option<HumanDuration>,
    /// Open connections at most; more wait unaccepted in the listen backlog [default: 128].
    #[arg(long = "http-max-connections", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Largest request body in bytes; more gets 413 [default: 65536].
    #[arg(long = "http-max-body-bytes", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// After SIGTERM, how long open requests may take before their connections are
    /// dropped [default: 5s].
    #[arg(long = "http-shutdown-grace", value_name = "DURATION")]
    pub shutdown_grace: Option<HumanDuration>,
    /// File holding the bearer token every route but /healthz and /readyz then requires
    /// (the token itself is never taken from the command line).
    #[arg(long, value_name = "FILE", env = "FLOWER_RECONCILE_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Serve a non-loopback `listen` address without a token (refused otherwise).
    #[arg(long)]
    #[serde(default)]
    pub allow_unauthenticated: bool,
}

impl HttpSettings {
    /// Fill every unset field from `file`.
    pub fn or(self, file: HttpSettings) -> HttpSettings {
        HttpSettings {
            header_read_timeout: self.header_read_timeout.or(file.header_read_timeout),
            request_timeout: self.request_timeout.or(file.request_timeout),
            max_connections: self.max_connections.or(file.max_connections),
            max_body_bytes: self.max_body_bytes.or(file.max_body_bytes),
            shutdown_grace: self.shutdown_grace.or(file.shutdown_grace),
            auth_token_file: self.auth_token_file.or(file.auth_token_file),
            allow_unauthenticated: self.allow_unauthenticated || file.allow_unauthenticated,
        }
    }

    /// The limits, defaults filled in; the token read from its file. A non-loopback
    /// `listen` without a token is refused unless `allow-unauthenticated`: the API shows
    /// every cluster's status and endpoints, so exposing it is a decision, not a default.
    fn resolve(self, listen: SocketAddr) -> anyhow::Result<(Limits, Option<BearerToken>)> {
        let d = Limits::default();
        let pick = |v: Option<HumanDuration>, default| v.map_or(default, HumanDuration::get);
        let limits = Limits {
            header_read_timeout: pick(self.header_read_timeout, d.header_read_timeout),
            request_timeout: pick(self.request_timeout, d.request_timeout),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_body_bytes: self.max_body_bytes.unwrap_or(d.max_body_bytes),
            shutdown_grace: pick(self.shutdown_grace, d.shutdown_grace),
        };
        for (name, v) in [
            ("http.header-read-timeout", limits.header_read_timeout),
            ("http.request-timeout", limits.request_timeout),
        ] {
            anyhow::ensure!(!v.is_zero(), "{name} must be positive");
        }
        anyhow::ensure!(
            limits.max_connections >= 1,
            "http.max-connections must be at least 1"
        );
        let token = self
            .auth_token_file
            .as_deref()
            .map(BearerToken::from_file)
            .transpose()
            .context("http.auth-token-file")?;
        anyhow::ensure!(
            token.is_some() || listen.ip().is_loopback() || self.allow_unauthenticated,
            "listen = {listen} is not a loopback address and no http.auth-token-file is set: \
             anyone who reaches it reads every cluster's status. Set auth-token-file, or \
             allow-unauthenticated = true (--allow-unauthenticated) to serve it open"
        );
        Ok((limits, token))
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Source arguments (resolved later against the state dir).
    pub source: SourceArgs,
    /// Ownership marker id.
    pub controller_id: String,
    /// No controller id was configured: [`DEFAULT_CONTROLLER_ID`] is used.
    pub controller_id_defaulted: bool,
    /// The mass-delete guard.
    pub prune: PrunePolicy,
    /// HTTP address.
    pub listen: SocketAddr,
    /// State directory.
    pub state_dir: PathBuf,
    /// API requests per second.
    pub api_rate: NonZeroU32,
    /// Log format.
    pub log_format: LogFormat,
    /// Trusted owner and name resolution.
    pub ownership: OwnershipOptions,
    /// Runtime tuning.
    pub runtime: RuntimeConfig,
    /// See [`crate::reconciler::ReconcileOptions::max_view_age`].
    pub max_view_age: std::time::Duration,
    /// See [`crate::reconciler::VmTracing::otlp_endpoint`].
    pub vm_otlp_endpoint: Option<crate::protocol::trace_context::OtlpEndpoint>,
    /// The HTTP server's limits.
    pub http: Limits,
    /// The bearer token the HTTP API requires, if any.
    pub auth_token: Option<BearerToken>,
    /// Leader election.
    pub election: ElectionConfig,
    /// Remote sites by name.
    pub sites: Sites,
}

impl RunSettings {
    /// Read a TOML config file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Fill every unset field from `file`.
    pub fn or(self, file: RunSettings) -> RunSettings {
        RunSettings {
            source: self.source.or(file.source),
            controller_id: self.controller_id.or(file.controller_id),
            max_delete_share: self.max_delete_share.or(file.max_delete_share),
            listen: self.listen.or(file.listen),
            state_dir: self.state_dir.or(file.state_dir),
            poll_interval: self.poll_interval.or(file.poll_interval),
            resync_interval: self.resync_interval.or(file.resync_interval),
            concurrency: self.concurrency.or(file.concurrency),
            api_rate: self.api_rate.or(file.api_rate),
            max_backoff: self.max_backoff.or(file.max_backoff),
            max_view_age: self.max_view_age.or(file.max_view_age),
            log_format: self.log_format.or(file.log_format),
            vm_otlp_endpoint: self.vm_otlp_endpoint.or(file.vm_otlp_endpoint),
            ownership: self.ownership.or(file.ownership),
            http: self.http.or(file.http),
            leader_election: self.leader_election.or(file.leader_election),
            sites: if self.sites.is_empty() {
                file.sites
            } else {
                self.sites
            },
        }
    }

    /// Apply defaults and check values.
    pub fn resolve(self) -> anyhow::Result<RunConfig> {
        let state_dir = self.state_dir.unwrap_or_else(|| {
            std::env::var_os("STATE_DIRECTORY")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/lib/flower-reconcile"))
        });
        let poll = self.poll_interval.map_or(10, |d| d.get().as_secs());
        let poll_interval = self
            .poll_interval
            .map_or(std::time::Duration::from_secs(10), HumanDuration::get);
        anyhow::ensure!(
            !poll_interval.is_zero(),
            "poll-interval must be positive (got {poll}s)"
        );
        let resync_interval = self
            .resync_interval
            .map_or(std::time::Duration::from_secs(600), HumanDuration::get);
        anyhow::ensure!(
            !resync_interval.is_zero(),
            "resync-interval must be positive"
        );
        let max_view_age = self
            .max_view_age
            .map_or(poll_interval * 3, HumanDuration::get);
        anyhow::ensure!(
            max_view_age >= poll_interval,
            "max-view-age ({}s) must be at least the poll interval ({poll}s): every observation would be too old",
            max_view_age.as_secs()
        );
        let concurrency = self.concurrency.unwrap_or(4);
        anyhow::ensure!(concurrency >= 1, "concurrency must be at least 1");
        let backoff = BackoffPolicy {
            max: self
                .max_backoff
                .map_or(BackoffPolicy::default().max, HumanDuration::get),
            ..BackoffPolicy::default()
        };
        let max_share = self
            .max_delete_share
            .unwrap_or(crate::plan::prune::DEFAULT_MAX_DELETE_SHARE);
        anyhow::ensure!(
            (0.0..=1.0).contains(&max_share),
            "max-delete-share must be between 0 and 1 (got {max_share})"
        );
        let vm_otlp_endpoint = self
            .vm_otlp_endpoint
            .as_deref()
            .map(crate::protocol::trace_context::parse_otlp_endpoint)
            .transpose()
            .map_err(|e| anyhow::anyhow!("vm-otlp-endpoint: {e}"))?;
        let listen = self
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9464)));
        let (http, auth_token) = self.http.resolve(listen)?;
        let election = ElectionConfig {
            enabled: self.leader_election.enabled,
            instance_id: crate::runtime::election::instance_id(
                self.leader_election.instance_id.as_deref(),
            )
            .map_err(|e| anyhow::anyhow!("leader-election.{e}"))?,
            timing: self.leader_election.timing()?,
        };
        let sites = resolve_sites(&self.sites)?;
        Ok(RunConfig {
            sites,
            election,
            http,
            auth_token,
            vm_otlp_endpoint,
            source: self.source,
            controller_id_defaulted: self.controller_id.is_none(),
            controller_id: self
                .controller_id
                .unwrap_or_else(|| DEFAULT_CONTROLLER_ID.into()),
            prune: PrunePolicy {
                max_share,
                allow_all: false,
            },
            listen,
            state_dir,
            api_rate: self
                .api_rate
                .unwrap_or(NonZeroU32::new(10).unwrap_or(NonZeroU32::MIN)),
            log_format: self.log_format.unwrap_or_default(),
            ownership: self.ownership,
            max_view_age,
            runtime: RuntimeConfig {
                poll_interval,
                resync_interval,
                concurrency,
                backoff,
                ..RuntimeConfig::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_example_config_parses() {
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/flower-reconcile.example.toml");
        let file = RunSettings::from_file(&example).unwrap();
        assert!(
            file.source.git.is_some(),
            "the example follows a Git repository"
        );
        let cli = RunSettings {
            concurrency: Some(9),
            ..RunSettings::default()
        };
        let cfg = cli.or(file.clone()).resolve().unwrap();
        assert_eq!(cfg.runtime.concurrency, 9);
        assert_eq!(cfg.listen, file.listen.unwrap());
        assert_eq!(cfg.runtime.poll_interval, file.poll_interval.unwrap().get());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "concurrancy = 3\n").unwrap();
        let err = RunSettings::from_file(&p).unwrap_err().to_string();
        assert!(
            err.contains("c.toml") && err.contains("concurrancy"),
            "{err}"
        );
        let zero = RunSettings {
            concurrency: Some(0),
            ..RunSettings::default()
        };
        assert!(zero.resolve().is_err());
    }

    #[test]
    fn leader_election_is_read_from_the_file_and_its_timing_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[leader-election]\nenabled = true\ninstance-id = \"ctl-a\"\nlease-duration = \"20s\"\n",
        )
        .unwrap();
        let cfg = RunSettings::default()
            .or(RunSettings::from_file(&p).unwrap())
            .resolve()
            .unwrap();
        assert!(cfg.election.enabled);
        assert_eq!(cfg.election.instance_id, "ctl-a");
        assert_eq!(cfg.election.timing.lease_duration.as_secs(), 20);
        assert_eq!(
            cfg.election.timing.renew_deadline.as_secs(),
            10,
            "client-go's default"
        );
        std::fs::write(
            &p,
            "[leader-election]\nlease-duration = \"5s\"\nrenew-deadline = \"6s\"\n",
        )
        .unwrap();
        let err = RunSettings::from_file(&p)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("leader-election") && err.contains("fencing margin"),
            "{err}"
        );
        std::fs::write(&p, "[leader-election]\ninstance-id = \"a b\"\n").unwrap();
        let err = RunSettings::from_file(&p)
            .unwrap()
            .resolve()
            .unwrap_err()
            .to_string();
        assert!(err.contains("instance-id"), "{err}");
        // Off by default, with a generated id.
        let cfg = RunSettings::default().resolve().unwrap();
        assert!(!cfg.election.enabled && !cfg.election.instance_id.is_empty());
    }

    #[test]
    fn non_loopback_listen_needs_a_token_or_an_explicit_opt_out() {
        let dir = tempfile::tempdir().unwrap();
        let open = |allow: bool, token: Option<PathBuf>| RunSettings {
            listen: Some("0.0.0.0:9464".parse().unwrap()),
            http: HttpSettings {
                allow_unauthenticated: allow,
                auth_token_file: token,
                ..HttpSettings::default()
            },
            ..RunSettings::default()
        };
        let err = open(false, None).resolve().unwrap_err().to_string();
        assert!(
            err.contains("0.0.0.0:9464") && err.contains("auth-token-file"),
            "{err}"
        );
        assert!(open(true, None).resolve().unwrap().auth_token.is_none());
        let p = dir.path().join("token");
        std::fs::write(&p, "a-token-of-enough-length\n").unwrap();
        assert!(open(false, Some(p)).resolve().unwrap().auth_token.is_some());
        let missing = open(false, Some(dir.path().join("absent"))).resolve();
        let err = format!("{:#}", missing.unwrap_err());
        assert!(
            err.contains("http.auth-token-file") && err.contains("absent"),
            "{err}"
        );
        // Loopback needs neither.
        let cfg = RunSettings::default().resolve().unwrap();
        assert_eq!(cfg.http, Limits::default());
    }

    #[test]
    fn sites_are_read_from_the_file_with_their_credentials_never_shown() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let auth = dir.path().join("b.auth");
        std::fs::write(&auth, "oneadmin:s3cret-pass\n").unwrap();
        std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = dir.path().join("c.toml");
        let table = |name: &str, xmlrpc: &str, extra: &str| {
            format!(
                "[sites.{name}]\nxmlrpc = \"{xmlrpc}\"\noneflow = \"http://127.0.0.1:2474\"\nauth-file = \"{}\"\n{extra}",
                auth.display()
            )
        };
        std::fs::write(&p, table("site-b", "http://127.0.0.1:2633/RPC2", "")).unwrap();
        let sites = load_sites(&p).unwrap();
        let b = &sites["site-b"];
        assert_eq!(b.xmlrpc.as_str(), "http://127.0.0.1:2633/RPC2");
        assert_eq!(b.credentials.user(), "oneadmin");
        assert!(!format!("{sites:?}").contains("s3cret"), "{sites:?}");
        // The same loader serves run.
        let cfg = RunSettings::from_file(&p).unwrap().resolve().unwrap();
        assert_eq!(cfg.sites.keys().collect::<Vec<_>>(), ["site-b"]);
        let err_of = |text: String| {
            std::fs::write(&p, text).unwrap();
            format!("{:#}", load_sites(&p).unwrap_err())
        };
        let err = err_of(table("Site_B", "http://x/RPC2", ""));
        assert!(
            err.contains("sites.Site_B") && err.contains("DNS label"),
            "{err}"
        );
        let err = err_of(table("b", "ftp://x/RPC2", ""));
        assert!(
            err.contains("sites.b.xmlrpc") && err.contains("scheme"),
            "{err}"
        );
        let err = err_of(table("b", "http://x/RPC2", "password = \"x\"\n"));
        assert!(err.contains("password") && err.contains("c.toml"), "{err}");
        std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = err_of(table("b", "http://x/RPC2", ""));
        assert!(
            err.contains("sites.b") && err.contains("chmod 600") && !err.contains("s3cret"),
            "{err}"
        );
    }

    #[test]
    fn the_systemd_unit_is_hardened_and_runs_the_service() {
        let unit = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/flower-reconcile.service"),
        )
        .unwrap();
        for line in [
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "StateDirectory=flower-reconcile",
            "NoNewPrivileges=yes",
            "CapabilityBoundingSet=",
            "KillSignal=SIGTERM",
            "Environment=MALLOC_ARENA_MAX=1",
        ] {
            assert!(unit.lines().any(|l| l.trim() == line), "missing {line}");
        }
        let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
        assert!(exec.contains(" run --config "), "{exec}");
    }
}
