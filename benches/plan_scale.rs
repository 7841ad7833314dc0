//! Scale benchmark of observe-join and plan: 1,000 clusters / 20,000 VMs.
//!
//! Prints: the time to join one observation (service listing + VM pages) into a live state,
//! the time to plan all clusters, the number of API requests one observation needs (counted
//! on a backend that serves the synthetic pool in pages of 2,000), and the process RSS.
//! Run with `cargo bench --bench plan_scale`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use flower_reconcile::api::FlowerCluster;
use flower_reconcile::controller::{
    build_live, observe, BackendError, BackendFuture, Context, Document, OneBackend, OneDialect,
    ReconcileOptions, VmRecord,
};
use flower_reconcile::plan::{plan, spec_fields, AppliedSpec, DesiredCluster, DesiredState};
use serde_json::json;

const CLUSTERS: u64 = 1_000;
const NODES_PER_CLUSTER: u64 = 19; // + 1 SuperLink = 20 VMs per cluster

fn cluster(i: u64) -> FlowerCluster {
    serde_json::from_value(json!({
        "apiVersion": flower_reconcile::api::API_VERSION,
        "kind": flower_reconcile::api::KIND,
        "metadata": {"name": format!("cluster-{i:04}")},
        "spec": {
            "opennebula": {"templates": {"superlink": 1, "supernode": 2}, "network": 0},
            "supernodes": {"count": NODES_PER_CLUSTER, "max": 40},
        }
    }))
    .expect("bench spec")
}

struct Synthetic {
    desired: DesiredState,
    services: Vec<Document>,
    vms: Vec<VmRecord>,
}

fn synthesize() -> Synthetic {
    let now = Utc::now().timestamp();
    let mut desired = DesiredState {
        complete: true,
        ..DesiredState::default()
    };
    let mut services = Vec::new();
    let mut vms = Vec::new();
    let mut vm_id = 0u64;
    for i in 0..CLUSTERS {
        let c = cluster(i);
        let name = c.metadata.name.clone();
        let applied = AppliedSpec {
            format: AppliedSpec::FORMAT,
            fields: spec_fields(&c),
        };
        let mut roles = Vec::new();
        for (role, n) in [("superlink", 1), ("supernode", NODES_PER_CLUSTER)] {
            let mut nodes = Vec::new();
            for _ in 0..n {
                vm_id += 1;
                nodes.push(json!({"deploy_id": vm_id}));
                let mut ut = BTreeMap::new();
                ut.insert("SERVICE_ID".to_string(), i.to_string());
                ut.insert("ROLE_NAME".to_string(), role.to_string());
                ut.insert("READY".to_string(), "YES".to_string());
                ut.insert("FL_HEARTBEAT".to_string(), Utc::now().to_rfc3339());
                if role == "superlink" {
                    ut.insert("FL_READY".into(), "YES".into());
                    ut.insert("FL_ENDPOINT".into(), "10.0.0.1:9092".into());
                    ut.insert(
                        "FL_CERT_NOT_AFTER".into(),
                        (Utc::now() + chrono::Duration::days(300)).to_rfc3339(),
                    );
                } else {
                    ut.insert("FL_NODE_READY".into(), "YES".into());
                }
                vms.push(VmRecord {
                    id: vm_id,
                    name: format!("{role}_{vm_id}_(service_{i})"),
                    state: 3,
                    lcm_state: 3,
                    stime: now,
                    user_template: ut,
                });
            }
            roles.push(
                json!({"name": role, "type": "vm", "cardinality": n, "state": 2, "nodes": nodes}),
            );
        }
        services.push(Document {
            id: i,
            name: name.clone(),
            body: json!({
                "name": name,
                "state": 2,
                "flower_reconcile": {"cluster": name, "spec_hash": "h", "controller": "bench", "format": 1},
                AppliedSpec::BODY_KEY: applied,
                "roles": roles,
            }),
        });
        desired.clusters.insert(
            name,
            DesiredCluster {
                cluster: c,
                spec_hash: "h".into(),
                revision: "bench".into(),
            },
        );
    }
    Synthetic {
        desired,
        services,
        vms,
    }
}

/// Serves the synthetic pools and counts requests.
struct CountingBackend {
    services: Vec<Document>,
    vms: Vec<VmRecord>,
    requests: AtomicU64,
}

fn unsupported<'a, T: Send + 'a>() -> BackendFuture<'a, T> {
    Box::pin(async {
        Err(BackendError::new(
            flower_reconcile::controller::BackendErrorKind::Rejected,
            "read-only bench backend",
        ))
    })
}

