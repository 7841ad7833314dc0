//! oned XML-RPC: envelope, errors, VM state machine, pools, templates, networks, documents,
//! and XSD validity of every XML body.

mod common;

use common::*;
use onesim::xml;
use std::time::Duration;

/// `method` called as oneadmin with `args` after the session: its answer, checked against
/// `xsd`, as text and parsed.
async fn valid(u: &str, method: &str, args: &[P<'_>], xsd: &str) -> (String, xml::Elem) {
    let params: Vec<P> = std::iter::once(P::S(AUTH))
        .chain(args.iter().copied())
        .collect();
    let body = rpc(u, method, &params).await.ok_str().to_string();
    assert_valid(&body, xsd);
    let e = xml::parse(&body).unwrap();
    (body, e)
}

/// The pools' "every object" filter: (-2, -1, -1).
const ALL: [P<'static>; 3] = [P::I(-2), P::I(-1), P::I(-1)];

#[tokio::test]
async fn version_auth_and_envelope_errors() {
    let h = start().await;
    let u = h.urls().xmlrpc.clone();
    assert_eq!(
        rpc(&u, "one.system.version", &[P::S(AUTH)]).await.ok_str(),
        "7.4.0"
    );
    let (msg, code) = rpc(&u, "one.vm.info", &[P::S("oneadmin:wrong"), P::I(0)])
        .await
        .err();
    assert_eq!(code, 0x100);
    assert_eq!(
        msg,
        "[one.vm.info] User couldn't be authenticated, aborting call."
    );
    let (msg, code) = rpc(&u, "one.vm.info", &[P::S(AUTH), P::I(77)]).await.err();
    assert_eq!(
        (msg.as_str(), code),
        ("[one.vm.info] Error getting virtual machine [77].", 0x400)
    );
    // Unknown method, arity, types → xmlrpc-c faults.
    assert_eq!(rpc(&u, "one.vm.nope", &[P::S(AUTH)]).await.fault().0, -506);
    assert_eq!(
        rpc(
            &u,
            "one.vmpool.info",
            &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1)]
        )
        .await
        .fault()
        .0,
        -502
    );
    assert_eq!(
        rpc(&u, "one.vm.info", &[P::S(AUTH), P::S("zero")])
            .await
            .fault()
            .0,
        -501
    );
    assert_eq!(
        rpc(&u, "one.vm.info", &[P::I(1), P::I(0)]).await.fault().0,
        -501
    );
    // Malformed XML, not a methodCall, bad UTF-8, too large, wrong path.
    for bad in ["<methodCall><methodName>x", "<foo/>", "", "<methodCall><methodName>one.vm.info</methodName><params><param><value><i4>x</i4></value></param></params></methodCall>"] {
        let (status, body) = post_raw(&u, bad.to_string()).await;
        assert_eq!(status, 200);
        assert_eq!(decode(&body).fault().0, -503, "{bad}");
    }
    let (status, body) = post_raw(&u, vec![0xffu8, 0xfe, b'<']).await;
    assert_eq!((status, decode(&body).fault().0), (200, -510));
    let big = format!("<methodCall><methodName>one.vm.info</methodName><params><param><value><string>{}</string></value></param></params></methodCall>", "a".repeat(17 * 1024 * 1024));
    let (status, body) = post_raw(&u, big).await;
    assert_eq!(status, 413);
    assert_eq!(decode(&body).fault().0, -509);
    let (status, _) = post_raw(&u.replace("/RPC2", "/other"), "x").await;
    assert_eq!(status, 404);
    // Still alive after all that.
    assert_eq!(
        rpc(&u, "one.system.version", &[P::S(AUTH)]).await.ok_str(),
        "7.4.0"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn users_and_templates_validate() {
    let h = start().await;
    let u = h.urls().xmlrpc.clone();
    let me = rpc(&u, "one.user.info", &[P::S(AUTH), P::I(-1)]).await;
    assert_valid(me.ok_str(), "user.xsd");
    let e = xml::parse(me.ok_str()).unwrap();
    assert_eq!(child_text(&e, "ID"), "0");
    assert_eq!(child_text(&e, "NAME"), "oneadmin");
    assert!(
        !me.ok_str().contains(PASS),
        "the password must not be echoed"
    );
    let uid = rpc(
        &u,
        "one.user.allocate",
        &[P::S(AUTH), P::S("alice"), P::S("pw"), P::S("")],
    )
    .await
    .ok_int();
    assert_eq!(uid, 1);
    let (msg, code) = rpc(
        &u,
        "one.user.allocate",
        &[P::S(AUTH), P::S("alice"), P::S("pw"), P::S("")],
    )
    .await
    .err();
    assert_eq!(code, 0x4000, "{msg}");
    assert!(rpc(&u, "one.user.info", &[P::S("alice:pw"), P::I(-1)])
        .await
        .ok_str()
        .contains("<NAME>alice</NAME>"));
    assert_eq!(
        rpc(&u, "one.user.info", &[P::S("alice:pw"), P::I(0)])
            .await
            .err()
            .1,
        0x200
    );
    let pool = rpc(&u, "one.userpool.info", &[P::S(AUTH)]).await;
    assert_valid(pool.ok_str(), "user_pool.xsd");

    let tid = basic_template(&u, "tmpl", h.loopback_net()).await;
    let t = rpc(&u, "one.template.info", &[P::S(AUTH), P::I(tid)]).await;
    assert_valid(t.ok_str(), "vmtemplate.xsd");
    assert!(t.ok_str().contains("<CPU><![CDATA[1]]></CPU>"));
    let xml_tid = rpc(&u, "one.template.allocate", &[P::S(AUTH), P::S("<TEMPLATE><NAME>x</NAME><memory>64</memory><NIC><model>virtio</model></NIC></TEMPLATE>")]).await.ok_int();
    let t2 = rpc(
        &u,
        "one.template.info",
        &[P::S(AUTH), P::I(xml_tid), P::B(false), P::B(false)],
    )
    .await;
    assert!(t2.ok_str().contains("<MEMORY><![CDATA[64]]></MEMORY><NAME><![CDATA[x]]></NAME><NIC><MODEL><![CDATA[virtio]]></MODEL></NIC>"), "{}", t2.ok_str());
    let (msg, code) = rpc(
        &u,
        "one.template.allocate",
        &[P::S(AUTH), P::S("A = \"unterminated")],
    )
    .await
    .err();
    assert_eq!(code, 0x2000, "{msg}");
    let tp = rpc(
        &u,
        "one.templatepool.info",
        &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1)],
    )
    .await;
    assert_valid(tp.ok_str(), "vmtemplate_pool.xsd");
    assert_eq!(xml::parse(tp.ok_str()).unwrap().children.len(), 2);
    assert_eq!(
        rpc(&u, "one.template.delete", &[P::S(AUTH), P::I(xml_tid)])
            .await
            .ok_int(),
        xml_tid
    );
    assert_eq!(
        rpc(&u, "one.template.info", &[P::S(AUTH), P::I(xml_tid)])
            .await
            .err()
            .1,
        0x400
    );
    let vn = rpc(&u, "one.vn.info", &[P::S(AUTH), P::I(0)]).await;
    assert_valid(vn.ok_str(), "vnet.xsd");
    let vp = rpc(
        &u,
        "one.vnpool.info",
        &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1)],
    )
    .await;
    assert_valid(vp.ok_str(), "vnet_pool.xsd");
    assert_eq!(
        rpc(&u, "one.vn.allocate", &[P::S(AUTH), P::S("VN_MAD=bridge")])
            .await
            .err()
            .1,
        0x4000
    );
    let extra = rpc(
        &u,
        "one.vn.allocate",
        &[P::S(AUTH), P::S("NAME=spare\nVN_MAD=bridge")],
    )
    .await
    .ok_int();
    assert_eq!(
        rpc(&u, "one.vn.delete", &[P::S(AUTH), P::I(extra)])
            .await
            .ok_int(),
        extra
    );
    h.shutdown().await;
}

