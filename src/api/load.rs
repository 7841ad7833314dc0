//! Loading FlowerCluster specs from files and directories.
//!
//! Every document is handled on its own: a bad file (or a bad document in a file) never
//! stops the good ones, and all errors of all files come out of one call. Within a
//! document too: every structural error (unknown, missing, wrongly typed field; module
//! `collect`), every semantic and metadata error, each with line:column and field path,
//! sorted by position then path. Tests: `tests/spec_validation.rs`
//! `a_document_with_four_independent_errors_gets_four_located_errors`,
//! `unknown_missing_and_mistyped_fields_come_out_together_in_position_order`.
//!
//! Guarantees: never panics on any input; files larger than [`MAX_FILE_BYTES`] are
//! rejected before they are parsed, and so is flow nesting (`[`/`{`) deeper than
//! [`MAX_FLOW_DEPTH`], by a linear pre-scan ([`check_nesting`]): the YAML parser takes
//! quadratic time on deep flow nesting (a 200 KB file took 20 s, 1 MiB 381 s); error
//! messages never quote TLS material. Tests: `tests/spec_validation.rs`
//! `deep_flow_nesting_is_refused_by_the_pre_scan_with_its_line`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::collect;
use super::error::{FieldPath, PathSegment, Position, SpecError};
use super::locate::{locate, locate_key, position_of};
use super::tls;
use super::types::FlowerCluster;
use super::validate::{self, Issue, Severity};

/// Larger spec files are rejected unread. A spec is a few KiB, one with inline TLS
/// material about 20 KiB; 256 KiB leaves room for a file of several clusters.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;
/// Deepest flow nesting (`[`/`{`) accepted; a spec needs 3 or 4 levels.
pub const MAX_FLOW_DEPTH: usize = 32;
/// More documents than this in one file are rejected.
pub const MAX_DOCUMENTS: usize = 256;

/// Where a loaded cluster came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourceRef {
    /// The spec file.
    pub file: PathBuf,
    /// Index of the YAML document in the file.
    pub document_index: usize,
    /// Line where the document starts (1-based).
    pub line: usize,
}

impl std::fmt::Display for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A valid cluster spec.
///
/// `cluster` is normalised: TLS material given as `file` is read and carried `inline`,
/// so rendering needs no I/O and the spec hash changes when a certificate file changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The cluster.
    pub cluster: FlowerCluster,
    /// Where it came from.
    pub source: SourceRef,
    /// [`spec_hash`] of the normalised spec.
    pub spec_hash: String,
}

/// A file (or document) that failed, with the cluster names that could still be read from it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FailedFile {
    /// The spec file.
    pub file: PathBuf,
    /// `metadata.name` values readable from the raw YAML of its failed documents.
    pub names: Vec<String>,
}

/// The outcome of loading: valid clusters, and everything wrong.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Valid clusters, in file order.
    pub clusters: Vec<Loaded>,
    /// Errors: the documents they belong to are not in `clusters`.
    pub errors: Vec<SpecError>,
    /// Notes that do not make a spec invalid.
    pub warnings: Vec<SpecError>,
    /// Files with failed documents and the names in them. A controller should hold (not
    /// prune) these clusters until the file is fixed.
    pub failed_files: Vec<FailedFile>,
}

impl LoadReport {
    /// True when there is no error.
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }

    /// Names of clusters whose spec exists but is currently invalid.
    pub fn held_names(&self) -> BTreeSet<String> {
        self.failed_files
            .iter()
            .flat_map(|f| f.names.iter().cloned())
            .collect()
    }

    fn absorb(&mut self, file: &Path, other: FileOutcome) {
        if !other.errors.is_empty() {
            self.failed_files.push(FailedFile {
                file: file.to_path_buf(),
                names: other.failed_names,
            });
        }
        self.clusters.extend(other.loaded);
        self.errors.extend(other.errors);
        self.warnings.extend(other.warnings);
    }
}

