//! oned XML bodies → typed models, and the XML-RPC envelope, on real-format fixtures.

mod common;

use common::fixture;
use flower_reconcile::one::model::{
    parse_document, parse_user, parse_vm, parse_vm_pool, parse_vm_template, parse_vnet,
    parse_vnet_pool, LcmState, ModelError, TemplateValue, VmState,
};
use flower_reconcile::one::xmlrpc::{
    decode_response, one_result, ErrorCode, OneResult, Response, Value,
};

#[test]
fn full_vm_body_with_cdata() {
    let vm = parse_vm(&fixture("vm_full.xml")).unwrap();
    assert_eq!(vm.id, 42);
    assert_eq!(vm.name, "supernode_42_(service_4) R&D");
    assert_eq!((vm.uid, vm.gid), (2, 1));
    assert_eq!((vm.uname.as_str(), vm.gname.as_str()), ("flower", "users"));
    assert_eq!(vm.state, VmState::Active);
    assert_eq!(vm.lcm_state, LcmState::Running);
    assert!(vm.is_running());
    assert_eq!((vm.stime, vm.etime), (1764280000, 0));
    assert_eq!(vm.deploy_id, "one-42");
    assert_eq!(vm.lock, Some(1));
    assert_eq!(vm.template_id, Some(3));
    assert_eq!(vm.hostname.as_deref(), Some("node10.cluster"));
    // NICs and IPs.
    assert_eq!(vm.nics.len(), 2);
    assert_eq!(vm.nics[0].ip.as_deref(), Some("10.0.0.42"));
    assert_eq!(vm.nics[0].network.as_deref(), Some("flower-private"));
    assert_eq!(vm.nics[0].network_id, Some(0));
    assert_eq!(vm.nics[0].nic_id, Some(0));
    assert_eq!(vm.nics[0].mac.as_deref(), Some("02:00:0a:00:00:2a"));
    assert_eq!(vm.nics[1].ip6_global.as_deref(), Some("2001:db8::42"));
    assert_eq!(vm.first_ip(), Some("10.0.0.42"));
    // CONTEXT, ordered.
    assert_eq!(
        vm.context.get("ONEGATE_ENDPOINT"),
        Some("http://169.254.16.9:5030")
    );
    assert_eq!(vm.context.get_index(0).map(|(k, _)| k), Some("DISK_ID"));
    // USER_TEMPLATE: ordered map, CDATA kept verbatim (markup, quotes, trailing space).
    assert_eq!(vm.service_id(), Some(4));
    assert_eq!(vm.role_name(), Some("supernode"));
    assert!(vm.is_ready());
    assert_eq!(vm.attr("FL_ENDPOINT"), Some("10.0.0.10:9092"));
    assert_eq!(
        vm.attr("ERROR"),
        Some("Fri Nov 27 23:30:00 2026: <probe> & \"quoted\" ")
    );
    assert_eq!(vm.attr("SCHED_MESSAGE"), Some(""));
    let keys: Vec<&str> = vm.user_template.keys().collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(
        keys, sorted,
        "oned emits attributes sorted; order must be kept"
    );
    let (name, vec) = &vm.user_template_vectors[0];
    assert_eq!(name, "MY_VECTOR");
    assert_eq!(vec.get("B"), Some("two words"));
}

#[test]
fn extended_pool_bodies() {
    let vms = parse_vm_pool(&fixture("vmpool_extended.xml")).unwrap();
    assert_eq!(vms.iter().map(|v| v.id).collect::<Vec<_>>(), [40, 41, 45]);
    assert_eq!(vms[0].role_name(), Some("superlink"));
    assert_eq!(vms[1].attr("FL_ROLE"), Some("supernode"));
    let pending = &vms[2];
    assert_eq!(pending.state, VmState::Pending);
    assert_eq!(pending.lcm_state, LcmState::LcmInit);
    assert!(pending.user_template.is_empty());
    assert_eq!(pending.hostname, None);
    assert_eq!(pending.deploy_id, "");
}

#[test]
fn short_pool_bodies() {
    let vms = parse_vm_pool(&fixture("vmpool_short.xml")).unwrap();
    assert_eq!(vms.len(), 3);
    assert_eq!(vms[0].nics[0].ip.as_deref(), Some("10.0.0.40"));
    assert!(vms[0].context.is_empty(), "short bodies have no CONTEXT");
    assert_eq!(
        vms[0].service_id(),
        None,
        "short bodies have no custom keys"
    );
    assert_eq!(vms[1].lcm_state, LcmState::BootFailure);
    assert!(vms[1].lcm_state.is_failure());
    assert_eq!(vms[1].attr("ERROR"), Some("boot failed"));
    assert_eq!(vms[2].state, VmState::Poweroff);
}