/// Two simulators on one host (two labs, parallel tests) give their VMs addresses in
/// different loopback nets, so guests binding fixed ports (Flower's 9091-9093) cannot
/// collide; the net stays held while its simulator lives.
#[tokio::test]
async fn concurrent_simulators_get_distinct_loopback_nets() {
    let (h1, h2) = (
        onesim::start(onesim::Config::for_tests(PASS))
            .await
            .unwrap(),
        onesim::start(onesim::Config::for_tests(PASS))
            .await
            .unwrap(),
    );
    let mut ips = Vec::new();
    for h in [&h1, &h2] {
        let u = h.urls().xmlrpc.clone();
        let tid = basic_template(&u, "web", h.loopback_net()).await;
        let id = rpc(
            &u,
            "one.template.instantiate",
            &[P::S(AUTH), P::I(tid), P::S("")],
        )
        .await
        .ok_int();
        let e = valid(&u, "one.vm.info", &[P::I(id)], "vm.xsd").await.1;
        let ip = child_text(&e, "TEMPLATE/NIC/IP");
        assert_eq!(ip, onesim::state::vm_ip(h.loopback_net(), id));
        assert!(ip.starts_with(&format!("127.{}.", h.loopback_net())) && h.loopback_net() != 0);
        ips.push(ip);
    }
    assert_eq!(
        ips[0].rsplit_once('.').unwrap().1,
        ips[1].rsplit_once('.').unwrap().1,
        "both VM 0"
    );
    assert_ne!(ips[0], ips[1], "the two simulators' VM 0 share an address");
    // A third simulator cannot take a net that is held.
    let (net, _lock) = onesim::reserve_loopback_net().unwrap();
    assert!(net != h1.loopback_net() && net != h2.loopback_net());
    h1.shutdown().await;
    h2.shutdown().await;
}

