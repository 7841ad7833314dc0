//! The `FlowerCluster` resource types.
//!
//! Doc comments here are user documentation: they become the JSON Schema descriptions and
//! the text of `flower-reconcile explain`. Defaults live next to the fields they belong to.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `apiVersion` of every FlowerCluster.
pub const API_VERSION: &str = "flower.opennebula.io/v1alpha1";
/// `kind` of every FlowerCluster.
pub const KIND: &str = "FlowerCluster";
/// Flower version used when a spec does not name one.
pub const DEFAULT_FLOWER_VERSION: &str = crate::protocol::version::DEFAULT;

/// A Flower federated-learning cluster on OpenNebula: one SuperLink that coordinates
/// training and aggregates model updates, and N SuperNodes that train on private data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlowerCluster {
    /// Always `flower.opennebula.io/v1alpha1`.
    pub api_version: String,
    /// Always `FlowerCluster`.
    pub kind: String,
    /// Name, labels and annotations of the cluster.
    pub metadata: ObjectMeta,
    /// The desired state of the cluster.
    pub spec: FlowerClusterSpec,
}

/// Identity of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Cluster name: a DNS-1123 label (lowercase letters, digits and `-`, at most 63
    /// characters, starting and ending with a letter or digit). It names the OneFlow
    /// service and must be unique across all specs a controller watches.
    pub name: String,
    /// Free-form labels, copied into the status.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Free-form annotations; the controller ignores them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The desired state of a Flower cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlowerClusterSpec {
    /// Flower version (`X.Y.Z`) run by the SuperLink and every SuperNode. Keep `flwr` on
    /// your workstation on the same minor version: mixed minors break `flwr run`.
    /// Changing it redeploys the cluster.
    #[serde(default = "default_flower_version")]
    pub flower_version: String,
    /// How the appliance agent runs Flower on every VM: `process` (default; the pinned
    /// Flower virtualenv every image carries) or `docker` (images built with
    /// `RUNTIME=docker`). Rendered explicitly as `ONEAPP_FL_RUNTIME`, so no VM depends on an
    /// image default.
    #[serde(default)]
    pub runtime: FlowerRuntime,
    /// Where and how the cluster runs on OpenNebula.
    pub opennebula: OpenNebulaSpec,
    /// TLS between SuperNodes, `flwr` and the SuperLink.
    #[serde(default)]
    pub tls: TlsSpec,
    /// The SuperLink: coordinates rounds and aggregates updates.
    #[serde(default)]
    pub superlink: SuperLinkSpec,
    /// The SuperNodes: train on local data.
    #[serde(default)]
    pub supernodes: SuperNodesSpec,
    /// Default run configuration for runs submitted with `flower-reconcile submit`.
    #[serde(default)]
    pub training: TrainingSpec,
    /// Log level and format of the appliance agents and Flower.
    #[serde(default)]
    pub logging: LoggingSpec,
    /// When true the controller leaves this cluster alone: no action is planned or applied.
    #[serde(default)]
    pub suspend: bool,
    /// What happens to the OneFlow service when this spec is removed. `Retain` (default)
    /// never destroys a running service; `Delete` undeploys it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Set by the controller only, on the derived spec of a cluster's part in another site
    /// ([`crate::plan::site`]): never in a spec file (validation refuses it), left out of
    /// the schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(skip)]
    pub part: Option<PartOf>,
}

/// What makes a derived spec a site part: the SuperLink its SuperNodes dial, given
/// through their context because OneGate, which would tell them, is zone-local.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartOf {
    /// The home cluster.
    pub cluster: String,
    /// The site.
    pub site: String,
    /// `host:port` of the home SuperLink (`ONEAPP_FL_SUPERLINK_ADDRESS`).
    pub superlink_address: String,
    /// The home SuperLink's CA, base64 of the PEM (`ONEAPP_FL_SSL_CA_CERTFILE`); with TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<String>,
}

