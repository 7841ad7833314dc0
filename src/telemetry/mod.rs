//! Telemetry: log output (text or JSON), tracing spans exported over OTLP when
//! configured, and Prometheus metrics.
//!
//! Must not: log secrets. Everything that may hold a credential is redacted before it
//! reaches a span or a log line.