#[tokio::test]
async fn vm_lifecycle_xml_and_actions() {
    // Steps long enough that the first info still sees a transient state on a loaded machine.
    let mut cfg = onesim::Config::for_tests(PASS);
    cfg.timings.vm_step = Duration::from_millis(1500);
    let h = onesim::start(cfg).await.unwrap();
    let u = h.urls().xmlrpc.clone();
    let tid = basic_template(&u, "web", h.loopback_net()).await;
    // 6.10 arity (all five) and 7.4 short arity.
    let a = rpc(
        &u,
        "one.template.instantiate",
        &[
            P::S(AUTH),
            P::I(tid),
            P::S("a"),
            P::B(false),
            P::S("ONEAPP_X=\"over\"\nMEMORY=256"),
            P::B(false),
        ],
    )
    .await
    .ok_int();
    let b = rpc(
        &u,
        "one.template.instantiate",
        &[P::S(AUTH), P::I(tid), P::S("")],
    )
    .await
    .ok_int();
    assert_eq!(
        rpc(
            &u,
            "one.template.instantiate",
            &[P::S(AUTH), P::I(99), P::S("")]
        )
        .await
        .err()
        .1,
        0x400
    );
    let first = rpc(&u, "one.vm.info", &[P::S(AUTH), P::I(a)]).await;
    let e = xml::parse(first.ok_str()).unwrap();
    let early = (child_text(&e, "STATE"), child_text(&e, "LCM_STATE"));
    assert!(
        early.0 == "1" || (early.0 == "3" && (early.1 == "1" || early.1 == "2")),
        "{early:?}"
    );
    assert_valid(first.ok_str(), "vm.xsd");
    wait_vm(&u, a, (3, 3)).await;
    wait_vm(&u, b, (3, 3)).await;
    let info = rpc(&u, "one.vm.info", &[P::S(AUTH), P::I(a)]).await;
    let xml_a = info.ok_str();
    assert_valid(xml_a, "vm.xsd");
    let e = xml::parse(xml_a).unwrap();
    let names: Vec<&str> = e.children.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ID",
            "UID",
            "GID",
            "UNAME",
            "GNAME",
            "NAME",
            "PERMISSIONS",
            "LAST_POLL",
            "STATE",
            "LCM_STATE",
            "PREV_STATE",
            "PREV_LCM_STATE",
            "RESCHED",
            "STIME",
            "ETIME",
            "DEPLOY_ID",
            "MONITORING",
            "SCHED_ACTIONS",
            "TEMPLATE",
            "USER_TEMPLATE",
            "HISTORY_RECORDS",
            "BACKUPS"
        ]
    );
    assert_eq!(child_text(&e, "NAME"), "a");
    assert_eq!(child_text(&e, "DEPLOY_ID"), format!("one-{a}"));
    assert_eq!(child_text(&e, "TEMPLATE/MEMORY"), "256");
    assert_eq!(
        child_text(&e, "TEMPLATE/CONTEXT/ETH0_IP"),
        child_text(&e, "TEMPLATE/NIC/IP")
    );
    assert_eq!(
        child_text(&e, "TEMPLATE/NIC/IP"),
        onesim::state::vm_ip(h.loopback_net(), a)
    );
    assert_eq!(child_text(&e, "TEMPLATE/CONTEXT/ONEAPP_X"), "over");
    assert_eq!(
        child_text(&e, "TEMPLATE/CONTEXT/ONEGATE_ENDPOINT"),
        h.urls().onegate
    );
    assert_eq!(child_text(&e, "TEMPLATE/CONTEXT/VMID"), a.to_string());
    assert_eq!(
        child_text(&e, "USER_TEMPLATE/LOGO"),
        "images/logos/ubuntu.png"
    );
    assert!(
        xml_a.contains("<CPU><![CDATA[1]]></CPU>"),
        "template values are CDATA"
    );
    // Template attributes sorted byte-wise.
    let t: Vec<&str> = e
        .child("TEMPLATE")
        .unwrap()
        .children
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    let mut sorted = t.clone();
    sorted.sort();
    assert_eq!(t, sorted);
    let name_b = valid(&u, "one.vm.info", &[P::I(b)], "vm.xsd").await.1;
    assert_eq!(child_text(&name_b, "NAME"), format!("web-{b}"));

    // update: merge then replace, on USER_TEMPLATE.
    assert_eq!(
        rpc(
            &u,
            "one.vm.update",
            &[
                P::S(AUTH),
                P::I(a),
                P::S("READY=YES\nFL_X=[A=\"1\"]"),
                P::I(1)
            ]
        )
        .await
        .ok_int(),
        a
    );
    let e = valid(&u, "one.vm.info", &[P::I(a)], "vm.xsd").await.1;
    assert_eq!(child_text(&e, "USER_TEMPLATE/READY"), "YES");
    assert_eq!(
        child_text(&e, "USER_TEMPLATE/LOGO"),
        "images/logos/ubuntu.png"
    );
    assert_eq!(child_text(&e, "USER_TEMPLATE/FL_X/A"), "1");
    rpc(
        &u,
        "one.vm.update",
        &[
            P::S(AUTH),
            P::I(a),
            P::S("<TEMPLATE><ONLY>1</ONLY></TEMPLATE>"),
        ],
    )
    .await
    .ok_int();
    let e = valid(&u, "one.vm.info", &[P::I(a)], "vm.xsd").await.1;
    assert_eq!(e.child("USER_TEMPLATE").unwrap().children.len(), 1);
    assert_eq!(
        rpc(
            &u,
            "one.vm.update",
            &[P::S(AUTH), P::I(a), P::S("X=1"), P::I(7)]
        )
        .await
        .err(),
        ("[one.vm.update] Wrong update type".into(), 0x1000)
    );
    // updateconf: context merge; ETH* rejected.
    rpc(
        &u,
        "one.vm.updateconf",
        &[
            P::S(AUTH),
            P::I(a),
            P::S("CONTEXT=[ONEAPP_Y=\"2\"]"),
            P::I(1),
        ],
    )
    .await
    .ok_int();
    let e = valid(&u, "one.vm.info", &[P::I(a)], "vm.xsd").await.1;
    assert_eq!(child_text(&e, "TEMPLATE/CONTEXT/ONEAPP_Y"), "2");
    assert_eq!(child_text(&e, "TEMPLATE/CONTEXT/ONEAPP_X"), "over");
    assert!(rpc(
        &u,
        "one.vm.updateconf",
        &[
            P::S(AUTH),
            P::I(a),
            P::S("CONTEXT=[ETH0_IP=\"1.2.3.4\"]"),
            P::I(1)
        ]
    )
    .await
    .err()
    .0
    .contains("ETH"));

    // Actions: action string first; errors.
    let (msg, code) = rpc(&u, "one.vm.action", &[P::S(AUTH), P::S("explode"), P::I(a)])
        .await
        .err();
    assert_eq!(
        (msg.as_str(), code),
        ("[one.vm.action] Action \"explode\" is not supported", 0x800)
    );
    assert_eq!(
        rpc(&u, "one.vm.action", &[P::S(AUTH), P::S("resume"), P::I(a)])
            .await
            .err()
            .1,
        0x800
    );
    assert_eq!(
        rpc(
            &u,
            "one.vm.action",
            &[P::S(AUTH), P::I(a), P::S("poweroff")]
        )
        .await
        .fault()
        .0,
        -501
    );
    rpc(
        &u,
        "one.vm.action",
        &[P::S(AUTH), P::S("poweroff"), P::I(a)],
    )
    .await
    .ok_int();
    assert_eq!(vm_state(&u, a).await, (3, 18));
    wait_vm(&u, a, (8, 0)).await;
    rpc(&u, "one.vm.action", &[P::S(AUTH), P::S("resume"), P::I(a)])
        .await
        .ok_int();
    assert_eq!(vm_state(&u, a).await, (3, 20));
    wait_vm(&u, a, (3, 3)).await;
    rpc(
        &u,
        "one.vm.action",
        &[P::S(AUTH), P::S("terminate-hard"), P::I(a)],
    )
    .await
    .ok_int();
    assert_eq!(vm_state(&u, a).await, (3, 12));
    wait_for("EPILOG", std::time::Duration::from_secs(5), || async {
        (vm_state(&u, a).await == (3, 11)).then_some(())
    })
    .await;
    wait_vm(&u, a, (6, 0)).await;
    let done = rpc(&u, "one.vm.info", &[P::S(AUTH), P::I(a)]).await;
    assert_valid(done.ok_str(), "vm.xsd");
    assert_ne!(
        child_text(&xml::parse(done.ok_str()).unwrap(), "ETIME"),
        "0"
    );
    // Recover: delete-recreate and delete.
    assert_eq!(
        rpc(&u, "one.vm.recover", &[P::S(AUTH), P::I(b), P::I(2)])
            .await
            .err()
            .1,
        0x800
    );
    rpc(&u, "one.vm.recover", &[P::S(AUTH), P::I(b), P::I(3)])
        .await
        .ok_int();
    assert_eq!(vm_state(&u, b).await, (6, 0));
    h.shutdown().await;
}

