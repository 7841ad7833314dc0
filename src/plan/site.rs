//! Multi-site federation (issue #18 item 3): a cluster's SuperNode group in another
//! OpenNebula site, derived as a desired cluster of that site (its "part").
//!
//! Owns: the part's name (`<cluster>--<site>`), the derivation (from the home spec, the
//! home live view and the site's name to the part a site's loop reconciles), and the
//! remote nodes' keys the home SuperLink must admit.
//! Must not: do I/O, read the clock, or know where a site is or its credentials (those
//! are only in the controller's configuration, `service::config`).
//!
//! # Guarantees
//! - Pure: the same inputs give the same part (`tests::a_part_carries_the_home_superlinks_address_and_ca`).
//! - A part is only derived from a SuperLink that is serving (`FL_READY`, `FL_ENDPOINT`,
//!   and with TLS `FL_CA_CERT`) in a service carrying the spec's current replacement
//!   fields; otherwise it waits with a reason, which a site's loop turns into a hold of the
//!   part as it is: never a deletion (`tests::a_part_waits_while_the_superlink_has_not_published`).
//! - A new CA (a redeploy of the home cluster) changes the part's hash, so the part is
//!   updated (`tests::a_new_ca_changes_the_part`).
//!
//! # Assumptions
//! - `FL_ENDPOINT` and `FL_CA_CERT` were validated by observation (endpoint host among
//!   the VM's own addresses, CA a PEM certificate).
//!
//! # Caveats
//! - Partition ids: a part's SuperNodes derive `partition-id` from their index in their
//!   own role, as the home ones do; give `nodeConfig` explicitly when the data must not
//!   overlap.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::desired::{replacement_fields, spec_fields};
use super::live::{LiveService, LiveState};
use super::ready::{split_current, superlink_serving};
use crate::api::{FlowerCluster, PartOf, SiteSuperNodes};
use crate::protocol::endpoint::{self, HostPort};
use crate::protocol::node_key::NodePublicKey;
use crate::protocol::pem;

/// Between a cluster's name and a site's in a part's name.
pub const PART_SEPARATOR: &str = "--";

/// The name of `cluster`'s part in `site` (its OneFlow service and ownership marker).
pub fn part_name(cluster: &str, site: &str) -> String {
    format!("{cluster}{PART_SEPARATOR}{site}")
}

/// The cluster a name of a part in `site` belongs to (`None`: not a part of that site).
pub fn cluster_of_part<'a>(name: &'a str, site: &str) -> Option<&'a str> {
    name.strip_suffix(site)?
        .strip_suffix(PART_SEPARATOR)
        .filter(|c| !c.is_empty())
}

/// A cluster's part in one site: what the site's loop plans, renders and applies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SitePart {
    /// `<cluster>--<site>`.
    pub name: String,
    /// The home cluster.
    pub cluster: String,
    /// The site.
    pub site: String,
    /// The derived spec: the home spec with the site's count, bounds, template and
    /// network, no sites of its own, and `spec.part` naming the SuperLink its SuperNodes
    /// dial and its CA (rendered as `ONEAPP_FL_SUPERLINK_ADDRESS` and
    /// `ONEAPP_FL_SSL_CA_CERTFILE`: OneGate, which would tell them, is zone-local). Only
    /// its SuperNode role is rendered.
    pub spec: FlowerCluster,
    /// [`crate::api::spec_hash`] of `spec`: a new CA or address changes it.
    pub spec_hash: String,
}

/// The outcome of deriving one part.
#[derive(Debug, Clone, PartialEq)]
pub enum PartDerivation {
    /// The part as it should be.
    Ready(Box<SitePart>),
    /// Not derivable yet (the home SuperLink has not published what the part needs): the
    /// part is held as it is. The reason is shown in status.
    Waiting {
        /// `<cluster>--<site>`.
        name: String,
        /// Why, one line.
        reason: String,
    },
}

impl PartDerivation {
    /// The part's name.
    pub fn name(&self) -> &str {
        match self {
            PartDerivation::Ready(p) => &p.name,
            PartDerivation::Waiting { name, .. } => name,
        }
    }
}

/// What the home SuperLink published that a remote part needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Published {
    endpoint: HostPort,
    ca_pem: Option<String>,
}

/// The newest serving SuperLink among `home`'s current services (a redeploy's outdated
/// service is going away: its CA would be replaced at once).
fn published(home: &FlowerCluster, services: &[LiveService]) -> Result<Published, String> {
    let fields = spec_fields(home);
    let wanted = replacement_fields(&fields);
    let (current, _) = split_current(services, &wanted);
    let tls = home.spec.tls.enabled;
    let serving = current
        .iter()
        .rev()
        .filter(|s| superlink_serving(s))
        .find_map(|s| {
            s.superlink.nodes.iter().find_map(|vm| {
                let endpoint = vm.attrs.endpoint.clone()?;
                match (tls, &vm.attrs.ca_cert) {
                    (true, None) => None,
                    (true, Some(ca)) => Some(Published {
                        endpoint,
                        ca_pem: Some(ca.clone()),
                    }),
                    (false, _) => Some(Published {
                        endpoint,
                        ca_pem: None,
                    }),
                }
            })
        });
    serving.ok_or_else(|| {
        if current.is_empty() {
            "waiting for the home cluster's service".to_string()
        } else if tls {
            "waiting for the home SuperLink to publish FL_READY, FL_ENDPOINT and FL_CA_CERT"
                .to_string()
        } else {
            "waiting for the home SuperLink to publish FL_READY and FL_ENDPOINT".to_string()
        }
    })
}

