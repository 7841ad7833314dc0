//! Absolute paths on a VM: the one codec for `spec.supernodes.dataDir`,
//! `spec.training.checkpointing.path`, `ONEAPP_FL_DATA_DIR` and `ONEAPP_FL_FLOWER_BIN_DIR`.
//!
//! Grammar: `/` followed by `[A-Za-z0-9._/+-]`, no `..` component, at most [`MAX_LEN`]
//! characters: safe unquoted in a template, the shell-sourced context, a unit file and a
//! `docker -v` argument.

/// Longest accepted path.
pub const MAX_LEN: usize = 1024;

/// What the grammar accepts, for error messages.
pub const RULE: &str =
    "must be an absolute path of letters, digits and `._/+-`, without `..`, at most 1024 characters";

/// Whether `p` is an absolute path by the grammar above.
pub fn is_absolute_path(p: &str) -> bool {
    p.len() <= MAX_LEN
        && p.starts_with('/')
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'+' | b'-'))
        && !p.split('/').any(|c| c == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_safe_paths_only() {
        for ok in ["/", "/opt/flower/data", "/srv/x+y/v1.2", "/a/./b"] {
            assert!(is_absolute_path(ok), "{ok}");
        }
        for bad in [
            "relative/bin",
            "/opt/$HOME",
            "/opt/../bin",
            "/data dir",
            "",
            "/a\nb",
        ] {
            assert!(!is_absolute_path(bad), "{bad:?}");
        }
        assert!(!is_absolute_path(&format!("/{}", "a".repeat(MAX_LEN))));
    }
}