/// The spec hash: sha256 over the canonical JSON of `spec` (struct field order, sorted
/// maps), first 16 hex digits. Changes when the spec changes, stable otherwise.
pub fn spec_hash(cluster: &FlowerCluster) -> String {
    let json = serde_json::to_vec(&cluster.spec).unwrap_or_default();
    let digest = Sha256::digest(&json);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Loads every spec under `paths` (files, or directories searched recursively for
/// `*.yaml` / `*.yml`), validates them, and reports duplicates across files.
///
/// Each path is the *spec root* of the files under it (a file's root is its directory):
/// TLS material a spec names by `file` must resolve inside it ([`super::tls`]).
pub fn load_paths(paths: &[PathBuf]) -> LoadReport {
    let mut report = LoadReport::default();
    let mut seen = BTreeSet::new();
    for p in paths {
        let mut files = Vec::new();
        if let Err(e) = collect_files(p, &mut files) {
            report.errors.push(SpecError::file(p, e));
            continue;
        }
        let root = if p.is_dir() {
            p.as_path()
        } else {
            p.parent().unwrap_or(Path::new("."))
        };
        for f in files {
            if seen.insert(f.clone()) {
                report.absorb(&f, load_file_in(root, &f));
            }
        }
    }
    reject_duplicates(&mut report);
    report
}

/// Loads one file; its directory is the spec root.
pub fn load_file(path: &Path) -> FileOutcome {
    load_file_in(path.parent().unwrap_or(Path::new(".")), path)
}

/// Loads one file under spec root `root`.
fn load_file_in(root: &Path, path: &Path) -> FileOutcome {
    match read_capped(path) {
        Ok(text) => load_text_in(root, path, &text),
        Err(msg) => FileOutcome {
            errors: vec![SpecError::file(path, msg)],
            ..FileOutcome::default()
        },
    }
}

/// What one file yielded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileOutcome {
    /// Valid clusters.
    pub loaded: Vec<Loaded>,
    /// Errors.
    pub errors: Vec<SpecError>,
    /// Warnings.
    pub warnings: Vec<SpecError>,
    /// Names readable from failed documents.
    pub failed_names: Vec<String>,
}

/// Loads spec text as if read from `path` (relative TLS files resolve against its
/// directory, which is also the spec root they must stay in).
pub fn load_text(path: &Path, text: &str) -> FileOutcome {
    load_text_in(path.parent().unwrap_or(Path::new(".")), path, text)
}

/// Loads spec text as if read from `path` under spec root `root`.
fn load_text_in(root: &Path, path: &Path, text: &str) -> FileOutcome {
    let mut out = FileOutcome::default();
    if text.len() as u64 > MAX_FILE_BYTES {
        out.errors
            .push(SpecError::file(path, too_big(text.len() as u64)));
        return out;
    }
    if let Err(e) = check_nesting(text) {
        out.errors.push(SpecError {
            position: Some(e),
            message: format!(
                "YAML nested deeper than {MAX_FLOW_DEPTH} levels of [ ] or {{ }}; refused \
                 unparsed"
            ),
            ..SpecError::file(path, "")
        });
        return out;
    }
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut non_empty = 0;
    // First pass: raw values, to catch syntax errors and read names even from invalid specs.
    let mut raws = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        if i >= MAX_DOCUMENTS {
            out.errors.push(SpecError::file(
                path,
                format!("more than {MAX_DOCUMENTS} YAML documents in one file"),
            ));
            return out;
        }
        match serde_norway::Value::deserialize(de) {
            Ok(v) => raws.push(v),
            Err(e) => {
                out.errors.push(SpecError {
                    document_index: i,
                    position: position_of(&e),
                    message: syntax_message(&e, text),
                    ..SpecError::file(path, "")
                });
                break;
            }
        }
    }
    // Second pass: typed, document by document, from the same text (keeps parser marks).
    let docs = serde_norway::Deserializer::from_str(text).take(raws.len());
    for ((i, de), raw) in docs.enumerate().zip(&raws) {
        if raw.is_null() {
            continue;
        }
        non_empty += 1;
        let name = raw
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(str::to_string);
        let doc = DocCtx {
            path,
            text,
            index: i,
            name: name.clone(),
        };
        let dirs = Dirs {
            root,
            base: base_dir,
        };
        let (loaded, errors, warnings) = load_document(&doc, raw, de, dirs);
        if !errors.is_empty() {
            out.failed_names.extend(name);
        }
        out.loaded.extend(loaded);
        out.errors.extend(errors);
        out.warnings.extend(warnings);
    }
    if non_empty == 0 && out.errors.is_empty() {
        out.errors.push(SpecError::file(
            path,
            "no FlowerCluster in this file (it is empty or holds only comments)",
        ));
    }
    out
}

