//! Booleans as OpenNebula templates and contexts write them: the one codec for
//! `ONEAPP_FL_*_ENABLED`-style variables and the `READY`, `FL_READY`, `FL_NODE_READY` and
//! `FL_TLS` attributes.
//!
//! Writers print `YES` / `NO` ([`format`]). Readers accept, case-insensitively, `YES`/`NO`,
//! `TRUE`/`FALSE`, `Y`/`N` and `1`/`0` ([`parse`]): what people and one-apps images write
//! into templates by hand. Anything else is no boolean.

/// `YES` or `NO`.
pub fn format(b: bool) -> &'static str {
    if b {
        "YES"
    } else {
        "NO"
    }
}

/// Reads a boolean (see the module doc); `None` for anything else.
pub fn parse(v: &str) -> Option<bool> {
    if v.len() > 5 {
        return None;
    }
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "y" | "1" => Some(true),
        "no" | "false" | "n" | "0" => Some(false),
        _ => None,
    }
}

/// What [`parse`] accepts, for error messages.
pub const RULE: &str = "must be YES or NO";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_values_read_back_and_spellings_are_tolerated() {
        for b in [true, false] {
            assert_eq!(parse(format(b)), Some(b));
        }
        for (v, b) in [
            ("yes", true),
            ("True", true),
            ("1", true),
            ("n", false),
            ("FALSE", false),
        ] {
            assert_eq!(parse(v), Some(b), "{v}");
        }
        for bad in ["", "maybe", "YES ", "yess", "2", "on"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
