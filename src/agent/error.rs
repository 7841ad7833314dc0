//! The one error every agent concern shares: an I/O failure on a named file.
//!
//! Each concern has its own error enum next to its code ([`super::tls::TlsError`],
//! [`super::flower::FlowerError`], [`super::node::AgentError`]); their messages end up in
//! VM logs and in `FL_ERROR`, so they name the file, variable or command that failed.

use std::path::PathBuf;

/// An I/O error on `path` (`/var/lib/flower/x: Permission denied (os error 13)`).
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct IoError {
    /// The file or directory.
    pub path: PathBuf,
    /// What the OS said.
    pub source: std::io::Error,
}

impl IoError {
    /// A closure for `map_err` that names `path`.
    pub fn at(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self { path, source }
    }
}
