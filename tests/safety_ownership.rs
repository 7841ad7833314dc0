//! Issue #12, ownership (items 1, 2, 8, 10): another tenant of the same OpenNebula cloud
//! forges what the controller used to trust. Each scenario runs the controller (as
//! oneadmin, who sees every user's objects) against onesim with a second user, and asserts
//! from onesim's event log that no controller call ever named the tenant's objects.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use flower_reconcile::one::oned::{UpdateType, VmAction};
use flower_reconcile::one::ClientsBackend;
use flower_reconcile::plan::{Action, ActionKind, DesiredState, NodeFailure};
use flower_reconcile::reconciler::driver::summarize_cluster;
use flower_reconcile::reconciler::{
    observe, reconcile_one, Context, OwnershipOptions, ReconcileOptions,
};
use flower_reconcile::source::DirSource;
use serde_json::{json, Value};

use common::onesim_env::{
    converge, fixtures, reconcile_command, spec_yaml, start_onesim, tenant, Tenant,
};

const PASSWORD: &str = "safety-pw";
const CONTROLLER: &str = "ctl-safety";
/// The address a tenant's VM publishes as a SuperLink endpoint.
const EVIL_ENDPOINT: &str = "203.0.113.9:9092";

struct Env {
    sim: onesim::Handle,
    ctx: Context,
    backend: Arc<ClientsBackend>,
}

/// onesim and a controller context as oneadmin; no templates or networks yet.
async fn env(ownership: OwnershipOptions) -> Env {
    let (sim, one) = start_onesim(PASSWORD, |_| {}).await;
    let backend = Arc::new(ClientsBackend::new(&one).expect("clients"));
    let options = ReconcileOptions {
        ownership,
        ..ReconcileOptions::default()
    };
    let ctx = Context::connect(backend.clone(), CONTROLLER, options)
        .await
        .expect("context");
    Env { sim, ctx, backend }
}

/// The desired state of `yaml`, read the way `plan`/`apply` read a spec directory.
async fn desired_of(dir: &std::path::Path, yaml: &str) -> DesiredState {
    std::fs::write(dir.join("cluster.yaml"), yaml).expect("spec");
    let snap = DirSource::new(dir).load_once().await.expect("specs load");
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    flower_reconcile::reconciler::desired_from_snapshot(&snap)
}

/// Converge cluster `basic` (2 SuperNodes) from a spec in `specs`; its desired state and
/// service id.
async fn run_basic(env: &Env, specs: &std::path::Path) -> (DesiredState, u64) {
    let d = desired_of(specs, &spec_yaml("basic", 2)).await;
    converge(&env.ctx, &env.sim, &d).await;
    let live = observe(&env.ctx, Utc::now()).await.expect("observe");
    (d, live.services("basic")[0].service_id)
}

async fn last_seq(env: &Env) -> u64 {
    let v = common::onesim_get(&env.sim.urls().control, "/events?since=0").await;
    v["last_seq"].as_u64().unwrap_or(0)
}

async fn events_since(env: &Env, since: u64) -> Vec<Value> {
    let v = common::onesim_get(&env.sim.urls().control, &format!("/events?since={since}")).await;
    v["events"].as_array().cloned().unwrap_or_default()
}

/// The logged calls (all mutations) since `since` that name OneFlow service `service`
/// or act on one of `vms` (`one.vm.*`).
async fn calls_naming(env: &Env, since: u64, service: Option<u64>, vms: &[u64]) -> Vec<String> {
    events_since(env, since)
        .await
        .into_iter()
        .filter(|e| {
            let call = e["call"].as_str().unwrap_or_default();
            let on_service = service.is_some_and(|s| {
                e["api"] == "oneflow" && call.split('/').any(|seg| seg == s.to_string())
            });
            let on_vm = e["api"] == "xmlrpc"
                && call.starts_with("one.vm.")
                && e["args"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| vms.iter().any(|id| v == &json!(id))));
            on_service || on_vm
        })
        .map(|e| format!("{} {} {}", e["api"], e["call"], e["args"]))
        .collect()
}

