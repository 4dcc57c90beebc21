//! DSSE envelopes: a payload, its type, and signatures over the pre-authentication encoding
//! (PAE) of both, so the exact bytes are signed and no JSON canonicalisation is needed.
//!
//! Wire form (the DSSE JSON envelope):
//! `{"payloadType":"…","payload":"<base64>","signatures":[{"keyid":"<hex>","sig":"<base64>"}]}`

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::ids::KeyId;
use crate::json::{self, JsonError};
use crate::keys::{KeyError, SigningKey};

/// Largest envelope accepted (1 MiB): manifests and roots are a few KiB.
pub const MAX_ENVELOPE_LEN: usize = 1 << 20;
/// Most signatures one envelope may carry.
pub const MAX_SIGNATURES: usize = 32;

/// Why an envelope could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Not valid envelope JSON.
    #[error("signed envelope is malformed: {0}")]
    Json(#[from] JsonError),
    /// A base64 field does not decode.
    #[error("signed envelope field `{field}` is not valid base64")]
    Base64 {
        /// The field.
        field: &'static str,
    },
    /// More signatures than [`MAX_SIGNATURES`].
    #[error("signed envelope carries {0} signatures, above the limit of {MAX_SIGNATURES}")]
    TooManySignatures(usize),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] KeyError),
}

/// One signature in an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Which key claims to have signed (a hint; the trust root decides).
    pub keyid: KeyId,
    /// The signature bytes.
    pub sig: Vec<u8>,
}

/// A DSSE envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Media type of the payload, covered by the signatures.
    pub payload_type: String,
    /// The exact payload bytes.
    pub payload: Vec<u8>,
    /// Signatures over `pae(payload_type, payload)`.
    pub signatures: Vec<Signature>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEnvelope {
    #[serde(rename = "payloadType")]
    payload_type: String,
    payload: String,
    signatures: Vec<WireSignature>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSignature {
    keyid: KeyId,
    sig: String,
}

/// DSSE's pre-authentication encoding:
/// `"DSSEv1" SP len(type) SP type SP len(body) SP body`, lengths in ASCII decimal.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// An unsigned envelope.
    pub fn new(payload_type: impl Into<String>, payload: Vec<u8>) -> Self {
        Self { payload_type: payload_type.into(), payload, signatures: Vec::new() }
    }

    /// Creates an envelope signed by every key in `keys`.
    ///
    /// # Errors
    /// A key that fails to sign.
    pub fn sign(
        payload_type: impl Into<String>,
        payload: Vec<u8>,
        keys: &[&SigningKey],
    ) -> Result<Self, EnvelopeError> {
        let mut env = Self::new(payload_type, payload);
        for key in keys {
            env.add_signature(key)?;
        }
        Ok(env)
    }

    /// Adds one signature by `key`.
    ///
    /// # Errors
    /// The key fails to sign.
    pub fn add_signature(&mut self, key: &SigningKey) -> Result<(), EnvelopeError> {
        let sig = key.sign(&self.signed_bytes())?;
        self.signatures.push(Signature { keyid: key.public_key().key_id(), sig });
        Ok(())
    }

    /// The bytes the signatures cover.
    pub fn signed_bytes(&self) -> Vec<u8> {
        pae(&self.payload_type, &self.payload)
    }

    /// Parses an envelope: bounded, strict (duplicate keys and unknown fields refused).
    ///
    /// # Errors
    /// [`EnvelopeError`] for malformed input; signatures are not checked here.
    pub fn from_json(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let wire: WireEnvelope = json::from_slice(bytes, MAX_ENVELOPE_LEN)?;
        if wire.signatures.len() > MAX_SIGNATURES {
            return Err(EnvelopeError::TooManySignatures(wire.signatures.len()));
        }
        let payload = B64.decode(&wire.payload).map_err(|_| EnvelopeError::Base64 { field: "payload" })?;
        let signatures = wire
            .signatures
            .into_iter()
            .map(|s| {
                let sig = B64.decode(&s.sig).map_err(|_| EnvelopeError::Base64 { field: "sig" })?;
                Ok(Signature { keyid: s.keyid, sig })
            })
            .collect::<Result<_, EnvelopeError>>()?;
        Ok(Self { payload_type: wire.payload_type, payload, signatures })
    }

    /// The JSON wire form.
    pub fn to_json(&self) -> Vec<u8> {
        let wire = WireEnvelope {
            payload_type: self.payload_type.clone(),
            payload: B64.encode(&self.payload),
            signatures: self
                .signatures
                .iter()
                .map(|s| WireSignature { keyid: s.keyid, sig: B64.encode(&s.sig) })
                .collect(),
        };
        // Serialising plain strings and vectors cannot fail.
        serde_json::to_vec_pretty(&wire).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_dsse_spec_example() {
        // From the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }
}
