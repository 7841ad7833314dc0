#![allow(dead_code)]
//! OneFlow's own service-template rules, written from opennebula-api.md §2.7–2.8
//! (`service_template.rb` validator): what a real OneFlow would accept.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

/// Which validator: 6.x (`vm_template`) or 7.x (`type` + `template_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    V6,
    V7,
}

const SHUTDOWN_ACTIONS: &[&str] = &["terminate", "terminate-hard", "shutdown", "shutdown-hard"];
const POLICY_TYPES: &[&str] = &["CHANGE", "CARDINALITY", "PERCENTAGE_CHANGE"];

/// Integers: JSON numbers or numeric strings (the validator converts them).
fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn opt_int_min(
    o: &Map<String, Value>,
    key: &str,
    min: i64,
    at: &str,
) -> Result<Option<i64>, String> {
    match o.get(key) {
        None => Ok(None),
        Some(v) => match int(Some(v)) {
            Some(n) if n >= min => Ok(Some(n)),
            _ => Err(format!(
                "{at}.{key}: expected an integer ≥ {min}, found {v}"
            )),
        },
    }
}

fn opt_bool(o: &Map<String, Value>, key: &str, at: &str) -> Result<(), String> {
    match o.get(key) {
        None | Some(Value::Bool(_)) => Ok(()),
        Some(v) => Err(format!(
            "{at}.{key}: booleans must be JSON booleans, found {v}"
        )),
    }
}

fn opt_enum(o: &Map<String, Value>, key: &str, allowed: &[&str], at: &str) -> Result<(), String> {
    match o.get(key) {
        None => Ok(()),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(()),
        Some(v) => Err(format!("{at}.{key}: {v} is not one of {allowed:?}")),
    }
}

fn word(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// Comparisons of names/numbers with `&&`,`||`,`!`, parentheses: a small independent check.
fn expression_ok(e: &str) -> bool {
    let t = e.trim();
    if t.is_empty() {
        return false;
    }
    let mut depth = 0i32;
    for c in t.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    let has_cmp = ["==", "!=", "<>", ">=", "<=", ">", "<", "="]
        .iter()
        .any(|op| t.contains(op));
    depth == 0
        && has_cmp
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || " _.-()!&|<>=".contains(c))
}

fn check_policy(p: &Value, at: &str) -> Result<(), String> {
    let o = p
        .as_object()
        .ok_or(format!("{at}: a policy must be an object"))?;
    match o.get("type").and_then(Value::as_str) {
        Some(t) if POLICY_TYPES.contains(&t) => {}
        other => {
            return Err(format!(
                "{at}.type: mandatory, one of {POLICY_TYPES:?}, found {other:?}"
            ))
        }
    }
    int(o.get("adjust")).ok_or(format!("{at}.adjust: mandatory integer"))?;
    opt_int_min(o, "min_adjust_step", 1, at)?;
    opt_int_min(o, "period_number", 0, at)?;
    opt_int_min(o, "period", 0, at)?;
    opt_int_min(o, "cooldown", 0, at)?;
    match o.get("expression").and_then(Value::as_str) {
        Some(e) if expression_ok(e) => Ok(()),
        other => Err(format!(
            "{at}.expression: mandatory, non-empty and parseable, found {other:?}"
        )),
    }
}

const INPUT_TYPES: &[&str] = &[
    "text",
    "text64",
    "password",
    "number",
    "number-float",
    "range",
    "range-float",
    "list",
    "list-multiple",
    "boolean",
    "fixed",
];

/// Checks a user-input spec `M|type|description|options|default` (§2.7): the mandatory
/// flag, a known type, options the type needs, and a default the input would accept.
pub fn check_user_input(name: &str, spec: &str) -> Result<(), String> {
    let at = format!("input {name}");
    if !word(name) {
        return Err(format!("{at}: not an attribute name"));
    }
    let f: Vec<&str> = spec.split('|').collect();
    if f.len() != 5 {
        return Err(format!(
            "{at}: `{spec}` is not `M|type|desc|options|default`"
        ));
    }
    let (flag, kind, desc, options, default) = (f[0], f[1], f[2], f[3], f[4]);
    if !["M", "O"].contains(&flag) {
        return Err(format!("{at}: `{flag}` is neither M nor O"));
    }
    if !INPUT_TYPES.contains(&kind) {
        return Err(format!("{at}: unknown type `{kind}`"));
    }
    if desc.trim().is_empty() || desc.contains('"') {
        return Err(format!("{at}: empty or quoted description"));
    }
    let ok = match kind {
        "list" | "list-multiple" => {
            let opts: Vec<&str> = options.split(',').collect();
            !options.is_empty()
                && (default.is_empty() || default.split(',').all(|d| opts.contains(&d)))
        }
        "range" | "range-float" => match options.split_once("..") {
            Some((a, b)) => match (a.parse::<f64>(), b.parse::<f64>(), default.parse::<f64>()) {
                (Ok(a), Ok(b), Ok(d)) => a <= d && d <= b,
                (Ok(a), Ok(b), Err(_)) => a <= b && default.is_empty() && flag == "O",
                _ => false,
            },
            None => false,
        },
        "boolean" => options.is_empty() && ["YES", "NO", ""].contains(&default),
        "number" => options.is_empty() && (default.is_empty() || default.parse::<i64>().is_ok()),
        "number-float" => {
            options.is_empty() && (default.is_empty() || default.parse::<f64>().is_ok())
        }
        _ => options.is_empty(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{at}: options `{options}` / default `{default}` do not fit type {kind}"
        ))
    }
}

