//! The coordinator's side of the two-signer rule, and cohort bucketing.
//!
//! A check response carries an [`Assignment`] signed by the trust root's `rollout` role: the
//! device id, the nonce the device sent, the server time, and the assigned release's
//! version_code and hashes. A device installs only when [`VerifiedAssignment::check_agreement`]
//! finds the assignment and the publisher-signed manifest identical on every one of them
//! (Uptane), so a stolen coordinator key can only withhold updates or pick among releases the
//! publishers signed.
//!
//! Offline sites get a [`RolloutDirective`] (percent + salt) signed by the same role and
//! apply the staged rollout themselves with [`in_rollout`], the one bucketing function the
//! coordinator also uses.

use std::fmt;
use std::str::FromStr;

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::dsse::{Envelope, EnvelopeError};
use crate::ids::{IndexId, Sha256Digest};
use crate::json::{self, JsonError};
use crate::keys::SigningKey;
use crate::manifest::{VerifiedManifest, is_valid_name};
use crate::time::Timestamp;
use crate::trust::{Role, SignatureError, TrustRoot};

/// Payload type of signed check responses.
pub const ASSIGNMENT_PAYLOAD_TYPE: &str = "application/vnd.flotilla.assignment+json";
/// Payload type of signed rollout directives.
pub const DIRECTIVE_PAYLOAD_TYPE: &str = "application/vnd.flotilla.directive+json";
/// Schema version of both documents.
pub const ROLLOUT_SCHEMA_VERSION: u32 = 1;
/// Largest payload accepted (64 KiB).
pub const MAX_ROLLOUT_LEN: usize = 64 << 10;
/// Longest device id.
pub const MAX_DEVICE_ID_LEN: usize = 128;
/// Longest nonce (hex).
pub const MAX_NONCE_LEN: usize = 128;
/// Basis points in 100 %.
pub const FULL_ROLLOUT: u16 = 10_000;

/// The release an assignment points at: everything the manifest must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedRelease {
    /// Human version.
    pub version: Version,
    /// version_code.
    pub version_code: u64,
    /// SHA-256 of the manifest payload bytes.
    pub manifest_sha256: Sha256Digest,
    /// Image size.
    pub image_size: u64,
    /// Image SHA-256.
    pub image_sha256: Sha256Digest,
    /// Chunk index id.
    pub index_id: IndexId,
}

impl AssignedRelease {
    /// The assignment fields for a verified manifest (what the coordinator signs).
    pub fn for_manifest(m: &VerifiedManifest) -> Self {
        let man = m.manifest();
        Self {
            version: man.version.clone(),
            version_code: man.version_code,
            manifest_sha256: m.payload_sha256(),
            image_size: man.payload.size,
            image_sha256: man.payload.sha256,
            index_id: man.index.id,
        }
    }
}

/// A signed check response for one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// [`ROLLOUT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The device this is for.
    pub device_id: String,
    /// Echo of the nonce the device sent with its check.
    pub nonce: String,
    /// Coordinator time at signing; the device raises its time floor to it.
    pub server_time: Timestamp,
    /// The response is stale after this.
    pub expires_at: Timestamp,
    /// Product.
    pub product: String,
    /// Channel.
    pub channel: String,
    /// The release to install; `None` means "nothing for you now".
    pub release: Option<AssignedRelease>,
    /// Install without prompting.
    #[serde(default)]
    pub mandatory: bool,
}

impl Assignment {
    /// Signs into an envelope with the coordinator's rollout key(s).
    ///
    /// # Errors
    /// A key fails to sign.
    pub fn sign(&self, keys: &[&SigningKey]) -> Result<Envelope, EnvelopeError> {
        Envelope::sign(ASSIGNMENT_PAYLOAD_TYPE, serde_json::to_vec(self).unwrap_or_default(), keys)
    }
}