/// The spec root and the spec file's directory.
#[derive(Clone, Copy)]
struct Dirs<'a> {
    root: &'a Path,
    base: &'a Path,
}

struct DocCtx<'a> {
    path: &'a Path,
    text: &'a str,
    index: usize,
    name: Option<String>,
}

impl DocCtx<'_> {
    fn error(&self, path: FieldPath, position: Option<Position>, message: String) -> SpecError {
        SpecError {
            file: self.path.to_path_buf(),
            document_index: self.index,
            path,
            position,
            message,
            cluster: self.name.clone(),
        }
    }

    fn found(&self, f: collect::Found) -> SpecError {
        let pos = match &f.key_of {
            Some(k) => locate_key(self.text, self.index, k),
            None => locate(self.text, self.index, &f.path),
        };
        let message = improve(&f.path, f.message);
        self.error(f.path, pos, message)
    }

    fn issue(&self, issue: Issue) -> SpecError {
        let pos = locate(self.text, self.index, &issue.path);
        self.error(issue.path, pos, issue.message)
    }
}

fn load_document(
    doc: &DocCtx<'_>,
    raw: &serde_norway::Value,
    de: serde_norway::Deserializer<'_>,
    dirs: Dirs<'_>,
) -> (Option<Loaded>, Vec<SpecError>, Vec<SpecError>) {
    let mut errors = Vec::new();
    if !raw.is_mapping() {
        let pos = locate(doc.text, doc.index, &FieldPath::root());
        errors.push(doc.error(
            FieldPath::root(),
            pos,
            "expected a FlowerCluster (a mapping with apiVersion, kind, metadata, spec)".into(),
        ));
        return (None, errors, Vec::new());
    }
    let has_status = raw.get("status").is_some();
    if has_status {
        errors.push(doc.issue(Issue::error(
            FieldPath::parse("status"),
            "status is written by the controller; remove it from the spec",
        )));
    }
    let status_path = FieldPath::parse("status");
    // The typed loader decides validity; when it refuses, the repair loop finds every
    // structural error and a repaired copy for the semantic checks (module collect).
    let (mut cluster, tainted): (FlowerCluster, Vec<FieldPath>) =
        match serde_path_to_error::deserialize(de) {
            Ok(c) => (c, Vec::new()),
            Err(e) => {
                let collected = collect::collect(raw);
                if collected.errors.is_empty() {
                    // Only the text loader refuses: report its own error.
                    let path = convert_path(e.path());
                    let inner = e.into_inner();
                    let message = improve(&path, bare_message(&inner));
                    errors.push(doc.error(path, position_of(&inner), message));
                }
                for f in collected.errors {
                    // Already reported above, with a better message.
                    if !(has_status && f.path == status_path) {
                        errors.push(doc.found(f));
                    }
                }
                if collected.truncated {
                    errors.push(doc.error(
                        FieldPath::root(),
                        None,
                        format!(
                            "stopped after {} structural errors; fix these and validate again",
                            errors.len()
                        ),
                    ));
                }
                match collected.repaired {
                    Some(c) => (c, collected.tainted),
                    None => return (None, sorted(errors), Vec::new()),
                }
            }
        };
    let mut warnings = Vec::new();
    let issues = validate::validate(&cluster)
        .into_iter()
        .chain(tls::resolve_provided(&mut cluster, dirs.root, dirs.base));
    // An issue about (or reading) a repaired value is about our placeholder, not the spec.
    for issue in issues.filter(|i| !i.touches(&tainted)) {
        match issue.severity {
            Severity::Error => errors.push(doc.issue(issue)),
            Severity::Warning => warnings.push(doc.issue(issue)),
        }
    }
    if !errors.is_empty() {
        return (None, sorted(errors), sorted(warnings));
    }
    let line = locate(doc.text, doc.index, &FieldPath::root()).map_or(1, |p| p.line);
    let spec_hash = spec_hash(&cluster);
    let loaded = Loaded {
        cluster,
        source: SourceRef {
            file: doc.path.to_path_buf(),
            document_index: doc.index,
            line,
        },
        spec_hash,
    };
    (Some(loaded), errors, warnings)
}

