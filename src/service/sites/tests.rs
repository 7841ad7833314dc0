//! The derived source the site loops reconcile.

use super::*;
use crate::plan::tests::{converged, desired, spec};
use std::path::Path;

const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn home_spec(name: &str, sites: &[&str]) -> crate::api::FlowerCluster {
    let sites: Vec<_> = sites
        .iter()
        .map(|s| serde_json::json!({"site": s, "templates": {"supernode": 3}, "network": 4}))
        .collect();
    spec(
        name,
        serde_json::json!({"tls": {"enabled": false}, "supernodes": {"sites": sites}}),
    )
}

fn source(clusters: &[crate::api::FlowerCluster], held: &[&str]) -> SourceState {
    SourceState {
        snapshot: Some(Arc::new(Snapshot {
            revision: "r1".into(),
            clusters: clusters
                .iter()
                .map(|c| {
                    (
                        c.metadata.name.clone(),
                        SourcedCluster {
                            cluster: c.clone(),
                            file: format!("{}.yaml", c.metadata.name).into(),
                            spec_hash: crate::api::spec_hash(c),
                        },
                    )
                })
                .collect(),
            held: held
                .iter()
                .map(|n| (n.to_string(), format!("{n}.yaml").into()))
                .collect(),
            errors: vec![],
            confirmed: true,
            allow_delete: Some(BTreeSet::from(["a".to_string()])),
        })),
        ..SourceState::default()
    }
}

#[test]
fn nothing_is_derived_before_the_home_observation() {
    let a = home_spec("a", &["b"]);
    assert!(derived_state("b", &source(std::slice::from_ref(&a), &[]), None).is_none());
    let live = converged(&desired(vec![a]));
    assert!(derived_state("b", &SourceState::default(), Some(&live)).is_none());
}

#[test]
fn parts_are_the_clusters_placed_in_the_site() {
    let (a, c) = (home_spec("a", &["b"]), home_spec("c", &["other"]));
    let live = converged(&desired(vec![a.clone(), c.clone()]));
    let state = derived_state("b", &source(&[a, c], &[]), Some(&live)).unwrap();
    let snap = state.snapshot.unwrap();
    assert_eq!(snap.clusters.keys().collect::<Vec<_>>(), ["a--b"]);
    let part = &snap.clusters["a--b"];
    assert_eq!(part.file, PathBuf::from("a.yaml"));
    assert_eq!(part.spec_hash, crate::api::spec_hash(&part.cluster));
    assert!(part.cluster.spec.part.is_some());
    assert!(snap.held.is_empty() && snap.errors.is_empty());
    assert!(snap.confirmed);
    assert_eq!(
        snap.allow_delete,
        Some(BTreeSet::from(["a--b".to_string()])),
        "the marker's cluster names are the parts' in a site"
    );
    assert_eq!(
        named_sites(&source(&[home_spec("x", &["b", "c"])], &[])),
        BTreeMap::from([
            ("b".to_string(), BTreeSet::from(["x".to_string()])),
            ("c".to_string(), BTreeSet::from(["x".to_string()])),
        ])
    );
}

#[test]
fn waiting_and_broken_home_clusters_hold_their_parts() {
    let mut a = home_spec("a", &["b"]);
    a.spec.tls.enabled = true;
    // Converged, but the SuperLink has published no CA: the part waits.
    let live = converged(&desired(vec![a.clone()]));
    let state = derived_state("b", &source(&[a.clone()], &["broken"]), Some(&live)).unwrap();
    let snap = state.snapshot.unwrap();
    assert!(snap.clusters.is_empty());
    assert_eq!(
        snap.held,
        BTreeMap::from([
            ("a--b".to_string(), PathBuf::from("a.yaml")),
            ("broken--b".to_string(), PathBuf::from("broken.yaml")),
        ])
    );
    assert_eq!(snap.errors.len(), 1);
    assert!(
        snap.errors[0]
            .message
            .starts_with("a--b: waiting for the home SuperLink")
            && snap.errors[0].file == Path::new("a.yaml"),
        "{:?}",
        snap.errors
    );
    // Once the CA is published, the part is derived.
    let mut live = live;
    for s in live.clusters.values_mut().flatten() {
        s.superlink.nodes[0].attrs.ca_cert = Some(CA.into());
    }
    let snap = derived_state("b", &source(&[a], &[]), Some(&live))
        .unwrap()
        .snapshot
        .unwrap();
    assert_eq!(snap.clusters.keys().collect::<Vec<_>>(), ["a--b"]);
    assert!(snap.held.is_empty());
}
