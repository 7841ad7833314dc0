//! oned client against a loopback XML-RPC server: parameters on the wire, typed results,
//! error arrays and faults, pagination cost, and retries only for idempotent reads.

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use common::fixture;
use common::rpcserver::{self, failure, ok_int, ok_string, Call, P};
use flower_reconcile::one::model::{LcmState, VmState};
use flower_reconcile::one::oned::{
    PoolFilter, PoolRange, RecoverOp, UpdateType, VmAction, VmPoolQuery, VmStateFilter,
};
use flower_reconcile::one::xmlrpc::ErrorCode;
use flower_reconcile::one::{
    ApiBudget, ApiStats, Credentials, OneConfig, OnedClient, OnedError, RetryPolicy,
};

const PASSWORD: &str = "S3cr3t-P4ss!";

fn client(url: &str) -> OnedClient {
    let mut cfg = OneConfig::new(
        url.parse().unwrap(),
        "http://127.0.0.1:1".parse().unwrap(),
        Credentials::new("flower", PASSWORD).unwrap(),
    );
    cfg.timeout = Duration::from_secs(10);
    cfg.retry = RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    };
    OnedClient::new(
        &cfg,
        ApiBudget::new(NonZeroU32::new(10_000).unwrap()),
        ApiStats::new(),
    )
    .unwrap()
}

fn answer(f: impl Fn(&Call) -> String + Send + Sync + 'static) -> rpcserver::Handler {
    Arc::new(move |c| (200, f(c)))
}

/// A minimal VM body (keeps the 20,000-VM test fast in debug builds; the realistic body is
/// what the benchmark parses).
fn small_vm(id: i64) -> String {
    format!(
        "<VM><ID>{id}</ID><NAME>n{id}</NAME><STATE>3</STATE><LCM_STATE>3</LCM_STATE><USER_TEMPLATE><FL_ROLE>supernode</FL_ROLE></USER_TEMPLATE></VM>"
    )
}

/// Serve a pool of `n` VMs honouring oned's pagination (start = offset, end = -size).
async fn pool_server(n: i64) -> rpcserver::RpcServer {
    rpcserver::start(answer(move |c| match c.method.as_str() {
        "one.vmpool.infoextended" | "one.vmpool.info" => {
            let (start, end) = (c.params[2].int(), c.params[3].int());
            assert!(end < -1, "the client must page (end < -1), got end={end}");
            let (from, to) = (start, (start - end).min(n));
            let mut xml = String::from("<VM_POOL>");
            for id in from..to {
                xml.push_str(&small_vm(id));
            }
            xml.push_str("</VM_POOL>");
            ok_string(&xml)
        }
        other => failure(&format!("[{other}] unexpected"), 0x1000, -1),
    }))
    .await
}

#[tokio::test]
async fn listing_20000_vms_costs_one_request_per_page_and_no_per_vm_call() {
    for (page, expected) in [(2000u32, 10usize), (1500, 14)] {
        let srv = pool_server(20_000).await;
        let c = client(&srv.url);
        let vms = c
            .list_all_vms_extended(PoolFilter::All, VmStateFilter::NotDone, page)
            .await
            .unwrap();
        assert_eq!(vms.len(), 20_000);
        assert_eq!(vms.first().unwrap().id, 0);
        assert_eq!(vms.last().unwrap().id, 19_999);
        assert_eq!(vms[12_345].attr("FL_ROLE"), Some("supernode"));
        assert_eq!(expected, 20_000usize.div_ceil(page as usize));
        assert_eq!(
            srv.count("one.vmpool.infoextended"),
            expected,
            "page size {page}"
        );
        assert_eq!(
            srv.total(),
            expected,
            "no other call: {:?}",
            srv.by_method()
        );
        assert_eq!(c.stats().calls("one.vmpool.infoextended"), expected as u64);
        // Every call is authenticated, filters everything, pages by offset.
        let first = srv.calls.lock().unwrap()[0].clone();
        assert_eq!(first.params[0], P::S(format!("flower:{PASSWORD}")));
        assert_eq!(first.params[1], P::I(-2));
        assert_eq!(first.params[2], P::I(0));
        assert_eq!(first.params[4], P::I(-1));
    }
}

