//! SuperNode side of the protocol: finding the SuperLink through OneGate, fetching its CA,
//! and computing the partition from the node's place in its role.
//!
//! Every value read from OneGate is re-validated; an invalid value counts as absent and is
//! reported, never used.

use std::time::Duration;

use chrono::Utc;

use super::context::{Backoff, HostPort, NodeConfig, Role};
use super::gate::Gate;
use super::tls::{self, TlsError};
use crate::one::onegate::{GateService, GateVm};
use crate::one::OneGateError;
use crate::protocol;

/// Why the SuperLink cannot be used (yet). User-facing: VM logs, `FL_ERROR`.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The service lacks a role.
    #[error("service {service} has no '{role}' role")]
    NoRole {
        /// Service id.
        service: u64,
        /// The role looked for.
        role: Role,
    },
    /// The SuperLink role has no VM.
    #[error("the superlink role has no VM yet")]
    NoSuperlinkVm,
    /// This VM is not a node of its role.
    #[error("VM {vm} is not listed in the '{role}' role")]
    NotListed {
        /// This VM.
        vm: u64,
        /// Its role.
        role: Role,
    },
    /// `FL_READY` says no (or something short).
    #[error("SuperLink VM {vm} reports FL_READY={value}")]
    NotReady {
        /// SuperLink VM id.
        vm: u64,
        /// What it says.
        value: String,
    },
    /// `FL_READY` is not a short printable value.
    #[error("SuperLink VM {0} has an invalid FL_READY")]
    InvalidReady(u64),
    /// An attribute the SuperLink has not written yet.
    #[error("SuperLink VM {vm} has not published {attr} yet")]
    Unpublished {
        /// SuperLink VM id.
        vm: u64,
        /// The attribute.
        attr: &'static str,
    },
    /// `FL_ENDPOINT` does not parse.
    #[error("SuperLink VM {vm}: {source}")]
    Endpoint {
        /// SuperLink VM id.
        vm: u64,
        /// Why.
        source: OneGateError,
    },
    /// `FL_ENDPOINT` names an address the VM does not have.
    #[error(
        "SuperLink VM {vm}: FL_ENDPOINT {endpoint} is not an address of that VM's NICs \
         (ignored: any VM of the service can write it through OneGate)"
    )]
    ForeignEndpoint {
        /// SuperLink VM id.
        vm: u64,
        /// The address it published.
        endpoint: HostPort,
    },
    /// `FL_CA_CERT` is not base64 of a PEM text.
    #[error("FL_CA_CERT {0}")]
    CaEncoding(String),
    /// `FL_CA_CERT` is not a usable CA.
    #[error("FL_CA_CERT: {0}")]
    Ca(TlsError),
    /// OneGate refused or was unreachable.
    #[error(transparent)]
    Gate(#[from] OneGateError),
    /// Discovery gave up.
    #[error(
        "SuperLink discovery timed out after {after} ({retries} retries); last problem: {last}"
    )]
    TimedOut {
        /// The timeout.
        after: String,
        /// Attempts after the first.
        retries: u32,
        /// The last attempt's failure.
        last: Box<DiscoveryError>,
    },
}

/// What the SuperLink VM publishes, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperlinkView {
    /// Its VM id.
    pub vm_id: u64,
    /// `FL_ENDPOINT`.
    pub endpoint: HostPort,
    /// `FL_TLS`.
    pub tls: Option<bool>,
    /// `FL_NODE_AUTH` (absent or unreadable: `false`).
    pub node_auth: bool,
    /// `FL_CA_CERT` decoded and validated (PEM).
    pub ca_pem: Option<String>,
}

/// The SuperLink role's VM id from the service (first node by deploy id).
pub fn superlink_vm_id(service: &GateService) -> Result<u64, DiscoveryError> {
    let role = service
        .role(Role::Superlink.as_str())
        .ok_or(DiscoveryError::NoRole {
            service: service.id,
            role: Role::Superlink,
        })?;
    role.nodes
        .iter()
        .map(|n| n.deploy_id)
        .min()
        .ok_or(DiscoveryError::NoSuperlinkVm)
}

/// Decodes and validates `FL_CA_CERT` (base64 of a PEM CA, [`protocol::pem`]).
pub fn decode_ca(b64: &str) -> Result<String, DiscoveryError> {
    let pem = protocol::pem::decode_certificate(b64).map_err(DiscoveryError::CaEncoding)?;
    tls::validate_ca(&pem, Utc::now()).map_err(DiscoveryError::Ca)?;
    Ok(pem)
}