fn default_flower_version() -> String {
    DEFAULT_FLOWER_VERSION.to_string()
}

/// OpenNebula placement of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenNebulaSpec {
    /// VM template per role (built from the flower-agent appliance images).
    pub templates: RoleTemplates,
    /// Virtual network the VMs attach to (name or numeric id).
    pub network: ObjectRef,
    /// OneFlow service options.
    #[serde(default)]
    pub oneflow: OneFlowOptions,
}

/// VM template references, one per role. Changing one redeploys the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoleTemplates {
    /// VM template of the SuperLink (name or numeric id).
    pub superlink: ObjectRef,
    /// VM template of the SuperNodes (name or numeric id).
    pub supernode: ObjectRef,
}

/// A reference to an OpenNebula object by numeric id or by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ObjectRef {
    /// Numeric object id.
    Id(u32),
    /// Object name (must be unique for the user).
    Name(String),
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectRef::Id(id) => write!(f, "#{id}"),
            ObjectRef::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// OneFlow service options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OneFlowOptions {
    /// `straight` deploys the SuperLink before the SuperNodes; `none` deploys all at once.
    #[serde(default)]
    pub deployment: Deployment,
    /// Wait for each VM to report `READY=YES` through OneGate before a role counts as running.
    #[serde(default = "yes")]
    pub ready_status_gate: bool,
    /// How OneFlow shuts VMs down when the service is undeployed or scaled in.
    #[serde(default)]
    pub shutdown_action: ShutdownAction,
}

impl Default for OneFlowOptions {
    fn default() -> Self {
        Self {
            deployment: Deployment::default(),
            ready_status_gate: true,
            shutdown_action: ShutdownAction::default(),
        }
    }
}

fn yes() -> bool {
    true
}

/// OneFlow deployment strategy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Deployment {
    /// Roles deploy in dependency order (SuperLink first).
    #[default]
    Straight,
    /// All roles deploy at once.
    None,
}

/// OneFlow `shutdown_action`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ShutdownAction {
    /// Graceful ACPI shutdown, then delete.
    #[default]
    #[serde(rename = "terminate")]
    Terminate,
    /// Immediate power-off, then delete.
    #[serde(rename = "terminate-hard")]
    TerminateHard,
}

/// TLS settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSpec {
    /// Encrypt the Fleet and Control APIs. Turning it off sends model updates in clear.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `auto`: the SuperLink generates a CA and its serving certificate at boot and
    /// publishes the CA through OneGate. `provided`: use the certificates in `provided`.
    #[serde(default)]
    pub mode: TlsMode,
    /// Certificates for `mode: provided`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provided: Option<ProvidedTls>,
    /// Validity of generated certificates (`mode: auto`), e.g. `8760h`.
    #[serde(default = "default_validity")]
    pub validity: HumanDuration,
    /// Rotate the serving certificate when it expires within this duration, e.g. `720h`.
    #[serde(default = "default_renew_before")]
    pub renew_before: HumanDuration,
    /// Extra names of the generated serving certificate (`mode: auto`): IP addresses and
    /// DNS names clients dial besides the SuperLink VM's own address, e.g. a floating IP,
    /// a NAT or DNS name, the address SuperNodes in other sites reach. At most 32. A
    /// provided certificate carries its own names. Changing it redeploys the cluster (a
    /// running SuperLink cannot see a new context).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_names: Vec<String>,
}

impl Default for TlsSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: TlsMode::default(),
            provided: None,
            validity: default_validity(),
            renew_before: default_renew_before(),
            extra_names: Vec::new(),
        }
    }
}

fn default_validity() -> HumanDuration {
    HumanDuration::from_hours(24 * 365)
}

fn default_renew_before() -> HumanDuration {
    HumanDuration::from_hours(24 * 30)
}

/// Where TLS material comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// The SuperLink generates its own CA.
    #[default]
    Auto,
    /// Certificates are supplied in the spec.
    Provided,
}

