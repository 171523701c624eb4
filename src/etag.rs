//! Entity tags (RFC 9110 §8.8.3) and the strong tag ifmatch derives from a body.
//!
//! A tag the proxy makes is `"` + base64url(HMAC-SHA256(key, body)) + `"`: the same bytes
//! always give the same tag and any change of bytes gives another, so it is a strong
//! validator (§8.8.1); variants that may share bytes under other metadata are hashed under
//! a key derived from it as well (`TagKey::hasher_for`). The key keeps the tag from
//! becoming an oracle: with a plain hash, anyone who can guess a small body
//! (`{"balance":100}`) could confirm the guess by sending `If-Match` and watching 412
//! versus a forwarded write. The hash runs over the body chunks as they arrive; nothing is
//! concatenated for it.

use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::HeaderValue;
use sha2::{Digest, Sha256};

/// An entity tag: an opaque string, strong or weak.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ETag {
    weak: bool,
    /// The characters between the quotes (`etagc`: `!`, `#`..`~` and obs-text). Shared: a
    /// body's tag is cloned into the tag cache, the memo and the evaluation of the request.
    opaque: Arc<[u8]>,
}

/// Why an entity tag could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ETagError {
    #[error("an entity-tag must be a quoted string such as \"abc\" or W/\"abc\"")]
    NotQuoted,
    #[error("an entity-tag may not contain {0:?}")]
    BadChar(char),
}

// === impl ETag ===

impl ETag {
    /// A strong tag with the given opaque value (the part between the quotes).
    pub fn strong(opaque: impl AsRef<[u8]>) -> Result<Self, ETagError> {
        Self::new(false, opaque.as_ref())
    }

    /// A weak tag with the given opaque value.
    pub fn weak(opaque: impl AsRef<[u8]>) -> Result<Self, ETagError> {
        Self::new(true, opaque.as_ref())
    }

    fn new(weak: bool, opaque: &[u8]) -> Result<Self, ETagError> {
        // Checked without branching on each byte, so that the compiler can check many at a
        // time: every `If-Match` a write sends comes through here.
        if !opaque.iter().fold(true, |ok, &b| ok & is_etagc(b)) {
            let bad = opaque
                .iter()
                .find(|&&b| !is_etagc(b))
                .copied()
                .unwrap_or(b'"');
            return Err(ETagError::BadChar(bad as char));
        }
        Ok(Self {
            weak,
            opaque: opaque.into(),
        })
    }

    /// Parses exactly one entity-tag, surrounding whitespace allowed.
    pub fn parse(s: &[u8]) -> Result<Self, ETagError> {
        let s = trim_ows(s);
        let (weak, rest) = match s.strip_prefix(b"W/") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let inner = rest
            .strip_prefix(b"\"")
            .and_then(|r| r.strip_suffix(b"\""))
            .ok_or(ETagError::NotQuoted)?;
        Self::new(weak, inner)
    }

    /// The length of the characters between the quotes: what the tag holds in memory.
    pub fn opaque_len(&self) -> usize {
        self.opaque.len()
    }

    pub fn is_weak(&self) -> bool {
        self.weak
    }

    /// Strong comparison (§8.8.3.2): both strong and the same opaque string.
    pub fn strong_eq(&self, other: &ETag) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }

    /// Weak comparison (§8.8.3.2): the same opaque string, weakness ignored.
    pub fn weak_eq(&self, other: &ETag) -> bool {
        self.opaque == other.opaque
    }

    /// The tag as an `ETag` header value.
    pub fn to_header(&self) -> HeaderValue {
        let mut v = Vec::with_capacity(self.opaque.len() + 4);
        if self.weak {
            v.extend_from_slice(b"W/");
        }
        v.push(b'"');
        v.extend_from_slice(&self.opaque);
        v.push(b'"');
        // Handed over, not copied again as `from_bytes` would.
        HeaderValue::from_maybe_shared(bytes::Bytes::from(v))
            .expect("etagc bytes are valid header value bytes")
    }
}

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weak {
            f.write_str("W/")?;
        }
        write!(f, "\"{}\"", String::from_utf8_lossy(&self.opaque))
    }
}

/// `etagc = %x21 / %x23-7E / obs-text`: any visible byte but `"`, and no whitespace.
fn is_etagc(b: u8) -> bool {
    b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80
}

pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The secret that keys every tag. Replicas of one deployment must share it; tags made under
/// another key never match (clients then get 412, re-fetch and retry).
#[derive(Clone)]
pub struct TagKey {
    /// HMAC state with the key already absorbed: cloning it is cheaper than re-keying.
    mac: Hmac<Sha256>,
    /// A short public fingerprint of the key, for logs (never the key itself).
    fingerprint: String,
    /// Tells keys apart where a string compare would cost too much (body memos).
    id: u64,
}

impl fmt::Debug for TagKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TagKey({})", self.fingerprint)
    }
}

impl PartialEq for TagKey {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

// === impl TagKey ===

impl TagKey {
    /// Shortest key accepted, in bytes.
    pub const MIN_LEN: usize = 32;

    pub fn new(secret: &[u8]) -> Self {
        let mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
        let digest = Sha256::digest([b"ifmatch tag key fingerprint:".as_slice(), secret].concat());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[8..16]);
        Self {
            mac,
            fingerprint: URL_SAFE_NO_PAD.encode(&digest[..6]),
            id: u64::from_le_bytes(id),
        }
    }

