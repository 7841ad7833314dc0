//! OneGate: token auth, GET/PUT /vm semantics and quirks, peers, /service, role scaling,
//! catch-all errors, and OneGate down/up.

mod common;

use std::time::Duration;

use common::*;
use onesim::xml;
use serde_json::{json, Value};

async fn gate(
    base: &str,
    method: &str,
    path: &str,
    vmid: i64,
    token: &str,
    body: Option<(&str, String)>,
) -> (u16, String) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut r = client()
        .request(m, format!("{base}{path}"))
        .header("X-ONEGATE-TOKEN", token)
        .header("X-ONEGATE-VMID", vmid.to_string());
    if let Some((ct, b)) = body {
        r = r.header("content-type", ct).body(b);
    }
    let resp = r.send().await.unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "application/json;charset=utf-8"
    );
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn onegate_vm_and_service() {
    let h = start().await;
    let (x, f, g, c) = all_urls(&h);
    let tid = basic_template(&x, "g", h.loopback_net()).await;
    let tmpl = json!({"name": "s", "roles": [{"name": "a", "type": "vm", "template_id": tid, "cardinality": 2, "cooldown": 0}]});
    let (_, b) = flow(&f, "POST", "/service_template", Some(tmpl)).await;
    let t_id = serde_json::from_str::<Value>(&b).unwrap()["DOCUMENT"]["ID"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, b) = flow(
        &f,
        "POST",
        &format!("/service_template/{t_id}/action"),
        Some(json!({"action": {"perform": "instantiate", "params": {}}})),
    )
    .await;
    let sid = serde_json::from_str::<Value>(&b).unwrap()["DOCUMENT"]["ID"]
        .as_str()
        .unwrap()
        .to_string();
    let svc = wait_for("running service", Duration::from_secs(10), || async {
        flow_json(&f, &format!("/service/{sid}"))
            .await
            .filter(|v| v["DOCUMENT"]["TEMPLATE"]["BODY"]["state"] == 2)
    })
    .await;
    let ids: Vec<i64> = svc["DOCUMENT"]["TEMPLATE"]["BODY"]["roles"][0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["deploy_id"].as_i64().unwrap())
        .collect();
    let (me, peer) = (ids[0], ids[1]);
    let tok = token_of(&c, me).await;
    let peer_tok = token_of(&c, peer).await;

    // Auth: wrong token, token of another VM, missing headers.
    assert_eq!(
        gate(&g, "GET", "/vm", me, "bogus", None).await,
        (401, "Not authorized".into())
    );
    assert_eq!(gate(&g, "GET", "/vm", me, &peer_tok, None).await.0, 401);
    let r = client().get(format!("{g}/vm")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    let (s, b) = gate(&g, "GET", "/vm", me, &tok, None).await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&b).unwrap();
    let vm = &v["VM"];
    assert_eq!(
        vm.as_object().unwrap().keys().collect::<Vec<_>>(),
        [
            "NAME",
            "ID",
            "STATE",
            "LCM_STATE",
            "USER_TEMPLATE",
            "TEMPLATE"
        ]
    );
    assert_eq!(
        (
            vm["ID"].as_str(),
            vm["STATE"].as_str(),
            vm["LCM_STATE"].as_str()
        ),
        (Some(me.to_string().as_str()), Some("3"), Some("3"))
    );
    assert_eq!(vm["USER_TEMPLATE"]["SERVICE_ID"], sid.as_str());
    assert_eq!(vm["USER_TEMPLATE"]["ROLE_NAME"], "a");
    assert!(vm["TEMPLATE"]["NIC"].is_array());
    assert_eq!(vm["TEMPLATE"]["NIC_ALIAS"], json!([]));
    assert!(vm["TEMPLATE"]["NIC"][0]["IP"]
        .as_str()
        .unwrap()
        .starts_with(&format!("127.{}.", h.loopback_net())));
    assert!(vm["TEMPLATE"]["NIC"][0].get("NIC_ID").is_none());

    // PUT /vm: form (onegate CLI), raw body (curl), escaping quirk, delete, restricted.
    let (s, b) = gate(
        &g,
        "PUT",
        "/vm",
        me,
        &tok,
        Some((
            "application/x-www-form-urlencoded",
            "data=READY%3DYES%5CnAPP_LOAD%3D9.7&type=1".into(),
        )),
    )
    .await;
    assert_eq!((s, b.as_str()), (200, ""));
    let (s, _) = gate(
        &g,
        "PUT",
        "/vm",
        me,
        &tok,
        Some((
            "application/x-www-form-urlencoded",
            "FL_READY = YES\nNESTED=[A=1,B=2]".into(),
        )),
    )
    .await;
    assert_eq!(s, 200);
    let e = xml::parse(
        rpc(&x, "one.vm.info", &[P::S(AUTH), P::I(me)])
            .await
            .ok_str(),
    )
    .unwrap();
    assert_eq!(child_text(&e, "USER_TEMPLATE/READY"), "YES");
    assert_eq!(child_text(&e, "USER_TEMPLATE/APP_LOAD"), "9.7");
    assert_eq!(
        child_text(&e, "USER_TEMPLATE/FL_READY"),
        " YES",
        "spaces after = stay in the value"
    );
    assert_eq!(child_text(&e, "USER_TEMPLATE/NESTED/B"), "2");
    let (s, b) = gate(
        &g,
        "PUT",
        "/vm",
        me,
        &tok,
        Some(("text/plain", "SERVICE_ID=9".into())),
    )
    .await;
    assert_eq!(
        (s, b.as_str()),
        (403, "Attribute (SERVICE_ID) cannot be modified")
    );
    let (s, b) = gate(
        &g,
        "PUT",
        "/vm?type=2",
        me,
        &tok,
        Some(("text/plain", "ROLE_NAME".into())),
    )
    .await;
    assert_eq!(
        (s, b.as_str()),
        (403, "Attribute (ROLE_NAME) cannot be deleted")
    );
    let (s, _) = gate(
        &g,
        "PUT",
        "/vm",
        me,
        &tok,
        Some((
            "application/x-www-form-urlencoded",
            "data=APP_LOAD&type=2".into(),
        )),
    )
    .await;
    assert_eq!(s, 200);
    let (s, b) = gate(
        &g,
        "PUT",
        "/vm",
        me,
        &tok,
        Some((
            "application/x-www-form-urlencoded",
            "data=APP_LOAD&type=2".into(),
        )),
    )
    .await;
    assert_eq!((s, b.as_str()), (500, "attribute not found"));
    let (s, _) = gate(
        &g,
        "PUT",
        "/vm",
        me,
        &tok,
        Some(("text/plain", "A=\"unterminated".into())),
    )
    .await;
    assert_eq!(s, 500);
    let (_, b) = gate(&g, "GET", "/vm", me, &tok, None).await;
    assert!(
        serde_json::from_str::<Value>(&b).unwrap()["VM"]["USER_TEMPLATE"]
            .get("APP_LOAD")
            .is_none()
    );

    // Peers and the service.
    let (s, b) = gate(&g, "GET", &format!("/vms/{peer}"), me, &tok, None).await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["VM"]["ID"],
        peer.to_string()
    );
    let (s, b) = gate(&g, "GET", "/vms/9999", me, &tok, None).await;
    assert_eq!(
        (s, b),
        (400, format!("Service {sid} does not contain VM 9999."))
    );
    let (s, b) = gate(&g, "GET", "/service", me, &tok, None).await;
    assert_eq!(s, 200);
    let sv: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(sv["SERVICE"]["id"], sid.as_str());
    assert_eq!(sv["SERVICE"]["state"], 2);
    let r0 = &sv["SERVICE"]["roles"][0];
    assert_eq!(
        (r0["name"].as_str(), r0["cardinality"].as_i64()),
        (Some("a"), Some(2))
    );
    assert_eq!(r0["nodes"][0]["running"], Value::Null);
    assert_eq!(
        r0["nodes"][0]["vm_info"]["VM"].as_object().unwrap().len(),
        6
    );
    let (_, b) = gate(&g, "GET", "/service?extended=true", me, &tok, None).await;
    let ext: Value = serde_json::from_str(&b).unwrap();
    let full = &ext["SERVICE"]["roles"][0]["nodes"][0]["vm_info"]["VM"];
    assert_eq!(full["USER_TEMPLATE"]["READY"], "YES");
    assert_eq!(full["TEMPLATE"]["CONTEXT"]["TOKEN"], "YES");

    // Role scaling through OneGate proxies to OneFlow.
    let (s, _) = gate(
        &g,
        "PUT",
        "/service/role/a",
        me,
        &tok,
        Some(("application/json", "{\"cardinality\": \"3\"}".into())),
    )
    .await;
    assert_eq!(s, 200);
    let v = flow_json(&f, &format!("/service/{sid}")).await.unwrap();
    assert_eq!(
        v["DOCUMENT"]["TEMPLATE"]["BODY"]["roles"][0]["cardinality"],
        3
    );
    let (s, b) = gate(
        &g,
        "PUT",
        "/service/role/a",
        me,
        &tok,
        Some(("application/json", "{\"cardinality\": 3}".into())),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        b.starts_with(&format!("Error performing action on service {sid}")),
        "{b}"
    );

    // Unsupported routes.
    assert_eq!(
        gate(&g, "POST", &format!("/service/{sid}/scale"), me, &tok, None).await,
        (400, "OneGate server doesn't support this feature".into())
    );
    assert_eq!(gate(&g, "GET", "/nothing", me, &tok, None).await.0, 400);
    let (s, b) = gate(&g, "GET", "/", me, &tok, None).await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["vm_info"],
        format!("{g}/vm")
    );

    // A VM outside any service.
    let lone = rpc(
        &x,
        "one.template.instantiate",
        &[
            P::S(AUTH),
            P::I(tid),
            P::S("lone"),
            P::B(false),
            P::S(""),
            P::B(false),
        ],
    )
    .await
    .ok_int();
    wait_vm(&x, lone, (3, 3)).await;
    let lt = token_of(&c, lone).await;
    assert_eq!(
        gate(&g, "GET", "/service", lone, &lt, None).await,
        (400, "Empty or invalid SERVICE_ID".into())
    );
    assert_eq!(
        gate(&g, "GET", &format!("/vms/{me}"), lone, &lt, None)
            .await
            .0,
        400
    );

    // OneGate down: connections refused; up again: served.
    let (s, _) = control_json(&c, "POST", "/onegate/down", None).await;
    assert_eq!(s, 204);
    assert!(
        client().get(format!("{g}/vm")).send().await.is_err(),
        "OneGate must refuse connections while down"
    );
    let (s, _) = control_json(&c, "POST", "/onegate/up", None).await;
    assert_eq!(s, 204);
    assert_eq!(gate(&g, "GET", "/vm", me, &tok, None).await.0, 200);
    h.shutdown().await;
}