/// Operator-provided TLS material. Each item is a PEM file or inline base64 PEM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvidedTls {
    /// CA certificate SuperNodes trust.
    pub ca_cert: PemSource,
    /// Serving certificate (SAN must hold the SuperLink address), optionally with its chain.
    pub cert: PemSource,
    /// Private key of the serving certificate. Never printed in plans or logs.
    pub key: PemSource,
}

/// PEM material from a file (relative to the spec file) or inline base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PemSource {
    /// Path of a PEM file, relative to the spec file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Base64 of the PEM text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
}

impl fmt::Debug for PemSource {
    // Inline material may be a private key: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemSource")
            .field("file", &self.file)
            .field("inline", &self.inline.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The SuperLink VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SuperLinkSpec {
    /// Virtual CPUs.
    #[serde(default = "two")]
    pub vcpu: u32,
    /// Memory in MiB.
    #[serde(default = "default_superlink_memory")]
    pub memory: u32,
    /// Keep Flower's state in a SQLite database on the VM disk. SuperNodes reconnect after
    /// a SuperLink restart only when it has one, so keep this on.
    #[serde(default = "yes")]
    pub persistent_state: bool,
    /// Flower API ports.
    #[serde(default)]
    pub ports: SuperLinkPorts,
    /// Where the Control API (used by `flwr run` and `flower-reconcile submit`) listens:
    /// `loopback` (reach it through an SSH tunnel) or `network` (the VM address; it is
    /// TLS-protected when TLS is on, but anyone who reaches it can submit code).
    #[serde(default)]
    pub control_api: ControlApiAccess,
    /// How Flower runs ServerApps: `subprocess` (default) or `process`.
    #[serde(default)]
    pub isolation: Isolation,
    /// Prometheus metrics of the SuperLink's agent: the training metrics derived from
    /// Flower's state (rounds, losses, clients, run status), its phase and certificate.
    #[serde(default)]
    pub metrics: MetricsSpec,
}

impl Default for SuperLinkSpec {
    fn default() -> Self {
        Self {
            vcpu: 2,
            memory: default_superlink_memory(),
            persistent_state: true,
            ports: SuperLinkPorts::default(),
            control_api: ControlApiAccess::default(),
            isolation: Isolation::default(),
            metrics: MetricsSpec::default(),
        }
    }
}

fn two() -> u32 {
    2
}

fn default_superlink_memory() -> u32 {
    4096
}

/// SuperLink API ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SuperLinkPorts {
    /// Fleet API: SuperNodes connect here.
    #[serde(default = "default_fleet_port")]
    pub fleet: u16,
    /// Control API: `flwr run` connects here.
    #[serde(default = "default_control_port")]
    pub control: u16,
    /// ServerAppIo API: internal, always on loopback (it is never encrypted).
    #[serde(default = "default_serverappio_port")]
    pub serverappio: u16,
}

impl Default for SuperLinkPorts {
    fn default() -> Self {
        Self {
            fleet: default_fleet_port(),
            control: default_control_port(),
            serverappio: default_serverappio_port(),
        }
    }
}

fn default_fleet_port() -> u16 {
    9092
}
fn default_control_port() -> u16 {
    9093
}
fn default_serverappio_port() -> u16 {
    9091
}

/// Where the Control API listens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ControlApiAccess {
    /// 127.0.0.1 on the SuperLink VM.
    #[default]
    Loopback,
    /// The SuperLink VM's address.
    Network,
}

/// How the appliance agent runs Flower.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FlowerRuntime {
    /// `flower-superlink` / `flower-supernode` from the image's virtualenv.
    #[default]
    Process,
    /// The `flwr/*` container images under systemd.
    Docker,
}

/// Flower app isolation mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Flower starts the app in a subprocess.
    #[default]
    Subprocess,
    /// The app runs in a separately managed process.
    Process,
}

