//! Signing and public keys: Ed25519 (default) and RSA-4096 with PSS/SHA-256.
//!
//! A key's id is the hex SHA-256 of its SubjectPublicKeyInfo DER. The algorithm of a key is
//! whatever the trust root pins for it; nothing in a signed message can change it.

use std::fmt;

use ed25519_dalek::pkcs8::{DecodePrivateKey as _, DecodePublicKey as _, EncodePrivateKey as _, EncodePublicKey as _};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::ids::{KeyId, Sha256Digest};

/// RSA modulus size Flotilla uses and accepts.
pub const RSA_BITS: usize = 4096;

/// A signature algorithm, pinned per key by the trust root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    /// Ed25519, verified with `verify_strict`.
    #[serde(rename = "ed25519")]
    Ed25519,
    /// RSA-4096, PSS padding, SHA-256, salt length 32.
    #[serde(rename = "rsa-pss-sha256")]
    RsaPssSha256,
}

impl Algorithm {
    /// The length every signature of this algorithm has.
    pub fn signature_len(self) -> usize {
        match self {
            Self::Ed25519 => ed25519_dalek::SIGNATURE_LENGTH,
            Self::RsaPssSha256 => RSA_BITS / 8,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ed25519 => "ed25519",
            Self::RsaPssSha256 => "rsa-pss-sha256",
        })
    }
}

impl std::str::FromStr for Algorithm {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s {
            "ed25519" => Ok(Self::Ed25519),
            "rsa" | "rsa-pss-sha256" | "rsa4096" => Ok(Self::RsaPssSha256),
            other => Err(KeyError::UnknownAlgorithm(other.to_owned())),
        }
    }
}

/// Key handling failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The algorithm name is not one Flotilla knows.
    #[error("unknown key algorithm {0:?}; use ed25519 or rsa-pss-sha256")]
    UnknownAlgorithm(String),
    /// The key bytes do not parse as the algorithm given.
    #[error("not a valid {algorithm} key: {reason}")]
    Invalid {
        /// Algorithm expected.
        algorithm: Algorithm,
        /// What the parser said.
        reason: String,
    },
    /// An RSA key of the wrong size.
    #[error("RSA key has {0} bits; Flotilla uses RSA-{RSA_BITS}")]
    RsaSize(usize),
    /// The DER was not in canonical form (re-encoding it gives other bytes, so it would have
    /// a second key id).
    #[error("public key is not canonically encoded")]
    NonCanonical,
    /// RSA support is compiled out.
    #[error("this build has no RSA support (feature `rsa` is off)")]
    RsaDisabled,
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
    /// The operating system's random source failed.
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

/// A signature did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("signature does not verify")]
pub struct BadSignature;

#[derive(Clone)]
enum PublicInner {
    Ed25519(ed25519_dalek::VerifyingKey),
    #[cfg(feature = "rsa")]
    Rsa(rsa::pss::VerifyingKey<sha2::Sha256>),
}

/// A public key with its pinned algorithm.
#[derive(Clone)]
pub struct PublicKey {
    algorithm: Algorithm,
    inner: PublicInner,
    spki_der: Vec<u8>,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}, {})", self.algorithm, self.key_id())
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.spki_der == other.spki_der
    }
}
impl Eq for PublicKey {}

impl PublicKey {
    /// Parses SubjectPublicKeyInfo DER as `algorithm`.
    ///
    /// # Errors
    /// The DER is not a key of that algorithm, is not canonical, or is an RSA key of another
    /// size than 4096 bits.
    pub fn from_spki_der(algorithm: Algorithm, der: &[u8]) -> Result<Self, KeyError> {
        let invalid = |e: &dyn fmt::Display| KeyError::Invalid { algorithm, reason: e.to_string() };
        let inner = match algorithm {
            Algorithm::Ed25519 => {
                let key = ed25519_dalek::VerifyingKey::from_public_key_der(der).map_err(|e| invalid(&e))?;
                // Small-order points would let many messages verify; refuse them up front.
                if key.is_weak() {
                    return Err(KeyError::Invalid { algorithm, reason: "weak (small-order) key".into() });
                }
                PublicInner::Ed25519(key)
            }
            Algorithm::RsaPssSha256 => rsa_public_from_der(der)?,
        };
        let key = Self { algorithm, inner, spki_der: der.to_vec() };
        if key.encode_spki()? != der {
            return Err(KeyError::NonCanonical);
        }
        Ok(key)
    }

