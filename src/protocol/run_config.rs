//! A run configuration: the one codec for `FL_RUN_CONFIG` (the default run configuration a
//! SuperLink publishes from its `ONEAPP_FL_*` training variables, base64 of the text:
//! [`encode_attribute`]) and for the
//! `flwr run --run-config` argument `submit` passes; and the training rules both
//! `spec.training` and those variables obey.
//!
//! Owns: which run-config keys a training configuration yields ([`entries`]), their
//! one-argument form ([`render`]) and its reader ([`parse`]), and the value rules
//! ([`check_param`], [`malicious_need`], [`uses`]).
//! Must not: know about specs (the API maps its `TrainingSpec` onto [`Training`]) or do I/O.
//!
//! Why a published run configuration: stock Flower reads the training settings from
//! `flwr run --run-config`, never from the SuperLink's environment, so the SuperLink can
//! only publish them for `submit` to pass (docs/context-variables.md).
//!
//! Guarantees: [`render`]'s output is read back unchanged by [`parse`] and by Flower's
//! splitter `(\S+?)=('[^']*'|"[^"]*"|\S+)` + TOML; [`parse`] is total on untrusted input
//! (bounded length and entry count, no panic).

use indexmap::IndexMap;

use super::config_kv;

/// Longest accepted run-config text.
pub const MAX_LEN: usize = 8192;
/// Most entries accepted.
pub const MAX_ENTRIES: usize = 64;

/// Flower's aggregation strategies, as the run config names them.
pub const STRATEGIES: &[&str] = &[
    "FedAvg",
    "FedProx",
    "FedAdam",
    "Krum",
    "Bulyan",
    "FedTrimmedAvg",
];

/// A run-config value (TOML scalar).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Boolean.
    Bool(bool),
    /// Integer.
    Int(i64),
    /// Floating point number.
    Float(f64),
    /// String.
    Str(String),
}

/// Model checkpoints the ServerApp writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every this many rounds.
    pub interval: u32,
    /// Directory, as the ServerApp sees it.
    pub path: String,
}

/// A training configuration: what `spec.training` and the `ONEAPP_FL_*` training
/// variables both describe.
#[derive(Debug, Clone, PartialEq)]
pub struct Training {
    /// `num-server-rounds`.
    pub num_rounds: u32,
    /// One of [`STRATEGIES`].
    pub strategy: &'static str,
    /// `min-fit-clients` (and Flower ≥ 1.21's `min-train-nodes`).
    pub min_fit_clients: u32,
    /// `min-evaluate-clients`.
    pub min_evaluate_clients: u32,
    /// `min-available-clients`.
    pub min_available_clients: u32,
    /// FedProx μ.
    pub proximal_mu: Option<f64>,
    /// FedAdam η.
    pub server_lr: Option<f64>,
    /// FedAdam η_l.
    pub client_lr: Option<f64>,
    /// Krum/Bulyan f.
    pub num_malicious: Option<u32>,
    /// FedTrimmedAvg β.
    pub trim_beta: Option<f64>,
    /// Fraction sampled for training.
    pub fraction_train: Option<f64>,
    /// Fraction sampled for evaluation.
    pub fraction_evaluate: Option<f64>,
    /// Checkpointing, when on.
    pub checkpoint: Option<Checkpoint>,
}

/// A strategy parameter with a value rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// FedProx μ ≥ 0.
    ProximalMu,
    /// FedAdam η > 0.
    ServerLr,
    /// FedAdam η_l > 0.
    ClientLr,
    /// Krum/Bulyan f (an integer; no float rule).
    NumMalicious,
    /// FedTrimmedAvg β in (0, 0.5).
    TrimBeta,
    /// In (0, 1].
    FractionTrain,
    /// In [0, 1].
    FractionEvaluate,
}

/// Whether `x` is a valid value of `p`; the error says what is accepted.
pub fn check_param(p: Param, x: f64) -> Result<(), &'static str> {
    let (ok, rule) = match p {
        Param::ProximalMu => (x >= 0.0, "≥ 0"),
        Param::ServerLr | Param::ClientLr => (x > 0.0, "> 0"),
        Param::NumMalicious => (x >= 0.0 && x.fract() == 0.0, "a non-negative integer"),
        Param::TrimBeta => (x > 0.0 && x < 0.5, "in (0, 0.5)"),
        Param::FractionTrain => (x > 0.0 && x <= 1.0, "in (0, 1]"),
        Param::FractionEvaluate => ((0.0..=1.0).contains(&x), "in [0, 1]"),
    };
    if x.is_finite() && ok {
        Ok(())
    } else {
        Err(rule)
    }
}

