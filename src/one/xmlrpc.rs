//! XML-RPC codec for oned (opennebula-api.md §1.2): `methodCall` encoding, `methodResponse`
//! decoding (values, arrays, structs, `<i8>`, faults) and OpenNebula's result arrays
//! `[true, value, 0]` / `[false, message, code, resp_id, <i8>-1]`.

use std::borrow::Cow;
use std::fmt;
use std::fmt::Write as _;

use quick_xml::events::Event;
use quick_xml::name::QName;
use quick_xml::Reader;

use super::xml::{XmlError, MAX_DEPTH};

/// A parameter of a `methodCall`.
#[derive(Clone, PartialEq)]
pub enum Param<'a> {
    /// `<string>`.
    Str(Cow<'a, str>),
    /// `<int>` (i4).
    Int(i32),
    /// `<boolean>`.
    Bool(bool),
    /// `<i8>`.
    I8(i64),
}

impl fmt::Debug for Param<'_> {
    // Strings may be the session or a template: never print them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Param::Str(s) => write!(f, "Str(<{} bytes>)", s.len()),
            Param::Int(i) => write!(f, "Int({i})"),
            Param::Bool(b) => write!(f, "Bool({b})"),
            Param::I8(i) => write!(f, "I8({i})"),
        }
    }
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(s: &'a str) -> Self {
        Param::Str(Cow::Borrowed(s))
    }
}

impl From<String> for Param<'_> {
    fn from(s: String) -> Self {
        Param::Str(Cow::Owned(s))
    }
}

impl From<i32> for Param<'_> {
    fn from(i: i32) -> Self {
        Param::Int(i)
    }
}

impl From<bool> for Param<'_> {
    fn from(b: bool) -> Self {
        Param::Bool(b)
    }
}

/// A string parameter holds a character XML 1.0 cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter {index} holds a control character XML cannot carry")]
pub struct EncodeError {
    /// 0-based parameter index.
    pub index: usize,
}

fn xml_char_ok(c: char) -> bool {
    !c.is_control() || matches!(c, '\t' | '\n' | '\r')
}

/// Encode a `methodCall`.
pub fn encode_call(method: &str, params: &[Param<'_>]) -> Result<String, EncodeError> {
    let mut out = String::with_capacity(
        128 + params
            .iter()
            .map(|p| match p {
                Param::Str(s) => s.len() + 40,
                _ => 40,
            })
            .sum::<usize>(),
    );
    out.push_str("<?xml version=\"1.0\"?>\n<methodCall><methodName>");
    push_escaped(&mut out, method);
    out.push_str("</methodName><params>");
    for (index, p) in params.iter().enumerate() {
        out.push_str("<param><value>");
        match p {
            Param::Str(s) => {
                if !s.chars().all(xml_char_ok) {
                    return Err(EncodeError { index });
                }
                out.push_str("<string>");
                push_escaped(&mut out, s);
                out.push_str("</string>");
            }
            Param::Int(i) => {
                let _ = write!(out, "<int>{i}</int>");
            }
            Param::Bool(b) => {
                let _ = write!(out, "<boolean>{}</boolean>", u8::from(*b));
            }
            Param::I8(i) => {
                let _ = write!(out, "<i8>{i}</i8>");
            }
        }
        out.push_str("</value></param>");
    }
    out.push_str("</params></methodCall>\n");
    Ok(out)
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            // Keep CR from being normalised away by the server's XML parser.
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

/// A decoded XML-RPC value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `<string>` or an untyped `<value>`.
    Str(String),
    /// `<int>`, `<i4>` or `<i8>`.
    Int(i64),
    /// `<boolean>`.
    Bool(bool),
    /// `<double>`.
    Double(f64),
    /// `<array>`.
    Array(Vec<Value>),
    /// `<struct>` (members in order).
    Struct(Vec<(String, Value)>),
    /// `<nil/>`.
    Nil,
    /// `<base64>` / `<dateTime.iso8601>`, raw text.
    Other(String),
}

impl Value {
    /// A short type name for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "string",
            Value::Int(_) => "int",
            Value::Bool(_) => "boolean",
            Value::Double(_) => "double",
            Value::Array(_) => "array",
            Value::Struct(_) => "struct",
            Value::Nil => "nil",
            Value::Other(_) => "other",
        }
    }
}

/// A decoded `methodResponse`.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// `<params><param><value>…`.
    Value(Value),
    /// `<fault>` with faultCode / faultString.
    Fault {
        /// faultCode.
        code: i64,
        /// faultString.
        message: String,
    },
}

