//! OneFlow client against a loopback server speaking OneFlow's wire format (§2).

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use common::{fixture, recording_server, Responder};
use flower_reconcile::one::model::{RoleState, ServiceState};
use flower_reconcile::one::oneflow::{RoleActionParams, TemplateDeleteType};
use flower_reconcile::one::{
    ApiBudget, ApiStats, Credentials, OneConfig, OneFlowClient, OneFlowError, RetryPolicy,
};
use serde_json::{json, Value};

const PASSWORD: &str = "fl0w-Pa55word";

fn client(base: &str) -> OneFlowClient {
    let mut cfg = OneConfig::new(
        "http://127.0.0.1:1/RPC2".parse().unwrap(),
        base.parse().unwrap(),
        Credentials::new("flower", PASSWORD).unwrap(),
    );
    cfg.timeout = Duration::from_secs(5);
    cfg.retry = RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    };
    OneFlowClient::new(
        &cfg,
        ApiBudget::new(NonZeroU32::new(10_000).unwrap()),
        ApiStats::new(),
    )
    .unwrap()
}

fn answer(code: u16, body: String) -> Responder {
    // OneFlow never sets a JSON content type.
    Arc::new(move |_| (code, "text/html;charset=utf-8", body.clone()))
}

#[tokio::test]
async fn service_document_with_string_ids_and_typed_roles() {
    let (base, seen) = recording_server(answer(200, fixture("oneflow_service_7x.json"))).await;
    let svc = client(&base).get_service(5).await.unwrap();
    assert_eq!((svc.id(), svc.name()), (5, "flower-demo"));
    assert_eq!(svc.state().unwrap(), ServiceState::Running);
    let roles = svc.roles().unwrap();
    assert_eq!(roles.len(), 2);
    assert_eq!(roles[0].template_id, Some(3));
    assert_eq!(roles[1].state, Some(RoleState::Hold), "role HOLD is 11");
    assert_eq!(
        (roles[1].min_vms, roles[1].max_vms, roles[1].cardinality),
        (Some(1), Some(10), 2)
    );
    assert_eq!(
        roles[1]
            .nodes
            .iter()
            .map(|n| n.deploy_id)
            .collect::<Vec<_>>(),
        [41, 42]
    );
    assert_eq!(
        roles[1].nodes[0].vm_name.as_deref(),
        Some("supernode_0_(service_5)")
    );
    assert_eq!(svc.role("superlink").unwrap().unwrap().nodes.len(), 1);
    // Unknown keys are kept.
    assert_eq!(svc.body()["x_flower_reconcile"]["generation"], 3);
    let s = seen.lock().unwrap();
    assert_eq!(
        (s[0].method.as_str(), s[0].path.as_str()),
        ("GET", "/service/5")
    );
    let auth = s[0].headers["authorization"].to_str().unwrap();
    use base64::Engine as _;
    let expected = base64::engine::general_purpose::STANDARD.encode(format!("flower:{PASSWORD}"));
    assert_eq!(auth, format!("Basic {expected}"));
}

#[tokio::test]
async fn both_template_dialects() {
    let (base, _) = recording_server(answer(200, fixture("oneflow_template_pool.json"))).await;
    let templates = client(&base).list_service_templates().await.unwrap();
    assert_eq!(templates.len(), 2);
    let (t6, t7) = (&templates[0], &templates[1]);
    assert_eq!((t6.id(), t6.name()), (7, "flower-6x"));
    assert_eq!((t7.id(), t7.name()), (8, "flower-7x"));
    let r6 = t6.roles().unwrap();
    let r7 = t7.roles().unwrap();
    assert_eq!(r6[0].template_id, Some(3), "6.x vm_template");
    assert_eq!(r7[0].template_id, Some(3), "7.x template_id");
    assert_eq!(
        r6[1].cardinality, 2,
        "numeric strings are accepted like OneFlow does"
    );
    assert_eq!(r7[1].max_vms, Some(5));
    assert!(t6.body()["roles"][0]["vm_template_contents"].is_string());
    assert!(t7.body()["roles"][0]["template_contents"].is_object());
}