    /// Parses a PEM `PUBLIC KEY` block as `algorithm`.
    ///
    /// # Errors
    /// As [`from_spki_der`](Self::from_spki_der), or when the PEM is malformed.
    pub fn from_pem(algorithm: Algorithm, pem: &str) -> Result<Self, KeyError> {
        let (label, der) = ed25519_dalek::pkcs8::Document::from_pem(pem)
            .map_err(|e| KeyError::Invalid { algorithm, reason: e.to_string() })?;
        if label != "PUBLIC KEY" {
            return Err(KeyError::Invalid {
                algorithm,
                reason: format!("PEM label is {label:?}, expected \"PUBLIC KEY\""),
            });
        }
        Self::from_spki_der(algorithm, der.as_bytes())
    }

    fn encode_spki(&self) -> Result<Vec<u8>, KeyError> {
        let doc = match &self.inner {
            PublicInner::Ed25519(k) => k.to_public_key_der(),
            #[cfg(feature = "rsa")]
            PublicInner::Rsa(k) => {
                use rsa::pkcs8::EncodePublicKey as _;
                AsRef::<rsa::PublicKey>::as_ref(k).to_public_key_der()
            }
        };
        doc.map(|d| d.as_bytes().to_vec())
            .map_err(|e| KeyError::Invalid { algorithm: self.algorithm, reason: e.to_string() })
    }

    /// The pinned algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// PEM `PUBLIC KEY` block.
    pub fn to_pem(&self) -> String {
        pem_block("PUBLIC KEY", &self.spki_der)
    }

    /// Hex SHA-256 of the SPKI DER.
    pub fn key_id(&self) -> KeyId {
        KeyId::from_bytes(*Sha256Digest::of(&self.spki_der).as_bytes())
    }

    /// Verifies `sig` over `msg` with this key's pinned algorithm (Ed25519 strictly).
    ///
    /// # Errors
    /// [`BadSignature`] when it does not verify.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), BadSignature> {
        match &self.inner {
            PublicInner::Ed25519(k) => {
                let sig = ed25519_dalek::Signature::from_slice(sig).map_err(|_| BadSignature)?;
                k.verify_strict(msg, &sig).map_err(|_| BadSignature)
            }
            #[cfg(feature = "rsa")]
            PublicInner::Rsa(k) => {
                use rsa::signature::Verifier as _;
                let sig = rsa::pss::Signature::try_from(sig).map_err(|_| BadSignature)?;
                k.verify(msg, &sig).map_err(|_| BadSignature)
            }
        }
    }
}

#[cfg(feature = "rsa")]
fn rsa_public_from_der(der: &[u8]) -> Result<PublicInner, KeyError> {
    use rsa::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let key = rsa::PublicKey::from_public_key_der(der)
        .map_err(|e| KeyError::Invalid { algorithm: Algorithm::RsaPssSha256, reason: e.to_string() })?;
    let bits = key.size() * 8;
    if bits != RSA_BITS {
        return Err(KeyError::RsaSize(bits));
    }
    Ok(PublicInner::Rsa(rsa::pss::VerifyingKey::new(key)))
}

#[cfg(not(feature = "rsa"))]
fn rsa_public_from_der(_der: &[u8]) -> Result<PublicInner, KeyError> {
    Err(KeyError::RsaDisabled)
}

enum SecretInner {
    Ed25519(Box<ed25519_dalek::SigningKey>),
    #[cfg(feature = "rsa")]
    Rsa(Box<rsa::PrivateKey>),
}

/// A private signing key. Its `Debug` prints nothing secret; the key material is zeroised on
/// drop by the underlying crates.
pub struct SigningKey {
    inner: SecretInner,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// Generates a new key from the operating system's random source. RSA-4096 takes seconds.
    ///
    /// # Errors
    /// The random source failed, or RSA is compiled out.
    pub fn generate(algorithm: Algorithm) -> Result<Self, KeyError> {
        match algorithm {
            Algorithm::Ed25519 => {
                let mut seed = Zeroizing::new([0u8; 32]);
                getrandom::fill(seed.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
                Ok(Self::from_ed25519_seed(&seed))
            }
            #[cfg(feature = "rsa")]
            Algorithm::RsaPssSha256 => {
                let key = rsa::PrivateKey::new(&mut getrandom::SysRng, RSA_BITS)
                    .map_err(|e| KeyError::Random(e.to_string()))?;
                Self::from_rsa(key)
            }
            #[cfg(not(feature = "rsa"))]
            Algorithm::RsaPssSha256 => Err(KeyError::RsaDisabled),
        }
    }

    /// An Ed25519 key from a 32-byte seed (tests and fixtures use fixed seeds).
    pub fn from_ed25519_seed(seed: &[u8; 32]) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        let vk = key.verifying_key();
        let spki = vk.to_public_key_der().map(|d| d.as_bytes().to_vec()).unwrap_or_default();
        Self {
            public: PublicKey { algorithm: Algorithm::Ed25519, inner: PublicInner::Ed25519(vk), spki_der: spki },
            inner: SecretInner::Ed25519(Box::new(key)),
        }
    }