/// Whether `strategy` reads parameter `p` (a parameter set for another is a warning).
pub fn uses(strategy: &str, p: Param) -> bool {
    match p {
        Param::ProximalMu => strategy == "FedProx",
        Param::ServerLr | Param::ClientLr => strategy == "FedAdam",
        Param::NumMalicious => matches!(strategy, "Krum" | "Bulyan"),
        Param::TrimBeta => strategy == "FedTrimmedAvg",
        Param::FractionTrain | Param::FractionEvaluate => true,
    }
}

/// Krum needs n ≥ 2f+3 and Bulyan n ≥ 4f+3 available clients to tolerate f malicious ones:
/// `(need, formula)`, `None` for other strategies.
pub fn malicious_need(strategy: &str, f: u32) -> Option<(u64, &'static str)> {
    match strategy {
        "Krum" => Some((2 * u64::from(f) + 3, "2f+3")),
        "Bulyan" => Some((4 * u64::from(f) + 3, "4f+3")),
        _ => None,
    }
}

/// The run-config entries of `t`, in a stable order: the standard keys, the parameters the
/// chosen strategy reads, the sampling fractions, then checkpointing when on.
pub fn entries(t: &Training) -> IndexMap<String, Value> {
    let mut out = IndexMap::new();
    let mut put = |k: &str, v: Value| {
        out.insert(k.to_string(), v);
    };
    let int = |v: u32| Value::Int(i64::from(v));
    put("num-server-rounds", int(t.num_rounds));
    put("strategy", Value::Str(t.strategy.to_string()));
    put("min-fit-clients", int(t.min_fit_clients));
    // Flower ≥ 1.21 calls it min_train_nodes; apps may declare either name.
    put("min-train-nodes", int(t.min_fit_clients));
    put("min-evaluate-clients", int(t.min_evaluate_clients));
    put("min-available-clients", int(t.min_available_clients));
    let floats = [
        ("proximal-mu", Param::ProximalMu, t.proximal_mu),
        ("server-lr", Param::ServerLr, t.server_lr),
        ("client-lr", Param::ClientLr, t.client_lr),
        ("trim-beta", Param::TrimBeta, t.trim_beta),
    ];
    for (k, p, v) in floats {
        if let Some(v) = v.filter(|_| uses(t.strategy, p)) {
            put(k, Value::Float(v));
        }
    }
    if let Some(n) = t
        .num_malicious
        .filter(|_| uses(t.strategy, Param::NumMalicious))
    {
        put("num-malicious", int(n));
    }
    if let Some(f) = t.fraction_train {
        put("fraction-train", Value::Float(f));
    }
    if let Some(f) = t.fraction_evaluate {
        put("fraction-evaluate", Value::Float(f));
    }
    if let Some(cp) = &t.checkpoint {
        put("checkpoint-enabled", Value::Bool(true));
        put("checkpoint-interval", int(cp.interval));
        put("checkpoint-path", Value::Str(cp.path.clone()));
    }
    out
}

/// One `--run-config` argument: space-separated `key=value` pairs with TOML values, in the
/// subset Flower's parser reads back unchanged. The error names the key and why.
pub fn render(entries: &IndexMap<String, Value>) -> Result<String, (String, String)> {
    let mut parts = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let bad = |reason: &str| (key.clone(), reason.to_string());
        if !config_kv::is_key(key) {
            return Err(bad(&format!("keys may only hold {}", config_kv::KEY_RULE)));
        }
        let v = match value {
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) if !f.is_finite() => {
                return Err(bad("NaN and infinity cannot be passed"))
            }
            // Debug keeps a decimal point or exponent, so TOML reads a float back.
            Value::Float(f) => format!("{f:?}"),
            Value::Str(s) => config_kv::toml_string(s).map_err(bad)?,
        };
        parts.push(format!("{key}={v}"));
    }
    Ok(parts.join(" "))
}

/// Reads a run-config text (as [`render`] prints it, or as a user gives `--run-config`)
/// with Flower's splitter and TOML values. The error says what is wrong, never echoing a
/// long value.
pub fn parse(s: &str) -> Result<IndexMap<String, Value>, String> {
    if s.len() > MAX_LEN {
        return Err(format!("longer than {MAX_LEN} characters"));
    }
    let mut out = IndexMap::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        if out.len() >= MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
        let (key, after) = rest.split_once('=').ok_or("entries must be key=value")?;
        if !config_kv::is_key(key) {
            return Err(format!("a key may only hold {}", config_kv::KEY_RULE));
        }
        let (raw, next) = match after.chars().next() {
            Some(q @ ('\'' | '"')) => {
                let end = after[1..]
                    .find(q)
                    .ok_or_else(|| format!("{key}: unterminated string"))?;
                after.split_at(end + 2)
            }
            _ => after.split_at(after.find(char::is_whitespace).unwrap_or(after.len())),
        };
        let value = toml_scalar(raw).ok_or_else(|| {
            format!("{key}: the value must be a TOML boolean, integer, float or string")
        })?;
        if out.insert(key.to_string(), value).is_some() {
            return Err(format!("{key}: given twice"));
        }
        if !next.is_empty() && !next.starts_with(char::is_whitespace) {
            return Err(format!("{key}: entries must be separated by spaces"));
        }
        rest = next.trim_start();
    }
    config_kv::check_key_set(out.keys().map(String::as_str))
        .map_err(|(k, why)| format!("{k}: {why}"))?;
    Ok(out)
}

