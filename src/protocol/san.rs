//! Extra subject alternative names of the SuperLink's generated serving certificate: the
//! names clients dial besides the VM's own address (a floating IP, a NAT or DNS name, the
//! address other sites reach). One codec for both sides: the spec's `tls.extraNames`
//! (bare names) → the context's `ONEAPP_FL_CERT_EXTRA_SAN` (`IP:<addr>,DNS:<name>`, the
//! seed's grammar) → the agent's certificate.
//!
//! Guarantees: the parsers are total on untrusted input and bounded ([`MAX_SANS`] entries);
//! [`render_list`]'s output is what [`parse_list`] accepts, giving back the same names
//! (`tests::lists_round_trip`).

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use super::endpoint::is_dns_name;

/// At most this many extra names (a certificate with more is a configuration mistake; the
/// bound keeps the context value and the certificate small).
pub const MAX_SANS: usize = 32;

/// One extra subject alternative name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum San {
    /// `IP:<addr>`
    Ip(IpAddr),
    /// `DNS:<name>`
    Dns(String),
}

impl San {
    /// A bare name as a spec writes it: an IP address (v4 or v6) or a DNS name.
    pub fn parse_name(s: &str) -> Result<San, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            Ok(San::Ip(ip))
        } else if is_dns_name(s) {
            Ok(San::Dns(s.to_ascii_lowercase()))
        } else {
            Err("must be an IP address or a DNS name (letters, digits, `-`, dots)".into())
        }
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Ip(ip) => write!(f, "IP:{ip}"),
            San::Dns(name) => write!(f, "DNS:{name}"),
        }
    }
}

/// The context's comma list (`IP:<addr>`, `DNS:<name>`; blanks around entries and empty
/// entries ignored, as the seed's shell did).
pub fn parse_list(v: &str) -> Result<Vec<San>, String> {
    let items: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if items.len() > MAX_SANS {
        return Err(format!("at most {MAX_SANS} entries"));
    }
    items
        .into_iter()
        .map(|item| {
            if let Some(ip) = item.strip_prefix("IP:") {
                ip.parse::<IpAddr>()
                    .map(San::Ip)
                    .map_err(|_| format!("invalid IP SAN {ip:?}"))
            } else if let Some(name) = item.strip_prefix("DNS:") {
                if is_dns_name(name) {
                    Ok(San::Dns(name.to_string()))
                } else {
                    Err("invalid DNS SAN".into())
                }
            } else {
                Err("entries must be IP:<addr> or DNS:<name>".into())
            }
        })
        .collect()
}

/// The context value for `sans`.
pub fn render_list(sans: &[San]) -> String {
    sans.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_are_ips_or_dns_names() {
        assert_eq!(
            San::parse_name("203.0.113.10"),
            Ok(San::Ip("203.0.113.10".parse().unwrap()))
        );
        assert_eq!(
            San::parse_name("2001:db8::1"),
            Ok(San::Ip("2001:db8::1".parse().unwrap()))
        );
        assert_eq!(
            San::parse_name("Flower.Example.org"),
            Ok(San::Dns("flower.example.org".into()))
        );
        for bad in [
            "",
            "a b",
            "evil;x",
            "x,y",
            "-a.org",
            "1.2.3.4.5",
            "IP:1.2.3.4",
            "*.x.org",
        ] {
            assert!(San::parse_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lists_round_trip() {
        let sans = vec![
            San::Ip("100.64.0.1".parse().unwrap()),
            San::Ip("2001:db8::7".parse().unwrap()),
            San::Dns("link.example.org".into()),
        ];
        let wire = render_list(&sans);
        assert_eq!(wire, "IP:100.64.0.1,IP:2001:db8::7,DNS:link.example.org");
        assert_eq!(parse_list(&wire), Ok(sans));
        assert_eq!(
            parse_list(" , IP:10.0.0.1 ,"),
            Ok(vec![San::Ip("10.0.0.1".parse().unwrap())])
        );
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(parse_list("DNS:evil;x").is_err());
        assert!(parse_list("IP:300.1.1.1").is_err());
        assert!(parse_list("link.example.org").is_err());
        let many = vec!["DNS:a.org"; MAX_SANS + 1].join(",");
        assert_eq!(
            parse_list(&many),
            Err(format!("at most {MAX_SANS} entries"))
        );
        assert!(parse_list(&vec!["DNS:a.org"; MAX_SANS].join(",")).is_ok());
    }
}
