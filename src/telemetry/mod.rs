//! Telemetry: log output (text or JSON), tracing spans exported over OTLP when
//! configured, and Prometheus metrics.
//!
//! Must not: log secrets. Everything that may hold a credential is redacted before it
//! reaches a span or a log line.
//!
//! Every process gets an OpenTelemetry tracer provider, so every reconcile has a trace id
//! to record even without a collector; spans leave the process only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP over HTTP/protobuf).

pub mod metrics;

use std::future::Future;
use std::pin::Pin;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Keeps the tracer provider alive; [`TelemetryGuard::shutdown`] flushes pending spans.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Flush and stop span export. Blocks: call it from a blocking thread.
    pub fn shutdown(self) {
        let _ = self.provider.shutdown();
    }
}

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

fn tracer_provider(service: &'static str) -> anyhow::Result<SdkTracerProvider> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
    if !endpoint.trim().is_empty() {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
        crate::one::http::ensure_crypto_provider();
        let http = TokioHttp {
            client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()?,
            handle: tokio::runtime::Handle::try_current()
                .map_err(|_| anyhow::anyhow!("telemetry needs a Tokio runtime"))?,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(http)
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// Install logging (`RUST_LOG`-style `filter`) and tracing for `service`.
pub fn init(
    service: &'static str,
    format: LogFormat,
    filter: &str,
) -> anyhow::Result<TelemetryGuard> {
    let provider = tracer_provider(service)?;
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    let filter = EnvFilter::try_new(filter)?;
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()?,
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()?,
    }
    Ok(TelemetryGuard { provider })
}

/// The OpenTelemetry trace id of `span`, when tracing is set up.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_get_trace_ids_once_a_provider_is_installed() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(parent: None, "reconcile", cluster = "alpha");
            let id = trace_id(&span).expect("a trace id");
            assert_eq!(id.len(), 32);
            let other = tracing::info_span!(parent: None, "reconcile", cluster = "beta");
            assert_ne!(
                trace_id(&other).unwrap(),
                id,
                "each reconcile is its own trace"
            );
        });
        assert_eq!(trace_id(&tracing::Span::none()), None);
    }
}
