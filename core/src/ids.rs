//! Digests as distinct types, so a chunk id can never be passed where an image digest is
//! expected. All are 32 bytes, shown and serialised as 64 lowercase hex characters.

use std::fmt;
use std::str::FromStr;

/// A hex string that is not a 32-byte digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {what} as 64 lowercase hex characters, got {got_len} characters")]
pub struct DigestParseError {
    /// The kind of digest that was expected.
    pub what: &'static str,
    /// How many characters were given.
    pub got_len: usize,
}

macro_rules! digest_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps raw digest bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw digest bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Lowercase hex.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({}…)"), &hex::encode(&self.0[..6]))
            }
        }

        impl FromStr for $name {
            type Err = DigestParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex32(s, $what).map(Self)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

fn parse_hex32(s: &str, what: &'static str) -> Result<[u8; 32], DigestParseError> {
    let err = DigestParseError { what, got_len: s.len() };
    // Upper-case hex would give a second spelling of the same id; ids are compared as text
    // in URLs and database keys, so only one spelling is accepted.
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(err);
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).map_err(|_| err)?;
    Ok(out)
}

digest_type!(
    /// BLAKE3-256 of one chunk's uncompressed bytes.
    ChunkId, "a chunk id"
);
digest_type!(
    /// BLAKE3-256 of an encoded chunk index; the manifest names the index by it.
    IndexId, "an index id"
);
digest_type!(
    /// SHA-256 of a whole image (or of a signed payload): the value checked before a switch.
    Sha256Digest, "a SHA-256 digest"
);
digest_type!(
    /// BLAKE3-256 of a whole image.
    Blake3Digest, "a BLAKE3 digest"
);
digest_type!(
    /// SHA-256 of a public key's SubjectPublicKeyInfo DER: a hint to find the key, never
    /// what a threshold counts.
    KeyId, "a key id"
);

impl ChunkId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
}

impl IndexId {
    /// The id of an encoded index.
    pub fn of(encoded: &[u8]) -> Self {
        Self(*blake3::hash(encoded).as_bytes())
    }
}

impl Sha256Digest {
    /// SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(data).into())
    }
}

impl Blake3Digest {
    /// BLAKE3 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip_and_strictness() {
        let id = ChunkId::of(b"hello");
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<ChunkId>(), Ok(id));
        assert!(text.to_uppercase().parse::<ChunkId>().is_err());
        assert!(text[..63].parse::<ChunkId>().is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), id);
    }
}