/// The `$NAME` references in a string (`$USER[...]` and the like included by name).
pub fn references(v: &str) -> Vec<String> {
    v.split('$')
        .skip(1)
        .map(|r| {
            r.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .filter(|r: &String| !r.is_empty())
        .collect()
}

/// Parses 6.x template text (§1.5): `NAME = "v"` or `NAME = [ K = "v", ... ]` per line.
/// Returns the attribute names.
pub fn parse_template_text(text: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    {
        let (name, value) = line.split_once('=').ok_or(format!("`{line}`: no `=`"))?;
        let name = name.trim();
        if !word(name) || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("`{name}`: not an attribute name"));
        }
        let value = value.trim();
        if let Some(inner) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
            for pair in split_outside_quotes(inner) {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or(format!("`{pair}`: no `=` in vector"))?;
                if !word(k.trim()) {
                    return Err(format!("`{k}`: not a vector key"));
                }
                quoted(v.trim())?;
            }
        } else {
            quoted(value)?;
        }
        names.push(name.to_string());
    }
    Ok(names)
}

fn quoted(v: &str) -> Result<(), String> {
    let inner = v
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .ok_or(format!("`{v}`: value is not double-quoted"))?;
    // Inside quotes only `\"` escapes; an unescaped quote would end the value early.
    let mut prev = ' ';
    for c in inner.chars() {
        if c == '"' && prev != '\\' {
            return Err(format!("`{v}`: unescaped quote inside a value"));
        }
        prev = c;
    }
    Ok(())
}