fn err(reader: &Reader<&[u8]>, reason: impl Into<String>) -> XmlError {
    XmlError::malformed(reader.buffer_position(), reason)
}

/// Next event that is not whitespace, a comment or a declaration.
fn next<'a>(reader: &mut Reader<&'a [u8]>) -> Result<Event<'a>, XmlError> {
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| err(reader, e.to_string()))?;
        match ev {
            Event::Text(ref t) if t.trim_ascii().is_empty() => {}
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            other => return Ok(other),
        }
    }
}

fn expect_start(reader: &mut Reader<&[u8]>, name: &str) -> Result<(), XmlError> {
    match next(reader)? {
        Event::Start(e) if e.name().as_ref() == name => Ok(()),
        other => Err(err(
            reader,
            format!("expected <{name}>, found {}", describe(&other)),
        )),
    }
}

fn expect_end(reader: &mut Reader<&[u8]>, name: &str) -> Result<(), XmlError> {
    match next(reader)? {
        Event::End(e) if e.name().as_ref() == name => Ok(()),
        other => Err(err(
            reader,
            format!("expected </{name}>, found {}", describe(&other)),
        )),
    }
}

fn describe(ev: &Event<'_>) -> String {
    match ev {
        Event::Start(e) | Event::Empty(e) => {
            format!("<{}>", e.name().as_ref())
        }
        Event::End(e) => format!("</{}>", e.name().as_ref()),
        Event::Eof => "end of document".into(),
        Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) => "text".into(),
        _ => "markup".into(),
    }
}

/// Decode a `methodResponse` body.
pub fn decode_response(body: &str) -> Result<Response, XmlError> {
    let mut r = Reader::from_str(body);
    r.config_mut().trim_text(false);
    expect_start(&mut r, "methodResponse")?;
    match next(&mut r)? {
        Event::Start(e) if e.name().as_ref() == "params" => {
            expect_start(&mut r, "param")?;
            expect_start(&mut r, "value")?;
            let v = read_value(&mut r, 0)?;
            expect_end(&mut r, "param")?;
            expect_end(&mut r, "params")?;
            Ok(Response::Value(v))
        }
        Event::Start(e) if e.name().as_ref() == "fault" => {
            expect_start(&mut r, "value")?;
            let v = read_value(&mut r, 0)?;
            expect_end(&mut r, "fault")?;
            let Value::Struct(members) = v else {
                return Err(err(&r, "fault value is not a struct"));
            };
            let mut code = 0;
            let mut message = String::new();
            for (k, v) in members {
                match (k.as_str(), v) {
                    ("faultCode", Value::Int(c)) => code = c,
                    ("faultString", Value::Str(s)) => message = s,
                    _ => {}
                }
            }
            Ok(Response::Fault { code, message })
        }
        other => Err(err(
            &r,
            format!("expected <params> or <fault>, found {}", describe(&other)),
        )),
    }
}

