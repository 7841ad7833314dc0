//! OneGate client against a loopback server speaking OneGate's wire format (§3).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{fixture, form_fields, recording_server, Responder};
use flower_reconcile::one::model::{LcmState, RoleState, ServiceState, VmState};
use flower_reconcile::one::{OneGateClient, OneGateConfig, OneGateError, RetryPolicy};

const TOKEN: &str = "dG9rZW4tZm9yLXZtLTQy";

fn client(base: &str) -> OneGateClient {
    let mut cfg = OneGateConfig::new(base, TOKEN, 42)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    cfg.retry = RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    };
    OneGateClient::new(cfg).unwrap()
}

fn answer(code: u16, body: String) -> Responder {
    Arc::new(move |_| (code, "application/json;charset=utf-8", body.clone()))
}

#[tokio::test]
async fn get_vm_parses_the_onegate_shape_and_sends_the_headers() {
    let (base, seen) = recording_server(answer(200, fixture("onegate_vm.json"))).await;
    let vm = client(&base).get_vm().await.unwrap();
    assert_eq!(vm.id, 42);
    assert_eq!(vm.name, "superlink_0_(service_5)");
    assert_eq!(vm.state, Some(VmState::Active));
    assert_eq!(vm.lcm_state, Some(LcmState::Running));
    assert_eq!(vm.attr("READY"), Some("YES"));
    assert_eq!(vm.service_id().unwrap(), Some(5));
    assert_eq!(vm.role_name().unwrap(), Some("superlink"));
    let ep = vm.endpoint_attr("FL_ENDPOINT").unwrap().unwrap();
    assert_eq!(ep.to_string(), "10.0.0.5:9092");
    // Order is OpenNebula's, vectors are kept apart.
    let keys: Vec<_> = vm.user_template.keys().cloned().collect();
    assert_eq!(&keys[..3], ["DESCRIPTION", "READY", "ROLE_NAME"]);
    assert!(vm.user_template_vectors.contains_key("SCHED_ACTION"));
    assert!(vm.user_template_vectors.contains_key("LABELS"));
    assert_eq!(vm.nics.len(), 2);
    assert_eq!(vm.first_ip().unwrap().to_string(), "10.0.0.5");
    assert_eq!(vm.nics[1].ip6_global.unwrap().to_string(), "2001:db8::5");

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("GET", "/vm")
    );
    assert_eq!(seen[0].headers["x-onegate-token"], TOKEN);
    assert_eq!(seen[0].headers["x-onegate-vmid"], "42");
}

#[tokio::test]
async fn get_vm_by_id_uses_the_vms_route() {
    let (base, seen) = recording_server(answer(200, fixture("onegate_vm.json"))).await;
    client(&base).get_vm_by_id(43).await.unwrap();
    assert_eq!(seen.lock().unwrap()[0].path, "/vms/43");
}

#[tokio::test]
async fn update_vm_sends_merge_lines_without_spaces() {
    let (base, seen) = recording_server(answer(200, String::new())).await;
    let c = client(&base);
    c.update_vm(&[("READY", "YES"), ("FL_ENDPOINT", "10.0.0.5:9092")])
        .await
        .unwrap();
    c.delete_vm_attribute("FL_ERROR").await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].method, "PUT");
    assert_eq!(seen[0].path, "/vm");
    assert_eq!(
        form_fields(&seen[0].body),
        vec![
            (
                "data".to_string(),
                "READY=YES\nFL_ENDPOINT=10.0.0.5:9092".to_string()
            ),
            ("type".to_string(), "1".to_string())
        ]
    );
    assert_eq!(
        form_fields(&seen[1].body),
        vec![
            ("data".to_string(), "FL_ERROR".to_string()),
            ("type".to_string(), "2".to_string())
        ]
    );
}

#[tokio::test]
async fn update_vm_validates_before_sending() {
    let (base, seen) = recording_server(answer(200, String::new())).await;
    let c = client(&base);
    for attrs in [
        vec![("READY", "YES"), ("FL_ERROR", "x\nSERVICE_ID=7")],
        vec![("ready", "YES")],
        vec![("FL_ERROR", "bell\u{7}")],
    ] {
        let e = c.update_vm(&attrs).await.unwrap_err();
        assert!(matches!(e, OneGateError::Invalid { .. }), "{e}");
    }
    assert!(c.delete_vm_attribute("A B").await.is_err());
    assert!(c.scale_role("work er", 3).await.is_err());
    assert!(seen.lock().unwrap().is_empty(), "nothing may be sent");
}

