//! Checks and normalises operator-provided TLS material (`spec.tls.provided`).
//!
//! Guarantees: messages never contain key material or PEM text; after a successful
//! check every item is carried inline (base64 PEM) and `file` is cleared, so rendering
//! is pure and the spec hash covers the certificate contents. A `file` is read only when
//! it lies inside the spec root: absolute paths and `..` leaving the root are refused
//! before the file system is touched (the error cannot tell whether an outside file
//! exists), and no symlink is followed on the way (`confine`; tests below and
//! `tests/spec_validation.rs` `tls_files_outside_the_spec_root_are_refused_unread`).
//! Assumptions: keys are PKCS#8 (`BEGIN PRIVATE KEY`), what rcgen/ring can load.

use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use rcgen::{KeyPair, PublicKeyData};
use x509_parser::certificate::X509Certificate;
use x509_parser::pem::Pem;

use super::error::FieldPath;
use super::types::{FlowerCluster, PemSource, TlsMode};
use super::validate::Issue;
use crate::protocol::pem;

/// PEM files larger than this are rejected (a certificate chain is a few KiB).
const MAX_PEM_BYTES: u64 = pem::MAX_PEM_BYTES as u64;

/// Checks `spec.tls.provided` (when the mode is `provided`) and inlines file material,
/// read relative to `base_dir` (the spec file's directory) and only inside `root`.
pub fn resolve_provided(cluster: &mut FlowerCluster, root: &Path, base_dir: &Path) -> Vec<Issue> {
    let tls = &mut cluster.spec.tls;
    let Some(p) = tls.provided.as_mut() else {
        return Vec::new();
    };
    if tls.mode != TlsMode::Provided {
        return Vec::new();
    }
    let base = FieldPath::parse("spec.tls.provided");
    let mut issues = Vec::new();
    let dirs = (root, base_dir);
    let ca = read_item(&p.ca_cert, dirs, &base.key("caCert"), &mut issues);
    let cert = read_item(&p.cert, dirs, &base.key("cert"), &mut issues);
    let key = read_item(&p.key, dirs, &base.key("key"), &mut issues);
    let (Some(ca), Some(cert), Some(key)) = (ca, cert, key) else {
        return issues;
    };
    issues.extend(check_material(&ca, &cert, &key, &base));
    if issues.is_empty() {
        for (item, pem) in [
            (&mut p.ca_cert, &ca),
            (&mut p.cert, &cert),
            (&mut p.key, &key),
        ] {
            *item = PemSource {
                file: None,
                inline: Some(pem::encode(pem.as_bytes())),
            };
        }
    }
    issues
}

/// Reads one item as PEM text. Never echoes content.
fn read_item(
    src: &PemSource,
    (root, base_dir): (&Path, &Path),
    path: &FieldPath,
    issues: &mut Vec<Issue>,
) -> Option<String> {
    match (&src.file, &src.inline) {
        (Some(_), Some(_)) | (None, None) => {
            issues.push(Issue::error(
                path.clone(),
                "give exactly one of `file` or `inline`",
            ));
            None
        }
        (Some(file), None) => {
            let inside = match confine(root, base_dir, file) {
                Ok(p) => p,
                Err(msg) => {
                    issues.push(Issue::error(path.key("file"), msg));
                    return None;
                }
            };
            let full = root.join(&inside);
            let read = open_no_follow(&full).and_then(|f| {
                let mut buf = Vec::new();
                f.take(MAX_PEM_BYTES + 1).read_to_end(&mut buf).map(|_| buf)
            });
            match read {
                Err(e) => {
                    issues.push(Issue::error(
                        path.key("file"),
                        format!("cannot read {}: {e}", inside.display()),
                    ));
                    None
                }
                Ok(b) if b.len() as u64 > MAX_PEM_BYTES => {
                    issues.push(Issue::error(
                        path.key("file"),
                        "file is too large for PEM material",
                    ));
                    None
                }
                Ok(b) => text_or_issue(b, &path.key("file"), issues),
            }
        }
        (None, Some(b64)) => match pem::decode(b64) {
            Ok(text) => Some(text),
            Err(e) => {
                issues.push(Issue::error(path.key("inline"), e));
                None
            }
        },
    }
}

/// `file` (relative to `base_dir`) as a path relative to `root`, if it stays inside it
/// and passes through no symlink. Lexical first: a path leaving the root is refused
/// without any file-system access, so the answer never depends on what exists outside.
fn confine(root: &Path, base_dir: &Path, file: &Path) -> Result<PathBuf, String> {
    const OUTSIDE: &str = "must be a relative path that stays inside the spec directory \
                           (absolute paths and `..` leaving it are refused)";
    if file.is_absolute() {
        return Err(OUTSIDE.into());
    }
    let start = base_dir.strip_prefix(root).unwrap_or(Path::new(""));
    let mut inside: Vec<Component<'_>> = Vec::new();
    for c in start.components().chain(file.components()) {
        match c {
            Component::Normal(_) => inside.push(c),
            Component::CurDir => {}
            Component::ParentDir => {
                inside.pop().ok_or_else(|| OUTSIDE.to_string())?;
            }
            Component::RootDir | Component::Prefix(_) => return Err(OUTSIDE.into()),
        }
    }
    let rel: PathBuf = inside.iter().collect();
    // Inside lexically; now no component may be a link leading elsewhere.
    let mut at = root.to_path_buf();
    for c in &inside {
        at.push(c);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "{} is a symbolic link; links are not followed",
                    rel.display()
                ));
            }
            // A missing component is reported by the read, with the in-root path.
            _ => {}
        }
    }
    Ok(rel)
}

