//! Sealing of secrets at rest: AES-256-GCM (`ring::aead`) under a [`SealKey`], with associated
//! data that binds a sealed value to where it belongs (a Redis record and its generation, the
//! state file), so that a value copied to another place or generation does not open.
//!
//! Format (text, self-describing): `v1.<key id>.<base64url(nonce || ciphertext || tag)>`, with a
//! fresh random 96-bit nonce per seal. The key id (8 hex digits of a SHA-256 of the key) says
//! which key of a [`SealKeys`] ring opens a value (the ring's first key seals, every key opens, so
//! keys can be rotated), and tells a value sealed under a key not in the ring apart from a
//! tampered one; it reveals nothing usable about the key. Must never: print a key or a
//! plaintext, reuse a nonce, or open a value without checking its tag.

use std::fmt;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// Length of a seal key in bytes.
pub const KEY_LEN: usize = 32;
/// The only format version this build writes and reads.
const VERSION: &str = "v1";
const TAG_LEN: usize = 16;

/// A 256-bit sealing key. `Debug` prints `***`; the bytes are zeroized on drop.
#[derive(Clone)]
pub struct SealKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: String,
}

/// A keyring: the first key seals, every key opens what was sealed with it (found by key id).
/// Never empty; `Debug` prints the key ids only.
#[derive(Clone)]
pub struct SealKeys {
    keys: Vec<SealKey>,
}

impl SealKeys {
    /// The ring of `keys`, the first sealing; `None` when there is none.
    pub fn new(keys: Vec<SealKey>) -> Option<SealKeys> {
        (!keys.is_empty()).then_some(SealKeys { keys })
    }

    /// The key that seals.
    pub fn first(&self) -> &SealKey {
        &self.keys[0]
    }

    /// Every key's id, the sealing one first.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(SealKey::id).collect()
    }

    fn by_id(&self, id: &str) -> Option<&SealKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

impl From<SealKey> for SealKeys {
    fn from(key: SealKey) -> Self {
        SealKeys { keys: vec![key] }
    }
}

impl fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SealKeys").field(&self.ids()).finish()
    }
}

/// Why a text is not a seal key. Never carries the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealKeyError {
    #[error("is not base64 (make one with `tokenbroker gen-seal-key`)")]
    NotBase64,
    #[error(
        "must decode to exactly 32 bytes, found {0} (make one with `tokenbroker gen-seal-key`)"
    )]
    WrongLength(usize),
}

impl SealKey {
    /// Parses a key written as base64 (standard alphabet, padding optional; surrounding
    /// whitespace ignored).
    pub fn from_base64(text: &str) -> Result<SealKey, SealKeyError> {
        let text = text.trim();
        let decoded = Zeroizing::new(
            STANDARD
                .decode(text)
                .or_else(|_| STANDARD_NO_PAD.decode(text))
                .map_err(|_| SealKeyError::NotBase64)?,
        );
        if decoded.len() != KEY_LEN {
            return Err(SealKeyError::WrongLength(decoded.len()));
        }
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        bytes.copy_from_slice(&decoded);
        Ok(SealKey::from_bytes(bytes))
    }

    /// Parses a key held as a secret (read from `{ env }` or `{ file }`).
    pub fn from_secret(secret: &Secret) -> Result<SealKey, SealKeyError> {
        SealKey::from_base64(secret.expose())
    }

    /// A new random key from the system's secure generator.
    pub fn generate() -> SealKey {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        SystemRandom::new()
            .fill(&mut bytes[..])
            .expect("the system's secure random generator failed");
        SealKey::from_bytes(bytes)
    }

    fn from_bytes(bytes: Zeroizing<[u8; KEY_LEN]>) -> SealKey {
        let digest = Sha256::new()
            .chain_update(b"tokenbroker seal key id\0")
            .chain_update(&bytes[..])
            .finalize();
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        SealKey { bytes, id }
    }