/// Why an assignment was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssignmentError {
    /// Signature check failed.
    #[error("check response signature: {0}")]
    Signature(#[from] SignatureError),
    /// Not valid JSON of the right shape.
    #[error("check response payload: {0}")]
    Payload(#[from] JsonError),
    /// A field is out of bounds.
    #[error("check response field `{field}` is invalid")]
    Invalid {
        /// The field.
        field: &'static str,
    },
    /// For another device.
    #[error("check response is for device {actual:?}, not this device ({expected:?})")]
    WrongDevice {
        /// This device.
        expected: String,
        /// In the response.
        actual: String,
    },
    /// The nonce is not the one this device sent: a replayed response.
    #[error("check response does not echo this check's nonce: refused as a replay")]
    NonceMismatch,
    /// Past its expiry.
    #[error("check response expired at {expires_at} (trusted time {now})")]
    Expired {
        /// Expiry.
        expires_at: Timestamp,
        /// Trusted time.
        now: Timestamp,
    },
    /// The assignment and the publisher's manifest disagree.
    #[error("the coordinator's assignment and the publisher's manifest disagree on {field}; not installing")]
    Mismatch {
        /// The first differing field.
        field: &'static str,
    },
}

impl From<EnvelopeError> for AssignmentError {
    fn from(e: EnvelopeError) -> Self {
        Self::Signature(SignatureError::Envelope(e))
    }
}

/// An assignment whose signature met the `rollout` threshold and which is for this device
/// and this check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAssignment(Assignment);

/// Verifies a check response for `device_id` against the nonce this check sent.
///
/// # Errors
/// [`AssignmentError`] naming the problem.
pub fn verify_assignment(
    envelope_json: &[u8],
    root: &TrustRoot,
    device_id: &str,
    nonce: &str,
    now: Timestamp,
) -> Result<VerifiedAssignment, AssignmentError> {
    let env = Envelope::from_json(envelope_json)?;
    let payload = root.verify(&env, Role::Rollout, ASSIGNMENT_PAYLOAD_TYPE)?;
    let a: Assignment = json::from_slice(payload, MAX_ROLLOUT_LEN)?;
    if a.schema_version != ROLLOUT_SCHEMA_VERSION {
        return Err(AssignmentError::Invalid { field: "schema_version" });
    }
    if a.device_id.is_empty() || a.device_id.len() > MAX_DEVICE_ID_LEN {
        return Err(AssignmentError::Invalid { field: "device_id" });
    }
    if a.nonce.len() > MAX_NONCE_LEN {
        return Err(AssignmentError::Invalid { field: "nonce" });
    }
    if !is_valid_name(&a.product) || !is_valid_name(&a.channel) {
        return Err(AssignmentError::Invalid { field: "product/channel" });
    }
    if a.device_id != device_id {
        return Err(AssignmentError::WrongDevice { expected: device_id.to_owned(), actual: a.device_id });
    }
    if a.nonce.is_empty() || a.nonce != nonce {
        return Err(AssignmentError::NonceMismatch);
    }
    let now = now.max(a.server_time);
    if a.expires_at <= now {
        return Err(AssignmentError::Expired { expires_at: a.expires_at, now });
    }
    Ok(VerifiedAssignment(a))
}

impl VerifiedAssignment {
    /// The assignment.
    pub fn assignment(&self) -> &Assignment {
        &self.0
    }

    /// The coordinator-signed time, for the device's time floor.
    pub fn server_time(&self) -> Timestamp {
        self.0.server_time
    }

    /// Checks that this assignment names exactly `manifest`.
    ///
    /// # Errors
    /// [`AssignmentError::Mismatch`] with the first field that differs.
    pub fn check_agreement(&self, manifest: &VerifiedManifest) -> Result<(), AssignmentError> {
        let a = &self.0;
        let m = manifest.manifest();
        let mismatch = |field| Err(AssignmentError::Mismatch { field });
        if a.product != m.product {
            return mismatch("product");
        }
        if a.channel != m.channel {
            return mismatch("channel");
        }
        let Some(r) = &a.release else { return mismatch("release (none assigned)") };
        if r.version_code != m.version_code {
            return mismatch("version_code");
        }
        if r.version != m.version {
            return mismatch("version");
        }
        if r.manifest_sha256 != manifest.payload_sha256() {
            return mismatch("manifest_sha256");
        }
        if r.image_size != m.payload.size {
            return mismatch("image_size");
        }
        if r.image_sha256 != m.payload.sha256 {
            return mismatch("image_sha256");
        }
        if r.index_id != m.index.id {
            return mismatch("index_id");
        }
        Ok(())
    }
}

/// A per-release salt for cohort bucketing (16 bytes, hex).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RolloutSalt([u8; 16]);

impl RolloutSalt {
    /// Wraps salt bytes.
    pub const fn from_bytes(b: [u8; 16]) -> Self {
        Self(b)
    }

    /// A fresh random salt.
    ///
    /// # Errors
    /// The operating system's random source failed.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b)?;
        Ok(Self(b))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for RolloutSalt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RolloutSalt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RolloutSalt({self})")
    }
}

