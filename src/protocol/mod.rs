//! The controller ⇄ agent protocol: VM user-template attributes, `ONEAPP_*` context
//! variables, and one codec per value they carry.
//!
//! The agent writes the attributes through OneGate (`PUT /vm`, merge); the controller reads
//! them through oned and writes its requests with `one.vm.update` (merge). The table lives
//! in `docs/attribute-protocol.md`; these constants are its single source of truth in code.
//!
//! Owns: the names, and the grammar of every value that crosses a process boundary —
//! host:port ([`endpoint`]), Flower versions ([`version`]), base64 PEM ([`pem`]), node- and
//! run-config keys and values ([`config_kv`]), durations ([`duration`]), booleans
//! ([`boolean`]), absolute paths ([`path`]), controller signatures ([`signing`]) and the
//! trace context handed to the VMs ([`trace_context`]), the elasticity metrics ([`activity`]),
//! the certificate's extra names ([`san`]).
//! validate, render, the agent, the planner, submit and the OneGate client all parse and
//! print these values here and nowhere else, so what one side accepts the other accepts.
//!
//! Must not: do I/O or know about specs, OneFlow or processes.
//!
//! Guarantees: every parser is total on untrusted input (bounded length, no panic) and the
//! printers' output is accepted by the parsers (`tests/protocol_roundtrip.rs` checks this
//! for every context variable the renderer writes; each codec's own tests check the grammar).

/// one-apps readiness flag; OneFlow's `ready_status_gate` waits on it.
pub const READY: &str = "READY";

pub mod activity;
pub mod boolean;
pub mod config_kv;
pub mod duration;
pub mod endpoint;
pub mod node_key;
pub mod nodes;
pub mod path;
pub mod pem;
pub mod run_config;
pub mod san;
pub mod signing;
pub mod trace_context;
pub mod variables;
pub mod version;
/// `superlink` or `supernode`.
pub const FL_ROLE: &str = "FL_ROLE";
/// Flower version actually running.
pub const FL_VERSION: &str = "FL_VERSION";
/// SuperLink: `YES` when the Fleet API serves.
pub const FL_READY: &str = "FL_READY";
/// SuperLink: `<ip>:<fleet port>` SuperNodes dial.
pub const FL_ENDPOINT: &str = "FL_ENDPOINT";
/// SuperLink: `YES` / `NO`.
pub const FL_TLS: &str = "FL_TLS";
/// SuperLink: `YES` when it authenticates SuperNodes (`--enable-supernode-auth`), `NO`
/// otherwise; a SuperNode presents its key only to a SuperLink that says `YES` (Flower 1.25
/// refuses a key a SuperLink without authentication was not told about). Absent: `NO`.
pub const FL_NODE_AUTH: &str = "FL_NODE_AUTH";
/// SuperLink: base64 (no newlines) of the PEM CA.
pub const FL_CA_CERT: &str = "FL_CA_CERT";
/// SuperLink: RFC 3339 expiry of the serving certificate.
pub const FL_CERT_NOT_AFTER: &str = "FL_CERT_NOT_AFTER";
/// SuperNode: `YES` when registered with the SuperLink.
pub const FL_NODE_READY: &str = "FL_NODE_READY";
/// SuperNode: the VM id (and Flower node id if known).
pub const FL_NODE_ID: &str = "FL_NODE_ID";
/// SuperNode: the Flower node id the SuperLink gave it (`SuperNode ID: <id>` in its log),
/// decimal; refreshed with each heartbeat ([`nodes::parse_node_id`]).
pub const FL_FLOWER_NODE_ID: &str = "FL_FLOWER_NODE_ID";
/// SuperLink: the Flower node ids its state holds online, and when it read them
/// ([`nodes::NodesOnline`]); refreshed with each heartbeat. The controller never replaces
/// a SuperNode for a stale heartbeat while a fresh list shows it online.
pub const FL_NODES_ONLINE: &str = "FL_NODES_ONLINE";
/// SuperNode: the public half of its Flower authentication key, an OpenSSH
/// `ecdsa-sha2-nistp256` line ([`node_key`]); the SuperLink's agent registers the keys of
/// its service's SuperNodes with Flower and unregisters the keys of nodes that left it.
pub const FL_NODE_PUBKEY: &str = "FL_NODE_PUBKEY";
/// SuperLink: `1` while its state holds a run running, else `0` ([`activity`]); published
/// when it changes. For OneFlow elasticity policies (numeric: OneFlow averages `to_f`).
pub const FL_TRAINING_ACTIVE: &str = "FL_TRAINING_ACTIVE";
/// SuperNode: `1` idle, `2` training, `3` disconnected ([`activity::ClientStatus`]);
/// published when it changes. What a SuperNode role's elasticity policy averages.
pub const FL_CLIENT_STATUS: &str = "FL_CLIENT_STATUS";
/// SuperLink: the round in progress (or last run) of its newest run, decimal
/// ([`activity`]); published when it changes.
pub const FL_ROUND_NUMBER: &str = "FL_ROUND_NUMBER";
/// SuperNode: `NONE` or a short GPU description.
pub const FL_GPU: &str = "FL_GPU";
/// Both: RFC 3339 time the supervisor last saw Flower healthy.
pub const FL_HEARTBEAT: &str = "FL_HEARTBEAT";
/// Both: last error, one line; removed when the condition clears.
pub const FL_ERROR: &str = "FL_ERROR";
/// Both: the context's warnings (unknown `ONEAPP_FL_*` names with a did-you-mean, values
/// accepted but not applied), one line joined by ` -- `; removed when there are none.
pub const FL_WARNING: &str = "FL_WARNING";
/// SuperLink: the cluster's default run configuration from its `ONEAPP_FL_*` training
/// variables: base64 of its `--run-config` form ([`run_config::encode_attribute`]);
/// `submit` passes it unless overridden.
pub const FL_RUN_CONFIG: &str = "FL_RUN_CONFIG";
/// Controller → SuperLink: a generation number; rotate the serving certificate now.
pub const FL_ROTATE_REQUEST: &str = "FL_ROTATE_REQUEST";
/// Controller → SuperLink, written with `FL_ROTATE_REQUEST`: the validity (`humantime`,
/// e.g. `720h`) of the certificate to issue, so a changed `spec.tls.validity` reaches a
/// SuperLink whose context still carries the value it booted with.
pub const FL_ROTATE_VALIDITY: &str = "FL_ROTATE_VALIDITY";
/// Controller → SuperLink, written with `FL_ROTATE_REQUEST`: the controller's Ed25519
/// signature of the request ([`signing`]). A SuperLink acts on no request without it.
pub const FL_ROTATE_SIG: &str = "FL_ROTATE_SIG";