    /// The key as base64 (standard alphabet, padded), as `gen-seal-key` prints it.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(&self.bytes[..]))
    }

    /// A short public fingerprint of the key (8 hex digits), written into every sealed value.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn aead(&self) -> LessSafeKey {
        let unbound = UnboundKey::new(&AES_256_GCM, &self.bytes[..])
            .expect("a 32-byte key is valid for AES-256-GCM");
        LessSafeKey::new(unbound)
    }
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why a sealed value did not open. Never carries the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not a sealed value (expected `v1.<key id>.<base64url>`)")]
    NotSealed,
    #[error("sealed in format {0}, this build reads v1")]
    UnsupportedVersion(String),
    #[error(
        "sealed with another seal key (key id {found}), not one of the configured seal keys \
         (key ids {configured})"
    )]
    WrongKey { found: String, configured: String },
    #[error("the sealed part is not base64url")]
    BadEncoding,
    #[error("truncated: {0} sealed bytes, at least 28 (nonce and tag) needed")]
    Truncated(usize),
    #[error(
        "authentication failed: the value was altered, or belongs to another record or generation"
    )]
    Tampered,
}

/// Seals `plaintext` bound to `aad`, with a fresh random nonce.
pub fn seal(key: &SealKey, aad: &[u8], plaintext: &[u8]) -> String {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .expect("the system's secure random generator failed");
    let mut buf = Zeroizing::new(Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN));
    buf.extend_from_slice(&nonce);
    buf.extend_from_slice(plaintext);
    let (head, body) = buf.split_at_mut(NONCE_LEN);
    let tag = key
        .aead()
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(head.try_into().expect("nonce length")),
            Aad::from(aad),
            body,
        )
        .expect("AES-GCM seals any input below 64 GiB");
    buf.extend_from_slice(tag.as_ref());
    format!("{VERSION}.{}.{}", key.id, URL_SAFE_NO_PAD.encode(&buf[..]))
}

/// The key id a sealed value names, if it looks sealed (unverified: [`open`] checks it).
pub fn key_id_of(sealed: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(sealed).ok()?;
    let id = text.split('.').nth(1)?;
    (id.len() == 8 && id.chars().all(|c| c.is_ascii_hexdigit())).then_some(id)
}

/// Opens a value made by [`seal`] with the key of the ring it names and the same associated
/// data.
pub fn open(keys: &SealKeys, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let text = std::str::from_utf8(sealed).map_err(|_| SealError::NotSealed)?;
    let mut parts = text.splitn(3, '.');
    let (Some(version), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SealError::NotSealed);
    };
    let looks_versioned = version.len() <= 8
        && version.starts_with('v')
        && version[1..].chars().all(|c| c.is_ascii_digit())
        && version.len() > 1;
    if !looks_versioned {
        return Err(SealError::NotSealed);
    }
    if version != VERSION {
        return Err(SealError::UnsupportedVersion(version.to_string()));
    }
    if id.len() != 8 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(SealError::NotSealed);
    }
    let Some(key) = keys.by_id(id) else {
        return Err(SealError::WrongKey {
            found: id.to_string(),
            configured: keys.ids().join(", "),
        });
    };
    let mut buf = Zeroizing::new(
        URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SealError::BadEncoding)?,
    );
    if buf.len() < NONCE_LEN + TAG_LEN {
        return Err(SealError::Truncated(buf.len()));
    }
    let nonce: [u8; NONCE_LEN] = buf[..NONCE_LEN].try_into().expect("nonce length");
    let opened_len = key
        .aead()
        .open_within(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf[..],
            NONCE_LEN..,
        )
        .map_err(|_| SealError::Tampered)?
        .len();
    buf.truncate(opened_len);
    Ok(buf)
}

