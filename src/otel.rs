//! OpenTelemetry plumbing both binaries share: the controller exports its spans with it
//! ([`crate::telemetry`]) and the agent continues the controller's traces inside the VMs
//! ([`crate::agent::trace`]).
//!
//! Owns: the OTLP/HTTP protobuf span exporter over the crate's own reqwest client
//! ([`tracer_provider`]), continuing a W3C trace context received from elsewhere
//! ([`continue_trace`]), and the JSON log line carrying the OpenTelemetry `trace_id` and
//! `span_id` of the span it was logged in ([`JsonWithTrace`], [`TraceIds`]).
//!
//! Must not: read configuration (the controller reads the `OTEL_*` variables, the agent its
//! context), or put anything into a span or line that its caller did not.
//!
//! Guarantees: with no tracer provider installed, [`JsonWithTrace`] writes the plain JSON
//! line and [`continue_trace`] does nothing, so both cost nothing when tracing is off.
//! Caveats: a span's ids are read when a line is logged inside it, which starts its
//! OpenTelemetry span: a remote parent must be set ([`continue_trace`]) before then.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::protocol::trace_context::TraceParent;

/// The OTLP exporter sends from its own thread; reqwest needs a Tokio reactor, so each
/// request is run on the runtime that set telemetry up.
#[derive(Debug, Clone)]
struct TokioHttp {
    client: reqwest::Client,
    handle: tokio::runtime::Handle,
}

impl HttpClient for TokioHttp {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let client = self.client.clone();
        let task = self
            .handle
            .spawn(async move { client.send_bytes(request).await });
        Box::pin(async move { task.await.map_err(|e| Box::new(e) as HttpError)? })
    }
}

/// Where spans are exported.
#[derive(Debug, Clone, Copy)]
pub enum Export<'a> {
    /// Nowhere: spans get ids (for logs and status) and are dropped.
    Nowhere,
    /// Where the standard `OTEL_EXPORTER_OTLP_*` variables say (the exporter reads them).
    FromEnv,
    /// This OTLP/HTTP traces URL (`…/v1/traces`).
    Url(&'a str),
}

/// The provider `builder` (resource, sampler) makes, batching spans to `export` over
/// OTLP/HTTP protobuf. Needs a Tokio runtime when it exports.
pub fn tracer_provider(
    builder: opentelemetry_sdk::trace::TracerProviderBuilder,
    export: Export<'_>,
) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let exporter = match export {
        Export::Nowhere => return Ok(builder.build()),
        Export::FromEnv | Export::Url(_) => {
            crate::one::http::ensure_crypto_provider();
            let http = TokioHttp {
                client: reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(10))
                    .build()?,
                handle: tokio::runtime::Handle::try_current()
                    .map_err(|_| anyhow::anyhow!("span export needs a Tokio runtime"))?,
            };
            let b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_http_client(http);
            match export {
                Export::Url(url) => b.with_endpoint(url).build()?,
                _ => b.build()?,
            }
        }
    };
    Ok(builder.with_batch_exporter(exporter).build())
}

/// An OpenTelemetry context whose span is the remote span `parent`.
pub fn remote_context(parent: &TraceParent) -> opentelemetry::Context {
    let sc = SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.span_id),
        TraceFlags::new(parent.flags),
        true,
        TraceState::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(sc)
}

/// Make `span` (not entered yet, no line logged in it yet) a child of the remote span
/// `parent`. Does nothing when no tracer provider is installed.
pub fn continue_trace(span: &tracing::Span, parent: &TraceParent) {
    let _ = span.set_parent(remote_context(parent));
}

/// The layer that lets [`JsonWithTrace`] find spans' OpenTelemetry ids: it only remembers
/// the subscriber it is part of (asking the thread's current dispatcher from inside an
/// event would find none when a scoped one is set). Install it and give the same value
/// to [`JsonWithTrace::new`].
#[derive(Debug, Clone, Default)]
pub struct TraceIds(Arc<OnceLock<WeakDispatch>>);

impl<S: Subscriber> tracing_subscriber::Layer<S> for TraceIds {
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        let _ = self.0.set(subscriber.downgrade());
    }
}

impl TraceIds {
    /// `(trace_id, span_id)` in hex of the span `id`, when it has an OpenTelemetry span.
    fn of(&self, id: &tracing::span::Id) -> Option<(TraceId, SpanId)> {
        let dispatch = self.0.get()?.upgrade()?;
        let cx = tracing_opentelemetry::get_otel_context(id, &dispatch)?;
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
    }
}

/// tracing-subscriber's JSON line plus `"trace_id"` and `"span_id"`: those of the
/// innermost span of the event's scope that has an OpenTelemetry span. A field named
/// `data` whose text is a JSON object is written as that object, not as a string (the
/// agent's training events, [`crate::agent::events`]).
#[derive(Debug)]
pub struct JsonWithTrace {
    inner: Format<Json>,
    ids: TraceIds,
}

impl JsonWithTrace {
    /// Lines formatted by `inner`, with the ids `ids` finds.
    pub fn new(inner: Format<Json>, ids: TraceIds) -> Self {
        Self { inner, ids }
    }
}