#[test]
fn empty_pool_and_unknown_elements() {
    assert!(parse_vm_pool("<VM_POOL/>").unwrap().is_empty());
    assert!(parse_vm_pool("<VM_POOL></VM_POOL>").unwrap().is_empty());
    let vm = parse_vm(
        "<VM><ID>1</ID><FUTURE_FIELD><X>1</X></FUTURE_FIELD><STATE>99</STATE><LCM_STATE>3</LCM_STATE></VM>",
    )
    .unwrap();
    assert_eq!(vm.state, VmState::Other(99));
}

#[test]
fn model_errors_name_the_element() {
    let pool = fixture("vmpool_extended.xml").replace(
        "<LAST_POLL>1764285000</LAST_POLL><STATE>3</STATE><LCM_STATE>3</LCM_STATE><PREV_STATE>3</PREV_STATE><PREV_LCM_STATE>3</PREV_LCM_STATE><RESCHED>0</RESCHED><STIME>1764280000</STIME><ETIME>0</ETIME><DEPLOY_ID>one-41",
        "<LAST_POLL>1764285000</LAST_POLL><STATE>three</STATE><LCM_STATE>3</LCM_STATE><PREV_STATE>3</PREV_STATE><PREV_LCM_STATE>3</PREV_LCM_STATE><RESCHED>0</RESCHED><STIME>1764280000</STIME><ETIME>0</ETIME><DEPLOY_ID>one-41",
    );
    let e = parse_vm_pool(&pool).unwrap_err();
    match &e {
        ModelError::Field { path, .. } => assert_eq!(path, "VM_POOL/VM[1]/STATE"),
        other => panic!("{other:?}"),
    }
    let e = parse_vm("<VM><ID>1</ID><STATE>1</STATE></VM>").unwrap_err();
    assert!(e.to_string().contains("VM/LCM_STATE"), "{e}");
    assert!(parse_vm("<VMX/>").is_err());
    assert!(parse_vm("<VM><ID>1</ID>").is_err());
    assert!(parse_vm_pool("<VM><ID>1</ID></VM>").is_err());
}

#[test]
fn other_objects() {
    let t = parse_vm_template(
        "<VMTEMPLATE><ID>3</ID><UID>0</UID><GID>0</GID><UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME><NAME>flower-supernode</NAME><LOCK><LOCKED>1</LOCKED><OWNER>0</OWNER><TIME>1</TIME><REQ_ID>-1</REQ_ID></LOCK><PERMISSIONS><OWNER_U>1</OWNER_U></PERMISSIONS><REGTIME>1764200000</REGTIME><TEMPLATE><CONTEXT><NETWORK><![CDATA[YES]]></NETWORK><TOKEN><![CDATA[YES]]></TOKEN></CONTEXT><CPU><![CDATA[1]]></CPU><NIC><NETWORK_ID><![CDATA[0]]></NETWORK_ID></NIC><NIC><NETWORK_ID><![CDATA[4]]></NETWORK_ID></NIC></TEMPLATE></VMTEMPLATE>",
    )
    .unwrap();
    assert_eq!(
        (t.id, t.name.as_str(), t.regtime, t.lock),
        (3, "flower-supernode", 1764200000, Some(1))
    );
    assert_eq!(t.template.get("CPU"), Some("1"));
    assert_eq!(t.template.vectors("NIC").count(), 2);
    assert_eq!(
        t.template
            .vector("CONTEXT")
            .unwrap()
            .get("TOKEN")
            .map(String::as_str),
        Some("YES")
    );
    assert!(matches!(t.template.attrs[0].1, TemplateValue::Vector(_)));

    let vn = "<VNET><ID>0</ID><UID>0</UID><GID>0</GID><UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME><NAME>flower-private</NAME><BRIDGE>br0</BRIDGE><VN_MAD>bridge</VN_MAD><USED_LEASES>2</USED_LEASES><AR_POOL><AR><AR_ID><![CDATA[0]]></AR_ID><IP><![CDATA[10.0.0.2]]></IP><SIZE><![CDATA[200]]></SIZE><TYPE><![CDATA[IP4]]></TYPE><LEASES><LEASE><IP><![CDATA[10.0.0.2]]></IP></LEASE><LEASE><IP><![CDATA[10.0.0.3]]></IP></LEASE></LEASES></AR></AR_POOL><TEMPLATE><DNS><![CDATA[10.0.0.1]]></DNS></TEMPLATE></VNET>";
    let v = parse_vnet(vn).unwrap();
    assert_eq!((v.id, v.bridge.as_str(), v.used_leases), (0, "br0", 2));
    assert_eq!(v.address_ranges[0].leases, 2);
    assert_eq!(
        v.address_ranges[0].attrs.get("SIZE").map(String::as_str),
        Some("200")
    );
    assert!(!v.address_ranges[0].attrs.contains_key("LEASES"));
    assert_eq!(v.template.get("DNS"), Some("10.0.0.1"));
    assert_eq!(
        parse_vnet_pool(&format!("<VNET_POOL>{vn}{vn}</VNET_POOL>"))
            .unwrap()
            .len(),
        2
    );

    let u = parse_user("<USER><ID>2</ID><GID>1</GID><GROUPS><ID>1</ID><ID>100</ID></GROUPS><GNAME>users</GNAME><NAME>flower</NAME><PASSWORD>4b1a...</PASSWORD><AUTH_DRIVER>core</AUTH_DRIVER><ENABLED>1</ENABLED><TEMPLATE><TOKEN_PASSWORD><![CDATA[abc]]></TOKEN_PASSWORD></TEMPLATE></USER>").unwrap();
    assert_eq!(
        (u.id, u.name.as_str(), u.groups.clone(), u.enabled),
        (2, "flower", vec![1, 100], true)
    );
    assert!(
        !format!("{u:?}").contains("4b1a"),
        "password hash is not kept"
    );

    let d = parse_document("<DOCUMENT><ID>5</ID><UID>2</UID><GID>1</GID><UNAME>flower</UNAME><GNAME>users</GNAME><NAME>flower-demo</NAME><TYPE>100</TYPE><PERMISSIONS><OWNER_U>1</OWNER_U></PERMISSIONS><TEMPLATE><BODY><![CDATA[{\"name\":\"flower-demo\",\"state\":2}]]></BODY></TEMPLATE></DOCUMENT>").unwrap();
    assert_eq!((d.id, d.doc_type), (5, 100));
    assert_eq!(d.body(), Some("{\"name\":\"flower-demo\",\"state\":2}"));
}

