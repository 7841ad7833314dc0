//! Trace context handed to the VMs: the one codec for `ONEAPP_FL_TRACEPARENT` (a W3C
//! `traceparent`) and `ONEAPP_FL_OTLP_ENDPOINT` (where the agent sends its spans).
//!
//! Grammar:
//! - traceparent (W3C Trace Context, version `00` only): `00-<32 hex>-<16 hex>-<2 hex>`,
//!   lowercase, 55 characters, neither id all zeros. Other versions are refused rather than
//!   guessed at: the controller writes `00`.
//! - OTLP endpoint: an `http://` or `https://` URL of at most [`MAX_ENDPOINT_LEN`]
//!   characters, with a host, without user, password, query or fragment (a credential
//!   never travels in a context), in the characters `[A-Za-z0-9._:/-]` that OpenNebula
//!   templates and the shell-sourced context file keep intact (so an IPv6 collector is
//!   named by a DNS name, not a bracketed literal). Like `OTEL_EXPORTER_OTLP_ENDPOINT`, it is the
//!   collector's base URL: spans go to `<endpoint>/v1/traces`.
//!
//! Printing gives what parsing accepts (`tests/protocol_roundtrip.rs`, tests below).

use std::fmt;

/// Length of a version-00 `traceparent`.
pub const TRACEPARENT_LEN: usize = 55;
/// Longest accepted OTLP endpoint.
pub const MAX_ENDPOINT_LEN: usize = 512;

/// A W3C `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// 16-byte trace id, not all zeros.
    pub trace_id: [u8; 16],
    /// 8-byte id of the parent span, not all zeros.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Whether the caller sampled (recorded) the trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

fn hex_into(text: &str, out: &mut [u8]) -> Option<()> {
    let b = text.as_bytes();
    if b.len() != out.len() * 2 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (i, o) in out.iter_mut().enumerate() {
        *o = nib(b[2 * i])? << 4 | nib(b[2 * i + 1])?;
    }
    Some(())
}

/// Reads a `traceparent` (see the module doc).
pub fn parse_traceparent(v: &str) -> Result<TraceParent, String> {
    const RULE: &str = "must be a W3C traceparent 00-<32 hex>-<16 hex>-<2 hex>";
    if v.len() != TRACEPARENT_LEN {
        return Err(RULE.into());
    }
    let mut parts = v.split('-');
    let (Some(version), Some(trace), Some(span), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(RULE.into());
    };
    let mut tp = TraceParent {
        trace_id: [0; 16],
        span_id: [0; 8],
        flags: 0,
    };
    let mut f = [0u8; 1];
    if version != "00"
        || hex_into(trace, &mut tp.trace_id).is_none()
        || hex_into(span, &mut tp.span_id).is_none()
        || hex_into(flags, &mut f).is_none()
    {
        return Err(RULE.into());
    }
    tp.flags = f[0];
    if tp.trace_id == [0; 16] || tp.span_id == [0; 8] {
        return Err("a traceparent's trace and span ids must not be all zeros".into());
    }
    Ok(tp)
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        for b in self.trace_id {
            write!(f, "{b:02x}")?;
        }
        f.write_str("-")?;
        for b in self.span_id {
            write!(f, "{b:02x}")?;
        }
        write!(f, "-{:02x}", self.flags)
    }
}

/// A validated OTLP/HTTP collector base URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OtlpEndpoint(url::Url);

impl OtlpEndpoint {
    /// Where spans are posted: `<base>/v1/traces`.
    pub fn traces_url(&self) -> String {
        format!("{}/v1/traces", self.0.as_str().trim_end_matches('/'))
    }
}

impl fmt::Display for OtlpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str().trim_end_matches('/'))
    }
}

impl std::str::FromStr for OtlpEndpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_otlp_endpoint(s)
    }
}

/// Reads an OTLP endpoint (see the module doc).
pub fn parse_otlp_endpoint(v: &str) -> Result<OtlpEndpoint, String> {
    if v.len() > MAX_ENDPOINT_LEN {
        return Err(format!("longer than {MAX_ENDPOINT_LEN} characters"));
    }
    if !v
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"._:/-".contains(&c))
    {
        return Err(
            "must be an http(s) URL without spaces, quotes, user, query or fragment".into(),
        );
    }
    let url = url::Url::parse(v).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err("must be an http:// or https:// URL with a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry a user or password".into());
    }
    Ok(OtlpEndpoint(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparents_read_back_and_malformed_ones_are_refused() {
        let tp = parse_traceparent(TP).unwrap();
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), TP);
        assert_eq!(tp.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        let unsampled = parse_traceparent(&TP.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled());
        for bad in [
            "",
            "00",
            &TP.to_uppercase(),
            &TP.replacen("00-", "01-", 1),
            &TP.replacen("00-", "ff-", 1),
            &format!("{TP}-extra"),
            &TP.replace('-', "_"),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-3600f067aa0ba902b7-01",
            &"0".repeat(100_000),
        ] {
            assert!(parse_traceparent(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn otlp_endpoints_are_bare_http_urls() {
        for (v, traces) in [
            ("http://10.0.0.1:4318", "http://10.0.0.1:4318/v1/traces"),
            (
                "https://otel.example.org/",
                "https://otel.example.org/v1/traces",
            ),
            ("http://otel:4318/otlp", "http://otel:4318/otlp/v1/traces"),
        ] {
            let e = parse_otlp_endpoint(v).unwrap();
            assert_eq!(e.traces_url(), traces);
            assert_eq!(parse_otlp_endpoint(&e.to_string()).unwrap(), e, "{v}");
        }
        for bad in [
            "",
            "10.0.0.1:4318",
            "ftp://h/",
            "http://",
            "http://user:pw@h:4318",
            "http://h:4318/?token=x",
            "http://h:4318/#x",
            "http://h/a b",
            "http://[fd00::1]:4318",
            "http://h/\"$(reboot)\"",
            &format!("http://h/{}", "a".repeat(MAX_ENDPOINT_LEN)),
        ] {
            assert!(parse_otlp_endpoint(bad).is_err(), "{bad:?}");
        }
    }
}
