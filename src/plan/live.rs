//! The observed state of OpenNebula, as the planner sees it.
//!
//! Independent of the client types in [`crate::one`] except for OpenNebula's state enums
//! ([`crate::one::model::states`], the one set): the controller's observe step converts what
//! the clients return into these types, so the planner stays pure and testable with
//! hand-built values. Only services carrying this controller's ownership marker appear here.
//! Agent attributes are read with the [`crate::protocol`] codecs, the same the agent writes
//! them with.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use crate::one::model::states::{LcmState, RoleState, ServiceState, VmState};
use crate::protocol::endpoint::{self, HostPort};
use crate::protocol::nodes::{parse_node_id, NodesOnline};
use crate::protocol::{self, boolean, pem, version};

/// OneFlow role name of the SuperLink in the services this controller renders.
pub const SUPERLINK_ROLE: &str = "superlink";
/// OneFlow role name of the SuperNodes.
pub const SUPERNODE_ROLE: &str = "supernode";

/// Everything the planner knows about OpenNebula at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveState {
    /// Managed services per cluster name, sorted by service id. More than one service for a
    /// cluster exists only during a redeploy (old and new) or after an outside duplicate.
    pub clusters: BTreeMap<String, Vec<LiveService>>,
    /// Services that do not carry this controller's marker: never touched, only counted.
    pub unowned_count: usize,
    /// When the observation finished.
    pub observed_at: DateTime<Utc>,
    /// `sha256:<hex>` of the canonical observation (see [`LiveState::compute_digest`]).
    pub digest: String,
    /// Values that failed validation (treated as absent) and other oddities.
    pub warnings: Vec<ObservationWarning>,
    /// The controller's last blind spell: OpenNebula could not be observed, and agents,
    /// whose OneGate lives on the same front-end, most likely could not heartbeat either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outage: Option<Outage>,
}

/// A period in which the controller could not observe OpenNebula.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    /// Start of the last successful observation before it.
    pub from: DateTime<Utc>,
    /// Start of the first successful observation after it.
    pub to: DateTime<Utc>,
}

impl Outage {
    /// How much of `[since, now]` the outage covers.
    pub fn overlap(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> chrono::Duration {
        (self.to.min(now) - self.from.max(since)).max(chrono::Duration::zero())
    }
}

impl LiveState {
    /// VM `id` of any managed service.
    pub fn vm(&self, id: u64) -> Option<&LiveVm> {
        self.clusters
            .values()
            .flatten()
            .flat_map(|s| s.superlink.nodes.iter().chain(&s.supernode.nodes))
            .find(|vm| vm.id == id)
    }

    /// The services of `cluster` (empty when none).
    pub fn services(&self, cluster: &str) -> &[LiveService] {
        self.clusters.get(cluster).map(Vec::as_slice).unwrap_or(&[])
    }

    /// sha256 of the canonical JSON of the managed services. The observation time, the
    /// digest itself, warnings, heartbeat times and the SuperLink's online list (refreshed
    /// by agents every few seconds)
    /// are left out, so two observations of an unchanged OpenNebula give the same digest.
    ///
    /// Streamed into the hash one cluster at a time: serialising 20,000 VMs into one buffer
    /// (plus a copy to blank the heartbeats) was the controller's peak memory at scale.
    pub fn compute_digest(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut hasher = HashWriter(Sha256::new());
        for (name, services) in &self.clusters {
            let mut services = services.clone();
            for vm in services.iter_mut().flat_map(|s| {
                s.superlink
                    .nodes
                    .iter_mut()
                    .chain(s.supernode.nodes.iter_mut())
            }) {
                vm.attrs.heartbeat = None;
                vm.attrs.nodes_online = None;
            }
            // Each element is one complete JSON value, so the stream is unambiguous.
            let _ = serde_json::to_writer(&mut hasher, &(name, &services));
        }
        let _ = serde_json::to_writer(&mut hasher, &self.unowned_count);
        format!("sha256:{}", hex(&hasher.0.finalize()))
    }

