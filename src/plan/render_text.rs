//! Plan output: Terraform-like text and the stable JSON schema (docs/plan-json.md).
//!
//! Secrets never appear: sensitive fields print as `(sensitive value)` in both forms.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::{Action, ActionKind, Deferral, FieldChange, Plan, PlanWarning, RedeployStep, Summary};

/// Version of the JSON schema; minor versions only add fields.
pub const FORMAT_VERSION: &str = "2.1";

const SENSITIVE: &str = "(sensitive value)";

/// Text rendering options.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextOptions {
    /// ANSI colours (only when stdout is a terminal).
    pub color: bool,
}

/// Terraform-like text.
pub fn render_text(plan: &Plan, opts: TextOptions) -> String {
    let paint = |code: &str, s: &str| {
        if opts.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    };
    let mut out = String::new();
    for w in &plan.warnings {
        let _ = writeln!(
            out,
            "{} {}: {}",
            paint("33", "Warning:"),
            w.cluster,
            w.message
        );
    }
    for n in &plan.notes {
        let _ = writeln!(out, "{} {}: {}", paint("36", "Note:"), n.cluster, n.message);
    }
    if !plan.warnings.is_empty() || !plan.notes.is_empty() {
        out.push('\n');
    }
    // "No changes" only when desired and live agree; deferred changes are pending.
    let summary = plan.summary();
    if !plan.has_pending_changes() {
        out.push_str("No changes. OpenNebula matches the specs.\n");
    } else if !plan.has_changes() {
        let _ = writeln!(
            out,
            "OpenNebula does not match the specs yet: {} deferred change(s), made once \
             what they wait for is over:\n",
            summary.deferred
        );
    } else {
        out.push_str("flower-reconcile will perform the following actions:\n\n");
    }
    for a in &plan.actions {
        let colour = match a.kind.symbol() {
            "+" => "32",
            "~" => "33",
            "-" => "31",
            "-/+" => "35",
            _ => "2",
        };
        let _ = writeln!(out, "  # {} {}", a.cluster, describe(&a.kind));
        let _ = writeln!(out, "  #   ({})", a.reason);
        let deferred = a
            .deferred
            .as_ref()
            .map_or(String::new(), |d| format!(" (deferred: {})", d.reason));
        let _ = writeln!(
            out,
            "  {} {}{}{deferred}",
            paint(colour, a.kind.symbol()),
            a.kind.verb(),
            brief(&a.kind)
        );
        if let Some(b) = a.kind.body() {
            let _ = writeln!(
                out,
                "      body {} (VM templates {}, {}; network {})",
                b.digest, b.ids.superlink_template, b.ids.supernode_template, b.ids.network
            );
        }
        for c in &a.diff {
            let _ = writeln!(out, "      {}", field_line(c));
        }
        out.push('\n');
    }
    let _ = writeln!(out, "{summary}");
    out
}

/// The parameters that fit on the symbol line: `scale supernode 2 → 3`.
fn brief(kind: &ActionKind) -> String {
    match kind {
        ActionKind::Scale { role, from, to, .. } => {
            format!(" {} {from} → {to}", role.oneflow_name())
        }
        _ => String::new(),
    }
}

fn describe(kind: &ActionKind) -> String {
    match kind {
        ActionKind::Create { .. } => "will be created".into(),
        ActionKind::UpdateTemplate { service_id, .. } => {
            format!("service {service_id} will be updated in place")
        }
        ActionKind::Scale {
            service_id,
            role,
            from,
            to,
        } => format!(
            "service {service_id}: role {} will be scaled {from} → {to}",
            role.oneflow_name()
        ),
        ActionKind::Redeploy(RedeployStep::Instantiate { old_service_id, .. }) => {
            format!("service {old_service_id} must be replaced")
        }
        ActionKind::Redeploy(RedeployStep::AbandonUnready { service_id }) => {
            format!("service {service_id} (an unready replacement) will be undeployed")
        }
        ActionKind::Redeploy(RedeployStep::UndeployOld {
            old_service_id,
            new_service_id,
        }) => format!(
            "service {old_service_id} will be undeployed (replaced by service {new_service_id})"
        ),
        ActionKind::RotateCertificate {
            service_id,
            vm_id,
            generation,
            validity,
        } => format!(
            "service {service_id}: SuperLink VM {vm_id} will rotate its certificate (generation {generation}{})",
            validity.map_or(String::new(), |v| format!(", valid {v}"))
        ),
        ActionKind::SetSiteNodeKeys {
            service_id,
            vm_id,
            fingerprints,
        } => format!(
            "service {service_id}: SuperLink VM {vm_id} will accept {} SuperNode key(s) of other sites",
            fingerprints.len()
        ),
        ActionKind::ReplaceNode {
            service_id, vm_id, ..
        } => format!("service {service_id}: SuperNode VM {vm_id} will be replaced"),
        ActionKind::Delete { service_id } => format!("service {service_id} will be destroyed"),
        ActionKind::Wait { .. } => "waits".into(),
    }
}

