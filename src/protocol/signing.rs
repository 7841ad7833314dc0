//! Controller-signed requests: the one codec for `FL_ROTATE_SIG` and `FL_SITE_NODE_KEYS_SIG`.
//!
//! Any VM of a service can rewrite any other VM's user template through OneGate
//! (`PUT /vms/:id`), so a SuperLink cannot tell a request the controller wrote from one a
//! peer forged. The controller therefore signs what it writes with an Ed25519 key that is
//! kept per cluster in the OneFlow service (template) body — readable only with the
//! controller user's OpenNebula credentials, never through OneGate, whose service view
//! carries only names, states and node lists — and gives the SuperLink the *public* key in
//! its context (`ONEAPP_FL_CONTROLLER_KEY`). A public key a peer can read is harmless.
//!
//! Guarantees (tests below and `tests/safety_peers.rs`):
//! - A signature binds the VM id, the generation and the validity: it cannot be replayed on
//!   another VM, for a later generation, or with another validity.
//! - A site-keys signature binds the VM id and the exact (canonical) key set: it cannot be
//!   moved to another VM or to another set (`a_site_keys_signature_binds_vm_and_set`).
//! - Keys, signatures and messages are fixed-size or bounded; decoding untrusted values
//!   never panics.
//!
//! Caveats: the seed is a secret. It lives in the service body (owner-readable); it never
//! reaches logs, plans or errors ([`SigningSeed`]'s `Debug` prints no bytes).

use std::collections::BTreeSet;

use base64::Engine as _;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};

use super::node_key::NodePublicKey;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A 32-byte Ed25519 seed: the controller's private signing key for one cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSeed([u8; 32]);

impl std::fmt::Debug for SigningSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSeed(redacted)")
    }
}

impl SigningSeed {
    /// A fresh random seed from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, String> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| "the system random number generator failed".to_string())?;
        Ok(Self(seed))
    }

    /// Decodes a seed stored as base64 (exactly 32 bytes).
    pub fn from_base64(text: &str) -> Option<Self> {
        if text.len() > 64 {
            return None;
        }
        let bytes = B64.decode(text.trim().as_bytes()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }

    /// The seed as base64, for storing in the service body (a secret).
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    fn key_pair(&self) -> Ed25519KeyPair {
        // A 32-byte seed always makes a key pair; `unchecked` only skips the comparison
        // with a public key we do not have.
        Ed25519KeyPair::from_seed_unchecked(&self.0).expect("a 32-byte Ed25519 seed")
    }

    /// The public key's 32 bytes.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        self.key_pair().public_key().as_ref().to_vec()
    }

    /// The public key, base64: what `ONEAPP_FL_CONTROLLER_KEY` carries.
    pub fn public_key(&self) -> String {
        B64.encode(self.key_pair().public_key().as_ref())
    }

    /// `FL_ROTATE_SIG` for a rotation request on `vm_id`.
    pub fn sign_rotation(&self, vm_id: u64, generation: u64, validity: Option<&str>) -> String {
        let msg = rotation_message(vm_id, generation, validity);
        B64.encode(self.key_pair().sign(&msg).as_ref())
    }

    /// `FL_SITE_NODE_KEYS_SIG` for the key set `keys` written on `vm_id`.
    pub fn sign_site_keys(&self, vm_id: u64, keys: &BTreeSet<NodePublicKey>) -> String {
        B64.encode(
            self.key_pair()
                .sign(&site_keys_message(vm_id, keys))
                .as_ref(),
        )
    }
}

/// What a site-keys signature covers: the VM and the set's canonical attribute text.
fn site_keys_message(vm_id: u64, keys: &BTreeSet<NodePublicKey>) -> Vec<u8> {
    format!(
        "flower-reconcile site-node-keys v1\nvm={vm_id}\nkeys={}\n",
        super::node_key::encode_set(keys)
    )
    .into_bytes()
}

/// Whether `sig_b64` (untrusted) is the controller's signature of key set `keys` for
/// `vm_id`, under `public_key` (32 bytes).
pub fn verify_site_keys(
    public_key: &[u8],
    sig_b64: &str,
    vm_id: u64,
    keys: &BTreeSet<NodePublicKey>,
) -> bool {
    verify(public_key, sig_b64, &site_keys_message(vm_id, keys))
}

fn verify(public_key: &[u8], sig_b64: &str, msg: &[u8]) -> bool {
    if sig_b64.len() > 128 {
        return false;
    }
    let Ok(sig) = B64.decode(sig_b64.trim().as_bytes()) else {
        return false;
    };
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(msg, &sig)
        .is_ok()
}

/// What a rotation signature covers. `validity` is the exact `FL_ROTATE_VALIDITY` text.
fn rotation_message(vm_id: u64, generation: u64, validity: Option<&str>) -> Vec<u8> {
    format!(
        "flower-reconcile rotate v1\nvm={vm_id}\ngeneration={generation}\nvalidity={}\n",
        validity.map(str::trim).unwrap_or("")
    )
    .into_bytes()
}

