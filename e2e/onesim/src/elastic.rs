//! OneFlow's autoscaler rules: the elasticity-expression grammar, attribute averaging,
//! `elasticity_policies` (`period`, `period_number`, `cooldown`), `scheduled_policies`
//! (`start_time`, cron `recurrence`) and the new-cardinality arithmetic with min/max.
//!
//! Owns: the pure rules (parse, evaluate, decide a role's cardinality change).
//! Must not: touch [`crate::state::State`] or the service documents; `flow::autoscale`
//! applies the decisions as OneFlow's `ServiceAutoScaler` does.
//!
//! Taken from OpenNebula 7.x: `src/flow/lib/grammar.treetop` and its compiled
//! `src/oca/ruby/opennebula/flow/grammar.rb` (grammar, lookup order, averaging),
//! `src/flow/lib/models/vmrole.rb` (`scale?`, `scale_attributes?`, `scale_time?`,
//! `calculate_new_cardinality`), `src/flow/lib/ServiceAutoScaler.rb` (the loop) and
//! `src/oca/ruby/opennebula/flow/service_template.rb` (`validate_vmvalues`).
//!
//! Caveats: times (cron, `start_time` without a zone) are UTC, where OneFlow uses the
//! server's local zone; cron is the five-field Vixie syntax (`parse-cron` gem's).

use serde_json::{json, Value};

/// Longest expression accepted (OneFlow has no limit; expressions are a few dozen bytes).
pub const MAX_EXPR_LEN: usize = 4096;
/// Deepest nesting of `(`, `!` and `&&`/`||` chains accepted (recursion bound).
pub const MAX_DEPTH: usize = 64;

// ---------------------------------------------------------------- grammar

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A number and its Ruby rendering (`80`, `0.5`).
    Num(f64, String),
    /// An attribute name as OneFlow looks it up: the text upper-cased, quotes included
    /// (so a quoted name never matches: OneFlow's own behaviour).
    Var(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Cmp(Operand, String, Operand),
    /// `&&`/`&` or `||`/`|` with the operator as written; right-recursive, no precedence.
    Bool(Box<Expr>, String, Box<Expr>),
    Not(Box<Expr>),
    Paren(Box<Expr>),
}

struct P<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl P<'_> {
    fn space(&mut self) {
        // The grammar's `space` is `' '*`: tabs and newlines are syntax errors.
        while self.s.get(self.i) == Some(&b' ') {
            self.i += 1;
        }
    }
    fn eat(&mut self, t: &str) -> bool {
        if self.s[self.i..].starts_with(t.as_bytes()) {
            self.i += t.len();
            true
        } else {
            false
        }
    }
    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{what} at column {}", self.i + 1))
    }
    fn expression(&mut self) -> Result<Expr, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.err(&format!("expression nested deeper than {MAX_DEPTH}"));
        }
        self.space();
        let left = self.logic_cond()?;
        let save = self.i;
        self.space();
        let op = ["&&", "&", "||", "|"].into_iter().find(|o| self.eat(o));
        let e = match op {
            Some(op) => {
                self.space();
                let right = self.expression()?;
                Expr::Bool(Box::new(left), op.to_string(), Box::new(right))
            }
            None => {
                self.i = save;
                left
            }
        };
        self.space();
        self.depth -= 1;
        Ok(e)
    }
    fn logic_cond(&mut self) -> Result<Expr, String> {
        if let Some(l) = self.operand() {
            self.space();
            let Some(op) = ["==", "=", "!=", "<>", ">=", ">", "<=", "<"]
                .into_iter()
                .find(|o| self.eat(o))
            else {
                return self.err("expected a comparison operator");
            };
            self.space();
            let Some(r) = self.operand() else {
                return self.err("expected a number or an attribute name");
            };
            return Ok(Expr::Cmp(l, op.to_string(), r));
        }
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.expression()?)));
        }
        if self.eat("(") {
            let e = self.expression()?;
            if !self.eat(")") {
                return self.err("expected ')'");
            }
            return Ok(Expr::Paren(Box::new(e)));
        }
        self.err("expected a comparison, '!' or '('")
    }
    fn digits(&mut self) -> usize {
        let st = self.i;
        while self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
            self.i += 1;
        }
        self.i - st
    }
    fn operand(&mut self) -> Option<Operand> {
        let st = self.i;
        // number: '-'? [0-9]+ ('.' [0-9]+)?
        let neg = self.eat("-");
        if self.digits() > 0 {
            let int_end = self.i;
            let float = self.eat(".") && self.digits() > 0;
            if !float {
                self.i = int_end;
            }
            let text = std::str::from_utf8(&self.s[st..self.i]).unwrap_or("0");
            let v: f64 = text.parse().unwrap_or(0.0);
            let shown = if float {
                ruby_float(v)
            } else {
                // Ruby's `to_i.to_s`: no leading zeros, no `-0`.
                let d = text.trim_start_matches('-').trim_start_matches('0');
                match (d.is_empty(), neg) {
                    (true, _) => "0".to_string(),
                    (false, true) => format!("-{d}"),
                    (false, false) => d.to_string(),
                }
            };
            return Some(Operand::Num(v, shown));
        }
        self.i = st;
        // variable: ('"' name '"' | '\'' name '\'' | name), name = [a-zA-Z][0-9a-zA-Z_]*
        let quote = [b'"', b'\'']
            .into_iter()
            .find(|q| self.s.get(self.i) == Some(q));
        if quote.is_some() {
            self.i += 1;
        }
        if !self.s.get(self.i).is_some_and(u8::is_ascii_alphabetic) {
            self.i = st;
            return None;
        }
        while self
            .s
            .get(self.i)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
        {
            self.i += 1;
        }
        if let Some(q) = quote {
            if self.s.get(self.i) != Some(&q) {
                self.i = st;
                return None;
            }
            self.i += 1;
        }
        let text = std::str::from_utf8(&self.s[st..self.i]).unwrap_or("");
        Some(Operand::Var(text.to_ascii_uppercase()))
    }
}

