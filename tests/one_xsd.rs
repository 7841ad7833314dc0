//! Every VM / pool fixture (and the generator used by the benchmark and the pagination
//! test) is checked against OpenNebula's own XSDs, so the parser is tested on real shapes.

mod common;
#[path = "common/vmgen.rs"]
mod vmgen;

use common::{assert_valid_xsd, fixture};

#[test]
fn vm_full_fixture_matches_vm_xsd() {
    assert_valid_xsd("vm_full.xml", &fixture("vm_full.xml"), "vm.xsd");
}

#[test]
fn vmpool_extended_fixture_matches_vm_pool_extended_xsd() {
    assert_valid_xsd(
        "vmpool_extended.xml",
        &fixture("vmpool_extended.xml"),
        "vm_pool_extended.xsd",
    );
}

#[test]
fn vmpool_short_fixture_matches_vm_pool_xsd() {
    assert_valid_xsd(
        "vmpool_short.xml",
        &fixture("vmpool_short.xml"),
        "vm_pool.xsd",
    );
}

#[test]
fn vm_inside_the_xmlrpc_fixture_matches_vm_xsd() {
    let body = fixture("rpc_vm_info_ok.xml");
    let resp = flower_reconcile::one::xmlrpc::decode_response(&body).unwrap();
    let flower_reconcile::one::xmlrpc::Response::Value(v) = resp else {
        panic!("not a value")
    };
    let Ok(flower_reconcile::one::xmlrpc::OneResult::Success(
        flower_reconcile::one::xmlrpc::Value::Str(vm),
    )) = flower_reconcile::one::xmlrpc::one_result(v)
    else {
        panic!("not a success string")
    };
    assert_eq!(vm.trim(), fixture("vm_full.xml").trim());
    assert_valid_xsd("VM in rpc_vm_info_ok.xml", &vm, "vm.xsd");
}

#[test]
fn generated_pool_matches_vm_pool_extended_xsd() {
    let pool = vmgen::extended_pool([0u64, 1, 9, 10, 65_535, 19_999].into_iter());
    assert_valid_xsd("generated pool", &pool, "vm_pool_extended.xsd");
}

#[test]
fn an_invalid_vm_is_rejected_by_the_check() {
    // Guard against a validator that accepts anything.
    let bad = fixture("vm_full.xml").replace("<STATE>3</STATE>", "<STATE>x</STATE>");
    let r = std::panic::catch_unwind(|| assert_valid_xsd("bad", &bad, "vm.xsd"));
    assert!(r.is_err());
}
