//! The status of a `FlowerCluster`: written by the controller, never read from spec files.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of one cluster, as the controller last saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowerClusterStatus {
    /// Source revision (Git commit sha or directory digest) the spec was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_revision: Option<String>,
    /// Hash of the spec the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_spec_hash: Option<String>,
    /// OneFlow service id, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<u64>,
    /// Ready, Reconciling, Degraded and Stalled.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The Fleet endpoint the SuperLink published (`ip:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superlink_endpoint: Option<String>,
    /// SuperNode counts.
    #[serde(default)]
    pub nodes: NodeCounts,
    /// Expiry of the SuperLink's serving certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<DateTime<Utc>>,
    /// The most recent reconcile results, newest first.
    #[serde(default)]
    pub last_reconciles: Vec<ReconcileRecord>,
}

/// Desired and observed SuperNode counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    /// `spec.supernodes.count`.
    pub desired: u32,
    /// VMs ACTIVE/RUNNING.
    pub running: u32,
    /// Registered with the SuperLink and heartbeating.
    pub ready: u32,
    /// Failed (failure state, UNKNOWN, unexpected POWEROFF, stale heartbeat).
    pub failed: u32,
}

/// A Kubernetes-style condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type.
    #[serde(rename = "type")]
    pub kind: ConditionType,
    /// Whether the condition holds.
    pub status: ConditionStatus,
    /// One CamelCase word saying why.
    pub reason: String,
    /// A sentence for humans.
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: DateTime<Utc>,
}

/// The condition types a cluster reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionType {
    /// The service runs, the SuperLink serves and `count` SuperNodes are ready.
    Ready,
    /// The controller is changing something.
    Reconciling,
    /// Running, but with failed or missing nodes.
    Degraded,
    /// Reconciliation cannot progress without a human (bad spec, repeated errors).
    Stalled,
}

/// `True`, `False` or `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// Holds.
    True,
    /// Does not hold.
    False,
    /// Not known yet.
    Unknown,
}

/// The outcome of one reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileRecord {
    /// When it started.
    pub time: DateTime<Utc>,
    /// Trace id, to find it in the tracing backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Actions applied, one line each.
    pub actions: Vec<String>,
    /// `ok` or the error.
    pub outcome: String,
}