fn shown(v: &Option<String>, sensitive: bool) -> String {
    match v {
        None => "(none)".into(),
        Some(_) if sensitive => SENSITIVE.into(),
        Some(v) => format!("{v:?}"),
    }
}

fn field_line(c: &FieldChange) -> String {
    let suffix = if c.forces_replacement {
        " # forces replacement"
    } else {
        ""
    };
    match (&c.before, &c.after) {
        (None, Some(_)) => format!("+ {} = {}{suffix}", c.path, shown(&c.after, c.sensitive)),
        (Some(_), None) => format!("- {} = {}{suffix}", c.path, shown(&c.before, c.sensitive)),
        _ => format!(
            "~ {} = {} -> {}{suffix}",
            c.path,
            shown(&c.before, c.sensitive),
            shown(&c.after, c.sensitive)
        ),
    }
}

/// The JSON document (`--output json`), schema in docs/plan-json.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanJson {
    /// [`FORMAT_VERSION`].
    pub format_version: String,
    /// Digest of the observation the plan was computed from.
    pub observation_digest: String,
    /// Whether applying now would change anything (deferred actions do not).
    pub has_changes: bool,
    /// Whether desired and live differ: changes now or deferred (since 1.2).
    #[serde(default)]
    pub has_pending_changes: bool,
    /// Counts per category.
    pub summary: Summary,
    /// Actions in execution order; sensitive values replaced.
    pub actions: Vec<JsonAction>,
    /// Warnings.
    pub warnings: Vec<PlanWarning>,
}

/// One action in the JSON form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonAction {
    /// Cluster.
    pub cluster: String,
    /// `create`, `update_template`, `scale`, `redeploy`, `redeploy_undeploy_old`,
    /// `rotate_certificate`, `replace_node`, `delete` or `wait`.
    pub action: String,
    /// `+`, `~`, `-/+`, `-` or `…`.
    pub symbol: String,
    /// Why.
    pub reason: String,
    /// The typed action with its parameters.
    pub detail: ActionKind,
    /// Field changes.
    pub changes: Vec<FieldChange>,
    /// Set when the change is due but must wait; never executed (since 1.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred: Option<Deferral>,
}

impl From<&Action> for JsonAction {
    fn from(a: &Action) -> Self {
        Self {
            cluster: a.cluster.clone(),
            action: a.kind.verb().into(),
            symbol: a.kind.symbol().into(),
            reason: a.reason.clone(),
            detail: a.kind.clone(),
            changes: a
                .diff
                .iter()
                .map(|c| FieldChange {
                    before: c.before.as_ref().map(|v| {
                        if c.sensitive {
                            SENSITIVE.into()
                        } else {
                            v.clone()
                        }
                    }),
                    after: c.after.as_ref().map(|v| {
                        if c.sensitive {
                            SENSITIVE.into()
                        } else {
                            v.clone()
                        }
                    }),
                    ..c.clone()
                })
                .collect(),
            deferred: a.deferred.clone(),
        }
    }
}

/// The JSON form of a plan.
pub fn render_json(plan: &Plan) -> PlanJson {
    PlanJson {
        format_version: FORMAT_VERSION.into(),
        observation_digest: plan.observation_digest.clone(),
        has_changes: plan.has_changes(),
        has_pending_changes: plan.has_pending_changes(),
        summary: plan.summary(),
        actions: plan.actions.iter().map(JsonAction::from).collect(),
        warnings: plan.warnings.clone(),
    }
}
