//! `FL_NODE_PUBKEY`: the public half of a SuperNode's Flower authentication key (#17 item 4).
//! The SuperNode's agent writes it, the SuperLink's agent reads it from the service (OneGate)
//! and registers it with Flower (`flwr supernode register`), and compares it with the keys
//! Flower's state holds (`public_key` of its `node` table, a PEM SubjectPublicKeyInfo).
//!
//! Owns: the two spellings of one key — the attribute (an OpenSSH public-key line, the form
//! `flwr supernode register` reads) and Flower's stored PEM — and the conversion between them.
//! Must not: generate or hold private keys (the agent's `node_auth` does).
//!
//! Guarantees: [`NodePublicKey::parse`] accepts exactly what [`NodePublicKey::encode`] writes
//! (an `ecdsa-sha2-nistp256` line with an optional comment, at most [`MAX_LEN`] bytes, the
//! point uncompressed and 65 bytes long); anything else is an error, never a panic
//! (`tests::the_attribute_round_trips_and_refuses_the_rest`).
//! Assumptions: Flower 1.25 accepts any NIST curve (`uses_nist_ec_curve`); our agents only
//! make P-256 keys, so only P-256 is read. The point is not checked to lie on the curve here:
//! Flower's `load_ssh_public_key` refuses one that does not.
//! The key set ([`encode_set`], [`parse_set`]) is the value of `FL_SITE_NODE_KEYS`: the
//! SuperNode keys of other sites (other OpenNebula zones, whose OneGate the SuperLink
//! cannot read) that the controller hands the SuperLink, signed ([`super::signing`]).
//! [`parse_set`] accepts exactly what [`encode_set`] writes: at most [`MAX_SET`] keys,
//! sorted and without duplicates, joined by `,`, or [`EMPTY_SET`] for none
//! (`tests::the_key_set_is_canonical_and_bounded`).
//!
//! Caveats: the attribute is peer-writable through OneGate (any VM of the service can
//! rewrite another's user template): a peer can replace a SuperNode's key with its own, and
//! so lock that SuperNode out; it cannot add a node the service does not have.

use base64::Engine as _;

/// The OpenSSH key type (and the curve name inside the key blob).
const KEY_TYPE: &str = "ecdsa-sha2-nistp256";
const CURVE: &str = "nistp256";
/// Longest attribute value: the type, a space, the 140-character base64 blob, a short comment.
pub const MAX_LEN: usize = 256;
/// Most keys `FL_SITE_NODE_KEYS` carries (about 160 bytes each: 40 KiB at most).
pub const MAX_SET: usize = 256;
/// `FL_SITE_NODE_KEYS` for no keys: an empty value could be dropped on the way (a template
/// attribute with nothing in it), and "no keys" must reach the SuperLink to revoke the last.
pub const EMPTY_SET: &str = "NONE";

/// `FL_SITE_NODE_KEYS`: the keys in order, joined by `,` ([`EMPTY_SET`] for none). The
/// canonical form a signature covers.
pub fn encode_set(keys: &std::collections::BTreeSet<NodePublicKey>) -> String {
    if keys.is_empty() {
        return EMPTY_SET.into();
    }
    keys.iter()
        .map(NodePublicKey::encode)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses `FL_SITE_NODE_KEYS` (untrusted): only the canonical form [`encode_set`] writes
/// (surrounding whitespace aside), so one set has exactly one spelling to sign.
pub fn parse_set(v: &str) -> Result<std::collections::BTreeSet<NodePublicKey>, String> {
    let v = v.trim();
    if v.len() > MAX_SET * (MAX_LEN + 1) {
        return Err(format!("longer than {MAX_SET} keys"));
    }
    if v == EMPTY_SET {
        return Ok(Default::default());
    }
    let mut keys = std::collections::BTreeSet::new();
    for (i, part) in v.split(',').enumerate() {
        if i >= MAX_SET {
            return Err(format!("more than {MAX_SET} keys"));
        }
        let key = NodePublicKey::parse(part).map_err(|e| format!("key {}: {e}", i + 1))?;
        if keys.last().is_some_and(|last| *last >= key) {
            return Err(format!("key {}: not sorted, or a duplicate", i + 1));
        }
        keys.insert(key);
    }
    if encode_set(&keys) != v {
        return Err("not in canonical form (one key line each, no comments, `,` between)".into());
    }
    Ok(keys)
}

/// DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, a 66-byte BIT
/// STRING), which the 65-byte uncompressed point follows.
const SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A P-256 public key: its uncompressed point (`04 ‖ x ‖ y`).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePublicKey([u8; 65]);

impl std::fmt::Debug for NodePublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodePublicKey({})", self.fingerprint())
    }
}