#[tokio::test]
async fn empty_pools_and_single_documents() {
    let (base, _) = recording_server(answer(200, fixture("oneflow_empty_pool.json"))).await;
    assert!(client(&base).list_services().await.unwrap().is_empty());
    let (base, _) = recording_server(answer(200, fixture("oneflow_service_pool.json"))).await;
    assert_eq!(client(&base).list_services().await.unwrap()[0].id(), 5);
    let (base, _) = recording_server(answer(200, fixture("oneflow_template_7x.json"))).await;
    assert_eq!(
        client(&base).get_service_template(8).await.unwrap().name(),
        "flower-7x"
    );
}

/// The streamed listing reads the same documents as the tree-building one, in every pool
/// shape: an array, a lone document, nothing; a bad ID is a decode error.
#[tokio::test]
async fn streamed_listing_reads_the_same_documents() {
    let lone = fixture("oneflow_service_7x.json").replacen(
        "\"DOCUMENT\"",
        "\"DOCUMENT_POOL\": {\"DOCUMENT\"",
        1,
    ) + "}";
    let null = r#"{"DOCUMENT_POOL": {"DOCUMENT": null}}"#.to_string();
    for body in [
        fixture("oneflow_service_pool.json"),
        fixture("oneflow_empty_pool.json"),
        lone,
        null,
    ] {
        let (base, _) = recording_server(answer(200, body.clone())).await;
        let whole = client(&base).list_services().await.unwrap();
        let streamed = client(&base)
            .list_services_as::<serde_json::Value>()
            .await
            .unwrap();
        assert_eq!(whole.len(), streamed.len(), "{body}");
        for (w, s) in whole.iter().zip(&streamed) {
            assert_eq!(
                (w.id(), w.name(), w.body()),
                (s.id, s.name.as_str(), &s.body)
            );
        }
    }
    let bad = r#"{"DOCUMENT_POOL": {"DOCUMENT": [{"ID": "x7", "TEMPLATE": {"BODY": {}}}]}}"#;
    let (base, _) = recording_server(answer(200, bad.to_string())).await;
    let e = client(&base)
        .list_services_as::<serde_json::Value>()
        .await
        .unwrap_err();
    assert!(matches!(e, OneFlowError::Decode { .. }), "{e}");
    assert!(e.to_string().contains("ID \"x7\" is not a number"), "{e}");
}

#[tokio::test]
async fn template_round_trip_keeps_unknown_keys() {
    let (base, seen) = recording_server(Arc::new(|s| {
        let code = if s.method == "POST" { 201 } else { 200 };
        (code, "text/html", fixture("oneflow_template_7x.json"))
    }))
    .await;
    let c = client(&base);
    let t = c.get_service_template(8).await.unwrap();
    let mut body = t.body().clone();
    body["x_unknown"] = json!({"keep": true});
    c.update_service_template(8, &body).await.unwrap();
    c.create_service_template(&body).await.unwrap();
    let s = seen.lock().unwrap();
    assert_eq!(
        (s[1].method.as_str(), s[1].path.as_str()),
        ("PUT", "/service_template/8")
    );
    let sent: Value = serde_json::from_str(&s[1].body).unwrap();
    assert_eq!(sent, body);
    assert_eq!(
        (s[2].method.as_str(), s[2].path.as_str()),
        ("POST", "/service_template")
    );
}