/// Prometheus metrics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsSpec {
    /// The role's agents serve Prometheus metrics on `port` of their VM address
    /// (`ONEAPP_FL_METRICS_*`), and the controller lists them as targets in its
    /// `/api/v1/sd` (labels cluster, role, service_id, vm_id). See docs/metrics.md.
    #[serde(default)]
    pub enabled: bool,
    /// Metrics port.
    #[serde(default = "default_metrics_port")]
    pub port: u16,
}

impl MetricsSpec {
    /// Off, on the default port.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for MetricsSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            port: default_metrics_port(),
        }
    }
}

fn default_metrics_port() -> u16 {
    9101
}

/// The SuperNode role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SuperNodesSpec {
    /// Number of SuperNodes. Changing it scales the role in place.
    #[serde(default = "two")]
    pub count: u32,
    /// Lower bound for scaling (OneFlow `min_vms`). 1 ≤ min ≤ count.
    #[serde(default = "one")]
    pub min: u32,
    /// Upper bound for scaling (OneFlow `max_vms`). count ≤ max.
    #[serde(default = "default_max")]
    pub max: u32,
    /// Virtual CPUs per SuperNode.
    #[serde(default = "two")]
    pub vcpu: u32,
    /// Memory per SuperNode in MiB (PyTorch training needs room: 8192 by default).
    #[serde(default = "default_supernode_memory")]
    pub memory: u32,
    /// Flower `--node-config` entries passed to every SuperNode. Empty: each node gets
    /// `partition-id` (its index in the role) and `num-partitions` (the role size).
    /// Keys: letters, digits, `-`, `_` and single inner dots; values: letters, digits and
    /// `._:/+-` (e.g. `data:/mnt/x+y`). Numbers and booleans reach Flower as such, any
    /// other value as a string.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_config: BTreeMap<String, String>,
    /// Directory of the training data on the SuperNode VMs (mounted read-only).
    #[serde(default = "default_data_dir")]
    pub data_dir: String,
    /// ML framework image variant on the SuperNodes.
    #[serde(default)]
    pub framework: Framework,
    /// GPU settings.
    #[serde(default)]
    pub gpu: GpuSpec,
    /// Elastic scaling rules, mapped to OneFlow `elasticity_policies` (bounded by min/max).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elasticity: Option<ElasticitySpec>,
    /// Replace failed SuperNodes (OneFlow itself never does).
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Reconnection behaviour of the SuperNodes when the SuperLink is unreachable.
    #[serde(default)]
    pub reconnect: ReconnectSpec,
    /// The edge profile, for SuperNodes on intermittent links: present (`edge: {}` takes
    /// every default), the nodes back off longer between discovery attempts and one that
    /// went offline is replaced only after `offlineGrace`, not `failurePolicy.gracePeriod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge: Option<EdgeSpec>,
    /// Prometheus metrics of the SuperNodes' agents: node health, certificate, GPUs.
    // Left out when default, so specs written before it record and plan as before.
    #[serde(default, skip_serializing_if = "MetricsSpec::is_default")]
    pub metrics: MetricsSpec,
    /// SuperNode groups in other OpenNebula sites (zones or clouds), each named in the
    /// controller's configuration (`[sites.NAME]`), never here: a spec picks a site, it
    /// cannot say where a site is or with which credentials. Each group is a OneFlow
    /// service of SuperNodes only in its site, dialling this cluster's SuperLink
    /// (docs/multi-site.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<SiteSuperNodes>,
}