/// Controller → SuperLink: the SuperNode keys of the cluster's other sites (SuperNodes in
/// another OpenNebula zone, whose OneGate the SuperLink cannot read), to register with
/// Flower besides its own service's: [`node_key::encode_set`], `NONE` for none. Written only
/// for multi-site clusters (and once `NONE` when the last remote key goes).
pub const FL_SITE_NODE_KEYS: &str = "FL_SITE_NODE_KEYS";
/// Controller → SuperLink, written with `FL_SITE_NODE_KEYS`: the controller's Ed25519
/// signature of the VM id and the key set ([`signing`]). A SuperLink ignores a set without it.
pub const FL_SITE_NODE_KEYS_SIG: &str = "FL_SITE_NODE_KEYS_SIG";

/// Longest certificate validity a spec (`spec.tls.validity`), the context
/// (`ONEAPP_FL_CERT_VALIDITY`) or a rotation request may ask for: 20 years. Longer is
/// refused where it is read, and the agent's date arithmetic is checked besides (a huge
/// validity once overflowed and panicked the agent).
pub const MAX_CERT_VALIDITY: std::time::Duration =
    std::time::Duration::from_secs(20 * 365 * 86_400);

/// SuperLink → controller: the generation last rotated.
pub const FL_ROTATE_DONE: &str = "FL_ROTATE_DONE";

