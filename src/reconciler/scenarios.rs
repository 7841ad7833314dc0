//! Unit scenarios of apply against the scripted in-memory backend ([`crate::one::fake`]):
//! the exact OpenNebula calls each action makes, in microseconds. The faithful versions
//! run against onesim in `tests/` (controller_scenarios, safety_*).

use std::sync::Arc;

use chrono::Utc;
use serde_json::json;

use super::apply::{Applier, ApplyError};
use super::context::{Context, ReconcileOptions};
use crate::one::backend::{Document, Identity, VmRecord};
use crate::one::fake::{Answer, Scripted};
use crate::plan::tests::{desired, spec};
use crate::plan::{Action, ActionKind, DesiredState, NodeFailure};
use crate::render::ownership::MARKER_KEY;

const ME: i64 = 7;
const CONTROLLER: &str = "ctl";

/// A context over `answers` (after the two calls `connect` makes) and the backend to read
/// the calls from.
async fn connect(answers: Vec<Answer>) -> (Context, Arc<Scripted>) {
    let mut all = vec![
        Answer::Version("7.0.0".into()),
        Answer::Whoami(Identity {
            uid: ME,
            gid: 100,
            name: "flower".into(),
        }),
    ];
    all.extend(answers);
    let backend = Arc::new(Scripted::new(all));
    let ctx = Context::connect(backend.clone(), CONTROLLER, ReconcileOptions::default())
        .await
        .expect("connect");
    (ctx, backend)
}

/// Our service 5 of cluster `alpha` as [`alpha`] applied it, with SuperNode VMs `nodes`.
fn service(nodes: &[u64]) -> Document {
    let d = alpha();
    let applied = &d.clusters["alpha"];
    Document {
        id: 5,
        name: "alpha".into(),
        uid: ME,
        gid: 100,
        body: json!({
            "name": "alpha",
            "state": 2,
            MARKER_KEY: {"cluster": "alpha", "spec_hash": applied.spec_hash, "controller": CONTROLLER, "format": 1},
            crate::plan::AppliedSpec::BODY_KEY: {
                "format": crate::plan::AppliedSpec::FORMAT,
                "fields": crate::plan::spec_fields(&applied.cluster),
            },
            "roles": [
                {"name": "superlink", "cardinality": 1, "nodes": [{"deploy_id": 10}]},
                {"name": "supernode", "cardinality": nodes.len(),
                 "nodes": nodes.iter().map(|n| json!({"deploy_id": n})).collect::<Vec<_>>()}
            ]
        }),
    }
}

/// SuperNode VM `id` as `one.vm.info` returns it: (state, lcm_state) codes, registered
/// with the SuperLink and heartbeating at `heartbeat`.
fn vm(id: u64, state: i64, lcm_state: i64, heartbeat: chrono::DateTime<Utc>) -> VmRecord {
    VmRecord {
        id,
        uid: ME,
        name: format!("supernode_{id}"),
        state: crate::one::model::VmState::from_code(state),
        lcm_state: crate::one::model::LcmState::from_code(lcm_state),
        stime: heartbeat.timestamp() - 600,
        user_template: super::observe::scalar_map([
            ("SERVICE_ID", "5"),
            ("ROLE_NAME", "supernode"),
            (
                crate::protocol::FL_HEARTBEAT,
                heartbeat
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    .as_str(),
            ),
            (crate::protocol::FL_NODE_READY, "YES"),
        ]),
        addresses: Vec::new(),
    }
}

fn replace(vm_id: u64) -> Action {
    Action {
        cluster: "alpha".into(),
        kind: ActionKind::ReplaceNode {
            service_id: 5,
            vm_id,
            failure: NodeFailure::FailureState,
        },
        reason: "test".into(),
        diff: vec![],
        deferred: None,
    }
}

fn alpha() -> DesiredState {
    desired(vec![spec("alpha", json!({}))])
}

#[tokio::test]
async fn a_failed_node_is_terminated_after_its_re_read() {
    // ACTIVE / BOOT_FAILURE (36): failed by its state alone.
    let (ctx, backend) = connect(vec![
        Answer::Service(service(&[11, 12])),
        Answer::Vm(Box::new(vm(12, 3, 36, Utc::now()))),
        Answer::Done,
    ])
    .await;
    let d = alpha();
    let applied = Applier::new(&ctx, &d)
        .apply(&replace(12))
        .await
        .expect("applied");
    assert!(applied.mutated);
    assert_eq!(
        backend.calls()[2..],
        ["get_service 5", "vm_info 12", "vm_terminate_hard 12"]
    );
    assert_eq!(backend.unused(), 0);
}

#[tokio::test]
async fn a_node_healthy_when_read_again_is_left_alone() {
    // ACTIVE / RUNNING with a heartbeat of now: the plan's view was wrong or stale.
    let (ctx, backend) = connect(vec![
        Answer::Service(service(&[11, 12])),
        Answer::Vm(Box::new(vm(12, 3, 3, Utc::now()))),
    ])
    .await;
    let d = alpha();
    let applied = Applier::new(&ctx, &d)
        .apply(&replace(12))
        .await
        .expect("applied");
    assert!(!applied.mutated, "{applied:?}");
    assert_eq!(backend.calls()[2..], ["get_service 5", "vm_info 12"]);
}

