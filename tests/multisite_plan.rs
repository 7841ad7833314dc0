//! `plan --config` and `apply --config`: each configured site's parts are planned (and
//! applied) after the home site's, as `run` derives them (docs/multi-site.md); a part
//! waiting for the home SuperLink is shown held, and a site that cannot be observed is
//! reported and left as it is (onesim only).

mod common;

use common::onesim_env::{admin_oned, fixtures, reconcile_command, start_onesim, SimAgents};

const PASSWORD: &str = "multisite-plan-pass";

fn spec() -> String {
    format!(
        "apiVersion: {}\nkind: FlowerCluster\nmetadata:\n  name: twosites\nspec:\n  \
         opennebula:\n    templates:\n      superlink: flower-superlink\n      supernode: flower-supernode\n    \
         network: private\n  tls:\n    enabled: false\n  supernodes:\n    count: 1\n    sites:\n    \
         - site: b\n      templates:\n        supernode: flower-supernode\n      network: private\n",
        flower_reconcile::api::API_VERSION
    )
}

/// `flower-reconcile <verb> --specs <home>/specs --config <home>/controller.toml` against
/// site A, the config naming site B (and `extra` tables).
fn with_sites(
    site_a: &onesim::Handle,
    site_b: &onesim::Handle,
    home: &std::path::Path,
    verb: &str,
    extra: Option<&str>,
) -> tokio::process::Command {
    // reconcile_command writes the auth file site B's table names as well.
    let mut cmd = reconcile_command(site_a, PASSWORD, home);
    let config = home.join("controller.toml");
    std::fs::write(
        &config,
        format!(
            "[sites.b]\nxmlrpc = \"{}\"\noneflow = \"{}\"\nauth-file = \"{}\"\n{}",
            site_b.urls().xmlrpc,
            site_b.urls().oneflow,
            home.join("one_auth").display(),
            extra.unwrap_or_default()
        ),
    )
    .expect("config");
    cmd.arg(verb)
        .arg("--specs")
        .arg(home.join("specs"))
        .arg("--config")
        .arg(&config);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_with_the_config_shows_each_sites_parts_and_holds_an_unreachable_site() {
    let (site_a, _) = start_onesim(PASSWORD, |_| {}).await;
    let (site_b, _) = start_onesim(PASSWORD, |_| {}).await;
    for sim in [&site_a, &site_b] {
        fixtures(&admin_oned(sim, PASSWORD)).await;
    }
    let home = tempfile::tempdir().expect("home");
    let specs = home.path().join("specs");
    std::fs::create_dir_all(&specs).expect("specs");
    std::fs::write(specs.join("twosites.yaml"), spec()).expect("spec");
    let plan = |extra: Option<&str>| with_sites(&site_a, &site_b, home.path(), "plan", extra);
    let out = plan(None).output().await.expect("plan runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (home_part, sites) = stdout.split_once("Site b:").expect("a section for site b");
    assert!(home_part.contains("twosites"), "{stdout}");
    assert!(
        sites.contains("held: twosites--b: waiting for the home cluster's service"),
        "{stdout}"
    );

    // Site B refuses every call: reported, nothing planned there, the command still works.
    for target in ["one.*", "oneflow *"] {
        common::onesim_env::control(
            &site_b,
            reqwest::Method::POST,
            "/faults",
            Some(serde_json::json!({"target": target, "kind": "error", "message": "site B down"})),
        )
        .await;
    }
    let out = plan(None).output().await.expect("plan runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("cannot be observed") && stdout.contains("left as they are"),
        "{stdout}"
    );
    // A bad site table is an error naming it.
    let out = plan(Some(
        "[sites.Bad]\nxmlrpc = \"x\"\noneflow = \"y\"\nauth-file = \"z\"\n",
    ))
    .output()
    .await
    .expect("plan runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("sites.Bad"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_with_the_config_creates_the_part_once_the_home_superlink_serves() {
    let (site_a, _) = start_onesim(PASSWORD, |_| {}).await;
    let (site_b, _) = start_onesim(PASSWORD, |_| {}).await;
    for sim in [&site_a, &site_b] {
        fixtures(&admin_oned(sim, PASSWORD)).await;
    }
    // Site A's agents publish readiness (FL_READY, FL_ENDPOINT), as real ones do.
    let agents = SimAgents::new(site_a.sim.clone(), &site_a.urls().onegate)
        .spawn(std::time::Duration::from_millis(200));
    let home = tempfile::tempdir().expect("home");
    std::fs::create_dir_all(home.path().join("specs")).expect("specs");
    std::fs::write(home.path().join("specs/twosites.yaml"), spec()).expect("spec");
    let apply = || async {
        let out = with_sites(&site_a, &site_b, home.path(), "apply", None)
            .arg("--auto-approve")
            .output()
            .await
            .expect("apply runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stdout}\n{stderr}");
        format!("{stdout}\n{stderr}")
    };
    let parts = || {
        site_b.sim.with(|st| {
            st.vms
                .values()
                .filter(|v| v.is_running() && v.name.contains("supernode"))
                .count()
        })
    };
    // First pass: the home cluster is created; its part waits for its SuperLink to serve.
    let first = apply().await;
    assert!(first.contains("held: twosites--b: waiting"), "{first}");
    assert_eq!(parts(), 0, "nothing in site B yet");
    let t = std::time::Instant::now();
    while !site_a.sim.with(|st| {
        st.vms
            .values()
            .any(|v| v.user_template.get("FL_ENDPOINT").is_some())
    }) {
        assert!(
            t.elapsed().as_secs() < 60,
            "site A's SuperLink never served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Second pass: the part is created in site B, through site B's OneFlow.
    let second = apply().await;
    assert!(second.contains("twosites--b: "), "{second}");
    let t = std::time::Instant::now();
    while parts() != 1 {
        assert!(
            t.elapsed().as_secs() < 60,
            "no SuperNode in site B:\n{second}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        !site_b
            .sim
            .with(|st| st.vms.values().any(|v| v.name.contains("superlink"))),
        "no SuperLink in site B"
    );
    // `status --direct --config` shows the part under its cluster, in site b.
    let out = reconcile_command(&site_a, PASSWORD, home.path())
        .args(["status", "--direct", "--specs"])
        .arg(home.path().join("specs"))
        .arg("--config")
        .arg(home.path().join("controller.toml"))
        .output()
        .await
        .expect("status runs");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{status}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        status
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["b", "twosites--b"])),
        "{status}"
    );
    // Third pass: nothing more to do in site B (the part is not made twice).
    let third = apply().await;
    let (_, site) = third.split_once("Site b:").expect("site b section");
    assert!(site.contains("No changes."), "{third}");
    assert_eq!(parts(), 1);
    agents.abort();
}
