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

/// Scale the SuperNodes of service 5 from `from` to `to`.
fn scale(from: u32, to: u32) -> Action {
    Action {
        cluster: "alpha".into(),
        kind: ActionKind::Scale {
            service_id: 5,
            role: crate::plan::Role::Supernode,
            from,
            to,
        },
        reason: "count".into(),
        diff: vec![],
        deferred: None,
    }
}

#[tokio::test]
async fn a_scale_is_one_call() {
    let (ctx, backend) = connect(vec![Answer::Done]).await;
    let d = alpha();
    let applied = Applier::new(&ctx, &d)
        .apply(&scale(2, 3))
        .await
        .expect("applied");
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

/// The names of the VM templates and networks [`spec`] refers to (3, 4; network 0).
fn names() -> Vec<Answer> {
    vec![
        Answer::Names(vec![
            (3, "flower-superlink".into()),
            (4, "flower-supernode".into()),
            (9, "flower-supernode-gpu".into()),
        ]),
        Answer::Names(vec![(0, "private".into()), (1, "flower-net".into())]),
    ]
}

/// What a create of `alpha` is answered: names, no service, no template, template 20
/// created, service 5 instantiated.
fn create_answers() -> Vec<Answer> {
    let mut answers = names();
    answers.extend([
        Answer::Services(vec![]),
        Answer::Services(vec![]),
        Answer::Service(Document {
            id: 20,
            ..service(&[])
        }),
        Answer::Service(service(&[])),
    ]);
    answers
}

#[tokio::test]
async fn a_create_sends_exactly_the_carried_body() {
    let answers = create_answers();
    let (ctx, backend) = connect(answers).await;
    let d = alpha();
    let mut p = crate::plan::plan(&d, &crate::plan::LiveState::default(), Utc::now());
    super::prepare(&ctx, &d, &mut p).await.expect("prepared");
    let carried = p.actions[0].kind.body().expect("a create carries its body");
    assert_eq!(
        (
            carried.ids.superlink_template,
            carried.ids.supernode_template,
            carried.ids.network
        ),
        (3, 4, 0)
    );
    let planned = carried.body().expect("in memory").clone();
    let applied = Applier::new(&ctx, &d)
        .apply_all(&p.actions)
        .await
        .expect("applied");
    assert!(applied[0].mutated, "{applied:?}");
    assert_eq!(
        backend.calls()[2..],
        [
            "vm_templates Mine",
            "networks Mine",
            "list_services",
            "list_service_templates",
            "create_service_template \"alpha\"",
            "instantiate 20 \"alpha\""
        ]
    );
    // Exactly the carried body, sealed with the new key (nothing re-rendered).
    let sent = backend.bodies();
    assert_eq!(sent.len(), 1);
    let seed = crate::render::ownership::signing_seed_of(&sent[0]).expect("a seed was sealed in");
    assert_eq!(sent[0], crate::render::ownership::seal(&planned, &seed));
    let key = &sent[0]["roles"][0]["template_contents"]["CONTEXT"]
        [crate::protocol::context::CONTROLLER_KEY];
    assert_eq!(key, &json!(seed.public_key()));
}

#[tokio::test]
async fn an_update_sends_the_carried_body_into_the_live_one_and_keeps_the_key() {
    let seed = crate::protocol::signing::SigningSeed::generate().expect("seed");
    let mut live_service = service(&[11, 12]);
    live_service.body[crate::render::ownership::SIGNING_KEY] =
        crate::render::ownership::signing_key_json(&seed);
    let mut answers = names();
    answers.extend([Answer::Service(live_service.clone()), Answer::Done]);
    let (ctx, backend) = connect(answers).await;
    // More memory is an in-place change.
    let d = desired(vec![spec("alpha", json!({"supernodes": {"memory": 4096}}))]);
    let mut update = Action {
        cluster: "alpha".into(),
        kind: ActionKind::UpdateTemplate {
            service_id: 5,
            body: None,
        },
        reason: "test".into(),
        diff: vec![],
        deferred: None,
    };
    let mut p = crate::plan::Plan::default();
    p.actions.push(update.clone());
    super::prepare(&ctx, &d, &mut p).await.expect("prepared");
    update = p.actions.remove(0);
    let planned = update
        .kind
        .body()
        .and_then(|b| b.body())
        .expect("carried")
        .clone();
    let applied = Applier::new(&ctx, &d)
        .apply(&update)
        .await
        .expect("applied");
    assert!(applied.mutated);
    assert_eq!(
        backend.calls()[2..],
        [
            "vm_templates Mine",
            "networks Mine",
            "get_service 5",
            "update_service 5 \"alpha\""
        ]
    );
    let sealed = crate::render::ownership::seal(&planned, &seed);
    let expected =
        super::update_body::service_update_body(&live_service.body, &sealed).expect("merge");
    assert_eq!(backend.bodies(), [expected.body]);
}

#[tokio::test]
async fn a_printed_or_saved_plan_holds_no_private_key_and_no_seed() {
    use base64::Engine as _;
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/examples/tls-provided-gpu.yaml");
    let loaded = crate::api::load::load_file(&file);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let cluster = loaded.loaded[0].cluster.clone();
    let key_pem = std::fs::read_to_string(file.with_file_name("certs/superlink.key")).expect("key");
    let mut secrets: Vec<String> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_string)
        .collect();
    secrets.push(base64::engine::general_purpose::STANDARD.encode(&key_pem));
    let seed = crate::protocol::signing::SigningSeed::generate().expect("seed");
    secrets.push(seed.to_base64());

    // The cluster's running service holds the seed and predates the applied-spec record:
    // the plan updates it in place, carrying a body with the provided key.
    let name = cluster.metadata.name.clone();
    let now = Utc::now();
    let mut running = service(&[11, 12, 13]);
    running.name = name.clone();
    running.body = json!({
        "name": name, "state": 2,
        MARKER_KEY: {"cluster": name, "spec_hash": "old", "controller": CONTROLLER, "format": 1},
        crate::render::ownership::SIGNING_KEY: crate::render::ownership::signing_key_json(&seed),
        "roles": [
            {"name": "superlink", "cardinality": 1, "nodes": [{"deploy_id": 10}]},
            {"name": "supernode", "cardinality": 3,
             "nodes": [{"deploy_id": 11}, {"deploy_id": 12}, {"deploy_id": 13}]}
        ]
    });
    let link = VmRecord {
        id: 10,
        name: "superlink_10".into(),
        ..vm(10, 3, 3, now)
    };
    let mut answers = vec![
        Answer::Services(vec![running]),
        Answer::Vms(vec![
            link,
            vm(11, 3, 3, now),
            vm(12, 3, 3, now),
            vm(13, 3, 3, now),
        ]),
    ];
    answers.extend(names());
    answers.extend(names());
    let (ctx, _backend) = connect(answers).await;
    let live = super::observe(&ctx, now).await.expect("observed");
    let d = desired(vec![cluster]);
    let mut update = crate::plan::plan(&d, &live, now);
    super::prepare(&ctx, &d, &mut update)
        .await
        .expect("prepared");
    let mut create = crate::plan::plan(&d, &crate::plan::LiveState::default(), now);
    super::prepare(&ctx, &d, &mut create)
        .await
        .expect("prepared");

    for p in [&update, &create] {
        let carried = p
            .actions
            .iter()
            .find_map(|a| a.kind.body())
            .and_then(|b| b.body())
            .expect("the plan carries a body");
        // The test can fail: the body in memory does hold the key.
        let in_memory = carried.to_string();
        assert!(
            secrets.iter().any(|s| in_memory.contains(s.as_str())),
            "the carried body should hold the provided key"
        );
        let shown = [
            crate::plan::render_text(p, crate::plan::TextOptions::default()),
            serde_json::to_string(&crate::plan::render_json(p)).expect("json"),
            serde_json::to_string(&crate::cli::plan::PlanFile::new(CONTROLLER, &d, p.clone()))
                .expect("plan file"),
            format!("{p:?}"),
        ];
        for text in &shown {
            assert!(
                text.contains("sha256:"),
                "the body's digest is shown: {text}"
            );
            for s in &secrets {
                assert!(!text.contains(s.as_str()), "secret material in: {text}");
            }
        }
    }
    assert!(
        update
            .actions
            .iter()
            .any(|a| matches!(a.kind, ActionKind::UpdateTemplate { .. }) && a.is_executable()),
        "{update:?}"
    );
}