/// Read the content of a `<value>` whose start tag was just consumed, and its end tag.
/// `depth` counts the arrays and structs around it: past [`MAX_DEPTH`] the answer is
/// refused ([`XmlError::too_deep`]) instead of recursing on (a 440 KB nested answer
/// overflowed the stack).
fn read_value(r: &mut Reader<&[u8]>, depth: usize) -> Result<Value, XmlError> {
    if depth > MAX_DEPTH {
        return Err(XmlError::too_deep(r.buffer_position()));
    }
    let ev = r.read_event().map_err(|e| err(r, e.to_string()))?;
    let ev = match ev {
        // Untyped value (`<value>text</value>`) is a string; whitespace may precede a type tag.
        Event::Text(t) if !t.trim_ascii().is_empty() => {
            let mut s = t.into_inner().into_owned();
            s.push_str(&read_text_until(r, "value")?);
            return Ok(Value::Str(s));
        }
        Event::GeneralRef(g) => {
            let mut s = resolve(r, &g)?;
            s.push_str(&read_text_until(r, "value")?);
            return Ok(Value::Str(s));
        }
        Event::End(e) if e.name().as_ref() == "value" => return Ok(Value::Str(String::new())),
        Event::Text(_) => next(r)?,
        other => other,
    };
    let v = match ev {
        Event::Start(e) => {
            let tag = e.name().as_ref().to_owned();
            match tag.as_str() {
                "string" => Value::Str(read_string(r)?),
                "int" | "i4" | "i8" => {
                    let t = read_text_until(r, &tag)?;
                    Value::Int(
                        t.trim()
                            .parse()
                            .map_err(|_| err(r, format!("bad integer {t:?}")))?,
                    )
                }
                "boolean" => {
                    let t = read_text_until(r, "boolean")?;
                    match t.trim() {
                        "1" | "true" => Value::Bool(true),
                        "0" | "false" => Value::Bool(false),
                        o => return Err(err(r, format!("bad boolean {o:?}"))),
                    }
                }
                "double" => {
                    let t = read_text_until(r, "double")?;
                    Value::Double(
                        t.trim()
                            .parse()
                            .map_err(|_| err(r, format!("bad double {t:?}")))?,
                    )
                }
                "array" => {
                    expect_start(r, "data")?;
                    let mut items = Vec::new();
                    loop {
                        match next(r)? {
                            Event::Start(e) if e.name().as_ref() == "value" => {
                                items.push(read_value(r, depth + 1)?)
                            }
                            Event::Empty(e) if e.name().as_ref() == "value" => {
                                items.push(Value::Str(String::new()))
                            }
                            Event::End(e) if e.name().as_ref() == "data" => break,
                            other => {
                                return Err(err(
                                    r,
                                    format!(
                                        "expected <value> in array, found {}",
                                        describe(&other)
                                    ),
                                ))
                            }
                        }
                    }
                    expect_end(r, "array")?;
                    Value::Array(items)
                }
                "struct" => {
                    let mut members = Vec::new();
                    loop {
                        match next(r)? {
                            Event::Start(e) if e.name().as_ref() == "member" => {
                                expect_start(r, "name")?;
                                let name = read_text_until(r, "name")?;
                                expect_start(r, "value")?;
                                let v = read_value(r, depth + 1)?;
                                expect_end(r, "member")?;
                                members.push((name, v));
                            }
                            Event::End(e) if e.name().as_ref() == "struct" => break,
                            other => {
                                return Err(err(
                                    r,
                                    format!("expected <member>, found {}", describe(&other)),
                                ))
                            }
                        }
                    }
                    Value::Struct(members)
                }
                other => Value::Other(read_text_until(r, other)?),
            }
        }
        Event::Empty(e) => match e.name().as_ref() {
            "string" => Value::Str(String::new()),
            "nil" => Value::Nil,
            "array" => Value::Array(Vec::new()),
            "struct" => Value::Struct(Vec::new()),
            other => return Err(err(r, format!("empty <{other}/> value"))),
        },
        other => {
            return Err(err(
                r,
                format!("expected a value, found {}", describe(&other)),
            ))
        }
    };
    expect_end(r, "value")?;
    Ok(v)
}

/// `<string>` content. Fast path: the raw span holds no markup, so one unescape pass over
/// the slice does it (a pool listing is one multi-megabyte string).
fn read_string(r: &mut Reader<&[u8]>) -> Result<String, XmlError> {
    let raw = r
        .read_text(QName("string"))
        .map_err(|e| err(r, e.to_string()))?;
    if !raw.contains('<') {
        return quick_xml::escape::unescape(&raw)
            .map(Cow::into_owned)
            .map_err(|e| err(r, format!("bad escape in string: {e}")));
    }
    // CDATA inside the string: rare, decode piecewise.
    let mut inner = Reader::from_str(&raw);
    inner.config_mut().trim_text(false);
    let mut out = String::with_capacity(raw.len());
    loop {
        match inner.read_event().map_err(|e| err(r, e.to_string()))? {
            Event::Text(t) => out.push_str(&t),
            Event::CData(c) => out.push_str(&c),
            Event::GeneralRef(g) => out.push_str(&resolve(r, &g)?),
            Event::Eof => return Ok(out),
            _ => return Err(err(r, "markup inside <string>")),
        }
    }
}

fn resolve(r: &Reader<&[u8]>, g: &quick_xml::events::BytesRef<'_>) -> Result<String, XmlError> {
    if let Some(c) = g.resolve_char_ref().map_err(|e| err(r, e.to_string()))? {
        return Ok(c.to_string());
    }
    let name: &str = g;
    quick_xml::escape::resolve_predefined_entity(name)
        .map(str::to_string)
        .ok_or_else(|| err(r, format!("unknown entity &{name};")))
}