/// A document's errors in a stable order: by position, then field path (unlocated last).
fn sorted(mut errors: Vec<SpecError>) -> Vec<SpecError> {
    errors.sort_by(|a, b| {
        (a.position.is_none(), a.position, &a.path).cmp(&(
            b.position.is_none(),
            b.position,
            &b.path,
        ))
    });
    errors
}

pub(super) fn convert_path(p: &serde_path_to_error::Path) -> FieldPath {
    use serde_path_to_error::Segment;
    FieldPath(
        p.iter()
            .filter_map(|s| match s {
                Segment::Seq { index } => Some(PathSegment::Index(*index)),
                Segment::Map { key } => Some(PathSegment::Key(key.clone())),
                Segment::Enum { variant } => Some(PathSegment::Key(variant.clone())),
                Segment::Unknown => None,
            })
            .collect(),
    )
}

/// The serde_norway message without its own `path: ` prefix and ` at line L column C` suffix.
pub(super) fn bare_message(e: &serde_norway::Error) -> String {
    let mut s = e.to_string();
    if let Some(loc) = e.location() {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = s.strip_suffix(&suffix) {
            s = stripped.to_string();
        }
    }
    let prefix = Regex::new(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+|\[\d+\])*: ").ok();
    if let Some(m) = prefix.and_then(|re| re.find(&s).map(|m| m.end())) {
        s = s[m..].to_string();
    }
    s
}