/// A SuperNode group in another site (`supernodes.sites[i]`). The other SuperNode
/// settings (resources, framework, failure policy, …) are the home group's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SiteSuperNodes {
    /// The site's name in the controller's configuration (`[sites.NAME]`).
    pub site: String,
    /// Number of SuperNodes in the site.
    #[serde(default = "one")]
    pub count: u32,
    /// Lower bound for scaling (OneFlow `min_vms`). 1 ≤ min ≤ count.
    #[serde(default = "one")]
    pub min: u32,
    /// Upper bound for scaling (OneFlow `max_vms`). count ≤ max.
    #[serde(default = "default_max")]
    pub max: u32,
    /// The site's VM template for SuperNodes.
    pub templates: SiteTemplates,
    /// The site's virtual network for the SuperNodes.
    pub network: ObjectRef,
    /// `host:port` the site's SuperNodes dial to reach the SuperLink (a hub's WireGuard
    /// address, a public address or name); with TLS its host must be in `tls.extraNames`.
    /// Default: the SuperLink's published Fleet endpoint (reachable when the sites share
    /// a routed network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superlink_address: Option<String>,
}

/// VM templates of a remote site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SiteTemplates {
    /// VM template of the SuperNodes (name or numeric id).
    pub supernode: ObjectRef,
}

impl Default for SuperNodesSpec {
    fn default() -> Self {
        Self {
            count: 2,
            min: 1,
            max: default_max(),
            vcpu: 2,
            memory: default_supernode_memory(),
            node_config: BTreeMap::new(),
            data_dir: default_data_dir(),
            framework: Framework::default(),
            gpu: GpuSpec::default(),
            elasticity: None,
            failure_policy: FailurePolicy::default(),
            reconnect: ReconnectSpec::default(),
            edge: None,
            metrics: MetricsSpec::default(),
            sites: Vec::new(),
        }
    }
}

fn one() -> u32 {
    1
}
fn default_max() -> u32 {
    10
}
fn default_supernode_memory() -> u32 {
    8192
}
fn default_data_dir() -> String {
    "/opt/flower/data".to_string()
}

/// ML framework variant of the SuperNode image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Framework {
    /// PyTorch.
    #[default]
    Pytorch,
    /// TensorFlow.
    Tensorflow,
    /// scikit-learn.
    Sklearn,
    /// Flower only; the app brings its own dependencies.
    None,
}

/// GPU settings of the SuperNodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuSpec {
    /// Use GPUs when the VM has them (falls back to CPU with a warning).
    #[serde(default)]
    pub enabled: bool,
    /// `all`, or a list of device indices such as `[0, 1]`.
    #[serde(default)]
    pub cuda_visible_devices: CudaDevices,
    /// Fraction of GPU memory a training process may use, in [0.01, 1].
    #[serde(default = "default_memory_fraction")]
    pub memory_fraction: f64,
    /// Run the NVIDIA DCGM exporter for GPU metrics.
    #[serde(default)]
    pub dcgm_exporter: bool,
}

impl Default for GpuSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            cuda_visible_devices: CudaDevices::default(),
            memory_fraction: default_memory_fraction(),
            dcgm_exporter: false,
        }
    }
}

fn default_memory_fraction() -> f64 {
    0.8
}

/// Which GPUs a SuperNode sees: the word `all` or a list of device indices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CudaDevices {
    /// Every device.
    #[default]
    All,
    /// Device indices.
    List(Vec<u32>),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum CudaDevicesRepr {
    Word(String),
    List(Vec<u32>),
}

impl Serialize for CudaDevices {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            CudaDevices::All => s.serialize_str("all"),
            CudaDevices::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for CudaDevices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match CudaDevicesRepr::deserialize(d)? {
            CudaDevicesRepr::Word(w) if w == "all" => Ok(CudaDevices::All),
            CudaDevicesRepr::Word(w) => Err(serde::de::Error::custom(format!(
                "expected `all` or a list of device indices such as [0, 1], found {w:?}"
            ))),
            CudaDevicesRepr::List(l) => Ok(CudaDevices::List(l)),
        }
    }
}

impl JsonSchema for CudaDevices {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "CudaDevices".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "`all`, or a list of device indices such as `[0, 1]`.",
            "oneOf": [
                {"type": "string", "enum": ["all"]},
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
            ]
        })
    }
}