#[tokio::test]
async fn pools_filters_and_pagination() {
    let h = start().await;
    let u = h.urls().xmlrpc.clone();
    let tid = basic_template(&u, "p", h.loopback_net()).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            rpc(
                &u,
                "one.template.instantiate",
                &[
                    P::S(AUTH),
                    P::I(tid),
                    P::S(&format!("vm{i}")),
                    P::B(false),
                    P::S(""),
                    P::B(false),
                ],
            )
            .await
            .ok_int(),
        );
    }
    for &i in &ids {
        wait_vm(&u, i, (3, 3)).await;
    }
    rpc(
        &u,
        "one.vm.update",
        &[
            P::S(AUTH),
            P::I(ids[0]),
            P::S("READY=YES\nSCHED_MESSAGE=m"),
            P::I(1),
        ],
    )
    .await
    .ok_int();
    rpc(
        &u,
        "one.vm.action",
        &[P::S(AUTH), P::S("terminate"), P::I(ids[6])],
    )
    .await
    .ok_int();
    wait_vm(&u, ids[6], (6, 0)).await;
    let count = |s: &str| {
        xml::parse(s)
            .unwrap()
            .children
            .iter()
            .map(|c| child_text(c, "ID").parse::<i64>().unwrap())
            .collect::<Vec<_>>()
    };
    let short = rpc(
        &u,
        "one.vmpool.info",
        &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1), P::I(-1)],
    )
    .await;
    assert_valid(short.ok_str(), "vm_pool.xsd");
    assert_eq!(count(short.ok_str()), ids[..6]);
    assert!(
        !short.ok_str().contains("READY"),
        "custom keys are not in short bodies"
    );
    assert!(short.ok_str().contains("<SCHED_MESSAGE>"));
    assert!(!short.ok_str().contains("<CONTEXT>"));
    let ext = rpc(
        &u,
        "one.vmpool.infoextended",
        &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1), P::I(-2)],
    )
    .await;
    assert_valid(ext.ok_str(), "vm_pool_extended.xsd");
    assert_eq!(count(ext.ok_str()), ids);
    assert!(ext.ok_str().contains("<READY><![CDATA[YES]]></READY>"));
    // ID range, pagination, state filter.
    let r = rpc(
        &u,
        "one.vmpool.info",
        &[P::S(AUTH), P::I(-2), P::I(ids[2]), P::I(ids[4]), P::I(-1)],
    )
    .await;
    assert_eq!(count(r.ok_str()), ids[2..=4]);
    let page = rpc(
        &u,
        "one.vmpool.infoextended",
        &[P::S(AUTH), P::I(-2), P::I(2), P::I(-3), P::I(-2)],
    )
    .await;
    assert_eq!(count(page.ok_str()), ids[2..5]);
    let last = rpc(
        &u,
        "one.vmpool.infoextended",
        &[P::S(AUTH), P::I(-2), P::I(6), P::I(-3), P::I(-2)],
    )
    .await;
    assert_eq!(count(last.ok_str()), [ids[6]]);
    let done = rpc(
        &u,
        "one.vmpool.info",
        &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1), P::I(6)],
    )
    .await;
    assert_eq!(count(done.ok_str()), [ids[6]]);
    let pending = rpc(
        &u,
        "one.vmpool.info",
        &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1), P::I(1)],
    )
    .await;
    assert_eq!(pending.ok_str(), "<VM_POOL></VM_POOL>");
    assert_valid(pending.ok_str(), "vm_pool.xsd");
    assert_eq!(
        rpc(
            &u,
            "one.vmpool.info",
            &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1), P::I(12)]
        )
        .await
        .err(),
        ("[one.vmpool.info] Incorrect state filter 12".into(), 0x1000)
    );
    assert_eq!(
        rpc(
            &u,
            "one.vmpool.info",
            &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1), P::I(-3)]
        )
        .await
        .err()
        .1,
        0x1000
    );
    assert_eq!(
        rpc(
            &u,
            "one.vmpool.info",
            &[P::S(AUTH), P::I(-5), P::I(-1), P::I(-1), P::I(-1)]
        )
        .await
        .err(),
        ("[one.vmpool.info] Incorrect filter_flag".into(), 0x1000)
    );
    // Filter flags: mine / by uid; another user sees nothing of oneadmin's.
    assert_eq!(
        count(
            rpc(
                &u,
                "one.vmpool.info",
                &[P::S(AUTH), P::I(-3), P::I(-1), P::I(-1), P::I(-1)]
            )
            .await
            .ok_str()
        )
        .len(),
        6
    );
    assert_eq!(
        count(
            rpc(
                &u,
                "one.vmpool.info",
                &[P::S(AUTH), P::I(5), P::I(-1), P::I(-1), P::I(-1)]
            )
            .await
            .ok_str()
        )
        .len(),
        0
    );
    rpc(
        &u,
        "one.user.allocate",
        &[P::S(AUTH), P::S("bob"), P::S("pw"), P::S("")],
    )
    .await
    .ok_int();
    assert_eq!(
        count(
            rpc(
                &u,
                "one.vmpool.info",
                &[P::S("bob:pw"), P::I(-2), P::I(-1), P::I(-1), P::I(-1)]
            )
            .await
            .ok_str()
        )
        .len(),
        0
    );
    // Documents pool (empty, then via OneFlow in other tests) validates.
    let dp = rpc(
        &u,
        "one.documentpool.info",
        &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1), P::I(100)],
    )
    .await;
    assert_valid(dp.ok_str(), "document_pool.xsd");
    h.shutdown().await;
}