/// Every `FL_*` attribute the agent may publish (the controller never writes these).
pub const AGENT_ATTRIBUTES: &[&str] = &[
    READY,
    FL_ROLE,
    FL_VERSION,
    FL_READY,
    FL_ENDPOINT,
    FL_TLS,
    FL_NODE_AUTH,
    FL_CA_CERT,
    FL_CERT_NOT_AFTER,
    FL_NODE_READY,
    FL_NODE_ID,
    FL_FLOWER_NODE_ID,
    FL_NODES_ONLINE,
    FL_NODE_PUBKEY,
    FL_GPU,
    FL_HEARTBEAT,
    FL_ERROR,
    FL_WARNING,
    FL_RUN_CONFIG,
    FL_ROTATE_DONE,
    FL_TRAINING_ACTIVE,
    FL_CLIENT_STATUS,
    FL_ROUND_NUMBER,
];

/// Whether the controller needs user-template attribute `key` of a VM: OneFlow's
/// `SERVICE_ID` / `ROLE_NAME` tags and the protocol attributes. Observation keeps only
/// these (20,000 VMs' full user templates would dominate the controller's memory).
pub fn observed_attribute(key: &str) -> bool {
    matches!(key, "SERVICE_ID" | "ROLE_NAME")
        || AGENT_ATTRIBUTES.contains(&key)
        || CONTROLLER_ATTRIBUTES.contains(&key)
}

/// Every attribute the controller may write (agents never write these).
pub const CONTROLLER_ATTRIBUTES: &[&str] = &[
    FL_ROTATE_REQUEST,
    FL_ROTATE_VALIDITY,
    FL_ROTATE_SIG,
    FL_SITE_NODE_KEYS,
    FL_SITE_NODE_KEYS_SIG,
];

/// The `ONEAPP_*` context variables: the contract between [`crate::render`] (which writes
/// them into the OneFlow template) and [`crate::agent`] (which reads them from
/// `/run/one-context/one_env`). Empty values mean unset.
pub mod context {
    // --- both roles -----------------------------------------------------------------
    /// Flower version, `X.Y.Z`.
    pub const FLOWER_VERSION: &str = "ONEAPP_FLOWER_VERSION";
    /// `YES` / `NO`.
    pub const TLS_ENABLED: &str = "ONEAPP_FL_TLS_ENABLED";
    /// `DEBUG|INFO|WARNING|ERROR`.
    pub const LOG_LEVEL: &str = "ONEAPP_FL_LOG_LEVEL";
    /// `text|json`.
    pub const LOG_FORMAT: &str = "ONEAPP_FL_LOG_FORMAT";
    /// `subprocess|process`.
    pub const ISOLATION: &str = "ONEAPP_FL_ISOLATION";
    /// `docker|process`: how the agent runs Flower.
    pub const RUNTIME: &str = "ONEAPP_FL_RUNTIME";
    /// Process runtime: directory holding `flower-superlink`, `flower-supernode`, `flower-superexec`.
    pub const FLOWER_BIN_DIR: &str = "ONEAPP_FL_FLOWER_BIN_DIR";
    /// Time between `FL_HEARTBEAT` refreshes: a duration (`30s`, `2m`; a bare number is
    /// seconds). Rendered from `spec.supernodes.failurePolicy.heartbeatInterval`.
    pub const HEARTBEAT_INTERVAL: &str = "ONEAPP_FL_HEARTBEAT_INTERVAL";
    /// Name of the cluster (for logs and reports only).
    pub const CLUSTER_NAME: &str = "ONEAPP_FL_CLUSTER_NAME";
    /// `superlink|supernode`: the node's role when the image was not installed for one
    /// (process runtime); otherwise the agent uses the installed role or OneGate's `ROLE_NAME`.
    pub const ROLE: &str = "ONEAPP_FL_ROLE";
    /// SuperLink: base64 Ed25519 public key of the controller; rotation requests must carry
    /// its signature (`FL_ROTATE_SIG`). Unset: the SuperLink acts on no rotation request.
    pub const CONTROLLER_KEY: &str = "ONEAPP_FL_CONTROLLER_KEY";
    /// W3C `traceparent` of the controller span that created (or scaled) the service: the
    /// agent's spans continue that trace ([`super::trace_context`]). Written when the
    /// service body is sent, never planned: it is no part of the spec and causes no drift.
    pub const TRACEPARENT: &str = "ONEAPP_FL_TRACEPARENT";
    /// Base URL of the OTLP/HTTP collector the agent sends its spans to (`/v1/traces` is
    /// appended, as for `OTEL_EXPORTER_OTLP_ENDPOINT`); unset: the agent exports nothing.
    /// From the controller's `--vm-otlp-endpoint`, written with [`TRACEPARENT`].
    pub const OTLP_ENDPOINT: &str = "ONEAPP_FL_OTLP_ENDPOINT";

