//! A scan of everything a run emitted (logs, spans, plans, status, metrics) for the
//! secrets it was given: the `ONE_AUTH` password, private keys, OneGate tokens. A secret
//! counts as leaked in any form a program would plausibly write it: as is, base64 (a
//! context variable, a Basic authorization header) or, for a PEM key, any line of its body.

use std::path::Path;

use base64::Engine as _;

/// Shortest value scanned for: a shorter one would match by chance.
const MIN_SECRET: usize = 8;
/// Length of the base64 pieces of a PEM text that count as a leak of it.
const CHUNK: usize = 40;

/// The known secrets and what each looks like when written out.
#[derive(Default)]
pub struct SecretScan {
    /// (label, needle)
    needles: Vec<(String, String)>,
    /// (label of what was scanned, bytes scanned)
    scanned: Vec<(String, usize)>,
    leaks: Vec<String>,
    /// Every needle at once, built at the first scan.
    matcher: Option<regex::bytes::Regex>,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl SecretScan {
    /// A scan for nothing yet.
    pub fn new() -> SecretScan {
        SecretScan::default()
    }

    fn needle(&mut self, label: &str, value: &str) {
        assert!(
            value.len() >= MIN_SECRET,
            "secret {label} is too short to scan for ({} bytes)",
            value.len()
        );
        self.needles.push((label.to_string(), value.to_string()));
        self.matcher = None;
    }

    /// A password or token, also as base64 on its own and as `user:secret` (a Basic
    /// authorization header).
    pub fn secret(&mut self, label: &str, value: &str, user: Option<&str>) {
        self.needle(label, value);
        self.needle(
            &format!("{label} (base64)"),
            b64(value).trim_end_matches('='),
        );
        if let Some(u) = user {
            let basic = b64(&format!("{u}:{value}"));
            self.needle(&format!("{label} (Basic)"), basic.trim_end_matches('='));
        }
    }

    /// A PEM private key: every body line, and aligned pieces of the whole text's base64
    /// (how a context variable carries it).
    pub fn pem_key(&mut self, label: &str, pem: &str) {
        let body: Vec<&str> = pem
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("-----"))
            .collect();
        assert!(!body.is_empty(), "{label} is not a PEM text");
        for (i, line) in body.iter().enumerate() {
            if line.len() >= 16 {
                self.needle(&format!("{label} (line {})", i + 1), line);
            }
        }
        let whole = b64(pem);
        // Base64 of the same text starts at a 4-character boundary wherever it is embedded.
        let pieces: Vec<String> = whole
            .as_bytes()
            .chunks(CHUNK)
            .filter(|c| c.len() == CHUNK)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        for (i, p) in pieces.into_iter().enumerate() {
            self.needle(&format!("{label} (base64 piece {i})"), &p);
        }
    }

    /// Scan `text`, emitted by `what`.
    pub fn scan(&mut self, what: &str, text: &str) {
        self.scan_bytes(what, text.as_bytes());
    }

    /// Scan the bytes of `data` (text, protobuf, binary journals), every needle in one
    /// pass (a gigabyte-sized product of needles and output otherwise).
    pub fn scan_bytes(&mut self, what: &str, data: &[u8]) {
        self.scanned.push((what.to_string(), data.len()));
        let any = self.matcher.get_or_insert_with(|| {
            let alternatives: Vec<String> =
                self.needles.iter().map(|(_, n)| regex::escape(n)).collect();
            regex::bytes::Regex::new(&alternatives.join("|")).expect("needle set")
        });
        for m in any.find_iter(data) {
            let label = self
                .needles
                .iter()
                .find(|(_, n)| n.as_bytes() == m.as_bytes())
                .map_or("a secret", |(l, _)| l.as_str());
            let before = &data[m.start().saturating_sub(60)..m.start()];
            self.leaks.push(format!(
                "{what} contains {label}, after: {:?}",
                String::from_utf8_lossy(before)
            ));
        }
    }

    /// Scan every file under `dir` that `pick` picks.
    pub fn scan_files(&mut self, dir: &Path, pick: impl Fn(&Path) -> bool) {
        for p in super::files_under(dir).into_iter().filter(|p| pick(p)) {
            let data = std::fs::read(&p).unwrap_or_default();
            self.scan_bytes(&p.display().to_string(), &data);
        }
    }

    /// The leaks found so far, one line each.
    pub fn leaks(&self) -> &[String] {
        &self.leaks
    }

    /// What was scanned, one line (for the test's output).
    pub fn summary(&self) -> String {
        let bytes: usize = self.scanned.iter().map(|(_, n)| n).sum();
        format!(
            "secrets scan: {} needles over {} outputs, {} KiB",
            self.needles.len(),
            self.scanned.len(),
            bytes / 1024
        )
    }

    /// Fail naming each leak; also fail when nothing, or something empty, was scanned
    /// where output was expected (a scan of nothing proves nothing).
    pub fn assert_clean(&self, must_be_non_empty: &[&str]) {
        for what in must_be_non_empty {
            assert!(
                self.scanned
                    .iter()
                    .any(|(w, n)| w.starts_with(what) && *n > 0),
                "nothing scanned for {what}: {:?}",
                self.scanned
            );
        }
        assert!(
            self.leaks.is_empty(),
            "secrets leaked:\n{}",
            self.leaks.join("\n")
        );
    }
}
