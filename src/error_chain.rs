//! An error and its sources as one line, `: `-separated (what `{:#}` gives for anyhow).
//!
//! Owns: the one walk over [`std::error::Error::source`] chains. The controller's logs and
//! status ([`crate::runtime`]) and the OpenNebula clients' transport errors
//! ([`crate::one::http`], which redacts credentials on top) both use it; compiled in the
//! agent build too.

use std::error::Error;

/// `error` and its sources, `: `-separated.
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    append_sources(error.to_string(), error.source())
}

/// `text` followed by `source` and each of its own sources, `: `-separated: for callers
/// that describe the outermost error in their own words.
pub fn append_sources(mut text: String, mut source: Option<&(dyn Error + 'static)>) -> String {
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn sources_are_joined_in_order() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
        assert_eq!(
            append_sources("mine".into(), Some(&e)),
            "mine: outer: inner"
        );
        assert_eq!(append_sources("alone".into(), None), "alone");
    }
}