    // --- SuperLink ------------------------------------------------------------------
    /// Fleet API port (SuperNodes dial it), default 9092.
    pub const FLEET_PORT: &str = "ONEAPP_FL_FLEET_PORT";
    /// Control API port (`flwr run`), default 9093.
    pub const CONTROL_PORT: &str = "ONEAPP_FL_CONTROL_PORT";
    /// ServerAppIo API port (loopback only), default 9091.
    pub const SERVERAPPIO_PORT: &str = "ONEAPP_FL_SERVERAPPIO_PORT";
    /// Control API bind address: `loopback` (default, reach it through an SSH tunnel) or `vm`.
    pub const CONTROL_BIND: &str = "ONEAPP_FL_CONTROL_BIND";
    /// `YES` (default): persistent SQLite state, so SuperNodes reconnect after a restart.
    pub const PERSISTENT_STATE: &str = "ONEAPP_FL_PERSISTENT_STATE";
    /// Relative database path inside the state directory, default `state.db`.
    pub const DATABASE: &str = "ONEAPP_FL_DATABASE";
    /// `auto` (the SuperLink generates a CA) or `provided`.
    pub const TLS_MODE: &str = "ONEAPP_FL_TLS_MODE";
    /// Provided mode: base64 PEM CA certificate (also read by SuperNodes with a static address).
    pub const SSL_CA_CERTFILE: &str = "ONEAPP_FL_SSL_CA_CERTFILE";
    /// Provided mode: base64 PEM server certificate (chain).
    pub const SSL_CERTFILE: &str = "ONEAPP_FL_SSL_CERTFILE";
    /// Provided mode: base64 PEM server key.
    pub const SSL_KEYFILE: &str = "ONEAPP_FL_SSL_KEYFILE";
    /// Auto mode: validity of generated certificates (duration, e.g. `8760h`).
    pub const CERT_VALIDITY: &str = "ONEAPP_FL_CERT_VALIDITY";
    /// Renew the serving certificate this long before it expires (duration).
    pub const CERT_RENEW_BEFORE: &str = "ONEAPP_FL_CERT_RENEW_BEFORE";
    /// Extra SAN entries, comma separated `IP:<addr>` / `DNS:<name>`.
    pub const CERT_EXTRA_SAN: &str = "ONEAPP_FL_CERT_EXTRA_SAN";
    /// `YES` / `NO`: the agent serves Prometheus metrics (both roles; docs/metrics.md).
    pub const METRICS_ENABLED: &str = "ONEAPP_FL_METRICS_ENABLED";
    /// Metrics port on the VM address (both roles), default 9101.
    pub const METRICS_PORT: &str = "ONEAPP_FL_METRICS_PORT";
    /// Seed spelling of the Fleet API address, `host:port` ([`FLEET_PORT`] is the port).
    pub const FLEET_API_ADDRESS: &str = "ONEAPP_FL_FLEET_API_ADDRESS";
    /// Seed spelling of the Control API address, `host:port` ([`CONTROL_PORT`],
    /// [`CONTROL_BIND`]).
    pub const CONTROL_API_ADDRESS: &str = "ONEAPP_FL_CONTROL_API_ADDRESS";
    /// Default run configuration: `num-server-rounds`.
    pub const NUM_ROUNDS: &str = "ONEAPP_FL_NUM_ROUNDS";
    /// Default run configuration: `strategy` ([`super::run_config::STRATEGIES`]).
    pub const STRATEGY: &str = "ONEAPP_FL_STRATEGY";
    /// Default run configuration: `min-fit-clients` / `min-train-nodes`.
    pub const MIN_FIT_CLIENTS: &str = "ONEAPP_FL_MIN_FIT_CLIENTS";
    /// Default run configuration: `min-evaluate-clients`.
    pub const MIN_EVALUATE_CLIENTS: &str = "ONEAPP_FL_MIN_EVALUATE_CLIENTS";
    /// Default run configuration: `min-available-clients`.
    pub const MIN_AVAILABLE_CLIENTS: &str = "ONEAPP_FL_MIN_AVAILABLE_CLIENTS";
    /// Default run configuration: FedProx `proximal-mu`.
    pub const PROXIMAL_MU: &str = "ONEAPP_FL_PROXIMAL_MU";
    /// Default run configuration: FedAdam `server-lr`.
    pub const SERVER_LR: &str = "ONEAPP_FL_SERVER_LR";
    /// Default run configuration: FedAdam `client-lr`.
    pub const CLIENT_LR: &str = "ONEAPP_FL_CLIENT_LR";
    /// Default run configuration: Krum/Bulyan `num-malicious`.
    pub const NUM_MALICIOUS: &str = "ONEAPP_FL_NUM_MALICIOUS";
    /// Default run configuration: FedTrimmedAvg `trim-beta`.
    pub const TRIM_BETA: &str = "ONEAPP_FL_TRIM_BETA";
    /// `YES` / `NO`: the SuperLink prepares a checkpoint directory and the default run
    /// configuration asks the ServerApp to checkpoint.
    pub const CHECKPOINT_ENABLED: &str = "ONEAPP_FL_CHECKPOINT_ENABLED";
    /// Default run configuration: `checkpoint-interval` (rounds).
    pub const CHECKPOINT_INTERVAL: &str = "ONEAPP_FL_CHECKPOINT_INTERVAL";
    /// Checkpoint directory on the SuperLink VM (under `/opt/flower/`).
    pub const CHECKPOINT_PATH: &str = "ONEAPP_FL_CHECKPOINT_PATH";
    /// gRPC keepalive time (seconds): validated; Flower 1.25 exposes no setting for it.
    pub const GRPC_KEEPALIVE_TIME: &str = "ONEAPP_FL_GRPC_KEEPALIVE_TIME";
    /// gRPC keepalive timeout (seconds): validated; Flower 1.25 exposes no setting for it.
    pub const GRPC_KEEPALIVE_TIMEOUT: &str = "ONEAPP_FL_GRPC_KEEPALIVE_TIMEOUT";