/// Friendlier wording for the messages serde produces.
fn improve(path: &FieldPath, message: String) -> String {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let unknown = rest.split('`').next().unwrap_or_default();
        let expected: Vec<&str> = rest
            .split_once("expected")
            .map(|(_, e)| e.split('`').skip(1).step_by(2).collect())
            .unwrap_or_default();
        let best = expected
            .iter()
            .map(|cand| (strsim::jaro_winkler(unknown, cand), *cand))
            .filter(|(score, _)| *score >= 0.8)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let at = if path.0.is_empty() {
            "here".to_string()
        } else {
            format!("in `{path}`")
        };
        return match best {
            Some((_, cand)) => format!("unknown field `{unknown}`; did you mean `{cand}`?"),
            None if expected.is_empty() => {
                format!("unknown field `{unknown}`: no fields are allowed {at}")
            }
            None => format!(
                "unknown field `{unknown}`; expected one of {}",
                expected
                    .iter()
                    .map(|e| format!("`{e}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    }
    let message = humanize_types(message);
    if message.contains("did not match any variant of untagged enum ObjectRef") {
        return "expected a name (string) or a numeric id".into();
    }
    if message.contains("did not match any variant of untagged enum ConfigValue") {
        return "expected a string, number or boolean".into();
    }
    if message.contains("untagged enum CudaDevicesRepr") {
        return "expected `all` or a list of device indices such as [0, 1]".into();
    }
    message
}

/// Rust type names in serde messages → words a spec author knows.
fn humanize_types(message: String) -> String {
    let mut m = message;
    for (rust, human) in [
        ("expected u16", "expected an integer between 0 and 65535"),
        ("expected u32", "expected a non-negative integer"),
        ("expected i32", "expected an integer"),
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ] {
        if let Some(prefix) = m.strip_suffix(rust) {
            m = format!("{prefix}{human}");
        }
    }
    m
}

fn syntax_message(e: &serde_norway::Error, text: &str) -> String {
    let mut msg = format!("invalid YAML: {}", bare_message(e));
    let line_has_tab = e
        .location()
        .and_then(|l| text.lines().nth(l.line().saturating_sub(1)))
        .is_some_and(|l| l.contains('\t'));
    if line_has_tab || (msg.contains("cannot start any token") && text.contains('\t')) {
        msg.push_str(" (tabs are not allowed for indentation in YAML; use spaces)");
    }
    msg
}

/// A linear scan for flow nesting deeper than [`MAX_FLOW_DEPTH`]; `Err` holds where it
/// goes too deep. Brackets in comments, quoted scalars and block scalars (`|`, `>`) do
/// not count; a quote opens a quoted scalar only where a scalar can start. Approximate
/// YAML on purpose: it only has to accept every spec and be cheap, the parser decides the
/// rest.
pub fn check_nesting(text: &str) -> Result<(), Position> {
    let mut depth = 0usize;
    // Indentation of a line opening a block scalar: more indented lines are its content.
    let mut block: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        if let Some(b) = block {
            if line.trim().is_empty() || indent > b {
                continue;
            }
            block = None;
        }
        let bytes = line.as_bytes();
        let mut quote: Option<u8> = None;
        let mut prev = b' ';
        let mut i = 0;
        let mut code_end = bytes.len();
        while i < bytes.len() {
            let c = bytes[i];
            match quote {
                Some(b'"') if c == b'\\' => i += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    b'#' if prev == b' ' || prev == b'\t' => {
                        code_end = i;
                        break;
                    }
                    b'\'' | b'"'
                        if matches!(prev, b' ' | b'\t' | b':' | b'-' | b'[' | b'{' | b',') =>
                    {
                        quote = Some(c)
                    }
                    b'[' | b'{' => {
                        depth += 1;
                        if depth > MAX_FLOW_DEPTH {
                            return Err(Position {
                                line: n + 1,
                                column: i + 1,
                            });
                        }
                    }
                    b']' | b'}' => depth = depth.saturating_sub(1),
                    _ => {}
                },
            }
            if quote.is_none() || c != b' ' {
                prev = c;
            }
            i += 1;
        }
        // A quoted scalar spanning lines is scanned as code from its second line on: at
        // worst its brackets count, which only matters past the limit.
        let code = line[..code_end].trim_end();
        let last = code.rsplit([' ', ':']).next().unwrap_or_default();
        let opens_block = last.starts_with(['|', '>'])
            && last.len() <= 3
            && last[1..]
                .chars()
                .all(|c| c.is_ascii_digit() || c == '+' || c == '-');
        if opens_block && quote.is_none() {
            block = Some(indent);
        }
    }
    Ok(())
}

fn too_big(len: u64) -> String {
    format!(
        "file is {len} bytes, larger than the {} KiB limit for a spec file",
        MAX_FILE_BYTES / 1024
    )
}

fn read_capped(path: &Path) -> Result<String, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_FILE_BYTES {
        return Err(too_big(len));
    }
    let mut buf = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(too_big(buf.len() as u64));
    }
    String::from_utf8(buf).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut found = Vec::new();
    walk(path, &mut found, 0)?;
    found.sort();
    out.extend(found);
    Ok(())
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<(), String> {
    if depth > 32 {
        return Ok(());
    }
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot read directory: {e}"))?;
    for entry in entries.flatten() {
        let p = entry.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        let Ok(ft) = entry.file_type() else { continue };
        // A link may point anywhere on the host (a Git checkout can carry one): skipped.
        if ft.is_symlink() {
            continue;
        }
        if ft.is_dir() {
            walk(&p, out, depth + 1)?;
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    Ok(())
}

/// Two documents naming the same cluster are both rejected: which one wins would depend
/// on file order.
fn reject_duplicates(report: &mut LoadReport) {
    let mut by_name: BTreeMap<String, Vec<SourceRef>> = BTreeMap::new();
    for l in &report.clusters {
        by_name
            .entry(l.cluster.metadata.name.clone())
            .or_default()
            .push(l.source.clone());
    }
    let dups: BTreeMap<String, Vec<SourceRef>> =
        by_name.into_iter().filter(|(_, v)| v.len() > 1).collect();
    if dups.is_empty() {
        return;
    }
    let mut kept = Vec::new();
    for l in std::mem::take(&mut report.clusters) {
        let name = &l.cluster.metadata.name;
        match dups.get(name) {
            None => kept.push(l),
            Some(all) => {
                let others: Vec<String> = all
                    .iter()
                    .filter(|s| **s != l.source)
                    .map(ToString::to_string)
                    .collect();
                report.errors.push(SpecError {
                    file: l.source.file.clone(),
                    document_index: l.source.document_index,
                    path: FieldPath::parse("metadata.name"),
                    position: Some(Position {
                        line: l.source.line,
                        column: 1,
                    }),
                    message: format!(
                        "duplicate cluster name `{name}` (also defined at {})",
                        others.join(", ")
                    ),
                    cluster: Some(name.clone()),
                });
                report.failed_files.push(FailedFile {
                    file: l.source.file.clone(),
                    names: vec![name.clone()],
                });
            }
        }
    }
    report.clusters = kept;
}
