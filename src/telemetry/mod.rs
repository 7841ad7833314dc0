//! Telemetry: log output (text or JSON), tracing spans exported over OTLP when
//! configured, and Prometheus metrics.
//!
//! Owns: the process-wide subscriber (log layer + OpenTelemetry layer), the reading of the
//! standard `OTEL_*` variables, the root span of every command ([`command_span`]).
//! Must not: log secrets. Everything that may hold a credential is redacted before it
//! reaches a span or a log line; the OpenNebula clients put only method, route template,
//! server address, object id and outcome into their spans (`tests/telemetry_otlp.rs`,
//! `plan_exports_its_opennebula_calls_over_otlp_and_no_credential`).
//!
//! Guarantees:
//! - Tracing is configured by the standard variables only: `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), `OTEL_EXPORTER_OTLP_PROTOCOL` (only
//!   `http/protobuf` is built in: `grpc` and `http/json` are refused with an error naming
//!   the variable), `OTEL_EXPORTER_OTLP_HEADERS`/`_TIMEOUT`, `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (+`_ARG`, checked here), and
//!   `OTEL_SDK_DISABLED` / `OTEL_TRACES_EXPORTER=none` to switch it off
//!   ([`OtlpSettings::from_env`], unit-tested below).
//! - Off by default and free when off for the one-shot commands ([`Traces::WhenExported`]):
//!   with no endpoint no OpenTelemetry layer is installed, so no span is even built
//!   (`cargo bench --bench plan_trace` prints the figures). `run` always has a provider
//!   ([`Traces::Always`]) so that each reconcile has a trace id for `status`.
//! - Spans are filtered apart from logs: `--log-level warn` does not switch spans off.
//! - JSON log lines carry the `trace_id` and `span_id` of the span they were logged in
//!   ([`crate::otel::JsonWithTrace`]), the ids its exported span has.
//! - [`TelemetryGuard::shutdown`] flushes pending spans; every command calls it before
//!   the process exits.
//!
//! Caveats: OTLP/gRPC is not built in (it would add tonic and its HTTP/2 stack to the
//! controller for a protocol every collector also takes over HTTP).

pub mod metrics;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

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

/// When a process gets an OpenTelemetry tracer provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traces {
    /// Always (`run`): every reconcile gets a trace id for `status`, exported or not.
    Always,
    /// Only when spans are exported (one-shot commands): otherwise no span is built.
    WhenExported,
}

/// Keeps the tracer provider alive; [`TelemetryGuard::shutdown`] flushes pending spans.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Flush and stop span export. Blocks: call it from a blocking thread.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// The OTLP trace export the standard variables ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// The variable that named the endpoint (the exporter reads it itself).
    pub endpoint_var: &'static str,
    /// Whether `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` names the service.
    pub service_named: bool,
}

const SAMPLERS: &[&str] = &[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

impl OtlpSettings {
    /// Read the `OTEL_*` variables through `var`; `Ok(None)` when no span is to be
    /// exported. Errors name the variable and the accepted values.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Self>> {
        let get = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match get("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                anyhow::bail!("OTEL_TRACES_EXPORTER={other:?} is not supported: use otlp or none")
            }
        }
        let endpoint_var = [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .into_iter()
        .find(|k| get(k).is_some());
        let Some(endpoint_var) = endpoint_var else {
            return Ok(None);
        };
        let endpoint = get(endpoint_var).unwrap_or_default();
        match url::Url::parse(&endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => anyhow::bail!("{endpoint_var}: not an http(s) URL"),
        }
        for k in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            match get(k).as_deref() {
                None | Some("http/protobuf") => {}
                Some(p) => {
                    anyhow::bail!("{k}={p:?} is not supported by this build: use http/protobuf")
                }
            }
        }
        if let Some(s) = get("OTEL_TRACES_SAMPLER") {
            anyhow::ensure!(
                SAMPLERS.contains(&s.as_str()),
                "OTEL_TRACES_SAMPLER={s:?} is not one of {}",
                SAMPLERS.join(", ")
            );
            if s.ends_with("traceidratio") {
                let arg = get("OTEL_TRACES_SAMPLER_ARG");
                let ok = arg
                    .as_deref()
                    .and_then(|a| a.parse::<f64>().ok())
                    .is_some_and(|r| (0.0..=1.0).contains(&r));
                anyhow::ensure!(
                    ok,
                    "OTEL_TRACES_SAMPLER_ARG={:?}: {s} needs a ratio between 0 and 1",
                    arg.unwrap_or_default()
                );
            }
        }
        let service_named = get("OTEL_SERVICE_NAME").is_some()
            || get("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
                a.split(',')
                    .any(|kv| kv.trim().starts_with("service.name="))
            });
        Ok(Some(Self {
            endpoint_var,
            service_named,
        }))
    }
}

/// Whether the `OTEL_*` variables of this process export spans (an invalid setting
/// exports nothing: [`init`] refuses it with the error).
pub fn exports_spans() -> bool {
    OtlpSettings::from_env(|k| std::env::var(k).ok()).is_ok_and(|s| s.is_some())
}