/// Reads the SuperLink's published state from its VM. `Err` explains why it is not usable
/// yet (not ready, missing or invalid values).
pub fn read_superlink(vm: &GateVm, need_ca: bool) -> Result<SuperlinkView, DiscoveryError> {
    let unpublished = |attr| DiscoveryError::Unpublished { vm: vm.id, attr };
    match vm.attr(protocol::FL_READY) {
        Some(v) if protocol::boolean::parse(v) == Some(true) => {}
        Some(other) if other.len() < 16 && !other.contains(char::is_control) => {
            return Err(DiscoveryError::NotReady {
                vm: vm.id,
                value: other.to_string(),
            })
        }
        Some(_) => return Err(DiscoveryError::InvalidReady(vm.id)),
        None => return Err(unpublished(protocol::FL_READY)),
    }
    let endpoint = vm
        .endpoint_attr(protocol::FL_ENDPOINT)
        .map_err(|source| DiscoveryError::Endpoint { vm: vm.id, source })?
        .ok_or_else(|| unpublished(protocol::FL_ENDPOINT))?;
    if !is_own_address(vm, &endpoint) {
        return Err(DiscoveryError::ForeignEndpoint {
            vm: vm.id,
            endpoint,
        });
    }
    let tls = vm.attr(protocol::FL_TLS).and_then(protocol::boolean::parse);
    let node_auth = vm
        .attr(protocol::FL_NODE_AUTH)
        .and_then(protocol::boolean::parse)
        .unwrap_or(false);
    let ca_pem = match vm.attr(protocol::FL_CA_CERT) {
        Some(b64) => Some(decode_ca(b64)?),
        None if need_ca => return Err(unpublished(protocol::FL_CA_CERT)),
        None => None,
    };
    Ok(SuperlinkView {
        vm_id: vm.id,
        endpoint,
        tls,
        node_auth,
        ca_pem,
    })
}

/// Whether `endpoint`'s host is one of `vm`'s NIC or NIC alias addresses. oned writes the
/// NICs and OneGate cannot change them, while `FL_ENDPOINT` is writable by any VM of the
/// service: a SuperNode follows a SuperLink only to an address that VM really has.
pub fn is_own_address(vm: &GateVm, endpoint: &HostPort) -> bool {
    let Some(ip) = endpoint.ip() else {
        return false;
    };
    vm.nics
        .iter()
        .chain(&vm.nic_aliases)
        .any(|n| [n.ip, n.ip6_global, n.ip6_site, n.ip6_link, n.external_ip].contains(&Some(ip)))
}

/// One discovery attempt: `GET /service` → SuperLink VM → `GET /vms/:id`.
pub async fn discover_once<G: Gate>(
    gate: &G,
    need_ca: bool,
) -> Result<SuperlinkView, DiscoveryError> {
    let service = gate.get_service(false).await?;
    let id = superlink_vm_id(&service)?;
    let vm = gate.get_vm_by_id(id).await?;
    read_superlink(&vm, need_ca)
}

