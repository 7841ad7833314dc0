//! The XML-RPC envelope: `methodCall` parsing and `methodResponse` rendering (success array,
//! OpenNebula failure array with `<i8>`, and xmlrpc-c style `<fault>`).

use std::fmt::Write;

use crate::xml::{self, esc, Elem};

#[derive(Debug, Clone, PartialEq)]
pub enum XVal {
    Int(i64),
    Bool(bool),
    Str(String),
    Double(f64),
    Array(Vec<XVal>),
    Struct(Vec<(String, XVal)>),
    Base64(String),
    DateTime(String),
    Nil,
}

impl XVal {
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            XVal::Int(i) => J::from(*i),
            XVal::Bool(b) => J::Bool(*b),
            XVal::Str(s) | XVal::Base64(s) | XVal::DateTime(s) => J::String(s.clone()),
            XVal::Double(d) => J::from(*d),
            XVal::Array(a) => J::Array(a.iter().map(XVal::to_json).collect()),
            XVal::Struct(m) => J::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()),
            XVal::Nil => J::Null,
        }
    }
}

/// xmlrpc-c fault codes.
pub const FAULT_TYPE: i32 = -501;
pub const FAULT_INDEX: i32 = -502;
pub const FAULT_PARSE: i32 = -503;
pub const FAULT_NO_METHOD: i32 = -506;
pub const FAULT_LIMIT: i32 = -509;

#[derive(Debug)]
pub struct Call {
    pub method: String,
    pub params: Vec<XVal>,
}

pub fn parse_call(body: &str) -> Result<Call, String> {
    let root = xml::parse(body)?;
    if root.name != "methodCall" {
        return Err(format!("expected <methodCall>, found <{}>", root.name));
    }
    let method = root
        .child("methodName")
        .map(|m| m.text.trim().to_string())
        .filter(|m| !m.is_empty())
        .ok_or("missing <methodName>")?;
    let mut params = Vec::new();
    if let Some(ps) = root.child("params") {
        for p in &ps.children {
            if p.name != "param" {
                return Err(format!("unexpected <{}> in <params>", p.name));
            }
            let v = p.child("value").ok_or("<param> without <value>")?;
            params.push(parse_value(v)?);
        }
    }
    Ok(Call { method, params })
}

fn parse_value(v: &Elem) -> Result<XVal, String> {
    let Some(t) = v.children.first() else {
        return Ok(XVal::Str(v.text.clone()));
    };
    let txt = t.text.trim();
    Ok(match t.name.as_str() {
        "i4" | "int" | "i8" => XVal::Int(
            txt.parse()
                .map_err(|_| format!("invalid integer '{txt}'"))?,
        ),
        "boolean" => match txt {
            "1" => XVal::Bool(true),
            "0" => XVal::Bool(false),
            _ => return Err(format!("invalid boolean '{txt}'")),
        },
        "string" => XVal::Str(t.text.clone()),
        "double" => XVal::Double(txt.parse().map_err(|_| format!("invalid double '{txt}'"))?),
        "base64" => XVal::Base64(txt.to_string()),
        "dateTime.iso8601" => XVal::DateTime(txt.to_string()),
        "nil" => XVal::Nil,
        "array" => {
            let data = t.child("data").ok_or("<array> without <data>")?;
            XVal::Array(
                data.children
                    .iter()
                    .map(parse_value)
                    .collect::<Result<_, _>>()?,
            )
        }
        "struct" => {
            let mut m = Vec::new();
            for mem in &t.children {
                let name = mem
                    .child("name")
                    .ok_or("<member> without <name>")?
                    .text
                    .clone();
                let val = mem.child("value").ok_or("<member> without <value>")?;
                m.push((name, parse_value(val)?));
            }
            XVal::Struct(m)
        }
        other => return Err(format!("unknown value type <{other}>")),
    })
}

/// A successful or failed method result, rendered as OpenNebula's response array.
#[derive(Debug, Clone)]
pub enum Resp {
    Ok(OkVal),
    Err {
        msg: String,
        code: i32,
        resp_id: i64,
    },
    Fault {
        code: i32,
        msg: String,
    },
}

#[derive(Debug, Clone)]
pub enum OkVal {
    Str(String),
    Int(i64),
    Bool(bool),
}

pub fn render(r: &Resp) -> String {
    let mut out = String::with_capacity(256);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\r\n<methodResponse>\r\n");
    match r {
        Resp::Fault { code, msg } => {
            let _ = write!(
                out,
                "<fault>\r\n<value><struct>\r\n<member><name>faultCode</name>\r\n<value><i4>{code}</i4></value></member>\r\n<member><name>faultString</name>\r\n<value><string>{}</string></value></member>\r\n</struct></value>\r\n</fault>\r\n",
                esc(msg)
            );
        }
        Resp::Ok(v) => {
            out.push_str("<params>\r\n<param><value><array><data>\r\n<value><boolean>1</boolean></value>\r\n");
            match v {
                OkVal::Str(s) => {
                    out.push_str("<value><string>");
                    out.push_str(&esc(s));
                    out.push_str("</string></value>\r\n");
                }
                OkVal::Int(i) => {
                    let _ = write!(out, "<value><i4>{i}</i4></value>\r\n");
                }
                OkVal::Bool(b) => {
                    let _ = write!(
                        out,
                        "<value><boolean>{}</boolean></value>\r\n",
                        u8::from(*b)
                    );
                }
            }
            out.push_str(
                "<value><i4>0</i4></value>\r\n</data></array></value></param>\r\n</params>\r\n",
            );
        }
        Resp::Err { msg, code, resp_id } => {
            let _ = write!(
                out,
                "<params>\r\n<param><value><array><data>\r\n<value><boolean>0</boolean></value>\r\n<value><string>{}</string></value>\r\n<value><i4>{code}</i4></value>\r\n<value><i4>{resp_id}</i4></value>\r\n<value><i8>-1</i8></value>\r\n</data></array></value></param>\r\n</params>\r\n",
                esc(msg)
            );
        }
    }
    out.push_str("</methodResponse>\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_call_with_types() {
        let c = parse_call(
            "<?xml version='1.0'?><methodCall><methodName>one.vm.action</methodName><params>\
             <param><value><string>a:b</string></value></param>\
             <param><value>bare</value></param>\
             <param><value><i4>-3</i4></value></param>\
             <param><value><boolean>1</boolean></value></param>\
             <param><value><array><data><value><int>1</int></value></data></array></value></param>\
             <param><value><struct><member><name>k</name><value><string>v</string></value></member></struct></value></param>\
             </params></methodCall>",
        )
        .unwrap();
        assert_eq!(c.method, "one.vm.action");
        assert_eq!(c.params[0], XVal::Str("a:b".into()));
        assert_eq!(c.params[1], XVal::Str("bare".into()));
        assert_eq!(c.params[2], XVal::Int(-3));
        assert_eq!(c.params[3], XVal::Bool(true));
        assert_eq!(c.params[4], XVal::Array(vec![XVal::Int(1)]));
        assert!(matches!(&c.params[5], XVal::Struct(m) if m.len() == 1));
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse_call("<methodCall><methodName>x</methodName><params><param><value><i4>z</i4></value></param></params></methodCall>").is_err());
        assert!(parse_call("<foo/>").is_err());
        assert!(parse_call("<methodCall></methodCall>").is_err());
    }
}