/// Derive `home`'s part in `site` from the home observation `home_live`; `None` when the
/// spec places no SuperNodes there.
pub fn derive_part(
    home: &FlowerCluster,
    home_live: &LiveState,
    site: &str,
) -> Option<PartDerivation> {
    let group = home.spec.supernodes.sites.iter().find(|s| s.site == site)?;
    let name = part_name(&home.metadata.name, site);
    let published = match published(home, home_live.services(&home.metadata.name)) {
        Ok(p) => p,
        Err(reason) => return Some(PartDerivation::Waiting { name, reason }),
    };
    Some(match part_from(home, group, &published) {
        Ok(part) => PartDerivation::Ready(Box::new(part)),
        Err(reason) => PartDerivation::Waiting { name, reason },
    })
}

/// Every part in `site` of the clusters `homes`, by part name.
pub fn derive_parts<'a>(
    homes: impl IntoIterator<Item = &'a FlowerCluster>,
    home_live: &LiveState,
    site: &str,
) -> BTreeMap<String, PartDerivation> {
    homes
        .into_iter()
        .filter_map(|c| derive_part(c, home_live, site))
        .map(|d| (d.name().to_string(), d))
        .collect()
}

fn part_from(
    home: &FlowerCluster,
    group: &SiteSuperNodes,
    published: &Published,
) -> Result<SitePart, String> {
    let address = match &group.superlink_address {
        Some(a) => endpoint::parse(a).map_err(|e| format!("superlinkAddress: {e}"))?,
        None => published.endpoint.clone(),
    };
    let mut spec = home.clone();
    spec.metadata.name = part_name(&home.metadata.name, &group.site);
    let nodes = &mut spec.spec.supernodes;
    nodes.count = group.count;
    nodes.min = group.min;
    nodes.max = group.max;
    nodes.sites.clear();
    // Elasticity expressions are the home role's; a part keeps its count.
    nodes.elasticity = None;
    spec.spec.opennebula.templates.supernode = group.templates.supernode.clone();
    // No SuperLink is rendered in a part; the field is kept well-formed.
    spec.spec.opennebula.templates.superlink = group.templates.supernode.clone();
    spec.spec.opennebula.network = group.network.clone();
    spec.spec.part = Some(PartOf {
        cluster: home.metadata.name.clone(),
        site: group.site.clone(),
        superlink_address: address.to_string(),
        ca_cert: published
            .ca_pem
            .as_deref()
            .map(|ca| pem::encode(ca.as_bytes())),
    });
    Ok(SitePart {
        name: spec.metadata.name.clone(),
        cluster: home.metadata.name.clone(),
        site: group.site.clone(),
        spec_hash: crate::api::spec_hash(&spec),
        spec,
    })
}

/// The Flower keys of the SuperNodes of part `part` in a site's observation `site_live`:
/// what the home SuperLink must register for them (it registers its own service's nodes
/// only). Every VM the part's services list counts, running or not: a key dropped is
/// revoked for good, so a node powered off or rebooting keeps its key until it leaves the
/// part (the SuperLink's own service nodes are treated the same way by its agent). Keys a
/// VM publishes are peer-writable within its service (see [`crate::protocol::node_key`]):
/// a part's VMs can only name keys for their own part.
pub fn site_node_keys(site_live: &LiveState, part: &str) -> BTreeSet<NodePublicKey> {
    site_live
        .services(part)
        .iter()
        .flat_map(|s| &s.supernode.nodes)
        .filter_map(|vm| vm.attrs.node_pubkey.clone())
        .collect()
}

/// The keys of `cluster`'s SuperNodes in other sites, which its SuperLink must accept
/// (`FL_SITE_NODE_KEYS`): those its parts' VMs publish in each site's newest complete
/// observation (`site_view`). While any of its sites has none (not yet observed since the
/// controller started, or never reached), the keys its SuperLink holds now (`home`) are
/// kept as well: a key dropped is revoked for good (Flower never registers an unregistered
/// key again), so only a view of every site drops one
/// (`tests::site_keys_drop_only_on_a_view_of_every_site`).
pub fn wanted_site_keys(
    cluster: &FlowerCluster,
    home: &LiveState,
    site_view: impl Fn(&str) -> Option<std::sync::Arc<LiveState>>,
) -> BTreeSet<NodePublicKey> {
    let name = &cluster.metadata.name;
    let mut keys = BTreeSet::new();
    let mut every_site = true;
    for group in &cluster.spec.supernodes.sites {
        match site_view(&group.site) {
            Some(site) => keys.extend(site_node_keys(&site, &part_name(name, &group.site))),
            None => every_site = false,
        }
    }
    if !every_site {
        keys.extend(held_site_keys(home, name).into_iter().flatten().cloned());
    }
    keys
}

/// The other sites' keys `name`'s SuperLink holds now (its verified `FL_SITE_NODE_KEYS`,
/// on the running SuperLink VM of its newest service not going away).
pub fn held_site_keys<'a>(live: &'a LiveState, name: &str) -> Option<&'a BTreeSet<NodePublicKey>> {
    super::live::current_service(live.services(name))?
        .superlink
        .nodes
        .iter()
        .find(|vm| vm.is_running())?
        .attrs
        .site_node_keys
        .as_ref()
}

#[cfg(test)]
mod tests;