fn decoded(name: &str) -> Response {
    decode_response(&fixture(name)).unwrap()
}

#[test]
fn xmlrpc_success_and_failures() {
    let Response::Value(v) = decoded("rpc_version_ok.xml") else {
        panic!()
    };
    assert_eq!(
        one_result(v).unwrap(),
        OneResult::Success(Value::Str("7.4.0".into()))
    );
    let Response::Value(v) = decoded("rpc_vm_action_ok.xml") else {
        panic!()
    };
    assert_eq!(one_result(v).unwrap(), OneResult::Success(Value::Int(42)));

    let Response::Value(v) = decoded("rpc_failure_5.xml") else {
        panic!()
    };
    assert_eq!(
        one_result(v).unwrap(),
        OneResult::Failure {
            message: "[one.vm.info] Error getting virtual machine [4242].".into(),
            code: ErrorCode::NoExists,
            resp_id: Some(4242),
        }
    );
    let Response::Value(v) = decoded("rpc_failure_3.xml") else {
        panic!()
    };
    match one_result(v).unwrap() {
        OneResult::Failure { code, resp_id, .. } => {
            assert_eq!(code, ErrorCode::Action);
            assert_eq!(resp_id, None);
        }
        other => panic!("{other:?}"),
    }
    let Response::Value(v) = decoded("rpc_failure_auth.xml") else {
        panic!()
    };
    assert!(matches!(
        one_result(v).unwrap(),
        OneResult::Failure {
            code: ErrorCode::Authentication,
            ..
        }
    ));

    assert_eq!(
        decoded("rpc_fault.xml"),
        Response::Fault {
            code: -501,
            message: "Not enough parameters".into()
        }
    );
}

#[test]
fn xmlrpc_full_vm_string_round_trips() {
    let Response::Value(v) = decoded("rpc_vm_info_ok.xml") else {
        panic!()
    };
    let OneResult::Success(Value::Str(xml)) = one_result(v).unwrap() else {
        panic!()
    };
    assert_eq!(
        parse_vm(&xml).unwrap(),
        parse_vm(&fixture("vm_full.xml")).unwrap()
    );
}

#[test]
fn xmlrpc_malformed_envelopes_are_errors() {
    for bad in [
        "",
        "<methodResponse/>",
        "<methodResponse><params></params></methodResponse>",
        "<methodResponse><params><param><value><int>x</int></value></param></params></methodResponse>",
        "<methodResponse><params><param><value><array><data><value><boolean>2</boolean></value></data></array></value></param></params></methodResponse>",
        "<html>502 Bad Gateway</html>",
    ] {
        assert!(decode_response(bad).is_err(), "{bad}");
    }
    // Untyped values are strings; struct members keep order.
    let r = decode_response("<methodResponse><params><param><value><struct><member><name>a</name><value>x &amp; y</value></member><member><name>b</name><value><i8>-1</i8></value></member></struct></value></param></params></methodResponse>").unwrap();
    assert_eq!(
        r,
        Response::Value(Value::Struct(vec![
            ("a".into(), Value::Str("x & y".into())),
            ("b".into(), Value::Int(-1))
        ]))
    );
    assert!(one_result(Value::Int(1)).is_err());
    assert!(one_result(Value::Array(vec![
        Value::Str("true".into()),
        Value::Nil,
        Value::Int(0)
    ]))
    .is_err());
}