/// Elastic scaling of the SuperNode role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ElasticitySpec {
    /// Time OneFlow waits after a scaling action before evaluating again.
    #[serde(default = "default_cooldown")]
    pub cooldown: HumanDuration,
    /// Rules; each maps to one OneFlow elasticity policy.
    pub policies: Vec<ElasticityPolicy>,
}

fn default_cooldown() -> HumanDuration {
    HumanDuration::from_secs(300)
}

/// One elasticity rule: when `expression` holds for `periodNumber` evaluations spaced
/// `period` apart, change the cardinality by `adjust`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ElasticityPolicy {
    /// How `adjust` applies.
    #[serde(rename = "type")]
    pub kind: AdjustmentType,
    /// Amount: nodes (CHANGE), target count (CARDINALITY) or percent (PERCENTAGE_CHANGE).
    pub adjust: i32,
    /// OneFlow expression over attributes the VMs publish, e.g. `FL_CLIENT_STATUS > 1.5`.
    pub expression: String,
    /// Consecutive true evaluations needed.
    #[serde(default = "one")]
    pub period_number: u32,
    /// Time between evaluations.
    #[serde(default = "default_period")]
    pub period: HumanDuration,
    /// Minimum step for PERCENTAGE_CHANGE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_adjust_step: Option<u32>,
    /// Cooldown after this rule fired (defaults to the elasticity cooldown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown: Option<HumanDuration>,
}

fn default_period() -> HumanDuration {
    HumanDuration::from_secs(60)
}

/// OneFlow elasticity adjustment type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AdjustmentType {
    /// Add `adjust` nodes (negative removes).
    Change,
    /// Set the count to `adjust`.
    Cardinality,
    /// Change the count by `adjust` percent.
    PercentageChange,
}

/// Replacement of failed SuperNodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailurePolicy {
    /// Terminate a failed SuperNode VM and scale the role back to `count`.
    #[serde(default = "yes")]
    pub replace: bool,
    /// A node is failed when its VM is in a failure/UNKNOWN/unexpected POWEROFF state, or
    /// its heartbeat is older than this. Counted from boot, so booting nodes are not failed.
    /// At least 3 × `heartbeatInterval`.
    #[serde(default = "default_grace")]
    pub grace_period: HumanDuration,
    /// How often the agents of both roles publish their heartbeat (`FL_HEARTBEAT`).
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval: HumanDuration,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            replace: true,
            grace_period: default_grace(),
            heartbeat_interval: default_heartbeat_interval(),
        }
    }
}

/// The agent's own default (`ONEAPP_FL_HEARTBEAT_INTERVAL` unset).
fn default_heartbeat_interval() -> HumanDuration {
    HumanDuration::from_secs(30)
}

fn default_grace() -> HumanDuration {
    HumanDuration::from_secs(600)
}

/// SuperNode reconnection (`--max-retries`, `--max-wait-time`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReconnectSpec {
    /// Maximum reconnection attempts; 0 means unlimited.
    #[serde(default)]
    pub max_retries: u32,
    /// Maximum seconds spent reconnecting; 0 means unlimited.
    #[serde(default)]
    pub max_wait_time: u32,
}

/// The edge profile of the SuperNodes (the seed's edge variant, seed-facts §8.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EdgeSpec {
    /// How long an edge SuperNode may stay unreachable (no heartbeat, or its VM in UNKNOWN
    /// because its host is) before it is replaced. At least `failurePolicy.gracePeriod`,
    /// which still decides readiness: an offline edge node is not ready, only kept.
    #[serde(default = "default_offline_grace")]
    pub offline_grace: HumanDuration,
    /// Longest wait between the agent's SuperLink discovery attempts, which double up to
    /// it (`ONEAPP_FL_EDGE_MAX_BACKOFF`; the seed's edge value, 300 s, by default).
    #[serde(default = "default_edge_max_backoff")]
    pub max_backoff: HumanDuration,
}

impl Default for EdgeSpec {
    fn default() -> Self {
        Self {
            offline_grace: default_offline_grace(),
            max_backoff: default_edge_max_backoff(),
        }
    }
}

