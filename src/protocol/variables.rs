//! The table of `ONEAPP_*` context variables: for each, who reads it, its default, its rule,
//! its effect, and whether the seed appliances declared it. `docs/context-variables.md` is
//! generated from this table ([`markdown`]) and a test keeps the two equal; another keeps
//! the table equal to [`super::context::ALL`], and the agent's tests check each rule.
//!
//! Owns: the documentation of each variable and the did-you-mean for unknown names.
//! Must not: parse values (the agent's `context` module does, with the codecs of
//! [`crate::protocol`]).

use super::context as ctx;

/// Which role reads a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// SuperLink and SuperNodes.
    Both,
    /// The SuperLink.
    SuperLink,
    /// The SuperNodes.
    SuperNode,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Both => "both",
            Scope::SuperLink => "SuperLink",
            Scope::SuperNode => "SuperNode",
        }
    }
}

/// How far a variable's seed meaning is honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// As documented, with the rule given.
    Honoured,
    /// Validated, but only part of its seed effect is possible; the reason. The part not
    /// applied earns a warning when it is asked for (agent log, `status`, `FL_WARNING`).
    Limited(&'static str),
}

/// One context variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variable {
    /// `ONEAPP_*` name.
    pub name: &'static str,
    /// Who reads it.
    pub scope: Scope,
    /// The value the agent applies when it is unset or empty (empty: none, or computed).
    pub default: &'static str,
    /// What is accepted; anything else stops the boot with an error naming the variable.
    pub rule: &'static str,
    /// What it does.
    pub effect: &'static str,
    /// Declared by the seed appliances (seed-facts §1.2–1.4).
    pub seed: bool,
    /// How far it is honoured.
    pub support: Support,
}

const fn v(
    name: &'static str,
    scope: Scope,
    default: &'static str,
    rule: &'static str,
    effect: &'static str,
    seed: bool,
) -> Variable {
    Variable {
        name,
        scope,
        default,
        rule,
        effect,
        seed,
        support: Support::Honoured,
    }
}

const fn limited(var: Variable, why: &'static str) -> Variable {
    Variable {
        support: Support::Limited(why),
        ..var
    }
}

use Scope::{Both, SuperLink, SuperNode};

const POS: &str = "integer ≥ 1";
const BOOL: &str = "`YES` / `NO`";
const DURATION: &str = "duration (`30s`, `2m`, `8760h`; a bare number is seconds), > 0";
const PORT: &str = "port 1–65535";
const RUN_CONFIG: &str = "published in `FL_RUN_CONFIG`";

