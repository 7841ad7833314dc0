//! `flower-reconcile render PATH`

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;

use super::{fail, print_json, Global, OutputFormat};
use crate::api::{load_paths, FlowerCluster, Loaded, ObjectRef};
use crate::render::{
    hand_usable_json, hand_usable_yaml, redact_context, redact_service_template, render,
    NetworkBinding, OneFlowDialect, Purpose, RenderOptions, RoleTemplateIds,
};

/// Arguments of `render`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "VM templates and networks named in the spec are resolved by the controller
(one.templatepool.info / one.vnpool.info). Offline, give their ids with --template-id and
--network-id, or use --hand-usable for the importable template (0 placeholders and a
`Private` network input). Secret context values are shown as <redacted> unless
--show-secrets is given.

Examples:
  flower-reconcile render manifests/examples/elastic.yaml
  flower-reconcile render manifests/examples/basic.yaml --one-version 6 \\
      --template-id superlink=3 --template-id supernode=4 --network-id 0
  flower-reconcile render manifests/examples/basic.yaml --hand-usable > oneflow/flower-cluster.json
  flower-reconcile render manifests/examples/basic.yaml --hand-usable --yaml > oneflow/flower-cluster.yaml"
)]
pub struct Args {
    /// A spec file holding one cluster (or pick one with --name).
    pub path: PathBuf,
    /// Which cluster of the file to render.
    #[arg(long)]
    pub name: Option<String>,
    /// OpenNebula major version: 6 (vm_template dialect) or 7 (template_id dialect).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(6..=7))]
    pub one_version: u32,
    /// VM template id of a role, `superlink=N` or `supernode=N` (repeatable).
    #[arg(long, value_name = "ROLE=ID", value_parser = parse_role_id)]
    pub template_id: Vec<(String, u32)>,
    /// Virtual network id.
    #[arg(long)]
    pub network_id: Option<u32>,
    /// Controller id written into the ownership marker.
    #[arg(long, default_value = "flower-reconcile")]
    pub controller_id: String,
    /// Render the hand-usable template (no ownership marker, 7.x, network input).
    #[arg(long)]
    pub hand_usable: bool,
    /// With --hand-usable: the commented YAML twin instead of JSON.
    #[arg(long, requires = "hand_usable")]
    pub yaml: bool,
    /// Print secret context values (the provided TLS key) instead of <redacted>.
    #[arg(long)]
    pub show_secrets: bool,
}

fn parse_role_id(s: &str) -> Result<(String, u32), String> {
    let (role, id) = s
        .split_once('=')
        .ok_or("expected ROLE=ID, e.g. superlink=3")?;
    if role != "superlink" && role != "supernode" {
        return Err(format!("unknown role `{role}`: use superlink or supernode"));
    }
    let id = id
        .parse()
        .map_err(|_| format!("`{id}` is not a numeric id"))?;
    Ok((role.to_string(), id))
}

fn pick(loaded: Vec<Loaded>, name: Option<&str>) -> Result<Loaded, String> {
    let names: Vec<String> = loaded
        .iter()
        .map(|l| l.cluster.metadata.name.clone())
        .collect();
    match name {
        Some(n) => loaded
            .into_iter()
            .find(|l| l.cluster.metadata.name == n)
            .ok_or_else(|| format!("no cluster `{n}` in the file (found: {})", names.join(", "))),
        None if loaded.len() == 1 => Ok(loaded.into_iter().next().expect("one cluster")),
        None => Err(format!(
            "the file holds {} clusters ({}); pick one with --name",
            names.len(),
            names.join(", ")
        )),
    }
}

fn template_ids(c: &FlowerCluster, flags: &[(String, u32)]) -> Result<RoleTemplateIds, String> {
    let t = &c.spec.opennebula.templates;
    let resolve = |role: &str, r: &ObjectRef| -> Result<u32, String> {
        if let Some((_, id)) = flags.iter().rev().find(|(name, _)| name == role) {
            return Ok(*id);
        }
        match r {
            ObjectRef::Id(id) => Ok(*id),
            ObjectRef::Name(n) => Err(format!(
                "spec.opennebula.templates.{role} names the template {n:?}; rendering offline needs its id: pass --template-id {role}=N (or --hand-usable)"
            )),
        }
    };
    Ok(RoleTemplateIds {
        superlink: resolve("superlink", &t.superlink)?,
        supernode: resolve("supernode", &t.supernode)?,
    })
}

/// Runs `render`.
pub fn run(g: &Global, args: Args) -> ExitCode {
    let report = load_paths(std::slice::from_ref(&args.path));
    if !report.is_valid() {
        for e in &report.errors {
            eprintln!("{e}");
        }
        return ExitCode::FAILURE;
    }
    let loaded = match pick(report.clusters, args.name.as_deref()) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let c = &loaded.cluster;
    if args.hand_usable {
        let text = if args.yaml {
            hand_usable_yaml(c)
        } else {
            hand_usable_json(c)
        };
        return match text {
            Ok(t) => {
                print!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    let ids = match template_ids(c, &args.template_id) {
        Ok(ids) => ids,
        Err(e) => return fail(e),
    };
    let network = match (args.network_id, &c.spec.opennebula.network) {
        (Some(id), _) | (None, &ObjectRef::Id(id)) => NetworkBinding::Id(id),
        (None, ObjectRef::Name(n)) => {
            return fail(format!(
                "spec.opennebula.network names the network {n:?}; rendering offline needs its id: pass --network-id N"
            ))
        }
    };
    let dialect = if args.one_version == 6 {
        OneFlowDialect::V6
    } else {
        OneFlowDialect::V7
    };
    let opts = RenderOptions {
        dialect,
        purpose: Purpose::Managed {
            controller_id: args.controller_id.clone(),
            signing_key: None,
        },
        template_ids: ids,
        network,
        extra_context: Default::default(),
    };
    let r = match render(c, &opts) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let (template, link, node) = if args.show_secrets {
        (r.service_template, r.superlink_context, r.supernode_context)
    } else {
        (
            redact_service_template(&r.service_template),
            redact_context(&r.superlink_context),
            redact_context(&r.supernode_context),
        )
    };
    match g.output {
        OutputFormat::Text => print_json(&template),
        OutputFormat::Json => print_json(&json!({
            "cluster": c.metadata.name,
            "specHash": loaded.spec_hash,
            "serviceTemplate": template,
            "superlinkContext": link,
            "supernodeContext": node,
        })),
    }
    ExitCode::SUCCESS
}