/// Polls until the SuperLink is ready and its values are valid, or `timeout` passes,
/// waiting `backoff` between attempts (`ONEAPP_FL_EDGE_BACKOFF` / `_MAX_BACKOFF`). The
/// error names the last problem seen.
pub async fn discover<G: Gate>(
    gate: &G,
    need_ca: bool,
    timeout: Duration,
    backoff: Backoff,
) -> Result<SuperlinkView, DiscoveryError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut attempt = 0u32;
    loop {
        match discover_once(gate, need_ca).await {
            Ok(v) => return Ok(v),
            Err(why) => {
                let wait = backoff.wait(attempt);
                if tokio::time::Instant::now() + wait > deadline {
                    return Err(DiscoveryError::TimedOut {
                        after: humantime::format_duration(timeout).to_string(),
                        retries: attempt,
                        last: Box::new(why),
                    });
                }
                if attempt % 5 == 0 {
                    tracing::info!(problem = %why, "waiting for the SuperLink");
                }
                attempt += 1;
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// `partition-id` / `num-partitions` from the VM's index in its role (sorted by deploy id).
pub fn partition_of(
    service: &GateService,
    role: Role,
    vmid: u64,
) -> Result<NodeConfig, DiscoveryError> {
    let r = service.role(role.as_str()).ok_or(DiscoveryError::NoRole {
        service: service.id,
        role,
    })?;
    let mut ids: Vec<u64> = r.nodes.iter().map(|n| n.deploy_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let index = ids
        .iter()
        .position(|id| *id == vmid)
        .ok_or(DiscoveryError::NotListed { vm: vmid, role })?;
    Ok(NodeConfig::partition(index, ids.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::one::onegate::parse_service_document;
    use serde_json::json;

    fn service(nodes: &[u64]) -> GateService {
        let nodes: Vec<_> = nodes
            .iter()
            .map(|id| json!({"deploy_id": id, "running": null, "vm_info": {"VM": {"ID": id.to_string(), "UID": "0", "GID": "0", "UNAME": "oneadmin", "GNAME": "oneadmin", "NAME": format!("vm-{id}")}}}))
            .collect();
        parse_service_document(&json!({"SERVICE": {"name": "fl", "id": "5", "state": 2, "roles": [
            {"name": "superlink", "cardinality": 1, "state": 2, "nodes": [{"deploy_id": 3, "running": null, "vm_info": {"VM": {"ID": "3", "UID": "0", "GID": "0", "UNAME": "oneadmin", "GNAME": "oneadmin", "NAME": "link"}}}]},
            {"name": "supernode", "cardinality": nodes.len(), "state": 2, "nodes": nodes}
        ]}}))
        .unwrap()
    }

    #[test]
    fn partition_by_sorted_deploy_id() {
        let s = service(&[12, 7, 9]);
        assert_eq!(
            partition_of(&s, Role::Supernode, 7).unwrap().as_context(),
            "partition-id=0 num-partitions=3"
        );
        assert_eq!(
            partition_of(&s, Role::Supernode, 9).unwrap().as_context(),
            "partition-id=1 num-partitions=3"
        );
        assert_eq!(
            partition_of(&s, Role::Supernode, 12).unwrap().as_context(),
            "partition-id=2 num-partitions=3"
        );
        assert_eq!(
            partition_of(&s, Role::Supernode, 99)
                .unwrap_err()
                .to_string(),
            "VM 99 is not listed in the 'supernode' role"
        );
        assert_eq!(superlink_vm_id(&s).unwrap(), 3);
    }

    /// In-memory gate: the SuperLink VM publishes after `ready_after` calls.
    struct MemGate {
        calls: std::sync::atomic::AtomicUsize,
        ready_after: usize,
        endpoint: &'static str,
    }

    impl Gate for MemGate {
        async fn get_vm(&self) -> Result<GateVm, crate::one::OneGateError> {
            unreachable!()
        }
        async fn get_vm_by_id(&self, id: u64) -> Result<GateVm, crate::one::OneGateError> {
            let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut vm = GateVm {
                id,
                nics: vec![crate::one::onegate::GateNic {
                    ip: Some("10.0.0.3".parse().unwrap()),
                    ..Default::default()
                }],
                ..Default::default()
            };
            if n >= self.ready_after {
                vm.user_template
                    .insert(protocol::FL_READY.into(), "YES".into());
                vm.user_template
                    .insert(protocol::FL_ENDPOINT.into(), self.endpoint.into());
            }
            Ok(vm)
        }
        async fn update_vm(&self, _: &[(&str, &str)]) -> Result<(), crate::one::OneGateError> {
            Ok(())
        }
        async fn delete_vm_attribute(&self, _: &str) -> Result<(), crate::one::OneGateError> {
            Ok(())
        }
        async fn get_service(&self, _: bool) -> Result<GateService, crate::one::OneGateError> {
            Ok(service(&[7]))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn discovery_backs_off_and_times_out() {
        let g = MemGate {
            calls: 0.into(),
            ready_after: 6,
            endpoint: "10.0.0.3:9092",
        };
        let t0 = tokio::time::Instant::now();
        let v = discover(&g, false, Duration::from_secs(60), Backoff::default())
            .await
            .unwrap();
        assert_eq!(v.endpoint.to_string(), "10.0.0.3:9092");
        // 0.5 + 1 + 2 + 4 + 5 + 5 seconds of backoff before the 7th attempt.
        assert_eq!(t0.elapsed(), Duration::from_millis(17_500));

        let g = MemGate {
            calls: 0.into(),
            ready_after: usize::MAX,
            endpoint: "",
        };
        let e = discover(&g, false, Duration::from_secs(600), Backoff::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("SuperLink discovery timed out after 10m (")
                && e.contains("; last problem: SuperLink VM 3 has not published FL_READY yet"),
            "{e}"
        );

        let g = MemGate {
            calls: 0.into(),
            ready_after: 0,
            endpoint: "10.0.0.3:9092`id`",
        };
        let e = discover(&g, false, Duration::from_secs(3), Backoff::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("FL_ENDPOINT"), "{e}");
    }

    #[test]
    fn backoff_follows_the_edge_variables() {
        let b = Backoff::default();
        assert_eq!(b.wait(0), Duration::from_millis(500));
        assert_eq!(b.wait(1), Duration::from_secs(1));
        assert_eq!(b.wait(3), Duration::from_secs(4));
        assert_eq!(b.wait(4), Duration::from_secs(5));
        assert_eq!(b.wait(60), Duration::from_secs(5));
        let edge = Backoff {
            exponential: true,
            max: Duration::from_secs(300),
        };
        assert_eq!(edge.wait(8), Duration::from_secs(128));
        assert_eq!(edge.wait(9), Duration::from_secs(256));
        assert_eq!(edge.wait(10), Duration::from_secs(300));
        assert_eq!(edge.wait(u32::MAX), Duration::from_secs(300));
        let fixed = Backoff {
            exponential: false,
            max: Duration::from_secs(7),
        };
        assert_eq!(
            (fixed.wait(0), fixed.wait(9)),
            (Duration::from_secs(7), Duration::from_secs(7))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_backoff_from_the_context_paces_discovery() {
        let c = crate::agent::context::Config::from_context(
            &crate::agent::context::Context::from_pairs([
                (crate::protocol::context::EDGE_BACKOFF, "fixed"),
                (crate::protocol::context::EDGE_MAX_BACKOFF, "2"),
            ]),
        )
        .unwrap();
        let g = MemGate {
            calls: 0.into(),
            ready_after: 3,
            endpoint: "10.0.0.3:9092",
        };
        let t0 = tokio::time::Instant::now();
        discover(&g, false, Duration::from_secs(60), c.backoff)
            .await
            .unwrap();
        assert_eq!(t0.elapsed(), Duration::from_secs(6), "three waits of 2 s");
    }
}
