//! Fuzz entry points: one function per `cargo fuzz` target in `fuzz/`, each feeding
//! arbitrary bytes to the code that reads that kind of untrusted input in production.
//!
//! Owns: the harness of every fuzz target ([`TARGETS`]), so the fuzz binaries
//! (`fuzz/fuzz_targets/*.rs`, one line each) and the stable regression test
//! (`tests/fuzz_regressions.rs`) run exactly the same code on the same bytes.
//! Must not: parse anything itself, or be used outside fuzzing and tests (hidden, no
//! stable API).
//!
//! Guarantees, for every input (each target checks them; a violation is a panic, so the
//! fuzzer reports it as a crash):
//! - no panic, stack overflow, or abort in the readers below; bad input is an `Err`;
//! - `spec_loader`: every error and warning names the file it came from and says what is
//!   wrong; every cluster the loader accepts renders (both OneFlow dialects, managed and
//!   hand-usable), so validation rejects whatever rendering would refuse;
//! - `vm_pool`: the pool/VM parser that skips unread sections yields exactly what a full
//!   parse yields (skipped sections cannot leak into the model);
//! - `oneflow`: a service listing read straight into the controller's reduced bodies
//!   (`ListedBody`) equals the full document parse reduced afterwards;
//! - `agent_context`: every skipped `one_env` line is reported as `file:line: …`, a
//!   rejected context carries at least one error, and an accepted one yields a CA
//!   certificate for its validity (or an error);
//! - `plan_file`: a rejected plan file is named in the error.
//!
//! Assumptions: libFuzzer bounds input size (`-max_len`) and time (`-timeout`); the size
//! caps of the production readers (e.g. 1 MiB spec files) are enforced by their callers'
//! reads and are not re-checked here.
//! Caveats: `onegate` validates CA certificates against the current time, so an input near
//! a certificate's expiry can behave differently later.

use std::path::Path;

use serde_json::Value;

use crate::agent::context::{parse_one_env, Config, Role};
use crate::agent::discovery;
use crate::api::load::load_text;
use crate::api::FlowerCluster;
use crate::cli::plan::PlanFile;
use crate::one::backend::{retain_listed_fields, ListedBody};
use crate::one::model::{parse_vm, parse_vm_pool, Vm};
use crate::one::{oneflow, onegate, xmlrpc};
use crate::plan::{render_json, render_text, DesiredState, LiveState, TextOptions};
use crate::render::{
    hand_usable, render, NetworkBinding, OneFlowDialect, Purpose, RenderOptions, RoleTemplateIds,
};