impl<S, N> FormatEvent<S, N> for JsonWithTrace
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let line = data_as_object(line, event);
        let ids = ctx
            .parent_span()
            .and_then(|leaf| leaf.scope().find_map(|s| self.ids.of(&s.id())));
        match (ids, line.trim_end().strip_suffix('}')) {
            (Some((trace, span)), Some(head)) => {
                writeln!(
                    writer,
                    "{head},\"trace_id\":\"{trace}\",\"span_id\":\"{span}\"}}"
                )
            }
            _ => writer.write_str(&line),
        }
    }
}

/// The text of an event's `data` field.
struct DataField(Option<String>);

impl tracing::field::Visit for DataField {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "data" {
            self.0 = Some(value.to_string());
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "data" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// `line` with its `"data":"{…}"` string replaced by the object it spells; unchanged
/// unless the event has such a field, it parses as an object, and its string occurs once.
fn data_as_object(line: String, event: &tracing::Event<'_>) -> String {
    if event.metadata().fields().field("data").is_none() {
        return line;
    }
    let mut data = DataField(None);
    event.record(&mut data);
    let Some(text) = data.0 else {
        return line;
    };
    let Ok(object @ serde_json::Value::Object(_)) = serde_json::from_str(&text) else {
        return line;
    };
    // tracing-subscriber writes field values with serde_json: the same escaping.
    let (Ok(quoted), Ok(compact)) = (serde_json::to_string(&text), serde_json::to_string(&object))
    else {
        return line;
    };
    let needle = format!("\"data\":{quoted}");
    if line.matches(&needle).count() != 1 {
        return line;
    }
    line.replacen(&needle, &format!("\"data\":{compact}"), 1)
}

/// Also the agent's events' tests read JSON lines through these helpers.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    /// A `MakeWriter` into a shared buffer (log-capturing tests use it too).
    #[derive(Clone, Default)]
    pub(crate) struct Buf(pub(crate) Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// JSON lines into `buf`, with spans from `provider` when there is one.
    pub(crate) fn json_lines(
        buf: &Buf,
        provider: Option<&SdkTracerProvider>,
    ) -> impl Subscriber + Send + Sync {
        let ids = TraceIds::default();
        let w = buf.clone();
        tracing_subscriber::registry()
            .with(provider.map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("t"))))
            .with(ids.clone())
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .event_format(JsonWithTrace::new(
                        tracing_subscriber::fmt::format().json(),
                        ids,
                    ))
                    .with_writer(move || w.clone()),
            )
    }

    pub(crate) fn lines(buf: &Buf) -> Vec<serde_json::Value> {
        String::from_utf8(buf.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect(l))
            .collect()
    }

    #[test]
    fn json_lines_carry_the_ids_of_their_span_and_continue_a_remote_parent() {
        let provider = tracer_provider(SdkTracerProvider::builder(), Export::Nowhere).unwrap();
        let buf = Buf::default();
        let subscriber = json_lines(&buf, Some(&provider));
        let parent = crate::protocol::trace_context::parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .unwrap();
        let (outer_ids, inner_ids) = tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside any span");
            let outer = tracing::info_span!("outer");
            continue_trace(&outer, &parent);
            let _o = outer.enter();
            tracing::info!(n = 1, "in outer");
            let inner = tracing::info_span!("inner");
            let _i = inner.enter();
            tracing::info!("in inner");
            let id = |s: &tracing::Span| {
                let sc = s.context().span().span_context().clone();
                (sc.trace_id().to_string(), sc.span_id().to_string())
            };
            (id(&outer), id(&inner))
        });
        let got = lines(&buf);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].get("trace_id").is_none(), "{}", got[0]);
        assert_eq!(got[1]["fields"]["n"], 1);
        assert_eq!(got[1]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(got[1]["trace_id"], outer_ids.0.as_str());
        assert_eq!(got[1]["span_id"], outer_ids.1.as_str());
        assert_eq!(got[2]["trace_id"], inner_ids.0.as_str());
        assert_eq!(got[2]["span_id"], inner_ids.1.as_str());
        assert_ne!(inner_ids.1, outer_ids.1);
    }

    #[test]
    fn without_a_provider_lines_are_plain_json() {
        let buf = Buf::default();
        let subscriber = json_lines(&buf, None);
        tracing::subscriber::with_default(subscriber, || {
            let s = tracing::info_span!("s");
            continue_trace(
                &s,
                &crate::protocol::trace_context::parse_traceparent(
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .unwrap(),
            );
            let _e = s.enter();
            tracing::info!("hello");
        });
        let got = lines(&buf);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["fields"]["message"], "hello");
        assert!(got[0].get("trace_id").is_none());
    }

    #[test]
    fn a_data_field_holding_a_json_object_is_written_as_that_object() {
        let buf = Buf::default();
        tracing::subscriber::with_default(json_lines(&buf, None), || {
            let quoted = r#"{"a":"x\"y","n":[1,2.5]}"#;
            tracing::info!(data = %quoted, "object");
            tracing::info!(data = "not {json", "text");
            tracing::info!(data = "[1]", "array");
            tracing::info!(other = %quoted, "not data");
        });
        let got = lines(&buf);
        assert_eq!(
            got[0]["fields"]["data"],
            serde_json::json!({"a": "x\"y", "n": [1, 2.5]})
        );
        assert_eq!(got[1]["fields"]["data"], "not {json");
        assert_eq!(got[2]["fields"]["data"], "[1]", "objects only");
        assert!(got[3]["fields"]["other"].is_string());
    }
}
