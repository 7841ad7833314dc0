//! `plan --config`: each configured site's parts are planned after the home site's, as
//! `run` derives them (docs/multi-site.md); a part waiting for the home SuperLink is shown
//! held, and a site that cannot be observed is reported and left as it is (onesim only).

mod common;

use common::onesim_env::{admin_oned, fixtures, reconcile_command, start_onesim};

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
    // reconcile_command writes the auth file site B's table names as well.
    let plan = |extra: Option<&str>| {
        let mut cmd = reconcile_command(&site_a, PASSWORD, home.path());
        let config = home.path().join("controller.toml");
        std::fs::write(
            &config,
            format!(
                "[sites.b]\nxmlrpc = \"{}\"\noneflow = \"{}\"\nauth-file = \"{}\"\n{}",
                site_b.urls().xmlrpc,
                site_b.urls().oneflow,
                home.path().join("one_auth").display(),
                extra.unwrap_or_default()
            ),
        )
        .expect("config");
        cmd.arg("plan")
            .arg("--specs")
            .arg(&specs)
            .arg("--config")
            .arg(&config);
        cmd
    };
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