/// Every context variable, in [`ctx::ALL`]'s order.
#[rustfmt::skip]
pub const VARIABLES: &[Variable] = &[
    v(ctx::FLOWER_VERSION, Both, "1.25.0", "`X.Y.Z`", "Flower version run (the seed's 1.31.0 default is this project's pinned 1.25.0); process runtime: another version than the image's falls back to it with a warning (the seed SuperNode's rule); docker runtime: the image tag asked for", true),
    v(ctx::TLS_ENABLED, Both, "YES", BOOL, "SuperLink: `--ssl-*` vs `--insecure`; SuperNode: trust the CA (context or OneGate, fail closed) vs `--insecure`", true),
    v(ctx::LOG_LEVEL, Both, "INFO", "`DEBUG|INFO|WARNING|ERROR`", "`FLWR_LOG_LEVEL` of Flower and the agent's level", true),
    v(ctx::LOG_FORMAT, Both, "text", "`text|json`", "format of the agent's log (Flower's own lines stay text)", true),
    v(ctx::ISOLATION, Both, "subprocess", "`subprocess|process`", "`--isolation` of SuperLink and SuperNode", true),
    v(ctx::RUNTIME, Both, "", "`docker|process`", "how the agent runs Flower (default: the image's)", false),
    v(ctx::FLOWER_BIN_DIR, Both, "", "absolute path", "process runtime: directory of the Flower executables", false),
    v(ctx::HEARTBEAT_INTERVAL, Both, "30s", DURATION, "`FL_HEARTBEAT` refresh interval", false),
    v(ctx::CLUSTER_NAME, Both, "", "1–63 of `[A-Za-z0-9._-]`", "logs and reports only", false),
    v(ctx::ROLE, Both, "", "`superlink|supernode`", "role when the image was not installed for one", false),
    v(ctx::CONTROLLER_KEY, SuperLink, "", "base64 Ed25519 public key", "rotation requests must carry its signature", false),
    v(ctx::TRACEPARENT, Both, "", "W3C `traceparent`", "the agent's spans continue the controller's trace", false),
    v(ctx::OTLP_ENDPOINT, Both, "", "http(s) URL", "where the agent exports its spans", false),
    v(ctx::FLEET_PORT, SuperLink, "9092", PORT, "Fleet API port on the VM address (`FL_ENDPOINT`)", false),
    v(ctx::CONTROL_PORT, SuperLink, "9093", PORT, "Control API port", false),
    v(ctx::SERVERAPPIO_PORT, SuperLink, "9091", PORT, "ServerAppIo API port (loopback)", false),
    v(ctx::CONTROL_BIND, SuperLink, "loopback", "`loopback|vm`", "Control API on 127.0.0.1 (SSH tunnel) or on the VM address", false),
    v(ctx::PERSISTENT_STATE, SuperLink, "YES", BOOL, "SQLite state (`--database`), so SuperNodes reconnect after a restart", false),
    v(ctx::DATABASE, SuperLink, "state.db", "relative path of `[A-Za-z0-9._/-]`, no `.`/`..` component, ≤ 255", "`--database <state dir>/<value>` (the seed's `state/state.db` works: its directory is created)", true),
    v(ctx::TLS_MODE, SuperLink, "auto", "`auto|provided`; unset and any `SSL_*` set: `provided`", "who issues the SuperLink's certificate", false),
    v(ctx::SSL_CA_CERTFILE, Both, "", "base64 PEM certificate", "operator TLS: the CA (SuperLink: with `SSL_CERTFILE` and `SSL_KEYFILE`, all or none; SuperNode: trusted instead of OneGate's `FL_CA_CERT`)", true),
    v(ctx::SSL_CERTFILE, SuperLink, "", "base64 PEM, chains to the CA", "operator TLS: server certificate; setting it implies `TLS_MODE=provided`, all or none", true),
    v(ctx::SSL_KEYFILE, SuperLink, "", "base64 PEM, matches the certificate", "operator TLS: server key (never logged); all or none", true),
    v(ctx::CERT_VALIDITY, SuperLink, "8760h", "duration ≤ 20 years", "validity of generated certificates", false),
    v(ctx::CERT_RENEW_BEFORE, SuperLink, "720h", "duration < validity", "renew the serving certificate this long before expiry", false),
    v(ctx::CERT_EXTRA_SAN, SuperLink, "", "comma list of `IP:<addr>` / `DNS:<name>`, at most 32", "extra SANs of the generated server certificate (a provided one must already hold them); the controller renders `spec.tls.extraNames`", true),
    v(ctx::METRICS_ENABLED, Both, "NO", BOOL, "the agent serves Prometheus `/metrics` (docs/metrics.md)", true),
    v(ctx::METRICS_PORT, Both, "9101", "port 1024–65535, not 9091/9092/9093", "metrics port on the VM address", true),
    limited(v(ctx::FLEET_API_ADDRESS, SuperLink, "", "`host:port`; host `0.0.0.0`, `::` or the VM address", "the port becomes `FLEET_PORT`", true), "the Fleet API always binds the VM address, never all interfaces (seed hardening); `0.0.0.0` is narrowed with a warning"),
    v(ctx::CONTROL_API_ADDRESS, SuperLink, "", "`host:port`; host `127.0.0.1`/`localhost` (loopback) or the VM address; `0.0.0.0` refused (the Control API runs submitted code)", "sets `CONTROL_PORT` and `CONTROL_BIND`", true),
    v(ctx::NUM_ROUNDS, SuperLink, "3", POS, RUN_CONFIG, true),
    v(ctx::STRATEGY, SuperLink, "FedAvg", "`FedAvg|FedProx|FedAdam|Krum|Bulyan|FedTrimmedAvg`", RUN_CONFIG, true),
    v(ctx::MIN_FIT_CLIENTS, SuperLink, "2", "integer ≥ 1; > `MIN_AVAILABLE_CLIENTS` warns", RUN_CONFIG, true),
    v(ctx::MIN_EVALUATE_CLIENTS, SuperLink, "2", "integer ≥ 1; > `MIN_AVAILABLE_CLIENTS` warns", RUN_CONFIG, true),
    v(ctx::MIN_AVAILABLE_CLIENTS, SuperLink, "2", POS, RUN_CONFIG, true),
    v(ctx::PROXIMAL_MU, SuperLink, "", "number ≥ 0; warns unless FedProx", "FedProx only; published in `FL_RUN_CONFIG`", true),
    v(ctx::SERVER_LR, SuperLink, "", "number > 0; warns unless FedAdam", "FedAdam only; published in `FL_RUN_CONFIG`", true),
    v(ctx::CLIENT_LR, SuperLink, "", "number > 0; warns unless FedAdam", "FedAdam only; published in `FL_RUN_CONFIG`", true),
    v(ctx::NUM_MALICIOUS, SuperLink, "", "integer ≥ 0; Krum needs `MIN_AVAILABLE_CLIENTS` ≥ 2f+3, Bulyan ≥ 4f+3", "Krum/Bulyan only; published in `FL_RUN_CONFIG`", true),
    v(ctx::TRIM_BETA, SuperLink, "", "number in (0, 0.5); warns unless FedTrimmedAvg", "FedTrimmedAvg only; published in `FL_RUN_CONFIG`", true),
    v(ctx::CHECKPOINT_ENABLED, SuperLink, "NO", BOOL, "the agent creates `CHECKPOINT_PATH` writable by Flower (docker: mounted at the same path) and `FL_RUN_CONFIG` carries `checkpoint-*`; the ServerApp writes the files", true),
    v(ctx::CHECKPOINT_INTERVAL, SuperLink, "5", POS, "`checkpoint-interval` in `FL_RUN_CONFIG`", true),
    v(ctx::CHECKPOINT_PATH, SuperLink, "/opt/flower/checkpoints", "absolute path under `/opt/flower/` (the agent never takes ownership of a system directory); checked when checkpointing is on", "`checkpoint-path` in `FL_RUN_CONFIG` (the seed's `/app/checkpoints` is refused with that reason)", true),
    limited(v(ctx::GRPC_KEEPALIVE_TIME, Both, "", "integer 1–86400 (s); < 10 warns", "none: validated only", true), "Flower 1.25 has no keepalive option: its Fleet server pings after 210 s idle (fixed) and SuperNodes send a heartbeat every ~30 s (fixed), which keeps NAT and load-balancer paths open"),
    limited(v(ctx::GRPC_KEEPALIVE_TIMEOUT, Both, "", "integer 1–86400 (s), < `GRPC_KEEPALIVE_TIME`", "none: validated only", true), "Flower 1.25 has no keepalive option (see `GRPC_KEEPALIVE_TIME`)"),
    v(ctx::FRAMEWORK, SuperNode, "pytorch", "`pytorch|tensorflow|sklearn|none` (the seed's `llm` is refused: no such image)", "SuperNode image", true),
    v(ctx::SUPERLINK_ADDRESS, SuperNode, "", "`host:port` (IPv6 in brackets)", "static SuperLink address; empty: OneGate discovery", true),
    v(ctx::NODE_CONFIG, SuperNode, "", "`k=v` pairs of the node-config grammar", "`--node-config`; empty: `partition-id`/`num-partitions` computed", true),
    v(ctx::MAX_RETRIES, SuperNode, "0", "integer ≥ 0", "`--max-retries` (0: unlimited)", true),
    v(ctx::MAX_WAIT_TIME, SuperNode, "0", "integer ≥ 0", "`--max-wait-time` (0: unlimited)", true),
    v(ctx::DISCOVERY_TIMEOUT, SuperNode, "10m", DURATION, "how long to wait for SuperLink discovery", false),
    v(ctx::DATA_DIR, SuperNode, "/opt/flower/data", "absolute path", "training data, mounted read-only", false),
    v(ctx::CLIENTAPPIO_PORT, SuperNode, "9094", PORT, "ClientAppIo API port (loopback)", false),
    v(ctx::GPU_ENABLED, SuperNode, "NO", BOOL, "`--gpus all` when a GPU is usable, else CPU with a warning", true),
    v(ctx::CUDA_VISIBLE_DEVICES, SuperNode, "all", "`all` or comma-separated indices", "`CUDA_VISIBLE_DEVICES` of Flower", true),
    v(ctx::GPU_MEMORY_FRACTION, SuperNode, "0.8", "number in (0, 1]", "`FL_GPU_MEMORY_FRACTION` of Flower (PyTorch soft limit)", true),
    v(ctx::DCGM_ENABLED, SuperNode, "NO", "`YES` / `NO`; without `GPU_ENABLED=YES` warns", "DCGM exporter unit (docker runtime, GPU present)", true),
    v(ctx::EDGE_BACKOFF, SuperNode, "exponential", "`exponential|fixed`", "waits between SuperLink discovery attempts: doubling from 0.5 s, or always `EDGE_MAX_BACKOFF`", true),
    v(ctx::EDGE_MAX_BACKOFF, SuperNode, "5", "integer 1–3600 (s)", "longest wait between discovery attempts (the seed's 300 suits edge nodes; unset keeps discovery prompt)", true),
];

