//! Durations: the one codec for the spec's duration fields (`tls.validity`, `gracePeriod`,
//! elasticity periods …), the `ONEAPP_FL_*` duration variables and `FL_ROTATE_VALIDITY`.
//!
//! Grammar: `humantime` units (`90s`, `30m`, `720h`, `1h 30m`, `500ms`) or plain decimal
//! seconds (`30`), at most [`MAX_LEN`] characters, surrounding whitespace ignored. Whether
//! zero or a large value is acceptable is the reader's rule, not the grammar's.
//!
//! [`format`] prints whole hours as `Nh`, whole minutes as `Nm` and anything else in
//! humantime's form, and [`parse`] reads every printed value back exactly (tests below).

use std::time::Duration;

/// Longest accepted duration text.
pub const MAX_LEN: usize = 64;

/// What the grammar accepts, for error messages.
pub const RULE: &str = "a duration such as `90s`, `30m`, `720h` or `1h 30m`";

/// Parses a duration by the grammar above.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() || text.len() > MAX_LEN {
        return Err(format!("must be {RULE}"));
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| "is too large".to_string());
    }
    humantime::parse_duration(t).map_err(|e| format!("must be {RULE} ({e})"))
}

/// Parses a duration that must be longer than zero.
pub fn parse_positive(text: &str) -> Result<Duration, String> {
    match parse(text)? {
        d if d.is_zero() => Err("must be longer than 0s".into()),
        d => Ok(d),
    }
}

/// The canonical text of `d` (see the module doc).
pub fn format(d: Duration) -> String {
    let secs = d.as_secs();
    if secs > 0 && secs % 3600 == 0 && d.subsec_nanos() == 0 {
        format!("{}h", secs / 3600)
    } else if secs > 0 && secs % 60 == 0 && d.subsec_nanos() == 0 {
        format!("{}m", secs / 60)
    } else {
        humantime::format_duration(d).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_durations_parse_back_exactly() {
        for (d, text) in [
            (Duration::from_secs(8760 * 3600), "8760h"),
            (Duration::from_secs(1800), "30m"),
            (Duration::from_secs(90), "1m 30s"),
            (Duration::from_secs(5405), "1h 30m 5s"),
            (Duration::from_millis(1500), "1s 500ms"),
            (Duration::ZERO, "0s"),
        ] {
            assert_eq!(format(d), text);
            assert_eq!(parse(text), Ok(d), "{text}");
        }
        assert_eq!(parse(" 30 "), Ok(Duration::from_secs(30)));
        assert_eq!(parse("10m"), Ok(Duration::from_secs(600)));
    }

    #[test]
    fn junk_zero_and_overflow_are_refused() {
        for bad in [
            "",
            "soon",
            "5 parsecs",
            "-1s",
            "1h;reboot",
            "99999999999999999999",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&"1s ".repeat(30)).is_err(), "longer than MAX_LEN");
        assert!(parse("600000000000y").is_err(), "overflows u64 seconds");
        assert_eq!(parse_positive("0s").unwrap_err(), "must be longer than 0s");
        assert!(parse_positive("1ms").is_ok());
    }
}