/// oned.conf's ONEGATE_ENDPOINT reaches a TOKEN=YES guest verbatim (OpenNebula
/// `VirtualMachine::generate_token_context`), whatever address OneGate listens on.
#[tokio::test]
async fn advertised_onegate_endpoint_is_the_guests() {
    let mut cfg = onesim::Config::for_tests(PASS);
    cfg.onegate.advertised_endpoint = Some("http://10.0.2.2:5030".into());
    let h = onesim::start(cfg).await.unwrap();
    let u = h.urls().xmlrpc.clone();
    let tid = basic_template(&u, "web", h.loopback_net()).await;
    let vm = rpc(
        &u,
        "one.template.instantiate",
        &[P::S(AUTH), P::I(tid), P::S("")],
    )
    .await
    .ok_int();
    let info = rpc(&u, "one.vm.info", &[P::S(AUTH), P::I(vm)]).await;
    let e = xml::parse(info.ok_str()).unwrap();
    assert_eq!(
        child_text(&e, "TEMPLATE/CONTEXT/ONEGATE_ENDPOINT"),
        "http://10.0.2.2:5030"
    );
    assert_ne!(h.urls().onegate, "http://10.0.2.2:5030");
    h.shutdown().await;
}

/// Images and leases through XML-RPC, as a client sees them: `one.image.allocate` with a
/// PATH answers the id while the image is LOCKED, READY once copied; a VM with
/// `DISK=[IMAGE=…]` and `NIC=[NETWORK=…]` holds the image (USED, delete refused with oned's
/// text) and a lease shown in `one.vn.info`; both come back at DONE; every body is
/// XSD-valid (image, image_pool, vm, vm_pool, vnet with LEASES, vnet_pool with ALLOCATED).
#[tokio::test]
async fn images_follow_oned() {
    let h = start().await;
    let u = h.urls().xmlrpc.clone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![7u8; 2 * 1024 * 1024]).unwrap();
    let img = rpc(
        &u,
        "one.image.allocate",
        &[
            P::S(AUTH),
            P::S(&format!(
                "NAME=\"appliance\"\nPATH=\"{}\"\nDEV_PREFIX=\"vd\"\nDESCRIPTION=\"x\"",
                path.display()
            )),
            P::I(1),
        ],
    )
    .await
    .ok_int();
    let info = |u: String| async move {
        valid(&u, "one.image.info", &[P::I(img)], "image.xsd")
            .await
            .1
    };
    wait_for("image READY", Duration::from_secs(10), || async {
        (child_text(&info(u.clone()).await, "STATE") == "1").then_some(())
    })
    .await;
    let e = info(u.clone()).await;
    let source = child_text(&e, "SOURCE");
    assert_eq!(
        std::fs::read(&source).unwrap(),
        std::fs::read(&path).unwrap(),
        "SOURCE is a copy of PATH"
    );
    assert_eq!(child_text(&e, "SIZE"), "2");
    assert_eq!(child_text(&e, "FORMAT"), "raw");
    assert_eq!(child_text(&e, "TEMPLATE/DEV_PREFIX"), "vd");
    valid(&u, "one.imagepool.info", &ALL, "image_pool.xsd").await;
    rpc(
        &u,
        "one.vn.allocate",
        &[
            P::S(AUTH),
            P::S("NAME=\"lan\"\nVN_MAD=bridge\nBRIDGE=br0\nGATEWAY=10.10.0.1\nNETWORK_MASK=255.255.255.0\nAR=[TYPE=IP4,IP=10.10.0.10,SIZE=100]"),
            P::I(-1),
        ],
    )
    .await
    .ok_int();
    let tid = rpc(
        &u,
        "one.template.allocate",
        &[
            P::S(AUTH),
            P::S("NAME=\"app\"\nMEMORY=128\nDISK=[IMAGE=\"appliance\"]\nNIC=[NETWORK=\"lan\"]\nCONTEXT=[NETWORK=YES]"),
        ],
    )
    .await
    .ok_int();
    let vm = rpc(
        &u,
        "one.template.instantiate",
        &[P::S(AUTH), P::I(tid), P::S("")],
    )
    .await
    .ok_int();
    let (_, e) = valid(&u, "one.vm.info", &[P::I(vm)], "vm.xsd").await;
    assert_eq!(child_text(&e, "TEMPLATE/DISK/IMAGE"), "appliance");
    assert_eq!(child_text(&e, "TEMPLATE/DISK/SOURCE"), source);
    assert_eq!(child_text(&e, "TEMPLATE/DISK/TARGET"), "vda");
    assert_eq!(child_text(&e, "TEMPLATE/NIC/IP"), "10.10.0.10");
    assert_eq!(child_text(&e, "TEMPLATE/NIC/MAC"), "02:00:0a:0a:00:0a");
    assert_eq!(child_text(&e, "TEMPLATE/NIC/GATEWAY"), "10.10.0.1");
    assert_eq!(
        child_text(&e, "TEMPLATE/CONTEXT/ETH0_MASK"),
        "255.255.255.0"
    );
    assert_eq!(child_text(&e, "TEMPLATE/CONTEXT/ETH0_IP6"), "");
    assert_eq!(child_text(&e, "TEMPLATE/CONTEXT/TARGET"), "hda");
    let (vp, _) = valid(
        &u,
        "one.vmpool.info",
        &[P::I(-2), P::I(-1), P::I(-1), P::I(-1)],
        "vm_pool.xsd",
    )
    .await;
    assert!(vp.contains(
        "<DISK><DISK_ID><![CDATA[0]]></DISK_ID><DATASTORE><![CDATA[default]]></DATASTORE>"
    ));
    let (vn, _) = valid(&u, "one.vn.info", &[P::I(0)], "vnet.xsd").await;
    assert!(
        vn.contains(&format!("<LEASE><IP><![CDATA[10.10.0.10]]></IP><MAC><![CDATA[02:00:0a:0a:00:0a]]></MAC><VM><![CDATA[{vm}]]></VM></LEASE>")),
        "{vn}"
    );
    let (vnp, _) = valid(&u, "one.vnpool.info", &ALL, "vnet_pool.xsd").await;
    assert!(vnp.contains(&format!(
        "<ALLOCATED><![CDATA[ 0 {}]]></ALLOCATED>",
        0x10_0000_0000_i64 + vm
    )));
    let e = info(u.clone()).await;
    assert_eq!(
        (child_text(&e, "STATE"), child_text(&e, "RUNNING_VMS")),
        ("2".into(), "1".into())
    );
    let (msg, code) = rpc(&u, "one.image.delete", &[P::S(AUTH), P::I(img)])
        .await
        .err();
    assert_eq!(
        (msg.as_str(), code),
        (
            "[one.image.delete] Cannot delete image. There are 1 VMs using it.",
            0x800
        )
    );
    // A missing image: oned's text, and nothing taken.
    let bad = rpc(
        &u,
        "one.template.allocate",
        &[
            P::S(AUTH),
            P::S("NAME=\"bad\"\nNIC=[NETWORK=\"lan\"]\nDISK=[IMAGE=\"nope\"]"),
        ],
    )
    .await
    .ok_int();
    let (msg, code) = rpc(
        &u,
        "one.template.instantiate",
        &[P::S(AUTH), P::I(bad), P::S("")],
    )
    .await
    .err();
    assert_eq!(code, 0x4000);
    assert_eq!(msg, "[one.template.instantiate] Error allocating a new virtual machine template. DISK 0: User 0 does not own an image with name: nope . Set IMAGE_UNAME or IMAGE_UID of owner in DISK.");
    wait_vm(&u, vm, (3, 3)).await;
    rpc(
        &u,
        "one.vm.action",
        &[P::S(AUTH), P::S("terminate-hard"), P::I(vm)],
    )
    .await
    .ok_int();
    wait_for("image READY again", Duration::from_secs(10), || async {
        let e = info(u.clone()).await;
        (child_text(&e, "STATE") == "1" && child_text(&e, "RUNNING_VMS") == "0").then_some(())
    })
    .await;
    let (vn, _) = valid(&u, "one.vn.info", &[P::I(0)], "vnet.xsd").await;
    assert!(vn.contains("<USED_LEASES>0</USED_LEASES>"));
    assert_eq!(
        rpc(&u, "one.image.delete", &[P::S(AUTH), P::I(img)])
            .await
            .ok_int(),
        img
    );
    assert!(
        !std::path::Path::new(&source).exists(),
        "the datastore copy is removed"
    );
    assert_eq!(
        rpc(&u, "one.image.info", &[P::S(AUTH), P::I(img)])
            .await
            .err(),
        (
            format!("[one.image.info] Error getting image [{img}]."),
            0x400
        )
    );
    h.shutdown().await;
}

