//! The Sunstone-ready templates (`flower-reconcile templates`): checked-in copies match the
//! generator, the OneFlow templates pass the rules the rendered ones are tested with (both
//! dialects), the VM templates parse as oned parses them, and a VM instantiated in onesim
//! with the user inputs filled gets them in its CONTEXT, which the agent accepts.

mod common;
mod oneflow_rules;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::onesim_env::start_onesim;
use flower_reconcile::agent::context::{Config, Context, Framework, LogLevel};
use flower_reconcile::one::ClientsBackend;
use flower_reconcile::protocol::context as ctx;
use flower_reconcile::render::sunstone::{self, Kind, INPUTS};
use flower_reconcile::render::OneFlowDialect;
use oneflow_rules::{check_service_template, check_user_input, references, Dialect};
use onesim::image::{copy_image, I_READY};
use onesim::state::{Effect, State};
use onesim::template::{vec_get, Template};
use serde_json::{json, Map, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_checked_in_templates_do_not_drift() {
    let dir = root().join("manifests/templates");
    for (name, content) in sunstone::files().unwrap() {
        let path = dir.join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &content).unwrap();
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == content,
            "manifests/templates/{name} is out of date: run `flower-reconcile templates`"
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flower-reconcile"))
        .args(["templates", "--check", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn the_oneflow_templates_pass_oneflows_rules_in_their_dialect_only() {
    for (d, rules, other) in [
        (OneFlowDialect::V6, Dialect::V6, Dialect::V7),
        (OneFlowDialect::V7, Dialect::V7, Dialect::V6),
    ] {
        let t = sunstone::service_template(d).unwrap();
        check_service_template(&t, rules).unwrap_or_else(|e| panic!("{d:?}: {e}"));
        assert!(check_service_template(&t, other).is_err(), "{d:?}");
        // No ownership marker: a controller never adopts a service made from it.
        assert_eq!(
            flower_reconcile::render::ownership::Ownership::from_body(&t),
            None
        );
        // Service-level inputs reach both roles; role-level ones only their role.
        let key = if d == OneFlowDialect::V7 {
            "user_inputs"
        } else {
            "custom_attrs"
        };
        let service = t[key].as_object().unwrap();
        assert!(service.contains_key(ctx::TLS_ENABLED));
        assert!(t["roles"][1][key]
            .as_object()
            .unwrap()
            .contains_key(ctx::FRAMEWORK));
        assert!(!t["roles"][0][key]
            .as_object()
            .unwrap()
            .contains_key(ctx::FRAMEWORK));
    }
    // The rules catch what the generator must never write.
    let mut bad = sunstone::service_template(OneFlowDialect::V7).unwrap();
    bad["user_inputs"][ctx::LOG_LEVEL] = "O|list|Level|DEBUG,INFO|LOUD".into();
    assert!(check_service_template(&bad, Dialect::V7).is_err());
    let mut bad = sunstone::service_template(OneFlowDialect::V7).unwrap();
    bad["user_inputs"]
        .as_object_mut()
        .unwrap()
        .remove(ctx::TLS_ENABLED);
    let err = check_service_template(&bad, Dialect::V7).unwrap_err();
    assert!(err.contains(ctx::TLS_ENABLED), "{err}");
}

/// USER_INPUTS of a parsed VM template, in INPUTS_ORDER.
fn inputs(t: &Template) -> Vec<(String, String)> {
    let declared = t.get_vec("USER_INPUTS").unwrap().clone();
    t.get("INPUTS_ORDER")
        .unwrap()
        .split(',')
        .map(|k| {
            let spec = vec_get(&declared, k).unwrap_or_else(|| panic!("{k} not declared"));
            (k.to_string(), spec.to_string())
        })
        .collect()
}

#[test]
fn the_vm_templates_parse_and_map_every_input_into_context() {
    for text in sunstone::vm_templates().unwrap() {
        oneflow_rules::parse_template_text(&text).unwrap();
        let t = Template::parse(&text).unwrap();
        let order = inputs(&t);
        assert_eq!(order.len(), t.get_vec("USER_INPUTS").unwrap().len());
        let context = t.get_vec("CONTEXT").unwrap();
        for (k, spec) in &order {
            check_user_input(k, spec).unwrap();
            assert_eq!(vec_get(context, k), Some(format!("${k}").as_str()), "{k}");
        }
        for (k, v) in context {
            for r in references(v) {
                assert!(
                    r == "USER" || order.iter().any(|(n, _)| *n == r),
                    "CONTEXT {k} references ${r}"
                );
            }
        }
        for (k, v) in [
            ("TOKEN", "YES"),
            ("NETWORK", "YES"),
            ("REPORT_READY", "YES"),
            ("SSH_PUBLIC_KEY", "$USER[SSH_PUBLIC_KEY]"),
        ] {
            assert_eq!(vec_get(context, k), Some(v), "{k}");
        }
    }
}

/// Instantiates `text` in onesim, with the role's appliance image registered under the
/// README's name and `values` as the extra template (what Sunstone sends for the user
/// inputs), and returns the VM's CONTEXT.
fn instantiate(
    text: &str,
    role: &str,
    values: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let tmp = tempfile::tempdir().unwrap();
    let mut st = State::new("oneadmin", "pw");
    st.knobs.datastore_dir = tmp.path().join("ds");
    let disk = tmp.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1024 * 1024]).unwrap();
    let name = sunstone::image_name(role);
    st.alloc_image(
        &format!("NAME=\"{name}\"\nPATH=\"{}\"", disk.display()),
        1,
        0,
    )
    .unwrap();
    for e in std::mem::take(&mut st.effects) {
        if let Effect::CopyImage { id, from, to } = e {
            let r = copy_image(&from, &to);
            st.image_copied(id, r);
        }
    }
    let tid = st.alloc_template(text, 0).unwrap();
    let extra: String = values
        .iter()
        .map(|(k, v)| format!("{k} = \"{v}\"\n"))
        .collect();
    let id = st.instantiate(tid, "vm", false, &extra, 0).unwrap();
    let vm = &st.vms[&id].template;
    assert_eq!(vec_get(vm.get_vec("DISK").unwrap(), "IMAGE"), Some(name));
    vm.get_vec("CONTEXT").unwrap().iter().cloned().collect()
}

#[test]
fn a_vm_instantiated_with_the_inputs_filled_carries_them_and_the_agent_accepts_them() {
    let defaults = sunstone::defaults().unwrap();
    let [link, node] = sunstone::vm_templates().unwrap();
    // Sunstone sends every input: the defaults, with a few changed.
    let mut values: BTreeMap<String, String> = defaults
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    values.insert(ctx::FRAMEWORK.into(), "sklearn".into());
    values.insert(ctx::LOG_LEVEL.into(), "DEBUG".into());
    values.insert(ctx::SUPERLINK_ADDRESS.into(), "10.0.0.5:9092".into());
    values.insert(ctx::NODE_CONFIG.into(), "dataset=mnist".into());
    for (text, role) in [(&link, "superlink"), (&node, "supernode")] {
        let context = instantiate(text, role, &values);
        let t = Template::parse(text).unwrap();
        for (k, _) in inputs(&t) {
            assert_eq!(context.get(&k), values.get(&k), "{role}: {k}");
        }
        assert_eq!(context[ctx::ROLE], role);
        let cfg = Config::from_context(&Context::from_pairs(context.clone()))
            .unwrap_or_else(|e| panic!("{role}: {e}"));
        assert_eq!(cfg.log_level, LogLevel::Debug);
        if role == "supernode" {
            assert_eq!(cfg.framework, Framework::Sklearn);
            assert_eq!(cfg.superlink_address.unwrap().to_string(), "10.0.0.5:9092");
        }
    }
}

#[test]
fn every_default_and_option_is_accepted_by_the_agent() {
    let defaults = sunstone::defaults().unwrap();
    let all: Vec<(&str, &str)> = defaults.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Config::from_context(&Context::from_pairs(all.clone())).unwrap();
    for i in INPUTS {
        let options: Vec<&str> = match i.kind {
            Kind::List(o) => o.to_vec(),
            Kind::Boolean => vec!["YES", "NO"],
            _ => continue,
        };
        for o in options {
            let mut c = all.clone();
            c.retain(|(k, _)| *k != i.var);
            c.push((i.var, o));
            if i.var == ctx::TLS_MODE && o == "provided" {
                continue; // needs the three PEM inputs too (tested in agent::context)
            }
            if matches!(o, "Krum" | "Bulyan") {
                // Byzantine-robust strategies need more available clients (2f+3, 4f+3).
                c.retain(|(k, _)| *k != ctx::MIN_AVAILABLE_CLIENTS);
                c.push((ctx::MIN_AVAILABLE_CLIENTS, "3"));
            }
            Config::from_context(&Context::from_pairs(c))
                .unwrap_or_else(|e| panic!("{}={o}: {e}", i.var));
        }
    }
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed().as_secs() < 20,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Every input of `pick` at its default, with `over` applied: what Sunstone sends.
fn values(pick: impl Fn(sunstone::Roles) -> bool, over: &[(&str, &str)]) -> Map<String, Value> {
    let defaults = sunstone::defaults().unwrap();
    let mut m: Map<String, Value> = INPUTS
        .iter()
        .filter(|i| pick(i.roles))
        .map(|i| (i.var.to_string(), json!(defaults[i.var])))
        .collect();
    for (k, v) in over {
        m.insert((*k).to_string(), json!(v));
    }
    m
}

/// The whole path an appliance user takes, in both dialects: register the images, create
/// the two VM templates and the OneFlow template, instantiate it with the inputs filled;
/// every VM's CONTEXT then holds the service- and role-level values and the agent accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_instantiated_from_the_oneflow_template_gets_the_inputs_in_both_dialects() {
    use sunstone::Roles;
    for dialect in [OneFlowDialect::V6, OneFlowDialect::V7] {
        let (sim, one) = start_onesim("pw", |_| {}).await;
        let backend = ClientsBackend::new(&one).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("disk.raw");
        std::fs::write(&disk, vec![0u8; 1024 * 1024]).unwrap();
        let mut images = Vec::new();
        for role in ["superlink", "supernode"] {
            let name = sunstone::image_name(role);
            let t = format!("NAME=\"{name}\"\nPATH=\"{}\"", disk.display());
            images.push(backend.oned.image_allocate(&t, 1).await.unwrap());
        }
        wait_until("images READY", || {
            sim.sim
                .with(|st| images.iter().all(|i| st.images[i].state == I_READY))
        })
        .await;
        let vnet = backend
            .oned
            .vn_allocate(
                "NAME=\"private\"\nVN_MAD=\"bridge\"\nBRIDGE=\"br0\"\nAR=[TYPE=\"IP4\",IP=\"10.0.0.10\",SIZE=\"20\"]",
                -1,
            )
            .await
            .unwrap();
        let mut ids = Vec::new();
        for text in sunstone::vm_templates().unwrap() {
            ids.push(backend.oned.template_allocate(&text).await.unwrap());
        }
        let mut body = sunstone::service_template(dialect).unwrap();
        let (id_key, inputs_key) = match dialect {
            OneFlowDialect::V7 => ("template_id", "user_inputs_values"),
            OneFlowDialect::V6 => ("vm_template", "custom_attrs_values"),
        };
        for (i, id) in ids.iter().enumerate() {
            body["roles"][i][id_key] = json!(id);
        }
        let created = backend
            .oneflow
            .create_service_template(&body)
            .await
            .unwrap();
        let merge = json!({
            "name": "flower-1",
            inputs_key: values(|r| r == Roles::Both, &[(ctx::LOG_LEVEL, "DEBUG")]),
            "networks_values": [{"Private": {"id": vnet.to_string()}}],
            "roles": [
                {"name": "superlink", inputs_key: values(|r| r == Roles::SuperLink, &[(ctx::FLEET_PORT, "9192")])},
                {"name": "supernode", inputs_key: values(|r| r == Roles::SuperNode, &[(ctx::FRAMEWORK, "sklearn")])},
            ],
        });
        backend
            .oneflow
            .instantiate_service_template(created.id(), Some(&merge))
            .await
            .unwrap();
        wait_until("1 SuperLink and 2 SuperNodes", || {
            sim.sim.with(|st| st.vms.len() == 3)
        })
        .await;
        let nics: Vec<Option<String>> = sim.sim.with(|st| {
            st.vms
                .values()
                .map(|vm| {
                    let nic = vm.template.get_vec("NIC")?;
                    vec_get(nic, "NETWORK_ID").map(str::to_string)
                })
                .collect()
        });
        assert!(
            nics.iter()
                .all(|n| n.as_deref() == Some(vnet.to_string().as_str())),
            "{dialect:?}: {nics:?}"
        );
        let all: Vec<BTreeMap<String, String>> = sim.sim.with(|st| {
            st.vms
                .values()
                .map(|vm| {
                    vm.template
                        .get_vec("CONTEXT")
                        .unwrap()
                        .iter()
                        .cloned()
                        .collect()
                })
                .collect()
        });
        for c in &all {
            let role = c[ctx::ROLE].as_str();
            assert_eq!(c[ctx::LOG_LEVEL], "DEBUG", "{dialect:?} {role}");
            assert_eq!(c["TOKEN"], "YES");
            let cfg = Config::from_context(&Context::from_pairs(c.clone()))
                .unwrap_or_else(|e| panic!("{dialect:?} {role}: {e}"));
            match role {
                "superlink" => assert_eq!(cfg.fleet_port, 9192, "{dialect:?}"),
                "supernode" => assert_eq!(cfg.framework, Framework::Sklearn, "{dialect:?}"),
                other => panic!("role {other}"),
            }
        }
        let roles: Vec<&str> = all.iter().map(|c| c[ctx::ROLE].as_str()).collect();
        assert_eq!(
            roles.iter().filter(|r| **r == "supernode").count(),
            2,
            "{roles:?}"
        );
    }
}