/// A VM template of the tenant's own, as any user can register.
async fn tenant_template(t: &Tenant, name: &str) -> i64 {
    t.oned
        .template_allocate(&format!(
            "NAME=\"{name}\"\nCPU=\"1\"\nMEMORY=\"256\"\nCONTEXT=[TOKEN=\"YES\"]"
        ))
        .await
        .expect("tenant template")
}

/// A running VM of the tenant's own.
async fn tenant_vm(t: &Tenant, template: i64) -> u64 {
    let id = t
        .oned
        .template_instantiate(template, "", false, "", false)
        .await
        .expect("tenant VM");
    for _ in 0..200 {
        let vm = t.oned.vm_info(id).await.expect("vm info");
        if vm.state.code() == 3 && vm.lcm_state.code() == 3 {
            return u64::try_from(id).expect("id");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("tenant VM {id} never ran");
}

/// The tenant writes our service's tags (and `attrs`) into her VM's user template, as any
/// VM owner can, and powers it off when `power_off` (a "failed SuperNode").
async fn tag(t: &Tenant, vm: u64, service: u64, role: &str, attrs: &str, power_off: bool) {
    let text = format!("SERVICE_ID=\"{service}\"\nROLE_NAME=\"{role}\"\n{attrs}");
    t.oned
        .vm_update(vm as i64, &text, UpdateType::Merge)
        .await
        .expect("tag");
    if power_off {
        t.oned
            .vm_action(VmAction::Poweroff, vm as i64)
            .await
            .expect("poweroff");
        // The scenario is a powered-off VM: wait out SHUTDOWN_POWEROFF, or the test's last
        // check races the simulator's VM step.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while t.oned.vm_info(vm as i64).await.expect("vm").state.code() != 8 {
            assert!(
                std::time::Instant::now() < deadline,
                "VM {vm} never reached POWEROFF"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// The VM ids OneFlow lists in `role` of service `id` (as oneadmin).
async fn role_nodes(env: &Env, id: u64, role: &str) -> Vec<u64> {
    let s = env
        .backend
        .oneflow
        .get_service(i64::try_from(id).expect("id"))
        .await
        .expect("service");
    let mut ids: Vec<u64> = s
        .role(role)
        .expect("roles")
        .map(|r| r.nodes.iter().map(|n| n.deploy_id as u64).collect())
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

// ---------------------------------------------------------------------------------------
// Item 1: foreign services are adopted.

#[tokio::test]
async fn a_foreign_service_with_a_forged_marker_is_never_adopted() {
    let env = env(OwnershipOptions::default()).await;
    fixtures(&env.backend.oned).await;
    let mallory = tenant(&env.sim, "mallory");
    let (link, node) = (
        tenant_template(&mallory, "m-link").await,
        tenant_template(&mallory, "m-node").await,
    );
    // Mallory's own service, marked as this controller's cluster `basic`.
    let body = json!({
        "name": "basic",
        "deployment": "straight",
        "flower_reconcile": {"cluster": "basic", "spec_hash": "forged", "controller": CONTROLLER, "format": 1},
        "roles": [
            {"name": "superlink", "type": "vm", "template_id": link, "cardinality": 1},
            {"name": "supernode", "type": "vm", "template_id": node, "cardinality": 1,
             "parents": ["superlink"]}
        ]
    });
    let tpl = mallory
        .oneflow
        .create_service_template(&body)
        .await
        .expect("tenant service template");
    let forged = mallory
        .oneflow
        .instantiate_service_template(tpl.id(), Some(&json!({"name": "basic"})))
        .await
        .expect("tenant service");
    let forged_id = u64::try_from(forged.id()).expect("id");
    let seq = last_seq(&env).await;

    let live = observe(&env.ctx, Utc::now()).await.expect("observe");
    assert!(live.services("basic").is_empty(), "{:?}", live.clusters);
    assert!(
        live.warnings
            .iter()
            .any(|w| w.cluster.as_deref() == Some("basic")
                && w.message.contains(&format!("service {forged_id} "))
                && w.message
                    .contains(&format!("owned by user {}", mallory.uid))),
        "{:?}",
        live.warnings
    );

    let specs = tempfile::tempdir().expect("specs");
    let d = desired_of(specs.path(), &spec_yaml("basic", 2)).await;
    converge(&env.ctx, &env.sim, &d).await;

    let live = observe(&env.ctx, Utc::now()).await.expect("observe");
    let ours = live.services("basic");
    assert_eq!(ours.len(), 1, "the real cluster is created");
    assert_ne!(ours[0].service_id, forged_id);
    let doc = env
        .backend
        .oneflow
        .get_service(i64::try_from(ours[0].service_id).expect("id"))
        .await
        .expect("our service");
    assert_eq!(
        doc.0.uid, env.ctx.identity.uid,
        "owned by the controller's user"
    );

    let mut theirs = role_nodes(&env, forged_id, "superlink").await;
    theirs.extend(role_nodes(&env, forged_id, "supernode").await);
    assert_eq!(
        calls_naming(&env, seq, Some(forged_id), &theirs).await,
        Vec::<String>::new(),
        "no call named mallory's service or VMs"
    );
    let after = mallory
        .oneflow
        .get_service(forged.id())
        .await
        .expect("still there");
    assert_eq!(after.body()["flower_reconcile"]["spec_hash"], "forged");
}

// ---------------------------------------------------------------------------------------
// Item 2: foreign VMs join roles.

#[tokio::test]
async fn a_foreign_vm_tagged_with_our_service_never_joins_a_role() {
    let env = env(OwnershipOptions::default()).await;
    fixtures(&env.backend.oned).await;
    let specs = tempfile::tempdir().expect("specs");
    let (d, service) = run_basic(&env, specs.path()).await;

    // Mallory tags one VM as the SuperLink (with her endpoint) and another as a SuperNode
    // she powers off: the old observation took both into the roles, showed her endpoint
    // and terminated her "failed SuperNode".
    let mallory = tenant(&env.sim, "mallory");
    let tpl = tenant_template(&mallory, "m-vm").await;
    let (fake_link, fake_node) = (
        tenant_vm(&mallory, tpl).await,
        tenant_vm(&mallory, tpl).await,
    );
    for (vm, role) in [(fake_link, "superlink"), (fake_node, "supernode")] {
        let attrs = format!(
            "FL_READY=\"YES\"\nFL_NODE_READY=\"YES\"\nFL_ENDPOINT=\"{EVIL_ENDPOINT}\"\nFL_HEARTBEAT=\"{}\"",
            Utc::now().to_rfc3339()
        );
        tag(&mallory, vm, service, role, &attrs, vm == fake_node).await;
    }
    let seq = last_seq(&env).await;

    let live = observe(&env.ctx, Utc::now()).await.expect("observe");
    let ours = &live.services("basic")[0];
    let ids =
        |r: &flower_reconcile::plan::LiveRole| r.nodes.iter().map(|v| v.id).collect::<Vec<_>>();
    assert_eq!(
        ids(&ours.superlink),
        role_nodes(&env, service, "superlink").await
    );
    assert_eq!(
        ids(&ours.supernode),
        role_nodes(&env, service, "supernode").await
    );
    let summary = summarize_cluster(&live, "basic", None).expect("summary");
    assert_ne!(summary.superlink_endpoint.as_deref(), Some(EVIL_ENDPOINT));
    match flower_reconcile::submit::discover_target(&env.ctx, "basic", None).await {
        Ok(t) => assert!(!t.control_address.contains("203.0.113"), "{t:?}"),
        Err(e) => assert!(!e.to_string().contains("203.0.113"), "{e}"),
    }

    // Reconciling again touches neither VM.
    converge(&env.ctx, &env.sim, &d).await;
    assert_eq!(
        calls_naming(&env, seq, None, &[fake_link, fake_node]).await,
        Vec::<String>::new()
    );
    let node = mallory.oned.vm_info(fake_node as i64).await.expect("alive");
    assert_eq!(node.state.code(), 8, "still POWEROFF, not terminated");
}

/// A peer (any VM of the service, through OneGate's `PUT /vms/:id`) rewrites the SuperLink's
/// `FL_ENDPOINT` to its own address. Observation reads the SuperLink VM's NIC addresses from
/// oned's VM pool and keeps `FL_ENDPOINT` only on one of them, so `submit` takes its target
/// from the controller's observation and never dials the peer.
#[tokio::test]
async fn a_peer_s_fl_endpoint_never_becomes_the_submit_target() {
    let env = env(OwnershipOptions::default()).await;
    fixtures(&env.backend.oned).await;
    let specs = tempfile::tempdir().expect("specs");
    let yaml = format!(
        "{}  superlink:\n    controlApi: network\n",
        spec_yaml("basic", 2)
    );
    let d = desired_of(specs.path(), &yaml).await;
    converge(&env.ctx, &env.sim, &d).await;
    let service = observe(&env.ctx, Utc::now())
        .await
        .expect("observe")
        .services("basic")[0]
        .service_id;
    let link = role_nodes(&env, service, "superlink").await[0];
    let peer = role_nodes(&env, service, "supernode").await[0];
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let ip = |id: u64| env.sim.sim.with(|st| st.vms[&(id as i64)].ip.clone());
    let (link_ip, peer_ip) = (ip(link), ip(peer));
    let publish = |endpoint: String| {
        env.sim.sim.with(|st| {
            let ut = &mut st
                .vms
                .get_mut(&(link as i64))
                .expect("superlink")
                .user_template;
            ut.set("FL_ENDPOINT", &endpoint);
            ut.set(
                "FL_CA_CERT",
                &flower_reconcile::protocol::pem::encode(pem.as_bytes()),
            );
        })
    };

    // What the SuperLink's agent publishes: its own address.
    publish(format!("{link_ip}:9092"));
    let t = flower_reconcile::submit::discover_target(&env.ctx, "basic", None)
        .await
        .expect("target");
    assert_eq!(t.control_address, format!("{link_ip}:9093"));
    assert_eq!(t.ca_pem.as_deref(), Some(pem));

    // The peer's rewrite.
    publish(format!("{peer_ip}:9092"));
    let err = flower_reconcile::submit::discover_target(&env.ctx, "basic", None)
        .await
        .expect_err("no target")
        .to_string();
    assert_eq!(
        err,
        "target: cluster basic: no running SuperLink has published FL_ENDPOINT on one of its \
         own addresses yet"
    );
    let live = observe(&env.ctx, Utc::now()).await.expect("observe");
    assert!(
        live.warnings.iter().any(|w| w.vm_id == Some(link)
            && w.message
                .starts_with("FL_ENDPOINT is not an address of the VM's NICs")),
        "{:?}",
        live.warnings
    );
    let summary = summarize_cluster(&live, "basic", None).expect("summary");
    assert_eq!(
        summary.superlink_endpoint, None,
        "status shows no forged endpoint"
    );
}

// ---------------------------------------------------------------------------------------
// Item 10: name collisions.

/// The template ids and networks of the VMs of `service` (as oneadmin).
async fn vm_sources(env: &Env, service: u64) -> Vec<(Option<i64>, Vec<Option<i64>>)> {
    let mut ids = role_nodes(env, service, "superlink").await;
    ids.extend(role_nodes(env, service, "supernode").await);
    let mut out = Vec::new();
    for id in ids {
        let vm = env.backend.oned.vm_info(id as i64).await.expect("vm");
        out.push((
            vm.template_id,
            vm.nics.iter().map(|n| n.network_id).collect(),
        ));
    }
    out
}

/// (template ids, network ids) owned by `uid`, through oneadmin's view.
async fn owned_by(env: &Env, uid: u32) -> (Vec<i64>, Vec<i64>) {
    use flower_reconcile::one::oned::{PoolFilter, PoolRange};
    let t = env
        .backend
        .oned
        .templatepool_info(PoolFilter::User(uid), PoolRange::All)
        .await
        .expect("templates");
    let n = env
        .backend
        .oned
        .vnpool_info(PoolFilter::User(uid), PoolRange::All)
        .await
        .expect("networks");
    (
        t.iter().map(|t| t.id).collect(),
        n.iter().map(|n| n.id).collect(),
    )
}

fn assert_built_from(sources: &[(Option<i64>, Vec<Option<i64>>)], owned: &(Vec<i64>, Vec<i64>)) {
    assert_eq!(sources.len(), 3, "{sources:?}");
    for (template, nets) in sources {
        assert!(
            template.is_some_and(|t| owned.0.contains(&t)),
            "{sources:?} vs {owned:?}"
        );
        assert!(
            !nets.is_empty() && nets.iter().all(|n| n.is_some_and(|n| owned.1.contains(&n))),
            "{sources:?} vs {owned:?}"
        );
    }
}

#[tokio::test]
async fn a_foreign_template_with_our_name_neither_blocks_nor_hijacks() {
    let env = env(OwnershipOptions::default()).await;
    // Mallory registers the names the spec uses first, then the operator does.
    let mallory = tenant(&env.sim, "mallory");
    fixtures(&mallory.oned).await;
    fixtures(&env.backend.oned).await;
    let specs = tempfile::tempdir().expect("specs");
    let (_, service) = run_basic(&env, specs.path()).await;
    let mine = owned_by(&env, u32::try_from(env.ctx.identity.uid).expect("uid")).await;
    assert_built_from(&vm_sources(&env, service).await, &mine);
}

#[tokio::test]
async fn names_resolve_among_the_configured_resource_owner_and_ids_must_exist() {
    let sim_env = env(OwnershipOptions::default()).await;
    // The operator `ops` registered the appliance templates; mallory copies the names.
    let ops = tenant(&sim_env.sim, "ops");
    let mallory = tenant(&sim_env.sim, "mallory");
    fixtures(&mallory.oned).await;
    fixtures(&ops.oned).await;
    let ops_uid = u32::try_from(ops.uid).expect("uid");
    let ctx = Context::connect(
        sim_env.backend.clone(),
        CONTROLLER,
        ReconcileOptions {
            ownership: OwnershipOptions {
                resource_owner: Some(ops_uid),
                ..OwnershipOptions::default()
            },
            ..ReconcileOptions::default()
        },
    )
    .await
    .expect("context");
    let env = Env { ctx, ..sim_env };
    let specs = tempfile::tempdir().expect("specs");
    let (_, service) = run_basic(&env, specs.path()).await;
    assert_built_from(
        &vm_sources(&env, service).await,
        &owned_by(&env, ops_uid).await,
    );

    // A numeric id is still checked to exist.
    let yaml = spec_yaml("other", 1).replace("superlink: flower-superlink", "superlink: 999");
    let d = desired_of(specs.path(), &yaml).await;
    let live = observe(&env.ctx, Utc::now()).await.expect("observe");
    let err = reconcile_one(&env.ctx, &d, &live, "other", Utc::now())
        .await
        .expect_err("no template 999");
    assert!(
        format!("{err:#}").contains("no VM template with id 999"),
        "{err:#}"
    );
}

// ---------------------------------------------------------------------------------------
// Item 8: saved plans are trusted blindly.

#[tokio::test]
async fn a_tampered_saved_plan_is_refused_before_any_call() {
    let env = env(OwnershipOptions::default()).await;
    fixtures(&env.backend.oned).await;
    let specs = tempfile::tempdir().expect("specs");
    let (_, service) = run_basic(&env, specs.path()).await;
    let mallory = tenant(&env.sim, "mallory");
    let victim = tenant_vm(&mallory, tenant_template(&mallory, "m-vm").await).await;

    let home = tempfile::tempdir().expect("home");
    let plan_path = home.path().join("plan.json");
    let run = |args: Vec<String>| {
        let mut cmd = reconcile_command(&env.sim, PASSWORD, home.path());
        cmd.args(args)
            .arg("--specs")
            .arg(specs.path())
            .args(["--controller-id", CONTROLLER]);
        async move { cmd.output().await.expect("binary runs") }
    };
    let plan_out = run(vec![
        "plan".into(),
        "--out".into(),
        plan_path.display().to_string(),
    ])
    .await;
    assert_eq!(
        plan_out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&plan_out.stderr)
    );
    let saved: Value =
        serde_json::from_slice(&std::fs::read(&plan_path).expect("plan file")).expect("json");

    let tampered = [
        // Terminate mallory's VM as a "failed SuperNode" of our service.
        ActionKind::ReplaceNode {
            service_id: service,
            vm_id: victim,
            failure: NodeFailure::Poweroff,
        },
        // Undeploy a cluster whose spec exists.
        ActionKind::Delete {
            service_id: service,
        },
    ];
    for kind in tampered {
        let mut file = saved.clone();
        let action = Action {
            cluster: "basic".into(),
            kind,
            reason: "tampered".into(),
            diff: Vec::new(),
            deferred: None,
        };
        file["plan"]["actions"]
            .as_array_mut()
            .expect("actions")
            .push(serde_json::to_value(&action).expect("action"));
        std::fs::write(&plan_path, serde_json::to_vec(&file).expect("json")).expect("write");
        let seq = last_seq(&env).await;
        let out = run(vec![
            "apply".into(),
            plan_path.display().to_string(),
            "--auto-approve".into(),
        ])
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("refusing to apply"), "{stderr}");
        assert!(stderr.contains(action.kind.verb()), "{stderr}");
        assert_eq!(
            events_since(&env, seq).await,
            Vec::<Value>::new(),
            "nothing was executed"
        );
    }
    let node = mallory.oned.vm_info(victim as i64).await.expect("alive");
    assert_eq!(node.state.code(), 3);

    // The plan as saved applies (it has no changes): the check is not a blanket refusal.
    std::fs::write(&plan_path, serde_json::to_vec(&saved).expect("json")).expect("write");
    let out = run(vec![
        "apply".into(),
        plan_path.display().to_string(),
        "--auto-approve".into(),
    ])
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Item 2's listing half: the VM pool is read with the "mine" filter, so an observation
/// costs pages of our VMs, however many VMs other users run.
#[tokio::test]
async fn the_vm_listing_pages_over_our_vms_only() {
    let sim_env = env(OwnershipOptions::default()).await;
    fixtures(&sim_env.backend.oned).await;
    let mallory = tenant(&sim_env.sim, "mallory");
    let tpl = tenant_template(&mallory, "m-vm").await;
    for _ in 0..12 {
        mallory
            .oned
            .template_instantiate(tpl, "", false, "", false)
            .await
            .expect("tenant VM");
    }
    let ctx = Context::connect(
        sim_env.backend.clone(),
        CONTROLLER,
        ReconcileOptions {
            vm_page_size: 2,
            ..ReconcileOptions::default()
        },
    )
    .await
    .expect("context");
    let env = Env { ctx, ..sim_env };
    let specs = tempfile::tempdir().expect("specs");
    run_basic(&env, specs.path()).await;

    let pages = || env.backend.stats.calls("one.vmpool.infoextended");
    let before = pages();
    observe(&env.ctx, Utc::now()).await.expect("observe");
    // Our 3 VMs in pages of 2: 2 requests (15 VMs would take 8).
    assert_eq!(pages() - before, 2);
}

// ---------------------------------------------------------------------------------------
// Items 1, 2 and 10 with the controller as a regular user: the tenant shares her forged
// objects with everyone (OTHER_U, and OTHER_M on the VM), which puts them into the
// controller's "all visible" listings (-2) but never into its own (-3).

/// Set the permission octet of a tenant's object, as `chmod` through the API would.
fn share(env: &Env, kind: &str, id: i64, perms: u16) {
    env.sim.sim.with(|st| {
        let own = match kind {
            "vm" => st.vms.get_mut(&id).map(|o| &mut o.own),
            "template" => st.templates.get_mut(&id).map(|o| &mut o.own),
            "vn" => st.vnets.get_mut(&id).map(|o| &mut o.own),
            _ => st.docs.get_mut(&id).map(|o| &mut o.own),
        };
        own.expect("object").perms = perms;
    });
}

#[tokio::test]
async fn a_regular_user_controller_ignores_what_a_tenant_shares_with_it() {
    let (sim, _) = start_onesim(PASSWORD, |_| {}).await;
    let flower = tenant(&sim, "flower");
    let mallory = tenant(&sim, "mallory");
    let backend = Arc::new(ClientsBackend::new(&flower.config).expect("clients"));
    let ctx = Context::connect(backend.clone(), CONTROLLER, ReconcileOptions::default())
        .await
        .expect("context");
    assert_eq!(ctx.identity.uid, flower.uid);
    let env = Env { sim, ctx, backend };

    // Mallory's look-alike templates and network, shared with everyone.
    fixtures(&mallory.oned).await;
    fixtures(&flower.oned).await;
    let (m_templates, m_nets) = owned_by(&env, u32::try_from(mallory.uid).expect("uid")).await;
    for t in &m_templates {
        share(&env, "template", *t, 0o604);
    }
    for n in &m_nets {
        share(&env, "vn", *n, 0o604);
    }
    // Her service marked as cluster `basic`, shared with everyone through OneFlow.
    let link = tenant_template(&mallory, "m-link").await;
    let body = json!({
        "name": "basic",
        "flower_reconcile": {"cluster": "basic", "spec_hash": "forged", "controller": CONTROLLER, "format": 1},
        "roles": [{"name": "superlink", "type": "vm", "template_id": link, "cardinality": 1}]
    });
    let tpl = mallory
        .oneflow
        .create_service_template(&body)
        .await
        .expect("template");
    let forged = mallory
        .oneflow
        .instantiate_service_template(tpl.id(), None)
        .await
        .expect("service");
    share(&env, "doc", forged.id(), 0o604);
    let visible = env.backend.oneflow.list_services().await.expect("list");
    assert!(
        visible.iter().any(|s| s.id() == forged.id()),
        "shared with the controller's user"
    );

    let specs = tempfile::tempdir().expect("specs");
    let (_, service) = run_basic(&env, specs.path()).await;
    let mine = owned_by(&env, u32::try_from(flower.uid).expect("uid")).await;
    assert_built_from(&vm_sources(&env, service).await, &mine);

    // Her VM, tagged as a SuperNode of our service, powered off and manageable by anyone.
    let victim = tenant_vm(&mallory, link).await;
    tag(&mallory, victim, service, "supernode", "", true).await;
    share(&env, "vm", victim as i64, 0o606);
    let seq = last_seq(&env).await;
    let live = observe(&env.ctx, Utc::now()).await.expect("observe");
    assert_eq!(live.services("basic").len(), 1);
    assert!(live
        .warnings
        .iter()
        .any(|w| w.message.contains(&format!("service {} ", forged.id()))));
    let d = desired_of(specs.path(), &spec_yaml("basic", 2)).await;
    converge(&env.ctx, &env.sim, &d).await;
    let forged_id = u64::try_from(forged.id()).expect("id");
    assert_eq!(
        calls_naming(&env, seq, Some(forged_id), &[victim]).await,
        Vec::<String>::new()
    );
    let vm = mallory.oned.vm_info(victim as i64).await.expect("alive");
    assert_eq!(vm.state.code(), 8, "still POWEROFF");
}
