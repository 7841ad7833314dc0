//! The run config of a submission: the spec's `training` section as `flwr run --run-config`.
//!
//! Owns: which keys a `training` section yields (standard keys, strategy parameters,
//! checkpointing, then `runConfig` verbatim), keeping only those the app declares, and the
//! one-argument rendering Flower's parser reads back unchanged.
//! Must not: read files or run processes (the declared keys come from [`super::project`]).
//!
//! Guarantees:
//! - Keys and string values are checked with the shared codec ([`crate::protocol::config_kv`]);
//!   a value Flower would misread is an error naming `training.runConfig.<key>`
//!   (`run_config_rejects_what_flower_cannot_read`), and every value passed round-trips
//!   through Flower's splitter and TOML (`run_config_values_round_trip_through_toml`).

use std::collections::BTreeSet;

use indexmap::IndexMap;

use super::SubmitError;
use crate::api::{ConfigValue, StrategyName, TrainingSpec};
use crate::protocol::config_kv;

/// The run-config entries for a `training` section, in a stable order: the standard keys,
/// the parameters of the chosen strategy, checkpointing when on, then `runConfig` verbatim
/// (which overrides a standard key of the same name).
pub fn run_config_entries(training: &TrainingSpec) -> IndexMap<String, ConfigValue> {
    let mut out = IndexMap::new();
    let mut put = |k: &str, v: ConfigValue| {
        out.insert(k.to_string(), v);
    };
    let int = |v: u32| ConfigValue::Int(i64::from(v));
    let s = &training.strategy;
    put("num-server-rounds", int(training.num_rounds));
    put(
        "strategy",
        ConfigValue::String(strategy_name(s.name).to_string()),
    );
    put("min-fit-clients", int(training.min_fit_clients));
    // Flower ≥ 1.21 calls it min_train_nodes; apps may declare either name.
    put("min-train-nodes", int(training.min_fit_clients));
    put("min-evaluate-clients", int(training.min_evaluate_clients));
    put("min-available-clients", int(training.min_available_clients));
    let float = |k: &str, v: Option<f64>| v.map(|v| (k.to_string(), ConfigValue::Float(v)));
    let params = match s.name {
        StrategyName::FedAvg => vec![],
        StrategyName::FedProx => vec![float("proximal-mu", s.proximal_mu)],
        StrategyName::FedAdam => vec![
            float("server-lr", s.server_learning_rate),
            float("client-lr", s.client_learning_rate),
        ],
        StrategyName::Krum | StrategyName::Bulyan => vec![s
            .num_malicious_clients
            .map(|n| ("num-malicious".to_string(), int(n)))],
        StrategyName::FedTrimmedAvg => vec![float("trim-beta", s.trim_beta)],
    };
    for (k, v) in params.into_iter().flatten() {
        put(&k, v);
    }
    if let Some(f) = s.fraction_train {
        put("fraction-train", ConfigValue::Float(f));
    }
    if let Some(f) = s.fraction_evaluate {
        put("fraction-evaluate", ConfigValue::Float(f));
    }
    let cp = &training.checkpointing;
    if cp.enabled {
        put("checkpoint-enabled", ConfigValue::Bool(true));
        put("checkpoint-interval", int(cp.interval));
        put("checkpoint-path", ConfigValue::String(cp.path.clone()));
    }
    for (k, v) in &training.run_config {
        put(k, v.clone());
    }
    out
}

fn strategy_name(name: StrategyName) -> &'static str {
    match name {
        StrategyName::FedAvg => "FedAvg",
        StrategyName::FedProx => "FedProx",
        StrategyName::FedAdam => "FedAdam",
        StrategyName::Krum => "Krum",
        StrategyName::Bulyan => "Bulyan",
        StrategyName::FedTrimmedAvg => "FedTrimmedAvg",
    }
}

/// Keeps the entries whose key the app declares; returns (kept, dropped keys).
pub fn select_declared(
    entries: IndexMap<String, ConfigValue>,
    declared: &BTreeSet<String>,
) -> (IndexMap<String, ConfigValue>, Vec<String>) {
    let (kept, dropped): (IndexMap<_, _>, IndexMap<_, _>) =
        entries.into_iter().partition(|(k, _)| declared.contains(k));
    (kept, dropped.into_keys().collect())
}

