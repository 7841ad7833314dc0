//! Golden tests of the renderer in both dialects (`UPDATE_GOLDEN=1` rewrites them), and
//! OneFlow's own template rules on every example.

mod oneflow_rules;

use std::path::PathBuf;

use flower_reconcile::api::load_paths;
use flower_reconcile::render::{
    redact_service_template, render, NetworkBinding, OneFlowDialect, Purpose, RenderOptions,
    RoleTemplateIds,
};
use oneflow_rules::{check_service_template, Dialect};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn options(dialect: OneFlowDialect) -> RenderOptions {
    RenderOptions {
        dialect,
        purpose: Purpose::Managed {
            controller_id: "golden".into(),
            signing_key: None,
        },
        template_ids: RoleTemplateIds {
            superlink: 3,
            supernode: 4,
        },
        network: NetworkBinding::Id(0),
        extra_context: Default::default(),
    }
}

#[test]
fn rendered_examples_match_the_golden_files_in_both_dialects() {
    let report = load_paths(&[root().join("manifests/examples")]);
    assert!(report.is_valid(), "{:?}", report.errors);
    let mut checked = 0;
    for loaded in &report.clusters {
        let stem = loaded
            .source
            .file
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for (dialect, tag, rules) in [
            (OneFlowDialect::V6, "v6", Dialect::V6),
            (OneFlowDialect::V7, "v7", Dialect::V7),
        ] {
            let r = render(&loaded.cluster, &options(dialect)).unwrap();
            check_service_template(&r.service_template, rules)
                .unwrap_or_else(|e| panic!("{stem} {tag}: {e}"));
            // Goldens never hold key material, even the example's throwaway key.
            let shown = serde_json::json!({
                "serviceTemplate": redact_service_template(&r.service_template),
                "superlinkContext": flower_reconcile::render::redact_context(&r.superlink_context),
                "supernodeContext": r.supernode_context,
            });
            let text = format!("{}\n", serde_json::to_string_pretty(&shown).unwrap());
            let path = root().join(format!("tests/golden/{stem}.{tag}.json"));
            if std::env::var_os("UPDATE_GOLDEN").is_some() {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &text).unwrap();
            } else {
                let want = std::fs::read_to_string(&path).unwrap_or_default();
                assert!(
                    want == text,
                    "{} differs from the renderer (UPDATE_GOLDEN=1 cargo test to accept)",
                    path.display()
                );
            }
            assert!(!text.contains("PRIVATE KEY"));
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
}

#[test]
fn the_rules_helper_rejects_what_oneflow_rejects() {
    let good = serde_json::json!({"name": "s", "roles": [
        {"name": "a", "type": "vm", "template_id": 1, "cardinality": 1},
        {"name": "b", "type": "vm", "template_id": "2", "cardinality": 2, "parents": ["a"],
         "min_vms": 1, "max_vms": 3, "elasticity_policies": [{"type": "CHANGE", "adjust": 1, "expression": "X > 1"}]}]});
    check_service_template(&good, Dialect::V7).unwrap();
    let mutate = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        check_service_template(&v, Dialect::V7)
    };
    assert!(mutate(&|v| {
        v.as_object_mut().unwrap().remove("name");
    })
    .is_err());
    assert!(mutate(&|v| v["roles"][1]["parents"] = serde_json::json!(["zzz"])).is_err());
    assert!(mutate(&|v| v["roles"][1]["cardinality"] = serde_json::json!(9)).is_err());
    assert!(mutate(&|v| v["roles"][1]["name"] = serde_json::json!("a")).is_err());
    assert!(mutate(&|v| v["roles"][0]["name"] = serde_json::json!("a-b")).is_err());
    assert!(mutate(&|v| {
        v["roles"][1].as_object_mut().unwrap().remove("min_vms");
    })
    .is_err());
    assert!(mutate(
        &|v| v["roles"][1]["elasticity_policies"][0]["expression"] = serde_json::json!("")
    )
    .is_err());
    assert!(mutate(&|v| v["ready_status_gate"] = serde_json::json!("true")).is_err());
    assert!(mutate(&|v| {
        v["roles"][0].as_object_mut().unwrap().remove("template_id");
    })
    .is_err());
    assert!(check_service_template(&good, Dialect::V6).is_err());
    assert!(oneflow_rules::parse_template_text("A = \"x\"\nB = [ C = \"y\", D = \"z\" ]").is_ok());
    assert!(oneflow_rules::parse_template_text("A = \"x\"y\"").is_err());
    assert!(oneflow_rules::parse_template_text("A = x").is_err());
}
