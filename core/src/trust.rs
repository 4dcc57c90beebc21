//! Trust roots and the one signature check every signed document goes through.
//!
//! A trust root (JSON in a DSSE envelope of type [`ROOT_PAYLOAD_TYPE`]) lists public keys,
//! each with its algorithm pinned, and three roles:
//! - `root`: signs trust roots (offline keys);
//! - `release`: the publishers, who sign release manifests;
//! - `rollout`: the coordinator's online key, which signs check responses and rollout
//!   directives and nothing else (a key in this role may not be in another).
//!
//! Each role has a threshold. Thresholds count distinct public-key material, duplicate
//! signatures are refused, a threshold of 0 or above the role's key count makes the root
//! invalid. A new root is accepted only with version N+1 and signatures meeting both the
//! current root's and its own `root` threshold (TUF), so keys rotate without reflashing.

use std::collections::{HashMap, HashSet};
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::dsse::{Envelope, EnvelopeError};
use crate::ids::KeyId;
use crate::json::{self, JsonError};
use crate::keys::{Algorithm, KeyError, PublicKey, SigningKey};
use crate::time::Timestamp;

/// Payload type of trust-root envelopes.
pub const ROOT_PAYLOAD_TYPE: &str = "application/vnd.flotilla.root+json";
/// Trust-root schema this build reads.
pub const ROOT_SCHEMA_VERSION: u32 = 1;
/// Largest trust-root payload accepted (512 KiB).
pub const MAX_ROOT_LEN: usize = 512 << 10;
/// Most keys a trust root may list.
pub const MAX_KEYS: usize = 64;

/// A role in the trust root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Signs trust roots.
    Root,
    /// Signs release manifests (publishers).
    Release,
    /// Signs check responses and rollout directives (the coordinator).
    Rollout,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Root => "root",
            Self::Release => "release",
            Self::Rollout => "rollout",
        })
    }
}

/// A key as listed in a trust root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// SHA-256 of `public_key`'s DER; must match it.
    pub keyid: KeyId,
    /// The algorithm this key is used with, and only with.
    pub algorithm: Algorithm,
    /// SubjectPublicKeyInfo DER, base64.
    pub public_key: String,
}

impl KeyEntry {
    /// The entry for `key`.
    pub fn for_key(key: &PublicKey) -> Self {
        Self { keyid: key.key_id(), algorithm: key.algorithm(), public_key: B64.encode(key.spki_der()) }
    }
}

/// Keys and threshold of one role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    /// Keys that may sign for the role.
    pub keyids: Vec<KeyId>,
    /// Distinct valid signatures needed.
    pub threshold: u32,
}

/// The three roles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    /// Trust-root signers.
    pub root: RoleSpec,
    /// Release signers.
    pub release: RoleSpec,
    /// The coordinator's rollout signers.
    pub rollout: RoleSpec,
}

impl Roles {
    fn get(&self, role: Role) -> &RoleSpec {
        match role {
            Role::Root => &self.root,
            Role::Release => &self.release,
            Role::Rollout => &self.rollout,
        }
    }
}

/// The trust-root document (the envelope's payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootDocument {
    /// Schema version ([`ROOT_SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// Root version: 1 for the first root, +1 on every rotation.
    pub version: u64,
    /// After this instant the root is stale and must be re-signed.
    pub expires_at: Timestamp,
    /// All keys of all roles.
    pub keys: Vec<KeyEntry>,
    /// Role assignments.
    pub roles: Roles,
}

impl RootDocument {
    /// A document over the given keys per role, with thresholds.
    pub fn new(
        version: u64,
        expires_at: Timestamp,
        root: (&[&PublicKey], u32),
        release: (&[&PublicKey], u32),
        rollout: (&[&PublicKey], u32),
    ) -> Self {
        let mut keys: Vec<KeyEntry> = Vec::new();
        let mut role = |(list, threshold): (&[&PublicKey], u32)| {
            for k in list {
                let entry = KeyEntry::for_key(k);
                if !keys.contains(&entry) {
                    keys.push(entry);
                }
            }
            RoleSpec { keyids: list.iter().map(|k| k.key_id()).collect(), threshold }
        };
        let roles = Roles { root: role(root), release: role(release), rollout: role(rollout) };
        Self { schema_version: ROOT_SCHEMA_VERSION, version, expires_at, keys, roles }
    }

    /// The JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Signs the document with `keys` into an envelope.
    ///
    /// # Errors
    /// A key failed to sign.
    pub fn sign(&self, keys: &[&SigningKey]) -> Result<Envelope, EnvelopeError> {
        Envelope::sign(ROOT_PAYLOAD_TYPE, self.to_json(), keys)
    }
}

