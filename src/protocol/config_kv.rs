//! Node-config and run-config entries: the one codec for `spec.supernodes.nodeConfig`,
//! `spec.training.runConfig`, `ONEAPP_FL_NODE_CONFIG` and the `--node-config` /
//! `--run-config` arguments Flower reads.
//!
//! Grammar (shared by `validate`, the renderer, the agent and `submit`):
//! - key: dot-separated segments of `[A-Za-z0-9_-]` (a TOML bare or dotted key), at most
//!   [`MAX_KEY_LEN`] characters; no key may be a dotted prefix of another (`a` and `a.b`),
//!   and no key may repeat, since Flower reads the entries as one TOML table;
//! - string value: `[A-Za-z0-9._:/+-]`, 1–[`MAX_VALUE_LEN`] characters: no space, quote,
//!   `$`, backslash or control character, so a value is safe unquoted in an OpenNebula
//!   template, in the guest's shell-sourced context and in a systemd unit;
//! - the context form is `k=v k2=v2` in key order, at most [`MAX_NODE_CONFIG_LEN`].
//!
//! Flower parses `--node-config` / `--run-config` with `(\S+?)=('[^']*'|"[^"]*"|\S+)` and
//! then reads each value as TOML (flwr `common/config.py`, `parse_config_args`): a bare
//! `data:/mnt/x+y` or even `mnist` is invalid TOML there. [`NodeConfig::flower_arg`] passes a
//! value that TOML reads as an integer, float or boolean bare (so `partition-id=0` stays an
//! integer) and quotes every other value as a TOML string ([`toml_string`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use regex::Regex;

/// Longest key.
pub const MAX_KEY_LEN: usize = 128;
/// Longest string value.
pub const MAX_VALUE_LEN: usize = 1024;
/// Longest context form `k=v k2=v2`.
pub const MAX_NODE_CONFIG_LEN: usize = 4096;

/// What a key may hold, for error messages.
pub const KEY_RULE: &str = "letters, digits, `-`, `_` and single inner dots";
/// What a string value may hold, for error messages.
pub const VALUE_RULE: &str =
    "letters, digits and `._:/+-` (no spaces, quotes, `$`, newlines or shell characters)";

static KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$").unwrap_or_else(|e| unreachable!("{e}"))
});
static VALUE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9._:/+-]+$").unwrap_or_else(|e| unreachable!("{e}")));
// The TOML scalars passed bare: a strict subset of TOML's integers (fits i64), floats and
// booleans.
static TOML_SCALAR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(true|false|[+-]?(0|[1-9][0-9]{0,17})|[+-]?(0|[1-9][0-9]*)(\.[0-9]+([eE][+-]?[0-9]{1,3})?|[eE][+-]?[0-9]{1,3}))$",
    )
    .unwrap_or_else(|e| unreachable!("{e}"))
});

/// Whether `k` is a key by the grammar above.
pub fn is_key(k: &str) -> bool {
    k.len() <= MAX_KEY_LEN && KEY.is_match(k)
}

/// Whether `v` is a string value by the grammar above.
pub fn is_value(v: &str) -> bool {
    v.len() <= MAX_VALUE_LEN && VALUE.is_match(v)
}

/// Checks that no key repeats or is a dotted prefix of another (Flower reads them as one
/// TOML table). Returns the first offending key and why.
pub fn check_key_set<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<(), (String, String)> {
    let mut seen = BTreeSet::new();
    for k in keys {
        if !seen.insert(k) {
            return Err((k.to_string(), "is given twice".into()));
        }
    }
    for k in &seen {
        let mut prefix = String::new();
        for seg in k.split('.') {
            if !prefix.is_empty() {
                if seen.contains(prefix.as_str()) {
                    return Err((
                        k.to_string(),
                        format!("conflicts with key `{prefix}` (Flower reads keys as TOML)"),
                    ));
                }
                prefix.push('.');
            }
            prefix.push_str(seg);
        }
    }
    Ok(())
}

/// A TOML string Flower's splitter keeps whole: `"..."` (basic) when possible, else `'...'`
/// (literal, no escapes). Control characters cannot be passed.
pub fn toml_string(s: &str) -> Result<String, &'static str> {
    if s.chars().any(char::is_control) {
        return Err("strings with control characters (newlines, tabs) cannot be passed");
    }
    if !s.contains('"') && !s.contains('\\') {
        Ok(format!("\"{s}\""))
    } else if !s.contains('\'') {
        Ok(format!("'{s}'"))
    } else {
        Err("a string holding both a quote (\") or backslash and an apostrophe (') cannot be passed")
    }
}

/// A value as Flower's TOML reads it back unchanged: numbers and booleans bare, any other
/// value quoted.
fn toml_value(v: &str) -> String {
    if TOML_SCALAR.is_match(v) {
        v.to_string()
    } else {
        // The value alphabet holds no quote, backslash or control character.
        format!("\"{v}\"")
    }
}

/// A validated node config: `key=value` entries in key order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeConfig(BTreeMap<String, String>);

