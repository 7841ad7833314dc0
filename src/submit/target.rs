//! Where a submission goes: the SuperLink Control API address, the CA to trust and the
//! Flower version the CLI must match, taken from the controller's observation.
//!
//! Owns: the [`SubmitTarget`] of a cluster — from a [`LiveState`] built by
//! [`crate::reconciler::observe`], or from flags (`--address`, `--ca-file`/`--insecure`).
//! Must not: read raw VM records or decode protocol values itself: observation decodes
//! `FL_ENDPOINT` and `FL_CA_CERT` once, with the [`crate::protocol`] codecs, and keeps the
//! endpoint only when it is an address of the SuperLink VM's own NICs.
//!
//! Guarantees:
//! - The address `flwr` dials is the Control API port on the host of a verified
//!   `FL_ENDPOINT` of the cluster's newest running SuperLink: a peer VM that rewrote the
//!   SuperLink's `FL_ENDPOINT` through OneGate cannot steer `submit` to itself
//!   (`forged_endpoints_never_become_the_target`; against onesim:
//!   `tests/safety_ownership.rs`, `a_peer_s_fl_endpoint_never_becomes_the_submit_target`).
//! - A cluster that runs TLS (the SuperLink published a CA, or the applied spec does not say
//!   `tls.enabled: false`) is never dialled without its CA (`target_from_an_observation`).
//!
//! Assumptions: the applied-spec record of the service (written when the controller created
//! it) holds the Control API port and exposure; both force a replacement when changed, so the
//! service's own record is current for them.
//!
//! Caveats: with `controlApi: loopback` the Control API is reachable only through a tunnel,
//! so the caller must pass the tunnel's local end as the address.

use std::path::Path;

use super::SubmitError;
use crate::plan::LiveState;
use crate::protocol::endpoint::{self, HostPort};

/// Where and what to submit to: one cluster's SuperLink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitTarget {
    /// Cluster name; also the federation name given to `flwr`.
    pub cluster: String,
    /// `HOST:PORT` of the SuperLink Control API.
    pub control_address: String,
    /// PEM CA the SuperLink's certificate chains to; `None` means the cluster runs without TLS.
    pub ca_pem: Option<String>,
    /// Flower version the cluster runs (`X.Y.Z`).
    pub flower_version: String,
    /// The default run configuration the SuperLink published (`FL_RUN_CONFIG`, from its
    /// `ONEAPP_FL_*` training variables); `None` when it published none.
    pub default_run_config: Option<String>,
}

/// The submit target of `cluster` in one observation. The newest service with a running
/// SuperLink that published a verified `FL_ENDPOINT` wins; the Control API port, its
/// exposure and the Flower version come from the applied-spec record (`FL_VERSION` first).
/// `address_override` (the local end of a tunnel) replaces the address; with
/// `controlApi: loopback` it is required.
pub fn target_from_live(
    cluster: &str,
    live: &LiveState,
    address_override: Option<&HostPort>,
) -> Result<SubmitTarget, SubmitError> {
    let fail = |m: String| SubmitError::Target(format!("cluster {cluster}: {m}"));
    let services = live.services(cluster);
    if services.is_empty() {
        return Err(fail("no managed OneFlow service (was it applied?)".into()));
    }
    let (service, vm, fleet) = services
        .iter()
        .rev()
        .find_map(|svc| {
            svc.superlink.nodes.iter().find_map(|vm| {
                let fleet = vm.attrs.endpoint.as_ref().filter(|_| vm.is_running())?;
                Some((svc, vm, fleet))
            })
        })
        .ok_or_else(|| {
            fail(
                "no running SuperLink has published FL_ENDPOINT on one of its own addresses yet"
                    .into(),
            )
        })?;
    let applied = |key: &str| {
        service
            .applied
            .as_ref()
            .and_then(|a| a.fields.get(key))
            .map(String::as_str)
    };
    let port = match applied("spec.superlink.ports.control") {
        Some(p) => {
            endpoint::parse_port(p).map_err(|e| fail(format!("recorded Control API port: {e}")))?
        }
        None => crate::api::SuperLinkPorts::default().control,
    };
    let version = vm
        .attrs
        .version
        .as_deref()
        .or_else(|| applied("spec.flowerVersion"))
        .unwrap_or(crate::api::DEFAULT_FLOWER_VERSION);
    let ca_pem = vm.attrs.ca_cert.clone();
    if ca_pem.is_none() && applied("spec.tls.enabled") != Some("false") {
        return Err(fail(format!(
            "the SuperLink (VM {}) runs TLS but has not published a valid FL_CA_CERT",
            vm.id
        )));
    }
    let control_address = match address_override {
        Some(addr) => addr.to_string(),
        None if applied("spec.superlink.controlApi") != Some("network") => {
            return Err(fail(format!(
                "the Control API listens on the SuperLink VM's loopback (controlApi: loopback); \
                 open a tunnel (e.g. ssh -L 9093:127.0.0.1:{port} root@{}) and pass its local \
                 address with --address",
                fleet.host_text()
            )))
        }
        None => fleet.with_port(port).to_string(),
    };
    Ok(SubmitTarget {
        cluster: cluster.to_string(),
        control_address,
        ca_pem,
        flower_version: version.to_string(),
        default_run_config: vm.attrs.run_config.clone(),
    })
}