/// `FL_RUN_CONFIG`'s value: base64 (standard, padded) of the run-config text, since the
/// text's spaces, quotes and `=` do not survive OneGate's template syntax unquoted.
pub fn encode_attribute(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// Reads an `FL_RUN_CONFIG` value: the run-config text, checked by [`parse`].
pub fn decode_attribute(value: &str) -> Result<String, String> {
    use base64::Engine as _;
    if value.len() > MAX_LEN.div_ceil(3) * 4 {
        return Err(format!("longer than {MAX_LEN} characters once decoded"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| "not base64".to_string())?;
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    parse(&text)?;
    Ok(text)
}

fn toml_scalar(raw: &str) -> Option<Value> {
    let doc: toml_edit::DocumentMut = format!("v = {raw}\n").parse().ok()?;
    let item = doc.get("v")?;
    if let Some(b) = item.as_bool() {
        Some(Value::Bool(b))
    } else if let Some(i) = item.as_integer() {
        Some(Value::Int(i))
    } else if let Some(f) = item.as_float() {
        f.is_finite().then_some(Value::Float(f))
    } else {
        item.as_str()
            .filter(|s| !s.chars().any(char::is_control))
            .map(|s| Value::Str(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn training() -> Training {
        Training {
            num_rounds: 3,
            strategy: "FedAvg",
            min_fit_clients: 2,
            min_evaluate_clients: 2,
            min_available_clients: 2,
            proximal_mu: None,
            server_lr: None,
            client_lr: None,
            num_malicious: None,
            trim_beta: None,
            fraction_train: None,
            fraction_evaluate: None,
            checkpoint: None,
        }
    }

    #[test]
    fn rendered_entries_parse_back_unchanged() {
        let mut t = training();
        t.strategy = "FedTrimmedAvg";
        t.trim_beta = Some(0.25);
        t.proximal_mu = Some(1.0); // not FedProx: left out
        t.checkpoint = Some(Checkpoint {
            interval: 5,
            path: "/opt/flower/checkpoints".into(),
        });
        let e = entries(&t);
        assert!(!e.contains_key("proximal-mu"));
        let text = render(&e).unwrap();
        assert_eq!(
            text,
            "num-server-rounds=3 strategy=\"FedTrimmedAvg\" min-fit-clients=2 min-train-nodes=2 \
             min-evaluate-clients=2 min-available-clients=2 trim-beta=0.25 \
             checkpoint-enabled=true checkpoint-interval=5 checkpoint-path=\"/opt/flower/checkpoints\""
        );
        assert_eq!(parse(&text).unwrap(), e);
        assert_eq!(decode_attribute(&encode_attribute(&text)).unwrap(), text);
        for bad in [
            "not base64!",
            &encode_attribute("a=mnist"),
            &"QUFB".repeat(4000),
        ] {
            assert!(decode_attribute(bad).is_err(), "{bad:.20}");
        }
    }

    #[test]
    fn parse_reads_user_forms_and_refuses_garbage() {
        let p = parse("  a=1 b='x y' c=\"q\" d=2.5e-3 e=false ").unwrap();
        assert_eq!(p["a"], Value::Int(1));
        assert_eq!(p["b"], Value::Str("x y".into()));
        assert_eq!(p["d"], Value::Float(2.5e-3));
        assert_eq!(p["e"], Value::Bool(false));
        assert!(parse("").unwrap().is_empty());
        for bad in [
            "a",
            "a=",
            "a=mnist",
            "a=1 a=2",
            "a=1 a.b=2",
            "a='x",
            "a=\"x\"b=1",
            "a b=1",
            "a=nan",
            "$(id)=1",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&"a=1 ".repeat(3000)).is_err());
        let many: String = (0..65).map(|i| format!("k{i}=1 ")).collect();
        assert!(parse(&many).unwrap_err().contains("entries"));
    }

    #[test]
    fn rules() {
        assert!(check_param(Param::TrimBeta, 0.5).is_err());
        assert!(check_param(Param::TrimBeta, 0.2).is_ok());
        assert!(check_param(Param::ProximalMu, 0.0).is_ok());
        assert!(check_param(Param::ServerLr, 0.0).is_err());
        assert!(check_param(Param::ClientLr, f64::INFINITY).is_err());
        assert_eq!(malicious_need("Krum", 1), Some((5, "2f+3")));
        assert_eq!(malicious_need("Bulyan", 1), Some((7, "4f+3")));
        assert_eq!(malicious_need("FedAvg", 1), None);
    }
}