/// One `--run-config` argument: space-separated `key=value` pairs with TOML values, in the
/// subset Flower's parser (`(\S+?)=('[^']*'|"[^"]*"|\S+)`) reads back unchanged.
pub fn render_run_config(entries: &IndexMap<String, ConfigValue>) -> Result<String, SubmitError> {
    let mut parts = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let bad = |reason: &str| SubmitError::RunConfig {
            key: key.clone(),
            reason: reason.to_string(),
        };
        if !config_kv::is_key(key) {
            return Err(bad(&format!("keys may only hold {}", config_kv::KEY_RULE)));
        }
        let v = match value {
            ConfigValue::Bool(b) => b.to_string(),
            ConfigValue::Int(i) => i.to_string(),
            ConfigValue::Float(f) if !f.is_finite() => {
                return Err(bad("NaN and infinity cannot be passed"))
            }
            // Debug keeps a decimal point or exponent, so TOML reads a float back.
            ConfigValue::Float(f) => format!("{f:?}"),
            ConfigValue::String(s) => config_kv::toml_string(s).map_err(bad)?,
        };
        parts.push(format!("{key}={v}"));
    }
    Ok(parts.join(" "))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use regex::Regex;

    use super::*;
    use crate::api::StrategySpec;
    use crate::submit::project::declared_config_keys;

    #[test]
    fn run_config_defaults_render_flower_parsable_pairs() {
        let rc = render_run_config(&run_config_entries(&TrainingSpec::default())).unwrap();
        assert_eq!(
            rc,
            "num-server-rounds=3 strategy=\"FedAvg\" min-fit-clients=2 min-train-nodes=2 \
             min-evaluate-clients=2 min-available-clients=2"
        );
    }

    #[test]
    fn run_config_carries_strategy_parameters_checkpoints_and_overrides() {
        let mut t = TrainingSpec {
            strategy: StrategySpec {
                name: StrategyName::FedAdam,
                server_learning_rate: Some(0.01),
                client_learning_rate: Some(1e-5),
                proximal_mu: Some(3.0), // not FedProx: left out
                fraction_evaluate: Some(0.5),
                ..StrategySpec::default()
            },
            num_rounds: 7,
            ..TrainingSpec::default()
        };
        t.checkpointing.enabled = true;
        t.run_config
            .insert("num-server-rounds".into(), ConfigValue::Int(9));
        t.run_config
            .insert("note".into(), ConfigValue::String("it's \"x\"".into()));
        let entries = run_config_entries(&t);
        assert_eq!(entries["num-server-rounds"], ConfigValue::Int(9));
        assert!(!entries.contains_key("proximal-mu"));
        let err = render_run_config(&entries).unwrap_err().to_string();
        assert!(err.starts_with("training.runConfig.note:"), "{err}");
        t.run_config
            .insert("note".into(), ConfigValue::String("say \"hi\"".into()));
        let rc = render_run_config(&run_config_entries(&t)).unwrap();
        assert!(
            rc.contains(" server-lr=0.01 client-lr=1e-5 fraction-evaluate=0.5 "),
            "{rc}"
        );
        assert!(rc.contains("checkpoint-enabled=true checkpoint-interval=5 checkpoint-path=\"/opt/flower/checkpoints\""), "{rc}");
        assert!(rc.starts_with("num-server-rounds=9 "), "{rc}");
        assert!(rc.ends_with(" note='say \"hi\"'"), "{rc}");
    }

    #[test]
    fn run_config_values_round_trip_through_toml() {
        let mut entries = IndexMap::new();
        entries.insert("a".to_string(), ConfigValue::Float(1.0));
        entries.insert("b".to_string(), ConfigValue::Float(-2.5e-7));
        entries.insert("c".to_string(), ConfigValue::String("x y\\z".into()));
        entries.insert("d.e".to_string(), ConfigValue::Bool(false));
        let rc = render_run_config(&entries).unwrap();
        // What Flower does: split on its regex, join as TOML lines, parse.
        let re = Regex::new(r#"(\S+?)=('[^']*'|"[^"]*"|\S+)"#).unwrap();
        let toml: String = re
            .captures_iter(&rc)
            .map(|c| format!("{} = {}\n", &c[1], &c[2]))
            .collect();
        let doc: toml_edit::DocumentMut = toml.parse().unwrap();
        assert_eq!(doc["a"].as_float(), Some(1.0));
        assert_eq!(doc["b"].as_float(), Some(-2.5e-7));
        assert_eq!(doc["c"].as_str(), Some("x y\\z"));
        assert_eq!(doc["d"]["e"].as_bool(), Some(false));
    }

    #[test]
    fn run_config_rejects_what_flower_cannot_read() {
        for (key, value) in [
            ("bad key", ConfigValue::Int(1)),
            ("a..b", ConfigValue::Int(1)),
            ("x", ConfigValue::Float(f64::NAN)),
            ("x", ConfigValue::String("two\nlines".into())),
        ] {
            let mut m = IndexMap::new();
            m.insert(key.to_string(), value);
            let err = render_run_config(&m).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("training.runConfig.{key}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn only_declared_keys_are_passed() {
        let toml = "[tool.flwr.app.config]\nnum-server-rounds = 3\nstrategy = \"FedAvg\"\n\
                    [tool.flwr.app.config.opt]\nlr = 0.1\n";
        let declared = declared_config_keys(toml, Path::new("p.toml")).unwrap();
        assert_eq!(
            declared.iter().map(String::as_str).collect::<Vec<_>>(),
            ["num-server-rounds", "opt.lr", "strategy"]
        );
        let (kept, dropped) =
            select_declared(run_config_entries(&TrainingSpec::default()), &declared);
        assert_eq!(
            kept.keys().collect::<Vec<_>>(),
            ["num-server-rounds", "strategy"]
        );
        assert!(dropped.contains(&"min-fit-clients".to_string()));
    }
}