    /// Sort every cluster's services by id and set [`LiveState::digest`].
    pub fn seal(&mut self) {
        for services in self.clusters.values_mut() {
            services.sort_by_key(|s| s.service_id);
        }
        self.digest = self.compute_digest();
    }
}

/// Feeds what is written to a hash.
struct HashWriter<D>(D);

impl<D: sha2::Digest> std::io::Write for HashWriter<D> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Something odd the observation found; never fatal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservationWarning {
    /// Cluster concerned, when known.
    pub cluster: Option<String>,
    /// VM concerned, when known.
    pub vm_id: Option<u64>,
    /// What was wrong (never the offending value when it may be secret).
    pub message: String,
}

/// The ownership marker a managed service carries (see `render::ownership`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Cluster name.
    pub cluster: String,
    /// Hash of the spec the service was last rendered from.
    pub spec_hash: String,
    /// Id of the controller instance that owns it.
    pub controller: String,
}

/// The service that stands for a cluster among its `services` (oldest first): the newest
/// one not being undeployed, else the newest.
pub fn current_service(services: &[LiveService]) -> Option<&LiveService> {
    services
        .iter()
        .rev()
        .find(|s| !s.state.is_going_away())
        .or_else(|| services.last())
}

/// One managed OneFlow service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveService {
    /// OneFlow service (document) id.
    pub service_id: u64,
    /// Service name.
    pub name: String,
    /// Its ownership marker.
    pub owner: Owner,
    /// OneFlow service state.
    pub state: ServiceState,
    /// The flattened spec fields recorded when the controller last created or updated the
    /// service (`None` when the record is missing or unreadable).
    pub applied: Option<AppliedSpec>,
    /// The SuperLink role (cardinality 0 and no nodes when the role is missing).
    pub superlink: LiveRole,
    /// The SuperNode role.
    pub supernode: LiveRole,
}

/// The record of the applied spec kept in the service body under [`AppliedSpec::BODY_KEY`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedSpec {
    /// Record format, currently 1.
    pub format: u32,
    /// `spec.*` path → value, as produced by [`crate::plan::spec_fields`]; secrets hashed.
    pub fields: BTreeMap<String, String>,
}

impl AppliedSpec {
    /// Top-level key of the record in the OneFlow service body.
    pub const BODY_KEY: &'static str = "flower_reconcile_applied";
    /// Current record format.
    pub const FORMAT: u32 = 1;
}

/// One role of a service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveRole {
    /// `cardinality` in the service body.
    pub cardinality: u32,
    /// OneFlow role state.
    pub state: RoleState,
    /// VMs of the role that still exist, sorted by id.
    pub nodes: Vec<LiveVm>,
}

/// One VM of a role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveVm {
    /// VM id.
    pub id: u64,
    /// VM name.
    pub name: String,
    /// VM `STATE`.
    pub state: VmState,
    /// VM `LCM_STATE`.
    pub lcm_state: LcmState,
    /// Start time (`STIME`); a boot time bound for the heartbeat grace period.
    pub stime: Option<DateTime<Utc>>,
    /// The addresses of the VM's own NICs as oned lists them (no VM can write them), in
    /// document order: where its agent's metrics are scraped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
    /// Agent-published attributes, validated.
    pub attrs: AgentAttributes,
    /// The last heartbeat silence this controller saw end (memory of past observations,
    /// kept by the runtime's `HeartbeatMarks`): the heartbeat before it and the one that
    /// ended it. The heartbeat breaker counts a VM that just came back from a silence
    /// longer than the grace period as part of an outage ([`crate::plan::heartbeat_outage`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_silence: Option<Silence>,
}

/// A stretch between two heartbeats of one VM, as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    /// The heartbeat before it.
    pub from: DateTime<Utc>,
    /// The heartbeat that ended it.
    pub to: DateTime<Utc>,
}

impl LiveVm {
    /// ACTIVE/RUNNING.
    pub fn is_running(&self) -> bool {
        self.state == VmState::Active && self.lcm_state == LcmState::Running
    }