impl FromStr for RolloutSalt {
    type Err = hex::FromHexError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut b = [0u8; 16];
        hex::decode_to_slice(s, &mut b)?;
        Ok(Self(b))
    }
}

impl Serialize for RolloutSalt {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RolloutSalt {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A device's bucket in [0, 10 000): the first 8 bytes of BLAKE3(salt ‖ device id) as a
/// little-endian u64, modulo 10 000.
pub fn cohort_bucket(salt: &RolloutSalt, device_id: &str) -> u16 {
    let mut h = blake3::Hasher::new();
    h.update(salt.as_bytes());
    h.update(device_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    // The remainder is below 10 000, so it fits a u16.
    (u64::from_le_bytes(first) % u64::from(FULL_ROLLOUT)) as u16
}

/// Whether `device_id` is in a rollout at `basis_points` (100 = 1 %): bucket < basis points.
/// A device in at 5 % stays in at 25 %, because its bucket does not change.
pub fn in_rollout(salt: &RolloutSalt, device_id: &str, basis_points: u16) -> bool {
    cohort_bucket(salt, device_id) < basis_points.min(FULL_ROLLOUT)
}

/// A signed rollout directive for sites without a coordinator: which release, at what
/// percentage, with which salt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutDirective {
    /// [`ROLLOUT_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Product.
    pub product: String,
    /// Channel.
    pub channel: String,
    /// The release.
    pub release: AssignedRelease,
    /// Share of devices, in basis points (10 000 = all).
    pub basis_points: u16,
    /// Bucketing salt of this release.
    pub salt: RolloutSalt,
    /// Signing time; supersedes directives issued earlier.
    pub issued_at: Timestamp,
    /// Stale after this.
    pub expires_at: Timestamp,
}

impl RolloutDirective {
    /// Signs into an envelope.
    ///
    /// # Errors
    /// A key fails to sign.
    pub fn sign(&self, keys: &[&SigningKey]) -> Result<Envelope, EnvelopeError> {
        Envelope::sign(DIRECTIVE_PAYLOAD_TYPE, serde_json::to_vec(self).unwrap_or_default(), keys)
    }

    /// Verifies a directive's signature, bounds and expiry.
    ///
    /// # Errors
    /// [`AssignmentError`] naming the problem.
    pub fn verify(envelope_json: &[u8], root: &TrustRoot, now: Timestamp) -> Result<Self, AssignmentError> {
        let env = Envelope::from_json(envelope_json)?;
        let payload = root.verify(&env, Role::Rollout, DIRECTIVE_PAYLOAD_TYPE)?;
        let d: Self = json::from_slice(payload, MAX_ROLLOUT_LEN)?;
        if d.schema_version != ROLLOUT_SCHEMA_VERSION {
            return Err(AssignmentError::Invalid { field: "schema_version" });
        }
        if d.basis_points > FULL_ROLLOUT {
            return Err(AssignmentError::Invalid { field: "basis_points" });
        }
        if d.expires_at <= now {
            return Err(AssignmentError::Expired { expires_at: d.expires_at, now });
        }
        Ok(d)
    }