/// A fuzz target: its name (the `fuzz/fuzz_targets/<name>.rs` binary, the
/// `fuzz/corpus/<name>` seeds and the `fuzz/regressions/<name>` crashes) and its harness.
pub type Target = (&'static str, fn(&[u8]));

/// Every fuzz target.
pub const TARGETS: &[Target] = &[
    ("spec_loader", spec_loader),
    ("xmlrpc_response", xmlrpc_response),
    ("vm_pool", vm_pool),
    ("oneflow", oneflow),
    ("onegate", onegate),
    ("agent_context", agent_context),
    ("plan_file", plan_file),
];

/// Bytes of a spec file → clusters or located errors (`api::load`, as `validate`, `plan`
/// and the controller's sources read them), then rendering of every accepted cluster.
pub fn spec_loader(data: &[u8]) {
    // The loader reads files as UTF-8 and rejects anything else before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz/spec.yaml");
    let out = load_text(file, text);
    for e in out.errors.iter().chain(&out.warnings) {
        assert_eq!(e.file, file, "an error names another file: {e:?}");
        assert!(!e.message.is_empty(), "an error without a message: {e:?}");
        let _ = e.render();
    }
    for l in &out.loaded {
        render_all(&l.cluster);
    }
}

fn render_all(cluster: &FlowerCluster) {
    for dialect in [OneFlowDialect::V6, OneFlowDialect::V7] {
        let opts = RenderOptions {
            dialect,
            purpose: Purpose::Managed {
                controller_id: "fuzz".into(),
                signing_key: None,
            },
            template_ids: RoleTemplateIds {
                superlink: 1,
                supernode: 2,
            },
            network: NetworkBinding::Id(0),
            extra_context: Default::default(),
        };
        if let Err(e) = render(cluster, &opts) {
            panic!("a loaded spec does not render ({dialect:?}): {e}");
        }
    }
    if let Err(e) = hand_usable(cluster) {
        panic!("a loaded spec does not render hand-usable: {e}");
    }
    let _ = crate::plan::spec_fields(cluster);
}

/// An oned answer → `methodResponse` value → OpenNebula result array (`one::xmlrpc`).
pub fn xmlrpc_response(data: &[u8]) {
    // The client turns non-UTF-8 bodies into a decode error before this point.
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    match xmlrpc::decode_response(body) {
        Ok(xmlrpc::Response::Value(v)) => {
            let _ = xmlrpc::one_result(v);
        }
        Ok(xmlrpc::Response::Fault { .. }) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// A `<VM_POOL>` or `<VM>` document → VMs (`one::model::vm`), checked against a full parse.
pub fn vm_pool(data: &[u8]) {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    use crate::one::model::template::{parse_one, parse_pool};
    use crate::one::model::vm::vm_from_tree;
    use crate::one::xml::EVERYTHING;
    if let Ok(vms) = parse_vm_pool(body) {
        if let Ok(full) = parse_pool(body, "VM_POOL", "VM", EVERYTHING, vm_from_tree) {
            assert_eq!(vms, full, "skipping sections changed the pool's model");
        }
        vms.iter().for_each(read_vm);
    }
    if let Ok(vm) = parse_vm(body) {
        if let Ok(full) = parse_one(body, "VM", EVERYTHING, vm_from_tree) {
            assert_eq!(vm, full, "skipping sections changed the VM's model");
        }
        read_vm(&vm);
    }
}

fn read_vm(vm: &Vm) {
    let _ = (vm.service_id(), vm.role_name(), vm.is_ready());
    let _ = (vm.is_running(), vm.first_ip());
}

/// A OneFlow response body → documents, services, roles (`one::oneflow`), as a single
/// document, as a pool, as the controller's streamed listing, and as an error body.
pub fn oneflow(data: &[u8]) {
    let _ = oneflow::status_error("GET /service", 500, data).to_string();
    let listed = oneflow::decode_listing::<ListedBody>(data);
    let Ok(v) = oneflow::decode_body(data) else {
        return;
    };
    if let Ok(doc) = oneflow::parse_document_answer(v.clone()) {
        read_service(&oneflow::Service(doc));
    }
    let Ok(docs) = oneflow::parse_pool_answer(v) else {
        return;
    };
    for d in &docs {
        read_service(&oneflow::Service(d.clone()));
    }
    if let Ok(listed) = listed {
        assert_eq!(
            listed.len(),
            docs.len(),
            "a listing lost or gained documents"
        );
        for (l, d) in listed.iter().zip(docs) {
            assert_eq!(
                (l.id, &l.name, l.uid, l.gid),
                (d.id, &d.name, d.uid, d.gid),
                "listing ids, names or owners differ"
            );
            let mut reduced = d.body;
            retain_listed_fields(&mut reduced);
            assert_eq!(l.body.0, reduced, "streamed listing body differs");
        }
    }
}

fn read_service(s: &oneflow::Service) {
    let _ = (s.state(), s.name(), s.0.body_name());
    if let Ok(roles) = s.roles() {
        for r in roles {
            let _ = s.role(&r.name);
        }
    }
}

/// A OneGate response body → the calling VM or the service (`one::onegate`), then what
/// the agent derives from them (`agent::discovery`).
pub fn onegate(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if let Ok(vm) = onegate::parse_vm_document(&v) {
        let _ = (vm.service_id(), vm.role_name(), vm.first_ip());
        let _ = vm.endpoint_attr(crate::protocol::FL_ENDPOINT);
        let _ = discovery::read_superlink(&vm, true);
        let _ = discovery::read_superlink(&vm, false);
    }
    if let Ok(service) = onegate::parse_service_document(&v) {
        let _ = discovery::superlink_vm_id(&service);
        for role in [Role::Superlink, Role::Supernode] {
            let ids: Vec<u64> = service
                .role(role.as_str())
                .map(|r| r.nodes.iter().map(|n| n.deploy_id).collect())
                .unwrap_or_default();
            for id in ids.into_iter().chain([0, u64::MAX]) {
                let _ = discovery::partition_of(&service, role, id);
            }
        }
    }
}

/// A `one_env` context file → variables → the agent's validated config (`agent::context`).
pub fn agent_context(data: &[u8]) {
    // `Context::load` reads the file as UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = "fuzz/one_env";
    let (ctx, warnings) = parse_one_env(text, origin);
    for w in &warnings {
        assert!(
            w.starts_with("fuzz/one_env:"),
            "a warning without its place: {w}"
        );
    }
    match Config::from_context(&ctx) {
        Ok(cfg) => {
            let _ = (cfg.vm_addr(), cfg.local_addr());
            for role in [Role::Superlink, Role::Supernode] {
                let _ = crate::agent::flower::image(&cfg, role);
            }
            // What `configure` does with the validity (auto TLS): one CA key per input.
            let _ = crate::agent::tls::generate_ca(chrono::Utc::now(), cfg.cert_validity);
        }
        Err(e) => {
            assert!(!e.0.is_empty(), "a context rejected without a reason");
            let _ = e.to_string();
        }
    }
}

/// A saved plan (`flower-reconcile apply plan.json`) → `PlanFile`, then what `apply`
/// does with it before executing: the staleness check and the text rendering.
pub fn plan_file(data: &[u8]) {
    // `PlanFile::read` reads the file as UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz/plan.json");
    match PlanFile::parse(text, path) {
        Ok(f) => {
            let _ = f.staleness("fuzz", &DesiredState::default(), &LiveState::default());
            let _ = render_text(&f.plan, TextOptions { color: false });
            let _ = render_text(&f.plan, TextOptions { color: true });
            let _ = serde_json::to_string(&render_json(&f.plan));
            let _ = f.plan.summary();
            for a in &f.plan.actions {
                let _ = (a.one_line(), a.kind.is_destructive(), a.kind.category());
            }
        }
        Err(e) => {
            let shown = format!("{e:#}");
            assert!(shown.contains("fuzz/plan.json"), "unnamed file: {shown}");
        }
    }
}