    /// Being shut down or cleaned up (a termination in flight).
    pub fn is_terminating(&self) -> bool {
        self.state == VmState::Active
            && matches!(
                self.lcm_state,
                LcmState::Shutdown | LcmState::Epilog | LcmState::CleanupDelete
            )
    }

    /// Why the VM counts as failed by its state alone (`None` when it does not).
    pub fn state_failure(&self) -> Option<NodeFailure> {
        match (self.state, self.lcm_state) {
            (VmState::CloningFailure, _) => Some(NodeFailure::FailureState),
            (VmState::Poweroff, _) => Some(NodeFailure::Poweroff),
            (VmState::Active, LcmState::Unknown) => Some(NodeFailure::Unknown),
            (VmState::Active, l) if l.is_failure() => Some(NodeFailure::FailureState),
            _ => None,
        }
    }
}

/// Why a node is considered failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeFailure {
    /// A `*_FAILURE` LCM state or CLONING_FAILURE.
    FailureState,
    /// LCM UNKNOWN (host unreachable).
    Unknown,
    /// POWEROFF, which this controller never requests.
    Poweroff,
    /// No heartbeat within the grace period.
    StaleHeartbeat,
}

impl fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeFailure::FailureState => "VM is in a failure state",
            NodeFailure::Unknown => "VM is in state UNKNOWN",
            NodeFailure::Poweroff => "VM is powered off unexpectedly",
            NodeFailure::StaleHeartbeat => "heartbeat is older than the grace period",
        })
    }
}

/// The `FL_*` (and `READY`) attributes an agent publishes, after validation. A value that
/// fails validation is absent here and reported as an [`ObservationWarning`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentAttributes {
    /// `READY=YES`.
    pub ready: bool,
    /// `FL_ROLE`.
    pub role: Option<String>,
    /// `FL_VERSION`.
    pub version: Option<String>,
    /// `FL_READY` (SuperLink).
    pub fl_ready: Option<bool>,
    /// `FL_ENDPOINT` (SuperLink), `host:port`. Observation keeps it only when its host is an
    /// address of the VM's own NICs (`reconciler::observe`): any VM of the service can write
    /// it through OneGate.
    pub endpoint: Option<HostPort>,
    /// `FL_CA_CERT` (SuperLink): the PEM CA, decoded and checked once by
    /// [`protocol::pem::decode_certificate`]; what `submit` gives `flwr` to trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
    /// `FL_CERT_NOT_AFTER` (SuperLink).
    pub cert_not_after: Option<DateTime<Utc>>,
    /// `FL_NODE_READY` (SuperNode).
    pub node_ready: Option<bool>,
    /// `FL_HEARTBEAT`.
    pub heartbeat: Option<DateTime<Utc>>,
    /// `FL_FLOWER_NODE_ID` (SuperNode): its Flower node id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flower_node_id: Option<u64>,
    /// `FL_NODES_ONLINE` (SuperLink): the Flower node ids its state holds online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_online: Option<NodesOnline>,
    /// `FL_ERROR`.
    pub error: Option<String>,
    /// `FL_WARNING`: the agent's context warnings, one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// `FL_RUN_CONFIG` (SuperLink): the cluster's default run configuration, decoded and
    /// checked ([`protocol::run_config::decode_attribute`]); what `submit` passes unless
    /// overridden.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_config: Option<String>,
    /// `FL_ROTATE_REQUEST` (written by the controller; a peer can forge it, so observation
    /// keeps it only when `FL_ROTATE_SIG` verifies).
    pub rotate_request: Option<u64>,
    /// `FL_ROTATE_VALIDITY`, as written (the signature covers the text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_validity: Option<String>,
    /// `FL_ROTATE_SIG`, as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_sig: Option<String>,
    /// `FL_ROTATE_DONE`.
    pub rotate_done: Option<u64>,
    /// `FL_SITE_NODE_KEYS` (written by the controller; a peer can forge it, so observation
    /// keeps it only when `FL_SITE_NODE_KEYS_SIG` verifies): the other sites' SuperNode keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_node_keys: Option<std::collections::BTreeSet<protocol::node_key::NodePublicKey>>,
    /// `FL_SITE_NODE_KEYS_SIG`, as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site_node_keys_sig: Option<String>,
    /// `FL_NODE_PUBKEY` (SuperNode): its Flower authentication key, which a SuperLink in
    /// another site must be given (multi-site, [`crate::plan::site::site_node_keys`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_pubkey: Option<protocol::node_key::NodePublicKey>,
}