/// A tracing subscriber with an OpenTelemetry layer (nothing exported), for this thread.
fn traced() -> tracing::subscriber::DefaultGuard {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    tracing::subscriber::set_default(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t"))),
    )
}

/// The trace context stamped into a sent body's roles: (traceparent, endpoint) per role.
fn stamped(body: &serde_json::Value) -> Vec<(Option<String>, Option<String>)> {
    use crate::protocol::context as c;
    body["roles"]
        .as_array()
        .expect("roles")
        .iter()
        .map(|r| {
            let ctx = &r["template_contents"]["CONTEXT"];
            let get = |k: &str| ctx.get(k).and_then(|v| v.as_str()).map(String::from);
            (get(c::TRACEPARENT), get(c::OTLP_ENDPOINT))
        })
        .collect()
}

fn vm_tracing() -> super::context::VmTracing {
    super::context::VmTracing::new(
        Some(crate::protocol::trace_context::parse_otlp_endpoint("http://otel:4318").unwrap()),
        false,
    )
}

#[tokio::test]
async fn a_create_stamps_the_trace_context_into_what_it_sends_never_into_the_plan() {
    use tracing::Instrument as _;
    let _traced = traced();
    let answers = create_answers();
    let (mut ctx, backend) = connect(answers).await;
    ctx.options.vm_tracing = vm_tracing();
    let d = alpha();
    let mut p = crate::plan::plan(&d, &crate::plan::LiveState::default(), Utc::now());
    super::prepare(&ctx, &d, &mut p).await.expect("prepared");
    let planned = p.actions[0]
        .kind
        .body()
        .and_then(|b| b.body())
        .expect("carried")
        .clone();
    assert_eq!(
        stamped(&planned),
        [(None, None), (None, None)],
        "plans carry no trace context"
    );

    let reconcile = tracing::info_span!("reconcile");
    let trace_id = crate::telemetry::trace_id(&reconcile).expect("a trace");
    Applier::new(&ctx, &d)
        .apply_all(&p.actions)
        .instrument(reconcile)
        .await
        .expect("applied");
    // The same calls as untraced: the context travels in the body created anyway.
    assert_eq!(
        backend.calls()[4..],
        [
            "list_services",
            "list_service_templates",
            "create_service_template \"alpha\"",
            "instantiate 20 \"alpha\""
        ]
    );
    let sent = &backend.bodies()[0];
    let roles = stamped(sent);
    let tp = roles[0].0.clone().expect("a traceparent");
    assert_eq!(
        roles,
        vec![(Some(tp.clone()), Some("http://otel:4318".into())); 2]
    );
    let tp = crate::protocol::trace_context::parse_traceparent(&tp).expect("W3C");
    assert!(tp.sampled());
    let hex: String = tp.trace_id.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, trace_id, "the VMs continue the reconcile's trace");
    // Nothing else differs from the planned body sealed.
    let seed = crate::render::ownership::signing_seed_of(sent).expect("sealed");
    let unstamped = crate::render::stamp_context(
        &crate::render::ownership::seal(&planned, &seed),
        &[
            (crate::protocol::context::TRACEPARENT, tp.to_string()),
            (
                crate::protocol::context::OTLP_ENDPOINT,
                "http://otel:4318".into(),
            ),
        ],
    )
    .unwrap();
    assert_eq!(sent, &unstamped);
}

