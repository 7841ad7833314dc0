//! TLS material: the SuperLink's CA and server certificate (generated with rcgen, EC
//! P-256), validation of provided or fetched certificates (x509-parser), reuse decisions.
//!
//! Guarantees: a server certificate is only (re)used when its chain verifies against the
//! CA, it is valid beyond `renew_before`, and its SAN holds the VM address and every extra
//! SAN. Key files are written 0600, certificates 0644, atomically (a unique temporary file,
//! then a rename), and [`ensure_auto`] / [`install_provided`] hold an exclusive lock
//! (`tls.lock` next to the CA key), so `configure` and the supervisor never interleave.
//! Certificate dates are checked arithmetic, validity at most
//! [`crate::protocol::MAX_CERT_VALIDITY`] (test: `a_huge_validity_is_an_error_not_a_panic`).
//! Assumptions: the CA key lives outside the directory that is mounted into containers.
//! Caveats: no revocation; rotation keeps the CA so SuperNodes keep trusting the link.

use std::fs;
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use x509_parser::pem::Pem;
use x509_parser::prelude::*;

use super::context::San;
use super::error::IoError;
use crate::protocol::MAX_CERT_VALIDITY;

/// What can be wrong with TLS material, or with making and installing it. The messages
/// are user-facing (VM logs, `FL_ERROR`).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The text is not PEM.
    #[error("invalid PEM: {0}")]
    Pem(String),
    /// No PEM block at all.
    #[error("no PEM block found")]
    NoPem,
    /// PEM blocks, but no certificate.
    #[error("no CERTIFICATE block found")]
    NoCertificate,
    /// A certificate that does not parse.
    #[error("invalid certificate: {0}")]
    Certificate(String),
    /// A CA bundle over the size cap.
    #[error("CA certificate larger than 64 KiB")]
    CaTooLarge,
    /// A certificate offered as CA that is not one.
    #[error("certificate is not a CA (basicConstraints CA:FALSE or missing)")]
    NotCa,
    /// An expired CA.
    #[error("CA certificate expired at {0}")]
    CaExpired(String),
    /// A certificate of the chain outside its validity window.
    #[error("certificate {subject} is not valid now")]
    NotValidNow {
        /// Its subject.
        subject: String,
    },
    /// The leaf (or last intermediate) is not signed by the CA's key.
    #[error("signature does not verify against the CA")]
    CaSignature,
    /// An intermediate signature does not verify.
    #[error("chain signature does not verify")]
    ChainSignature,
    /// No path from the certificate to the CA.
    #[error("certificate is not issued by the given CA")]
    NotIssuedByCa,
    /// More links than certificates.
    #[error("certificate chain too long")]
    ChainTooLong,
    /// A private key that does not parse.
    #[error("{0} cannot be parsed")]
    Key(&'static str),
    /// The key is not the certificate's.
    #[error("private key does not match the certificate")]
    KeyMismatch,
    /// A date the certificate formats cannot hold.
    #[error("certificate {0} out of range")]
    DateOutOfRange(&'static str),
    /// A validity over [`MAX_CERT_VALIDITY`].
    #[error("a validity of {secs}s is longer than the {days} days allowed")]
    ValidityTooLong {
        /// The validity asked for.
        secs: u64,
        /// The most allowed.
        days: u64,
    },
    /// A SAN the certificate library refuses.
    #[error("bad SAN {0:?}")]
    San(String),
    /// Generating or signing failed.
    #[error("cannot generate the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CA certificate cannot serve as issuer.
    #[error("CA certificate: {0}")]
    Issuer(rcgen::Error),
    /// Material expected on disk is absent.
    #[error("no {0}")]
    Missing(&'static str),
    /// Material on disk expires within the renewal window.
    #[error("{0} is due for renewal")]
    DueForRenewal(&'static str),
    /// The server certificate lacks the VM address.
    #[error("server certificate does not cover the VM address")]
    LacksAddress,
    /// The server certificate lacks one of the extra SANs.
    #[error("server certificate lacks an extra SAN")]
    LacksExtraSan,
    /// Provided material (`what`: CA, server certificate, server key) is not usable.
    #[error("provided {what}: {source}")]
    Provided {
        /// Which item.
        what: &'static str,
        /// Why.
        source: Box<TlsError>,
    },
    /// Reading or writing a file.
    #[error(transparent)]
    Io(#[from] IoError),
    /// The served files' directory cannot be shared with Flower.
    #[error(transparent)]
    Privilege(#[from] super::privilege::PrivilegeError),
}

impl TlsError {
    fn provided(what: &'static str) -> impl FnOnce(TlsError) -> TlsError {
        move |e| TlsError::Provided {
            what,
            source: Box::new(e),
        }
    }
}

/// Where TLS files live. `certs_dir` may be mounted into a container; `ca_key` must not.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    /// Directory of ca.crt / server.pem / server.key (0700).
    pub certs_dir: PathBuf,
    /// CA private key (outside `certs_dir`).
    pub ca_key: PathBuf,
}

impl TlsPaths {
    /// CA certificate.
    pub fn ca_crt(&self) -> PathBuf {
        self.certs_dir.join("ca.crt")
    }
    /// Server certificate.
    pub fn server_pem(&self) -> PathBuf {
        self.certs_dir.join("server.pem")
    }
    /// Server key.
    pub fn server_key(&self) -> PathBuf {
        self.certs_dir.join("server.key")
    }
}

/// What a certificate holds that matters to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Expiry.
    pub not_after: DateTime<Utc>,
    /// IP SANs.
    pub ips: Vec<IpAddr>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// Basic constraints CA flag.
    pub is_ca: bool,
}

fn pem_blocks(pem: &str) -> Result<Vec<Pem>, TlsError> {
    let mut out = Vec::new();
    for p in Pem::iter_from_buffer(pem.as_bytes()) {
        out.push(p.map_err(|e| TlsError::Pem(e.to_string()))?);
    }
    if out.is_empty() {
        return Err(TlsError::NoPem);
    }
    Ok(out)
}

/// Certificates (DER) of a PEM text; at least one.
fn cert_ders(pem: &str) -> Result<Vec<Vec<u8>>, TlsError> {
    let ders: Vec<Vec<u8>> = pem_blocks(pem)?
        .into_iter()
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect();
    if ders.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    for d in &ders {
        parse_cert(d)?;
    }
    Ok(ders)
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, TlsError> {
    parse_x509_certificate(der)
        .map(|(_, c)| c)
        .map_err(|e| TlsError::Certificate(e.to_string()))
}

/// Parses the first certificate of a PEM text.
pub fn inspect(pem: &str) -> Result<CertInfo, TlsError> {
    let ders = cert_ders(pem)?;
    let c = parse_cert(&ders[0])?;
    let mut ips = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                    _ => {}
                },
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    let not_after = DateTime::from_timestamp(c.validity().not_after.timestamp(), 0)
        .ok_or(TlsError::DateOutOfRange("expiry"))?;
    Ok(CertInfo {
        not_after,
        ips,
        dns,
        is_ca: c.is_ca(),
    })
}

/// Validates a CA bundle a SuperNode is asked to trust: PEM, parses, CA, not expired.
pub fn validate_ca(pem: &str, now: DateTime<Utc>) -> Result<CertInfo, TlsError> {
    if pem.len() > 64 * 1024 {
        return Err(TlsError::CaTooLarge);
    }
    let info = inspect(pem)?;
    if !info.is_ca {
        return Err(TlsError::NotCa);
    }
    if info.not_after <= now {
        return Err(TlsError::CaExpired(info.not_after.to_rfc3339()));
    }
    Ok(info)
}

/// Verifies that the first certificate of `cert_pem` (and any intermediates after it) chain
/// to a certificate in `ca_pem` by signature, and that all are valid at `now`.
pub fn verify_chain(ca_pem: &str, cert_pem: &str, now: DateTime<Utc>) -> Result<(), TlsError> {
    let ca_ders = cert_ders(ca_pem)?;
    let chain_ders = cert_ders(cert_pem)?;
    let t = ASN1Time::from_timestamp(now.timestamp())
        .map_err(|_| TlsError::DateOutOfRange("check date"))?;
    let cas: Vec<X509Certificate> = ca_ders
        .iter()
        .map(|d| parse_cert(d))
        .collect::<Result<_, _>>()?;
    let chain: Vec<X509Certificate> = chain_ders
        .iter()
        .map(|d| parse_cert(d))
        .collect::<Result<_, _>>()?;
    for c in chain.iter().chain(cas.iter()) {
        if !c.validity().is_valid_at(t) {
            return Err(TlsError::NotValidNow {
                subject: c.subject().to_string(),
            });
        }
    }
    // Walk leaf → intermediates → a trusted CA.
    let mut current = &chain[0];
    for _ in 0..chain.len() + 1 {
        if let Some(ca) = cas.iter().find(|ca| ca.subject() == current.issuer()) {
            return current
                .verify_signature(Some(ca.public_key()))
                .map_err(|_| TlsError::CaSignature);
        }
        match chain
            .iter()
            .skip(1)
            .find(|i| i.subject() == current.issuer() && i.is_ca())
        {
            Some(next) => {
                current
                    .verify_signature(Some(next.public_key()))
                    .map_err(|_| TlsError::ChainSignature)?;
                current = next;
            }
            None => return Err(TlsError::NotIssuedByCa),
        }
    }
    Err(TlsError::ChainTooLong)
}

/// Checks that `key_pem` is the private key of the first certificate in `cert_pem`.
pub fn key_matches_cert(key_pem: &str, cert_pem: &str) -> Result<(), TlsError> {
    let key = KeyPair::from_pem(key_pem).map_err(|_| TlsError::Key("private key"))?;
    let ders = cert_ders(cert_pem)?;
    let c = parse_cert(&ders[0])?;
    if c.public_key().subject_public_key.data.as_ref() == key.public_key_raw() {
        Ok(())
    } else {
        Err(TlsError::KeyMismatch)
    }
}

/// A generated key and certificate, PEM.
#[derive(Clone)]
pub struct Issued {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Key PEM (secret).
    pub key_pem: String,
}

/// Sets a certificate's validity window (rcgen's time type is reached through its epoch
/// helper). Checked: a date the time type cannot hold is an error, not a panic.
fn set_validity(
    p: &mut CertificateParams,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<(), TlsError> {
    let at = |t: DateTime<Utc>| {
        let since_epoch = Duration::from_secs(t.timestamp().max(0).unsigned_abs());
        rcgen::date_time_ymd(1970, 1, 1)
            .checked_add(since_epoch.try_into().ok()?)
            .ok_or(())
            .ok()
    };
    p.not_before = at(from).ok_or(TlsError::DateOutOfRange("start date"))?;
    p.not_after = at(to).ok_or(TlsError::DateOutOfRange("end date"))?;
    Ok(())
}

/// `now + d` for certificate dates: refused beyond [`MAX_CERT_VALIDITY`] and checked (a
/// huge validity once overflowed chrono and panicked the agent).
fn after(now: DateTime<Utc>, d: Duration) -> Result<DateTime<Utc>, TlsError> {
    if d > MAX_CERT_VALIDITY {
        return Err(TlsError::ValidityTooLong {
            secs: d.as_secs(),
            days: MAX_CERT_VALIDITY.as_secs() / 86_400,
        });
    }
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .ok_or(TlsError::DateOutOfRange("date"))
}

/// Five minutes before `now` (clock skew margin).
fn skew_start(now: DateTime<Utc>) -> DateTime<Utc> {
    now.checked_sub_signed(chrono::Duration::minutes(5))
        .unwrap_or(now)
}

/// Generates a self-signed CA (EC P-256).
pub fn generate_ca(now: DateTime<Utc>, validity: Duration) -> Result<Issued, TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::OrganizationName, "Flower FL");
    p.distinguished_name.push(DnType::CommonName, "Flower CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let until = after(now, validity)?;
    set_validity(&mut p, skew_start(now), until)?;
    let cert = p.self_signed(&key)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a server certificate signed by the CA: SAN = `addr`, localhost, 127.0.0.1, ::1 and `extra`.
pub fn issue_server(
    ca: &Issued,
    addr: IpAddr,
    extra: &[San],
    now: DateTime<Utc>,
    validity: Duration,
) -> Result<Issued, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|_| TlsError::Key("CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(TlsError::Issuer)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::OrganizationName, "Flower FL");
    p.distinguished_name
        .push(DnType::CommonName, addr.to_string());
    let mut sans = vec![
        SanType::IpAddress(addr),
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        SanType::IpAddress(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
    ];
    for s in extra {
        sans.push(match s {
            San::Ip(ip) => SanType::IpAddress(*ip),
            San::Dns(d) => SanType::DnsName(
                d.as_str()
                    .try_into()
                    .map_err(|_| TlsError::San(d.clone()))?,
            ),
        });
    }
    sans.dedup();
    p.subject_alt_names = sans;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let ca_not_after = inspect(&ca.cert_pem)?.not_after;
    let wanted = after(now, validity)?;
    set_validity(&mut p, skew_start(now), wanted.min(ca_not_after))?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Writes `data` to `path` atomically with `mode`: a uniquely named temporary file in the
/// same directory (created with `mode`), synced, then renamed over `path`. Two writers —
/// `server.key` and `server.pem` once shared one `server.tmp` — never share a temporary.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), IoError> {
    write_file_as(path, data, mode, None)
}

/// The server key: 0640, group [`FLOWER_ID`](super::privilege::FLOWER_ID) when the agent
/// runs as root, so Flower (UID/GID 49999 in both runtimes) reads it and nobody else does
/// (test `server_key_is_readable_by_the_flower_group_only`).
pub(super) fn write_server_key(path: &Path, pem: &str) -> Result<(), IoError> {
    let gid = super::privilege::run_as().map(|(_, gid)| gid);
    write_file_as(path, pem.as_bytes(), 0o640, gid)
}

/// [`write_file`], the temporary's group set to `gid` before it takes the name.
fn write_file_as(
    path: &Path,
    data: &[u8],
    mode: u32,
    gid: Option<nix::unistd::Gid>,
) -> Result<(), IoError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(IoError::at(dir))?;
    let fail = |e: std::io::Error| IoError::at(path)(e);
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(fail)?;
    tmp.write_all(data).map_err(fail)?;
    tmp.as_file().sync_all().map_err(fail)?;
    // The umask may have narrowed the mode at creation.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode)).map_err(fail)?;
    if let Some(gid) = gid {
        nix::unistd::fchown(tmp.as_file(), None, Some(gid)).map_err(|e| fail(e.into()))?;
    }
    tmp.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

/// Holds the TLS lock: `configure` and the supervisor (rotation) never decide and write
/// certificates at the same time. Released on drop.
struct TlsLock {
    _held: nix::fcntl::Flock<fs::File>,
}

/// Take the TLS lock next to the CA key (outside the mountable certificate directory),
/// waiting for another holder.
fn lock_tls(paths: &TlsPaths) -> Result<TlsLock, IoError> {
    let path = paths.ca_key.with_file_name("tls.lock");
    let fail = |e: std::io::Error| IoError::at(&path)(e);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(fail)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map(|held| TlsLock { _held: held })
        .map_err(|(_, e)| fail(e.into()))
}

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// Why the agent (re)issued a server certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsAction {
    /// Everything on disk was valid and was kept.
    Reused,
    /// A new server certificate was issued by the existing CA.
    RenewedServer,
    /// A new CA and server certificate were generated.
    NewCa,
}

/// Settings of auto-mode TLS.
#[derive(Debug, Clone)]
pub struct AutoTls<'a> {
    /// VM address (must be in the SAN).
    pub addr: IpAddr,
    /// Extra SANs.
    pub extra: &'a [San],
    /// Validity of new certificates.
    pub validity: Duration,
    /// Renew this long before expiry.
    pub renew_before: Duration,
}

fn server_reusable(
    paths: &TlsPaths,
    ca_pem: &str,
    s: &AutoTls<'_>,
    now: DateTime<Utc>,
) -> Result<(), TlsError> {
    let cert = read(&paths.server_pem()).ok_or(TlsError::Missing("server certificate"))?;
    let key = read(&paths.server_key()).ok_or(TlsError::Missing("server key"))?;
    verify_chain(ca_pem, &cert, now)?;
    key_matches_cert(&key, &cert)?;
    let info = inspect(&cert)?;
    let renew_at = after(now, s.renew_before)?;
    if info.not_after <= renew_at {
        return Err(TlsError::DueForRenewal("server certificate"));
    }
    if !info.ips.contains(&s.addr) {
        return Err(TlsError::LacksAddress);
    }
    for san in s.extra {
        let ok = match san {
            San::Ip(ip) => info.ips.contains(ip),
            San::Dns(d) => info.dns.iter().any(|x| x.eq_ignore_ascii_case(d)),
        };
        if !ok {
            return Err(TlsError::LacksExtraSan);
        }
    }
    Ok(())
}

fn load_ca(
    paths: &TlsPaths,
    now: DateTime<Utc>,
    renew_before: Duration,
) -> Result<Issued, TlsError> {
    let cert_pem = read(&paths.ca_crt()).ok_or(TlsError::Missing("CA certificate"))?;
    let key_pem = read(&paths.ca_key).ok_or(TlsError::Missing("CA key"))?;
    let info = validate_ca(&cert_pem, now)?;
    key_matches_cert(&key_pem, &cert_pem)?;
    if info.not_after <= after(now, renew_before)? {
        return Err(TlsError::DueForRenewal("CA certificate"));
    }
    Ok(Issued { cert_pem, key_pem })
}

/// Auto mode: reuses valid material, else issues a server certificate with the existing CA,
/// else generates a new CA too. `force_server` issues a new server certificate anyway
/// (rotation).
pub fn ensure_auto(
    paths: &TlsPaths,
    s: &AutoTls<'_>,
    now: DateTime<Utc>,
    force_server: bool,
) -> Result<TlsAction, TlsError> {
    prepare_dirs(paths)?;
    let _lock = lock_tls(paths)?;
    let (ca, action) = match load_ca(paths, now, s.renew_before) {
        Ok(ca) => (ca, TlsAction::RenewedServer),
        Err(why) => {
            tracing::info!(reason = %why, "generating a new CA");
            let ca = generate_ca(now, s.validity)?;
            write_file(&paths.ca_key, ca.key_pem.as_bytes(), 0o600)?;
            write_file(&paths.ca_crt(), ca.cert_pem.as_bytes(), 0o644)?;
            (ca, TlsAction::NewCa)
        }
    };
    if action == TlsAction::RenewedServer && !force_server {
        match server_reusable(paths, &ca.cert_pem, s, now) {
            Ok(()) => return Ok(TlsAction::Reused),
            Err(why) => tracing::info!(reason = %why, "issuing a new server certificate"),
        }
    }
    let server = issue_server(&ca, s.addr, s.extra, now, s.validity)?;
    verify_chain(&ca.cert_pem, &server.cert_pem, now)?;
    write_server_key(&paths.server_key(), &server.key_pem)?;
    write_file(&paths.server_pem(), server.cert_pem.as_bytes(), 0o644)?;
    Ok(action)
}

/// Provided mode: validates the context certificates and installs them.
pub fn install_provided(
    paths: &TlsPaths,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    addr: IpAddr,
    now: DateTime<Utc>,
) -> Result<CertInfo, TlsError> {
    validate_ca(ca_pem, now).map_err(TlsError::provided("CA"))?;
    verify_chain(ca_pem, cert_pem, now).map_err(TlsError::provided("server certificate"))?;
    key_matches_cert(key_pem, cert_pem).map_err(TlsError::provided("server key"))?;
    let info = inspect(cert_pem)?;
    if !info.ips.contains(&addr) {
        tracing::warn!(%addr, "the provided server certificate does not list the VM address in its SAN");
    }
    prepare_dirs(paths)?;
    let _lock = lock_tls(paths)?;
    write_file(&paths.ca_crt(), ca_pem.as_bytes(), 0o644)?;
    write_file(&paths.server_pem(), cert_pem.as_bytes(), 0o644)?;
    write_server_key(&paths.server_key(), key_pem)?;
    Ok(info)
}

/// The CA key's directory: root's alone (0700). The served files' directory: root's, 0750,
/// group Flower's when the agent is root: Flower reads the server key and certificate, never
/// the CA key, and cannot replace a file (#17 item 5).
fn prepare_dirs(paths: &TlsPaths) -> Result<(), TlsError> {
    if let Some(d) = paths.ca_key.parent() {
        fs::create_dir_all(d).map_err(IoError::at(d))?;
        fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(IoError::at(d))?;
    }
    Ok(super::privilege::share_with_flower(&paths.certs_dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc::now()
    }

    fn paths(dir: &Path) -> TlsPaths {
        TlsPaths {
            certs_dir: dir.join("certs"),
            ca_key: dir.join("ca-private/ca.key"),
        }
    }

    fn auto(addr: &str) -> AutoTls<'static> {
        AutoTls {
            addr: addr.parse().unwrap(),
            extra: &[],
            validity: Duration::from_secs(365 * 86400),
            renew_before: Duration::from_secs(30 * 86400),
        }
    }

    #[test]
    fn generated_chain_verifies_with_openssl_and_has_sans() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let extra = [
            San::Dns("link.example.org".into()),
            San::Ip("100.64.0.9".parse().unwrap()),
        ];
        let s = AutoTls {
            extra: &extra,
            ..auto("10.0.0.5")
        };
        assert_eq!(ensure_auto(&p, &s, now(), false).unwrap(), TlsAction::NewCa);
        let out = std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(p.ca_crt())
            .arg(p.server_pem())
            .output()
            .expect("openssl must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info = inspect(&fs::read_to_string(p.server_pem()).unwrap()).unwrap();
        for ip in ["10.0.0.5", "127.0.0.1", "::1", "100.64.0.9"] {
            assert!(info.ips.contains(&ip.parse().unwrap()), "{ip} in {info:?}");
        }
        assert!(
            info.dns.contains(&"localhost".to_string())
                && info.dns.contains(&"link.example.org".to_string())
        );
        assert!(!info.is_ca);
        let mode = |f: PathBuf| fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(p.ca_key.clone()), 0o600);
        assert_eq!(mode(p.server_key()), 0o640);
        assert_eq!(mode(p.ca_crt()), 0o644);
        assert_eq!(mode(p.server_pem()), 0o644);
        // Served files: Flower's group reads them; the CA key's directory is root's alone.
        assert_eq!(mode(p.certs_dir.clone()), 0o750);
        assert_eq!(mode(p.ca_key.parent().unwrap().to_path_buf()), 0o700);
        assert!(
            !p.ca_key.starts_with(&p.certs_dir),
            "the CA key is never in the mounted directory"
        );
        // openssl also sees the SAN.
        let text = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(p.server_pem())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("IP Address:10.0.0.5") && text.contains("DNS:localhost"),
            "{text}"
        );
    }

    #[test]
    fn a_huge_validity_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        for validity in [
            MAX_CERT_VALIDITY + Duration::from_secs(1),
            Duration::from_secs(u64::MAX / 4),
            Duration::MAX,
        ] {
            let Err(e) = generate_ca(now(), validity) else {
                panic!("a validity of {validity:?} was accepted")
            };
            assert!(e.to_string().contains("days allowed"), "{e}");
            let s = AutoTls {
                validity,
                ..auto("10.0.0.5")
            };
            assert!(ensure_auto(&p, &s, now(), false).is_err());
        }
        // The limit itself works, and the dates are what was asked.
        let s = AutoTls {
            validity: MAX_CERT_VALIDITY,
            ..auto("10.0.0.5")
        };
        let t = now();
        assert_eq!(ensure_auto(&p, &s, t, false).unwrap(), TlsAction::NewCa);
        let ca = inspect(&std::fs::read_to_string(p.ca_crt()).unwrap()).unwrap();
        let asked = t + chrono::Duration::from_std(MAX_CERT_VALIDITY).unwrap();
        assert_eq!(ca.not_after.timestamp(), asked.timestamp());
    }

    #[test]
    fn concurrent_rotations_leave_a_matching_key_and_certificate_and_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        ensure_auto(&p, &auto("10.0.0.5"), now(), false).unwrap();
        // `configure` and the supervisor rotating at once, many times over.
        std::thread::scope(|scope| {
            for _ in 0..6 {
                scope.spawn(|| {
                    for _ in 0..5 {
                        ensure_auto(&p, &auto("10.0.0.5"), now(), true).unwrap();
                    }
                });
            }
        });
        let key = std::fs::read_to_string(p.server_key()).unwrap();
        let cert = std::fs::read_to_string(p.server_pem()).unwrap();
        key_matches_cert(&key, &cert).unwrap();
        let ca = std::fs::read_to_string(p.ca_crt()).unwrap();
        verify_chain(&ca, &cert, now()).unwrap();
        let left: Vec<String> = std::fs::read_dir(&p.certs_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp") || n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(p.server_key())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    #[test]
    fn server_key_is_readable_by_the_flower_group_only() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = TlsPaths {
            certs_dir: dir.path().join("certs"),
            ca_key: dir.path().join("ca/ca.key"),
        };
        let now = Utc::now();
        ensure_auto(&p, &auto("10.0.0.5"), now, false).unwrap();
        let key = fs::metadata(p.server_key()).unwrap();
        // Owner read/write, group read, nothing for others (never world-readable).
        assert_eq!(key.mode() & 0o777, 0o640);
        let ca_key = fs::metadata(&p.ca_key).unwrap();
        assert_eq!(ca_key.mode() & 0o777, 0o600, "the CA key stays root-only");
        if nix::unistd::geteuid().is_root() {
            assert_eq!(key.gid(), crate::agent::privilege::FLOWER_ID);
            assert_eq!(key.uid(), 0);
            assert_eq!(ca_key.gid(), 0);
            // Flower reads the directory, cannot replace a file in it (root owns it).
            let certs = fs::metadata(&p.certs_dir).unwrap();
            assert_eq!(
                (certs.uid(), certs.gid()),
                (0, crate::agent::privilege::FLOWER_ID)
            );
            let ca_dir = fs::metadata(p.ca_key.parent().unwrap()).unwrap();
            assert_eq!(
                (ca_dir.uid(), ca_dir.gid(), ca_dir.mode() & 0o777),
                (0, 0, 0o700)
            );
        }
    }

    #[test]
    fn reuse_renew_and_regenerate() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let t0 = now();
        ensure_auto(&p, &auto("10.0.0.5"), t0, false).unwrap();
        let ca0 = fs::read_to_string(p.ca_crt()).unwrap();
        let srv0 = fs::read_to_string(p.server_pem()).unwrap();
        // Reboot, same address: everything reused.
        assert_eq!(
            ensure_auto(&p, &auto("10.0.0.5"), t0, false).unwrap(),
            TlsAction::Reused
        );
        assert_eq!(fs::read_to_string(p.server_pem()).unwrap(), srv0);
        // New address: new server certificate, same CA.
        assert_eq!(
            ensure_auto(&p, &auto("10.0.0.6"), t0, false).unwrap(),
            TlsAction::RenewedServer
        );
        assert_eq!(fs::read_to_string(p.ca_crt()).unwrap(), ca0);
        // Rotation: forced, same CA.
        let srv1 = fs::read_to_string(p.server_pem()).unwrap();
        assert_eq!(
            ensure_auto(&p, &auto("10.0.0.6"), t0, true).unwrap(),
            TlsAction::RenewedServer
        );
        assert_ne!(fs::read_to_string(p.server_pem()).unwrap(), srv1);
        verify_chain(&ca0, &fs::read_to_string(p.server_pem()).unwrap(), t0).unwrap();
        // Close to expiry (within renew-before): renewed.
        let later = t0 + chrono::Duration::days(340);
        assert_eq!(
            ensure_auto(&p, &auto("10.0.0.6"), later, false).unwrap(),
            TlsAction::NewCa
        );
        // Tampered key: not reused.
        write_file(
            &p.server_key(),
            generate_ca(t0, Duration::from_secs(86400))
                .unwrap()
                .key_pem
                .as_bytes(),
            0o600,
        )
        .unwrap();
        assert_eq!(
            ensure_auto(&p, &auto("10.0.0.6"), later, false).unwrap(),
            TlsAction::RenewedServer
        );
    }

    #[test]
    fn validation_rejects_foreign_expired_and_garbage() {
        let t = now();
        let ca = generate_ca(t, Duration::from_secs(86400)).unwrap();
        let other = generate_ca(t, Duration::from_secs(86400)).unwrap();
        let srv = issue_server(
            &ca,
            "10.0.0.1".parse().unwrap(),
            &[],
            t,
            Duration::from_secs(3600),
        )
        .unwrap();
        assert!(verify_chain(&ca.cert_pem, &srv.cert_pem, t).is_ok());
        assert!(verify_chain(&other.cert_pem, &srv.cert_pem, t).is_err());
        assert!(verify_chain(&ca.cert_pem, &srv.cert_pem, t + chrono::Duration::hours(2)).is_err());
        assert!(key_matches_cert(&srv.key_pem, &srv.cert_pem).is_ok());
        assert!(key_matches_cert(&other.key_pem, &srv.cert_pem).is_err());
        assert!(validate_ca(&ca.cert_pem, t).is_ok());
        assert!(matches!(
            validate_ca(&srv.cert_pem, t),
            Err(TlsError::NotCa)
        ));
        assert!(validate_ca(&ca.cert_pem, t + chrono::Duration::days(2))
            .unwrap_err()
            .to_string()
            .starts_with("CA certificate expired at"));
        assert!(validate_ca(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            t
        )
        .is_err());
        assert!(validate_ca("hello", t).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let e = install_provided(
            &p,
            &other.cert_pem,
            &srv.cert_pem,
            &srv.key_pem,
            "10.0.0.1".parse().unwrap(),
            t,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "provided server certificate: signature does not verify against the CA"
        );
        assert!(!p.server_key().exists(), "nothing written on failure");
        install_provided(
            &p,
            &ca.cert_pem,
            &srv.cert_pem,
            &srv.key_pem,
            "10.0.0.1".parse().unwrap(),
            t,
        )
        .unwrap();
        assert!(p.server_key().exists());
    }
}
