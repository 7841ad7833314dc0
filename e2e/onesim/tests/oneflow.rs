//! OneFlow: the full service lifecycle scenario, both template dialects, and error handling.

mod common;

use std::time::Duration;

use common::*;
use onesim::xml;
use serde_json::{json, Value};

fn svc_state(v: &Value) -> i64 {
    v["DOCUMENT"]["TEMPLATE"]["BODY"]["state"].as_i64().unwrap()
}

fn role<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["DOCUMENT"]["TEMPLATE"]["BODY"]["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap()
}

fn nodes(v: &Value, name: &str) -> Vec<i64> {
    role(v, name)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["deploy_id"].as_i64().unwrap())
        .collect()
}

async fn wait_service(base: &str, id: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(15), || async {
        flow_json(base, &format!("/service/{id}"))
            .await
            .filter(|v| f(v))
    })
    .await
}

async fn ready(x: &str, id: i64) {
    rpc(
        x,
        "one.vm.update",
        &[P::S(AUTH), P::I(id), P::S("READY=YES"), P::I(1)],
    )
    .await
    .ok_int();
}

/// The state numbers the service went through, from its log ("New state: X").
fn state_history(v: &Value) -> Vec<String> {
    v["DOCUMENT"]["TEMPLATE"]["BODY"]["log"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| {
            l["message"]
                .as_str()?
                .strip_prefix("New state: ")
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test]
async fn service_lifecycle_scenario() {
    let h = start().await;
    let (x, f) = (h.urls().xmlrpc.clone(), h.urls().oneflow.clone());
    let tid = basic_template(&x, "node", h.loopback_net()).await;
    let tmpl = json!({
    "name": "fl", "deployment": "straight", "ready_status_gate": true, "custom_key": {"kept": true},
    "roles": [
        {"name": "master", "type": "vm", "template_id": tid, "cardinality": 1},
        {"name": "worker", "type": "vm", "template_id": tid, "cardinality": 2, "parents": ["master"],
         "min_vms": 1, "max_vms": 5, "cooldown": 1,
         "template_contents": {"MEMORY": "512", "CONTEXT": {"ROLE_CTX": "w"}}}
    ]});
    let (s, b) = flow(&f, "POST", "/service_template", Some(tmpl)).await;
    assert_eq!(s, 201, "{b}");
    let t: Value = serde_json::from_str(&b).unwrap();
    let t_id = t["DOCUMENT"]["ID"].as_str().unwrap().to_string();
    assert_eq!(t["DOCUMENT"]["TYPE"], "101");
    assert!(t["DOCUMENT"]["TEMPLATE"]["BODY"]["registration_time"].is_i64());
    assert_eq!(
        t["DOCUMENT"]["TEMPLATE"]["BODY"]["custom_key"],
        json!({"kept": true})
    );

    let inst = json!({"action": {"perform": "instantiate", "params": {"merge_template": {"name": "fl-1", "roles": [{"name": "master", "user_inputs_values": {"ONEAPP_X": "m"}}]}}}});
    let (s, b) = flow(
        &f,
        "POST",
        &format!("/service_template/{t_id}/action"),
        Some(inst),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let svc: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(svc_state(&svc), 0);
    assert_eq!(svc["DOCUMENT"]["TYPE"], "100");
    assert_eq!(svc["DOCUMENT"]["NAME"], "fl-1");
    assert!(svc["DOCUMENT"]["TEMPLATE"]["BODY"]["start_time"].is_i64());
    let id = svc["DOCUMENT"]["ID"].as_str().unwrap().to_string();
    let sid: i64 = id.parse().unwrap();

    // Master deploys first; the ready gate holds the role in DEPLOYING while its VM runs.
    let v = wait_service(&f, &id, "master node", |v| nodes(v, "master").len() == 1).await;
    assert!(
        nodes(&v, "worker").is_empty(),
        "straight: worker waits for its parent"
    );
    let m = nodes(&v, "master")[0];
    wait_vm(&x, m, (3, 3)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = flow_json(&f, &format!("/service/{id}")).await.unwrap();
    assert_eq!(svc_state(&v), 1, "DEPLOYING until READY=YES");
    assert_eq!(role(&v, "master")["state"], 1);
    assert!(nodes(&v, "worker").is_empty());
    let node = &role(&v, "master")["nodes"][0];
    assert_eq!(
        node["vm_info"]["VM"]["NAME"],
        format!("master_0_(service_{sid})")
    );
    assert_eq!(node["vm_info"]["VM"].as_object().unwrap().len(), 6);
    let mx = xml::parse(
        rpc(&x, "one.vm.info", &[P::S(AUTH), P::I(m)])
            .await
            .ok_str(),
    )
    .unwrap();
    assert_eq!(child_text(&mx, "USER_TEMPLATE/SERVICE_ID"), id);
    assert_eq!(child_text(&mx, "USER_TEMPLATE/ROLE_NAME"), "master");
    assert_eq!(child_text(&mx, "TEMPLATE/CONTEXT/ONEAPP_X"), "m");
    ready(&x, m).await;

    let v = wait_service(&f, &id, "workers", |v| nodes(v, "worker").len() == 2).await;
    let w = nodes(&v, "worker");
    for &i in &w {
        wait_vm(&x, i, (3, 3)).await;
    }
    let wx = xml::parse(
        rpc(&x, "one.vm.info", &[P::S(AUTH), P::I(w[1])])
            .await
            .ok_str(),
    )
    .unwrap();
    assert_eq!(child_text(&wx, "NAME"), format!("worker_1_(service_{sid})"));
    assert_eq!(child_text(&wx, "TEMPLATE/MEMORY"), "512");
    assert_eq!(child_text(&wx, "TEMPLATE/CONTEXT/ROLE_CTX"), "w");
    assert_eq!(
        child_text(&wx, "TEMPLATE/CONTEXT/NETWORK"),
        "YES",
        "template_contents deep-merges CONTEXT"
    );
    for &i in &w {
        ready(&x, i).await;
    }
    let v = wait_service(&f, &id, "RUNNING", |v| svc_state(v) == 2).await;
    assert_eq!(
        state_history(&v),
        ["DEPLOYING_NETS", "DEPLOYING", "RUNNING"]
    );
    // Services and templates are documents.
    let dp = rpc(
        &x,
        "one.documentpool.info",
        &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1), P::I(100)],
    )
    .await;
    assert_valid(dp.ok_str(), "document_pool.xsd");
    assert_eq!(xml::parse(dp.ok_str()).unwrap().children.len(), 1);
    let doc = rpc(&x, "one.document.info", &[P::S(AUTH), P::I(sid)]).await;
    assert_valid(doc.ok_str(), "document.xsd");

    // Scale up: SCALING, new VM, ready, COOLDOWN, RUNNING.
    let (s, b) = flow(
        &f,
        "POST",
        &format!("/service/{id}/scale"),
        Some(json!({"role_name": "worker", "cardinality": 3})),
    )
    .await;
    assert_eq!((s, b.as_str()), (204, ""));
    let v = flow_json(&f, &format!("/service/{id}")).await.unwrap();
    assert_eq!(
        (svc_state(&v), role(&v, "worker")["state"].as_i64()),
        (8, Some(8))
    );
    let w3 = nodes(&v, "worker");
    assert_eq!(w3.len(), 3);
    wait_vm(&x, w3[2], (3, 3)).await;
    ready(&x, w3[2]).await;
    wait_service(&f, &id, "COOLDOWN", |v| svc_state(v) == 10).await;
    wait_service(&f, &id, "RUNNING after cooldown", |v| svc_state(v) == 2).await;
    let (s, b) = flow(
        &f,
        "POST",
        &format!("/service/{id}/scale"),
        Some(json!({"role_name": "worker", "cardinality": 9})),
    )
    .await;
    assert_eq!(
        (s, b.as_str()),
        (
            500,
            format!("Can't scale service {sid}: Maximum cardinality is 5").as_str()
        )
    );
    let (s, b) = flow(
        &f,
        "POST",
        &format!("/service/{id}/scale"),
        Some(json!({"role_name": "worker", "cardinality": 3})),
    )
    .await;
    assert_eq!(
        (s, b.as_str()),
        (500, "Cardinality of worker is already at 3")
    );

    // Scale down: the oldest node goes.
    let (s, _) = flow(
        &f,
        "POST",
        &format!("/service/{id}/scale"),
        Some(json!({"role_name": "worker", "cardinality": "2"})),
    )
    .await;
    assert_eq!(s, 204);
    let (s, b) = flow(
        &f,
        "POST",
        &format!("/service/{id}/scale"),
        Some(json!({"role_name": "worker", "cardinality": 1})),
    )
    .await;
    assert_eq!(
        (s, b.as_str()),
        (500, "Service cannot be scaled in state: SCALING")
    );
    wait_vm(&x, w3[0], (6, 0)).await;
    let v = wait_service(&f, &id, "RUNNING after scale down", |v| svc_state(v) == 2).await;
    assert_eq!(nodes(&v, "worker"), w3[1..]);
    assert_eq!(role(&v, "worker")["cardinality"], 2);

    // A VM failure → WARNING, and back.
    rpc(
        &x,
        "one.vm.action",
        &[P::S(AUTH), P::S("poweroff"), P::I(w3[1])],
    )
    .await
    .ok_int();
    let v = wait_service(&f, &id, "WARNING", |v| svc_state(v) == 4).await;
    assert_eq!(role(&v, "worker")["state"], 4);
    assert_eq!(role(&v, "master")["state"], 2);
    rpc(
        &x,
        "one.vm.action",
        &[P::S(AUTH), P::S("resume"), P::I(w3[1])],
    )
    .await
    .ok_int();
    wait_service(&f, &id, "RUNNING after resume", |v| svc_state(v) == 2).await;
    let (s, _) = control_json(
        &h.urls().control,
        "POST",
        &format!("/vm/{}/state", w3[2]),
        Some(json!({"state": "BOOT_FAILURE"})),
    )
    .await;
    assert_eq!(s, 204);
    wait_service(&f, &id, "WARNING on *_FAILURE", |v| svc_state(v) == 4).await;
    rpc(&x, "one.vm.recover", &[P::S(AUTH), P::I(w3[2]), P::I(1)])
        .await
        .ok_int();
    wait_service(&f, &id, "RUNNING after recover", |v| svc_state(v) == 2).await;

    // External terminate: node removed, cardinality decremented.
    rpc(
        &x,
        "one.vm.action",
        &[P::S(AUTH), P::S("terminate-hard"), P::I(w3[1])],
    )
    .await
    .ok_int();
    let v = wait_service(&f, &id, "node removed", |v| nodes(v, "worker").len() == 1).await;
    assert_eq!(nodes(&v, "worker"), [w3[2]]);
    assert_eq!(role(&v, "worker")["cardinality"], 1);
    assert_eq!(svc_state(&v), 2);

    // Role action without params → 500; with params it runs.
    let (s, _) = flow(
        &f,
        "POST",
        &format!("/service/{id}/role/worker/action"),
        Some(json!({"action": {"perform": "poweroff"}})),
    )
    .await;
    assert_eq!(s, 500);

    // Undeploy children first, then the document disappears.
    let (s, _) = flow(&f, "DELETE", &format!("/service/{id}"), None).await;
    assert_eq!(s, 204);
    wait_for(
        "worker leaving RUNNING",
        Duration::from_secs(10),
        || async {
            let ws = vm_state(&x, w3[2]).await;
            (ws != (3, 3)).then_some(())
        },
    )
    .await;
    assert_eq!(
        vm_state(&x, m).await,
        (3, 3),
        "the parent stays up until its child is gone"
    );
    wait_for("service gone", Duration::from_secs(15), || async {
        let (s, b) = flow(&f, "GET", &format!("/service/{id}"), None).await;
        (s == 404).then_some(b)
    })
    .await;
    assert_eq!(vm_state(&x, m).await, (6, 0));
    assert_eq!(vm_state(&x, w3[2]).await, (6, 0));
    let (s, b) = flow(&f, "GET", "/service", None).await;
    assert_eq!((s, b.as_str()), (200, "{\"DOCUMENT_POOL\":{}}"));
    h.shutdown().await;
}

#[tokio::test]
async fn six_dialect_failed_deploy_and_recover() {
    let h = start().await;
    let (x, f, c) = (
        h.urls().xmlrpc.clone(),
        h.urls().oneflow.clone(),
        h.urls().control.clone(),
    );
    let tid = basic_template(&x, "six", h.loopback_net()).await;
    let tmpl = json!({"name": "old", "networks": {"priv": "M|network|Private||id:0"},
        "roles": [{"name": "db", "vm_template": tid.to_string(), "cardinality": 1,
                   "vm_template_contents": "NIC=[NETWORK_ID=\"$priv\"]\nDB_FLAG=\"on\""}]});
    let (s, _) = control_json(&c, "POST", "/boot-failures", Some(json!({"count": 1}))).await;
    assert_eq!(s, 204);
    let id = instantiate_service(&f, tmpl).await;
    let v = wait_service(&f, &id, "FAILED_DEPLOYING", |v| svc_state(v) == 7).await;
    assert_eq!(role(&v, "db")["state"], 7);
    let vm = nodes(&v, "db")[0];
    assert_eq!(vm_state(&x, vm).await, (3, 36));
    let e = xml::parse(
        rpc(&x, "one.vm.info", &[P::S(AUTH), P::I(vm)])
            .await
            .ok_str(),
    )
    .unwrap();
    assert_eq!(child_text(&e, "USER_TEMPLATE/DB_FLAG"), "on");
    assert_eq!(child_text(&e, "TEMPLATE/NIC/NETWORK_ID"), "0");
    let (s, _) = flow(
        &f,
        "POST",
        &format!("/service/{id}/action"),
        Some(json!({"action": {"perform": "recover", "params": {}}})),
    )
    .await;
    assert_eq!(s, 204);
    wait_service(&f, &id, "RUNNING after recover", |v| svc_state(v) == 2).await;
    let (s, b) = flow(
        &f,
        "POST",
        &format!("/service/{id}/action"),
        Some(json!({"action": {"perform": "recover", "params": {}}})),
    )
    .await;
    assert_eq!(
        (s, b.as_str()),
        (500, "Service cannot be recovered in state: RUNNING")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn oneflow_errors() {
    let h = start().await;
    let f = h.urls().oneflow.clone();
    let c = client();
    let r = c.get(format!("{f}/service")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.text().await.unwrap(),
        "A username and password must be provided"
    );
    let r = c
        .get(format!("{f}/service"))
        .basic_auth("oneadmin", Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.text().await.unwrap()),
        (401, "Invalid credentials".to_string())
    );
    let r = c
        .post(format!("{f}/service_template"))
        .basic_auth("oneadmin", Some(PASS))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (s, b) = flow(&f, "POST", "/service_template", Some(json!({"roles": []}))).await;
    assert_eq!(
        (s, b.as_str()),
        (
            400,
            "Mandatory document key 'name (string)' is missing from service template"
        )
    );
    assert_eq!(
        flow(&f, "GET", "/service/42", None).await,
        (404, "Error getting document [42].".into())
    );
    assert_eq!(flow(&f, "GET", "/service/abc", None).await.0, 404);
    assert_eq!(flow(&f, "GET", "/nothing/here", None).await.0, 404);
    let (s, _) = flow(
        &f,
        "POST",
        "/service_template/0/action",
        Some(json!({"perform": "instantiate"})),
    )
    .await;
    assert_eq!(s, 400, "the action wrapper is required");
    let big = "x".repeat(17 * 1024 * 1024);
    let r = c
        .post(format!("{f}/service_template"))
        .basic_auth("oneadmin", Some(PASS))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        flow(&f, "GET", "/service_template", None).await,
        (200, "{\"DOCUMENT_POOL\":{}}".into())
    );
    h.shutdown().await;
}

#[tokio::test]
async fn service_update_replaces_mutable_role_contents_and_refuses_immutable_keys() {
    let h = start().await;
    let (x, f) = (h.urls().xmlrpc.clone(), h.urls().oneflow.clone());
    let tid = basic_template(&x, "node", h.loopback_net()).await;
    let tmpl = json!({"name": "up", "roles": [
        {"name": "worker", "type": "vm", "template_id": tid, "cardinality": 1,
         "template_contents": {"MEMORY": "512"}}]});
    let (s, b) = flow(&f, "POST", "/service_template", Some(tmpl)).await;
    assert_eq!(s, 201, "{b}");
    let t_id = serde_json::from_str::<Value>(&b).unwrap()["DOCUMENT"]["ID"]
        .as_str()
        .unwrap()
        .to_string();
    let inst = json!({"action": {"perform": "instantiate", "params": {}}});
    let (s, b) = flow(
        &f,
        "POST",
        &format!("/service_template/{t_id}/action"),
        Some(inst),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let id = serde_json::from_str::<Value>(&b).unwrap()["DOCUMENT"]["ID"]
        .as_str()
        .unwrap()
        .to_string();
    let v = wait_service(&f, &id, "RUNNING", |v| svc_state(v) == 2).await;
    let live = v["DOCUMENT"]["TEMPLATE"]["BODY"].clone();

    let mut body = live.clone();
    body["roles"][0]["template_contents"]["MEMORY"] = json!("2048");
    body["description"] = json!("updated");
    let (s, b) = flow(&f, "PUT", &format!("/service/{id}"), Some(body)).await;
    assert_eq!(s, 204, "{b}");
    let v = flow_json(&f, &format!("/service/{id}")).await.unwrap();
    assert_eq!(role(&v, "worker")["template_contents"]["MEMORY"], "2048");
    assert_eq!(v["DOCUMENT"]["TEMPLATE"]["BODY"]["description"], "updated");

    let live = v["DOCUMENT"]["TEMPLATE"]["BODY"].clone();
    for (path, value, message) in [
        (
            "cardinality",
            json!(3),
            "Immutable value: `role/cardinality` can not be changed",
        ),
        (
            "name",
            json!("other"),
            "Immutable value: `service/name` can not be changed",
        ),
        (
            "deployment",
            json!("straight"),
            "Immutable value: `service/deployment` can not be changed",
        ),
    ] {
        let mut body = live.clone();
        if path == "cardinality" {
            body["roles"][0][path] = value;
        } else {
            body[path] = value;
        }
        let (s, b) = flow(&f, "PUT", &format!("/service/{id}"), Some(body)).await;
        assert_eq!((s, b.as_str()), (500, message));
    }
}

/// OneFlow's autoscaler (`ServiceAutoScaler`, `VMRole#scale?`): a role's elasticity policy
/// is evaluated every `autoscaler_interval` over the attribute averaged across its RUNNING
/// VMs; it scales after `period_number` true evaluations, waits out the cooldown, never
/// goes past max_vms or below min_vms, and the scale is logged as the autoscaler's.
#[tokio::test]
async fn elasticity_policies_scale_a_role_from_its_vms_attributes() {
    let mut cfg = onesim::Config::for_tests(PASS);
    cfg.timings.autoscaler_interval = Duration::from_millis(300);
    let h = onesim::start(cfg).await.unwrap();
    let (x, f) = (h.urls().xmlrpc.clone(), h.urls().oneflow.clone());
    let c = h.urls().control.clone();
    let tid = basic_template(&x, "node", h.loopback_net()).await;
    let role_body = |policies: Value| {
        json!({"name": "el", "roles": [{"name": "worker", "type": "vm", "template_id": tid,
            "cardinality": 1, "min_vms": 1, "max_vms": 2, "cooldown": 60,
            "elasticity_policies": policies}]})
    };
    // Validation as OneFlow's: an expression that does not parse is refused.
    let (s, b) = flow(
        &f,
        "POST",
        "/service_template",
        Some(role_body(
            json!([{"type": "CHANGE", "adjust": 1, "expression": "LOAD >"}]),
        )),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b.contains("elasticity policy #0 'expression' parse error"),
        "{b}"
    );

    let id = instantiate_service(
        &f,
        role_body(json!([
            {"type": "CHANGE", "adjust": 1, "expression": "LOAD > 0.5", "period_number": 2,
             "cooldown": 1},
            {"type": "CHANGE", "adjust": -1, "expression": "LOAD < 0.5"}
        ])),
    )
    .await;
    let v = wait_service(&f, &id, "RUNNING", |v| svc_state(v) == 2).await;
    let first = nodes(&v, "worker")[0];
    // No VM has LOAD: both comparisons are false (not 0), nothing scales.
    let v = wait_service(&f, &id, "an evaluation", |v| {
        role(v, "worker")["elasticity_policies"][1]["expression_evaluated"] == "LOAD[--] < 0.5"
    })
    .await;
    assert_eq!(role(&v, "worker")["cardinality"], 1);

    let set_load = |vm: i64, load: &'static str| {
        let x = x.clone();
        async move {
            rpc(
                &x,
                "one.vm.update",
                &[
                    P::S(AUTH),
                    P::I(vm),
                    P::S(&format!("LOAD = \"{load}\"")),
                    P::I(1),
                ],
            )
            .await
            .ok_int();
        }
    };
    set_load(first, "0.75").await;
    let v = wait_service(&f, &id, "the scale-up", |v| {
        role(v, "worker")["cardinality"] == 2
    })
    .await;
    let w = role(&v, "worker");
    assert_eq!(
        w["elasticity_policies"][0]["expression_evaluated"],
        "LOAD[0.75] > 0.5"
    );
    // The policy's cooldown became the role's (update_role_policies).
    assert_eq!(w["cooldown"], 1);
    assert!(
        w["elasticity_policies"][0].get("true_evals").is_none(),
        "SCALING forgets the consecutive evaluations: {w}"
    );
    let (_, events) = control_json(&c, "GET", "/events?since=0", None).await;
    let scales: Vec<&Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["agent"] == onesim::AUTOSCALER_AGENT)
        .collect();
    assert_eq!(scales.len(), 1, "{scales:?}");
    assert_eq!(
        scales[0]["args"],
        json!({"role_name": "worker", "cardinality": 2})
    );
    assert_eq!(scales[0]["result"], "ok");

    // Back to RUNNING after the cooldown; LOAD still high, but max_vms holds.
    let v = wait_service(&f, &id, "RUNNING after the cooldown", |v| svc_state(v) == 2).await;
    let both = nodes(&v, "worker");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let v = flow_json(&f, &format!("/service/{id}")).await.unwrap();
    assert_eq!(role(&v, "worker")["cardinality"], 2, "max_vms 2");
    // The average is over the RUNNING VMs that have the attribute: 0.25 and 0.25.
    set_load(both[1], "0.25").await;
    set_load(first, "0.25").await;
    let v = wait_service(&f, &id, "the scale-down", |v| {
        role(v, "worker")["cardinality"] == 1
    })
    .await;
    assert_eq!(
        role(&v, "worker")["elasticity_policies"][1]["expression_evaluated"],
        "LOAD[0.25] < 0.5"
    );
    assert_eq!(
        nodes(&v, "worker"),
        [both[1]],
        "OneFlow removes the oldest node"
    );
    let v = wait_service(&f, &id, "RUNNING at min", |v| svc_state(v) == 2).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let v2 = flow_json(&f, &format!("/service/{id}")).await.unwrap();
    assert_eq!(role(&v2, "worker")["cardinality"], 1, "min_vms 1: {v}");
}
