//! flower-agent against a OneGate: discovery (late SuperLink, outages, hostile answers),
//! publishing, partition persistence.

mod support;

use std::time::Duration;

use base64::Engine as _;
use flower_reconcile::agent::context::{parse_one_env, Config, Role};
use flower_reconcile::agent::discovery;
use flower_reconcile::agent::node::{AgentState, Node};
use flower_reconcile::agent::paths::Paths;
use flower_reconcile::agent::tls;
use flower_reconcile::one::{OneGateClient, OneGateConfig};
use flower_reconcile::protocol as p;
use support::FakeGate;

fn client(gate: &FakeGate, vmid: u64) -> OneGateClient {
    let mut cfg = OneGateConfig::new(&gate.url, "dG9rZW4tZm9yLXZt", vmid)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    cfg.retry = flower_reconcile::one::RetryPolicy::none();
    OneGateClient::new(cfg).unwrap()
}

fn node(
    gate: &FakeGate,
    vmid: u64,
    role: Role,
    root: &std::path::Path,
    extra: &[(&str, &str)],
) -> Node<OneGateClient> {
    let (ctx, warnings) = parse_one_env(&gate.one_env(vmid, extra), "one_env");
    assert!(warnings.is_empty(), "{warnings:?}");
    let cfg = Config::from_context(&ctx).unwrap();
    Node {
        paths: Paths::new(root),
        cfg,
        role,
        gate: client(gate, vmid),
    }
}

fn ca_b64() -> (String, String) {
    let ca = tls::generate_ca(chrono::Utc::now(), Duration::from_secs(86400)).unwrap();
    (
        base64::engine::general_purpose::STANDARD.encode(&ca.cert_pem),
        ca.cert_pem,
    )
}

async fn gate_with_cluster() -> FakeGate {
    let g = FakeGate::start().await;
    g.add_vm(10, "superlink", "10.0.0.10");
    g.add_vm(12, "supernode", "10.0.0.12");
    g.add_vm(11, "supernode", "10.0.0.11");
    g
}

#[tokio::test]
async fn discovery_waits_for_a_late_superlink() {
    let g = gate_with_cluster().await;
    let (b64, pem) = ca_b64();
    let c = client(&g, 11);
    let publisher = {
        let state = g.state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut st = state.lock().unwrap();
            let vm = st.vms.get_mut(&10).unwrap();
            vm.attrs
                .insert(p::FL_ENDPOINT.into(), "10.0.0.10:9092".into());
            vm.attrs.insert(p::FL_CA_CERT.into(), b64);
            vm.attrs.insert(p::FL_TLS.into(), "YES".into());
            vm.attrs.insert(p::FL_READY.into(), "YES".into());
        })
    };
    let started = std::time::Instant::now();
    let view = discovery::discover(&c, true, Duration::from_secs(20), Default::default())
        .await
        .unwrap();
    publisher.await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert_eq!(view.vm_id, 10);
    assert_eq!(view.endpoint.to_string(), "10.0.0.10:9092");
    assert_eq!(view.ca_pem.as_deref(), Some(pem.as_str()));
    assert_eq!(view.tls, Some(true));
}

#[tokio::test]
async fn discovery_honours_fl_ready() {
    let g = gate_with_cluster().await;
    g.set(10, p::FL_ENDPOINT, "10.0.0.10:9092");
    g.set(10, p::FL_READY, "NO");
    let e = discovery::discover(
        &client(&g, 11),
        false,
        Duration::from_secs(2),
        Default::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("timed out") && e.contains("FL_READY=NO"), "{e}");
}

#[tokio::test]
async fn discovery_survives_a_onegate_outage() {
    let g = gate_with_cluster().await;
    g.set(10, p::FL_ENDPOINT, "10.0.0.10:9092");
    g.set(10, p::FL_READY, "YES");
    g.state.lock().unwrap().outage = true;
    let state = g.state.clone();
    let heal = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        state.lock().unwrap().outage = false;
    });
    let view = discovery::discover(
        &client(&g, 11),
        false,
        Duration::from_secs(20),
        Default::default(),
    )
    .await
    .unwrap();
    heal.await.unwrap();
    assert_eq!(view.endpoint.to_string(), "10.0.0.10:9092");
    assert!(g.state.lock().unwrap().requests >= 3, "it retried");

    // A OneGate that never comes back: a clear error, after the timeout.
    g.state.lock().unwrap().outage = true;
    let e = discovery::discover(
        &client(&g, 11),
        false,
        Duration::from_secs(2),
        Default::default(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("timed out") && e.contains("503"), "{e}");
}