/// Checks a public key as found in the context: base64 of 32 bytes.
pub fn parse_public_key(text: &str) -> Result<Vec<u8>, String> {
    if text.len() > 64 {
        return Err("longer than a base64 Ed25519 public key".into());
    }
    let bytes = B64
        .decode(text.trim().as_bytes())
        .map_err(|_| "not base64".to_string())?;
    if bytes.len() != 32 {
        return Err(format!(
            "{} bytes, an Ed25519 public key has 32",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// Whether `sig_b64` (untrusted, from OneGate) is the controller's signature of this
/// rotation request for `vm_id`, under `public_key` (32 bytes, from the context).
pub fn verify_rotation(
    public_key: &[u8],
    sig_b64: &str,
    vm_id: u64,
    generation: u64,
    validity: Option<&str>,
) -> bool {
    verify(
        public_key,
        sig_b64,
        &rotation_message(vm_id, generation, validity),
    )
}

/// `FL_ROTATE_REQUEST` / `FL_ROTATE_DONE` (untrusted): a non-negative integer of at most 18
/// digits, surrounding whitespace ignored.
pub fn parse_generation(v: &str) -> Option<u64> {
    let v = v.trim();
    if v.is_empty() || v.len() > 18 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// `FL_ROTATE_VALIDITY` (untrusted): a [`super::duration`] of 1 min to
/// [`super::MAX_CERT_VALIDITY`], at most 32 characters.
pub fn parse_validity(v: &str) -> Option<std::time::Duration> {
    if v.trim().len() > 32 {
        return None;
    }
    let d = super::duration::parse(v).ok()?;
    (std::time::Duration::from_secs(60)..=super::MAX_CERT_VALIDITY)
        .contains(&d)
        .then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations() {
        assert_eq!(parse_generation("3"), Some(3));
        assert_eq!(parse_generation(" 12 "), Some(12));
        assert_eq!(parse_generation("-1"), None);
        assert_eq!(parse_generation("+1"), None);
        assert_eq!(parse_generation("1; reboot"), None);
        assert_eq!(parse_generation(&"9".repeat(30)), None);
    }

    #[test]
    fn rotation_validities_are_bounded_durations() {
        assert_eq!(
            parse_validity("30m"),
            Some(std::time::Duration::from_secs(1800))
        );
        assert_eq!(
            parse_validity(" 720h "),
            Some(std::time::Duration::from_secs(720 * 3600))
        );
        assert_eq!(
            parse_validity("1h 30m"),
            Some(std::time::Duration::from_secs(5400))
        );
        assert_eq!(parse_validity("10s"), None, "below one minute");
        assert_eq!(parse_validity("500years"), None, "above twenty years");
        assert_eq!(parse_validity("30m; reboot"), None);
        assert_eq!(parse_validity(""), None);
        assert_eq!(parse_validity(&"1".repeat(40)), None);
    }

    #[test]
    fn a_signature_binds_vm_generation_and_validity() {
        let seed = SigningSeed::generate().unwrap();
        let pk = parse_public_key(&seed.public_key()).unwrap();
        let sig = seed.sign_rotation(7, 3, Some("30m"));
        assert!(verify_rotation(&pk, &sig, 7, 3, Some("30m")));
        assert!(verify_rotation(&pk, &sig, 7, 3, Some(" 30m ")), "trimmed");
        assert!(!verify_rotation(&pk, &sig, 8, 3, Some("30m")), "other VM");
        assert!(
            !verify_rotation(&pk, &sig, 7, 4, Some("30m")),
            "later generation"
        );
        assert!(
            !verify_rotation(&pk, &sig, 7, 3, Some("1m")),
            "other validity"
        );
        assert!(!verify_rotation(&pk, &sig, 7, 3, None), "validity dropped");
        let other = SigningSeed::generate().unwrap();
        assert!(!verify_rotation(
            &pk,
            &other.sign_rotation(7, 3, Some("30m")),
            7,
            3,
            Some("30m")
        ));
    }

    #[test]
    fn a_site_keys_signature_binds_vm_and_set() {
        let key = |b: u8| {
            let mut p = [b; 65];
            p[0] = 0x04;
            NodePublicKey::from_point(&p).unwrap()
        };
        let seed = SigningSeed::generate().unwrap();
        let pk = parse_public_key(&seed.public_key()).unwrap();
        let set: BTreeSet<_> = [key(1), key(2)].into();
        let sig = seed.sign_site_keys(7, &set);
        assert!(verify_site_keys(&pk, &sig, 7, &set));
        assert!(!verify_site_keys(&pk, &sig, 8, &set), "other VM");
        assert!(
            !verify_site_keys(&pk, &sig, 7, &[key(1)].into()),
            "a key dropped"
        );
        assert!(
            !verify_site_keys(&pk, &sig, 7, &[key(1), key(2), key(3)].into()),
            "a key added"
        );
        assert!(!verify_site_keys(&pk, &sig, 7, &BTreeSet::new()));
        let empty = seed.sign_site_keys(7, &BTreeSet::new());
        assert!(verify_site_keys(&pk, &empty, 7, &BTreeSet::new()));
        // Not interchangeable with a rotation signature.
        assert!(!verify_rotation(&pk, &sig, 7, 0, None));
        let other = SigningSeed::generate().unwrap();
        assert!(!verify_site_keys(
            &pk,
            &other.sign_site_keys(7, &set),
            7,
            &set
        ));
        for bad in ["", "!!", &"A".repeat(10_000)] {
            assert!(!verify_site_keys(&pk, bad, 7, &set));
        }
    }

    #[test]
    fn hostile_values_are_rejected_without_panic() {
        let seed = SigningSeed::generate().unwrap();
        let pk = parse_public_key(&seed.public_key()).unwrap();
        for sig in ["", "!!", "AAAA", &"A".repeat(10_000), "x; reboot"] {
            assert!(!verify_rotation(&pk, sig, 1, 1, None), "{sig:.20}");
        }
        assert!(parse_public_key("AAAA").is_err());
        assert!(parse_public_key(&"A".repeat(100)).is_err());
        assert!(SigningSeed::from_base64("AAAA").is_none());
        let round = SigningSeed::from_base64(&seed.to_base64()).unwrap();
        assert_eq!(round.public_key(), seed.public_key());
        assert_eq!(format!("{seed:?}"), "SigningSeed(redacted)");
    }
}