/// [`target_from_live`] over a fresh observation through `ctx`, the controller's own
/// ([`crate::reconciler::observe`]).
pub async fn discover_target(
    ctx: &crate::reconciler::Context,
    cluster: &str,
    address_override: Option<&HostPort>,
) -> Result<SubmitTarget, SubmitError> {
    let live = crate::reconciler::observe(ctx, chrono::Utc::now())
        .await
        .map_err(|e| {
            SubmitError::Target(format!("observing OpenNebula for cluster {cluster}: {e}"))
        })?;
    target_from_live(cluster, &live, address_override)
}

/// The CA in `file` (`--ca-file`): PEM, or the base64 `FL_CA_CERT` value a SuperLink
/// published, read with the shared codec ([`crate::protocol::pem`]).
pub fn read_ca_file(file: &Path) -> Result<String, SubmitError> {
    let fail = |reason: String| SubmitError::App {
        path: file.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(file).map_err(|e| fail(format!("--ca-file: {e}")))?;
    crate::protocol::pem::certificate_from_file_text(&text)
        .map_err(|e| fail(format!("--ca-file: neither PEM nor base64 PEM: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{
        AgentAttributes, AppliedSpec, LcmState, LiveRole, LiveService, LiveVm, Owner, ServiceState,
        VmState,
    };

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn superlink(id: u64, endpoint: Option<&str>, ca: Option<&str>) -> LiveVm {
        LiveVm {
            id,
            name: format!("superlink_{id}"),
            state: VmState::Active,
            lcm_state: LcmState::Running,
            stime: None,
            addresses: Vec::new(),
            last_silence: None,
            attrs: AgentAttributes {
                endpoint: endpoint.map(|e| endpoint::parse(e).unwrap()),
                version: Some("1.25.1".into()),
                ca_cert: ca.map(str::to_string),
                ..AgentAttributes::default()
            },
        }
    }

    fn live(fields: &[(&str, &str)], link: LiveVm) -> LiveState {
        let fields = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let service = LiveService {
            service_id: 7,
            name: "c1".into(),
            owner: Owner {
                cluster: "c1".into(),
                spec_hash: "h".into(),
                controller: "ctl".into(),
            },
            state: ServiceState::Running,
            applied: Some(AppliedSpec { format: 1, fields }),
            superlink: LiveRole {
                cardinality: 1,
                nodes: vec![link],
                ..LiveRole::default()
            },
            supernode: LiveRole::default(),
        };
        let mut live = LiveState::default();
        live.clusters.insert("c1".into(), vec![service]);
        live
    }

    fn network(control_api: &str) -> Vec<(&'static str, String)> {
        vec![
            ("spec.superlink.ports.control", "9443".into()),
            ("spec.superlink.controlApi", control_api.into()),
            ("spec.flowerVersion", "1.25.0".into()),
        ]
    }

    fn fields<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        v.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    #[test]
    fn target_from_an_observation() {
        let net = network("network");
        let observed = live(
            &fields(&net),
            superlink(42, Some("10.0.0.5:9092"), Some(PEM)),
        );
        let t = target_from_live("c1", &observed, None).unwrap();
        assert_eq!(
            t,
            SubmitTarget {
                cluster: "c1".into(),
                control_address: "10.0.0.5:9443".into(),
                ca_pem: Some(PEM.into()),
                flower_version: "1.25.1".into(),
                default_run_config: None,
            }
        );
        let err = target_from_live("c2", &observed, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "target: cluster c2: no managed OneFlow service (was it applied?)"
        );
        // TLS on (the spec does not turn it off) but no valid CA published yet.
        let observed = live(&fields(&net), superlink(42, Some("10.0.0.5:9092"), None));
        let err = target_from_live("c1", &observed, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "target: cluster c1: the SuperLink (VM 42) runs TLS but has not published a valid FL_CA_CERT"
        );
        // Without TLS no CA is needed.
        let mut insecure = fields(&net);
        insecure.push(("spec.tls.enabled", "false"));
        let observed = live(&insecure, superlink(42, Some("10.0.0.5:9092"), None));
        assert_eq!(
            target_from_live("c1", &observed, None).unwrap().ca_pem,
            None
        );
        // IPv6 keeps its brackets.
        let observed = live(
            &fields(&net),
            superlink(42, Some("[fd00::5]:9092"), Some(PEM)),
        );
        assert_eq!(
            target_from_live("c1", &observed, None)
                .unwrap()
                .control_address,
            "[fd00::5]:9443"
        );

        let lo = network("loopback");
        let observed = live(
            &fields(&lo),
            superlink(42, Some("10.0.0.5:9092"), Some(PEM)),
        );
        let err = target_from_live("c1", &observed, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ssh -L 9093:127.0.0.1:9443 root@10.0.0.5"),
            "{err}"
        );
        let tunnel = endpoint::parse("127.0.0.1:9093").unwrap();
        let t = target_from_live("c1", &observed, Some(&tunnel)).unwrap();
        assert_eq!(t.control_address, "127.0.0.1:9093");
    }

    #[test]
    fn forged_endpoints_never_become_the_target() {
        // Observation left FL_ENDPOINT out (not an address of the VM's NICs): there is no
        // target, and the forged address is nowhere in the error.
        let net = network("network");
        let observed = live(&fields(&net), superlink(42, None, Some(PEM)));
        let err = target_from_live("c1", &observed, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "target: cluster c1: no running SuperLink has published FL_ENDPOINT on one of its \
             own addresses yet"
        );
        // A SuperLink that is not running is not dialled either.
        let mut stopped = superlink(42, Some("10.0.0.5:9092"), Some(PEM));
        stopped.lcm_state = LcmState::Shutdown;
        assert!(target_from_live("c1", &live(&fields(&net), stopped), None).is_err());
    }

    #[test]
    fn ca_file_accepts_pem_or_the_published_base64() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), PEM).unwrap();
        let b64 = crate::protocol::pem::encode(PEM.as_bytes());
        std::fs::write(dir.path().join("ca.b64"), format!("{b64}\n")).unwrap();
        assert_eq!(read_ca_file(&dir.path().join("ca.pem")).unwrap(), PEM);
        assert_eq!(read_ca_file(&dir.path().join("ca.b64")).unwrap(), PEM);
        std::fs::write(dir.path().join("bad"), "nope").unwrap();
        let err = read_ca_file(&dir.path().join("bad"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bad: --ca-file: neither PEM nor base64 PEM"),
            "{err}"
        );
    }
}