/// A trust-root document that is not valid on its own terms.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustRootError {
    /// Unknown schema.
    #[error("trust root schema {0} is not supported (this build reads {ROOT_SCHEMA_VERSION})")]
    UnsupportedSchema(u32),
    /// Version 0.
    #[error("trust root version must be at least 1")]
    VersionZero,
    /// Too many keys.
    #[error("trust root lists {0} keys, above the limit of {MAX_KEYS}")]
    TooManyKeys(usize),
    /// A key's id is not the SHA-256 of its DER.
    #[error("key listed as {declared} has id {actual}; key ids are the SHA-256 of the key's DER")]
    KeyIdMismatch {
        /// The listed id.
        declared: KeyId,
        /// The id of the key bytes.
        actual: KeyId,
    },
    /// The same key listed twice.
    #[error("key {keyid} is listed twice; each key may appear once")]
    DuplicateKey {
        /// The key.
        keyid: KeyId,
    },
    /// The key is of another algorithm than the one the root pins for it.
    #[error("key {keyid} is listed as {declared} but is a {actual} key")]
    KeyAlgorithmMismatch {
        /// The key.
        keyid: KeyId,
        /// Algorithm the root gives.
        declared: Algorithm,
        /// Algorithm of the key bytes.
        actual: Algorithm,
    },
    /// The key bytes are not a usable key.
    #[error("key {keyid} is not usable: {source}")]
    InvalidKey {
        /// The key.
        keyid: KeyId,
        /// Why.
        #[source]
        source: KeyError,
    },
    /// Threshold 0 or above the role's key count.
    #[error("role {role} has threshold {threshold} over {keys} keys; it must be between 1 and the key count")]
    InvalidThreshold {
        /// The role.
        role: Role,
        /// Its threshold.
        threshold: u32,
        /// Its key count.
        keys: usize,
    },
    /// A role names a key the root does not list.
    #[error("role {role} names key {keyid}, which the trust root does not list")]
    UnknownRoleKey {
        /// The role.
        role: Role,
        /// The key.
        keyid: KeyId,
    },
    /// A role names the same key twice.
    #[error("role {role} names key {keyid} twice")]
    DuplicateRoleKey {
        /// The role.
        role: Role,
        /// The key.
        keyid: KeyId,
    },
    /// The coordinator's rollout key is also in another role.
    #[error("rollout key {keyid} is also in role {other}; the coordinator's key must sign rollouts only")]
    RolloutKeyShared {
        /// The key.
        keyid: KeyId,
        /// The other role.
        other: Role,
    },
}

/// A signed document failed the signature check.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The envelope is malformed.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The envelope's payload type is not the expected one.
    #[error("signed payload has type {actual:?}, expected {expected:?}")]
    WrongPayloadType {
        /// Expected type.
        expected: &'static str,
        /// Actual type.
        actual: String,
    },
    /// No signatures at all.
    #[error("document is not signed")]
    Unsigned,
    /// Two signatures name the same key.
    #[error("key {keyid} signed twice; each key counts once, so the document is refused")]
    DuplicateSignature {
        /// The key.
        keyid: KeyId,
    },
    /// Signed only by keys the trust root does not list.
    #[error(
        "signed by key {keyid}, which the trust root does not list; was it signed with the right key, or is the device's trust root out of date?"
    )]
    UnknownKey {
        /// The unknown key.
        keyid: KeyId,
    },
    /// Signed only by keys that belong to another role.
    #[error("signed by key {keyid}, which may not sign for role {role}")]
    KeyNotInRole {
        /// The key.
        keyid: KeyId,
        /// The role the document needs.
        role: Role,
    },
    /// The signature is not of the algorithm the root pins for the key.
    #[error(
        "signature by key {keyid} is {len} bytes, not a {algorithm} signature; keys are used only with the algorithm the trust root gives them"
    )]
    AlgorithmMismatch {
        /// The key.
        keyid: KeyId,
        /// Its pinned algorithm.
        algorithm: Algorithm,
        /// Length of the signature given.
        len: usize,
    },
    /// A signature by a listed key does not verify: the document was altered or forged.
    #[error("signature by key {keyid} does not verify: the document was altered or the signature forged")]
    BadSignature {
        /// The key.
        keyid: KeyId,
    },
    /// Too few distinct valid signatures.
    #[error("{valid} valid signature(s) from distinct {role} keys, {threshold} required")]
    BelowThreshold {
        /// The role.
        role: Role,
        /// Valid signatures from distinct keys.
        valid: usize,
        /// Required.
        threshold: u32,
    },
}