/// The variable named `name`.
pub fn find(name: &str) -> Option<&'static Variable> {
    VARIABLES.iter().find(|v| v.name == name)
}

/// Whether the agent owns names like `name`: `ONEAPP_FL_*` and `ONEAPP_FLOWER_*`.
pub fn is_ours(name: &str) -> bool {
    name.starts_with("ONEAPP_FL_") || name.starts_with("ONEAPP_FLOWER_")
}

/// The known variable closest to an unknown `name`, when it is close (a typo, or the
/// seed's older spellings `AGG_STRATEGY` / `ML_FRAMEWORK`).
pub fn did_you_mean(name: &str) -> Option<&'static str> {
    let (best, d) = VARIABLES
        .iter()
        .map(|v| (v.name, edit_distance(name, v.name)))
        .min_by_key(|(_, d)| *d)?;
    let suffix = |n: &str| n.rsplit('_').next().unwrap_or("").to_string();
    if d <= 3 + name.len() / 10 {
        Some(best)
    } else {
        // Same last word (`..._AGG_STRATEGY` → `..._STRATEGY`).
        VARIABLES
            .iter()
            .find(|v| suffix(v.name) == suffix(name) && suffix(name).len() >= 5)
            .map(|v| v.name)
    }
}

/// Levenshtein distance over bytes (names are ASCII); inputs longer than 128 bytes are
/// treated as far from everything.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() > 128 || b.len() > 128 {
        return usize::MAX;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// `docs/context-variables.md`'s table, generated from [`VARIABLES`].