/// Open `path` for reading, refusing a symlink as the last component (the check in
/// [`confine`] could race with a rename).
fn open_no_follow(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

fn text_or_issue(bytes: Vec<u8>, path: &FieldPath, issues: &mut Vec<Issue>) -> Option<String> {
    match pem::text(bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            issues.push(Issue::error(path.clone(), e));
            None
        }
    }
}

fn certs(text: &str) -> Result<Vec<Pem>, String> {
    let pems: Vec<Pem> = Pem::iter_from_buffer(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| "is not valid PEM".to_string())?;
    let certs: Vec<Pem> = pems
        .into_iter()
        .filter(|p| p.label == "CERTIFICATE")
        .collect();
    if certs.is_empty() {
        return Err("holds no `CERTIFICATE` PEM block".into());
    }
    Ok(certs)
}

fn parse<'a>(pem: &'a Pem, path: &FieldPath) -> Result<X509Certificate<'a>, Issue> {
    pem.parse_x509()
        .map_err(|_| Issue::error(path.clone(), "holds a certificate that cannot be parsed"))
}

fn check_validity(c: &X509Certificate<'_>, what: &str, path: &FieldPath) -> Option<Issue> {
    let v = c.validity();
    if v.is_valid() {
        return None;
    }
    Some(Issue::error(
        path.clone(),
        format!(
            "the {what} is not valid now (valid from {} to {})",
            v.not_before, v.not_after
        ),
    ))
}

fn check_material(ca: &str, cert: &str, key: &str, base: &FieldPath) -> Vec<Issue> {
    let (ca_path, cert_path, key_path) = (base.key("caCert"), base.key("cert"), base.key("key"));
    let ca_pems = match certs(ca) {
        Ok(c) => c,
        Err(m) => return vec![Issue::error(ca_path, m)],
    };
    let cert_pems = match certs(cert) {
        Ok(c) => c,
        Err(m) => return vec![Issue::error(cert_path, m)],
    };
    let ca_cert = match parse(&ca_pems[0], &ca_path) {
        Ok(c) => c,
        Err(i) => return vec![i],
    };
    let mut chain = Vec::new();
    for p in &cert_pems {
        match parse(p, &cert_path) {
            Ok(c) => chain.push(c),
            Err(i) => return vec![i],
        }
    }
    let mut issues = Vec::new();
    issues.extend(check_validity(&ca_cert, "CA certificate", &ca_path));
    issues.extend(check_validity(&chain[0], "certificate", &cert_path));
    // Leaf → intermediates (in order) → CA.
    for (i, c) in chain.iter().enumerate() {
        let issuer = chain.get(i + 1).unwrap_or(&ca_cert);
        if c.verify_signature(Some(issuer.public_key())).is_err() {
            issues.push(Issue::error(
                cert_path.clone(),
                "the certificate chain does not verify against caCert (not signed by this CA)",
            ));
            break;
        }
    }
    match KeyPair::from_pem(key) {
        Err(_) => issues.push(Issue::error(
            key_path,
            "is not a usable PKCS#8 private key (`BEGIN PRIVATE KEY`)",
        )),
        Ok(kp) => {
            if kp.der_bytes() != chain[0].public_key().subject_public_key.data.as_ref() {
                issues.push(Issue::error(
                    key_path,
                    "does not match the certificate's public key",
                ));
            }
        }
    }
    issues
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa};

    /// A CA, a server cert signed by it and the server key, as PEM text.
    pub(crate) fn material() -> (String, String, String) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["superlink".into()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca.pem(), cert.pem(), key.serialize_pem())
    }

    fn base() -> FieldPath {
        FieldPath::parse("spec.tls.provided")
    }

    #[test]
    fn good_material_passes() {
        let (ca, cert, key) = material();
        assert_eq!(check_material(&ca, &cert, &key, &base()), vec![]);
    }

    #[test]
    fn wrong_key_and_wrong_ca_fail_without_printing_keys() {
        let (ca, cert, key) = material();
        let (other_ca, _, other_key) = material();
        let issues = check_material(&ca, &cert, &other_key, &base());
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert!(issues[0].message.contains("does not match"));
        let issues = check_material(&other_ca, &cert, &key, &base());
        assert!(issues[0].message.contains("does not verify"), "{issues:?}");
        for i in issues {
            assert!(!i.message.contains("PRIVATE"), "{}", i.message);
        }
        let issues = check_material(
            &ca,
            &cert,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            &base(),
        );
        assert!(issues[0].message.contains("PKCS#8"));
        assert!(!issues[0].message.contains("AAAA"));
    }
}
