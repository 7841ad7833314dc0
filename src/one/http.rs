//! HTTP plumbing shared by the oned, OneFlow and OneGate clients: building a reqwest
//! client (timeout, custom CA bundle, rustls on ring), reading bodies with a size cap, and
//! describing transport errors without URLs' userinfo.

use std::path::Path;
use std::time::Duration;

use super::calls::strip_userinfo_in_text;
use crate::error_chain::append_sources;

/// Default cap on any response body (OneGate, OneFlow).
pub const DEFAULT_MAX_BODY: usize = 4 * 1024 * 1024;

/// Install ring as the process-wide rustls provider (idempotent; a provider installed
/// earlier by someone else is kept).
pub fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The default User-Agent of the controller's OpenNebula clients.
pub const CONTROLLER_AGENT: &str = concat!("flower-reconcile/", env!("CARGO_PKG_VERSION"));

/// A User-Agent naming `product` and an instance id: `flower-reconcile/0.1.0 (host-42-x1)`.
/// The id is reduced to characters a header value may carry.
pub fn user_agent_with_instance(product: &str, instance: &str) -> String {
    let id: String = instance
        .chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '(' | ')' | '\\'))
        .take(128)
        .collect();
    format!("{product} ({id})")
}

/// Build a reqwest client with an overall `timeout`, an optional extra CA bundle (PEM) and
/// the `User-Agent` every request carries (OpenNebula's logs and onesim's event log say
/// who called).
pub(crate) fn build_client(
    timeout: Duration,
    ca_bundle: Option<&Path>,
    user_agent: &str,
) -> Result<reqwest::Client, String> {
    ensure_crypto_provider();
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(user_agent)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        // Redirects could carry credentials elsewhere; OpenNebula never redirects.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(path) = ca_bundle {
        let pem = std::fs::read(path)
            .map_err(|e| format!("reading CA bundle {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("parsing CA bundle {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "CA bundle {} holds no PEM certificate",
                path.display()
            ));
        }
        b = b.tls_certs_merge(certs);
    }
    b.build()
        .map_err(|e| format!("building HTTP client: {}", describe_reqwest(&e)))
}

/// Why a body could not be read.
#[derive(Debug)]
pub(crate) enum BodyError {
    TooLarge { limit: usize },
    Transport(String),
}

/// The most a body's buffer is sized for up front from the server's `Content-Length`:
/// well below the unit's `MemoryMax=512M`, so a server (or a man in the middle) declaring
/// bodies at the cap (256 MiB for oned) on concurrent requests cannot make the controller
/// reserve gigabytes before a byte arrives. Larger real bodies grow past it as they arrive.
pub(crate) const MAX_PREALLOCATION: usize = 16 * 1024 * 1024;

/// Read at most `limit` bytes of a response body; larger bodies are an error, not an
/// allocation. The buffer is sized from `Content-Length` up to [`MAX_PREALLOCATION`].
pub(crate) async fn read_capped(
    resp: &mut reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    let mut buf = Vec::with_capacity(initial_capacity(resp.content_length(), limit)?);
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(BodyError::TooLarge { limit });
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf),
            Err(e) => return Err(BodyError::Transport(describe_reqwest(&e))),
        }
    }
}

/// The buffer a body gets before its first byte: refused when the declared length is over
/// `limit`; sized once up to [`MAX_PREALLOCATION`] (growing by doubling held two copies of
/// an 11 MB pool page at a time).
fn initial_capacity(declared: Option<u64>, limit: usize) -> Result<usize, BodyError> {
    match declared {
        Some(len) if len > limit as u64 => Err(BodyError::TooLarge { limit }),
        Some(len) => Ok((len as usize).min(MAX_PREALLOCATION)),
        None => Ok(0),
    }
}

/// A reqwest error as text: its kind and causes, with the URL's userinfo removed.
pub(crate) fn describe_reqwest(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "reading response failed"
    } else if e.is_request() {
        "request failed"
    } else if e.is_builder() {
        "invalid request"
    } else {
        "HTTP error"
    };
    let mut msg = kind.to_string();
    if let Some(url) = e.url() {
        msg.push_str(" (");
        msg.push_str(&super::calls::redact_url(url));
        msg.push(')');
    }
    strip_userinfo_in_text(&append_sources(msg, std::error::Error::source(e)))
}

/// Text of an error body: lossy UTF-8, trimmed, at most 512 characters.
pub(crate) fn body_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut out: String = text.chars().take(512).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guarantee: a declared length over the cap is refused before any allocation, and a
    /// declared length under it reserves at most MAX_PREALLOCATION (16 MiB) up front —
    /// eight concurrent oned answers declared at the 256 MiB cap reserve 128 MiB, not 2 GiB.
    #[test]
    fn declared_lengths_reserve_at_most_the_preallocation_cap() {
        let cap = crate::one::config::DEFAULT_MAX_XMLRPC_BODY;
        let mib = 1024 * 1024;
        assert!(matches!(
            initial_capacity(Some(cap as u64 + 1), cap),
            Err(BodyError::TooLarge { limit }) if limit == cap
        ));
        assert_eq!(initial_capacity(Some(cap as u64), cap).unwrap(), 16 * mib);
        assert_eq!(
            initial_capacity(Some(11 * mib as u64), cap).unwrap(),
            11 * mib
        );
        assert_eq!(initial_capacity(None, cap).unwrap(), 0);
        assert!(
            MAX_PREALLOCATION * 8 <= 512 * mib / 2,
            "well below MemoryMax=512M"
        );
    }
}