fn split_outside_quotes(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_q = false;
    let mut prev = ' ';
    for c in s.chars() {
        if c == '"' && prev != '\\' {
            in_q = !in_q;
        }
        if c == ',' && !in_q {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
        prev = c;
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

fn check_role(r: &Value, i: usize, d: Dialect) -> Result<String, String> {
    let at = format!("roles[{i}]");
    let o = r
        .as_object()
        .ok_or(format!("{at}: a role must be an object"))?;
    let name = o.get("name").and_then(Value::as_str).ok_or(format!(
        "{at}: Mandatory document key 'name (string)' is missing"
    ))?;
    if !word(name) {
        return Err(format!("{at}.name: `{name}` does not match ^\\w+$"));
    }
    match d {
        Dialect::V7 => {
            if o.get("type").and_then(Value::as_str) != Some("vm") {
                return Err(format!("{at}.type: mandatory `vm`"));
            }
            int(o.get("template_id")).ok_or(format!(
                "{at}: Mandatory document key 'template_id (integer)' is missing"
            ))?;
            if let Some(tc) = o.get("template_contents") {
                tc.as_object()
                    .ok_or(format!("{at}.template_contents: must be an object"))?;
            }
            if o.contains_key("vm_template") || o.contains_key("vm_template_contents") {
                return Err(format!("{at}: 6.x keys in a 7.x template"));
            }
        }
        Dialect::V6 => {
            int(o.get("vm_template")).ok_or(format!(
                "{at}: Mandatory document key 'vm_template (integer)' is missing"
            ))?;
            if let Some(tc) = o.get("vm_template_contents") {
                let text = tc
                    .as_str()
                    .ok_or(format!("{at}.vm_template_contents: must be a string"))?;
                parse_template_text(text).map_err(|e| format!("{at}.vm_template_contents: {e}"))?;
            }
            if o.contains_key("type")
                || o.contains_key("template_id")
                || o.contains_key("template_contents")
            {
                return Err(format!("{at}: 7.x keys in a 6.x template"));
            }
        }
    }
    let card = opt_int_min(o, "cardinality", 0, &at)?.unwrap_or(0);
    let min = opt_int_min(o, "min_vms", 0, &at)?;
    let max = opt_int_min(o, "max_vms", 0, &at)?;
    opt_int_min(o, "cooldown", 0, &at)?;
    opt_bool(o, "on_hold", &at)?;
    opt_enum(o, "shutdown_action", SHUTDOWN_ACTIONS, &at)?;
    if let Some(min) = min {
        if min > card {
            return Err(format!("{at}: min_vms {min} > cardinality {card}"));
        }
    }
    if let Some(max) = max {
        if card > max {
            return Err(format!("{at}: cardinality {card} > max_vms {max}"));
        }
    }
    if let Some(p) = o.get("elasticity_policies") {
        let ps = p
            .as_array()
            .ok_or(format!("{at}.elasticity_policies: must be an array"))?;
        if !ps.is_empty() && (min.is_none() || max.is_none()) {
            return Err(format!(
                "{at}: min_vms and max_vms are required with elasticity policies"
            ));
        }
        for (j, p) in ps.iter().enumerate() {
            check_policy(p, &format!("{at}.elasticity_policies[{j}]"))?;
        }
    }
    Ok(name.to_string())
}

/// Checks a service template body the way OneFlow's validator does.
pub fn check_service_template(t: &Value, d: Dialect) -> Result<(), String> {
    let o = t.as_object().ok_or("the template must be a JSON object")?;
    match o.get("name") {
        Some(Value::String(s)) if !s.is_empty() => {}
        _ => return Err("Mandatory document key 'name (string)' is missing".into()),
    }
    opt_enum(o, "deployment", &["none", "straight"], "service")?;
    opt_enum(o, "shutdown_action", SHUTDOWN_ACTIONS, "service")?;
    for b in ["ready_status_gate", "automatic_deletion", "on_hold"] {
        opt_bool(o, b, "service")?;
    }
    if let Some(dsc) = o.get("description") {
        dsc.as_str().ok_or("description: must be a string")?;
    }
    if let Some(n) = o.get("networks") {
        let n = n.as_object().ok_or("networks: must be an object")?;
        for (k, v) in n {
            let spec = v
                .as_str()
                .ok_or(format!("networks.{k}: must be a string"))?;
            let parts: Vec<&str> = spec.split('|').collect();
            if parts.len() != 5 || !["M", "O"].contains(&parts[0]) || parts[1] != "network" {
                return Err(format!(
                    "networks.{k}: `{spec}` is not `M|network|desc||id:N`"
                ));
            }
        }
    }
    let (inputs_key, other_key) = match d {
        Dialect::V7 => ("user_inputs", "custom_attrs"),
        Dialect::V6 => ("custom_attrs", "user_inputs"),
    };
    let inputs_of = |o: &Map<String, Value>, at: &str| -> Result<BTreeSet<String>, String> {
        if o.contains_key(other_key) {
            return Err(format!("{at}: `{other_key}` is the other dialect's key"));
        }
        let mut names = BTreeSet::new();
        if let Some(i) = o.get(inputs_key) {
            let i = i
                .as_object()
                .ok_or(format!("{at}.{inputs_key}: must be an object"))?;
            for (k, v) in i {
                let spec = v
                    .as_str()
                    .ok_or(format!("{at}.{inputs_key}.{k}: must be a string"))?;
                check_user_input(k, spec).map_err(|e| format!("{at}.{inputs_key}: {e}"))?;
                names.insert(k.clone());
            }
        }
        Ok(names)
    };
    let service_inputs = inputs_of(o, "service")?;
    let roles = o
        .get("roles")
        .and_then(Value::as_array)
        .ok_or("Mandatory document key 'roles (array)' is missing")?;
    // A CONTEXT `$NAME` must name an input of the service or the role (or oned's USER).
    for (i, r) in roles.iter().enumerate() {
        let at = format!("roles[{i}]");
        let ro = r
            .as_object()
            .ok_or(format!("{at}: a role must be an object"))?;
        let mut known = service_inputs.clone();
        known.extend(inputs_of(ro, &at)?);
        let context_text = match d {
            Dialect::V7 => r
                .pointer("/template_contents/CONTEXT")
                .map(Value::to_string)
                .unwrap_or_default(),
            Dialect::V6 => r
                .get("vm_template_contents")
                .and_then(Value::as_str)
                .and_then(|t| t.lines().find(|l| l.trim_start().starts_with("CONTEXT")))
                .unwrap_or_default()
                .to_string(),
        };
        for name in references(&context_text) {
            if name != "USER" && !known.contains(&name) {
                return Err(format!(
                    "{at}: CONTEXT references `${name}`, which no input declares"
                ));
            }
        }
    }
    if roles.is_empty() {
        return Err("roles: empty".into());
    }
    let mut names = BTreeSet::new();
    for (i, r) in roles.iter().enumerate() {
        let name = check_role(r, i, d)?;
        if !names.insert(name.clone()) {
            return Err(format!("roles[{i}]: duplicate role name `{name}`"));
        }
    }
    for (i, r) in roles.iter().enumerate() {
        if let Some(ps) = r.get("parents") {
            let ps = ps
                .as_array()
                .ok_or(format!("roles[{i}].parents: must be an array"))?;
            for p in ps {
                let p = p
                    .as_str()
                    .ok_or(format!("roles[{i}].parents: names must be strings"))?;
                if !names.contains(p) || Some(p) == r.get("name").and_then(Value::as_str) {
                    return Err(format!("roles[{i}].parents: `{p}` is not another role"));
                }
            }
        }
    }
    // Network placeholders must name a declared network input.
    let declared: BTreeSet<String> = o
        .get("networks")
        .and_then(Value::as_object)
        .map(|n| n.keys().cloned().collect())
        .unwrap_or_default();
    let text = t.to_string();
    for (i, _) in text.match_indices("NETWORK_ID") {
        let rest = &text[i..];
        let after = &rest[..rest.find([']', '}', ',']).unwrap_or(rest.len())];
        if let Some(pos) = after.find('$') {
            let name: String = after[pos + 1..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !declared.contains(&name) {
                return Err(format!("NETWORK_ID `${name}` names no declared network"));
            }
        }
    }
    Ok(())
}