impl OneBackend for CountingBackend {
    fn system_version(&self) -> BackendFuture<'_, String> {
        Box::pin(async { Ok("7.4.0".to_string()) })
    }
    fn list_services(&self) -> BackendFuture<'_, Vec<Document>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Ok(self.services.clone()) })
    }
    fn list_vms(&self, page_size: u32) -> BackendFuture<'_, Vec<VmRecord>> {
        // Pages of page_size + 1 (the extra VM says whether another page follows), as the
        // oned client pages.
        let page = page_size as usize;
        let mut offset = 0;
        loop {
            self.requests.fetch_add(1, Ordering::Relaxed);
            if self.vms.len() <= offset + page {
                break;
            }
            offset += page;
        }
        Box::pin(async move { Ok(self.vms.clone()) })
    }
    fn list_service_templates(&self) -> BackendFuture<'_, Vec<Document>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Ok(Vec::new()) })
    }
    fn create_service_template(&self, _: serde_json::Value) -> BackendFuture<'_, u64> {
        unsupported()
    }
    fn update_service_template(&self, _: u64, _: serde_json::Value) -> BackendFuture<'_, ()> {
        unsupported()
    }
    fn instantiate(&self, _: u64, _: serde_json::Value) -> BackendFuture<'_, u64> {
        unsupported()
    }
    fn get_service(&self, _: u64) -> BackendFuture<'_, Document> {
        unsupported()
    }
    fn update_service(&self, _: u64, _: serde_json::Value) -> BackendFuture<'_, ()> {
        unsupported()
    }
    fn scale(&self, _: u64, _: &str, _: u32) -> BackendFuture<'_, ()> {
        unsupported()
    }
    fn delete_service(&self, _: u64) -> BackendFuture<'_, ()> {
        unsupported()
    }
    fn vm_update_merge(&self, _: u64, _: String) -> BackendFuture<'_, ()> {
        unsupported()
    }
    fn vm_terminate_hard(&self, _: u64) -> BackendFuture<'_, ()> {
        unsupported()
    }
    fn vm_templates(&self) -> BackendFuture<'_, Vec<(u64, String)>> {
        unsupported()
    }
    fn networks(&self) -> BackendFuture<'_, Vec<(u64, String)>> {
        unsupported()
    }
}

fn rss_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    let rss_start = rss_kib("VmRSS:").unwrap_or(0);
    let t = Instant::now();
    let syn = synthesize();
    let synth_time = t.elapsed();
    let vm_count = syn.vms.len() as u64;

    // Observation through the backend, counting requests.
    let backend = Arc::new(CountingBackend {
        services: syn.services.clone(),
        vms: syn.vms.clone(),
        requests: AtomicU64::new(0),
    });
    let ctx = Context {
        backend: backend.clone(),
        controller_id: "bench".into(),
        dialect: OneDialect::V7,
        options: ReconcileOptions::default(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let live = rt.block_on(observe(&ctx, Utc::now())).expect("observe");
    let requests = backend.requests.load(Ordering::Relaxed);
    let expected = 1 + vm_count.div_ceil(2000);

    let join_times: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let l = build_live(&syn.services, syn.vms.clone(), "bench", Utc::now());
            let d = t.elapsed();
            assert_eq!(l.clusters.len(), CLUSTERS as usize);
            d
        })
        .collect();

    let now = Utc::now();
    let mut plan_times = Vec::new();
    let mut actions = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let p = plan(&syn.desired, &live, now);
        plan_times.push(t.elapsed());
        actions = p.actions.len();
    }
    // A drifted state: every cluster wants two more SuperNodes.
    let mut drifted = syn.desired.clone();
    for d in drifted.clusters.values_mut() {
        d.cluster.spec.supernodes.count += 2;
    }
    let t = Instant::now();
    let drift_plan = plan(&drifted, &live, now);
    let drift_time = t.elapsed();

    let rss_end = rss_kib("VmRSS:").unwrap_or(0);
    let hwm = rss_kib("VmHWM:").unwrap_or(0);
    println!("plan_scale: {CLUSTERS} clusters, {vm_count} VMs");
    println!("  synthetic data built in            {synth_time:?}");
    println!(
        "  API requests for one observation   {requests} (target 1 listing + ceil({vm_count}/2000) pages = {expected}{})",
        if requests > expected { "; OVER TARGET" } else { "" }
    );
    println!(
        "  join (observe → live state), median {:?}",
        median(join_times)
    );
    println!(
        "  plan, converged (actions: {actions}), median {:?}",
        median(plan_times)
    );
    println!(
        "  plan, all clusters drifted ({} actions) {drift_time:?}",
        drift_plan.actions.len()
    );
    println!(
        "  RSS: start {} MiB, now {} MiB, peak {} MiB (target < 100 MiB)",
        rss_start / 1024,
        rss_end / 1024,
        hwm / 1024
    );
    assert_eq!(actions, 0, "a converged synthetic state must plan nothing");
}
