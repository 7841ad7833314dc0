//! An OTLP/HTTP protobuf receiver for the tests, decoding what the exporters send with the
//! exporter's own message types, and readers of the spans it got.

use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value::Value as Any, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

/// Every export request the receiver got, raw and decoded.
pub type Received = Arc<Mutex<Vec<(Vec<u8>, ExportTraceServiceRequest)>>>;

/// An OTLP/HTTP receiver on loopback (`POST /v1/traces`, protobuf); returns its base URL.
pub async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    let sink = got.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body.as_ref())
                    .expect("an OTLP protobuf export request");
                sink.lock().unwrap().push((body.to_vec(), req));
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let addr = super::serve(router).await;
    (format!("http://{addr}"), got)
}

/// The value of attribute `key`.
pub fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Any> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

/// The value of attribute `key` as text.
pub fn text(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        Any::StringValue(s) => Some(s.clone()),
        Any::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Every span received, with its resource's attributes.
pub fn spans(got: &Received) -> Vec<(Vec<KeyValue>, Span)> {
    let got = got.lock().unwrap();
    let mut out = Vec::new();
    for (_, req) in got.iter() {
        for rs in &req.resource_spans {
            let res = rs
                .resource
                .clone()
                .map(|r| r.attributes)
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push((res.clone(), s.clone()));
                }
            }
        }
    }
    out
}

/// Lower-case hex of an id.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