/// Concatenate text up to `</end>`.
fn read_text_until(r: &mut Reader<&[u8]>, end: &str) -> Result<String, XmlError> {
    let mut out = String::new();
    loop {
        match r.read_event().map_err(|e| err(r, e.to_string()))? {
            Event::Text(t) => out.push_str(&t),
            Event::CData(c) => out.push_str(&c),
            Event::GeneralRef(g) => out.push_str(&resolve(r, &g)?),
            Event::End(e) if e.name().as_ref() == end => return Ok(out),
            other => {
                return Err(err(
                    r,
                    format!("expected text in <{end}>, found {}", describe(&other)),
                ))
            }
        }
    }
}

/// OpenNebula's error codes (`include/Request.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 0x0100: the session could not be authenticated.
    Authentication,
    /// 0x0200: not authorized.
    Authorization,
    /// 0x0400: the object does not exist.
    NoExists,
    /// 0x0800: the action is not allowed (e.g. wrong state).
    Action,
    /// 0x1000: bad parameter (`XML_RPC_API`, 7.x `RPC_API`).
    RpcApi,
    /// 0x2000: internal error.
    Internal,
    /// 0x4000: allocation failed.
    Allocate,
    /// 0x8000: the object is locked.
    Locked,
    /// 0x10000: HA replication failure.
    Replication,
    /// A code this crate does not know.
    Other(i64),
}

impl ErrorCode {
    /// The enum for OpenNebula's number.
    pub fn from_code(n: i64) -> Self {
        match n {
            0x100 => Self::Authentication,
            0x200 => Self::Authorization,
            0x400 => Self::NoExists,
            0x800 => Self::Action,
            0x1000 => Self::RpcApi,
            0x2000 => Self::Internal,
            0x4000 => Self::Allocate,
            0x8000 => Self::Locked,
            0x10000 => Self::Replication,
            n => Self::Other(n),
        }
    }

    /// OpenNebula's number.
    pub fn code(self) -> i64 {
        match self {
            Self::Authentication => 0x100,
            Self::Authorization => 0x200,
            Self::NoExists => 0x400,
            Self::Action => 0x800,
            Self::RpcApi => 0x1000,
            Self::Internal => 0x2000,
            Self::Allocate => 0x4000,
            Self::Locked => 0x8000,
            Self::Replication => 0x10000,
            Self::Other(n) => n,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Authentication => "AUTHENTICATION",
            Self::Authorization => "AUTHORIZATION",
            Self::NoExists => "NO_EXISTS",
            Self::Action => "ACTION",
            Self::RpcApi => "RPC_API",
            Self::Internal => "INTERNAL",
            Self::Allocate => "ALLOCATE",
            Self::Locked => "LOCKED",
            Self::Replication => "REPLICATION",
            Self::Other(n) => return write!(f, "ERROR_{n:#x}"),
        };
        f.write_str(name)
    }
}

/// What an OpenNebula result array says.
#[derive(Debug, Clone, PartialEq)]
pub enum OneResult {
    /// `[true, value, 0]`.
    Success(Value),
    /// `[false, message, code, resp_id?, replication index?]`.
    Failure {
        /// The message (prefixed `[method] ` by oned).
        message: String,
        /// The error code.
        code: ErrorCode,
        /// Offending object id, when sent (`-1` when unset).
        resp_id: Option<i64>,
    },
}

