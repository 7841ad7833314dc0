//! OpenNebula templates: the text syntax (`KEY = value`, `KEY = "quoted"`, `K = [ A = "1" ]`),
//! `<TEMPLATE>` XML input, merge/replace semantics, and the XML/JSON renderings oned uses
//! (CDATA values, attributes sorted byte-wise, duplicates in insertion order).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as J};

use crate::xml;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Val {
    S(String),
    /// Sub-attributes, unique names kept sorted (oned stores them in a std::map).
    V(Vec<(String, String)>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attr {
    pub name: String,
    pub val: Val,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Template {
    pub attrs: Vec<Attr>,
}

/// Upper-cases a name; names not starting with a letter/underscore or starting with XML get
/// the `ONE_` prefix, as oned's lexer does.
pub fn norm_name(n: &str) -> String {
    let up = n.to_ascii_uppercase();
    let first_ok = up
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || up.starts_with("XML") {
        format!("ONE_{up}")
    } else {
        up
    }
}

pub fn vec_set(v: &mut Vec<(String, String)>, k: &str, val: &str) {
    match v.binary_search_by(|(n, _)| n.as_str().cmp(k)) {
        Ok(i) => v[i].1 = val.to_string(),
        Err(i) => v.insert(i, (k.to_string(), val.to_string())),
    }
}

pub fn vec_get<'a>(v: &'a [(String, String)], k: &str) -> Option<&'a str> {
    v.iter().find(|(n, _)| n == k).map(|(_, x)| x.as_str())
}

impl Template {
    /// Parses template text or, when it starts with `<`, `<TEMPLATE>` XML.
    pub fn parse(input: &str) -> Result<Template, String> {
        if input.trim_start().starts_with('<') {
            Self::parse_xml(input)
        } else {
            Self::parse_text(input)
        }
    }

    pub fn parse_xml(input: &str) -> Result<Template, String> {
        let root = xml::parse(input)?;
        let mut t = Template::default();
        for c in &root.children {
            let val = if c.children.is_empty() {
                Val::S(c.text.clone())
            } else {
                let mut v = Vec::new();
                for s in &c.children {
                    vec_set(&mut v, &norm_name(&s.name), &s.text);
                }
                Val::V(v)
            };
            t.attrs.push(Attr {
                name: norm_name(&c.name),
                val,
            });
        }
        Ok(t)
    }

    pub fn parse_text(input: &str) -> Result<Template, String> {
        let mut p = TextParser {
            s: input.as_bytes(),
            i: 0,
            line: 1,
        };
        let mut t = Template::default();
        loop {
            p.skip_ws_nl();
            if p.eof() {
                break;
            }
            let name = p.name()?;
            p.skip_ws();
            p.expect(b'=')?;
            p.skip_ws();
            let val = if p.peek() == Some(b'[') {
                p.i += 1;
                Val::V(p.vector()?)
            } else if p.peek() == Some(b'"') {
                Val::S(p.quoted()?)
            } else {
                Val::S(p.bare(b"\n#")?.trim_end().to_string())
            };
            t.attrs.push(Attr {
                name: norm_name(&name),
                val,
            });
            p.skip_ws();
            match p.peek() {
                None | Some(b'\n') | Some(b'\r') | Some(b'#') => {}
                Some(_) => return Err(p.err("unexpected characters after value")),
            }
        }
        Ok(t)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find_map(|a| match &a.val {
            Val::S(s) if a.name == name => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn get_vec(&self, name: &str) -> Option<&Vec<(String, String)>> {
        self.attrs.iter().find_map(|a| match &a.val {
            Val::V(v) if a.name == name => Some(v),
            _ => None,
        })
    }

    pub fn get_vec_mut(&mut self, name: &str) -> Option<&mut Vec<(String, String)>> {
        self.attrs.iter_mut().find_map(|a| match &mut a.val {
            Val::V(v) if a.name == name => Some(v),
            _ => None,
        })
    }

    pub fn vecs<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Vec<(String, String)>> + 'a {
        self.attrs.iter().filter_map(move |a| match &a.val {
            Val::V(v) if a.name == name => Some(v),
            _ => None,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.attrs.iter().any(|a| a.name == name)
    }

    pub fn set(&mut self, name: &str, v: &str) {
        self.remove(name);
        self.attrs.push(Attr {
            name: name.to_string(),
            val: Val::S(v.to_string()),
        });
    }

    pub fn push(&mut self, a: Attr) {
        self.attrs.push(a);
    }

    pub fn remove(&mut self, name: &str) -> bool {
        let n = self.attrs.len();
        self.attrs.retain(|a| a.name != name);
        n != self.attrs.len()
    }

    /// `Template::merge`: every name present in `other` replaces all same-named attributes;
    /// an empty vector (`X=[]`) deletes `X`.
    pub fn merge(&mut self, other: &Template) {
        for a in &other.attrs {
            self.remove(&a.name);
        }
        for a in &other.attrs {
            if matches!(&a.val, Val::V(v) if v.is_empty()) {
                continue;
            }
            self.attrs.push(a.clone());
        }
    }

    /// Attributes in oned's output order: byte-wise by name, duplicates in insertion order.
    pub fn sorted(&self) -> Vec<&Attr> {
        let mut v: Vec<&Attr> = self.attrs.iter().collect();
        v.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        v
    }

    /// Appends the attributes as XML (without the wrapping element).
    pub fn push_xml_body(&self, out: &mut String) {
        for a in self.sorted() {
            push_attr_xml(out, a);
        }
    }

    /// `<ROOT>…</ROOT>`; an empty template renders as `<ROOT></ROOT>` like oned's full bodies.
    pub fn to_xml(&self, root: &str, out: &mut String) {
        out.push('<');
        out.push_str(root);
        out.push('>');
        self.push_xml_body(out);
        out.push_str("</");
        out.push_str(root);
        out.push('>');
    }

    /// Template text that `parse_text` reads back identically.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for a in &self.attrs {
            out.push_str(&a.name);
            out.push('=');
            match &a.val {
                Val::S(s) => out.push_str(&quote(s)),
                Val::V(v) => {
                    out.push('[');
                    let parts: Vec<String> =
                        v.iter().map(|(k, x)| format!("{k}={}", quote(x))).collect();
                    out.push_str(&parts.join(","));
                    out.push(']');
                }
            }
            out.push('\n');
        }
        out
    }

    /// The hash shape of Ruby's XML→hash: vectors as objects, repeated names as arrays.
    pub fn to_json(&self, skip: &[&str]) -> J {
        let mut m = Map::new();
        for a in self.sorted() {
            if skip.contains(&a.name.as_str()) {
                continue;
            }
            let v = match &a.val {
                Val::S(s) => J::String(s.clone()),
                Val::V(v) => J::Object(
                    v.iter()
                        .map(|(k, x)| (k.clone(), J::String(x.clone())))
                        .collect(),
                ),
            };
            match m.get_mut(&a.name) {
                Some(J::Array(arr)) => arr.push(v),
                Some(prev) => {
                    let p = prev.take();
                    *prev = J::Array(vec![p, v]);
                }
                None => {
                    m.insert(a.name.clone(), v);
                }
            }
        }
        J::Object(m)
    }

    /// Builds a template from a JSON object (OneFlow 7.x `template_contents`): scalars → single
    /// attributes, objects → vectors, arrays → repeated attributes.
    pub fn from_json(v: &J) -> Result<Template, String> {
        let obj = v
            .as_object()
            .ok_or("template contents must be a JSON object")?;
        let mut t = Template::default();
        for (k, v) in obj {
            let name = norm_name(k);
            let items: Vec<&J> = match v {
                J::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            for it in items {
                let val = match it {
                    J::Object(o) => {
                        let mut vv = Vec::new();
                        for (sk, sv) in o {
                            vec_set(&mut vv, &norm_name(sk), &json_scalar(sv));
                        }
                        Val::V(vv)
                    }
                    other => Val::S(json_scalar(other)),
                };
                t.attrs.push(Attr {
                    name: name.clone(),
                    val,
                });
            }
        }
        Ok(t)
    }
}

pub fn json_scalar(v: &J) -> String {
    match v {
        J::String(s) => s.clone(),
        J::Null => String::new(),
        other => other.to_string(),
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn push_attr_xml(out: &mut String, a: &Attr) {
    out.push('<');
    out.push_str(&a.name);
    out.push('>');
    match &a.val {
        Val::S(s) => xml::push_cdata(out, s),
        Val::V(v) => {
            for (k, x) in v {
                out.push('<');
                out.push_str(k);
                out.push('>');
                xml::push_cdata(out, x);
                out.push_str("</");
                out.push_str(k);
                out.push('>');
            }
        }
    }
    out.push_str("</");
    out.push_str(&a.name);
    out.push('>');
}

struct TextParser<'a> {
    s: &'a [u8],
    i: usize,
    line: usize,
}

impl TextParser<'_> {
    fn eof(&self) -> bool {
        self.i >= self.s.len()
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn err(&self, what: &str) -> String {
        format!("Parse error: {what} at line {}", self.line)
    }
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r')) {
            self.i += 1;
        }
    }
    /// Whitespace, newlines and `#` comments.
    fn skip_ws_nl(&mut self) {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\r') => self.i += 1,
                Some(b'\n') => {
                    self.i += 1;
                    self.line += 1;
                }
                Some(b'#') => {
                    while !matches!(self.peek(), None | Some(b'\n')) {
                        self.i += 1;
                    }
                }
                _ => return,
            }
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", c as char)))
        }
    }
    fn name(&mut self) -> Result<String, String> {
        let start = self.i;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
        {
            self.i += 1;
        }
        if start == self.i {
            return Err(self.err("expected an attribute name"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn quoted(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated quoted value")),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') if matches!(self.s.get(self.i + 1), Some(b'"') | Some(b'\\')) => {
                    out.push(self.s[self.i + 1]);
                    self.i += 2;
                }
                Some(c) => {
                    if c == b'\n' {
                        self.line += 1;
                    }
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| self.err("invalid UTF-8"))
    }
    fn bare(&mut self, stops: &[u8]) -> Result<String, String> {
        let start = self.i;
        while matches!(self.peek(), Some(c) if !stops.contains(&c)) {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i])
            .map(str::to_string)
            .map_err(|_| self.err("invalid UTF-8"))
    }
    fn vector(&mut self) -> Result<Vec<(String, String)>, String> {
        let mut v = Vec::new();
        loop {
            self.skip_ws_nl();
            match self.peek() {
                None => return Err(self.err("unterminated vector")),
                Some(b']') => {
                    self.i += 1;
                    return Ok(v);
                }
                Some(b',') => {
                    self.i += 1;
                    continue;
                }
                _ => {}
            }
            let k = norm_name(&self.name()?);
            self.skip_ws();
            self.expect(b'=')?;
            self.skip_ws();
            let val = if self.peek() == Some(b'"') {
                self.quoted()?
            } else {
                self.bare(b",]\n")?.trim_end().to_string()
            };
            vec_set(&mut v, &k, &val);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_syntax() {
        let t = Template::parse(
            "cpu = 1\nMEMORY = \"512\" # c\n# comment\nNIC = [ NETWORK_ID = \"0\", model=virtio ]\nE=[]\nQ=\"a \\\"b\\\"\"\n1X=2",
        )
        .unwrap();
        assert_eq!(t.get("CPU"), Some("1"));
        assert_eq!(t.get("MEMORY"), Some("512"));
        let nic = t.get_vec("NIC").unwrap();
        assert_eq!(vec_get(nic, "MODEL"), Some("virtio"));
        assert_eq!(vec_get(nic, "NETWORK_ID"), Some("0"));
        assert_eq!(t.get_vec("E").map(Vec::len), Some(0));
        assert_eq!(t.get("Q"), Some("a \"b\""));
        assert_eq!(t.get("ONE_1X"), Some("2"));
    }

    #[test]
    fn multiline_vector_and_errors() {
        let t = Template::parse("CONTEXT = [\n  A = \"1\",\n  B = \"2\"\n]\n").unwrap();
        assert_eq!(t.get_vec("CONTEXT").unwrap().len(), 2);
        assert!(Template::parse("A = \"x").unwrap_err().contains("line 1"));
        assert!(Template::parse("= x").is_err());
        assert!(Template::parse("A=[B=1").is_err());
        assert!(Template::parse("A \"x\"").is_err());
    }

    #[test]
    fn xml_input_and_sorted_output() {
        let t = Template::parse(
            "<TEMPLATE><b>2</b><A><![CDATA[1]]></A><NIC><IP>x</IP></NIC><A>3</A></TEMPLATE>",
        )
        .unwrap();
        let mut s = String::new();
        t.to_xml("T", &mut s);
        assert_eq!(
            s,
            "<T><A><![CDATA[1]]></A><A><![CDATA[3]]></A><B><![CDATA[2]]></B><NIC><IP><![CDATA[x]]></IP></NIC></T>"
        );
    }

    #[test]
    fn merge_replaces_and_deletes() {
        let mut t = Template::parse("A=1\nA=2\nB=3\nV=[X=1]").unwrap();
        t.merge(&Template::parse("A=9\nV=[]\nC=").unwrap());
        assert_eq!(t.get("A"), Some("9"));
        assert_eq!(t.attrs.iter().filter(|a| a.name == "A").count(), 1);
        assert!(!t.has("V"));
        assert_eq!(t.get("C"), Some(""));
        assert_eq!(t.get("B"), Some("3"));
    }

    #[test]
    fn text_round_trip() {
        let t = Template::parse("A=\"x \\\"y\\\" z\"\nV=[K=\"1,2\",L=\"]\"]").unwrap();
        assert_eq!(Template::parse(&t.to_text()).unwrap(), t);
    }
}
