//! A tiny XML-RPC server for tests (independent of the crate's codec): parses
//! `methodCall`s with a regex, counts calls by method and answers through a closure.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A parameter as the server saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum P {
    S(String),
    I(i64),
    B(bool),
}

impl P {
    pub fn int(&self) -> i64 {
        match self {
            P::I(i) => *i,
            other => panic!("expected int, got {other:?}"),
        }
    }
}

/// A recorded call.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub params: Vec<P>,
}

/// The answer: an HTTP status and a body.
pub type Handler = Arc<dyn Fn(&Call) -> (u16, String) + Send + Sync>;

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#13;", "\r")
        .replace("&amp;", "&")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn parse_call(body: &str) -> Call {
    let name = regex::Regex::new(r"<methodName>(.*?)</methodName>").unwrap();
    let param = regex::Regex::new(
        r"(?s)<param><value><(string|int|i4|i8|boolean)>(.*?)</(?:string|int|i4|i8|boolean)></value></param>",
    )
    .unwrap();
    let method = name.captures(body).expect("methodName")[1].to_string();
    let params = param
        .captures_iter(body)
        .map(|c| match &c[1] {
            "string" => P::S(unescape(&c[2])),
            "boolean" => P::B(&c[2] == "1"),
            _ => P::I(c[2].parse().unwrap()),
        })
        .collect();
    Call { method, params }
}

/// `[true, <string>, 0]`.
pub fn ok_string(s: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?>\r\n<methodResponse><params><param><value><array><data><value><boolean>1</boolean></value><value><string>{}</string></value><value><i4>0</i4></value></data></array></value></param></params></methodResponse>",
        escape(s)
    )
}

/// `[true, <i4>, 0]`.
pub fn ok_int(i: i64) -> String {
    format!(
        "<methodResponse><params><param><value><array><data><value><boolean>1</boolean></value><value><i4>{i}</i4></value><value><i4>0</i4></value></data></array></value></param></params></methodResponse>"
    )
}

/// `[false, msg, code, resp_id, <i8>-1]`.
pub fn failure(msg: &str, code: i64, resp_id: i64) -> String {
    format!(
        "<methodResponse><params><param><value><array><data><value><boolean>0</boolean></value><value><string>{}</string></value><value><i4>{code}</i4></value><value><i4>{resp_id}</i4></value><value><i8>-1</i8></value></data></array></value></param></params></methodResponse>",
        escape(msg)
    )
}

/// A running server: its URL and what it saw.
pub struct RpcServer {
    pub url: String,
    pub calls: Arc<Mutex<Vec<Call>>>,
}

impl RpcServer {
    pub fn count(&self, method: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.method == method)
            .count()
    }

    pub fn total(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    pub fn by_method(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for c in self.calls.lock().unwrap().iter() {
            *m.entry(c.method.clone()).or_default() += 1;
        }
        m
    }

    pub fn last(&self) -> Call {
        self.calls.lock().unwrap().last().cloned().expect("a call")
    }
}

/// Serve `POST /RPC2` on 127.0.0.1:0.
pub async fn start(handler: Handler) -> RpcServer {
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let log = calls.clone();
    let router = axum::Router::new().route(
        "/RPC2",
        axum::routing::post(move |body: String| {
            let log = log.clone();
            let handler = handler.clone();
            async move {
                let call = parse_call(&body);
                let (code, text) = handler(&call);
                log.lock().unwrap().push(call);
                axum::response::Response::builder()
                    .status(code)
                    .header("content-type", "text/xml")
                    .body(axum::body::Body::from(text))
                    .unwrap()
            }
        }),
    );
    let addr = super::serve(router).await;
    RpcServer {
        url: format!("http://{addr}/RPC2"),
        calls,
    }
}