fn tracer_provider(
    service: &'static str,
    otlp: Option<&OtlpSettings>,
) -> anyhow::Result<SdkTracerProvider> {
    // The default detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is
    // only the fallback name.
    let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    );
    if !otlp.is_some_and(|o| o.service_named) {
        resource = resource.with_service_name(service);
    }
    let export = match otlp {
        Some(_) => crate::otel::Export::FromEnv,
        None => crate::otel::Export::Nowhere,
    };
    crate::otel::tracer_provider(
        SdkTracerProvider::builder().with_resource(resource.build()),
        export,
    )
}

/// Install logging (`RUST_LOG`-style `filter`) and tracing for `service`. Spans of this
/// crate at INFO and above are traced whatever the log filter says.
pub fn init(
    service: &'static str,
    format: LogFormat,
    filter: &str,
    traces: Traces,
) -> anyhow::Result<TelemetryGuard> {
    let otlp = OtlpSettings::from_env(|k| std::env::var(k).ok())?;
    let provider = match (traces, &otlp) {
        (Traces::WhenExported, None) => None,
        _ => Some(tracer_provider(service, otlp.as_ref())?),
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_filter(Targets::new().with_target("flower_reconcile", LevelFilter::INFO))
    });
    let filter = EnvFilter::try_new(filter)?;
    // JSON lines carry the trace and span ids of the span they were logged in.
    let ids = crate::otel::TraceIds::default();
    let log = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .event_format(crate::otel::JsonWithTrace::new(
                tracing_subscriber::fmt::format().json(),
                ids.clone(),
            ))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(otel)
        .with(ids)
        .with(log)
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// The root span of one `flower-reconcile COMMAND` (span name `flower-reconcile COMMAND`);
/// [`record_revision`] adds the source revision it worked from.
pub fn command_span(command: &'static str) -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "command",
        otel.name = format!("flower-reconcile {command}"),
        command,
        revision = tracing::field::Empty,
    )
}

/// Record the source revision (Git sha or directory digest) on the current command or
/// reconcile span.
pub fn record_revision(revision: &str) {
    tracing::Span::current().record("revision", revision);
}

/// The OpenTelemetry trace id of `span`, when tracing is set up.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// The W3C `traceparent` of `span` ([`crate::protocol::trace_context`]), when tracing is
/// set up and the span is sampled: what the VMs continue.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| {
        crate::protocol::trace_context::TraceParent {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
        }
        .to_string()
    })
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

    fn settings(vars: &[(&str, &str)]) -> anyhow::Result<Option<OtlpSettings>> {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        OtlpSettings::from_env(|k| vars.get(k).cloned())
    }

    #[test]
    fn tracing_is_off_unless_an_endpoint_is_set_and_can_be_switched_off() {
        assert_eq!(settings(&[]).unwrap(), None);
        assert_eq!(
            settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]).unwrap(),
            None
        );
        let on = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]).unwrap();
        assert_eq!(
            on,
            Some(OtlpSettings {
                endpoint_var: "OTEL_EXPORTER_OTLP_ENDPOINT",
                service_named: false
            })
        );
        let traces = settings(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c/v1/traces")]);
        assert_eq!(
            traces.unwrap().unwrap().endpoint_var,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        );
        for off in [
            ("OTEL_SDK_DISABLED", "TRUE"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let s = settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), off]);
            assert_eq!(s.unwrap(), None, "{off:?}");
        }
    }

    #[test]
    fn the_service_name_comes_from_either_standard_variable() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        for named in [
            ("OTEL_SERVICE_NAME", "ctl-eu"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod, service.name=ctl",
            ),
        ] {
            assert!(
                settings(&[ep, named]).unwrap().unwrap().service_named,
                "{named:?}"
            );
        }
        let attrs = ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod");
        assert!(!settings(&[ep, attrs]).unwrap().unwrap().service_named);
    }

    #[test]
    fn unsupported_settings_are_errors_naming_the_variable() {
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4318")],
                "OTEL_EXPORTER_OTLP_ENDPOINT: not an http(s) URL",
            ),
            (
                &[ep, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
                "OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\" is not supported",
            ),
            (
                &[ep, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")],
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=\"http/json\"",
            ),
            (
                &[ep, ("OTEL_TRACES_EXPORTER", "zipkin")],
                "OTEL_TRACES_EXPORTER=\"zipkin\"",
            ),
            (
                &[ep, ("OTEL_TRACES_SAMPLER", "sometimes")],
                "OTEL_TRACES_SAMPLER=\"sometimes\" is not one of",
            ),
            (
                &[ep, ("OTEL_TRACES_SAMPLER", "traceidratio")],
                "OTEL_TRACES_SAMPLER_ARG=\"\"",
            ),
            (
                &[
                    ep,
                    ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
                ],
                "OTEL_TRACES_SAMPLER_ARG=\"1.5\"",
            ),
        ];
        for (vars, want) in cases {
            let e = settings(vars).expect_err(want).to_string();
            assert!(e.contains(want), "{e} / {want}");
        }
        let ok = [
            ep,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ];
        assert!(settings(&ok).unwrap().is_some());
    }
}
