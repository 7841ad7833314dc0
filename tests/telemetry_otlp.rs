//! Traces of the one-shot commands, received by an OTLP/HTTP protobuf receiver in the test
//! and decoded with the exporter's own message types: `plan` against onesim exports one
//! span per OpenNebula call under its command's root span, with the semantic-convention
//! attributes, flushed before the process exits, and no credential anywhere.

mod common;

use std::collections::BTreeMap;

use common::onesim_env::{fixtures, reconcile_command, spec_yaml, start_onesim};
use common::otlp::{receiver, spans, text};
use flower_reconcile::one::{ApiBudget, ApiStats, OnedClient};
use flower_reconcile::source::DirSource;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

const PASSWORD: &str = "Otlp-s3cret-PASSWORD";

#[tokio::test]
async fn plan_exports_its_opennebula_calls_over_otlp_and_no_credential() {
    let (sim, one) = start_onesim(PASSWORD, |_| {}).await;
    let oned = OnedClient::new(
        &one,
        ApiBudget::new(one.requests_per_second),
        ApiStats::new(),
    )
    .expect("oned client");
    fixtures(&oned).await;
    let specs = tempfile::tempdir().expect("specs");
    std::fs::write(specs.path().join("basic.yaml"), spec_yaml("basic", 2)).expect("spec");
    let revision = DirSource::new(specs.path())
        .load_once()
        .await
        .expect("specs load")
        .revision;
    let (otlp, got) = receiver().await;
    common::onesim_env::control(&sim, reqwest::Method::DELETE, "/requests", None).await;

    let home = tempfile::tempdir().expect("home");
    let out = reconcile_command(&sim, PASSWORD, home.path())
        .args(["plan", "--controller-id", "otlp-test", "--specs"])
        .arg(specs.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
        .env("OTEL_SERVICE_NAME", "plan-under-test")
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=otlp-test",
        )
        .output()
        .await
        .expect("binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");

    // Everything is here as soon as the process has exited: it flushed before exiting.
    let spans = spans(&got);
    let (resource, root) = spans
        .iter()
        .find(|(_, s)| s.name == "flower-reconcile plan")
        .expect("the command's root span");
    assert_eq!(
        text(resource, "service.name").as_deref(),
        Some("plan-under-test")
    );
    assert_eq!(
        text(resource, "deployment.environment").as_deref(),
        Some("otlp-test")
    );
    assert!(root.parent_span_id.is_empty(), "the command span is a root");
    assert_eq!(text(&root.attributes, "revision"), Some(revision));
    for (_, s) in &spans {
        assert_eq!(
            s.trace_id, root.trace_id,
            "{}: one trace per command",
            s.name
        );
    }

    // One client span per request onesim counted, with the conventions' attributes.
    let port = url::Url::parse(&sim.urls().xmlrpc)
        .unwrap()
        .port()
        .unwrap()
        .to_string();
    let mut oned_spans: BTreeMap<String, u64> = BTreeMap::new();
    let mut oneflow_spans = 0;
    for (_, s) in &spans {
        let a = &s.attributes;
        match text(a, "rpc.system").as_deref() {
            Some("xmlrpc") => {
                let method = text(a, "rpc.method").expect("rpc.method");
                assert_eq!(s.name, method);
                assert_eq!(s.kind, SpanKind::Client as i32, "{method}");
                assert_eq!(text(a, "server.address").as_deref(), Some("127.0.0.1"));
                assert_eq!(text(a, "server.port"), Some(port.clone()));
                assert_eq!(text(a, "error.type"), None, "{method} succeeded");
                *oned_spans.entry(method).or_default() += 1;
            }
            Some(other) => panic!("unexpected rpc.system {other}"),
            None => {}
        }
        if let Some(method) = text(a, "http.request.method") {
            oneflow_spans += 1;
            let template = text(a, "url.template").expect("url.template");
            assert_eq!(
                s.name,
                format!("{method} {}", template.replace('{', ":").replace('}', ""))
            );
            assert_eq!(s.kind, SpanKind::Client as i32);
            assert_eq!(text(a, "server.address").as_deref(), Some("127.0.0.1"));
            assert_eq!(text(a, "http.response.status_code").as_deref(), Some("200"));
        }
    }
    let counted = common::onesim_env::control(&sim, reqwest::Method::GET, "/requests", None).await;
    let mut oned_requests: BTreeMap<String, u64> = BTreeMap::new();
    let mut oneflow_requests = 0;
    for (target, n) in counted["requests"].as_object().expect("request counts") {
        let n = n.as_u64().expect("count");
        if target.starts_with("oneflow ") {
            oneflow_requests += n;
        } else {
            oned_requests.insert(target.clone(), n);
        }
    }
    println!(
        "otlp: {} spans; oned {oned_spans:?}; OneFlow {oneflow_spans}",
        spans.len()
    );
    assert_eq!(oned_spans, oned_requests, "one span per oned call");
    assert!(
        oned_spans.contains_key("one.vmpool.infoextended"),
        "{oned_spans:?}"
    );
    assert!(oneflow_requests > 0);
    assert_eq!(oneflow_spans, oneflow_requests, "one span per OneFlow call");

    // No credential, in any form, anywhere in what left the process.
    let basic = base64_basic(&format!("oneadmin:{PASSWORD}"));
    for (raw, req) in got.lock().unwrap().iter() {
        let dump = format!("{req:?}");
        for secret in [PASSWORD, basic.as_str()] {
            assert!(!dump.contains(secret), "a credential in the spans");
            assert!(
                !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a credential in the export bytes"
            );
        }
    }
}

#[tokio::test]
async fn tracing_is_off_when_disabled_and_bad_settings_are_refused_by_name() {
    let (sim, _) = start_onesim(PASSWORD, |_| {}).await;
    let specs = tempfile::tempdir().expect("specs");
    let (otlp, got) = receiver().await;
    let home = tempfile::tempdir().expect("home");
    let plan = |extra: (&str, &str)| {
        let mut cmd = reconcile_command(&sim, PASSWORD, home.path());
        cmd.args(["plan", "--controller-id", "otlp-test", "--specs"])
            .arg(specs.path())
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp)
            .env(extra.0, extra.1);
        async move { cmd.output().await.expect("binary runs") }
    };
    let out = plan(("OTEL_SDK_DISABLED", "true")).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        got.lock().unwrap().is_empty(),
        "nothing exported when disabled"
    );

    let out = plan(("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\" is not supported"),
        "{stderr}"
    );
}

/// `user:password` as an HTTP Basic credential.
fn base64_basic(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}