    /// Checks that this directive names exactly `manifest` (the two-signer rule of offline
    /// sites: the publisher signed the release, the rollout role signed who gets it).
    ///
    /// # Errors
    /// [`AssignmentError::Mismatch`] with the first field that differs.
    pub fn check_agreement(&self, manifest: &VerifiedManifest) -> Result<(), AssignmentError> {
        let m = manifest.manifest();
        let mismatch = |field| Err(AssignmentError::Mismatch { field });
        if self.product != m.product {
            return mismatch("product");
        }
        if self.channel != m.channel {
            return mismatch("channel");
        }
        let want = AssignedRelease::for_manifest(manifest);
        let r = &self.release;
        if r.version_code != want.version_code {
            return mismatch("version_code");
        }
        if r.version != want.version {
            return mismatch("version");
        }
        if r.manifest_sha256 != want.manifest_sha256 {
            return mismatch("manifest_sha256");
        }
        if r.image_size != want.image_size {
            return mismatch("image_size");
        }
        if r.image_sha256 != want.image_sha256 {
            return mismatch("image_sha256");
        }
        if r.index_id != want.index_id {
            return mismatch("index_id");
        }
        Ok(())
    }

    /// Whether `device_id` is in this directive's share of devices ([`in_rollout`]).
    pub fn includes(&self, device_id: &str) -> bool {
        in_rollout(&self.salt, device_id, self.basis_points)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        let salt = RolloutSalt::from_bytes([3; 16]);
        assert_eq!(cohort_bucket(&salt, "dev-1"), cohort_bucket(&salt, "dev-1"));
        let n = 20_000;
        let inside = (0..n).filter(|i| in_rollout(&salt, &format!("device-{i}"), 500)).count();
        // 5 % of 20 000 is 1 000; a fair hash lands well within ±20 %.
        assert!((800..1200).contains(&inside), "{inside}");
        // Monotone: everyone in at 5 % is in at 25 %.
        assert!((0..n).all(|i| {
            let d = format!("device-{i}");
            !in_rollout(&salt, &d, 500) || in_rollout(&salt, &d, 2500)
        }));
        assert!(!in_rollout(&salt, "x", 0));
        assert!(in_rollout(&salt, "x", FULL_ROLLOUT));
    }

    #[test]
    fn a_directive_must_name_the_manifest_it_is_applied_to() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/attacks/valid/");
        let read = |f: &str| std::fs::read(format!("{dir}{f}")).unwrap();
        let root = TrustRoot::from_trusted_json(&read("root.json")).unwrap();
        let now: Timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
        let m = crate::manifest::verify_signed(&read("manifest.json"), &root, now).unwrap();
        let man = m.manifest();
        let mut d = RolloutDirective {
            schema_version: ROLLOUT_SCHEMA_VERSION,
            product: man.product.clone(),
            channel: man.channel.clone(),
            release: AssignedRelease::for_manifest(&m),
            basis_points: 5_000,
            salt: RolloutSalt::from_bytes([7; 16]),
            issued_at: now,
            expires_at: now,
        };
        d.check_agreement(&m).unwrap();
        d.release.image_size += 1;
        assert!(matches!(d.check_agreement(&m), Err(AssignmentError::Mismatch { field: "image_size" })));
        d.release.image_size -= 1;
        d.channel = "beta".into();
        assert!(matches!(d.check_agreement(&m), Err(AssignmentError::Mismatch { field: "channel" })));
        assert_eq!(d.includes("dev-1"), in_rollout(&d.salt, "dev-1", 5_000));
    }
}