/// Whether `bytes` look like a sealed value (right prefix shape), without opening it.
pub fn looks_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(b"v") && bytes.iter().take(10).any(|&b| b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SealKey {
        SealKey::generate()
    }

    fn ring(k: &SealKey) -> SealKeys {
        SealKeys::from(k.clone())
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let k = key();
        let a = seal(&k, b"aad", b"the token");
        let b = seal(&k, b"aad", b"the token");
        assert_ne!(a, b, "a fresh nonce each time");
        assert!(a.starts_with(&format!("v1.{}.", k.id())), "{a}");
        assert!(!a.contains("the token"));
        assert_eq!(
            &open(&ring(&k), b"aad", a.as_bytes()).unwrap()[..],
            b"the token"
        );
        assert_eq!(
            &open(&ring(&k), b"", seal(&k, b"", b"").as_bytes()).unwrap()[..],
            b""
        );
    }

    #[test]
    fn refuses_wrong_key_wrong_aad_tampering_and_truncation() {
        let k = key();
        let sealed = seal(&k, b"caller:billing:7", b"secret");
        let other = key();
        assert!(matches!(
            open(&ring(&other), b"caller:billing:7", sealed.as_bytes()),
            Err(SealError::WrongKey { .. })
        ));
        assert_eq!(
            open(&ring(&k), b"caller:billing:8", sealed.as_bytes()),
            Err(SealError::Tampered)
        );
        // Flip one bit of every byte position of the binary part in turn.
        let (head, body) = sealed.rsplit_once('.').unwrap();
        let raw = URL_SAFE_NO_PAD.decode(body).unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            let text = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&bad));
            assert_eq!(
                open(&ring(&k), b"caller:billing:7", text.as_bytes()),
                Err(SealError::Tampered),
                "byte {i}"
            );
        }
        let short = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&raw[..27]));
        assert_eq!(
            open(&ring(&k), b"caller:billing:7", short.as_bytes()),
            Err(SealError::Truncated(27))
        );
        let cut = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&raw[..raw.len() - 1]));
        assert_eq!(
            open(&ring(&k), b"caller:billing:7", cut.as_bytes()),
            Err(SealError::Tampered)
        );
    }

    #[test]
    fn foreign_formats_get_precise_errors() {
        let k = key();
        for (input, want) in [
            (&b"{\"token\":\"x\"}"[..], SealError::NotSealed),
            (b"", SealError::NotSealed),
            (b"v1", SealError::NotSealed),
            (b"\xff\xfe", SealError::NotSealed),
            (b"v1.zzzzzzzz.AAAA", SealError::NotSealed),
        ] {
            assert_eq!(open(&ring(&k), b"", input), Err(want), "{input:?}");
        }
        let v2 = format!("v2.{}.AAAA", k.id());
        assert_eq!(
            open(&ring(&k), b"", v2.as_bytes()),
            Err(SealError::UnsupportedVersion("v2".into()))
        );
        let bad = format!("v1.{}.not base64!", k.id());
        assert_eq!(
            open(&ring(&k), b"", bad.as_bytes()),
            Err(SealError::BadEncoding)
        );
    }

    #[test]
    fn key_parsing_is_strict_and_never_prints_the_key() {
        let k = key();
        let text = k.to_base64();
        let back = SealKey::from_base64(&format!("  {}\n", &*text)).unwrap();
        assert_eq!(back.id(), k.id());
        let unpadded = text.trim_end_matches('=').to_string();
        assert_eq!(SealKey::from_base64(&unpadded).unwrap().id(), k.id());
        assert_eq!(
            SealKey::from_base64(&STANDARD.encode([7u8; 16])).unwrap_err(),
            SealKeyError::WrongLength(16)
        );
        assert_eq!(
            SealKey::from_base64("not a key").unwrap_err(),
            SealKeyError::NotBase64
        );
        assert_eq!(format!("{k:?}"), "***");
        assert!(!SealKeyError::WrongLength(16).to_string().contains(&*text));
    }

    #[test]
    fn a_ring_opens_with_every_key_and_seals_with_the_first() {
        let (new, old) = (key(), key());
        let by_old = seal(&old, b"aad", b"secret");
        let both = SealKeys::new(vec![new.clone(), old.clone()]).unwrap();
        assert_eq!(both.first().id(), new.id());
        assert_eq!(both.ids(), vec![new.id(), old.id()]);
        assert_eq!(
            &open(&both, b"aad", by_old.as_bytes()).unwrap()[..],
            b"secret"
        );
        assert_eq!(key_id_of(by_old.as_bytes()), Some(old.id()));
        let err = open(&ring(&new), b"aad", by_old.as_bytes()).unwrap_err();
        assert_eq!(
            err,
            SealError::WrongKey {
                found: old.id().to_string(),
                configured: new.id().to_string()
            }
        );
        assert!(err.to_string().contains(old.id()), "{err}");
        assert!(SealKeys::new(vec![]).is_none());
        assert_eq!(
            format!("{both:?}"),
            format!("SealKeys([\"{}\", \"{}\"])", new.id(), old.id())
        );
        assert_eq!(key_id_of(b"garbage"), None);
    }

    #[test]
    fn looks_sealed_tells_formats_apart() {
        let k = key();
        assert!(looks_sealed(seal(&k, b"", b"x").as_bytes()));
        assert!(!looks_sealed(b"{\"version\":1}"));
    }
}
