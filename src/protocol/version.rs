//! Flower versions: the one codec for `spec.flowerVersion`, `ONEAPP_FLOWER_VERSION`,
//! `FL_VERSION`, `flower-agent install --version` and `flwr --version` output.
//!
//! Grammar: `MAJOR.MINOR.PATCH`, each 1–4 decimal digits without a leading zero (`0` itself
//! is fine). It is the canonical form, so parse and print are inverse (tests below) and a
//! version becomes a container tag or a pip pin unchanged. Pre-releases are not accepted.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

/// The project's pinned Flower version: the default of a spec and of the agent.
pub const DEFAULT: &str = "1.25.0";

/// Oldest Flower release the appliances support.
pub const MIN_SUPPORTED: FlowerVersion = FlowerVersion {
    major: 1,
    minor: 20,
    patch: 0,
};

/// A Flower version `major.minor.patch`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct FlowerVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

static EXACT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})$")
        .unwrap_or_else(|e| unreachable!("{e}"))
});
static WITHIN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?:^|[^0-9.])(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})(?:$|[^0-9.])",
    )
    .unwrap_or_else(|e| unreachable!("{e}"))
});

impl FlowerVersion {
    /// Parses exactly `X.Y.Z` (see the module doc).
    pub fn parse(text: &str) -> Result<Self, String> {
        let c = (text.len() <= 14)
            .then(|| EXACT.captures(text))
            .flatten()
            .ok_or_else(|| "must be a Flower version X.Y.Z such as 1.25.0".to_string())?;
        Ok(Self::from_captures(&c))
    }

    /// The first version in `text`, e.g. `Flower version: 1.25.0` (what `flwr --version`
    /// prints).
    pub fn find_in(text: &str) -> Option<Self> {
        WITHIN.captures(text).map(|c| Self::from_captures(&c))
    }

    fn from_captures(c: &regex::Captures<'_>) -> Self {
        // At most four digits each: always fits.
        let n = |i: usize| c[i].parse::<u32>().unwrap_or(0);
        Self {
            major: n(1),
            minor: n(2),
            patch: n(3),
        }
    }

    /// Whether the appliances support this version ([`MIN_SUPPORTED`] or newer).
    pub fn is_supported(self) -> bool {
        self >= MIN_SUPPORTED
    }

    /// Same `major.minor` (Flower breaks compatibility between minor versions).
    pub fn same_minor(self, other: Self) -> bool {
        (self.major, self.minor) == (other.major, other.minor)
    }
}

/// Whether `text` is a version by the grammar above.
pub fn is_version(text: &str) -> bool {
    FlowerVersion::parse(text).is_ok()
}

impl fmt::Display for FlowerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl std::str::FromStr for FlowerVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl TryFrom<String> for FlowerVersion {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<FlowerVersion> for String {
    fn from(v: FlowerVersion) -> String {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_versions_parse_and_print_back() {
        for ok in ["1.25.0", "0.0.0", "1.9999.10", DEFAULT] {
            let v = FlowerVersion::parse(ok).unwrap();
            assert_eq!(v.to_string(), ok);
        }
        assert!(FlowerVersion::parse(DEFAULT).unwrap().is_supported());
        assert!(!FlowerVersion::parse("1.19.9").unwrap().is_supported());
        assert!(FlowerVersion::parse("1.25.3")
            .unwrap()
            .same_minor(FlowerVersion::parse("1.25.0").unwrap()));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "latest",
            "1.25",
            "v1.25.0",
            "1.25.0rc1",
            "01.25.0",
            "1.25.00",
            "1.25.0 ",
            "1.25.0\n",
            "1.25.0; rm -rf /",
            "12345.0.0",
            "1..0",
            "",
        ] {
            assert!(FlowerVersion::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn versions_are_found_in_cli_output() {
        let v = |s| FlowerVersion::find_in(s).map(|v| v.to_string());
        assert_eq!(v("Flower version: 1.25.0\n").as_deref(), Some("1.25.0"));
        assert_eq!(v("1.26.1").as_deref(), Some("1.26.1"));
        assert_eq!(v("Flower version: dev"), None);
        assert_eq!(v("1.2.3.4"), None);
    }
}