/// Serialized as its attribute form ([`NodePublicKey::encode`]): the desired state and
/// the observation carry keys, never private material.
impl serde::Serialize for NodePublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encode())
    }
}

impl<'de> serde::Deserialize<'de> for NodePublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl NodePublicKey {
    /// From an uncompressed point; `None` unless 65 bytes starting with `04`.
    pub fn from_point(point: &[u8]) -> Option<Self> {
        let p: [u8; 65] = point.try_into().ok()?;
        (p[0] == 0x04).then_some(Self(p))
    }

    /// The uncompressed point.
    pub fn point(&self) -> &[u8; 65] {
        &self.0
    }

    /// The OpenSSH key blob (`string type, string curve, string point`).
    pub fn ssh_blob(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(104);
        for part in [KEY_TYPE.as_bytes(), CURVE.as_bytes(), &self.0] {
            b.extend_from_slice(&(part.len() as u32).to_be_bytes());
            b.extend_from_slice(part);
        }
        b
    }

    /// The attribute value: `ecdsa-sha2-nistp256 <base64 blob>`.
    pub fn encode(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.ssh_blob());
        format!("{KEY_TYPE} {b64}")
    }

    /// Parses an attribute value (untrusted): an OpenSSH public-key line of our key type.
    pub fn parse(v: &str) -> Result<Self, String> {
        if v.len() > MAX_LEN {
            return Err(format!("longer than {MAX_LEN} bytes"));
        }
        let mut parts = v.trim_end().splitn(3, ' ');
        if parts.next() != Some(KEY_TYPE) {
            return Err(format!("must start with {KEY_TYPE:?}"));
        }
        let blob = parts
            .next()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .ok_or("the key must follow as standard base64")?;
        let mut rest = blob.as_slice();
        let mut field = || -> Option<&[u8]> {
            let (len, tail) = rest.split_first_chunk::<4>()?;
            let len = u32::from_be_bytes(*len) as usize;
            let (f, tail) = (tail.get(..len)?, tail.get(len..)?);
            rest = tail;
            Some(f)
        };
        let (ty, curve, point) = (field(), field(), field());
        if ty != Some(KEY_TYPE.as_bytes()) || curve != Some(CURVE.as_bytes()) {
            return Err(format!("the key blob is not a {CURVE} key"));
        }
        let key = point
            .and_then(Self::from_point)
            .ok_or("the key blob's point is not an uncompressed P-256 point")?;
        if !rest.is_empty() {
            return Err("trailing bytes after the key blob".into());
        }
        Ok(key)
    }

    /// Flower's stored form: PEM SubjectPublicKeyInfo (`public_key_to_bytes`).
    pub fn to_spki_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }

    /// Reads Flower's stored form; `None` for anything but a P-256 SubjectPublicKeyInfo
    /// (a key of another curve is not one of ours).
    pub fn from_spki_pem(pem: &[u8]) -> Option<Self> {
        if pem.len() > 1024 {
            return None;
        }
        let text = std::str::from_utf8(pem).ok()?.trim();
        let body = text
            .strip_prefix("-----BEGIN PUBLIC KEY-----")?
            .strip_suffix("-----END PUBLIC KEY-----")?;
        let b64: String = body.split_whitespace().collect();
        let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        Self::from_point(der.strip_prefix(SPKI_PREFIX.as_slice())?)
    }

    /// A short, stable name for logs: the first 12 hex digits of the point's SHA-256.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        let d = sha2::Sha256::digest(self.0);
        d.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> NodePublicKey {
        let mut p = [seed; 65];
        p[0] = 0x04;
        NodePublicKey(p)
    }

    #[test]
    fn the_attribute_round_trips_and_refuses_the_rest() {
        let k = key(7);
        let line = k.encode();
        assert!(line.starts_with("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTY"));
        assert!(line.len() <= MAX_LEN);
        assert_eq!(NodePublicKey::parse(&line), Ok(k.clone()));
        // A comment and a trailing newline, as ssh-keygen writes a .pub file.
        assert_eq!(
            NodePublicKey::parse(&format!("{line} root@vm\n")),
            Ok(k.clone())
        );
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let mut long = k.ssh_blob();
        long.push(0);
        let mut compressed = k.ssh_blob();
        compressed[39] = 0x02;
        for bad in [
            String::new(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG".into(),
            "ecdsa-sha2-nistp256".into(),
            "ecdsa-sha2-nistp256 !!!".into(),
            format!("ecdsa-sha2-nistp256 {}", b64(&k.ssh_blob()[..50])),
            format!("ecdsa-sha2-nistp256 {}", b64(&long)),
            format!("ecdsa-sha2-nistp256 {}", b64(&compressed)),
            format!("ecdsa-sha2-nistp256 {}", b64(&[0xff; 8])),
            format!("{line} {}", "x".repeat(MAX_LEN)),
        ] {
            assert!(NodePublicKey::parse(&bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn the_key_set_is_canonical_and_bounded() {
        use std::collections::BTreeSet;
        let none = BTreeSet::new();
        assert_eq!(encode_set(&none), EMPTY_SET);
        assert_eq!(parse_set(" NONE "), Ok(none));
        let set: BTreeSet<_> = [key(3), key(1), key(2)].into();
        let text = encode_set(&set);
        assert_eq!(text.matches(',').count(), 2);
        assert_eq!(parse_set(&text), Ok(set.clone()));
        assert_eq!(parse_set(&format!("{text}\n")), Ok(set), "trailing newline");
        let (k1, k2) = (key(1).encode(), key(2).encode());
        for bad in [
            String::new(),
            "none".into(),
            format!("{k2},{k1}"),
            format!("{k1},{k1}"),
            format!("{k1}, {k2}"),
            format!("{k1} root@vm,{k2}"),
            format!("{k1},"),
            format!("{k1},NONE"),
            format!("{k1};{k2}"),
        ] {
            assert!(parse_set(&bad).is_err(), "accepted {bad:?}");
        }
        let full: BTreeSet<_> = (1..=MAX_SET as u16)
            .map(|i| {
                let mut p = [0u8; 65];
                p[0] = 0x04;
                p[1..3].copy_from_slice(&i.to_be_bytes());
                NodePublicKey(p)
            })
            .collect();
        assert_eq!(parse_set(&encode_set(&full)).map(|s| s.len()), Ok(MAX_SET));
        let mut over = full.clone();
        over.insert(key(0xee));
        assert!(parse_set(&encode_set(&over)).is_err(), "one key too many");
        assert!(parse_set(&"A".repeat(100_000)).is_err());
    }

    #[test]
    fn flowers_stored_form_round_trips() {
        let k = key(9);
        let pem = k.to_spki_pem();
        assert_eq!(NodePublicKey::from_spki_pem(pem.as_bytes()), Some(k));
        // A P-384 key (another prefix) or garbage is not ours.
        assert_eq!(NodePublicKey::from_spki_pem(b"-----BEGIN PUBLIC KEY-----\nMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE\n-----END PUBLIC KEY-----\n"), None);
        assert_eq!(NodePublicKey::from_spki_pem(&[0xff; 40]), None);
    }

    #[test]
    fn the_stored_form_is_what_flower_stored() {
        // Read from flwr 1.25's state after `flwr supernode register` of this .pub file
        // (made by ssh-keygen -t ecdsa -b 256; the comment is ours).
        let line = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBPlV/rkcZ2/tWFifE7INHIcqQ3Ooy7nMat/TmHmDJ23VL2V3ibD1K7aG0rCd305YdAuwfUA43r0GQYrOWzBwUyQ= root@vm";
        let stored = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE+VX+uRxnb+1YWJ8Tsg0chypDc6jL\nucxq39OYeYMnbdUvZXeJsPUrtobSsJ3fTlh0C7B9QDjevQZBis5bMHBTJA==\n-----END PUBLIC KEY-----\n";
        let k = NodePublicKey::from_spki_pem(stored.as_bytes()).expect("Flower's PEM");
        assert_eq!(k.to_spki_pem(), stored);
        assert_eq!(NodePublicKey::parse(line), Ok(k.clone()));
        assert_eq!(k.encode(), line.trim_end_matches(" root@vm"));
    }
}