#[tokio::test]
async fn hostile_answers_are_clear_errors() {
    let g = gate_with_cluster().await;
    let c = client(&g, 11);
    g.set(10, p::FL_READY, "YES");

    g.set(10, p::FL_ENDPOINT, "1.2.3.4:9092; rm -rf /");
    let e = discovery::discover_once(&c, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("FL_ENDPOINT"), "{e}");

    g.set(10, p::FL_ENDPOINT, "$(reboot):9092");
    assert!(discovery::discover_once(&c, false)
        .await
        .unwrap_err()
        .to_string()
        .contains("FL_ENDPOINT"));

    g.set(10, p::FL_ENDPOINT, "10.0.0.10:9092");
    g.set(10, p::FL_CA_CERT, "bm90IGEgY2VydGlmaWNhdGU=");
    let e = discovery::discover_once(&c, true)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("FL_CA_CERT"), "{e}");
    g.set(10, p::FL_CA_CERT, "%%%not base64%%%");
    assert!(discovery::discover_once(&c, true)
        .await
        .unwrap_err()
        .to_string()
        .contains("FL_CA_CERT"));

    // A 10 MB attribute.
    g.set(10, p::FL_CA_CERT, &"A".repeat(10 * 1024 * 1024));
    let e = discovery::discover_once(&c, true)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceeds") || e.contains("larger"), "{e}");

    // Wrong JSON types in /service and /vms/:id.
    g.state.lock().unwrap().raw_service =
        Some(r#"{"SERVICE": {"name": 3, "id": "5", "state": "x", "roles": "none"}}"#.into());
    let e = discovery::discover_once(&c, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("OneGate answer"), "{e}");
    g.state.lock().unwrap().raw_service = Some(r#"{"SERVICE": {"name": "s", "id": "5", "state": 2, "roles": [{"name": "superlink", "cardinality": 1, "state": 2, "nodes": [{"deploy_id": "ten"}]}]}}"#.into());
    assert!(discovery::discover_once(&c, false).await.is_err());
    g.state.lock().unwrap().raw_service = Some("not json at all".into());
    assert!(discovery::discover_once(&c, false).await.is_err());
    g.state.lock().unwrap().raw_service = None;
    g.state
        .lock()
        .unwrap()
        .raw_vm
        .insert(10, r#"{"VM": {"ID": [1], "USER_TEMPLATE": "x"}}"#.into());
    let e = discovery::discover_once(&c, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("OneGate answer"), "{e}");
    g.state.lock().unwrap().raw_vm.insert(
        10,
        format!(
            r#"{{"VM": {{"ID": "10", "NAME": "{}"}}}}"#,
            "x".repeat(11 * 1024 * 1024)
        ),
    );
    let e = discovery::discover_once(&c, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceeds"), "{e}");
}

#[tokio::test]
async fn supernode_configure_discovers_trusts_and_persists_partition() {
    let g = gate_with_cluster().await;
    let (b64, pem) = ca_b64();
    g.set(10, p::FL_ENDPOINT, "10.0.0.10:9092");
    g.set(10, p::FL_CA_CERT, &b64);
    g.set(10, p::FL_READY, "YES");
    let dir = tempfile::tempdir().unwrap();
    let n = node(
        &g,
        12,
        Role::Supernode,
        dir.path(),
        &[
            ("ONEAPP_FL_RUNTIME", "process"),
            ("ONEAPP_FL_DISCOVERY_TIMEOUT", "5s"),
        ],
    );
    let st = n.configure().await.unwrap();
    assert_eq!(
        st.node.superlink.as_ref().unwrap().to_string(),
        "10.0.0.10:9092"
    );
    assert_eq!(
        st.node.node_config.as_ref().unwrap().as_context(),
        "partition-id=1 num-partitions=2"
    );
    assert!(st.partition_computed);
    assert_eq!(
        std::fs::read_to_string(n.paths.certs_dir().join("ca.crt")).unwrap(),
        pem
    );
    // Persisted for bootstrap and run.
    let again = AgentState::load(&n.paths).unwrap().unwrap();
    assert_eq!(again, st);
    assert_eq!(again.gpu.as_deref(), Some("NONE"));

    // Publishing: readiness attributes, READY, and FL_ERROR removed.
    g.set(12, p::FL_ERROR, "old problem");
    n.publish_ready(&st).await.unwrap();
    assert_eq!(g.attr(12, p::FL_NODE_READY).as_deref(), Some("YES"));
    assert_eq!(g.attr(12, p::FL_NODE_ID).as_deref(), Some("12"));
    assert_eq!(g.attr(12, p::FL_ROLE).as_deref(), Some("supernode"));
    assert_eq!(g.attr(12, p::FL_GPU).as_deref(), Some("NONE"));
    assert_eq!(g.attr(12, p::READY).as_deref(), Some("YES"));
    assert!(g.attr(12, p::FL_HEARTBEAT).is_some());
    assert_eq!(g.attr(12, p::FL_ERROR), None);
}

#[tokio::test]
async fn supernode_with_tls_fails_closed_without_a_ca() {
    let g = gate_with_cluster().await;
    g.set(10, p::FL_ENDPOINT, "10.0.0.10:9092");
    g.set(10, p::FL_READY, "YES");
    let dir = tempfile::tempdir().unwrap();
    let n = node(
        &g,
        11,
        Role::Supernode,
        dir.path(),
        &[("ONEAPP_FL_DISCOVERY_TIMEOUT", "2s")],
    );
    let e = n.configure().await.unwrap_err();
    assert!(e.to_string().contains("FL_CA_CERT"), "{e}");
    assert!(!n.paths.certs_dir().join("ca.crt").exists());
}

#[tokio::test]
async fn superlink_publishes_and_clears_fl_error() {
    let g = gate_with_cluster().await;
    g.set(10, p::FL_ERROR, "health_check_timeout");
    let dir = tempfile::tempdir().unwrap();
    let n = node(
        &g,
        10,
        Role::Superlink,
        dir.path(),
        &[("ONEAPP_FL_RUNTIME", "process")],
    );
    let st = n.configure().await.unwrap();
    n.publish_ready(&st).await.unwrap();
    assert_eq!(g.attr(10, p::FL_READY).as_deref(), Some("YES"));
    assert_eq!(
        g.attr(10, p::FL_ENDPOINT).as_deref(),
        Some("10.0.0.10:9092")
    );
    assert_eq!(g.attr(10, p::FL_TLS).as_deref(), Some("YES"));
    assert_eq!(g.attr(10, p::FL_VERSION).as_deref(), Some("1.25.0"));
    assert_eq!(g.attr(10, p::FL_ROLE).as_deref(), Some("superlink"));
    let ca = base64::engine::general_purpose::STANDARD
        .decode(g.attr(10, p::FL_CA_CERT).unwrap())
        .unwrap();
    assert_eq!(
        ca,
        std::fs::read(n.paths.certs_dir().join("ca.crt")).unwrap()
    );
    let not_after = g.attr(10, p::FL_CERT_NOT_AFTER).unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(&not_after).is_ok() && not_after.ends_with('Z'),
        "{not_after}"
    );
    assert_eq!(
        g.attr(10, p::FL_ERROR),
        None,
        "FL_ERROR is removed on success"
    );
    // The SuperNode side reads exactly what was published.
    let view = discovery::discover_once(&client(&g, 11), true)
        .await
        .unwrap();
    assert_eq!(view.endpoint.to_string(), "10.0.0.10:9092");

    // A failure publishes FL_ERROR and FL_READY=NO on one line.
    n.publish_error("Flower exited (exit status: 1)\nsecond line")
        .await;
    assert_eq!(g.attr(10, p::FL_READY).as_deref(), Some("NO"));
    assert_eq!(
        g.attr(10, p::FL_ERROR).as_deref(),
        Some("Flower exited (exit status: 1) second line")
    );
}