/// Parses an elasticity expression as OneFlow's Treetop grammar does (the whole text
/// must match). The error names the column, like OneFlow's `failure_reason`.
pub fn parse(expr: &str) -> Result<Expr, String> {
    if expr.len() > MAX_EXPR_LEN {
        return Err(format!("expression longer than {MAX_EXPR_LEN} bytes"));
    }
    let mut p = P {
        s: expr.as_bytes(),
        i: 0,
        depth: 0,
    };
    let e = p.expression()?;
    if p.i != expr.len() {
        return p.err("unexpected text");
    }
    Ok(e)
}

/// Ruby's `Float#to_s` for the values the grammar shows (`1.0`, `0.5`, `12.25`).
fn ruby_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Ruby's `String#to_f`: the longest numeric prefix after leading whitespace, else 0.0
/// (so `"YES".to_f` is 0.0: a YES/NO attribute averages to 0).
pub fn ruby_to_f(s: &str) -> f64 {
    let t = s.trim_start();
    let b = t.as_bytes();
    let mut i = 0;
    let mut out = String::new();
    if matches!(b.first(), Some(b'+' | b'-')) {
        out.push(b[0] as char);
        i = 1;
    }
    let digits = |i: &mut usize, out: &mut String| {
        let st = *i;
        while *i < b.len() && (b[*i].is_ascii_digit() || (b[*i] == b'_' && *i > st)) {
            if b[*i] != b'_' {
                out.push(b[*i] as char);
            }
            *i += 1;
        }
        *i > st
    };
    if !digits(&mut i, &mut out) {
        return 0.0;
    }
    if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
        out.push('.');
        i += 1;
        digits(&mut i, &mut out);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        let mut exp = String::from("e");
        if matches!(b.get(j), Some(b'+' | b'-')) {
            exp.push(b[j] as char);
            j += 1;
        }
        if digits(&mut j, &mut exp) {
            out.push_str(&exp);
        }
    }
    out.parse().unwrap_or(0.0)
}

/// One VM as the grammar sees it: its states and where its attributes come from.
pub trait VmView {
    fn running(&self) -> bool;
    /// The attribute's value in USER_TEMPLATE, then MONITORING, then TEMPLATE, then the VM
    /// root — the first place that has the name wins: `Some(None)` when that value is not
    /// a single string (a vector or a repeated attribute, which Ruby cannot `to_f`),
    /// `None` when no place has it.
    fn lookup(&self, att: &str) -> Option<Option<String>>;
}

/// An attribute's average over the RUNNING VMs (STATE 3, LCM_STATE 3) that have it,
/// rounded to two decimals; `None` when none has it.
pub fn average(vms: &[&dyn VmView], att: &str) -> Option<f64> {
    let (mut total, mut n) = (0.0, 0u32);
    for vm in vms.iter().filter(|v| v.running()) {
        if let Some(Some(v)) = vm.lookup(att) {
            total += ruby_to_f(&v);
            n += 1;
        }
    }
    (n > 0).then(|| ((total / f64::from(n)) * 100.0).round() / 100.0)
}

/// Evaluates an expression; the string is OneFlow's `expression_evaluated`
/// (`FL_TRAINING_ACTIVE[1.0] > 0.5`, `CPU[--] > 80` when no VM has the attribute).
pub fn eval(e: &Expr, vms: &[&dyn VmView]) -> (bool, String) {
    let operand = |o: &Operand| match o {
        Operand::Num(v, s) => (Some(*v), s.clone()),
        Operand::Var(name) => match average(vms, name) {
            Some(v) => (Some(v), format!("{name}[{}]", ruby_float(v))),
            None => (None, format!("{name}[--]")),
        },
    };
    match e {
        Expr::Cmp(l, op, r) => {
            let ((lv, ls), (rv, rs)) = (operand(l), operand(r));
            let st = format!("{ls} {op} {rs}");
            // An attribute no VM has makes the comparison false, not 0.
            let v = match (lv, rv) {
                (Some(a), Some(b)) => match op.as_str() {
                    "==" | "=" => a == b,
                    "!=" | "<>" => a != b,
                    ">=" => a >= b,
                    ">" => a > b,
                    "<=" => a <= b,
                    _ => a < b,
                },
                _ => false,
            };
            (v, st)
        }
        Expr::Bool(l, op, r) => {
            let ((lv, ls), (rv, rs)) = (eval(l, vms), eval(r, vms));
            let v = if op.starts_with('&') {
                lv && rv
            } else {
                lv || rv
            };
            (v, format!("{ls} {op} {rs}"))
        }
        Expr::Not(x) => {
            let (v, s) = eval(x, vms);
            (!v, format!("!{s}"))
        }
        Expr::Paren(x) => {
            let (v, s) = eval(x, vms);
            (v, format!("({s})"))
        }
    }
}

