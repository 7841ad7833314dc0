//! Fault injection, the event log, and restart with `--state-file`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test]
async fn faults_and_event_log() {
    let h = start().await;
    let (x, f, c) = (
        h.urls().xmlrpc.clone(),
        h.urls().oneflow.clone(),
        h.urls().control.clone(),
    );
    let tid = basic_template(&x, "e", h.loopback_net()).await;
    let id = rpc(
        &x,
        "one.template.instantiate",
        &[
            P::S(AUTH),
            P::I(tid),
            P::S("e"),
            P::B(false),
            P::S(""),
            P::B(false),
        ],
    )
    .await
    .ok_int();
    rpc(&x, "one.vm.info", &[P::S(AUTH), P::I(id)])
        .await
        .ok_str();
    rpc(
        &x,
        "one.vm.update",
        &[P::S(AUTH), P::I(id), P::S("K=V"), P::I(1)],
    )
    .await
    .ok_int();
    rpc(
        &x,
        "one.user.allocate",
        &[P::S(AUTH), P::S("carol"), P::S("topsecret"), P::S("")],
    )
    .await
    .ok_int();
    let (s, ev) = control_json(&c, "GET", "/events", None).await;
    assert_eq!(s, 200);
    let calls: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["call"].as_str().unwrap())
        .collect();
    assert_eq!(
        calls,
        [
            "one.vn.allocate",
            "one.template.allocate",
            "one.template.instantiate",
            "one.vm.update",
            "one.user.allocate"
        ]
    );
    let upd = &ev["events"][3];
    assert_eq!(upd["api"], "xmlrpc");
    assert_eq!(upd["args"], json!([id, "K=V", 1]));
    assert_eq!(upd["result"], "ok");
    assert!(upd["time_ms"].as_u64().unwrap() > 0);
    let text = ev.to_string();
    assert!(
        !text.contains("topsecret") && !text.contains(PASS),
        "secrets never reach the event log"
    );
    let last = ev["last_seq"].as_u64().unwrap();
    assert_eq!(control_json(&c, "DELETE", "/events", None).await.0, 204);

    // Error for the next N calls, then normal again; the failing call is logged with its error.
    let (s, r) = control_json(&c, "POST", "/faults", Some(json!({"target": "one.vm.action", "kind": "error", "count": 2, "code": 2048, "message": "boom"}))).await;
    assert_eq!(s, 201, "{r}");
    for _ in 0..2 {
        assert_eq!(
            rpc(&x, "one.vm.action", &[P::S(AUTH), P::S("hold"), P::I(id)])
                .await
                .err(),
            ("[one.vm.action] boom".into(), 2048)
        );
    }
    let after = rpc(&x, "one.vm.action", &[P::S(AUTH), P::S("bogus"), P::I(id)])
        .await
        .err();
    assert_eq!(after.1, 0x800);
    assert!(after.0.contains("not supported"));
    let (_, ev) = control_json(&c, "GET", &format!("/events?since={last}"), None).await;
    let results: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert_eq!(
        results[..2],
        ["[one.vm.action] boom", "[one.vm.action] boom"]
    );
    // Delays, by glob, on OneFlow routes.
    control_json(&c, "POST", "/faults", Some(json!({"target": "oneflow GET /service*", "kind": "delay", "delay_ms": 300, "probability": 1.0}))).await;
    let t0 = Instant::now();
    assert_eq!(flow(&f, "GET", "/service", None).await.0, 200);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    control_json(&c, "POST", "/faults", Some(json!({"target": "oneflow POST /service_template", "kind": "error", "status": 503, "message": "down for maintenance"}))).await;
    assert_eq!(
        flow(
            &f,
            "POST",
            "/service_template",
            Some(json!({"name": "x", "roles": []}))
        )
        .await,
        (503, "down for maintenance".into())
    );
    let (_, fl) = control_json(&c, "GET", "/faults", None).await;
    assert_eq!(fl["faults"].as_array().unwrap().len(), 2);
    let fid = fl["faults"][0]["id"].as_u64().unwrap();
    assert_eq!(
        control_json(&c, "DELETE", &format!("/faults/{fid}"), None)
            .await
            .0,
        204
    );
    assert_eq!(control_json(&c, "DELETE", "/faults", None).await.0, 204);
    assert_eq!(
        flow(
            &f,
            "POST",
            "/service_template",
            Some(json!({"name": "x", "roles": []}))
        )
        .await
        .0,
        201
    );
    // Probability 0 never fires.
    control_json(
        &c,
        "POST",
        "/faults",
        Some(json!({"target": "one.*", "kind": "error", "probability": 0.0})),
    )
    .await;
    rpc(
        &x,
        "one.vm.update",
        &[P::S(AUTH), P::I(id), P::S("K=W"), P::I(1)],
    )
    .await
    .ok_int();
    // Bad control requests.
    assert_eq!(
        control_json(
            &c,
            "POST",
            "/faults",
            Some(json!({"target": "x", "kind": "explode"}))
        )
        .await
        .0,
        400
    );
    let r = client()
        .post(format!("{c}/faults"))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        control_json(
            &c,
            "POST",
            "/vm/999/state",
            Some(json!({"state": "UNKNOWN"}))
        )
        .await
        .0,
        404
    );
    assert_eq!(
        control_json(
            &c,
            "POST",
            &format!("/vm/{id}/state"),
            Some(json!({"state": "NOPE"}))
        )
        .await
        .0,
        400
    );
    wait_vm(&x, id, (3, 3)).await;
    assert_eq!(
        control_json(
            &c,
            "POST",
            &format!("/vm/{id}/state"),
            Some(json!({"state": "UNKNOWN"}))
        )
        .await
        .0,
        204
    );
    assert_eq!(vm_state(&x, id).await, (3, 16));
    assert_eq!(
        control_json(&c, "POST", &format!("/vm/{id}/crash"), None)
            .await
            .0,
        400,
        "none runtime has no processes"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn state_file_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.json");
    let mut cfg = onesim::Config::for_tests(PASS);
    cfg.state_file = Some(file.clone());
    let h = onesim::start(cfg.clone()).await.unwrap();
    let (x, f) = (h.urls().xmlrpc.clone(), h.urls().oneflow.clone());
    let tid = basic_template(&x, "r", h.loopback_net()).await;
    let tmpl =
        json!({"name": "keep", "roles": [{"name": "a", "template_id": tid, "cardinality": 1}]});
    let sid = instantiate_service(&f, tmpl).await;
    wait_for("running", Duration::from_secs(10), || async {
        flow_json(&f, &format!("/service/{sid}"))
            .await
            .filter(|v| v["DOCUMENT"]["TEMPLATE"]["BODY"]["state"] == 2)
    })
    .await;
    let before = flow_json(&f, &format!("/service/{sid}")).await.unwrap();
    let vm = before["DOCUMENT"]["TEMPLATE"]["BODY"]["roles"][0]["nodes"][0]["deploy_id"]
        .as_i64()
        .unwrap();
    rpc(
        &x,
        "one.vm.update",
        &[P::S(AUTH), P::I(vm), P::S("MARK=1"), P::I(1)],
    )
    .await
    .ok_int();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, b"boot").unwrap();
    let img = rpc(
        &x,
        "one.image.allocate",
        &[
            P::S(AUTH),
            P::S(&format!("NAME=\"img\"\nPATH=\"{}\"", disk.display())),
            P::I(1),
        ],
    )
    .await
    .ok_int();
    let image_xml = |x: String| async move {
        rpc(&x, "one.image.info", &[P::S(AUTH), P::I(img)])
            .await
            .ok_str()
            .to_string()
    };
    wait_for("image READY", Duration::from_secs(10), || async {
        image_xml(x.clone())
            .await
            .contains("<STATE>1</STATE>")
            .then_some(())
    })
    .await;
    let first_ip = child_text(
        &onesim::xml::parse(
            rpc(&x, "one.vm.info", &[P::S(AUTH), P::I(vm)])
                .await
                .ok_str(),
        )
        .unwrap(),
        "TEMPLATE/NIC/IP",
    );
    h.shutdown().await;
    assert!(file.exists());

    let h = onesim::start(cfg).await.unwrap();
    let (x, f) = (h.urls().xmlrpc.clone(), h.urls().oneflow.clone());
    let after = flow_json(&f, &format!("/service/{sid}"))
        .await
        .expect("service kept");
    assert_eq!(
        after["DOCUMENT"]["TEMPLATE"]["BODY"]["roles"],
        before["DOCUMENT"]["TEMPLATE"]["BODY"]["roles"]
    );
    assert_eq!(vm_state(&x, vm).await, (3, 3));
    let info = rpc(&x, "one.vm.info", &[P::S(AUTH), P::I(vm)]).await;
    assert!(info.ok_str().contains("<MARK><![CDATA[1]]></MARK>"));
    // Ids keep counting; the service keeps being managed.
    let next = rpc(
        &x,
        "one.template.instantiate",
        &[
            P::S(AUTH),
            P::I(tid),
            P::S("n"),
            P::B(false),
            P::S(""),
            P::B(false),
        ],
    )
    .await
    .ok_int();
    assert!(next > vm);
    // Leases survive the restart: the new VM does not get the address the first one holds.
    let next_ip = child_text(
        &onesim::xml::parse(
            rpc(&x, "one.vm.info", &[P::S(AUTH), P::I(next)])
                .await
                .ok_str(),
        )
        .unwrap(),
        "TEMPLATE/NIC/IP",
    );
    let (a, b) = (
        first_ip.rsplit_once('.').unwrap(),
        next_ip.rsplit_once('.').unwrap(),
    );
    assert_eq!(a.0, b.0);
    assert_eq!(b.1.parse::<u8>().unwrap(), a.1.parse::<u8>().unwrap() + 1);
    // The image is kept READY, its datastore copy with it.
    let body = image_xml(x.clone()).await;
    assert!(body.contains("<STATE>1</STATE>"), "{body}");
    let source = child_text(&onesim::xml::parse(&body).unwrap(), "SOURCE");
    assert_eq!(std::fs::read(&source).unwrap(), b"boot");
    let (s, _) = flow(&f, "DELETE", &format!("/service/{sid}"), None).await;
    assert_eq!(s, 204);
    wait_for(
        "service gone after restart",
        Duration::from_secs(10),
        || async {
            (flow(&f, "GET", &format!("/service/{sid}"), None).await.0 == 404).then_some(())
        },
    )
    .await;
    h.shutdown().await;
    // A corrupt state file is an error naming the file, not a panic.
    std::fs::write(&file, "{broken").unwrap();
    let mut cfg = onesim::Config::for_tests(PASS);
    cfg.state_file = Some(file.clone());
    let err = onesim::start(cfg)
        .await
        .err()
        .expect("corrupt state file must fail");
    assert!(err.to_string().contains("state.json"), "{err}");
}

