//! PEM material carried as base64: the one codec for `FL_CA_CERT`,
//! `ONEAPP_FL_SSL_{CA_CERTFILE,CERTFILE,KEYFILE}`, `spec.tls.provided.*.inline` and
//! `submit --ca-file`.
//!
//! Grammar: standard base64 (padding required) of UTF-8 text that holds a `-----BEGIN `
//! line; whitespace in the base64 is ignored (YAML folds long lines). The decoded text is
//! at most [`MAX_PEM_BYTES`]. Printing gives base64 without whitespace, so the value is one
//! line in a template, a context file and a user-template attribute.
//!
//! Errors never contain the value: it may be a private key.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Largest PEM text accepted (a certificate chain is a few KiB).
pub const MAX_PEM_BYTES: usize = 256 * 1024;

/// Base64 of `pem`, one line.
pub fn encode(pem: &[u8]) -> String {
    STANDARD.encode(pem)
}

/// Decodes base64 (whitespace ignored) of PEM text.
pub fn decode(b64: &str) -> Result<String, String> {
    // 4 base64 characters per 3 bytes, plus generous room for line breaks.
    if b64.len() > MAX_PEM_BYTES / 3 * 4 * 2 {
        return Err(format!(
            "is larger than {} KiB of PEM text",
            MAX_PEM_BYTES / 1024
        ));
    }
    let compact: String = b64.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = STANDARD
        .decode(compact.as_bytes())
        .map_err(|_| "is not base64 of a PEM file".to_string())?;
    text(bytes)
}

/// PEM text from raw bytes (a file): UTF-8, at most [`MAX_PEM_BYTES`], with a
/// `-----BEGIN ` line.
pub fn text(bytes: Vec<u8>) -> Result<String, String> {
    if bytes.len() > MAX_PEM_BYTES {
        return Err(format!(
            "is larger than {} KiB of PEM text",
            MAX_PEM_BYTES / 1024
        ));
    }
    match String::from_utf8(bytes) {
        Ok(s) if s.contains("-----BEGIN ") => Ok(s),
        _ => Err("is not PEM text (expected `-----BEGIN ...`)".into()),
    }
}

/// Decodes a published CA: [`decode`], and the text must hold a certificate.
pub fn decode_certificate(b64: &str) -> Result<String, String> {
    let pem = decode(b64)?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err("does not hold a PEM certificate".into());
    }
    Ok(pem)
}

/// A CA given as a file: PEM text, or the base64 form above (the `FL_CA_CERT` value).
pub fn certificate_from_file_text(text: &str) -> Result<String, String> {
    if text.contains("-----BEGIN CERTIFICATE-----") {
        return self::text(text.as_bytes().to_vec());
    }
    decode_certificate(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn encode_then_decode_is_the_identity_and_folding_is_tolerated() {
        let b64 = encode(CERT.as_bytes());
        assert!(!b64.contains(char::is_whitespace));
        assert_eq!(decode(&b64).unwrap(), CERT);
        let folded = format!("{}\n  {}\n", &b64[..10], &b64[10..]);
        assert_eq!(decode_certificate(&folded).unwrap(), CERT);
        assert_eq!(certificate_from_file_text(CERT).unwrap(), CERT);
        assert_eq!(certificate_from_file_text(&b64).unwrap(), CERT);
    }

    #[test]
    fn junk_and_oversize_are_refused_without_echo() {
        let key = encode(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n");
        assert!(decode(&key).is_ok());
        let e = decode_certificate(&key).unwrap_err();
        assert!(!e.contains("c2VjcmV0"), "{e}");
        for bad in ["not base64!", "YWJj", "", &encode(&[0xff, 0xfe, 0xfd])] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
        let big = encode(format!("-----BEGIN X\n{}", "A".repeat(MAX_PEM_BYTES)).as_bytes());
        assert!(decode(&big).unwrap_err().contains("KiB"));
        assert!(text(vec![b'A'; MAX_PEM_BYTES + 1]).is_err());
    }
}
