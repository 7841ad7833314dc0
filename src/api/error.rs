//! Spec errors: where (file, field path, line:column) and what.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// One step of a field path: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(untagged)]
pub enum PathSegment {
    /// A mapping key (`supernodes`).
    Key(String),
    /// A sequence index (`[0]`).
    Index(usize),
}

/// A field path such as `spec.supernodes.elasticity.policies[0].adjust`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldPath(pub Vec<PathSegment>);

impl FieldPath {
    /// The document root.
    pub fn root() -> Self {
        Self::default()
    }

    /// Parses `a.b[0].c` (keys never hold `.` or `[` in our schema).
    pub fn parse(s: &str) -> Self {
        let mut segs = Vec::new();
        for part in s.split('.').filter(|p| !p.is_empty()) {
            let (key, rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
            if !key.is_empty() {
                segs.push(PathSegment::Key(key.to_string()));
            }
            for idx in rest.split('[') {
                if let Ok(i) = idx.trim_end_matches(']').parse() {
                    segs.push(PathSegment::Index(i));
                }
            }
        }
        Self(segs)
    }

    /// This path extended by a key.
    pub fn key(&self, key: &str) -> Self {
        let mut p = self.clone();
        p.0.push(PathSegment::Key(key.to_string()));
        p
    }

    /// This path extended by an index.
    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(PathSegment::Index(i));
        p
    }

    /// The segments.
    pub fn segments(&self) -> &[PathSegment] {
        &self.0
    }

    /// Whether this path is `prefix` or lies under it.
    pub fn starts_with(&self, prefix: &FieldPath) -> bool {
        self.0.starts_with(&prefix.0)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(document)");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                PathSegment::Key(k) if i == 0 => f.write_str(k)?,
                PathSegment::Key(k) => write!(f, ".{k}")?,
                PathSegment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

impl Serialize for FieldPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A 1-based line and column in a spec file.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

/// What is wrong with a spec, and where.
///
/// Messages never hold TLS key material or inline PEM text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}", self.render())]
pub struct SpecError {
    /// The spec file.
    pub file: PathBuf,
    /// Index of the YAML document in the file (0 for single-document files).
    pub document_index: usize,
    /// Field path inside the document; empty for file-level problems.
    pub path: FieldPath,
    /// Line and column, when the parser can tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
    /// What is wrong.
    pub message: String,
    /// `metadata.name` of the document, when it could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

impl SpecError {
    /// A file-level error (no path, no position).
    pub fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            document_index: 0,
            path: FieldPath::root(),
            position: None,
            message: message.into(),
            cluster: None,
        }
    }

    /// `file:line:col: path: message`, the compiler-style line the CLI prints.
    pub fn render(&self) -> String {
        let mut s = self.file.display().to_string();
        if let Some(p) = self.position {
            s.push_str(&format!(":{}:{}", p.line, p.column));
        }
        s.push_str(": ");
        s.push_str(&self.what());
        s
    }

    /// `path: message` (just the message for file-level errors): the line without its place.
    pub fn what(&self) -> String {
        if self.path.0.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.path, self.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_and_print_the_same() {
        for s in [
            "spec.supernodes.max",
            "spec.supernodes.elasticity.policies[0].adjust",
            "a[1][2].b",
        ] {
            assert_eq!(FieldPath::parse(s).to_string(), s);
        }
        assert_eq!(FieldPath::root().to_string(), "(document)");
    }

    #[test]
    fn errors_render_compiler_style() {
        let e = SpecError {
            file: "x.yaml".into(),
            document_index: 0,
            path: FieldPath::parse("spec.supernodes.max"),
            position: Some(Position {
                line: 12,
                column: 5,
            }),
            message: "must be ≥ count".into(),
            cluster: None,
        };
        assert_eq!(
            e.to_string(),
            "x.yaml:12:5: spec.supernodes.max: must be ≥ count"
        );
    }
}