    #[cfg(feature = "rsa")]
    fn from_rsa(key: rsa::PrivateKey) -> Result<Self, KeyError> {
        use rsa::pkcs8::EncodePublicKey as _;
        use rsa::traits::PublicKeyParts as _;
        let public = key.to_public_key();
        if public.size() * 8 != RSA_BITS {
            return Err(KeyError::RsaSize(public.size() * 8));
        }
        let spki = public
            .to_public_key_der()
            .map_err(|e| KeyError::Invalid { algorithm: Algorithm::RsaPssSha256, reason: e.to_string() })?;
        Ok(Self {
            public: PublicKey {
                algorithm: Algorithm::RsaPssSha256,
                inner: PublicInner::Rsa(rsa::pss::VerifyingKey::new(public)),
                spki_der: spki.as_bytes().to_vec(),
            },
            inner: SecretInner::Rsa(Box::new(key)),
        })
    }

    /// Reads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`), Ed25519 or RSA.
    ///
    /// # Errors
    /// Not a PKCS#8 key Flotilla supports.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
            return Ok(Self::from_ed25519_seed(&key.to_bytes()));
        }
        #[cfg(feature = "rsa")]
        {
            use rsa::pkcs8::DecodePrivateKey as _;
            match rsa::PrivateKey::from_pkcs8_pem(pem) {
                Ok(key) => Self::from_rsa(key),
                Err(e) => Err(KeyError::Invalid { algorithm: Algorithm::RsaPssSha256, reason: e.to_string() }),
            }
        }
        #[cfg(not(feature = "rsa"))]
        Err(KeyError::Invalid { algorithm: Algorithm::Ed25519, reason: "not an Ed25519 PKCS#8 key".into() })
    }

    /// The PKCS#8 PEM encoding, zeroised when dropped.
    ///
    /// # Errors
    /// Encoding failed (should not happen for keys this type holds).
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        let der = match &self.inner {
            SecretInner::Ed25519(k) => k.to_pkcs8_der(),
            #[cfg(feature = "rsa")]
            SecretInner::Rsa(k) => {
                use rsa::pkcs8::EncodePrivateKey as _;
                k.to_pkcs8_der()
            }
        }
        .map_err(|e| KeyError::Invalid { algorithm: self.public.algorithm, reason: e.to_string() })?;
        Ok(Zeroizing::new(pem_block("PRIVATE KEY", der.as_bytes())))
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.public.algorithm
    }

    /// Signs `msg` (Ed25519, or RSA-PSS with a random salt).
    ///
    /// # Errors
    /// RSA signing failed (randomness).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyError> {
        match &self.inner {
            SecretInner::Ed25519(k) => {
                use ed25519_dalek::Signer as _;
                Ok(k.sign(msg).to_bytes().to_vec())
            }
            #[cfg(feature = "rsa")]
            SecretInner::Rsa(k) => k.pss_sign::<sha2::Sha256>(msg).map_err(|e| KeyError::Sign(e.to_string())),
        }
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_sign_verify_pem_roundtrip() {
        let key = SigningKey::from_ed25519_seed(&[7; 32]);
        let sig = key.sign(b"msg").unwrap();
        assert!(key.public_key().verify(b"msg", &sig).is_ok());
        assert!(key.public_key().verify(b"msh", &sig).is_err());
        let pem = key.to_pkcs8_pem().unwrap();
        let again = SigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let public = PublicKey::from_pem(Algorithm::Ed25519, &key.public_key().to_pem()).unwrap();
        assert_eq!(public.key_id(), key.public_key().key_id());
        assert!(format!("{key:?}") == "SigningKey(..)");
    }

    #[test]
    fn declared_algorithm_must_match_key() {
        let key = SigningKey::from_ed25519_seed(&[7; 32]);
        let err = PublicKey::from_spki_der(Algorithm::RsaPssSha256, key.public_key().spki_der()).unwrap_err();
        assert!(matches!(err, KeyError::Invalid { algorithm: Algorithm::RsaPssSha256, .. }), "{err:?}");
    }
}