#[tokio::test]
async fn get_service_parses_roles_and_nodes() {
    let (base, seen) = recording_server(answer(200, fixture("onegate_service.json"))).await;
    let svc = client(&base).get_service(false).await.unwrap();
    assert_eq!((svc.id, svc.name.as_str()), (5, "flower-demo"));
    assert_eq!(svc.state, ServiceState::Running);
    let nodes = &svc.role("supernode").unwrap().nodes;
    assert_eq!(svc.role("supernode").unwrap().state, RoleState::Scaling);
    assert_eq!(svc.role("supernode").unwrap().cardinality, 2);
    assert_eq!(
        nodes.iter().map(|n| n.deploy_id).collect::<Vec<_>>(),
        [43, 44]
    );
    assert_eq!(
        nodes[0].vm.as_ref().unwrap().name,
        "supernode_1_(service_5)"
    );
    assert_eq!(seen.lock().unwrap()[0].query, None);
}

#[tokio::test]
async fn get_service_extended_exposes_peer_user_templates() {
    let (base, seen) =
        recording_server(answer(200, fixture("onegate_service_extended.json"))).await;
    let svc = client(&base).get_service(true).await.unwrap();
    assert_eq!(svc.state, ServiceState::Hold, "service HOLD is 15");
    assert_eq!(svc.roles[0].state, RoleState::Hold, "role HOLD is 11");
    let peer = svc.roles[0].nodes[0].vm.as_ref().unwrap();
    assert_eq!(
        peer.endpoint_attr("FL_ENDPOINT").unwrap().unwrap().port,
        9092
    );
    assert_eq!(
        seen.lock().unwrap()[0].query.as_deref(),
        Some("extended=true")
    );
}

#[tokio::test]
async fn scale_role_puts_the_cardinality() {
    let (base, seen) = recording_server(answer(200, String::new())).await;
    client(&base).scale_role("supernode", 4).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("PUT", "/service/role/supernode")
    );
    let body: serde_json::Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(body, serde_json::json!({"cardinality": 4}));
}