    // --- SuperNode ------------------------------------------------------------------
    /// `pytorch|tensorflow|sklearn|none`.
    pub const FRAMEWORK: &str = "ONEAPP_FL_FRAMEWORK";
    /// Static `host:port` of the SuperLink Fleet API; empty → OneGate discovery.
    pub const SUPERLINK_ADDRESS: &str = "ONEAPP_FL_SUPERLINK_ADDRESS";
    /// `k=v k2=v2`; empty → the agent computes `partition-id`/`num-partitions`.
    pub const NODE_CONFIG: &str = "ONEAPP_FL_NODE_CONFIG";
    /// `--max-retries` (0 = unlimited).
    pub const MAX_RETRIES: &str = "ONEAPP_FL_MAX_RETRIES";
    /// `--max-wait-time` seconds (0 = unlimited).
    pub const MAX_WAIT_TIME: &str = "ONEAPP_FL_MAX_WAIT_TIME";
    /// Total time to wait for SuperLink discovery (duration), default `10m`.
    pub const DISCOVERY_TIMEOUT: &str = "ONEAPP_FL_DISCOVERY_TIMEOUT";
    /// Training data directory, mounted read-only, default `/opt/flower/data`.
    pub const DATA_DIR: &str = "ONEAPP_FL_DATA_DIR";
    /// ClientAppIo port (loopback), default 9094.
    pub const CLIENTAPPIO_PORT: &str = "ONEAPP_FL_CLIENTAPPIO_PORT";
    /// `YES` / `NO`.
    pub const GPU_ENABLED: &str = "ONEAPP_FL_GPU_ENABLED";
    /// `all` or `0,1,...`.
    pub const CUDA_VISIBLE_DEVICES: &str = "ONEAPP_FL_CUDA_VISIBLE_DEVICES";
    /// `0.0 < f <= 1.0`.
    pub const GPU_MEMORY_FRACTION: &str = "ONEAPP_FL_GPU_MEMORY_FRACTION";
    /// `YES` / `NO`: run the DCGM exporter.
    pub const DCGM_ENABLED: &str = "ONEAPP_FL_DCGM_ENABLED";
    /// `exponential|fixed`: how the waits between SuperLink discovery attempts grow.
    pub const EDGE_BACKOFF: &str = "ONEAPP_FL_EDGE_BACKOFF";
    /// Longest wait between SuperLink discovery attempts (seconds).
    pub const EDGE_MAX_BACKOFF: &str = "ONEAPP_FL_EDGE_MAX_BACKOFF";

