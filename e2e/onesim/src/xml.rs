//! A minimal XML DOM (for XML-RPC requests and `<TEMPLATE>` input) and the escaping helpers
//! used by every renderer. Written for onesim only; shares nothing with the client codec.

use quick_xml::events::Event;
use quick_xml::Reader;

/// Nesting deeper than this is rejected: untrusted input must not exhaust the stack.
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Elem {
    pub name: String,
    pub text: String,
    pub children: Vec<Elem>,
}

impl Elem {
    pub fn child(&self, name: &str) -> Option<&Elem> {
        self.children.iter().find(|c| c.name == name)
    }
}

/// Parses a document into its root element. Errors carry the byte position.
pub fn parse(input: &str) -> Result<Elem, String> {
    let mut reader = Reader::from_str(input);
    reader.config_mut().trim_text(false);
    let mut stack: Vec<Elem> = Vec::new();
    let mut root: Option<Elem> = None;
    loop {
        let pos = reader.buffer_position();
        let ev = reader
            .read_event()
            .map_err(|e| format!("XML parse error at byte {pos}: {e}"))?;
        match ev {
            Event::Start(s) => {
                if root.is_some() {
                    return Err(format!("XML parse error at byte {pos}: content after root"));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(format!("XML parse error at byte {pos}: nesting too deep"));
                }
                let name = s.name().as_ref().to_owned();
                stack.push(Elem {
                    name,
                    ..Elem::default()
                });
            }
            Event::Empty(s) => {
                let name = s.name().as_ref().to_owned();
                let el = Elem {
                    name,
                    ..Elem::default()
                };
                attach(&mut stack, &mut root, el, pos)?;
            }
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| format!("XML parse error at byte {pos}: unexpected end tag"))?;
                attach(&mut stack, &mut root, el, pos)?;
            }
            Event::Text(t) => {
                push_text(&mut stack, &t, pos)?;
            }
            Event::CData(t) => {
                push_text(&mut stack, &t, pos)?;
            }
            Event::GeneralRef(r) => {
                let c = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    Ok(None) => match &*r {
                        "lt" => "<".into(),
                        "gt" => ">".into(),
                        "amp" => "&".into(),
                        "apos" => "'".into(),
                        "quot" => "\"".into(),
                        other => {
                            return Err(format!(
                                "XML parse error at byte {pos}: unknown entity &{other};"
                            ))
                        }
                    },
                    Err(e) => return Err(format!("XML parse error at byte {pos}: {e}")),
                };
                push_text(&mut stack, &c, pos)?;
            }
            Event::Eof => break,
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err("XML parse error: unexpected end of document".into());
    }
    root.ok_or_else(|| "XML parse error: no root element".into())
}

fn attach(stack: &mut [Elem], root: &mut Option<Elem>, el: Elem, pos: u64) -> Result<(), String> {
    match stack.last_mut() {
        Some(parent) => parent.children.push(el),
        None if root.is_none() => *root = Some(el),
        None => return Err(format!("XML parse error at byte {pos}: more than one root")),
    }
    Ok(())
}

fn push_text(stack: &mut [Elem], s: &str, pos: u64) -> Result<(), String> {
    match stack.last_mut() {
        Some(el) => el.text.push_str(s),
        None if s.trim().is_empty() => {}
        None => {
            return Err(format!(
                "XML parse error at byte {pos}: text outside the root"
            ))
        }
    }
    Ok(())
}

/// Escapes text for element content.
pub fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['&', '<', '>']) {
        return s.into();
    }
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .into()
}

/// Appends `<![CDATA[v]]>`, splitting any `]]>` inside the value (as oned's escape does).
pub fn push_cdata(out: &mut String, v: &str) {
    out.push_str("<![CDATA[");
    out.push_str(&v.replace("]]>", "]]]]><![CDATA[>"));
    out.push_str("]]>");
}

/// Appends `<NAME><![CDATA[v]]></NAME>`.
pub fn push_cdata_el(out: &mut String, name: &str, v: &str) {
    out.push('<');
    out.push_str(name);
    out.push('>');
    push_cdata(out, v);
    out.push_str("</");
    out.push_str(name);
    out.push('>');
}

/// Appends `<NAME>text</NAME>` with escaped text.
pub fn push_el(out: &mut String, name: &str, v: impl std::fmt::Display) {
    use std::fmt::Write;
    let s = v.to_string();
    let _ = write!(out, "<{name}>{}</{name}>", esc(&s));
}

/// Converts an element to the hash shape OpenNebula's Ruby servers produce: leaf → string,
/// repeated children → arrays, containers listed in `always_obj` → `{}` when empty.
pub fn to_json(el: &Elem) -> serde_json::Value {
    use serde_json::{Map, Value};
    if el.children.is_empty() {
        if CONTAINERS.contains(&el.name.as_str()) {
            return Value::Object(Map::new());
        }
        return Value::String(el.text.clone());
    }
    let mut map = Map::new();
    for c in &el.children {
        let v = to_json(c);
        match map.get_mut(&c.name) {
            // to_json never yields an array itself, so an array here is a repeated child.
            Some(Value::Array(a)) => a.push(v),
            Some(existing) => {
                let prev = existing.take();
                *existing = Value::Array(vec![prev, v]);
            }
            None => {
                map.insert(c.name.clone(), v);
            }
        }
    }
    Value::Object(map)
}

const CONTAINERS: &[&str] = &[
    "TEMPLATE",
    "USER_TEMPLATE",
    "MONITORING",
    "HISTORY_RECORDS",
    "SCHED_ACTIONS",
    "BACKUP_CONFIG",
    "BACKUP_IDS",
    "BACKUPS",
    "PERMISSIONS",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nested_with_cdata_and_entities() {
        let e =
            parse("<?xml version=\"1.0\"?><A><B><![CDATA[x<y]]></B><C>a&amp;b&#65;</C><D/></A>")
                .unwrap();
        assert_eq!(e.child("B").unwrap().text, "x<y");
        assert_eq!(e.child("C").unwrap().text, "a&bA");
        assert!(e.child("D").is_some());
    }

    #[test]
    fn rejects_malformed_and_deep() {
        assert!(parse("<A><B></A>").is_err());
        assert!(parse("<A>").is_err());
        assert!(parse("").is_err());
        assert!(parse(&"<a>".repeat(100)).is_err());
    }

    #[test]
    fn cdata_split() {
        let mut s = String::new();
        push_cdata(&mut s, "a]]>b");
        assert_eq!(s, "<![CDATA[a]]]]><![CDATA[>b]]>");
        assert_eq!(parse(&format!("<X>{s}</X>")).unwrap().text, "a]]>b");
    }
}