#[tokio::test]
async fn a_page_larger_than_the_pool_costs_one_request() {
    let srv = pool_server(500).await;
    let vms = client(&srv.url)
        .list_all_vms_extended(PoolFilter::All, VmStateFilter::NotDone, 2000)
        .await
        .unwrap();
    assert_eq!(vms.len(), 500);
    assert_eq!(srv.total(), 1);
    assert_eq!(
        srv.last().params[3],
        P::I(-2001),
        "one look-ahead VM per page"
    );
}

#[tokio::test]
async fn an_empty_pool_costs_one_request() {
    let srv = pool_server(0).await;
    let vms = client(&srv.url)
        .list_all_vms_extended(PoolFilter::Mine, VmStateFilter::Any, 2000)
        .await
        .unwrap();
    assert!(vms.is_empty());
    assert_eq!(srv.total(), 1);
    assert_eq!(srv.last().params[1], P::I(-3));
    assert_eq!(srv.last().params[4], P::I(-2));
}

#[tokio::test]
async fn typed_methods_send_oned_parameters() {
    let vm_xml = fixture("vm_full.xml");
    let srv = rpcserver::start(answer(move |c| match c.method.as_str() {
        "one.system.version" => ok_string("7.4.0"),
        "one.vm.info" => ok_string(&vm_xml),
        "one.vmpool.info" => ok_string(&fixture("vmpool_short.xml")),
        "one.user.info" => ok_string("<USER><ID>2</ID><GID>1</GID><GROUPS><ID>1</ID></GROUPS><GNAME>users</GNAME><NAME>flower</NAME><PASSWORD>x</PASSWORD><AUTH_DRIVER>core</AUTH_DRIVER><ENABLED>1</ENABLED></USER>"),
        "one.template.info" => ok_string("<VMTEMPLATE><ID>3</ID><UID>0</UID><GID>0</GID><UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME><NAME>t</NAME><REGTIME>1</REGTIME><TEMPLATE><CPU><![CDATA[1]]></CPU></TEMPLATE></VMTEMPLATE>"),
        "one.templatepool.info" => ok_string("<VMTEMPLATE_POOL></VMTEMPLATE_POOL>"),
        "one.vn.info" => ok_string("<VNET><ID>0</ID><UID>0</UID><GID>0</GID><UNAME>a</UNAME><GNAME>b</GNAME><NAME>n</NAME></VNET>"),
        "one.vnpool.info" => ok_string("<VNET_POOL/>"),
        "one.document.info" => ok_string("<DOCUMENT><ID>5</ID><UID>0</UID><GID>0</GID><UNAME>a</UNAME><GNAME>b</GNAME><NAME>s</NAME><TYPE>100</TYPE><TEMPLATE><BODY><![CDATA[{}]]></BODY></TEMPLATE></DOCUMENT>"),
        "one.template.instantiate" => ok_int(77),
        "one.image.info" => ok_string("<IMAGE><ID>4</ID><UID>0</UID><GID>0</GID><UNAME>oneadmin</UNAME><GNAME>oneadmin</GNAME><NAME>flower-superlink</NAME><STATE>4</STATE><SOURCE>/var/lib/one/datastores/1/ab</SOURCE></IMAGE>"),
        "one.template.allocate" | "one.vn.allocate" | "one.image.allocate" => ok_int(9),
        _ => ok_int(42),
    }))
    .await;
    let c = client(&srv.url);
    assert_eq!(c.system_version().await.unwrap(), "7.4.0");

    let vm = c.vm_info(42).await.unwrap();
    assert_eq!(
        (vm.id, vm.state, vm.lcm_state),
        (42, VmState::Active, LcmState::Running)
    );
    assert_eq!(srv.last().params[1], P::I(42));

    let short = c
        .vmpool_info(&VmPoolQuery {
            filter: PoolFilter::User(2),
            range: PoolRange::Ids { start: 40, end: 45 },
            state: VmStateFilter::Only(VmState::Active),
        })
        .await
        .unwrap();
    assert_eq!(short.len(), 3);
    assert_eq!(
        &srv.last().params[1..],
        [P::I(2), P::I(40), P::I(45), P::I(3)]
    );

    assert_eq!(c.user_info(-1).await.unwrap().name, "flower");
    assert_eq!(srv.last().params[1], P::I(-1));

    c.vm_action(VmAction::TerminateHard, 42).await.unwrap();
    assert_eq!(srv.last().method, "one.vm.action");
    assert_eq!(
        &srv.last().params[1..],
        [P::S("terminate-hard".into()), P::I(42)]
    );

    c.vm_update(42, "FL_ROTATE_REQUEST=\"3\"", UpdateType::Merge)
        .await
        .unwrap();
    assert_eq!(
        &srv.last().params[1..],
        [P::I(42), P::S("FL_ROTATE_REQUEST=\"3\"".into()), P::I(1)]
    );

    c.vm_updateconf(42, "CONTEXT=[ONEAPP_X=\"1\"]")
        .await
        .unwrap();
    assert_eq!(srv.last().method, "one.vm.updateconf");
    assert_eq!(
        srv.last().params[3],
        P::I(1),
        "updateconf merges by default"
    );

    c.vm_recover(42, RecoverOp::Retry).await.unwrap();
    assert_eq!(&srv.last().params[1..], [P::I(42), P::I(2)]);

    assert_eq!(
        c.template_instantiate(3, "", false, "SERVICE_ID=\"5\"", false)
            .await
            .unwrap(),
        77
    );
    assert_eq!(
        &srv.last().params[1..],
        [
            P::I(3),
            P::S(String::new()),
            P::B(false),
            P::S("SERVICE_ID=\"5\"".into()),
            P::B(false)
        ],
        "all five parameters are sent"
    );

    assert_eq!(
        c.template_info(3, true).await.unwrap().template.get("CPU"),
        Some("1")
    );
    assert_eq!(&srv.last().params[1..], [P::I(3), P::B(true)]);
    assert!(c
        .templatepool_info(PoolFilter::All, PoolRange::All)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(&srv.last().params[1..], [P::I(-2), P::I(-1), P::I(-1)]);
    assert_eq!(c.template_allocate("NAME=t").await.unwrap(), 9);
    assert_eq!(c.vn_info(0).await.unwrap().name, "n");
    assert!(c
        .vnpool_info(
            PoolFilter::All,
            PoolRange::Page {
                offset: 0,
                size: 200
            }
        )
        .await
        .unwrap()
        .is_empty());
    assert_eq!(&srv.last().params[1..], [P::I(-2), P::I(0), P::I(-200)]);
    assert_eq!(c.vn_allocate("NAME=n\nVN_MAD=bridge", -1).await.unwrap(), 9);
    assert_eq!(c.document_info(5).await.unwrap().body(), Some("{}"));
    c.document_lock(5, flower_reconcile::one::oned::LockLevel::Use)
        .await
        .unwrap();
    assert_eq!(&srv.last().params[1..], [P::I(5), P::I(1)]);
    c.document_unlock(5).await.unwrap();
    assert_eq!(srv.last().method, "one.document.unlock");

    let image = "NAME=\"flower-superlink\"\nPATH=\"/var/tmp/flower-superlink.qcow2\"";
    assert_eq!(c.image_allocate(image, 1).await.unwrap(), 9);
    assert_eq!(srv.last().method, "one.image.allocate");
    assert_eq!(&srv.last().params[1..], [P::S(image.into()), P::I(1)]);
    let info = c.image_info(4).await.unwrap();
    assert_eq!(
        (
            info.id,
            info.name.as_str(),
            info.state,
            info.source.as_str()
        ),
        (4, "flower-superlink", 4, "/var/lib/one/datastores/1/ab")
    );
    assert_eq!(srv.last().params[1], P::I(4));
}

#[tokio::test]
async fn error_arrays_and_faults_are_typed() {
    let srv = rpcserver::start(Arc::new(|c: &Call| match c.method.as_str() {
        "one.vm.info" => (200, fixture("rpc_failure_5.xml")),
        "one.vm.action" => (200, fixture("rpc_failure_3.xml")),
        "one.vmpool.info" => (200, fixture("rpc_fault.xml")),
        "one.system.version" => (502, "<html>bad gateway</html>".into()),
        _ => (200, "<methodResponse><params><param><value><array><data><value><boolean>1</boolean></value><value><int>1</int></value><value><int>0</int></value></data></array></value></param></params></methodResponse>".into()),
    }))
    .await;
    let c = client(&srv.url);
    match c.vm_info(4242).await.unwrap_err() {
        e @ OnedError::Api { .. } => {
            assert!(e.is_not_found());
            assert_eq!(e.code(), Some(ErrorCode::NoExists));
            assert!(e.to_string().contains("NO_EXISTS"), "{e}");
            let OnedError::Api {
                resp_id, message, ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(resp_id, Some(4242));
            assert!(message.starts_with("[one.vm.info]"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(srv.count("one.vm.info"), 1, "an API error is not retried");
    assert_eq!(
        c.vm_action(VmAction::Poweroff, 1).await.unwrap_err().code(),
        Some(ErrorCode::Action)
    );
    assert!(matches!(
        c.vmpool_info(&VmPoolQuery::default()).await.unwrap_err(),
        OnedError::Fault { code: -501, .. }
    ));
    assert!(matches!(
        c.system_version().await.unwrap_err(),
        OnedError::Http { code: 502, .. }
    ));
    // A string was expected, an int came back.
    assert!(matches!(
        c.user_info(1).await.unwrap_err(),
        OnedError::Decode { .. }
    ));
    // Refused before sending.
    let before = srv.total();
    assert!(matches!(
        c.vm_info(1 << 40).await.unwrap_err(),
        OnedError::Invalid { .. }
    ));
    assert!(c.vm_update(1, "A=\u{1}", UpdateType::Merge).await.is_err());
    assert_eq!(srv.total(), before);
}

#[tokio::test]
async fn reads_retry_on_503_mutations_are_attempted_once() {
    let srv = rpcserver::start(Arc::new(|_c: &Call| (503, "busy".to_string()))).await;
    let c = client(&srv.url);
    assert!(matches!(
        c.vm_info(1).await.unwrap_err(),
        OnedError::Http { code: 503, .. }
    ));
    assert_eq!(srv.count("one.vm.info"), 3, "first attempt + 2 retries");
    assert!(c.system_version().await.is_err());
    assert_eq!(srv.count("one.system.version"), 3);
    for r in [
        c.vm_action(VmAction::Terminate, 1).await,
        c.vm_update(1, "A=1", UpdateType::Merge).await,
        c.template_instantiate(3, "", false, "", false).await,
    ] {
        assert!(matches!(r.unwrap_err(), OnedError::Http { code: 503, .. }));
    }
    assert_eq!(srv.count("one.vm.action"), 1);
    assert_eq!(srv.count("one.vm.update"), 1);
    assert_eq!(srv.count("one.template.instantiate"), 1);
    let snap = c.stats().snapshot();
    let action = snap.iter().find(|e| e.method == "one.vm.action").unwrap();
    assert_eq!((action.calls, action.outcome.as_str()), (1, "error"));
}

#[tokio::test]
async fn transport_errors_are_retried_for_reads() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let c = client(&format!("http://{addr}/RPC2"));
    assert!(matches!(
        c.vm_info(1).await.unwrap_err(),
        OnedError::Transport { .. }
    ));
    let snap = c.stats().snapshot();
    assert_eq!(snap[0].calls, 3);
    assert!(matches!(
        c.vm_action(VmAction::Resume, 1).await.unwrap_err(),
        OnedError::Transport { .. }
    ));
    assert_eq!(c.stats().calls("one.vm.action"), 1);
}

#[tokio::test]
async fn the_shared_budget_paces_all_clients() {
    let srv = rpcserver::start(answer(|_| ok_string("7.4.0"))).await;
    let budget = ApiBudget::new(NonZeroU32::new(5).unwrap());
    let cfg = OneConfig::new(
        srv.url.parse().unwrap(),
        "http://127.0.0.1:1".parse().unwrap(),
        Credentials::new("flower", PASSWORD).unwrap(),
    );
    let stats = ApiStats::new();
    let a = OnedClient::new(&cfg, budget.clone(), stats.clone()).unwrap();
    let b = OnedClient::new(&cfg, budget.clone(), stats.clone()).unwrap();
    assert_eq!(budget.per_second(), 5);
    // The limiter runs on real time: 12 calls at 5/s (burst 5) need ≥ 1.4 s.
    let t = std::time::Instant::now();
    for i in 0..12 {
        let c = if i % 2 == 0 { &a } else { &b };
        c.system_version().await.unwrap();
    }
    assert!(
        t.elapsed() >= Duration::from_millis(1300),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(stats.calls("one.system.version"), 12);
}