    /// Every variable above, in declaration order (`context_names_are_all_listed` keeps it
    /// complete).
    pub const ALL: &[&str] = &[
        FLOWER_VERSION,
        TLS_ENABLED,
        LOG_LEVEL,
        LOG_FORMAT,
        ISOLATION,
        RUNTIME,
        FLOWER_BIN_DIR,
        HEARTBEAT_INTERVAL,
        CLUSTER_NAME,
        ROLE,
        CONTROLLER_KEY,
        TRACEPARENT,
        OTLP_ENDPOINT,
        FLEET_PORT,
        CONTROL_PORT,
        SERVERAPPIO_PORT,
        CONTROL_BIND,
        PERSISTENT_STATE,
        DATABASE,
        TLS_MODE,
        SSL_CA_CERTFILE,
        SSL_CERTFILE,
        SSL_KEYFILE,
        CERT_VALIDITY,
        CERT_RENEW_BEFORE,
        CERT_EXTRA_SAN,
        METRICS_ENABLED,
        METRICS_PORT,
        FLEET_API_ADDRESS,
        CONTROL_API_ADDRESS,
        NUM_ROUNDS,
        STRATEGY,
        MIN_FIT_CLIENTS,
        MIN_EVALUATE_CLIENTS,
        MIN_AVAILABLE_CLIENTS,
        PROXIMAL_MU,
        SERVER_LR,
        CLIENT_LR,
        NUM_MALICIOUS,
        TRIM_BETA,
        CHECKPOINT_ENABLED,
        CHECKPOINT_INTERVAL,
        CHECKPOINT_PATH,
        GRPC_KEEPALIVE_TIME,
        GRPC_KEEPALIVE_TIMEOUT,
        FRAMEWORK,
        SUPERLINK_ADDRESS,
        NODE_CONFIG,
        MAX_RETRIES,
        MAX_WAIT_TIME,
        DISCOVERY_TIMEOUT,
        DATA_DIR,
        CLIENTAPPIO_PORT,
        GPU_ENABLED,
        CUDA_VISIBLE_DEVICES,
        GPU_MEMORY_FRACTION,
        DCGM_ENABLED,
        EDGE_BACKOFF,
        EDGE_MAX_BACKOFF,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_names_are_all_listed() {
        let src = include_str!("mod.rs");
        let declared: Vec<&str> = src
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub const "))
            .filter_map(|l| l.split_once(": &str = \"ONEAPP_"))
            .map(|(_, rest)| rest.trim_end_matches("\";"))
            .collect();
        assert_eq!(declared.len(), context::ALL.len());
        for name in declared {
            assert!(
                context::ALL.contains(&format!("ONEAPP_{name}").as_str()),
                "{name}"
            );
        }
    }

    #[test]
    fn observation_keeps_the_tags_and_protocol_attributes_only() {
        for key in ["SERVICE_ID", "ROLE_NAME", READY, FL_CA_CERT, FL_HEARTBEAT]
            .into_iter()
            .chain([FL_ROTATE_REQUEST, FL_ROTATE_VALIDITY, FL_ROTATE_DONE])
            .chain([FL_SITE_NODE_KEYS, FL_SITE_NODE_KEYS_SIG])
        {
            assert!(observed_attribute(key), "{key}");
        }
        for key in [
            "DESCRIPTION",
            "LOGO",
            "SCHED_REQUIREMENTS",
            "FL_UNKNOWN",
            "service_id",
        ] {
            assert!(!observed_attribute(key), "{key}");
        }
    }
}
