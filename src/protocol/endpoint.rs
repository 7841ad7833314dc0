//! `host:port`: the one codec for `FL_ENDPOINT`, `ONEAPP_FL_SUPERLINK_ADDRESS`, the
//! SuperLink address `submit` dials and the DNS names of certificate SANs.
//!
//! Grammar (a strict subset of what Flower's `parse_address` and gRPC targets accept):
//! - `IPv4:port` — a dotted quad (`10.0.0.5:9092`);
//! - `name:port` — a DNS name: labels of `[A-Za-z0-9-]`, 1–63 characters, not starting or
//!   ending with `-`, at most 253 characters in all, and not all-numeric in the last label
//!   (so `10.0.0.256` is an invalid address, never a name);
//! - `[IPv6]:port` — brackets required (a bare `fd00::1:9092` is ambiguous and refused);
//! - port: decimal digits only, 1–65535.
//!
//! Printing gives the same forms (IPv6 in brackets), so `parse(x.to_string()) == x`
//! (tests below). Nothing outside the grammar can reach a command line or a unit file.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest accepted `host:port` text (a 253-character name, `:` and five digits).
pub const MAX_LEN: usize = 253 + 6;

/// A validated `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort {
    /// An IPv4 address, a DNS name, or an IPv6 address (without brackets).
    pub host: String,
    /// Port 1–65535.
    pub port: u16,
}

impl HostPort {
    /// The address of a socket (IPv6 is printed in brackets).
    pub fn from_ip(ip: IpAddr, port: u16) -> Self {
        Self {
            host: ip.to_string(),
            port,
        }
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The same host with another port.
    pub fn with_port(&self, port: u16) -> Self {
        Self {
            host: self.host.clone(),
            port,
        }
    }

    /// The host as written in a URL or target: IPv6 in brackets.
    pub fn host_text(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host_text(), self.port)
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse(s)
    }
}

impl From<HostPort> for String {
    fn from(h: HostPort) -> String {
        h.to_string()
    }
}

impl TryFrom<String> for HostPort {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse(&s)
    }
}

/// Whether `s` is a DNS name by the rules above (not an IP address).
pub fn is_dns_name(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = s.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `s` is a host: an IPv4 address or a DNS name (IPv6 only inside `[...]:port`).
pub fn is_host(s: &str) -> bool {
    s.parse::<Ipv4Addr>().is_ok() || is_dns_name(s)
}

/// Parses `host:port` by the grammar above; the error says what is wrong without echoing
/// more than a short prefix of the input.
pub fn parse(text: &str) -> Result<HostPort, String> {
    if text.len() > MAX_LEN {
        return Err(format!("longer than {MAX_LEN} characters"));
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| "expected [IPv6]:port".to_string())?;
        h.parse::<Ipv6Addr>()
            .map_err(|_| format!("{} is not an IPv6 address", shown(h)))?;
        (h, p)
    } else {
        let (h, p) = text
            .rsplit_once(':')
            .ok_or_else(|| "expected host:port".to_string())?;
        if h.contains(':') {
            return Err("an IPv6 address needs brackets: [IPv6]:port".into());
        }
        if !is_host(h) {
            return Err(format!(
                "{} is not an IPv4 address or a DNS name ([A-Za-z0-9.-])",
                shown(h)
            ));
        }
        (h, p)
    };
    Ok(HostPort {
        host: host.to_string(),
        port: parse_port(port)?,
    })
}

/// A TCP port: 1–5 decimal digits, 1–65535 (no sign, no spaces).
pub fn parse_port(text: &str) -> Result<u16, String> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{} is not a port (1-65535)", shown(text)));
    }
    match text.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{} is not a port (1-65535)", shown(text))),
    }
}

fn shown(s: &str) -> String {
    let cut: String = s.chars().take(40).collect();
    format!("{cut:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_host_forms_parse_and_print_back() {
        for (text, host, port) in [
            ("10.0.0.5:9092", "10.0.0.5", 9092),
            ("link-1.example.org:1", "link-1.example.org", 1),
            ("localhost:65535", "localhost", 65535),
            ("[fd00::1]:9092", "fd00::1", 9092),
            ("[::1]:9093", "::1", 9093),
        ] {
            let hp = parse(text).unwrap();
            assert_eq!((hp.host.as_str(), hp.port), (host, port), "{text}");
            assert_eq!(hp.to_string(), text);
            assert_eq!(parse(&hp.to_string()), Ok(hp));
        }
        let v6 = HostPort::from_ip("fd00::5".parse().unwrap(), 9092);
        assert_eq!(v6.to_string(), "[fd00::5]:9092");
        assert_eq!(v6.ip(), Some("fd00::5".parse().unwrap()));
        assert_eq!(v6.with_port(9093).to_string(), "[fd00::5]:9093");
    }

    #[test]
    fn everything_else_is_refused() {
        for bad in [
            "10.0.0.1",
            ":9092",
            "h:0",
            "h:65536",
            "h:+1",
            "h: 1",
            "h:",
            "-h:1",
            "h-:1",
            "h h:1",
            "h:1:2",
            "fd00::1:9092",
            "[fd00::1]",
            "[fd00::1]9092",
            "[not-v6]:1",
            "[fe80::1%eth0]:1",
            "10.0.0.256:1",
            "1.2.3:1",
            "a..b:1",
            "10.0.0.1:9092; rm -rf /",
            "$(reboot):1",
            "host:9092\r\n",
            "h_1:80",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}:1", "a".repeat(300));
        assert!(parse(&long).is_err());
        assert!(is_dns_name(&format!("{}.b", "a".repeat(63))));
        assert!(!is_dns_name(&format!("{}.b", "a".repeat(64))));
    }

    #[test]
    fn serde_uses_the_text_form() {
        let hp: HostPort = serde_json::from_str("\"[fd00::1]:9092\"").unwrap();
        assert_eq!(serde_json::to_string(&hp).unwrap(), "\"[fd00::1]:9092\"");
        assert!(serde_json::from_str::<HostPort>("\"x;y:1\"").is_err());
    }
}