/// A client that gives up during an injected delay does not cancel the call: like oned
/// and OneFlow, onesim finishes it, so a timed-out mutation may still have happened.
#[tokio::test]
async fn a_delayed_mutation_completes_after_the_client_gave_up() {
    let h = start().await;
    let (x, f, c) = (
        h.urls().xmlrpc.clone(),
        h.urls().oneflow.clone(),
        h.urls().control.clone(),
    );
    for target in ["oneflow POST /service_template", "one.template.allocate"] {
        control_json(
            &c,
            "POST",
            "/faults",
            // Long enough that both timed-out calls and the first listing fit in it,
            // even on a loaded machine.
            Some(json!({"target": target, "kind": "delay", "delay_ms": 2000, "count": 1})),
        )
        .await;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let r = impatient
        .post(format!("{f}/service_template"))
        .basic_auth("oneadmin", Some(PASS))
        .header("content-type", "application/json")
        .body(json!({"name": "late", "roles": []}).to_string())
        .send()
        .await;
    assert!(r.is_err_and(|e| e.is_timeout()));
    let r = impatient
        .post(&x)
        .header("content-type", "text/xml")
        .body(call_xml(
            "one.template.allocate",
            &[P::S(AUTH), P::S("NAME=\"late-vm\"\nCPU=1\nMEMORY=64")],
        ))
        .send()
        .await;
    assert!(r.is_err_and(|e| e.is_timeout()));
    // Not there yet, then there once the delay has passed.
    let list = flow_json(&f, "/service_template").await.unwrap();
    assert!(!list.to_string().contains("\"late\""), "{list}");
    let found = wait_for("the late template", Duration::from_secs(8), || {
        let f = f.clone();
        async move {
            flow_json(&f, "/service_template")
                .await
                .filter(|l| l.to_string().contains("\"late\""))
        }
    })
    .await;
    assert_eq!(
        found["DOCUMENT_POOL"]["DOCUMENT"].as_array().map(Vec::len),
        Some(1)
    );
    wait_for("the late VM template", Duration::from_secs(8), || {
        let x = x.clone();
        async move {
            let out = rpc(
                &x,
                "one.templatepool.info",
                &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1)],
            )
            .await;
            out.ok_str().contains("late-vm").then_some(())
        }
    })
    .await;
    let (_, ev) = control_json(&c, "GET", "/events", None).await;
    let results: Vec<String> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["call"].as_str().unwrap(),
                e["result"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        results,
        ["POST /service_template 201", "one.template.allocate ok"]
    );
    h.shutdown().await;
}