// ---------------------------------------------------------------- cron

/// A five-field cron expression (minute hour day-of-month month day-of-week).
#[derive(Debug, Clone)]
pub struct Cron {
    fields: [Vec<bool>; 5],
    dom_any: bool,
    dow_any: bool,
}

const CRON_RANGES: [(u32, u32); 5] = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];
const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

impl Cron {
    pub fn parse(s: &str) -> Result<Cron, String> {
        if s.len() > 256 {
            return Err("cron expression longer than 256 bytes".into());
        }
        let parts: Vec<&str> = s.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(format!("expected 5 cron fields, found {}", parts.len()));
        }
        let mut fields: [Vec<bool>; 5] = Default::default();
        for (fi, part) in parts.iter().enumerate() {
            let (lo, hi) = CRON_RANGES[fi];
            let mut set = vec![false; hi as usize + 1];
            for item in part.split(',') {
                let (range, step) = match item.split_once('/') {
                    Some((r, st)) => (
                        r,
                        st.parse::<u32>()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| format!("bad step in cron field '{part}'"))?,
                    ),
                    None => (item, 1),
                };
                let value = |t: &str| -> Result<u32, String> {
                    let names: &[&str] = match fi {
                        3 => &MONTHS,
                        4 => &DAYS,
                        _ => &[],
                    };
                    let lower = t.to_ascii_lowercase();
                    let n = match names.iter().position(|n| *n == lower) {
                        Some(p) => p as u32 + if fi == 3 { 1 } else { 0 },
                        None => t
                            .parse::<u32>()
                            .map_err(|_| format!("bad value '{t}' in cron field '{part}'"))?,
                    };
                    if n < lo || n > hi {
                        return Err(format!("value {n} out of range {lo}-{hi} in '{part}'"));
                    }
                    Ok(n)
                };
                let (a, b) = if range == "*" {
                    (lo, hi)
                } else if let Some((a, b)) = range.split_once('-') {
                    (value(a)?, value(b)?)
                } else {
                    let a = value(range)?;
                    (a, if step > 1 { hi } else { a })
                };
                if a > b {
                    return Err(format!("empty range '{range}' in cron field '{part}'"));
                }
                for n in (a..=b).step_by(step as usize) {
                    set[n as usize] = true;
                }
            }
            if fi == 4 && set[7] {
                set[0] = true; // 7 is Sunday too
            }
            fields[fi] = set;
        }
        Ok(Cron {
            dom_any: parts[2] == "*",
            dow_any: parts[4] == "*",
            fields,
        })
    }

    fn day_matches(&self, d: chrono::NaiveDate) -> bool {
        use chrono::Datelike;
        let dom = self.fields[2][d.day() as usize];
        let dow = self.fields[4][d.weekday().num_days_from_sunday() as usize];
        self.fields[3][d.month() as usize]
            && match (self.dom_any, self.dow_any) {
                (true, true) => true,
                (false, true) => dom,
                (true, false) => dow,
                // Vixie cron: both restricted means either matches.
                (false, false) => dom || dow,
            }
    }

    /// The first matching minute strictly after `after` (epoch seconds, UTC), looking at
    /// most five years ahead (`None` for e.g. `0 0 31 2 *`).
    pub fn next(&self, after: i64) -> Option<i64> {
        use chrono::{Duration, Timelike};
        let start = chrono::DateTime::from_timestamp(after - after.rem_euclid(60) + 60, 0)?;
        let mut day = start.date_naive();
        for _ in 0..(366 * 5) {
            if self.day_matches(day) {
                for h in 0..24u32 {
                    if !self.fields[1][h as usize] {
                        continue;
                    }
                    for m in 0..60u32 {
                        if !self.fields[0][m as usize] {
                            continue;
                        }
                        let t = day.and_hms_opt(h, m, 0)?.and_utc();
                        if t >= start {
                            return Some(t.timestamp());
                        }
                    }
                }
            }
            day = day.checked_add_signed(Duration::days(1))?;
            let _ = start.hour();
        }
        None
    }
}

/// A scheduled policy's `start_time`: epoch digits, or a date-time (`YYYY-MM-DD hh:mm:ss`,
/// RFC 3339, `YYYY-MM-DD`), read as UTC when it names no zone.
pub fn parse_start_time(s: &str) -> Result<i64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) {
        return t
            .parse()
            .map_err(|_| format!("start_time '{t}' is too large"));
    }
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(d.timestamp());
    }
    for f in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(d) = chrono::NaiveDateTime::parse_from_str(t, f) {
            return Ok(d.and_utc().timestamp());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .map_or(0, |x| x.and_utc().timestamp()));
    }
    Err(format!(
        "'start_time' is not a valid Time. Try with YYYY-MM-DD hh:mm:ss or 0YYY-MM-DDThh:mm:ssZ (got '{t}')"
    ))
}