/// Loading or rotating a trust root failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootUpdateError {
    /// The envelope is malformed.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The payload is not a valid trust-root document.
    #[error("trust root payload: {0}")]
    Payload(#[from] JsonError),
    /// The document breaks a trust-root rule.
    #[error(transparent)]
    Invalid(#[from] TrustRootError),
    /// Not signed by a threshold of the current root's keys.
    #[error("new trust root is not signed by enough of the current root keys: {0}")]
    NotSignedByCurrent(#[source] SignatureError),
    /// Not signed by a threshold of its own root keys.
    #[error("trust root is not signed by enough of its own root keys: {0}")]
    NotSignedBySelf(#[source] SignatureError),
    /// Version is not the current one plus one.
    #[error("new trust root has version {got}, expected {expected}")]
    VersionNotNext {
        /// Current + 1.
        expected: u64,
        /// Given.
        got: u64,
    },
}

/// A validated trust root.
#[derive(Debug, Clone)]
pub struct TrustRoot {
    doc: RootDocument,
    keys: HashMap<KeyId, PublicKey>,
    envelope_json: Vec<u8>,
}

impl TrustRoot {
    /// Loads a trust root the device already trusts (provisioned at manufacture, or persisted
    /// after a rotation): it must be valid and signed by its own root threshold.
    ///
    /// # Errors
    /// [`RootUpdateError`] naming the problem.
    pub fn from_trusted_json(envelope_json: &[u8]) -> Result<Self, RootUpdateError> {
        let env = Envelope::from_json(envelope_json)?;
        if env.payload_type != ROOT_PAYLOAD_TYPE {
            return Err(RootUpdateError::NotSignedBySelf(SignatureError::WrongPayloadType {
                expected: ROOT_PAYLOAD_TYPE,
                actual: env.payload_type,
            }));
        }
        let root = Self::from_document_bytes(&env.payload, envelope_json)?;
        root.verify(&env, Role::Root, ROOT_PAYLOAD_TYPE).map_err(RootUpdateError::NotSignedBySelf)?;
        Ok(root)
    }

    /// Accepts `envelope_json` as the next root: version N+1, signed by this root's root
    /// threshold (checked before the payload is parsed) and by its own.
    ///
    /// # Errors
    /// [`RootUpdateError`] naming the problem; `self` stays the trusted root.
    pub fn rotate(&self, envelope_json: &[u8]) -> Result<Self, RootUpdateError> {
        let env = Envelope::from_json(envelope_json)?;
        self.verify(&env, Role::Root, ROOT_PAYLOAD_TYPE).map_err(RootUpdateError::NotSignedByCurrent)?;
        let next = Self::from_document_bytes(&env.payload, envelope_json)?;
        let expected = self.doc.version + 1;
        if next.doc.version != expected {
            return Err(RootUpdateError::VersionNotNext { expected, got: next.doc.version });
        }
        next.verify(&env, Role::Root, ROOT_PAYLOAD_TYPE).map_err(RootUpdateError::NotSignedBySelf)?;
        Ok(next)
    }

    fn from_document_bytes(payload: &[u8], envelope_json: &[u8]) -> Result<Self, RootUpdateError> {
        let doc: RootDocument = json::from_slice(payload, MAX_ROOT_LEN)?;
        let mut root = Self::from_document(doc)?;
        root.envelope_json = envelope_json.to_vec();
        Ok(root)
    }

    /// Validates a document (without signatures; for tools that build roots).
    ///
    /// # Errors
    /// [`TrustRootError`] naming the broken rule.
    pub fn from_document(doc: RootDocument) -> Result<Self, TrustRootError> {
        if doc.schema_version != ROOT_SCHEMA_VERSION {
            return Err(TrustRootError::UnsupportedSchema(doc.schema_version));
        }
        if doc.version == 0 {
            return Err(TrustRootError::VersionZero);
        }
        if doc.keys.len() > MAX_KEYS {
            return Err(TrustRootError::TooManyKeys(doc.keys.len()));
        }
        let mut keys = HashMap::new();
        for entry in &doc.keys {
            let invalid = |source| TrustRootError::InvalidKey { keyid: entry.keyid, source };
            let der = B64
                .decode(&entry.public_key)
                .map_err(|e| invalid(KeyError::Invalid { algorithm: entry.algorithm, reason: e.to_string() }))?;
            let key = match PublicKey::from_spki_der(entry.algorithm, &der) {
                Ok(key) => key,
                Err(e @ KeyError::Invalid { .. }) => {
                    let other = match entry.algorithm {
                        Algorithm::Ed25519 => Algorithm::RsaPssSha256,
                        Algorithm::RsaPssSha256 => Algorithm::Ed25519,
                    };
                    return Err(match PublicKey::from_spki_der(other, &der) {
                        Ok(_) => TrustRootError::KeyAlgorithmMismatch {
                            keyid: entry.keyid,
                            declared: entry.algorithm,
                            actual: other,
                        },
                        Err(_) => invalid(e),
                    });
                }
                Err(e) => return Err(invalid(e)),
            };
            // Key ids are derived from canonical DER, so one key material has one id and a
            // duplicate id is the same key listed twice.
            if key.key_id() != entry.keyid {
                return Err(TrustRootError::KeyIdMismatch { declared: entry.keyid, actual: key.key_id() });
            }
            if keys.insert(entry.keyid, key).is_some() {
                return Err(TrustRootError::DuplicateKey { keyid: entry.keyid });
            }
        }
        for role in [Role::Root, Role::Release, Role::Rollout] {
            let spec = doc.roles.get(role);
            let mut seen = HashSet::new();
            for id in &spec.keyids {
                if !keys.contains_key(id) {
                    return Err(TrustRootError::UnknownRoleKey { role, keyid: *id });
                }
                if !seen.insert(id) {
                    return Err(TrustRootError::DuplicateRoleKey { role, keyid: *id });
                }
            }
            if spec.threshold == 0 || spec.threshold as usize > spec.keyids.len() {
                return Err(TrustRootError::InvalidThreshold {
                    role,
                    threshold: spec.threshold,
                    keys: spec.keyids.len(),
                });
            }
        }
        for id in &doc.roles.rollout.keyids {
            for other in [Role::Root, Role::Release] {
                if doc.roles.get(other).keyids.contains(id) {
                    return Err(TrustRootError::RolloutKeyShared { keyid: *id, other });
                }
            }
        }
        Ok(Self { doc, keys, envelope_json: Vec::new() })
    }

    /// The document.
    pub fn document(&self) -> &RootDocument {
        &self.doc
    }

    /// The root's version.
    pub fn version(&self) -> u64 {
        self.doc.version
    }

    /// When the root expires.
    pub fn expires_at(&self) -> Timestamp {
        self.doc.expires_at
    }

    /// The envelope exactly as received, for persisting verbatim (empty for roots built
    /// with [`from_document`](Self::from_document)).
    pub fn envelope_json(&self) -> &[u8] {
        &self.envelope_json
    }

    /// The key with this id, if listed.
    pub fn key(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys.get(id)
    }

    /// Whether `id` may sign for `role`.
    pub fn is_in_role(&self, id: &KeyId, role: Role) -> bool {
        self.doc.roles.get(role).keyids.contains(id)
    }

    /// The signature check: `env` must have type `payload_type` and signatures from at least
    /// the role's threshold of distinct keys of `role`. Returns the payload, still unparsed.
    ///
    /// # Errors
    /// [`SignatureError`] naming the first fatal problem: a duplicate signature, a signature
    /// of the wrong algorithm or one that does not verify is fatal even when enough other
    /// signatures are valid.
    pub fn verify<'e>(
        &self,
        env: &'e Envelope,
        role: Role,
        payload_type: &'static str,
    ) -> Result<&'e [u8], SignatureError> {
        if env.payload_type != payload_type {
            return Err(SignatureError::WrongPayloadType { expected: payload_type, actual: env.payload_type.clone() });
        }
        if env.signatures.is_empty() {
            return Err(SignatureError::Unsigned);
        }
        let signed = env.signed_bytes();
        let spec = self.doc.roles.get(role);
        let mut seen_ids = HashSet::new();
        let mut valid_material: HashSet<&[u8]> = HashSet::new();
        let mut unknown = None;
        let mut other_role = None;
        for sig in &env.signatures {
            if !seen_ids.insert(sig.keyid) {
                return Err(SignatureError::DuplicateSignature { keyid: sig.keyid });
            }
            let Some(key) = self.keys.get(&sig.keyid) else {
                unknown.get_or_insert(sig.keyid);
                continue;
            };
            if !spec.keyids.contains(&sig.keyid) {
                other_role.get_or_insert(sig.keyid);
                continue;
            }
            if sig.sig.len() != key.algorithm().signature_len() {
                return Err(SignatureError::AlgorithmMismatch {
                    keyid: sig.keyid,
                    algorithm: key.algorithm(),
                    len: sig.sig.len(),
                });
            }
            key.verify(&signed, &sig.sig).map_err(|_| SignatureError::BadSignature { keyid: sig.keyid })?;
            // Count key material, not ids: the threshold means distinct keys.
            valid_material.insert(key.spki_der());
        }
        let valid = valid_material.len();
        if valid >= spec.threshold as usize {
            return Ok(&env.payload);
        }
        if valid == 0 {
            if let Some(keyid) = other_role {
                return Err(SignatureError::KeyNotInRole { keyid, role });
            }
            if let Some(keyid) = unknown {
                return Err(SignatureError::UnknownKey { keyid });
            }
        }
        Err(SignatureError::BelowThreshold { role, valid, threshold: spec.threshold })
    }
}
