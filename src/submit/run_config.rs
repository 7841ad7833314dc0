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
use crate::api::{ConfigValue, TrainingSpec};
use crate::protocol::run_config;

/// The [`run_config::Training`] a `training` section describes (the codec and rules
/// shared with the SuperLink's published defaults).
pub fn training_of(training: &TrainingSpec) -> run_config::Training {
    let s = &training.strategy;
    let cp = &training.checkpointing;
    run_config::Training {
        num_rounds: training.num_rounds,
        strategy: s.name.as_str(),
        min_fit_clients: training.min_fit_clients,
        min_evaluate_clients: training.min_evaluate_clients,
        min_available_clients: training.min_available_clients,
        proximal_mu: s.proximal_mu,
        server_lr: s.server_learning_rate,
        client_lr: s.client_learning_rate,
        num_malicious: s.num_malicious_clients,
        trim_beta: s.trim_beta,
        fraction_train: s.fraction_train,
        fraction_evaluate: s.fraction_evaluate,
        checkpoint: cp.enabled.then(|| run_config::Checkpoint {
            interval: cp.interval,
            path: cp.path.clone(),
        }),
    }
}

/// The run-config entries for a `training` section, in a stable order: the standard keys,
/// the parameters of the chosen strategy, checkpointing when on, then `runConfig` verbatim
/// (which overrides a standard key of the same name).
pub fn run_config_entries(training: &TrainingSpec) -> IndexMap<String, ConfigValue> {
    let mut out: IndexMap<String, ConfigValue> = run_config::entries(&training_of(training))
        .into_iter()
        .map(|(k, v)| (k, from_value(v)))
        .collect();
    for (k, v) in &training.run_config {
        out.insert(k.clone(), v.clone());
    }
    out
}

/// A protocol run-config value as a spec value.
pub fn from_value(v: run_config::Value) -> ConfigValue {
    match v {
        run_config::Value::Bool(b) => ConfigValue::Bool(b),
        run_config::Value::Int(i) => ConfigValue::Int(i),
        run_config::Value::Float(f) => ConfigValue::Float(f),
        run_config::Value::Str(s) => ConfigValue::String(s),
    }
}

fn to_value(v: &ConfigValue) -> run_config::Value {
    match v {
        ConfigValue::Bool(b) => run_config::Value::Bool(*b),
        ConfigValue::Int(i) => run_config::Value::Int(*i),
        ConfigValue::Float(f) => run_config::Value::Float(*f),
        ConfigValue::String(s) => run_config::Value::Str(s.clone()),
    }
}

/// The entries a submission passes, by precedence: the cluster's published default run
/// configuration (`FL_RUN_CONFIG`, from the SuperLink's `ONEAPP_FL_*` training variables),
/// then the spec's `training` section (when a spec is given), then each `--run-config`
/// entry of the command line. Each key takes the value of the last source that sets it.
pub fn layered_entries(
    published: Option<&IndexMap<String, ConfigValue>>,
    training: Option<&TrainingSpec>,
    overrides: &IndexMap<String, ConfigValue>,
) -> IndexMap<String, ConfigValue> {
    let mut out = published.cloned().unwrap_or_default();
    if let Some(t) = training {
        out.extend(run_config_entries(t));
    }
    out.extend(overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// Reads a run-config text (`FL_RUN_CONFIG`, or a `--run-config` given to `submit`).
pub fn parse_run_config(text: &str) -> Result<IndexMap<String, ConfigValue>, String> {
    Ok(run_config::parse(text)?
        .into_iter()
        .map(|(k, v)| (k, from_value(v)))
        .collect())
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
/// subset Flower's parser (`(\S+?)=('[^']*'|"[^"]*"|\S+)`) reads back unchanged
/// ([`run_config::render`]).
pub fn render_run_config(entries: &IndexMap<String, ConfigValue>) -> Result<String, SubmitError> {
    let values: IndexMap<String, run_config::Value> = entries
        .iter()
        .map(|(k, v)| (k.clone(), to_value(v)))
        .collect();
    run_config::render(&values).map_err(|(key, reason)| SubmitError::RunConfig { key, reason })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use regex::Regex;

    use super::*;
    use crate::api::{StrategyName, StrategySpec};
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