#[tokio::test]
async fn request_bodies_follow_oneflow() {
    let (base, seen) = recording_server(Arc::new(|s| {
        if s.path.ends_with("/action") && s.path.starts_with("/service_template") {
            (201, "text/html", fixture("oneflow_service_7x.json"))
        } else {
            (204, "text/html", String::new())
        }
    }))
    .await;
    let c = client(&base);
    let merge =
        json!({"name": "flower-demo", "user_inputs_values": {"ONEAPP_FLOWER_VERSION": "1.25.0"}});
    let svc = c
        .instantiate_service_template(8, Some(&merge))
        .await
        .unwrap();
    assert_eq!(svc.id(), 5);
    c.instantiate_service_template(8, None).await.unwrap();
    c.scale_service(5, "supernode", 4, false).await.unwrap();
    c.role_action(5, "supernode", "poweroff", &RoleActionParams::default())
        .await
        .unwrap();
    c.role_action(
        5,
        "supernode",
        "reboot",
        &RoleActionParams {
            period: Some(30),
            number: Some(2),
            args: None,
        },
    )
    .await
    .unwrap();
    c.recover_service(5, false).await.unwrap();
    c.recover_service(5, true).await.unwrap();
    c.delete_service(5).await.unwrap();
    c.delete_service_template(8, Some(TemplateDeleteType::None))
        .await
        .unwrap();
    c.delete_service_template(8, None).await.unwrap();

    {
        let s = seen.lock().unwrap();
        let body = |i: usize| -> Value { serde_json::from_str(&s[i].body).unwrap_or(Value::Null) };
        assert_eq!(s[0].path, "/service_template/8/action");
        assert_eq!(
            body(0),
            json!({"action": {"perform": "instantiate", "params": {"merge_template": merge}}})
        );
        assert_eq!(
            body(1),
            json!({"action": {"perform": "instantiate", "params": {}}})
        );
        assert_eq!(
            (s[2].method.as_str(), s[2].path.as_str()),
            ("POST", "/service/5/scale")
        );
        assert_eq!(
            body(2),
            json!({"role_name": "supernode", "cardinality": 4, "force": false})
        );
        assert_eq!(s[3].path, "/service/5/role/supernode/action");
        assert_eq!(
            body(3),
            json!({"action": {"perform": "poweroff", "params": {}}})
        );
        assert_eq!(
            body(4),
            json!({"action": {"perform": "reboot", "params": {"period": 30, "number": 2}}})
        );
        assert_eq!(s[5].path, "/service/5/action");
        assert_eq!(
            body(5),
            json!({"action": {"perform": "recover", "params": {}}})
        );
        assert_eq!(
            body(6),
            json!({"action": {"perform": "recover", "params": {"delete": true}}})
        );
        assert_eq!(
            (s[7].method.as_str(), s[7].path.as_str()),
            ("DELETE", "/service/5")
        );
        assert_eq!(body(8), json!({"delete_type": "none"}));
        assert_eq!(s[9].body, "");
    }
    // Refused before sending.
    let n = seen.lock().unwrap().len();
    assert!(matches!(
        c.role_action(5, "supernode", "shutdown", &RoleActionParams::default())
            .await,
        Err(OneFlowError::Invalid { .. })
    ));
    assert!(matches!(
        c.scale_service(5, "x/../y", 1, false).await,
        Err(OneFlowError::Invalid { .. })
    ));
    assert!(matches!(
        c.instantiate_service_template(8, Some(&json!([1]))).await,
        Err(OneFlowError::Invalid { .. })
    ));
    assert_eq!(seen.lock().unwrap().len(), n);
}

#[tokio::test]
async fn plain_text_errors_and_the_inverted_401_403() {
    let cases: [(u16, &str); 5] = [
        (
            400,
            "Mandatory document key 'name (string)' is missing from service template",
        ),
        (401, "Invalid credentials"),
        (
            403,
            "[one.user.info] User couldn't be authenticated, aborting call.",
        ),
        (404, "Error getting document [99]."),
        (500, "Service cannot be scaled in state: DEPLOYING"),
    ];
    for (code, text) in cases {
        let (base, _) = recording_server(answer(code, text.to_string())).await;
        let e = client(&base).get_service(99).await.unwrap_err();
        match (&e, code) {
            (OneFlowError::Validation { message, .. }, 400)
            | (OneFlowError::Authorization { message, .. }, 401)
            | (OneFlowError::Authentication { message, .. }, 403)
            | (OneFlowError::NotFound { message, .. }, 404)
            | (
                OneFlowError::Status {
                    code: 500, message, ..
                },
                500,
            ) => assert_eq!(message, text),
            _ => panic!("{code}: {e:?}"),
        }
        if code == 404 {
            assert!(e.is_not_found());
        }
    }
}

