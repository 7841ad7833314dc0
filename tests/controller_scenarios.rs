//! Controller scenarios against onesim (`none` runtime, auto-ready), asserting the exact
//! OpenNebula mutations the controller makes, read from onesim's event log.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flower_reconcile::api::{spec_hash, FlowerCluster};
use flower_reconcile::plan::{plan, DesiredCluster, DesiredState};
use flower_reconcile::reconciler::{observe, reconcile_one};
use flower_reconcile::service::config::RunSettings;
use flower_reconcile::source::SourceArgs;
use serde_json::{json, Value};

use common::onesim_env::{
    controller_env, publish_agent_attributes, spec_yaml, supernode_cardinality, ControllerEnv,
    Served,
};

const PASSWORD: &str = "scenario-pw";

type Env = ControllerEnv;

async fn env() -> Env {
    env_with(|_| {}).await
}

/// onesim (`adjust`ed) with the fixtures, and a controller context over it.
async fn env_with(adjust: impl FnOnce(&mut onesim::Config)) -> Env {
    controller_env(PASSWORD, "ctl-test", adjust).await
}

fn cluster(name: &str, patch: Value) -> FlowerCluster {
    let mut v = json!({
        "apiVersion": flower_reconcile::api::API_VERSION,
        "kind": flower_reconcile::api::KIND,
        "metadata": {"name": name},
        "spec": {
            "opennebula": {
                "templates": {"superlink": "flower-superlink", "supernode": "flower-supernode"},
                "network": "private"
            },
            "supernodes": {"count": 2}
        }
    });
    merge(&mut v["spec"], patch);
    serde_json::from_value(v).expect("spec")
}

