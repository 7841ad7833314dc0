//! The agent's spans: inside the VM they continue the trace of the controller span that
//! created (or scaled) the service, so one trace shows commit → plan → OneFlow → VM boot
//! → agent → Flower serving (issue #16 item 2).
//!
//! Owns: reading `ONEAPP_FL_TRACEPARENT` and `ONEAPP_FL_OTLP_ENDPOINT` (with their codec,
//! [`crate::protocol::trace_context`]), the agent's tracer provider (service name
//! [`service_name`] per role), and the start-up stages' spans: `agent context` (reading
//! and validating the context, resolving the role: [`record_context_read`]), `agent tls`,
//! `agent discovery`, `flower start` (spawn → healthy) and `superlink serving` /
//! `supernode registered` (the first readiness published through OneGate), each a child
//! of the controller's span ([`stage`]).
//!
//! Must not: export anything when no endpoint is set (then no provider and no
//! OpenTelemetry layer exist: the spans cost what a disabled tracing span costs), or stop
//! the agent for a malformed value (it is ignored with a warning naming the variable).

use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;

use super::context::{Context, Role};
use crate::protocol::context as ctx;
use crate::protocol::trace_context::{self, OtlpEndpoint, TraceParent};

/// What the context asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// The controller span to continue.
    pub parent: Option<TraceParent>,
    /// Where to export spans; none: nothing is exported.
    pub endpoint: Option<OtlpEndpoint>,
}

impl Settings {
    /// Read from the context; a malformed value is left out, with a warning.
    pub fn from_context(c: &Context) -> (Self, Vec<String>) {
        let mut warnings = Vec::new();
        let get = |key: &str| c.get(key).filter(|v| !v.is_empty());
        let parent = get(ctx::TRACEPARENT).and_then(|v| {
            trace_context::parse_traceparent(v)
                .map_err(|e| {
                    warnings.push(format!(
                        "{}: {e}; ignored (the agent's spans start their own trace)",
                        ctx::TRACEPARENT
                    ))
                })
                .ok()
        });
        let endpoint = get(ctx::OTLP_ENDPOINT).and_then(|v| {
            trace_context::parse_otlp_endpoint(v)
                .map_err(|e| {
                    warnings.push(format!(
                        "{}: {e}; ignored (no span is exported)",
                        ctx::OTLP_ENDPOINT
                    ))
                })
                .ok()
        });
        (Self { parent, endpoint }, warnings)
    }
}

/// The `service.name` of a role's agent.
pub fn service_name(role: Role) -> &'static str {
    match role {
        Role::Superlink => "flower-superlink-agent",
        Role::Supernode => "flower-supernode-agent",
    }
}

/// The start-up stages' span names (their spans are built where the work is).
pub const STAGES: &[&str] = &[
    "agent context",
    "agent tls",
    "agent discovery",
    "flower start",
    "superlink serving",
    "supernode registered",
];

/// The agent exports its start-up: the stages ([`STAGES`]) and what runs inside them (the
/// OneGate calls), never a root span of its own: the supervisor's heartbeats and watches
/// would otherwise each be a one-span trace, every few seconds for the VM's life.
#[derive(Debug, Clone)]
struct StagesAndTheirCalls;

impl opentelemetry_sdk::trace::ShouldSample for StagesAndTheirCalls {
    fn should_sample(
        &self,
        parent: Option<&opentelemetry::Context>,
        _trace_id: opentelemetry::trace::TraceId,
        name: &str,
        _kind: &opentelemetry::trace::SpanKind,
        _attributes: &[KeyValue],
        _links: &[opentelemetry::trace::Link],
    ) -> opentelemetry_sdk::trace::SamplingResult {
        use opentelemetry::trace::TraceContextExt as _;
        use opentelemetry_sdk::trace::SamplingDecision;
        let parent = parent
            .map(|c| c.span().span_context().clone())
            .filter(|sc| sc.is_valid());
        // A stage follows the controller's decision when it continues its trace.
        let sampled = match &parent {
            Some(sc) => sc.is_sampled(),
            None => STAGES.contains(&name),
        };
        opentelemetry_sdk::trace::SamplingResult {
            decision: match sampled {
                true => SamplingDecision::RecordAndSample,
                false => SamplingDecision::Drop,
            },
            attributes: Vec::new(),
            trace_state: parent
                .map(|sc| sc.trace_state().clone())
                .unwrap_or_default(),
        }
    }
}