    /// A fresh random key, for a process that was given none.
    pub fn random() -> Self {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("the OS random source is available");
        Self::new(&secret)
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// 64 bits of the key's digest: equal for equal keys, and for distinct ones only by a
    /// 1 in 2^64 chance.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Starts hashing a representation.
    pub fn hasher(&self) -> TagHasher {
        TagHasher {
            mac: self.mac.clone(),
        }
    }

    /// Starts hashing a representation whose tag must also tell its metadata (`meta`: its
    /// `Content-Type` and the like, see `proxy::read`): the body is hashed under a key
    /// derived from the tag key and `meta`, so equal bytes under other metadata get another
    /// tag, and no body hashed under the plain key can give one of these but by chance.
    pub fn hasher_for(&self, meta: &[u8]) -> TagHasher {
        let mut mac = self.mac.clone();
        mac.update(b"ifmatch representation metadata:");
        mac.update(meta);
        let derived = mac.finalize().into_bytes();
        TagHasher {
            mac: Hmac::<Sha256>::new_from_slice(&derived).expect("HMAC takes keys of any length"),
        }
    }

    /// The tag of a whole body held in one slice.
    pub fn tag_of(&self, body: &[u8]) -> ETag {
        let mut h = self.hasher();
        h.update(body);
        h.finish()
    }
}

/// Streaming HMAC-SHA256 of a representation's bytes, finished into a strong [`ETag`].
#[derive(Clone)]
pub struct TagHasher {
    mac: Hmac<Sha256>,
}

// === impl TagHasher ===

impl TagHasher {
    pub fn update(&mut self, chunk: &[u8]) {
        self.mac.update(chunk);
    }

    pub fn finish(self) -> ETag {
        let digest = self.mac.finalize().into_bytes();
        let mut opaque = [0u8; 43];
        let n = URL_SAFE_NO_PAD
            .encode_slice(digest, &mut opaque)
            .expect("43 bytes hold 32 bytes in base64");
        debug_assert_eq!(n, 43);
        ETag {
            weak: false,
            opaque: opaque.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strong_and_weak_tags() {
        let cases: &[(&str, bool, &str)] = &[
            ("\"xyzzy\"", false, "xyzzy"),
            ("W/\"xyzzy\"", true, "xyzzy"),
            ("\"\"", false, ""),
            ("  \"a#b\"\t", false, "a#b"),
            ("W/\"\"", true, ""),
        ];
        for &(input, weak, opaque) in cases {
            let tag = ETag::parse(input.as_bytes()).unwrap();
            assert_eq!(tag.is_weak(), weak, "{input}");
            assert_eq!(&*tag.opaque, opaque.as_bytes(), "{input}");
            assert_eq!(tag.to_string(), input.trim(), "round trip of {input}");
        }
    }

    #[test]
    fn rejects_malformed_tags() {
        for input in [
            "xyzzy", "\"xyzzy", "xyzzy\"", "w/\"x\"", "W/x", "\"a\"b\"", "\"a b\"", "W/ \"x\"", "",
            "\"",
        ] {
            assert!(ETag::parse(input.as_bytes()).is_err(), "{input:?} parsed");
        }
    }

    #[test]
    fn comparison_follows_the_rfc_table() {
        // RFC 9110 §8.8.3.2, the four example rows.
        let w1 = ETag::parse(b"W/\"1\"").unwrap();
        let w2 = ETag::parse(b"W/\"2\"").unwrap();
        let s1 = ETag::parse(b"\"1\"").unwrap();
        assert!(!w1.strong_eq(&w1) && w1.weak_eq(&w1));
        assert!(!w1.strong_eq(&w2) && !w1.weak_eq(&w2));
        assert!(!w1.strong_eq(&s1) && w1.weak_eq(&s1));
        assert!(s1.strong_eq(&s1) && s1.weak_eq(&s1));
    }

    #[test]
    fn body_tags_are_strong_and_follow_the_bytes() {
        let key = TagKey::new(b"0123456789abcdef0123456789abcdef");
        let a = key.tag_of(b"hello world");
        assert!(!a.is_weak());
        assert_eq!(a, key.tag_of(b"hello world"));
        assert_ne!(a, key.tag_of(b"hello worle"));
        // Chunking does not matter: the tag is of the bytes, not of how they arrived.
        let mut h = key.hasher();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), a);
        // HMAC-SHA256(key, "hello world"), base64url without padding (checked with openssl).
        assert_eq!(
            a.to_string(),
            "\"YKCxmyvY3S_u1V9Ezm_cXaIg0LKpHIaD9G7qvOOQmmY\""
        );
    }

    #[test]
    fn another_key_gives_other_tags() {
        let a = TagKey::new(b"0123456789abcdef0123456789abcdef");
        let b = TagKey::new(b"fedcba9876543210fedcba9876543210");
        assert_ne!(
            a.tag_of(b"{\"balance\":100}"),
            b.tag_of(b"{\"balance\":100}")
        );
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_ne!(TagKey::random().tag_of(b"x"), TagKey::random().tag_of(b"x"));
    }
}