// ---------------------------------------------------------------- validation

fn int_field(
    p: &mut serde_json::Map<String, Value>,
    k: &str,
    min: Option<i64>,
) -> Result<(), String> {
    let Some(v) = p.get(k) else { return Ok(()) };
    let n = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("key '{k}' must be an integer"))?;
    if let Some(m) = min.filter(|m| n < *m) {
        return Err(format!("key '{k}' must be at least {m}"));
    }
    p.insert(k.into(), json!(n));
    Ok(())
}

fn check_type_adjust(p: &mut serde_json::Map<String, Value>) -> Result<(), String> {
    match p.get("type") {
        Some(Value::String(t))
            if ["CHANGE", "CARDINALITY", "PERCENTAGE_CHANGE"].contains(&t.as_str()) => {}
        Some(_) => {
            return Err("key 'type' must be one of CHANGE, CARDINALITY, PERCENTAGE_CHANGE".into())
        }
        None => return Err("Mandatory document key 'type (string)' is missing".into()),
    }
    if !p.contains_key("adjust") {
        return Err("Mandatory document key 'adjust (integer)' is missing".into());
    }
    int_field(p, "adjust", None)?;
    int_field(p, "min_adjust_step", Some(1))
}

/// Validates (and normalises: numeric strings → integers) a VM role's policies as
/// OneFlow's `ROLE_SCHEMA` and `validate_vmvalues` do. The error names the role and the
/// policy index, as OneFlow's messages do.
pub fn validate_role(name: &str, r: &mut serde_json::Map<String, Value>) -> Result<(), String> {
    let non_empty = |k: &str| {
        r.get(k)
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    };
    if (non_empty("elasticity_policies") || non_empty("scheduled_policies"))
        && (r.get("min_vms").is_none() || r.get("max_vms").is_none())
    {
        return Err(format!(
            "Role '{name}' with  'elasticity_policies' or 'scheduled_policies'must define both 'min_vms' and 'max_vms'"
        ));
    }
    for kind in ["elasticity_policies", "scheduled_policies"] {
        let Some(v) = r.get_mut(kind) else { continue };
        let Some(list) = v.as_array_mut() else {
            return Err(format!("Role '{name}': key '{kind}' must be an array"));
        };
        let what = if kind == "elasticity_policies" {
            "elasticity"
        } else {
            "scheduled"
        };
        for (i, p) in list.iter_mut().enumerate() {
            let at = |e: String| format!("Role '{name}', {what} policy #{i} {e}");
            let p = p
                .as_object_mut()
                .ok_or_else(|| at("must be an object".into()))?;
            check_type_adjust(p).map_err(at)?;
            if kind == "elasticity_policies" {
                for k in ["period_number", "period", "cooldown"] {
                    int_field(p, k, Some(0)).map_err(at)?;
                }
                let exp = match p.get("expression") {
                    Some(Value::String(s)) => s.clone(),
                    Some(_) => return Err(at("key 'expression' must be a string".into())),
                    None => {
                        return Err(at(
                            "Mandatory document key 'expression (string)' is missing".into(),
                        ))
                    }
                };
                if exp.is_empty() {
                    return Err(at("'expression' cannot be empty".into()));
                }
                parse(&exp).map_err(|e| at(format!("'expression' parse error: {e}")))?;
            } else {
                let str_of = |k: &str| -> Result<Option<String>, String> {
                    match p.get(k) {
                        None => Ok(None),
                        Some(Value::String(s)) => Ok(Some(s.clone())),
                        Some(_) => Err(format!("key '{k}' must be a string")),
                    }
                };
                match (
                    str_of("start_time").map_err(at)?,
                    str_of("recurrence").map_err(at)?,
                ) {
                    (Some(_), Some(_)) => {
                        return Err(at(
                            "must define 'start_time' or 'recurrence', but not both".into()
                        ))
                    }
                    (Some(s), None) => {
                        parse_start_time(&s).map_err(at)?;
                    }
                    (None, Some(c)) => {
                        Cron::parse(&c)
                            .ok()
                            .and_then(|c| c.next(crate::state::epoch_s()))
                            .ok_or_else(|| {
                                at("'recurrence' is not a valid cron expression".into())
                            })?;
                    }
                    (None, None) => {
                        return Err(at(
                            "needs to define either 'start_time' or 'recurrence'".into()
                        ))
                    }
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- decisions

fn get_i(v: &Value, k: &str) -> i64 {
    v.get(k).and_then(Value::as_i64).unwrap_or(0)
}

/// `calculate_new_cardinality`: CHANGE → `card + adjust`; CARDINALITY → `adjust`;
/// PERCENTAGE_CHANGE → `card ± max(|card·adjust/100| (at least 1), min_adjust_step)`.
/// Then, in the direction of `adjust` only, clamped to `max(card, max_vms)` (up) or
/// `min_vms` (down): a cardinality forced outside the range is not pushed further out.
pub fn new_cardinality(policy: &Value, card: i64, min_vms: i64, max_vms: i64) -> i64 {
    let adjust = get_i(policy, "adjust");
    let max = card.max(max_vms);
    let new = match policy.get("type").and_then(Value::as_str).unwrap_or("") {
        "CHANGE" => card + adjust,
        "CARDINALITY" => adjust,
        "PERCENTAGE_CHANGE" => {
            let change = card as f64 * adjust as f64 / 100.0;
            let sign = if change > 0.0 { 1 } else { -1 };
            let mag = if change.abs() < 1.0 {
                1
            } else {
                change.abs() as i64
            };
            card + sign * mag.max(get_i(policy, "min_adjust_step"))
        }
        _ => return card,
    };
    if adjust > 0 && new > max {
        max
    } else if adjust < 0 && new < min_vms {
        min_vms
    } else {
        new
    }
}

/// What one autoscaler pass decided for a role.
#[derive(Debug, PartialEq)]
pub struct Decision {
    /// Nodes to add (positive) or remove (negative); 0 for none.
    pub diff: i64,
    /// The cooldown OneFlow then stores into the role (`update_role_policies`), or `None`
    /// to leave the role's `cooldown` as it is.
    pub cooldown: Option<i64>,
}

/// `VMRole#scale?` for `role` at `now` (epoch s): scheduled policies first, then
/// elasticity policies, then the implicit scale-up to `min_vms`. Updates the policies'
/// bookkeeping (`last_eval`, `true_evals`, `expression_evaluated`) in `role`.
pub fn decide(role: &mut Value, vms: &[&dyn VmView], now: i64, default_cooldown: i64) -> Decision {
    let card = get_i(role, "cardinality");
    let min_vms = get_i(role, "min_vms");
    let max_vms = get_i(role, "max_vms");
    let role_cooldown = role.get("cooldown").and_then(Value::as_i64);
    if let Some(list) = role
        .get_mut("scheduled_policies")
        .and_then(Value::as_array_mut)
    {
        for p in list.iter_mut() {
            let diff = scheduled(p, card, min_vms, max_vms, now);
            if diff != 0 {
                // scale? returns the scheduled policy's own `cooldown`, which the schema
                // does not have: usually nil, so the role keeps its cooldown.
                let cooldown = p.get("cooldown").and_then(Value::as_i64);
                return Decision { diff, cooldown };
            }
        }
    }
    if let Some(list) = role
        .get_mut("elasticity_policies")
        .and_then(Value::as_array_mut)
    {
        for p in list.iter_mut() {
            let diff = attributes(p, card, min_vms, max_vms, vms, now);
            if diff != 0 {
                let cooldown = p
                    .get("cooldown")
                    .and_then(Value::as_i64)
                    .or(role_cooldown)
                    .unwrap_or(default_cooldown);
                return Decision {
                    diff,
                    cooldown: Some(cooldown),
                };
            }
        }
    }
    if card < min_vms {
        // The implicit rule: back up to min_vms "with no cooldown" (OneFlow then stores
        // cooldown 0 into the role).
        return Decision {
            diff: min_vms - card,
            cooldown: Some(0),
        };
    }
    Decision {
        diff: 0,
        cooldown: None,
    }
}

/// `scale_time?`: fires when the planned time falls in `(last_eval, now]`; the first
/// evaluation only records `last_eval` (no action planned in the past at server start).
fn scheduled(p: &mut Value, card: i64, min_vms: i64, max_vms: i64, now: i64) -> i64 {
    let last = get_i(p, "last_eval");
    p["last_eval"] = json!(now);
    if last == 0 || p.get("adjust").is_none() {
        return 0;
    }
    let start = match p
        .get("start_time")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        Some(s) => parse_start_time(s).ok(),
        None => p
            .get("recurrence")
            .and_then(Value::as_str)
            .and_then(|c| Cron::parse(c).ok())
            .and_then(|c| c.next(last)),
    };
    match start {
        Some(t) if t > last && t <= now => new_cardinality(p, card, min_vms, max_vms) - card,
        _ => 0,
    }
}

/// `scale_attributes?`: evaluated at most once per `period` s; fires once the expression
/// has been true `period_number` consecutive evaluations (`true_evals`, capped there).
fn attributes(
    p: &mut Value,
    card: i64,
    min_vms: i64,
    max_vms: i64,
    vms: &[&dyn VmView],
    now: i64,
) -> i64 {
    let period = get_i(p, "period");
    let period_number = get_i(p, "period_number");
    let last = get_i(p, "last_eval");
    if now < last + period {
        return 0;
    }
    p["last_eval"] = json!(now);
    let (value, shown) = match p.get("expression").and_then(Value::as_str).map(parse) {
        Some(Ok(e)) => eval(&e, vms),
        Some(Err(e)) => (false, format!("Parse error. {e}")),
        None => (false, String::new()),
    };
    let mut evals = 0;
    let mut new = card;
    if value {
        evals = (get_i(p, "true_evals") + 1).min(period_number);
        if evals >= period_number {
            new = new_cardinality(p, card, min_vms, max_vms);
        }
    }
    p["true_evals"] = json!(evals);
    p["expression_evaluated"] = json!(shown);
    new - card
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Vm {
        running: bool,
        user: Vec<(&'static str, &'static str)>,
        monitoring: Vec<(&'static str, &'static str)>,
    }

    impl VmView for Vm {
        fn running(&self) -> bool {
            self.running
        }
        fn lookup(&self, att: &str) -> Option<Option<String>> {
            self.user
                .iter()
                .chain(&self.monitoring)
                .find(|(k, _)| *k == att)
                .map(|(_, v)| Some(v.to_string()))
        }
    }

    fn vm(running: bool, user: &[(&'static str, &'static str)]) -> Vm {
        Vm {
            running,
            user: user.to_vec(),
            monitoring: vec![("CPU", "1.0")],
        }
    }

    fn run(expr: &str, vms: &[Vm]) -> (bool, String) {
        let views: Vec<&dyn VmView> = vms.iter().map(|v| v as &dyn VmView).collect();
        eval(&parse(expr).unwrap(), &views)
    }

    #[test]
    fn grammar_accepts_what_the_treetop_grammar_accepts() {
        for ok in [
            "CPU > 80",
            "CPU>80",
            "  FL_TRAINING_ACTIVE == 1  ",
            "A = 1",
            "A <> 1 & B != 2",
            "A >= 1 && B <= -2.5 || C < 3",
            "!A > 1",
            "! (A > 1)",
            "(A > 1) && (B < 2)",
            "\"CPU\" > 1",
            "'cpu' > 1",
            "1 < 2",
            "A > B",
        ] {
            assert!(parse(ok).is_ok(), "{ok}: {:?}", parse(ok));
        }
        for bad in [
            "",
            "CPU",
            "CPU > ",
            "CPU >> 1",
            "CPU > 1 &&",
            "CPU\t> 1",
            "(CPU > 1",
            "CPU > 1)",
            "1CPU > 1",
            "CPU > 1.",
            "CPU > .5",
            "\"CPU' > 1",
            "A > 1 and B > 2",
            "_A > 1",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains("column") || e.contains("longer"), "{bad}: {e}");
        }
    }

    #[test]
    fn grammar_has_size_and_depth_limits() {
        let deep = format!("{}A > 1{}", "(".repeat(100), ")".repeat(100));
        assert!(parse(&deep).unwrap_err().contains("deeper than 64"));
        let long = format!("A > {}", "1".repeat(MAX_EXPR_LEN));
        assert!(parse(&long).unwrap_err().contains("longer than"));
        let bangs = format!("{}A > 1", "!".repeat(1000));
        assert!(parse(&bangs).is_err());
    }

    #[test]
    fn operators_chain_to_the_right_without_precedence() {
        // OneFlow's grammar: `left && (rest)`, so `F || F && T`... is `F || (F && T)` and
        // `T && F || T` is `T && (F || T)` = true (a precedence grammar would say true too)
        // while `F && F || T` is `F && (F || T)` = false (precedence would say true).
        let vms = [vm(true, &[("A", "1")])];
        assert!(!run("A > 5 && A > 5 || A < 5", &vms).0);
        assert!(run("A < 5 && A > 5 || A < 5", &vms).0);
        // `!` negates the whole rest of the expression.
        assert!(!run("!A > 5 || A < 5", &vms).0);
    }

    #[test]
    fn attributes_average_over_running_vms_rounded_and_absent_is_false() {
        let vms = [
            vm(true, &[("LOAD", "1")]),
            vm(true, &[("LOAD", "2")]),
            vm(true, &[("LOAD", "2")]),
            vm(false, &[("LOAD", "100")]),
            vm(true, &[]),
        ];
        let (v, s) = run("LOAD > 1.6", &vms);
        assert!(v);
        assert_eq!(s, "LOAD[1.67] > 1.6");
        assert_eq!(run("load < 1.67", &vms).1, "LOAD[1.67] < 1.67");
        assert!(!run("load < 1.67", &vms).0);
        // No VM has it: false both ways, never 0.
        assert_eq!(run("GPU < 1", &vms), (false, "GPU[--] < 1".into()));
        assert!(!run("GPU >= 0", &vms).0);
        assert!(run("!GPU >= 0", &vms).0);
        // MONITORING after USER_TEMPLATE.
        assert_eq!(run("CPU == 1", &vms).1, "CPU[1.0] == 1");
        // Quoted names keep their quotes in OneFlow's lookup, so they never match.
        assert_eq!(run("\"LOAD\" > 0", &vms).1, "\"LOAD\"[--] > 0");
        // YES/NO averages to 0 (Ruby's to_f).
        assert!(run("T == 0", &[vm(true, &[("T", "YES")])]).0);
    }

    #[test]
    fn ruby_to_f_takes_the_numeric_prefix() {
        for (s, v) in [
            ("1", 1.0),
            (" 2.5x", 2.5),
            ("-3", -3.0),
            ("1_000", 1000.0),
            ("1e2", 100.0),
            ("YES", 0.0),
            ("", 0.0),
            (".5", 0.0),
            ("7.", 7.0),
        ] {
            assert_eq!(ruby_to_f(s), v, "{s}");
        }
    }

    fn policy(ty: &str, adjust: i64) -> Value {
        json!({"type": ty, "adjust": adjust, "expression": "A > 0"})
    }

    #[test]
    fn new_cardinality_follows_calculate_new_cardinality() {
        assert_eq!(new_cardinality(&policy("CHANGE", 2), 3, 1, 10), 5);
        assert_eq!(new_cardinality(&policy("CHANGE", 5), 8, 1, 10), 10);
        assert_eq!(new_cardinality(&policy("CHANGE", -5), 3, 2, 10), 2);
        assert_eq!(new_cardinality(&policy("CARDINALITY", 4), 2, 1, 10), 4);
        // Outside the range already (forced): up is not pushed beyond the current count.
        assert_eq!(new_cardinality(&policy("CHANGE", 1), 12, 1, 10), 12);
        // PERCENTAGE_CHANGE: 10% of 4 is 0.4 → 1; 50% of 4 → 2; min_adjust_step wins.
        assert_eq!(
            new_cardinality(&policy("PERCENTAGE_CHANGE", 10), 4, 1, 10),
            5
        );
        assert_eq!(
            new_cardinality(&policy("PERCENTAGE_CHANGE", -50), 4, 1, 10),
            2
        );
        let mut p = policy("PERCENTAGE_CHANGE", 10);
        p["min_adjust_step"] = json!(3);
        assert_eq!(new_cardinality(&p, 4, 1, 10), 7);
        assert_eq!(new_cardinality(&policy("BOGUS", 1), 4, 1, 10), 4);
    }

    fn role(policies: Value) -> Value {
        json!({"name": "w", "cardinality": 2, "min_vms": 1, "max_vms": 4, "cooldown": 30,
               "elasticity_policies": policies})
    }

    #[test]
    fn period_number_and_period_gate_the_policy() {
        let mut r = role(
            json!([{"type": "CHANGE", "adjust": 1, "expression": "A == 1",
                                  "period_number": 3, "period": 10, "cooldown": 7}]),
        );
        let on = [vm(true, &[("A", "1")])];
        let views: Vec<&dyn VmView> = on.iter().map(|v| v as &dyn VmView).collect();
        let d = |r: &mut Value, now| decide(r, &views, now, 300);
        assert_eq!(d(&mut r, 1000).diff, 0);
        assert_eq!(r["elasticity_policies"][0]["true_evals"], 1);
        assert_eq!(
            r["elasticity_policies"][0]["expression_evaluated"],
            "A[1.0] == 1"
        );
        // Within the period: not evaluated at all.
        assert_eq!(d(&mut r, 1005).diff, 0);
        assert_eq!(r["elasticity_policies"][0]["true_evals"], 1);
        assert_eq!(d(&mut r, 1010).diff, 0);
        assert_eq!(
            d(&mut r, 1020),
            Decision {
                diff: 1,
                cooldown: Some(7)
            }
        );
        assert_eq!(r["elasticity_policies"][0]["true_evals"], 3);
        // A false evaluation resets the count.
        let off = [vm(true, &[("A", "0")])];
        let views_off: Vec<&dyn VmView> = off.iter().map(|v| v as &dyn VmView).collect();
        assert_eq!(decide(&mut r, &views_off, 1030, 300).diff, 0);
        assert_eq!(r["elasticity_policies"][0]["true_evals"], 0);
    }

    #[test]
    fn cooldown_falls_back_to_the_role_then_the_default_and_min_is_restored() {
        let on = [vm(true, &[("A", "1")])];
        let views: Vec<&dyn VmView> = on.iter().map(|v| v as &dyn VmView).collect();
        let mut r = role(json!([{"type": "CHANGE", "adjust": -1, "expression": "A == 1"}]));
        assert_eq!(decide(&mut r, &views, 1, 300).cooldown, Some(30));
        r.as_object_mut().unwrap().remove("cooldown");
        r["elasticity_policies"][0]["last_eval"] = json!(0);
        assert_eq!(decide(&mut r, &views, 1, 300).cooldown, Some(300));
        // At min already, a scale-down is clamped to no change.
        let mut r = role(json!([{"type": "CHANGE", "adjust": -1, "expression": "A == 1"}]));
        r["cardinality"] = json!(1);
        assert_eq!(decide(&mut r, &views, 1, 300).diff, 0);
        // Below min (forced): the implicit rule scales back up with cooldown 0.
        r["cardinality"] = json!(0);
        r["elasticity_policies"] = json!([]);
        assert_eq!(
            decide(&mut r, &views, 2, 300),
            Decision {
                diff: 1,
                cooldown: Some(0)
            }
        );
    }

    #[test]
    fn scheduled_policies_fire_once_in_their_window() {
        let mut r = json!({"cardinality": 2, "min_vms": 1, "max_vms": 6,
            "scheduled_policies": [{"type": "CARDINALITY", "adjust": 4, "start_time": "1000"}]});
        let d = |r: &mut Value, now| decide(r, &[], now, 300).diff;
        // First evaluation only records the time, even past the start time.
        assert_eq!(d(&mut r, 990), 0);
        assert_eq!(d(&mut r, 999), 0);
        assert_eq!(d(&mut r, 1000), 2);
        assert_eq!(d(&mut r, 1001), 0);
        // Cron: every 5 minutes; fires when a planned minute falls in (last, now].
        let mut r = json!({"cardinality": 2, "min_vms": 1, "max_vms": 6,
            "scheduled_policies": [{"type": "CHANGE", "adjust": 1, "recurrence": "*/5 * * * *"}]});
        assert_eq!(d(&mut r, 600), 0); // first evaluation
        assert_eq!(d(&mut r, 660), 0);
        assert_eq!(d(&mut r, 899), 0);
        assert_eq!(d(&mut r, 900), 1);
        // A start time never reached on first sight does not fire later either.
        let mut r = json!({"cardinality": 2, "min_vms": 1, "max_vms": 6,
            "scheduled_policies": [{"type": "CHANGE", "adjust": 1, "start_time": "2000-01-01 00:00:00"}]});
        assert_eq!(d(&mut r, 1_700_000_000), 0);
        assert_eq!(d(&mut r, 1_700_000_090), 0);
    }

    #[test]
    fn cron_next_matches_vixie_cron() {
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-12-03T13:30:20Z")
            .unwrap()
            .timestamp();
        let at = |c: &str| {
            chrono::DateTime::from_timestamp(Cron::parse(c).unwrap().next(t0).unwrap(), 0)
                .unwrap()
                .to_rfc3339()
        };
        assert_eq!(at("* * * * *"), "2026-12-03T13:31:00+00:00");
        assert_eq!(
            at("0 9 * * mon,tue,wed,thu,fri"),
            "2026-12-04T09:00:00+00:00"
        );
        assert_eq!(at("0 18 * * MON-FRI"), "2026-12-03T18:00:00+00:00");
        assert_eq!(at("0 0 * * 7"), "2026-12-06T00:00:00+00:00");
        assert_eq!(at("15 */6 1 jan *"), "2027-01-01T00:15:00+00:00");
        // Both day fields restricted: either matches (the 5th, or a Monday).
        assert_eq!(at("0 0 5 * mon"), "2026-12-05T00:00:00+00:00");
        for bad in [
            "* * * *",
            "60 * * * *",
            "* * * * fun",
            "*/0 * * * *",
            "5-1 * * * *",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Cron::parse("0 0 31 2 *").unwrap().next(t0), None);
    }

    #[test]
    fn validation_rejects_what_oneflow_rejects() {
        let check = |r: Value| {
            let mut r = r;
            validate_role("w", r.as_object_mut().unwrap())
        };
        let base = |p: Value| json!({"min_vms": 1, "max_vms": 3, "elasticity_policies": [p]});
        assert!(check(base(
            json!({"type": "CHANGE", "adjust": "1", "expression": "A > 1",
                                  "period": "5"})
        ))
        .is_ok());
        let e = check(
            json!({"elasticity_policies": [{"type": "CHANGE", "adjust": 1,
                                                       "expression": "A > 1"}]}),
        )
        .unwrap_err();
        assert!(
            e.contains("must define both 'min_vms' and 'max_vms'"),
            "{e}"
        );
        for (p, want) in [
            (
                json!({"type": "UP", "adjust": 1, "expression": "A > 1"}),
                "key 'type'",
            ),
            (
                json!({"type": "CHANGE", "expression": "A > 1"}),
                "'adjust (integer)'",
            ),
            (
                json!({"type": "CHANGE", "adjust": 1}),
                "'expression (string)'",
            ),
            (
                json!({"type": "CHANGE", "adjust": 1, "expression": ""}),
                "cannot be empty",
            ),
            (
                json!({"type": "CHANGE", "adjust": 1, "expression": "A >"}),
                "parse error",
            ),
            (
                json!({"type": "CHANGE", "adjust": 1, "expression": "A > 1", "period": -1}),
                "'period'",
            ),
            (
                json!({"type": "CHANGE", "adjust": 1, "expression": "A > 1", "min_adjust_step": 0}),
                "'min_adjust_step'",
            ),
        ] {
            let e = check(base(p)).unwrap_err();
            assert!(
                e.starts_with("Role 'w', elasticity policy #0") && e.contains(want),
                "{e}"
            );
        }
        let sched = |p: Value| json!({"min_vms": 1, "max_vms": 3, "scheduled_policies": [p]});
        assert!(check(sched(
            json!({"type": "CHANGE", "adjust": 1, "recurrence": "0 9 * * mon"})
        ))
        .is_ok());
        for (p, want) in [
            (
                json!({"type": "CHANGE", "adjust": 1}),
                "either 'start_time' or 'recurrence'",
            ),
            (
                json!({"type": "CHANGE", "adjust": 1, "start_time": "1", "recurrence": "* * * * *"}),
                "not both",
            ),
            (
                json!({"type": "CHANGE", "adjust": 1, "start_time": "tomorrow"}),
                "not a valid Time",
            ),
            (
                json!({"type": "CHANGE", "adjust": 1, "recurrence": "every day"}),
                "not a valid cron",
            ),
        ] {
            let e = check(sched(p)).unwrap_err();
            assert!(
                e.starts_with("Role 'w', scheduled policy #0") && e.contains(want),
                "{e}"
            );
        }
    }
}