#[tokio::test]
async fn a_traced_scale_up_stamps_the_live_service_first_and_a_scale_down_does_not() {
    let _traced = traced();
    let live = service(&[11, 12]);
    let mut live_v7 = live.clone();
    live_v7.body["roles"][1]["template_contents"] = json!({"CONTEXT": {"TOKEN": "YES"}});
    let (mut ctx, backend) = connect(vec![
        Answer::Service(live_v7.clone()),
        Answer::Done,
        Answer::Done,
        Answer::Done,
    ])
    .await;
    ctx.options.vm_tracing = vm_tracing();
    let d = alpha();
    let mut applier = Applier::new(&ctx, &d);
    applier.apply(&scale(2, 3)).await.expect("scaled up");
    applier.apply(&scale(3, 2)).await.expect("scaled down");
    assert_eq!(
        backend.calls()[2..],
        [
            "get_service 5",
            "update_service 5 \"alpha\"",
            "scale 5 supernode 3",
            "scale 5 supernode 2"
        ]
    );
    let ctx1 = &backend.bodies()[0]["roles"][1]["template_contents"]["CONTEXT"];
    assert_eq!(ctx1["TOKEN"], "YES");
    assert!(
        ctx1[crate::protocol::context::TRACEPARENT].is_string(),
        "{ctx1}"
    );
}

#[tokio::test]
async fn with_vm_tracing_off_a_scale_up_is_still_one_call() {
    let (mut ctx, backend) = connect(vec![Answer::Done]).await;
    ctx.options.vm_tracing = super::context::VmTracing::default();
    let d = alpha();
    Applier::new(&ctx, &d)
        .apply(&scale(2, 3))
        .await
        .expect("applied");
    assert_eq!(backend.calls()[2..], ["scale 5 supernode 3"]);
}