fn merge(into: &mut Value, patch: Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

fn desired(clusters: Vec<FlowerCluster>) -> DesiredState {
    DesiredState {
        clusters: clusters
            .into_iter()
            .map(|c| {
                let d = DesiredCluster {
                    spec_hash: spec_hash(&c),
                    revision: "test".into(),
                    site_node_keys: Default::default(),
                    cluster: c,
                };
                (d.cluster.metadata.name.clone(), d)
            })
            .collect(),
        held: BTreeSet::new(),
        complete: true,
        prune: Default::default(),
    }
}

/// What the agents would publish on every running VM: readiness and a fresh heartbeat.
fn agents(env: &Env, now: DateTime<Utc>) {
    let beat = now.to_rfc3339();
    env.sim.sim.with(|st| publish_agent_attributes(st, &beat));
}

/// Reconcile every cluster until each is Ready with an empty plan (no changes, no waits).
async fn converge(env: &Env, d: &DesiredState) {
    common::onesim_env::converge(&env.ctx, &env.sim, d).await;
}

/// The controller's mutations since `since`: OneFlow calls and oned VM writes, numbers
/// replaced by `N` (ids depend on the order onesim allocates them).
async fn mutations(env: &Env, since: u64) -> Vec<String> {
    let n = regex::Regex::new(r"\d+").expect("regex");
    events(env, since)
        .await
        .into_iter()
        .filter(|e| {
            e["api"] == "oneflow"
                || (e["api"] == "xmlrpc"
                    && (e["call"] == "one.vm.update" || e["call"] == "one.vm.action"))
        })
        .map(|e| {
            let line = format!(
                "{} {}",
                e["api"].as_str().unwrap_or(""),
                e["call"].as_str().unwrap_or("")
            );
            n.replace_all(&line, "N").into_owned()
        })
        .collect()
}

/// onesim's event log after `since`, through its control API.
async fn events(env: &Env, since: u64) -> Vec<Value> {
    let v = common::onesim_get(&env.sim.urls().control, &format!("/events?since={since}")).await;
    v["events"].as_array().cloned().unwrap_or_default()
}

async fn last_seq(env: &Env) -> u64 {
    let v = common::onesim_get(&env.sim.urls().control, "/events?since=0").await;
    v["last_seq"].as_u64().unwrap_or(0)
}

async fn services(env: &Env) -> Vec<Value> {
    env.backend
        .oneflow
        .list_services()
        .await
        .expect("services")
        .iter()
        .map(|s| s.body().clone())
        .collect()
}

#[tokio::test]
async fn create_then_scale_2_5_3() {
    let env = env().await;
    let d = desired(vec![cluster("alpha", json!({}))]);
    converge(&env, &d).await;
    assert_eq!(
        mutations(&env, 0).await,
        [
            "oneflow POST /service_template",
            "oneflow POST /service_template/N/action"
        ]
    );
    let svcs = services(&env).await;
    assert_eq!(svcs.len(), 1);
    assert_eq!(svcs[0]["flower_reconcile"]["cluster"], "alpha");

    for count in [5, 3] {
        let seq = last_seq(&env).await;
        let d = desired(vec![cluster(
            "alpha",
            json!({"supernodes": {"count": count}}),
        )]);
        converge(&env, &d).await;
        assert_eq!(
            mutations(&env, seq).await,
            ["oneflow POST /service/N/scale"]
        );
        assert_eq!(supernode_cardinality(&services(&env).await[0]), count);
    }
}

#[tokio::test]
async fn version_change_redeploys_and_undeploys_the_old_service_after_the_new_one_is_ready() {
    let env = env().await;
    converge(&env, &desired(vec![cluster("alpha", json!({}))])).await;
    let old_id = env.backend.oneflow.list_services().await.expect("list")[0].id();
    let seq = last_seq(&env).await;
    let d = desired(vec![cluster("alpha", json!({"flowerVersion": "1.26.0"}))]);
    converge(&env, &d).await;
    assert_eq!(
        mutations(&env, seq).await,
        [
            "oneflow PUT /service_template/N",
            "oneflow POST /service_template/N/action",
            "oneflow DELETE /service/N"
        ]
    );
    // Wait until OneFlow removed the old service.
    for _ in 0..100 {
        let list = env.backend.oneflow.list_services().await.expect("list");
        if list.iter().all(|s| s.id() != old_id) {
            assert_eq!(list.len(), 1);
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("old service still present");
}

/// The converge loop (apply --wait, demo, tests) stops at its timeout saying, per
/// cluster, what is pending or why plan::ready says not Ready; it applies only what its
/// filter allows.
#[tokio::test]
async fn converge_times_out_saying_what_is_not_ready() {
    use flower_reconcile::reconciler::converge::{converge as run, ConvergeOptions, Quiet};
    let env = env().await;
    let d = desired(vec![cluster("alpha", json!({}))]);
    converge(&env, &d).await;
    let service = env.backend.oneflow.list_services().await.expect("list")[0].id();
    let nothing = |_: &flower_reconcile::plan::Action| false;
    let opts = ConvergeOptions {
        scope: None,
        timeout: Duration::ZERO,
        poll: Duration::ZERO,
        allow: &nothing,
    };

    // A pending change the filter does not allow: named by its reason, not applied.
    let seq = last_seq(&env).await;
    let more = desired(vec![cluster("alpha", json!({"supernodes": {"count": 3}}))]);
    let e = run(&env.ctx, &more, &opts, &mut Quiet).await.unwrap_err();
    let reason = plan(
        &more,
        &observe(&env.ctx, Utc::now()).await.expect("observe"),
        Utc::now(),
    )
    .actions[0]
        .reason
        .clone();
    assert_eq!(
        e.to_string(),
        format!("not converged after 0s: alpha: {reason}")
    );
    assert_eq!(mutations(&env, seq).await, Vec::<String>::new());

    // Nothing pending, but a SuperNode no longer says it is ready: the readiness verdict.
    env.sim.sim.with(|st| {
        let vm = st
            .vms
            .values_mut()
            .find(|v| v.user_template.get("ROLE_NAME") == Some("supernode"))
            .expect("a supernode");
        vm.user_template.set("FL_NODE_READY", "NO");
    });
    let e = run(&env.ctx, &d, &opts, &mut Quiet).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "not converged after 0s: alpha: NodesNotReady (service {service}: 1/2 SuperNodes ready)"
        )
    );
}

#[tokio::test]
async fn certificate_near_expiry_is_rotated_through_fl_rotate_request() {
    let env = env().await;
    let d = desired(vec![cluster("alpha", json!({}))]);
    converge(&env, &d).await;
    let soon = (Utc::now() + chrono::Duration::days(2)).to_rfc3339();
    let link = env.sim.sim.with(|st| {
        let vm = st
            .vms
            .values_mut()
            .find(|v| v.user_template.get("ROLE_NAME") == Some("superlink"))
            .expect("superlink VM");
        vm.user_template.set("FL_CERT_NOT_AFTER", &soon);
        vm.id
    });
    let seq = last_seq(&env).await;
    let live = observe(&env.ctx, Utc::now()).await.expect("observe");
    reconcile_one(&env.ctx, &d, &live, "alpha", Utc::now())
        .await
        .expect("reconcile");
    assert_eq!(mutations(&env, seq).await, ["xmlrpc one.vm.update"]);
    let req = env.sim.sim.with(|st| {
        st.vms[&link]
            .user_template
            .get("FL_ROTATE_REQUEST")
            .map(str::to_string)
    });
    // The generation is the observation's epoch second (generations only grow), and the
    // request carries the cluster key's signature.
    let req = req.expect("FL_ROTATE_REQUEST");
    let g: i64 = req.parse().expect("a generation");
    assert!((g - Utc::now().timestamp()).abs() < 120, "{g}");
    assert!(env
        .sim
        .sim
        .with(|st| st.vms[&link].user_template.get("FL_ROTATE_SIG").is_some()));

    // Not done yet: the controller waits, writes nothing.
    let seq = last_seq(&env).await;
    let live = observe(&env.ctx, Utc::now()).await.expect("observe");
    reconcile_one(&env.ctx, &d, &live, "alpha", Utc::now())
        .await
        .expect("reconcile");
    assert!(mutations(&env, seq).await.is_empty());

    // The agent rotates: done, new expiry → nothing more to do.
    let later = (Utc::now() + chrono::Duration::days(365)).to_rfc3339();
    env.sim.sim.with(|st| {
        let vm = st.vms.get_mut(&link).expect("vm");
        vm.user_template.set("FL_ROTATE_DONE", &req);
        vm.user_template.set("FL_CERT_NOT_AFTER", &later);
    });
    let live = observe(&env.ctx, Utc::now()).await.expect("observe");
    assert!(plan(&d, &live, Utc::now()).actions.is_empty());
}

#[tokio::test]
async fn failed_vm_is_terminated_and_the_role_scaled_back() {
    let env = env().await;
    let d = desired(vec![cluster("alpha", json!({"supernodes": {"count": 3}}))]);
    converge(&env, &d).await;
    let victim = env.sim.sim.with(|st| {
        let id = st
            .vms
            .values()
            .find(|v| v.user_template.get("ROLE_NAME") == Some("supernode"))
            .map(|v| v.id)
            .expect("supernode");
        st.set_state(id, 3, 36); // ACTIVE / BOOT_FAILURE
        id
    });
    let seq = last_seq(&env).await;
    converge(&env, &d).await;
    assert_eq!(
        mutations(&env, seq).await,
        ["xmlrpc one.vm.action", "oneflow POST /service/N/scale"]
    );
    let done = env.sim.sim.with(|st| st.vms.get(&victim).map(|v| v.state));
    assert!(
        done.is_none() || done == Some(6),
        "victim not terminated: {done:?}"
    );
    assert_eq!(supernode_cardinality(&services(&env).await[0]), 3);
}

#[tokio::test]
async fn stale_heartbeat_is_replaced() {
    let env = env().await;
    let d = desired(vec![cluster("alpha", json!({"supernodes": {"count": 2}}))]);
    converge(&env, &d).await;
    // Forty minutes later every agent heartbeats except one SuperNode's.
    let later = Utc::now() + chrono::Duration::minutes(40);
    agents(&env, later);
    let stale = env.sim.sim.with(|st| {
        let vm = st
            .vms
            .values_mut()
            .find(|v| v.user_template.get("ROLE_NAME") == Some("supernode"))
            .expect("supernode");
        vm.user_template.set(
            "FL_HEARTBEAT",
            &(Utc::now() - chrono::Duration::minutes(1)).to_rfc3339(),
        );
        vm.id
    });
    let seq = last_seq(&env).await;
    let live = observe(&env.ctx, later).await.expect("observe");
    reconcile_one(&env.ctx, &d, &live, "alpha", later)
        .await
        .expect("reconcile");
    assert_eq!(mutations(&env, seq).await, ["xmlrpc one.vm.action"]);
    let all = events(&env, seq).await;
    let last = all
        .iter()
        .rev()
        .find(|e| e["call"] == "one.vm.action")
        .expect("action");
    assert!(
        last["args"].to_string().contains("terminate-hard"),
        "{}",
        last["args"]
    );
    assert!(
        last["args"].to_string().contains(&stale.to_string()),
        "{}",
        last["args"]
    );
}

#[tokio::test]
async fn removed_spec_is_retained_or_deleted_by_policy_and_held_specs_are_untouched() {
    let env = env().await;
    let d = desired(vec![
        cluster("keep", json!({})),
        cluster("drop", json!({"deletionPolicy": "Delete"})),
        cluster("broken", json!({"deletionPolicy": "Delete"})),
    ]);
    converge(&env, &d).await;
    let seq = last_seq(&env).await;
    // Every spec removed; `broken`'s file fails to load, so it is held.
    let mut gone = desired(vec![]);
    gone.held.insert("broken".into());
    converge(&env, &gone).await;
    assert_eq!(mutations(&env, seq).await, ["oneflow DELETE /service/N"]);
    for _ in 0..100 {
        let names: BTreeSet<String> = services(&env)
            .await
            .iter()
            .filter_map(|b| {
                b["flower_reconcile"]["cluster"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        if !names.contains("drop") {
            assert_eq!(
                names,
                BTreeSet::from(["keep".to_string(), "broken".to_string()])
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the Delete service was not undeployed");
}

#[tokio::test]
async fn a_create_interrupted_at_any_point_yields_exactly_one_service() {
    let env = env().await;
    let d = desired(vec![cluster("alpha", json!({}))]);
    // Drop the reconcile future at increasing points in time, as a kill -9 would stop it.
    for delay_ms in [0u64, 1, 2, 5, 10, 20] {
        let live = observe(&env.ctx, Utc::now()).await.expect("observe");
        let _ = tokio::time::timeout(
            Duration::from_millis(delay_ms),
            reconcile_one(&env.ctx, &d, &live, "alpha", Utc::now()),
        )
        .await;
    }
    // Restart: fresh observation, reconcile until converged.
    converge(&env, &d).await;
    let owned = services(&env)
        .await
        .iter()
        .filter(|b| b["flower_reconcile"]["cluster"] == "alpha")
        .count();
    assert_eq!(owned, 1);
    let templates = env
        .backend
        .oneflow
        .list_service_templates()
        .await
        .expect("templates");
    assert_eq!(
        templates.len(),
        1,
        "the service template is reused, not duplicated"
    );
}

// ---------------------------------------------------------------------------------------
// The `run` service (service::serve with the production reconciler) against onesim.

/// Poll `check` (publishing agent attributes between tries) until it yields a value.
async fn eventually<T, F, Fut>(env: &Env, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..300 {
        agents(env, Utc::now());
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn run_service_exports_api_calls_by_method_and_outcome() {
    let env = env().await;
    let specs = tempfile::tempdir().expect("specs");
    std::fs::write(specs.path().join("alpha.yaml"), spec_yaml("alpha", 2)).expect("spec");
    let svc = Served::start(
        &env.ctx,
        RunSettings {
            source: SourceArgs {
                specs: Some(specs.path().to_path_buf()),
                ..SourceArgs::default()
            },
            ..RunSettings::default()
        },
    )
    .await;
    let series = |method: &str| {
        format!("flower_reconcile_api_calls_total{{method=\"{method}\",outcome=\"ok\"}}")
    };
    let text = eventually(&env, "API call series in /metrics", || async {
        let (_, text) = svc.get("/metrics").await;
        // Mutations reach the metrics with the observation after them.
        [
            "GET /service",
            "one.vmpool.infoextended",
            "POST /service_template",
        ]
        .iter()
        .all(|m| text.contains(&series(m)))
        .then_some(text)
    })
    .await;
    let count = |method: &str| -> u64 {
        let s = series(method);
        text.lines()
            .find_map(|l| l.strip_prefix(s.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(count("GET /service") >= 1, "{text}");
    assert_eq!(count("POST /service_template"), 1, "{text}");
    assert!(
        text.contains(
            "# HELP flower_reconcile_api_calls_total OpenNebula API calls by method and outcome"
        ),
        "{text}"
    );
    svc.stop().await;
}

fn commit(repo: &std::path::Path, file: &str, text: &str, message: &str) -> String {
    let path = repo.join(file);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, text).expect("write spec");
    common::git(repo, &["add", "-A"]);
    common::git(repo, &["commit", "-q", "-m", message]);
    common::git(repo, &["rev-parse", "HEAD"])
}

#[tokio::test]
async fn git_source_commit_is_applied_and_its_sha_shows_in_status() {
    let env = env().await;
    let repo = tempfile::tempdir().expect("repo");
    common::git(repo.path(), &["init", "-q", "-b", "main"]);
    let first = commit(
        repo.path(),
        "clusters/alpha.yaml",
        &spec_yaml("alpha", 2),
        "alpha with two SuperNodes",
    );
    let svc = Served::start(
        &env.ctx,
        RunSettings {
            source: SourceArgs {
                git: Some(format!("file://{}", repo.path().display())),
                branch: Some("main".into()),
                git_path: Some("clusters".into()),
                interval: Some("200ms".parse().expect("duration")),
                ..SourceArgs::default()
            },
            ..RunSettings::default()
        },
    )
    .await;

    // The commit is applied: the service is created, and the status names the commit.
    eventually(&env, "the first commit in status", || async {
        let c = svc.cluster("alpha").await;
        (c["status"]["observedRevision"] == first.as_str() && c["status"]["serviceId"].is_u64())
            .then_some(())
    })
    .await;
    assert_eq!(
        mutations(&env, 0).await,
        [
            "oneflow POST /service_template",
            "oneflow POST /service_template/N/action"
        ]
    );
    eventually(&env, "two SuperNodes", || async {
        let svcs = services(&env).await;
        (svcs.len() == 1 && supernode_cardinality(&svcs[0]) == 2).then_some(())
    })
    .await;

    // A new commit scales the role, and its sha replaces the first in status.
    let seq = last_seq(&env).await;
    let second = commit(
        repo.path(),
        "clusters/alpha.yaml",
        &spec_yaml("alpha", 3),
        "alpha: three SuperNodes",
    );
    assert_ne!(first, second);
    eventually(&env, "the scale to 3 and the second sha", || async {
        let c = svc.cluster("alpha").await;
        let svcs = services(&env).await;
        (c["status"]["observedRevision"] == second.as_str()
            && svcs.len() == 1
            && supernode_cardinality(&svcs[0]) == 3)
            .then_some(())
    })
    .await;
    assert_eq!(
        mutations(&env, seq).await,
        ["oneflow POST /service/N/scale"]
    );

    // A broken commit: the cluster is held as it is, the error names file and line.
    let seq = last_seq(&env).await;
    let broken = commit(
        repo.path(),
        "clusters/alpha.yaml",
        &spec_yaml("alpha", 3).replace("    count: 3\n", "    count: [3\n"),
        "alpha: broken YAML",
    );
    let list: Value = eventually(&env, "the broken revision in status", || async {
        let (_, body) = svc.get("/api/v1/clusters").await;
        let list: Value = serde_json::from_str(&body).expect("list JSON");
        (list["source"]["revision"] == broken.as_str()).then_some(list)
    })
    .await;
    let errors = list["source"]["fileErrors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(errors.len(), 1, "{list}");
    assert_eq!(errors[0]["file"], "alpha.yaml", "{list}");
    assert!(errors[0]["position"]["line"].is_u64(), "no line in {list}");
    let message = errors[0]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("invalid YAML"), "{message:?}");
    let c = svc.cluster("alpha").await;
    assert_eq!(c["heldBy"], "alpha.yaml", "{c}");
    let stalled = c["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|x| x["type"] == "Stalled"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(stalled["status"], "True", "{c}");
    assert_eq!(stalled["reason"], "SpecInvalid", "{c}");
    // Several poll and resync rounds later OpenNebula is untouched.
    for _ in 0..10 {
        agents(&env, Utc::now());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(mutations(&env, seq).await.is_empty());
    assert_eq!(supernode_cardinality(&services(&env).await[0]), 3);
    svc.stop().await;
}

#[tokio::test]
async fn in_place_change_updates_the_live_service_roles() {
    let env = env().await;
    converge(&env, &desired(vec![cluster("alpha", json!({}))])).await;
    let seq = last_seq(&env).await;
    let d = desired(vec![cluster(
        "alpha",
        json!({"supernodes": {"memory": 3072}}),
    )]);
    converge(&env, &d).await;
    assert_eq!(mutations(&env, seq).await, ["oneflow PUT /service/N"]);
    let body = &services(&env).await[0];
    let node_role = body["roles"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "supernode"))
        .cloned()
        .expect("supernode role");
    assert_eq!(
        node_role["template_contents"]["MEMORY"]
            .to_string()
            .trim_matches('"'),
        "3072",
        "{node_role}"
    );
    // The next planning sees the change applied: nothing more to do.
    let live = observe(&env.ctx, Utc::now()).await.expect("observe");
    assert!(plan(&d, &live, Utc::now()).actions.is_empty());

    // A VM OneFlow creates from now on gets the new contents.
    let before: BTreeSet<i64> = env.sim.sim.with(|st| st.vms.keys().copied().collect());
    let d = desired(vec![cluster(
        "alpha",
        json!({"supernodes": {"memory": 3072, "count": 3}}),
    )]);
    converge(&env, &d).await;
    let memory = env.sim.sim.with(|st| {
        st.vms
            .values()
            .find(|v| !before.contains(&v.id))
            .and_then(|v| v.template.get("MEMORY").map(str::to_string))
    });
    assert_eq!(memory.as_deref(), Some("3072"));
}

// ---------------------------------------------------------------------------------------
// `flower-reconcile apply --wait`, the built binary against onesim.

/// `apply --specs DIR --auto-approve --wait` with the ONE_* environment of `env`; while it
/// runs, agents publish readiness when `with_agents`.
async fn apply_wait(
    env: &Env,
    specs: &std::path::Path,
    timeout: &str,
    with_agents: bool,
) -> std::process::Output {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let auth = dir.path().join("one_auth");
    std::fs::write(&auth, format!("oneadmin:{PASSWORD}\n")).expect("auth file");
    std::fs::set_permissions(&auth, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_flower-reconcile"))
        .args(["apply", "--specs"])
        .arg(specs)
        .args([
            "--auto-approve",
            "--wait",
            "--wait-timeout",
            timeout,
            "--wait-poll",
            "200ms",
        ])
        .args(["--controller-id", "ctl-test"])
        .env("ONE_XMLRPC", &env.sim.urls().xmlrpc)
        .env("ONEFLOW_URL", &env.sim.urls().oneflow)
        .env("ONE_AUTH", &auth)
        .env("NO_COLOR", "1")
        .env("HOME", dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("binary starts");
    let run = child.wait_with_output();
    tokio::pin!(run);
    loop {
        tokio::select! {
            out = &mut run => return out.expect("binary output"),
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if with_agents {
                    agents(env, Utc::now());
                }
            }
        }
    }
}

#[tokio::test]
async fn apply_wait_follows_a_new_cluster_until_ready() {
    let env = env().await;
    let specs = tempfile::tempdir().expect("specs");
    std::fs::write(specs.path().join("alpha.yaml"), spec_yaml("alpha", 2)).expect("spec");
    let out = apply_wait(&env, specs.path(), "60s", true).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("Plan: 1 to create"), "{stdout}");
    assert!(
        stdout.contains("alpha: Ready (SuperLink serving, 2/2 SuperNodes ready)"),
        "{stdout}"
    );
    assert!(stdout.contains("All clusters are Ready"), "{stdout}");
    // Progress was shown while the cluster came up.
    assert!(stdout.contains("s] alpha: "), "{stdout}");
    assert_eq!(
        mutations(&env, 0).await,
        [
            "oneflow POST /service_template",
            "oneflow POST /service_template/N/action"
        ]
    );
}

#[tokio::test]
async fn apply_wait_gives_up_when_the_cluster_never_becomes_ready() {
    let env = env().await;
    let specs = tempfile::tempdir().expect("specs");
    std::fs::write(specs.path().join("alpha.yaml"), spec_yaml("alpha", 2)).expect("spec");
    // No agent ever publishes FL_READY: the SuperLink never serves.
    let out = apply_wait(&env, specs.path(), "2s", false).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(
            "error: not converged after 2s: alpha: SuperLinkNotReady (service 1: the SuperLink \
             has not published FL_READY=YES and FL_ENDPOINT)"
        ),
        "{stderr}"
    );
    assert!(!stdout.contains("All clusters are Ready"), "{stdout}");
}

// ---------------------------------------------------------------------------------------
// Honest plans (issue #13 item 3): the built binary against onesim.

/// `flower-reconcile ARGS --specs DIR --controller-id ctl-test` as oneadmin of `env`.
async fn cli(
    env: &Env,
    home: &std::path::Path,
    specs: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    common::onesim_env::reconcile_command(&env.sim, PASSWORD, home)
        .args(args)
        .arg("--specs")
        .arg(specs)
        .args(["--controller-id", "ctl-test"])
        .output()
        .await
        .expect("binary runs")
}

/// [`cli`], which must succeed.
async fn cli_ok(env: &Env, home: &std::path::Path, specs: &std::path::Path, args: &[&str]) {
    let out = cli(env, home, specs, args).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
}

#[tokio::test]
async fn raising_the_count_while_the_service_deploys_is_a_deferred_scale_and_exit_2() {
    // No agent reports READY, so OneFlow's ready gate keeps the service DEPLOYING.
    let env = env_with(|c| c.runtime = onesim::Runtime::None { auto_ready: None }).await;
    let home = tempfile::tempdir().expect("home");
    let specs = tempfile::tempdir().expect("specs");
    let spec = specs.path().join("alpha.yaml");
    std::fs::write(&spec, spec_yaml("alpha", 2)).expect("spec");
    cli_ok(
        &env,
        home.path(),
        specs.path(),
        &["apply", "--auto-approve"],
    )
    .await;
    let mut id = None;
    for _ in 0..300 {
        id = env
            .backend
            .oneflow
            .list_services()
            .await
            .expect("services")
            .iter()
            .find(|s| s.body()["state"] == 1)
            .map(|s| s.id());
        if id.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = id.expect("the service reaches DEPLOYING");

    // Deploying at the spec's count: nothing is pending.
    let out = cli(
        &env,
        home.path(),
        specs.path(),
        &["plan", "--detailed-exitcode"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("No changes."), "{stdout}");

    // Count raised while it deploys: the scale is shown deferred with its reason, exit 2.
    std::fs::write(&spec, spec_yaml("alpha", 3)).expect("spec");
    let since = last_seq(&env).await;
    let out = cli(
        &env,
        home.path(),
        specs.path(),
        &["plan", "--detailed-exitcode"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "~ scale supernode 2 → 3 (deferred: the service is deploying (service {id}))"
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("No changes"), "{stdout}");
    assert!(
        stdout.contains("Plan: 0 to create, 0 to change, 0 to replace, 0 to destroy; 1 deferred."),
        "{stdout}"
    );
    let out = cli(
        &env,
        home.path(),
        specs.path(),
        &["--output", "json", "plan", "--detailed-exitcode"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    let json: Value = serde_json::from_slice(&out.stdout).expect("plan JSON");
    assert_eq!(json["format_version"], "2.1");
    assert_eq!(
        (
            json["has_changes"].clone(),
            json["has_pending_changes"].clone()
        ),
        (json!(false), json!(true))
    );
    assert_eq!(json["summary"]["deferred"], 1);
    assert_eq!(json["actions"][0]["action"], "scale");
    assert_eq!(json["actions"][0]["deferred"]["until"], "deploying");

    // A deferred change is never executed: apply makes no call that changes anything.
    cli_ok(
        &env,
        home.path(),
        specs.path(),
        &["apply", "--auto-approve"],
    )
    .await;
    assert_eq!(mutations(&env, since).await, Vec::<String>::new());
}