impl AgentAttributes {
    /// Validate the user-template attributes of one VM. Returns the parsed attributes and
    /// one message per attribute that failed validation (naming the attribute, not its value).
    pub fn parse<'a, I>(attrs: I) -> (Self, Vec<String>)
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut out = Self::default();
        let mut problems = Vec::new();
        for (key, raw) in attrs {
            let value = raw.trim();
            let ok = match key {
                protocol::READY => yes_no(value).map(|b| out.ready = b).is_some(),
                protocol::FL_ROLE => matches!(value, "superlink" | "supernode")
                    .then(|| out.role = Some(value.to_string()))
                    .is_some(),
                protocol::FL_VERSION => version::is_version(value)
                    .then(|| out.version = Some(value.to_string()))
                    .is_some(),
                protocol::FL_READY => yes_no(value).map(|b| out.fl_ready = Some(b)).is_some(),
                protocol::FL_NODE_READY => {
                    yes_no(value).map(|b| out.node_ready = Some(b)).is_some()
                }
                protocol::FL_ENDPOINT => endpoint::parse(value)
                    .map(|e| out.endpoint = Some(e))
                    .is_ok(),
                protocol::FL_CA_CERT => pem::decode_certificate(value)
                    .map(|pem| out.ca_cert = Some(pem))
                    .is_ok(),
                protocol::FL_CERT_NOT_AFTER => rfc3339(value)
                    .map(|t| out.cert_not_after = Some(t))
                    .is_some(),
                protocol::FL_HEARTBEAT => rfc3339(value).map(|t| out.heartbeat = Some(t)).is_some(),
                protocol::FL_FLOWER_NODE_ID => parse_node_id(value)
                    .map(|id| out.flower_node_id = Some(id))
                    .is_ok(),
                protocol::FL_NODES_ONLINE => NodesOnline::parse(value)
                    .map(|l| out.nodes_online = Some(l))
                    .is_ok(),
                protocol::FL_ERROR => is_one_line(value)
                    .then(|| out.error = Some(value.to_string()))
                    .is_some(),
                protocol::FL_WARNING => is_one_line(value)
                    .then(|| out.warning = Some(value.to_string()))
                    .is_some(),
                protocol::FL_RUN_CONFIG => protocol::run_config::decode_attribute(value)
                    .map(|text| out.run_config = Some(text))
                    .is_ok(),
                protocol::FL_ROTATE_REQUEST => protocol::signing::parse_generation(value)
                    .map(|g| out.rotate_request = Some(g))
                    .is_some(),
                protocol::FL_ROTATE_VALIDITY => protocol::signing::parse_validity(value)
                    .map(|_| out.rotate_validity = Some(value.to_string()))
                    .is_some(),
                protocol::FL_ROTATE_SIG => (value.len() <= 128 && is_base64(value))
                    .then(|| out.rotate_sig = Some(value.to_string()))
                    .is_some(),
                protocol::FL_ROTATE_DONE => protocol::signing::parse_generation(value)
                    .map(|g| out.rotate_done = Some(g))
                    .is_some(),
                protocol::FL_SITE_NODE_KEYS => protocol::node_key::parse_set(value)
                    .map(|keys| out.site_node_keys = Some(keys))
                    .is_ok(),
                protocol::FL_SITE_NODE_KEYS_SIG => (value.len() <= 128 && is_base64(value))
                    .then(|| out.site_node_keys_sig = Some(value.to_string()))
                    .is_some(),
                protocol::FL_NODE_PUBKEY => protocol::node_key::NodePublicKey::parse(value)
                    .map(|k| out.node_pubkey = Some(k))
                    .is_ok(),
                _ => true,
            };
            if !ok {
                problems.push(format!("attribute {key} has an invalid value; ignored"));
            }
        }
        (out, problems)
    }
}