impl NodeConfig {
    /// Validates entries (the spec's `nodeConfig`). The error names the offending key
    /// (`None` for the whole map) and what is wrong.
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<Self, (Option<String>, String)> {
        if map.is_empty() {
            return Err((None, "is empty".into()));
        }
        for (k, v) in map {
            if !is_key(k) {
                return Err((Some(k.clone()), format!("key may only hold {KEY_RULE}")));
            }
            if !is_value(v) {
                return Err((Some(k.clone()), format!("value may only hold {VALUE_RULE}")));
            }
        }
        check_key_set(map.keys().map(String::as_str))
            .map_err(|(k, why)| (Some(k), format!("key {why}")))?;
        let nc = Self(map.clone());
        if nc.as_context().len() > MAX_NODE_CONFIG_LEN {
            return Err((
                None,
                format!("is longer than {MAX_NODE_CONFIG_LEN} characters as `k=v k2=v2`"),
            ));
        }
        Ok(nc)
    }

    /// Parses the context form `k=v k2=v2` (runs of spaces tolerated).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() > MAX_NODE_CONFIG_LEN {
            return Err(format!(
                "node config longer than {MAX_NODE_CONFIG_LEN} characters"
            ));
        }
        let mut map = BTreeMap::new();
        for token in s.split(' ').filter(|t| !t.is_empty()) {
            let (k, v) = token
                .split_once('=')
                .ok_or_else(|| "each entry must be key=value".to_string())?;
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err("a key is given twice".into());
            }
        }
        Self::from_map(&map).map_err(|(key, why)| match key {
            Some(_) => format!("an entry's {why}"),
            None => format!("node config {why}"),
        })
    }

    /// `partition-id=<index> num-partitions=<count>`.
    pub fn partition(index: usize, count: usize) -> Self {
        Self(BTreeMap::from([
            ("num-partitions".to_string(), count.to_string()),
            ("partition-id".to_string(), index.to_string()),
        ]))
    }

    /// The entries.
    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// The context form `k=v k2=v2` (what the renderer writes and the agent reports).
    pub fn as_context(&self) -> String {
        let mut out = String::new();
        // Partition first reads naturally in status output; other keys in key order.
        for (k, v) in self.ordered() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(k);
            out.push('=');
            out.push_str(v);
        }
        out
    }

    /// The `--node-config` argument: each value as Flower's TOML reads it back unchanged.
    pub fn flower_arg(&self) -> String {
        self.ordered()
            .map(|(k, v)| format!("{k}={}", toml_value(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn ordered(&self) -> impl Iterator<Item = (&String, &String)> {
        let first = ["partition-id", "num-partitions"];
        first
            .into_iter()
            .filter_map(|k| self.0.get_key_value(k))
            .chain(
                self.0
                    .iter()
                    .filter(move |(k, _)| !first.contains(&k.as_str())),
            )
    }
}

impl From<NodeConfig> for String {
    fn from(n: NodeConfig) -> String {
        n.as_context()
    }
}

impl TryFrom<String> for NodeConfig {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        NodeConfig::parse(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_full_alphabet_is_accepted_and_round_trips() {
        let m = map(&[("data", "data:/mnt/x+y"), ("lr", "1e-3"), ("a.b_c-d", "0")]);
        let nc = NodeConfig::from_map(&m).unwrap();
        assert_eq!(nc.as_context(), "a.b_c-d=0 data=data:/mnt/x+y lr=1e-3");
        assert_eq!(NodeConfig::parse(&nc.as_context()).unwrap(), nc);
        assert_eq!(nc.entries(), &m);
        assert_eq!(
            nc.flower_arg(),
            "a.b_c-d=0 data=\"data:/mnt/x+y\" lr=1e-3",
            "strings quoted for TOML, numbers bare"
        );
        let p = NodeConfig::partition(1, 4);
        assert_eq!(p.as_context(), "partition-id=1 num-partitions=4");
        assert_eq!(p.flower_arg(), "partition-id=1 num-partitions=4");
        assert_eq!(
            NodeConfig::parse("partition-id=1  num-partitions=4").unwrap(),
            p
        );
    }

    #[test]
    fn toml_scalars_stay_bare_and_everything_else_is_quoted() {
        for bare in ["0", "-3", "+7", "1.5", "1e-3", "2E+10", "true", "false"] {
            assert_eq!(toml_value(bare), bare);
        }
        for quoted in [
            "mnist", "01", "1_000", "0x1f", "inf", "1.", ".5", "True", "1e9999",
        ] {
            assert_eq!(toml_value(quoted), format!("\"{quoted}\""));
        }
        assert_eq!(toml_value("1234567890123456789"), "\"1234567890123456789\"");
    }

    #[test]
    fn injection_and_toml_conflicts_are_refused() {
        for bad in [
            "a=1 b=$(reboot)",
            "a=`id`",
            "a=\"x y\"",
            "a=1\nb=2",
            "a=1;b=2",
            "a=1|b",
            "a=x>y",
            "justakey",
            "=1",
            "a=",
            ".a=1",
            "a..b=1",
            "a=1 a=2",
            "a=1 a.b=2",
            "",
        ] {
            assert!(NodeConfig::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_key_set(["x.y", "x.z", "xy"]).is_ok());
        assert_eq!(check_key_set(["a.b.c", "a.b"]).unwrap_err().0, "a.b.c");
        assert!(!is_value(&"a".repeat(MAX_VALUE_LEN + 1)));
        assert!(!is_key(&"a".repeat(MAX_KEY_LEN + 1)));
    }

    #[test]
    fn toml_strings_pick_a_quote_flower_keeps_whole() {
        assert_eq!(toml_string("a b").unwrap(), "\"a b\"");
        assert_eq!(toml_string("say \"hi\"").unwrap(), "'say \"hi\"'");
        assert!(toml_string("it's \"x\"").is_err());
        assert!(toml_string("a\nb").is_err());
    }
}