fn default_offline_grace() -> HumanDuration {
    HumanDuration::from_secs(3600)
}

fn default_edge_max_backoff() -> HumanDuration {
    HumanDuration::from_secs(300)
}

/// Run configuration for runs submitted through `flower-reconcile submit`. It reaches the
/// ServerApp as `--run-config`; the app decides what to do with each key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainingSpec {
    /// Aggregation strategy and its parameters.
    #[serde(default)]
    pub strategy: StrategySpec,
    /// Number of federated rounds.
    #[serde(default = "three")]
    pub num_rounds: u32,
    /// Clients sampled for training each round.
    #[serde(default = "two")]
    pub min_fit_clients: u32,
    /// Clients sampled for evaluation each round.
    #[serde(default = "two")]
    pub min_evaluate_clients: u32,
    /// Clients that must be connected before a round starts.
    #[serde(default = "two")]
    pub min_available_clients: u32,
    /// Model checkpoints written by the ServerApp.
    #[serde(default)]
    pub checkpointing: CheckpointSpec,
    /// Extra run-config entries passed verbatim (keys and values as in `nodeConfig`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub run_config: BTreeMap<String, ConfigValue>,
}

impl Default for TrainingSpec {
    fn default() -> Self {
        Self {
            strategy: StrategySpec::default(),
            num_rounds: 3,
            min_fit_clients: 2,
            min_evaluate_clients: 2,
            min_available_clients: 2,
            checkpointing: CheckpointSpec::default(),
            run_config: BTreeMap::new(),
        }
    }
}

fn three() -> u32 {
    3
}

/// A run-config value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ConfigValue {
    /// Boolean.
    Bool(bool),
    /// Integer.
    Int(i64),
    /// Floating point number.
    Float(f64),
    /// String.
    String(String),
}

/// Aggregation strategy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StrategySpec {
    /// Strategy name.
    #[serde(default)]
    pub name: StrategyName,
    /// FedProx proximal term μ (≥ 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proximal_mu: Option<f64>,
    /// FedAdam server learning rate η (> 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_learning_rate: Option<f64>,
    /// FedAdam client learning rate η_l (> 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_learning_rate: Option<f64>,
    /// Krum/Bulyan: number of malicious clients tolerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_malicious_clients: Option<u32>,
    /// FedTrimmedAvg: fraction trimmed from each end, in (0, 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trim_beta: Option<f64>,
    /// Fraction of connected clients sampled for training, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction_train: Option<f64>,
    /// Fraction of connected clients sampled for evaluation, in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction_evaluate: Option<f64>,
}

/// Flower aggregation strategies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StrategyName {
    /// Federated averaging.
    #[default]
    FedAvg,
    /// FedAvg with a proximal term (heterogeneous data).
    FedProx,
    /// Adaptive server optimiser (Adam).
    FedAdam,
    /// Byzantine-robust selection.
    Krum,
    /// Byzantine-robust Krum + trimmed mean.
    Bulyan,
    /// Coordinate-wise trimmed mean.
    FedTrimmedAvg,
}

impl StrategyName {
    /// Flower's name, one of [`crate::protocol::run_config::STRATEGIES`].
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyName::FedAvg => "FedAvg",
            StrategyName::FedProx => "FedProx",
            StrategyName::FedAdam => "FedAdam",
            StrategyName::Krum => "Krum",
            StrategyName::Bulyan => "Bulyan",
            StrategyName::FedTrimmedAvg => "FedTrimmedAvg",
        }
    }
}

/// Model checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Write checkpoints.
    #[serde(default)]
    pub enabled: bool,
    /// Every this many rounds.
    #[serde(default = "five")]
    pub interval: u32,
    /// Directory on the SuperLink VM.
    #[serde(default = "default_checkpoint_path")]
    pub path: String,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: 5,
            path: default_checkpoint_path(),
        }
    }
}