/// `one.document.{allocate,update,lock,unlock}` as oned 7.4 (SharedAPI::lock/unlock,
/// PoolObjectSQL::lock_db/unlock_db, AclManager::authorize; docs/upstream-notes.md): the
/// lock's owner is the user; `test` refuses any lock with its TIME as the message; a plain
/// lock by the same user overrides, another user's is refused unless admin; a USE or
/// MANAGE lock refuses `update` to everyone, an ADMIN one does not.
#[tokio::test]
async fn documents_lock_as_oned_does() {
    let h = start().await;
    let u = h.urls().xmlrpc.clone();
    let tenant = "ann:ann-pw";
    h.sim
        .with(|st| st.alloc_user("ann", "ann-pw", "core"))
        .unwrap();
    let id = rpc(
        &u,
        "one.document.allocate",
        &[
            P::S(tenant),
            P::S("NAME=\"lease\"\nHOLDER=\"a\""),
            P::I(1717),
        ],
    )
    .await
    .ok_int();
    let info = |who: &'static str| {
        let u = u.clone();
        async move {
            rpc(&u, "one.document.info", &[P::S(who), P::I(id)])
                .await
                .ok_str()
                .to_string()
        }
    };
    let body = info(tenant).await;
    assert!(
        body.contains("<NAME>lease</NAME>") && body.contains("<TYPE>1717</TYPE>"),
        "{body}"
    );
    assert!(body.contains("<HOLDER><![CDATA[a]]></HOLDER>"), "{body}");
    assert!(
        !body.contains("<LOCK>") && !body.contains("<BODY>"),
        "{body}"
    );
    let lock = |who: &'static str, level: i64, test: bool| {
        let u = u.clone();
        async move {
            rpc(
                &u,
                "one.document.lock",
                &[P::S(who), P::I(id), P::I(level), P::B(test)],
            )
            .await
        }
    };
    let unlock = |who: &'static str| {
        let u = u.clone();
        async move { rpc(&u, "one.document.unlock", &[P::S(who), P::I(id)]).await }
    };
    let update = |who: &'static str, text: &'static str| {
        let u = u.clone();
        async move {
            rpc(
                &u,
                "one.document.update",
                &[P::S(who), P::I(id), P::S(text), P::I(0)],
            )
            .await
        }
    };
    // Unlocking an unlocked document: its lock owner is -1, not the caller.
    let (msg, code) = unlock(tenant).await.err();
    assert_eq!(
        (msg.as_str(), code),
        (
            "[one.document.unlock] Cannot unlock: Lock is owned by another user",
            0x800
        )
    );
    assert_eq!(lock(tenant, 9, true).await.err().1, 0x800, "wrong level");
    assert_eq!(lock(tenant, 3, true).await.ok_int(), id);
    let body = info(tenant).await;
    assert!(body.contains("<LOCK><LOCKED>3</LOCKED><OWNER>"), "{body}");
    let time = body
        .split("<TIME>")
        .nth(1)
        .and_then(|t| t.split('<').next())
        .unwrap()
        .to_string();
    // test=true: any lock refuses, the same user's included; the message is the TIME.
    let (msg, code) = lock(tenant, 3, true).await.err();
    assert_eq!((msg, code), (format!("[one.document.lock] {time}"), 0x800));
    // An ADMIN lock leaves MANAGE operations such as update to everyone.
    assert_eq!(update(tenant, "HOLDER=\"b\"").await.ok_int(), id);
    assert!(info(tenant)
        .await
        .contains("<HOLDER><![CDATA[b]]></HOLDER>"));
    // Without test the same user re-locks (level, time overridden): no mutual exclusion.
    assert_eq!(lock(tenant, 1, false).await.ok_int(), id);
    assert!(info(tenant).await.contains("<LOCKED>1</LOCKED>"));
    // A USE lock refuses update to its owner and to oneadmin alike.
    for who in [tenant, AUTH] {
        let (msg, code) = update(who, "HOLDER=\"c\"").await.err();
        assert_eq!(code, 0x200, "{msg}");
        assert!(msg.contains("DOCUMENT is locked. ["), "{msg}");
    }
    // Another user's lock: oneadmin overrides it and may unlock it; its owner may not
    // unlock oneadmin's.
    assert_eq!(lock(AUTH, 2, false).await.ok_int(), id);
    assert!(info(tenant).await.contains("<OWNER>0</OWNER>"));
    assert_eq!(unlock(tenant).await.err().1, 0x800);
    assert_eq!(unlock(AUTH).await.ok_int(), id);
    assert!(!info(tenant).await.contains("<LOCK>"));
    assert_eq!(update(tenant, "HOLDER=\"d\"").await.ok_int(), id);
    // The event log names the caller's User-Agent (empty for this raw client).
    let (_, ev) = control_json(&h.urls().control, "GET", "/events", None).await;
    assert!(ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e.get("agent").is_some()));
}
