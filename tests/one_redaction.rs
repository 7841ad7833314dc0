//! A failing call's error, span and log hold no password (oned, OneFlow, OneGate), even
//! when the server echoes it back or the endpoint URL carries userinfo.

mod common;

use std::io::Write;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::recording_server;
use common::rpcserver::{self, failure};
use flower_reconcile::one::{
    ApiBudget, ApiStats, Credentials, OneConfig, OneFlowClient, OneGateClient, OneGateConfig,
    OnedClient, RetryPolicy,
};
use tracing_subscriber::fmt::format::FmtSpan;

const PASSWORD: &str = "Zq9-very-secret-PW";
const TOKEN: &str = "T0ken-very-secret-ONEGATE";

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture() -> (Buf, tracing::subscriber::DefaultGuard) {
    let buf = Buf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
        .with_ansi(false)
        .finish();
    (buf, tracing::subscriber::set_default(sub))
}

fn cfg(xmlrpc: &str, oneflow: &str) -> OneConfig {
    let mut c = OneConfig::new(
        xmlrpc.parse().unwrap(),
        oneflow.parse().unwrap(),
        Credentials::new("flower", PASSWORD).unwrap(),
    );
    c.timeout = Duration::from_secs(5);
    c.retry = RetryPolicy {
        max_retries: 1,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
    };
    c
}

fn budget() -> Arc<ApiBudget> {
    ApiBudget::new(NonZeroU32::new(10_000).unwrap())
}

fn assert_clean(what: &str, text: &str) {
    assert!(
        !text.contains(PASSWORD),
        "{what} leaks the password:\n{text}"
    );
    assert!(!text.contains(TOKEN), "{what} leaks the token:\n{text}");
}

#[tokio::test]
async fn oned_failure_error_span_and_log_hold_no_password() {
    // A hostile or buggy server echoing the session back.
    let srv = rpcserver::start(Arc::new(|c: &rpcserver::Call| {
        let session = match &c.params[0] {
            rpcserver::P::S(s) => s.clone(),
            _ => String::new(),
        };
        (
            200,
            failure(
                &format!(
                    "[{}] User {session} couldn't be authenticated, aborting call.",
                    c.method
                ),
                0x100,
                -1,
            ),
        )
    }))
    .await;
    let (buf, _guard) = capture();
    let c = OnedClient::new(
        &cfg(&srv.url, "http://127.0.0.1:1"),
        budget(),
        ApiStats::new(),
    )
    .unwrap();
    let e = c.user_info(-1).await.unwrap_err();
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(
        out.contains("one.user.info"),
        "the span is recorded:\n{out}"
    );
    assert!(out.contains("outcome"), "{out}");
    assert!(e.to_string().contains("AUTHENTICATION"), "{e}");
    assert_clean("error", &format!("{e} {e:?}"));
    assert_clean("trace output", &out);
    assert_clean("client debug", &format!("{c:?}"));
}

#[tokio::test]
async fn transport_errors_with_userinfo_urls_hold_no_password() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let (buf, _guard) = capture();
    let url = format!("http://flower:{PASSWORD}@{addr}/RPC2");
    let flow_url = format!("http://flower:{PASSWORD}@{addr}/");
    let c = OnedClient::new(&cfg(&url, &flow_url), budget(), ApiStats::new()).unwrap();
    let e = c.vm_info(1).await.unwrap_err();
    assert_clean("oned error", &format!("{e} {e:?}"));
    let f = OneFlowClient::new(&cfg(&url, &flow_url), budget(), ApiStats::new()).unwrap();
    let e = f.get_service(1).await.unwrap_err();
    assert_clean("oneflow error", &format!("{e} {e:?}"));
    assert_clean("client debug", &format!("{c:?} {f:?}"));
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(out.contains("oneflow"), "{out}");
    assert_clean("trace output", &out);
}

#[tokio::test]
async fn oneflow_and_onegate_failures_hold_no_secret() {
    let (base, _) = recording_server(Arc::new(|s: &common::Seen| {
        // Echo every header back in the error body.
        let echoed = format!("{:?}", s.headers);
        (401, "text/html", echoed)
    }))
    .await;
    let (buf, _guard) = capture();
    let f = OneFlowClient::new(
        &cfg("http://127.0.0.1:1/RPC2", &base),
        budget(),
        ApiStats::new(),
    )
    .unwrap();
    let e = f.list_services().await.unwrap_err();
    assert!(
        matches!(e, flower_reconcile::one::OneFlowError::Authorization { .. }),
        "{e:?}"
    );
    // The Basic header is base64: make sure neither form leaks.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("flower:{PASSWORD}"));
    let text = format!("{e} {e:?}");
    assert!(!text.contains(&b64), "{text}");
    assert_clean("oneflow error", &text);

    let g = OneGateClient::new(OneGateConfig::new(&base, TOKEN, 42).unwrap()).unwrap();
    let e = g.get_vm().await.unwrap_err();
    assert_clean("onegate error", &format!("{e} {e:?}"));
    let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(out.contains("onegate") && out.contains("oneflow"), "{out}");
    assert!(!out.contains(&b64));
    assert_clean("trace output", &out);
}