fn five() -> u32 {
    5
}
fn default_checkpoint_path() -> String {
    "/opt/flower/checkpoints".to_string()
}

/// Logging of the agents and Flower.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoggingSpec {
    /// Log level.
    #[serde(default)]
    pub level: LogLevel,
    /// Log line format.
    #[serde(default)]
    pub format: LogFormat,
}

/// Log level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum LogLevel {
    /// Everything.
    Debug,
    /// Normal operation.
    #[default]
    Info,
    /// Problems only.
    Warning,
    /// Errors only.
    Error,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// What removing a spec does to its OneFlow service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Leave the service running (it is no longer managed).
    #[default]
    Retain,
    /// Undeploy the service.
    Delete,
}

/// A duration written the human way: `90s`, `30m`, `720h`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// `hours` hours.
    pub const fn from_hours(hours: u64) -> Self {
        Self(Duration::from_secs(hours * 3600))
    }

    /// The duration.
    pub const fn get(self) -> Duration {
        self.0
    }

    /// As a signed clock offset; durations beyond chrono's range saturate to its maximum,
    /// so deadlines built from them never arrive (checked arithmetic on them fails).
    pub fn as_chrono(self) -> chrono::Duration {
        chrono::Duration::from_std(self.0).unwrap_or(chrono::Duration::MAX)
    }
}

// The grammar is the protocol's ([`crate::protocol::duration`]): the agent reads what the
// renderer prints from these.
impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::protocol::duration::format(self.0))
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::protocol::duration::parse(s)
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration {s:?}: {e}"))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration such as `90s`, `30m`, `720h` or `1h 30m`, or plain seconds.",
            "maxLength": crate::protocol::duration::MAX_LEN,
            "pattern": "^\\s*([0-9]+|[0-9]+\\s*[a-zA-Z]+(\\s*[0-9]+\\s*[a-zA-Z]+)*)\\s*$"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_in_the_human_form() {
        let d: HumanDuration = "720h".parse().unwrap();
        assert_eq!(d.get(), Duration::from_secs(720 * 3600));
        assert_eq!(d.to_string(), "720h");
        assert_eq!("30m".parse::<HumanDuration>().unwrap().to_string(), "30m");
        assert!("soon".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn cuda_devices_accept_all_or_a_list_only() {
        let all: CudaDevices = serde_json::from_str("\"all\"").unwrap();
        assert_eq!(all, CudaDevices::All);
        let list: CudaDevices = serde_json::from_str("[0, 2]").unwrap();
        assert_eq!(list, CudaDevices::List(vec![0, 2]));
        assert!(serde_json::from_str::<CudaDevices>("\"some\"").is_err());
        assert_eq!(serde_json::to_string(&CudaDevices::All).unwrap(), "\"all\"");
    }

    #[test]
    fn pem_source_debug_never_prints_inline_material() {
        let p = PemSource {
            file: None,
            inline: Some("c2VjcmV0LWtleQ==".into()),
        };
        let shown = format!("{p:?}");
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn a_minimal_spec_gets_every_default() {
        let spec: FlowerClusterSpec = serde_json::from_value(serde_json::json!({
            "opennebula": {
                "templates": {"superlink": "flower-superlink", "supernode": 7},
                "network": "private"
            }
        }))
        .unwrap();
        assert_eq!(spec.flower_version, DEFAULT_FLOWER_VERSION);
        assert!(spec.tls.enabled);
        assert_eq!(spec.tls.renew_before.to_string(), "720h");
        assert_eq!(spec.supernodes.count, 2);
        assert_eq!(spec.superlink.ports.fleet, 9092);
        assert!(spec.superlink.persistent_state);
        assert!(spec.opennebula.oneflow.ready_status_gate);
        assert_eq!(spec.opennebula.templates.supernode, ObjectRef::Id(7));
        assert_eq!(spec.deletion_policy, DeletionPolicy::Retain);
    }
}