/// Interpret a response value as OpenNebula's result array (3 to 5 elements).
pub fn one_result(v: Value) -> Result<OneResult, String> {
    let Value::Array(items) = v else {
        return Err(format!("expected an array, found a {}", v.kind()));
    };
    if !(2..=5).contains(&items.len()) {
        return Err(format!(
            "expected a 3 to 5 element array, found {}",
            items.len()
        ));
    }
    let mut it = items.into_iter();
    let ok = match it.next() {
        Some(Value::Bool(b)) => b,
        Some(other) => return Err(format!("element 0 is a {}, expected boolean", other.kind())),
        None => return Err("empty array".into()),
    };
    let value = it.next().unwrap_or(Value::Nil);
    if ok {
        return Ok(OneResult::Success(value));
    }
    let message = match value {
        Value::Str(s) => s,
        other => return Err(format!("element 1 is a {}, expected string", other.kind())),
    };
    let code = match it.next() {
        Some(Value::Int(c)) => ErrorCode::from_code(c),
        Some(other) => return Err(format!("element 2 is a {}, expected int", other.kind())),
        None => ErrorCode::Other(-1),
    };
    let resp_id = match it.next() {
        Some(Value::Int(id)) => Some(id),
        _ => None,
    };
    Ok(OneResult::Failure {
        message,
        code,
        resp_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_all_param_types_and_escapes() {
        let xml = encode_call(
            "one.vm.update",
            &[
                "u:p<&>".into(),
                Param::Int(-2),
                Param::Bool(true),
                Param::I8(1 << 40),
                "A=\"1\"\nB=2".into(),
            ],
        )
        .unwrap();
        assert!(xml.contains("<methodName>one.vm.update</methodName>"));
        assert!(xml.contains("<string>u:p&lt;&amp;&gt;</string>"));
        assert!(xml.contains("<int>-2</int>"));
        assert!(xml.contains("<boolean>1</boolean>"));
        assert!(xml.contains("<i8>1099511627776</i8>"));
        assert!(xml.contains("<string>A=\"1\"\nB=2</string>"));
        assert!(encode_call("m", &["ok".into(), "bad\u{1}".into()]).is_err());
    }

    #[test]
    fn round_trip_with_own_decoder() {
        let xml = encode_call("one.system.version", &["a&b".into()]).unwrap();
        // A call's params decode like a response's.
        let resp = xml
            .replace(
                "<methodCall><methodName>one.system.version</methodName>",
                "<methodResponse>",
            )
            .replace("</methodCall>", "</methodResponse>");
        assert_eq!(
            decode_response(&resp).unwrap(),
            Response::Value(Value::Str("a&b".into()))
        );
    }

    /// `levels` arrays nested in one answer.
    fn nested(levels: usize) -> String {
        let open = "<value><array><data>".repeat(levels);
        let close = "</data></array></value>".repeat(levels);
        format!("<methodResponse><params><param>{open}<value><i4>1</i4></value>{close}</param></params></methodResponse>")
    }

    #[test]
    fn deep_nesting_is_a_typed_error_not_a_stack_overflow() {
        // The review's answer: 440 KB of nested arrays aborted `plan` (stack overflow).
        let body = nested(20_000);
        assert!(body.len() > 440_000);
        let e = decode_response(&body).unwrap_err();
        assert_eq!(e.kind, crate::one::xml::XmlErrorKind::TooDeep, "{e}");
        assert!(e.to_string().contains("too deeply nested"), "{e}");
        // Nesting up to the limit decodes.
        let mut v = decode_response(&nested(MAX_DEPTH)).unwrap();
        let mut depth = 0;
        while let Response::Value(Value::Array(mut items)) = v {
            depth += 1;
            v = Response::Value(items.remove(0));
        }
        assert_eq!(depth, MAX_DEPTH);
        let deep_struct = format!(
            "<methodResponse><params><param>{}<value/>{}</param></params></methodResponse>",
            "<value><struct><member><name>a</name>".repeat(MAX_DEPTH + 2),
            "</member></struct></value>".repeat(MAX_DEPTH + 2)
        );
        let e = decode_response(&deep_struct).unwrap_err();
        assert_eq!(e.kind, crate::one::xml::XmlErrorKind::TooDeep, "{e}");
    }

    proptest::proptest! {
        /// Any mix of value markup, however deep or broken, decodes or fails with an error.
        #[test]
        fn the_decoder_never_panics_on_nested_markup(
            pieces in proptest::collection::vec(proptest::sample::select(vec![
                "<value>", "</value>", "<array>", "</array>", "<data>", "</data>", "<struct>",
                "</struct>", "<member>", "</member>", "<name>a</name>", "<i4>1</i4>", "<nil/>",
                "<string>s</string>", "x",
            ]), 0..300),
            depth in 0usize..200,
        ) {
            let body = format!(
                "<methodResponse><params><param>{}{}</param></params></methodResponse>",
                "<value><array><data>".repeat(depth),
                pieces.concat()
            );
            let r = decode_response(&body);
            if depth > MAX_DEPTH + 1 {
                proptest::prop_assert!(r.is_err());
            }
        }
    }

    #[test]
    fn debug_of_params_hides_strings() {
        let p: Param<'_> = "oneadmin:secret".into();
        assert!(!format!("{p:?}").contains("secret"));
    }

    #[test]
    fn error_codes_round_trip() {
        for c in [
            0x100, 0x200, 0x400, 0x800, 0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 7,
        ] {
            assert_eq!(ErrorCode::from_code(c).code(), c);
        }
        assert_eq!(ErrorCode::from_code(0x1000).to_string(), "RPC_API");
    }
}
