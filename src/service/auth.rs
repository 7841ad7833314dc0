//! The bearer token of the controller's HTTP API: read from a file (never the command
//! line, never logged), compared in constant time; the same loader serves the
//! `status --server` client.
//!
//! Owns: reading and checking the token file, and the check of an `Authorization` header.
//! Must not: print the token (its `Debug` is redacted; errors name the file only).

use std::path::Path;

use anyhow::Context as _;
use axum::http::HeaderValue;
use subtle::ConstantTimeEq as _;

/// Largest token file read.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// A bearer token.
#[derive(Clone)]
pub struct BearerToken(String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    /// Read the token from `path`: the file's content without surrounding whitespace, at
    /// least 16 visible ASCII characters.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("reading the token file {}", path.display()))?
            .len();
        anyhow::ensure!(
            len <= MAX_TOKEN_FILE_BYTES,
            "token file {}: {len} bytes, more than {MAX_TOKEN_FILE_BYTES}",
            path.display()
        );
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the token file {}", path.display()))?;
        let token = text.trim();
        anyhow::ensure!(
            token.len() >= 16 && token.bytes().all(|b| b.is_ascii_graphic()),
            "token file {}: the token must be at least 16 visible ASCII characters \
             (e.g. `openssl rand -hex 32`)",
            path.display()
        );
        Ok(Self(token.to_string()))
    }

    /// Whether `header` (an `Authorization` value) is `Bearer <this token>`; the token
    /// bytes are compared in constant time.
    pub fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        let Some(given) = header
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
        else {
            return false;
        };
        bool::from(given.trim().as_bytes().ct_eq(self.0.as_bytes()))
    }

    /// The `Authorization` header value to send, marked sensitive (hyper and reqwest keep
    /// it out of their debug output).
    pub fn header(&self) -> anyhow::Result<HeaderValue> {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?;
        v.set_sensitive(true);
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_are_checked_and_the_token_never_shows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "s3cret-s3cret-s3cret\n").unwrap();
        let t = BearerToken::from_file(&p).unwrap();
        assert!(!format!("{t:?}").contains("s3cret"));
        assert!(t.accepts(Some(&HeaderValue::from_static(
            "Bearer s3cret-s3cret-s3cret"
        ))));
        assert!(!t.accepts(Some(&HeaderValue::from_static(
            "Bearer s3cret-s3cret-s3creT"
        ))));
        assert!(!t.accepts(Some(&HeaderValue::from_static("s3cret-s3cret-s3cret"))));
        assert!(!t.accepts(None));
        std::fs::write(&p, "short\n").unwrap();
        let err = BearerToken::from_file(&p).unwrap_err().to_string();
        assert!(
            err.contains("token") && err.contains("16") && !err.contains("short"),
            "{err}"
        );
        std::fs::write(&p, vec![b'a'; 5000]).unwrap();
        assert!(BearerToken::from_file(&p).is_err());
        let err = BearerToken::from_file(&dir.path().join("nope")).unwrap_err();
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
    }
}
