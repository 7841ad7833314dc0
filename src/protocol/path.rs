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

/// What a directory given to Flower may be neither in nor above: system directories, and
/// the agent's own (its CA key, certificates, configuration with the Flower environment,
/// state, virtualenv, the context). The docker runtime mounts the data directory into
/// Flower's container, so `/`, `/opt` or `/etc` would hand Flower the CA key or the system;
/// the checkpoint directory becomes Flower's, so `/opt/flower/config` would let it replace
/// the agent's state. Shared by the spec (`spec.supernodes.dataDir`,
/// `spec.training.checkpointing.path`) and the agent (`ONEAPP_FL_DATA_DIR`,
/// `ONEAPP_FL_CHECKPOINT_PATH`).
pub const PROTECTED: &[&str] = &[
    "/bin",
    "/boot",
    "/context",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/opt/flower/ca",
    "/opt/flower/certs",
    "/opt/flower/config",
    "/opt/flower/home",
    "/opt/flower/state",
    "/opt/flower/venv",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib",
    "/var/log",
    "/var/run",
];

/// Why `p` (an [`is_absolute_path`]) cannot be given to Flower (data or checkpoint
/// directory), or `None`: it is `/`, a [`PROTECTED`] directory, inside one, or above one
/// (`/opt` holds `/opt/flower/ca`).
pub fn protected_problem(p: &str) -> Option<String> {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    let norm = format!("/{}", parts.join("/"));
    if norm == "/" {
        return Some(format!(
            "`{p}` is the root of the file system: a directory given to Flower would show it everything"
        ));
    }
    for q in PROTECTED {
        let why = if norm == *q {
            format!("`{p}` is {q}")
        } else if norm.starts_with(&format!("{q}/")) {
            format!("`{p}` is inside {q}")
        } else if q.starts_with(&format!("{norm}/")) {
            format!("`{p}` holds {q}")
        } else {
            continue;
        };
        return Some(format!(
            "{why}: a system or agent directory is never given to Flower (use a directory of its own, e.g. /srv/data, /opt/flower/checkpoints)"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dirs_are_never_system_or_agent_directories() {
        for ok in [
            "/opt/flower/data",
            "/srv/data",
            "/data",
            "/mnt/x+y",
            "/home/me/set",
            "/opt/flower/datasets",
        ] {
            assert_eq!(protected_problem(ok), None, "{ok}");
        }
        for (bad, says) in [
            ("/", "root of the file system"),
            ("//./", "root of the file system"),
            ("/etc", "is /etc"),
            ("/etc/", "is /etc"),
            ("/usr/share/data", "inside /usr"),
            ("/opt", "holds /opt/flower/ca"),
            ("/opt/flower", "holds /opt/flower/ca"),
            ("/opt/./flower/ca", "is /opt/flower/ca"),
            ("/var", "holds /var/lib"),
            ("/var/lib/one/datastores", "inside /var/lib"),
            ("/proc/1", "inside /proc"),
            ("/context", "is /context"),
        ] {
            let e = protected_problem(bad).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

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