/// The same fault seed and the same calls give the same faults.
#[tokio::test]
async fn seeded_faults_repeat_exactly() {
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let mut cfg = onesim::Config::for_tests(PASS);
        cfg.fault_seed = Some(42);
        let h = onesim::start(cfg).await.unwrap();
        let (f, c) = (h.urls().oneflow.clone(), h.urls().control.clone());
        control_json(&c, "POST", "/faults", Some(json!({"target": "oneflow GET /service", "kind": "error", "status": 503, "probability": 0.5}))).await;
        let mut seen = Vec::new();
        for _ in 0..40 {
            seen.push(flow(&f, "GET", "/service", None).await.0);
        }
        outcomes.push(seen);
        h.shutdown().await;
    }
    let failed = outcomes[0].iter().filter(|s| **s == 503).count();
    assert!((8..=32).contains(&failed), "{failed}/40 failed at p = 0.5");
    assert_eq!(outcomes[0], outcomes[1]);
}

/// The whole front-end goes down (every API listener refuses connections) and comes back
/// on the same ports with its state.
#[tokio::test]
async fn frontend_down_refuses_connections_and_up_restores_them() {
    let h = start().await;
    let (x, f, g, c) = all_urls(&h);
    let tid = basic_template(&x, "fe", h.loopback_net()).await;
    assert_eq!(
        control_json(&c, "POST", "/frontend/down", None).await.0,
        204
    );
    for url in [&x, &f, &g] {
        let r = client().get(url.as_str()).send().await;
        assert!(r.is_err_and(|e| e.is_connect()), "{url} still answers");
    }
    assert_eq!(control_json(&c, "GET", "/health", None).await.0, 200);
    assert_eq!(control_json(&c, "POST", "/frontend/up", None).await.0, 204);
    let pool = rpc(
        &x,
        "one.templatepool.info",
        &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1)],
    )
    .await;
    assert!(pool.ok_str().contains(&format!("<ID>{tid}</ID>")));
    assert_eq!(flow(&f, "GET", "/service", None).await.0, 200);
    assert_eq!(
        control_json(&c, "POST", "/frontend/sideways", None).await.0,
        404
    );
    h.shutdown().await;
}

#[tokio::test]
async fn requests_are_counted_per_target_reads_included() {
    let h = start().await;
    let (x, f, c) = (
        h.urls().xmlrpc.clone(),
        h.urls().oneflow.clone(),
        h.urls().control.clone(),
    );
    basic_template(&x, "r", h.loopback_net()).await;
    let (s, _) = control_json(&c, "DELETE", "/requests", None).await;
    assert_eq!(s, 204);
    for _ in 0..3 {
        rpc(
            &x,
            "one.vmpool.infoextended",
            &[P::S(AUTH), P::I(-2), P::I(0), P::I(-200), P::I(-1)],
        )
        .await;
    }
    assert!(flow_json(&f, "/service").await.is_some());
    let (s, v) = control_json(&c, "GET", "/requests", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["requests"]["one.vmpool.infoextended"], 3, "{v}");
    assert_eq!(v["requests"]["oneflow GET /service"], 1, "{v}");
    assert_eq!(v["total"], 4, "{v}");
}