fn yes_no(v: &str) -> Option<bool> {
    boolean::parse(v)
}

fn rfc3339(v: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The shape of a signature (verified later, by [`protocol::signing`]).
fn is_base64(v: &str) -> bool {
    !v.is_empty()
        && v.len() % 4 == 0
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

fn is_one_line(v: &str) -> bool {
    v.len() <= 4096 && v.chars().all(|c| !c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_attributes_parse_and_invalid_ones_are_reported_and_dropped() {
        let (a, problems) = AgentAttributes::parse([
            ("READY", "YES"),
            ("FL_READY", "YES"),
            ("FL_ENDPOINT", "10.0.0.5:9092"),
            (
                "FL_CA_CERT",
                &pem::encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
            ),
            ("FL_CERT_NOT_AFTER", "2027-01-01T00:00:00Z"),
            ("FL_HEARTBEAT", "yesterday"),
            ("FL_ROTATE_REQUEST", "3"),
            ("FL_ROTATE_DONE", "-1"),
            ("FL_VERSION", "1.25.0"),
            ("FL_ERROR", "bad\nline"),
            ("OTHER", "anything"),
        ]);
        assert!(a.ready);
        assert_eq!(a.fl_ready, Some(true));
        assert_eq!(a.endpoint.unwrap().to_string(), "10.0.0.5:9092");
        assert_eq!(
            a.ca_cert.as_deref(),
            Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
            "the live state keeps the decoded CA"
        );
        assert!(a.cert_not_after.is_some());
        assert_eq!(a.heartbeat, None);
        assert_eq!(a.rotate_request, Some(3));
        assert_eq!(a.rotate_done, None);
        assert_eq!(a.error, None);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("FL_HEARTBEAT")));
    }

    #[test]
    fn a_node_key_is_read_with_its_codec() {
        let mut point = [7u8; 65];
        point[0] = 4;
        let key = protocol::node_key::NodePublicKey::from_point(&point).unwrap();
        let (a, problems) =
            AgentAttributes::parse([(protocol::FL_NODE_PUBKEY, key.encode().as_str())]);
        assert_eq!((a.node_pubkey, problems.len()), (Some(key), 0));
        let (a, problems) = AgentAttributes::parse([(protocol::FL_NODE_PUBKEY, "ssh-rsa AAAA")]);
        assert_eq!((a.node_pubkey, problems.len()), (None, 1));
    }

    #[test]
    fn endpoints_and_cas_are_read_with_the_protocol_codecs() {
        for (v, kept) in [
            ("host.example:9092", Some("host.example:9092")),
            ("[fd00::1]:9092", Some("[fd00::1]:9092")),
            ("fd00::1:9092", None),
            ("host", None),
            ("host:0", None),
            ("ho st:9092", None),
            ("h;rm -rf:9092", None),
        ] {
            let (a, _) = AgentAttributes::parse([("FL_ENDPOINT", v)]);
            assert_eq!(a.endpoint.map(|e| e.to_string()).as_deref(), kept, "{v}");
        }
        let (a, problems) = AgentAttributes::parse([("FL_CA_CERT", "LS0tLS1CRUdJTg==")]);
        assert_eq!(a.ca_cert, None, "base64 of no certificate is not a CA");
        assert_eq!(problems.len(), 1);
    }

    #[test]
    fn a_failure_lcm_state_is_a_failed_node() {
        let vm = |state, lcm| LiveVm {
            id: 1,
            name: "n".into(),
            state,
            lcm_state: lcm,
            stime: None,
            addresses: Vec::new(),
            last_silence: None,
            attrs: AgentAttributes::default(),
        };
        for lcm in LcmState::ALL.iter().copied().filter(|l| l.is_failure()) {
            assert_eq!(
                vm(VmState::Active, lcm).state_failure(),
                Some(NodeFailure::FailureState),
                "{lcm}"
            );
        }
        assert_eq!(vm(VmState::Active, LcmState::Running).state_failure(), None);
    }
}
