//! Helpers shared by the integration tests: raw XML-RPC calls, response decoding with onesim's
//! own DOM, XSD validation through xmllint, and waiting.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use onesim::xml::{self, Elem};

pub const PASS: &str = "s3cret";
pub const AUTH: &str = "oneadmin:s3cret";

pub fn client() -> reqwest::Client {
    // In a workspace build reqwest is unified with the root crate's `rustls-no-provider`
    // feature, and then panics unless a provider is installed. Plain HTTP needs none, but
    // installing one keeps the tests working whichever way they are built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// (xmlrpc, oneflow, onegate, control) URLs of a running simulator.
pub fn all_urls(h: &onesim::Handle) -> (String, String, String, String) {
    let u = h.urls();
    (
        u.xmlrpc.clone(),
        u.oneflow.clone(),
        u.onegate.clone(),
        u.control.clone(),
    )
}

pub async fn start() -> onesim::Handle {
    onesim::start(onesim::Config::for_tests(PASS))
        .await
        .unwrap()
}

/// One XML-RPC parameter.
#[derive(Clone, Copy)]
pub enum P<'a> {
    S(&'a str),
    I(i64),
    B(bool),
}

pub fn call_xml(method: &str, params: &[P]) -> String {
    let mut s =
        format!("<?xml version=\"1.0\"?><methodCall><methodName>{method}</methodName><params>");
    for p in params {
        let v = match p {
            P::S(x) => format!(
                "<string>{}</string>",
                x.replace('&', "&amp;").replace('<', "&lt;")
            ),
            P::I(i) => format!("<i4>{i}</i4>"),
            P::B(b) => format!("<boolean>{}</boolean>", u8::from(*b)),
        };
        s.push_str(&format!("<param><value>{v}</value></param>"));
    }
    s.push_str("</params></methodCall>");
    s
}

pub async fn post_raw(url: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
    let r = client()
        .post(url)
        .header("content-type", "text/xml")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Decoded methodResponse.
#[derive(Debug)]
pub enum Out {
    /// [ok, value (text), code, ...rest as text]
    Arr {
        ok: bool,
        value: String,
        value_type: String,
        code: i64,
        rest: Vec<String>,
    },
    Fault {
        code: i64,
        msg: String,
    },
}

impl Out {
    pub fn ok_str(&self) -> &str {
        match self {
            Out::Arr {
                ok: true, value, ..
            } => value,
            other => panic!("expected success, got {other:?}"),
        }
    }
    pub fn ok_int(&self) -> i64 {
        match self {
            Out::Arr {
                ok: true,
                value,
                value_type,
                ..
            } if value_type == "i4" => value.parse().unwrap(),
            other => panic!("expected integer success, got {other:?}"),
        }
    }
    pub fn err(&self) -> (String, i64) {
        match self {
            Out::Arr {
                ok: false,
                value,
                code,
                rest,
                ..
            } => {
                assert_eq!(rest.len(), 2, "failure arrays carry resp_id and an i8");
                (value.clone(), *code)
            }
            other => panic!("expected failure array, got {other:?}"),
        }
    }
    pub fn fault(&self) -> (i64, String) {
        match self {
            Out::Fault { code, msg } => (*code, msg.clone()),
            other => panic!("expected fault, got {other:?}"),
        }
    }
}

pub fn decode(body: &str) -> Out {
    let root = xml::parse(body).unwrap_or_else(|e| panic!("bad response XML {e}: {body}"));
    assert_eq!(root.name, "methodResponse");
    if let Some(f) = root.child("fault") {
        let st = &f.child("value").unwrap().children[0];
        let mut code = 0;
        let mut msg = String::new();
        for m in &st.children {
            let name = &m.child("name").unwrap().text;
            let v = &m.child("value").unwrap().children[0];
            if name == "faultCode" {
                code = v.text.parse().unwrap();
            } else {
                msg = v.text.clone();
            }
        }
        return Out::Fault { code, msg };
    }
    let data = root
        .child("params")
        .unwrap()
        .child("param")
        .unwrap()
        .child("value")
        .unwrap()
        .child("array")
        .unwrap()
        .child("data")
        .unwrap();
    let vals: Vec<&Elem> = data.children.iter().map(|v| &v.children[0]).collect();
    Out::Arr {
        ok: vals[0].text == "1",
        value: vals[1].text.clone(),
        value_type: vals[1].name.clone(),
        code: vals[2].text.parse().unwrap(),
        rest: vals[3..]
            .iter()
            .map(|v| format!("{}:{}", v.name, v.text))
            .collect(),
    }
}

pub async fn rpc(url: &str, method: &str, params: &[P<'_>]) -> Out {
    let (status, body) = post_raw(url, call_xml(method, params)).await;
    assert_eq!(status, 200, "{body}");
    decode(&body)
}

pub fn xsd_dir() -> PathBuf {
    if let Ok(d) = std::env::var("ONE_XSD_DIR") {
        return PathBuf::from(d);
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    for cand in [
        repo.join("../shared/reference/opennebula-xsd"),
        repo.join("../../shared/reference/opennebula-xsd"),
    ] {
        if cand.join("vm.xsd").exists() {
            return cand;
        }
    }
    panic!("OpenNebula XSDs not found: set ONE_XSD_DIR (expected <repo>/../shared/reference/opennebula-xsd)");
}

/// Validates an oned XML document against an XSD with xmllint (namespace injected).
pub fn assert_valid(xml_doc: &str, xsd: &str) {
    let dir = xsd_dir();
    let Some(gt) = xml_doc.find('>') else {
        panic!("not XML: {xml_doc}")
    };
    let (head, tail) = xml_doc.split_at(gt);
    let head = head.trim_end_matches('/');
    let self_closing = xml_doc[..=gt].ends_with("/>");
    let doc = if self_closing {
        format!("{head} xmlns=\"http://opennebula.org/XMLSchema\"/{tail}")
    } else {
        format!("{head} xmlns=\"http://opennebula.org/XMLSchema\"{tail}")
    };
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), doc).unwrap();
    let out = std::process::Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(dir.join(xsd))
        .arg(f.path())
        .output()
        .unwrap_or_else(|e| panic!("xmllint is needed for XSD checks ({e}); run e2e/test-all.sh to install libxml2-utils"));
    assert!(
        out.status.success(),
        "{xsd} validation failed:\n{}\n--- document ---\n{xml_doc}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn child_text(e: &Elem, path: &str) -> String {
    let mut cur = e;
    for p in path.split('/') {
        cur = cur.child(p).unwrap_or_else(|| panic!("no {p} in {path}"));
    }
    cur.text.clone()
}

/// Polls `f` until it returns Some or the timeout expires.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn vm_state(url: &str, id: i64) -> (u32, u32) {
    let x = rpc(url, "one.vm.info", &[P::S(AUTH), P::I(id)]).await;
    let e = xml::parse(x.ok_str()).unwrap();
    (
        child_text(&e, "STATE").parse().unwrap(),
        child_text(&e, "LCM_STATE").parse().unwrap(),
    )
}

pub async fn wait_vm(url: &str, id: i64, want: (u32, u32)) {
    wait_for(
        &format!("VM {id} in {want:?}"),
        Duration::from_secs(10),
        || async { (vm_state(url, id).await == want).then_some(()) },
    )
    .await
}

/// The network every [`basic_template`] uses, created once per simulator as an administrator
/// would: one IPv4 range inside the simulator's reserved loopback net `127.<net>.0.0/16`
/// (from 127.<net>.1.1, so VM `n`'s first lease is `onesim::state::vm_ip(net, n)` while
/// every VM has one NIC there).
pub async fn test_network(url: &str, net: u8) -> i64 {
    let pool = rpc(
        url,
        "one.vnpool.info",
        &[P::S(AUTH), P::I(-2), P::I(-1), P::I(-1)],
    )
    .await;
    let e = onesim::xml::parse(pool.ok_str()).unwrap();
    if let Some(v) = e
        .children
        .iter()
        .find(|v| v.child("NAME").map(|n| n.text.as_str()) == Some("onesim-tests"))
    {
        return v.child("ID").unwrap().text.parse().unwrap();
    }
    rpc(url, "one.vn.allocate", &[P::S(AUTH), P::S(&format!("NAME=\"onesim-tests\"\nVN_MAD=bridge\nBRIDGE=br0\nNETWORK_MASK=255.255.0.0\nAR=[TYPE=IP4,IP=127.{net}.1.1,SIZE=250]")), P::I(-1)]).await.ok_int()
}

/// The loopback net of a simulator, from its control API (`GET /health`).
pub async fn loopback_net(control: &str) -> u8 {
    let v: serde_json::Value = client()
        .get(format!("{control}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["loopback_net"].as_u64().unwrap() as u8
}

/// Allocates a small template (with a NIC on [`test_network`] and a context) and returns
/// its id.
pub async fn basic_template(url: &str, name: &str, net: u8) -> i64 {
    let net = test_network(url, net).await;
    rpc(
        url,
        "one.template.allocate",
        &[P::S(AUTH), P::S(&format!(
            "NAME=\"{name}\"\nCPU=1\nVCPU=1\nMEMORY=128\nNIC=[NETWORK_ID=\"{net}\"]\nCONTEXT=[NETWORK=\"YES\",TOKEN=\"YES\",ONEAPP_X=\"$ONEAPP_X\"]\nONEAPP_X=\"x1\"\nLOGO=\"images/logos/ubuntu.png\""
        ))],
    )
    .await
    .ok_int()
}

pub async fn flow(
    base: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, String) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut r = client()
        .request(m, format!("{base}{path}"))
        .basic_auth("oneadmin", Some(PASS));
    if let Some(b) = body {
        r = r
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = r.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// `one.template.instantiate` of template `tid` as oneadmin (default name, not on hold, no
/// extra template, not persistent): the VM's id.
pub async fn instantiate(url: &str, tid: i64) -> i64 {
    rpc(
        url,
        "one.template.instantiate",
        &[
            P::S(AUTH),
            P::I(tid),
            P::S(""),
            P::B(false),
            P::S(""),
            P::B(false),
        ],
    )
    .await
    .ok_int()
}

/// Creates a service template from `body` and instantiates it as it is: the service's
/// `DOCUMENT.ID` (both calls must answer 201).
pub async fn instantiate_service(base: &str, body: serde_json::Value) -> String {
    let id_of = |s: u16, b: &str| {
        assert_eq!(s, 201, "{b}");
        serde_json::from_str::<serde_json::Value>(b).unwrap()["DOCUMENT"]["ID"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (s, b) = flow(base, "POST", "/service_template", Some(body)).await;
    let t_id = id_of(s, &b);
    let (s, b) = flow(
        base,
        "POST",
        &format!("/service_template/{t_id}/action"),
        Some(serde_json::json!({"action": {"perform": "instantiate", "params": {}}})),
    )
    .await;
    id_of(s, &b)
}

pub async fn flow_json(base: &str, path: &str) -> Option<serde_json::Value> {
    let (s, b) = flow(base, "GET", path, None).await;
    (s == 200).then(|| serde_json::from_str(&b).unwrap())
}

pub async fn control_json(
    base: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut r = client().request(m, format!("{base}{path}"));
    if let Some(b) = body {
        r = r
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// The OneGate token of a VM (from the control API).
pub async fn token_of(control: &str, id: i64) -> String {
    let (_, v) = control_json(control, "GET", "/vms", None).await;
    v["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id)
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The onesim binary of this package.
pub const BIN: &str = env!("CARGO_BIN_EXE_onesim");

/// Starts the onesim binary on loopback with free ports (OneGate's: `onegate_port`, 0 for
/// any) and fast timings, plus `extra` arguments.
pub fn spawn_onesim(onegate_port: u16, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args([
            "--bind",
            "127.0.0.1",
            "--xmlrpc-port",
            "0",
            "--oneflow-port",
            "0",
            "--onegate-port",
            &onegate_port.to_string(),
            "--control-port",
            "0",
        ])
        .args([
            "--auth",
            AUTH,
            "--vm-step",
            "50ms",
            "--flow-interval",
            "50ms",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads the ready line (with a timeout) and returns the four URLs.
pub fn ready_line(child: &mut Child) -> (std::sync::mpsc::Receiver<String>, [String; 4]) {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        let _ = tx.send(rest);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no ready line");
    let parts: Vec<&str> = line.trim_end().split(' ').collect();
    assert_eq!(parts.len(), 6, "{line}");
    assert_eq!(&parts[..2], ["onesim", "ready"]);
    let mut urls: [String; 4] = Default::default();
    for (i, key) in ["xmlrpc", "oneflow", "onegate", "control"]
        .iter()
        .enumerate()
    {
        let v = parts[2 + i]
            .strip_prefix(&format!("{key}="))
            .unwrap_or_else(|| panic!("{line}"));
        assert!(
            v.starts_with("http://127.0.0.1:") && !v.contains(":0/") && !v.ends_with(":0"),
            "{v}"
        );
        urls[i] = v.to_string();
    }
    assert!(urls[0].ends_with("/RPC2"));
    (rx, urls)
}