#[tokio::test]
async fn wrong_shapes_are_decode_errors_naming_the_field() {
    let cases = [
        (
            r#"{"DOCUMENT": {"ID": "x", "TEMPLATE": {"BODY": {}}}}"#,
            "DOCUMENT.ID",
        ),
        (
            r#"{"DOCUMENT": {"ID": "5", "TEMPLATE": {"BODY": "{}"}}}"#,
            "DOCUMENT.TEMPLATE.BODY",
        ),
        (
            r#"{"DOCUMENT": {"ID": "5", "NAME": 1, "TEMPLATE": {"BODY": {}}}}"#,
            "DOCUMENT.NAME",
        ),
        (r#"{"DOC": {}}"#, "response.DOCUMENT"),
    ];
    for (body, field) in cases {
        let (base, _) = recording_server(answer(200, body.to_string())).await;
        match client(&base).get_service(5).await {
            Err(OneFlowError::Decode { what, .. }) => assert_eq!(what, field, "{body}"),
            other => panic!("{body}: {other:?}"),
        }
    }
    let (base, _) = recording_server(answer(
        200,
        r#"{"DOCUMENT": {"ID": "5", "TEMPLATE": {"BODY": {"state": "RUNNING", "roles": [{"name": "a", "nodes": [{"deploy_id": "x"}]}]}}}}"#.into(),
    ))
    .await;
    let svc = client(&base).get_service(5).await.unwrap();
    assert!(matches!(svc.state(), Err(OneFlowError::Decode { what, .. }) if what == "BODY.state"));
    assert!(
        matches!(svc.roles(), Err(OneFlowError::Decode { what, .. }) if what == "BODY.roles[0].nodes[0].deploy_id")
    );
}

#[tokio::test]
async fn gets_retry_on_503_and_mutations_do_not() {
    let (base, seen) = recording_server(answer(503, "Service Unavailable".into())).await;
    let c = client(&base);
    assert!(matches!(
        c.get_service(5).await,
        Err(OneFlowError::Status { code: 503, .. })
    ));
    assert_eq!(seen.lock().unwrap().len(), 3);
    seen.lock().unwrap().clear();
    assert!(c.scale_service(5, "supernode", 3, false).await.is_err());
    assert!(c.delete_service(5).await.is_err());
    assert!(c.instantiate_service_template(8, None).await.is_err());
    assert_eq!(
        seen.lock().unwrap().len(),
        3,
        "each mutation attempted exactly once"
    );
    assert_eq!(c.stats().calls("POST /service/:id/scale"), 1);
    assert_eq!(c.stats().calls("GET /service/:id"), 3);
}

#[tokio::test]
async fn service_update_puts_the_full_body_once() {
    let (base, seen) = recording_server(answer(204, String::new())).await;
    let c = client(&base);
    let body = json!({"name": "flower-demo", "roles": [{"name": "supernode", "cardinality": 2}]});
    c.update_service(5, &body).await.unwrap();
    {
        let s = seen.lock().unwrap();
        assert_eq!(
            (s[0].method.as_str(), s[0].path.as_str()),
            ("PUT", "/service/5")
        );
        assert_eq!(serde_json::from_str::<Value>(&s[0].body).unwrap(), body);
    }
    assert!(matches!(
        c.update_service(5, &json!(["not", "an", "object"])).await,
        Err(OneFlowError::Invalid { .. })
    ));
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "an invalid body is never sent"
    );

    // A lost answer may mean the update happened: never retried.
    let (base, seen) = recording_server(answer(503, "Service Unavailable".into())).await;
    let c = client(&base);
    assert!(c.update_service(5, &body).await.is_err());
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(c.stats().calls("PUT /service/:id"), 1);
}