/// The controller span the stages continue, once [`init`] has run.
static PARENT: OnceLock<TraceParent> = OnceLock::new();
/// The provider, once [`init`] has run with an endpoint.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Set the parent and, with an endpoint, build the provider (`None` without one).
/// `vmid` and `cluster` go into the resource. Needs a Tokio runtime when exporting.
pub fn init(
    settings: &Settings,
    role: Role,
    vmid: Option<u64>,
    cluster: Option<&str>,
) -> anyhow::Result<Option<SdkTracerProvider>> {
    if let Some(p) = settings.parent {
        let _ = PARENT.set(p);
    }
    let Some(endpoint) = &settings.endpoint else {
        return Ok(None);
    };
    let mut attrs = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    if let Some(id) = vmid {
        attrs.push(KeyValue::new("service.instance.id", format!("vm-{id}")));
    }
    if let Some(c) = cluster {
        // Only for people reading traces: bounded, whatever the context holds.
        attrs.push(KeyValue::new(
            "flower.cluster",
            c.chars().take(253).collect::<String>(),
        ));
    }
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(service_name(role))
        .with_attributes(attrs)
        .build();
    let builder = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(StagesAndTheirCalls);
    let provider =
        crate::otel::tracer_provider(builder, crate::otel::Export::Url(&endpoint.traces_url()))?;
    let _ = PROVIDER.set(provider.clone());
    Ok(Some(provider))
}

/// Flush pending spans and stop exporting. Blocks: call it from a blocking thread.
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
        let _ = p.shutdown();
    }
}

/// `span` (new, not entered) made a child of the controller's span when the context
/// gave one: every start-up stage is built as `stage(tracing::info_span!(parent: None, …))`.
pub fn stage(span: tracing::Span) -> tracing::Span {
    if let Some(p) = PARENT.get() {
        crate::otel::continue_trace(&span, p);
    }
    span
}

/// The `agent context` span: from `started` (before the context file was read) until now
/// (validated, role resolved). It began before any subscriber existed, so it is built with
/// its start time through the provider directly; nothing when not exporting.
pub fn record_context_read(started: SystemTime, role: Role, variables: usize) {
    let Some(provider) = PROVIDER.get() else {
        return;
    };
    let tracer = provider.tracer("flower_reconcile::agent");
    let parent = PARENT
        .get()
        .map(crate::otel::remote_context)
        .unwrap_or_default();
    let mut span = tracer
        .span_builder("agent context")
        .with_start_time(started)
        .with_attributes([
            KeyValue::new("flower.role", role.as_str()),
            KeyValue::new("context.variables", variables as i64),
        ])
        .start_with_context(&tracer, &parent);
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(vars: &[(&str, &str)]) -> Context {
        let mut c = Context::default();
        for (k, v) in vars {
            c.set_default(k, v);
        }
        c
    }

    #[test]
    fn values_are_read_with_the_codec_and_malformed_ones_ignored_with_a_warning() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (s, w) = Settings::from_context(&context(&[
            (ctx::TRACEPARENT, tp),
            (ctx::OTLP_ENDPOINT, "http://10.0.0.9:4318"),
        ]));
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.parent.unwrap().to_string(), tp);
        assert_eq!(
            s.endpoint.unwrap().traces_url(),
            "http://10.0.0.9:4318/v1/traces"
        );

        let (s, w) = Settings::from_context(&context(&[
            (ctx::TRACEPARENT, "00-zz-00f067aa0ba902b7-01"),
            (ctx::OTLP_ENDPOINT, "http://user:pw@c:4318"),
        ]));
        assert_eq!(s, Settings::default());
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("ONEAPP_FL_TRACEPARENT: "), "{w:?}");
        assert!(w[1].starts_with("ONEAPP_FL_OTLP_ENDPOINT: "), "{w:?}");
        assert!(!w[1].contains("pw"), "the value is not echoed: {w:?}");

        let (s, w) = Settings::from_context(&context(&[]));
        assert_eq!((s, w.len()), (Settings::default(), 0));
    }

    #[test]
    fn only_stages_start_a_trace_and_children_follow_their_parent() {
        use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt as _, TraceFlags};
        use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample as _};
        let decide = |parent: Option<&opentelemetry::Context>, name: &str| {
            StagesAndTheirCalls
                .should_sample(
                    parent,
                    opentelemetry::trace::TraceId::from_bytes([1; 16]),
                    name,
                    &SpanKind::Internal,
                    &[],
                    &[],
                )
                .decision
        };
        for stage in STAGES {
            assert_eq!(decide(None, stage), SamplingDecision::RecordAndSample);
        }
        assert_eq!(
            decide(None, "PUT /vm"),
            SamplingDecision::Drop,
            "a heartbeat"
        );
        let parent = |flags| {
            opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
                opentelemetry::trace::TraceId::from_bytes([1; 16]),
                opentelemetry::trace::SpanId::from_bytes([2; 8]),
                flags,
                true,
                Default::default(),
            ))
        };
        let sampled = parent(TraceFlags::SAMPLED);
        let unsampled = parent(TraceFlags::default());
        assert_eq!(
            decide(Some(&sampled), "PUT /vm"),
            SamplingDecision::RecordAndSample
        );
        assert_eq!(
            decide(Some(&unsampled), "agent tls"),
            SamplingDecision::Drop
        );
    }

    #[test]
    fn each_role_has_its_service_name() {
        assert_eq!(service_name(Role::Superlink), "flower-superlink-agent");
        assert_eq!(service_name(Role::Supernode), "flower-supernode-agent");
    }
}