#[tokio::test]
async fn hostile_wrong_types_are_decode_errors_naming_the_field() {
    let cases = [
        (r#"{"VM": {"ID": [1], "NAME": "x"}}"#, "VM.ID"),
        (r#"{"VM": {"ID": "x", "NAME": "x"}}"#, "VM.ID"),
        (r#"{"VM": {"ID": "1", "NAME": 7}}"#, "VM.NAME"),
        (
            r#"{"VM": {"ID": "1", "USER_TEMPLATE": {"READY": 1}}}"#,
            "VM.USER_TEMPLATE.READY",
        ),
        (
            r#"{"VM": {"ID": "1", "USER_TEMPLATE": []}}"#,
            "VM.USER_TEMPLATE",
        ),
        (
            r#"{"VM": {"ID": "1", "TEMPLATE": {"NIC": [{"IP": "10.0.0.1; rm -rf /"}]}}}"#,
            "VM.TEMPLATE.NIC[0].IP",
        ),
        (
            r#"{"VM": {"ID": "1", "TEMPLATE": {"NIC": "eth0"}}}"#,
            "VM.TEMPLATE.NIC",
        ),
        (r#"{"VM": {"ID": "1", "STATE": {}}}"#, "VM.STATE"),
        (r#"[]"#, "response"),
        (r#"{}"#, "response.VM"),
    ];
    for (body, field) in cases {
        let (base, _) = recording_server(answer(200, body.to_string())).await;
        match client(&base).get_vm().await {
            Err(OneGateError::Decode { what, .. }) => assert_eq!(what, field, "{body}"),
            other => panic!("{body}: expected Decode naming {field}, got {other:?}"),
        }
    }
    let (base, _) = recording_server(answer(200, "not json".into())).await;
    assert!(matches!(
        client(&base).get_vm().await,
        Err(OneGateError::Decode { .. })
    ));
    let svc_cases = [
        (
            r#"{"SERVICE": {"id": "5", "name": "s", "state": "RUNNING"}}"#,
            "SERVICE.state",
        ),
        (
            r#"{"SERVICE": {"id": "5", "name": "s", "state": 2, "roles": {}}}"#,
            "SERVICE.roles",
        ),
        (
            r#"{"SERVICE": {"id": "5", "name": "s", "state": 2, "roles": [{"name": "w", "nodes": [{"deploy_id": -1}]}]}}"#,
            "SERVICE.roles[0].nodes[0].deploy_id",
        ),
    ];
    for (body, field) in svc_cases {
        let (base, _) = recording_server(answer(200, body.to_string())).await;
        match client(&base).get_service(false).await {
            Err(OneGateError::Decode { what, .. }) => assert_eq!(what, field, "{body}"),
            other => panic!("{body}: expected Decode naming {field}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn hostile_endpoint_value_is_an_invalid_error() {
    let body = r#"{"VM": {"ID": "42", "NAME": "x", "USER_TEMPLATE": {"FL_ENDPOINT": "10.0.0.5:9092; rm -rf /", "SERVICE_ID": "5 && reboot", "ROLE_NAME": "a/../b"}}}"#;
    let (base, _) = recording_server(answer(200, body.into())).await;
    let vm = client(&base).get_vm().await.unwrap();
    assert!(matches!(
        vm.endpoint_attr("FL_ENDPOINT"),
        Err(OneGateError::Invalid { .. })
    ));
    assert!(matches!(vm.service_id(), Err(OneGateError::Invalid { .. })));
    assert!(matches!(vm.role_name(), Err(OneGateError::Invalid { .. })));
}

#[tokio::test]
async fn hostile_ten_megabyte_attribute_is_refused_without_panic() {
    let big = "A".repeat(10 * 1024 * 1024);
    let body = format!(r#"{{"VM": {{"ID": "42", "USER_TEMPLATE": {{"FL_CA_CERT": "{big}"}}}}}}"#);
    let (base, _) = recording_server(answer(200, body.clone())).await;
    let e = client(&base).get_vm().await.unwrap_err();
    assert!(
        matches!(e, OneGateError::TooLarge { limit: 4194304, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("exceeds 4194304 bytes"), "{e}");

    // With a larger body cap the per-attribute cap still refuses it, naming the field.
    let (base, _) = recording_server(answer(200, body)).await;
    let mut cfg = OneGateConfig::new(&base, TOKEN, 42).unwrap();
    cfg.max_body = 64 * 1024 * 1024;
    let e = OneGateClient::new(cfg).unwrap().get_vm().await.unwrap_err();
    match e {
        OneGateError::Decode { what, .. } => assert_eq!(what, "VM.USER_TEMPLATE.FL_CA_CERT"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn plain_text_errors_become_status_errors() {
    let (base, _) = recording_server(Arc::new(|_| {
        (
            400,
            "application/json;charset=utf-8",
            "Empty or invalid SERVICE_ID".to_string(),
        )
    }))
    .await;
    match client(&base).get_service(false).await {
        Err(OneGateError::Status { code, message, .. }) => {
            assert_eq!(code, 400);
            assert_eq!(message, "Empty or invalid SERVICE_ID");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn reads_are_retried_on_503_and_mutations_are_not() {
    let (base, seen) = recording_server(answer(503, "busy".into())).await;
    let c = client(&base);
    assert!(matches!(
        c.get_vm().await,
        Err(OneGateError::Status { code: 503, .. })
    ));
    assert_eq!(
        seen.lock().unwrap().len(),
        3,
        "GET: first attempt + 2 retries"
    );
    seen.lock().unwrap().clear();
    assert!(c.update_vm(&[("READY", "YES")]).await.is_err());
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "PUT is attempted exactly once"
    );
    seen.lock().unwrap().clear();
    assert!(c.scale_role("supernode", 3).await.is_err());
    assert_eq!(seen.lock().unwrap().len(), 1);
    let stats = c.stats().calls("GET /vm");
    assert_eq!(stats, 3);
}

#[tokio::test]
async fn transport_errors_name_the_route_and_hide_the_token() {
    // Nothing listens on this port once the listener is dropped.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let e = client(&format!("http://{addr}"))
        .get_vm()
        .await
        .unwrap_err();
    assert!(matches!(e, OneGateError::Transport { .. }), "{e}");
    assert!(!format!("{e} {e:?}").contains(TOKEN));
}