pub fn markdown_table() -> String {
    let mut s = String::from(
        "| variable | role | default | rule | effect | seed | support |\n|---|---|---|---|---|---|---|\n",
    );
    for v in VARIABLES {
        let default = if v.default.is_empty() {
            "—".to_string()
        } else {
            format!("`{}`", v.default)
        };
        let support = match v.support {
            Support::Honoured => "honoured".to_string(),
            Support::Limited(why) => format!("**limited**: {why}"),
        };
        s.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} |\n",
            v.name,
            v.scope.as_str(),
            default,
            v.rule.replace('|', "\\|"),
            v.effect.replace('|', "\\|"),
            if v.seed { "yes" } else { "" },
            support.replace('|', "\\|"),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// seed-facts.md §1.4: the 40 `ONEAPP_*` names the pre-hardening appliances declared
    /// (§1.2's 10 are among them).
    const SEED: &[&str] = &[
        "ONEAPP_FL_NUM_ROUNDS",
        "ONEAPP_FL_STRATEGY",
        "ONEAPP_FL_MIN_FIT_CLIENTS",
        "ONEAPP_FL_MIN_EVALUATE_CLIENTS",
        "ONEAPP_FL_MIN_AVAILABLE_CLIENTS",
        "ONEAPP_FL_FLEET_API_ADDRESS",
        "ONEAPP_FL_CONTROL_API_ADDRESS",
        "ONEAPP_FL_DATABASE",
        "ONEAPP_FL_PROXIMAL_MU",
        "ONEAPP_FL_SERVER_LR",
        "ONEAPP_FL_CLIENT_LR",
        "ONEAPP_FL_NUM_MALICIOUS",
        "ONEAPP_FL_TRIM_BETA",
        "ONEAPP_FL_CHECKPOINT_ENABLED",
        "ONEAPP_FL_CHECKPOINT_INTERVAL",
        "ONEAPP_FL_CHECKPOINT_PATH",
        "ONEAPP_FL_SSL_CA_CERTFILE",
        "ONEAPP_FL_SSL_CERTFILE",
        "ONEAPP_FL_SSL_KEYFILE",
        "ONEAPP_FL_CERT_EXTRA_SAN",
        "ONEAPP_FL_METRICS_ENABLED",
        "ONEAPP_FL_METRICS_PORT",
        "ONEAPP_FL_FRAMEWORK",
        "ONEAPP_FL_SUPERLINK_ADDRESS",
        "ONEAPP_FL_NODE_CONFIG",
        "ONEAPP_FL_MAX_RETRIES",
        "ONEAPP_FL_MAX_WAIT_TIME",
        "ONEAPP_FL_GPU_ENABLED",
        "ONEAPP_FL_CUDA_VISIBLE_DEVICES",
        "ONEAPP_FL_GPU_MEMORY_FRACTION",
        "ONEAPP_FL_DCGM_ENABLED",
        "ONEAPP_FL_EDGE_BACKOFF",
        "ONEAPP_FL_EDGE_MAX_BACKOFF",
        "ONEAPP_FLOWER_VERSION",
        "ONEAPP_FL_ISOLATION",
        "ONEAPP_FL_LOG_LEVEL",
        "ONEAPP_FL_TLS_ENABLED",
        "ONEAPP_FL_GRPC_KEEPALIVE_TIME",
        "ONEAPP_FL_GRPC_KEEPALIVE_TIMEOUT",
        "ONEAPP_FL_LOG_FORMAT",
    ];

    #[test]
    fn the_table_is_complete_against_the_seed_and_the_code() {
        assert_eq!(SEED.len(), 40);
        let names: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
        assert_eq!(
            names,
            ctx::ALL,
            "VARIABLES must list protocol::context::ALL in order"
        );
        for s in SEED {
            let v = find(s).unwrap_or_else(|| panic!("seed variable {s} missing"));
            assert!(v.seed, "{s} is the seed's");
        }
        for v in VARIABLES.iter().filter(|v| v.seed) {
            assert!(SEED.contains(&v.name), "{} is not the seed's", v.name);
        }
    }

    #[test]
    fn the_docs_table_is_generated_from_this_one() {
        let doc = include_str!("../../docs/context-variables.md");
        assert!(
            doc.contains(&markdown_table()),
            "docs/context-variables.md drifted: paste `protocol::variables::markdown_table()` \
             (printed by `cargo test -p flower-reconcile --lib print_variables_table -- --ignored --nocapture`)"
        );
    }

    #[test]
    #[ignore = "prints the docs table"]
    fn print_variables_table() {
        print!("{}", markdown_table());
    }

    #[test]
    fn did_you_mean_finds_typos_and_old_spellings() {
        assert_eq!(did_you_mean("ONEAPP_FL_NUM_ROUND"), Some(ctx::NUM_ROUNDS));
        assert_eq!(did_you_mean("ONEAPP_FL_LOGLEVEL"), Some(ctx::LOG_LEVEL));
        assert_eq!(did_you_mean("ONEAPP_FL_AGG_STRATEGY"), Some(ctx::STRATEGY));
        assert_eq!(did_you_mean("ONEAPP_FL_ML_FRAMEWORK"), Some(ctx::FRAMEWORK));
        assert_eq!(did_you_mean("ONEAPP_FL_ZZZZZZZZZZZZZZZZZZZZZZ"), None);
        assert_eq!(did_you_mean(&"X".repeat(5000)), None);
        assert!(is_ours("ONEAPP_FL_X") && is_ours("ONEAPP_FLOWER_X") && !is_ours("ONEAPP_SSH"));
    }
}