/// Write the other sites' keys `fingerprints` onto SuperLink VM 10 of service 5.
fn site_keys(fingerprints: Vec<String>) -> Action {
    Action {
        cluster: "alpha".into(),
        kind: ActionKind::SetSiteNodeKeys {
            service_id: 5,
            vm_id: 10,
            fingerprints,
        },
        reason: "test".into(),
        diff: vec![],
        deferred: None,
    }
}

#[tokio::test]
async fn the_other_sites_keys_are_written_signed_and_observed_back_and_a_forged_set_is_not() {
    use crate::protocol::node_key::{self, NodePublicKey};
    use crate::protocol::signing::SigningSeed;
    let key = |b: u8| {
        let mut p = [b; 65];
        p[0] = 0x04;
        NodePublicKey::from_point(&p).unwrap()
    };
    let seed = SigningSeed::generate().unwrap();
    let mut ours = service(&[11]);
    ours.body[crate::render::ownership::SIGNING_KEY] =
        crate::render::ownership::signing_key_json(&seed);
    let mut d = alpha();
    let keys: std::collections::BTreeSet<_> = [key(1), key(2)].into();
    d.clusters.get_mut("alpha").unwrap().site_node_keys = keys.clone();
    let prints: Vec<String> = keys.iter().map(NodePublicKey::fingerprint).collect();

    // A plan made for other keys is refused without a call.
    let (ctx, backend) = connect(vec![]).await;
    let err = Applier::new(&ctx, &d)
        .apply(&site_keys(vec![key(3).fingerprint()]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not the ones planned"), "{err}");
    assert_eq!(backend.calls().len(), 2);

    let (ctx, backend) = connect(vec![Answer::Service(ours.clone()), Answer::Done]).await;
    let applied = Applier::new(&ctx, &d)
        .apply(&site_keys(prints.clone()))
        .await
        .expect("applied");
    assert!(applied.mutated);
    assert_eq!(
        backend.calls()[2..],
        [
            "get_service 5",
            "vm_update_merge 10 FL_SITE_NODE_KEYS,FL_SITE_NODE_KEYS_SIG"
        ]
    );
    // What was written: one template line per attribute, the set and its signature.
    let written = &backend.vm_templates()[0];
    let attrs: Vec<(&str, &str)> = written
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k, v.trim_matches('"')))
        .collect();
    assert_eq!(
        attrs[0],
        (
            crate::protocol::FL_SITE_NODE_KEYS,
            node_key::encode_set(&keys).as_str()
        )
    );
    // Observation keeps the signed set, and drops it (with a warning) once a peer rewrote it.
    let observe = |set: &str, sig: &str| {
        let link = VmRecord {
            id: 10,
            uid: ME,
            name: "superlink_10".into(),
            state: crate::one::model::VmState::Active,
            lcm_state: crate::one::model::LcmState::Running,
            stime: 1_700_000_000,
            user_template: super::observe::scalar_map([
                ("SERVICE_ID", "5"),
                ("ROLE_NAME", "superlink"),
                (crate::protocol::FL_SITE_NODE_KEYS, set),
                (crate::protocol::FL_SITE_NODE_KEYS_SIG, sig),
            ]),
            addresses: Vec::new(),
        };
        super::observe::build_live(&[ours.clone()], vec![link], ctx.trust(), Utc::now())
    };
    let live = observe(attrs[0].1, attrs[1].1);
    assert_eq!(
        live.services("alpha")[0].superlink.nodes[0]
            .attrs
            .site_node_keys,
        Some(keys.clone())
    );
    assert!(live.warnings.is_empty(), "{:?}", live.warnings);
    let forged_set = node_key::encode_set(&[key(1), key(2), key(9)].into());
    let peer = SigningSeed::generate().unwrap();
    for (set, sig) in [
        (forged_set.clone(), attrs[1].1.to_string()),
        (
            forged_set.clone(),
            peer.sign_site_keys(10, &[key(1), key(2), key(9)].into()),
        ),
        (attrs[0].1.to_string(), seed.sign_site_keys(11, &keys)),
    ] {
        let live = observe(&set, &sig);
        assert_eq!(
            live.services("alpha")[0].superlink.nodes[0]
                .attrs
                .site_node_keys,
            None
        );
        assert!(live.warnings[0]
            .message
            .contains("FL_SITE_NODE_KEYS is not signed"));
    }
}
