//! Sources of desired state: a watched directory or a Git repository.
//!
//! Owns: producing snapshots (revision + valid clusters + per-file errors), watching for
//! change, and keeping the last good revision when a fetch fails.
//!
//! Must not: decide anything about clusters whose file failed to parse (they are left
//! alone, never pruned).