#[tokio::test]
async fn a_vm_no_longer_in_the_role_is_not_even_read() {
    let (ctx, backend) = connect(vec![Answer::Service(service(&[11]))]).await;
    let d = alpha();
    let applied = Applier::new(&ctx, &d)
        .apply(&replace(12))
        .await
        .expect("applied");
    assert!(!applied.mutated);
    assert_eq!(backend.calls()[2..], ["get_service 5"]);
}

#[tokio::test]
async fn a_vm_of_another_owner_is_never_terminated() {
    let mut foreign = vm(12, 3, 36, Utc::now());
    foreign.uid = ME + 1;
    let (ctx, backend) = connect(vec![
        Answer::Service(service(&[11, 12])),
        Answer::Vm(Box::new(foreign)),
    ])
    .await;
    let d = alpha();
    let applied = Applier::new(&ctx, &d)
        .apply(&replace(12))
        .await
        .expect("applied");
    assert!(!applied.mutated);
    assert_eq!(backend.calls()[2..], ["get_service 5", "vm_info 12"]);
}

#[tokio::test]
async fn a_delete_of_a_cluster_with_a_spec_makes_no_call() {
    let (ctx, backend) = connect(vec![]).await;
    let d = alpha();
    let delete = Action {
        cluster: "alpha".into(),
        kind: ActionKind::Delete { service_id: 5 },
        reason: "tampered".into(),
        diff: vec![],
        deferred: None,
    };
    let err = Applier::new(&ctx, &d).apply(&delete).await.unwrap_err();
    assert!(matches!(err, ApplyError::Refused { .. }), "{err}");
    assert_eq!(backend.calls().len(), 2, "{:?}", backend.calls());
}

#[tokio::test]
async fn a_scale_is_one_call() {
    let (ctx, backend) = connect(vec![Answer::Done]).await;
    let d = alpha();
    let scale = Action {
        cluster: "alpha".into(),
        kind: ActionKind::Scale {
            service_id: 5,
            role: crate::plan::Role::Supernode,
            from: 2,
            to: 3,
        },
        reason: "count".into(),
        diff: vec![],
        deferred: None,
    };
    let applied = Applier::new(&ctx, &d).apply(&scale).await.expect("applied");
    assert!(applied.mutated);
    assert_eq!(backend.calls()[2..], ["scale 5 supernode 3"]);
}

#[tokio::test]
async fn deferred_actions_are_never_executed() {
    let (ctx, backend) = connect(vec![]).await;
    let d = alpha();
    let mut applier = Applier::new(&ctx, &d);
    for mut a in [replace(12), replace(11)] {
        a.deferred = Some(crate::plan::Deferral {
            until: crate::plan::WaitFor::HeartbeatOutage,
            reason: "most heartbeats are stale together".into(),
        });
        let applied = applier.apply(&a).await.expect("applied");
        assert!(!applied.mutated);
        assert_eq!(
            applied.summary,
            "deferred replace_node: most heartbeats are stale together"
        );
    }
    assert_eq!(backend.calls().len(), 2, "{:?}", backend.calls());
}

#[tokio::test]
async fn a_failed_vm_listing_is_an_observe_error_with_no_hold_and_no_mutation() {
    use crate::runtime::Reconciler as _;
    let (ctx, backend) = connect(vec![
        Answer::Services(vec![service(&[11, 12])]),
        Answer::Fail(
            crate::one::BackendErrorKind::Ambiguous,
            "one.vmpool.infoextended: timed out",
        ),
    ])
    .await;
    let r = super::driver::OneReconciler::new(Arc::new(ctx));
    let err = r.observe().await.unwrap_err();
    assert!(matches!(err, super::ReconcileError::Observe(_)), "{err}");
    assert_eq!(
        crate::runtime::error_chain(&err),
        "observing OpenNebula: outcome unknown: one.vmpool.infoextended: timed out"
    );
    // An ambiguous *read* changed nothing: no hold beyond the backoff.
    assert_eq!(r.error_policy(&err), crate::runtime::ErrorAction::default());
    assert_eq!(backend.calls()[2..], ["list_services", "list_vms 2000"]);
}

#[tokio::test]
async fn a_failed_node_in_the_observation_is_replaced_by_one_reconcile() {
    let now = Utc::now();
    let link = VmRecord {
        id: 10,
        name: "superlink_10".into(),
        ..vm(10, 3, 3, now)
    };
    let (ctx, backend) = connect(vec![
        Answer::Services(vec![service(&[11, 12])]),
        Answer::Vms(vec![link, vm(11, 3, 3, now), vm(12, 3, 36, now)]),
        Answer::Service(service(&[11, 12])),
        Answer::Vm(Box::new(vm(12, 3, 36, now))),
        Answer::Done,
    ])
    .await;
    let live = super::observe(&ctx, now).await.expect("observed");
    let out = super::reconcile_one(&ctx, &alpha(), &live, "alpha", now)
        .await
        .expect("reconciled");
    assert!(out.mutated, "{out:?}");
    assert_eq!(
        backend.calls()[2..],
        [
            "list_services",
            "list_vms 2000",
            "get_service 5",
            "vm_info 12",
            "vm_terminate_hard 12"
        ]
    );
    assert_eq!(backend.unused(), 0);
}
