//! Release manifests: what a publisher signs and what a device checks before fetching.
//!
//! The manifest travels as the payload of a DSSE envelope of type
//! [`MANIFEST_PAYLOAD_TYPE`], signed by the trust root's `release` role. Devices call
//! [`verify_for_device`]: signature first, then the strict parse, then every policy check
//! (expiry against trusted time, product, channel, hardware, platform, architecture, version_code strictly greater,
//! security_version floor, minimum agent and native versions). Each rejection has its own
//! [`ManifestError`] variant.

use semver::Version;
use serde::{Deserialize, Serialize};

use crate::chunking::ChunkParams;
use crate::dsse::{Envelope, EnvelopeError};
use crate::ids::{Blake3Digest, IndexId, Sha256Digest};
use crate::index::{ChunkIndex, IndexError, MAX_ENCODED_LEN, MAX_IMAGE_SIZE};
use crate::json::{self, JsonError};
use crate::keys::SigningKey;
use crate::time::Timestamp;
use crate::trust::{Role, SignatureError, TrustRoot};

/// Payload type of manifest envelopes.
pub const MANIFEST_PAYLOAD_TYPE: &str = "application/vnd.flotilla.manifest+json";
/// Manifest schema this build reads and writes.
pub const MANIFEST_SCHEMA_VERSION: u32 = 1;
/// Largest manifest payload accepted (256 KiB).
pub const MAX_MANIFEST_LEN: usize = 256 << 10;
/// Most hardware models one manifest may list.
pub const MAX_HARDWARE: usize = 256;
/// Most platforms or architectures one manifest may list.
pub const MAX_TARGETS: usize = 32;
/// Most deltas one manifest may offer.
pub const MAX_DELTAS: usize = 16;
/// Longest release note.
pub const MAX_NOTES_LEN: usize = 16 << 10;

/// What the image bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// A raw image written to a slot as is.
    Raw,
    /// A deterministic tar of a bundle directory ([`crate::archive`]).
    Archive,
}

/// The whole image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// Raw image or archive.
    pub kind: PayloadKind,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, checked from the media before a switch.
    pub sha256: Sha256Digest,
    /// BLAKE3.
    pub blake3: Blake3Digest,
}

/// A reference to a chunk index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRef {
    /// BLAKE3 of the encoded index.
    pub id: IndexId,
    /// Encoded size in bytes (the download bound).
    pub size: u64,
}

/// How a patch is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeltaMethod {
    /// zstd with the old image as reference prefix and long-distance matching.
    Zstd,
    /// bsdiff.
    Bsdiff,
    /// Per-region patches against the old image's chunks.
    Regions,
    /// A method this build does not know; such deltas are ignored, not errors.
    #[serde(other)]
    Unknown,
}

/// A patch from an earlier release to this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The release the patch starts from.
    pub from_version: Version,
    /// Its version_code.
    pub from_version_code: u64,
    /// SHA-256 of the image the patch applies to; a device checks its slot against it.
    pub from_sha256: Sha256Digest,
    /// Encoding.
    pub method: DeltaMethod,
    /// The patch is itself chunked: its index.
    pub patch_index: IndexRef,
    /// Patch size in bytes.
    pub patch_size: u64,
}

/// Who may install the release.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compatibility {
    /// Hardware models; empty means any.
    #[serde(default)]
    pub hardware: Vec<String>,
    /// Platforms (`linux`, `android`, `ios`, …); empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// CPU architectures as Rust names them (`x86_64`, `aarch64`, `arm`, …); empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    /// Lowest agent version that can install it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_agent_version: Option<Version>,
    /// Lowest native shell (app binary) version that can run the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_native_version: Option<Version>,
}

/// A release manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Product name.
    pub product: String,
    /// Channel name (production, staging, beta, …).
    pub channel: String,
    /// Human version (semver).
    pub version: Version,
    /// Strictly increasing per product and channel; what anti-replay compares.
    pub version_code: u64,
    /// Anti-rollback floor a device raises after committing this release.
    #[serde(default)]
    pub security_version: u32,
    /// The whole image.
    pub payload: Payload,
    /// Chunking parameters.
    pub chunking: ChunkParams,
    /// The chunk index.
    pub index: IndexRef,
    /// Patches offered.
    #[serde(default)]
    pub deltas: Vec<Delta>,
    /// Compatibility.
    #[serde(default)]
    pub compatibility: Compatibility,
    /// The publisher asks devices to install without user prompt.
    #[serde(default)]
    pub mandatory: bool,
    /// When it was signed.
    pub created_at: Timestamp,
    /// After this instant devices refuse it.
    pub expires_at: Timestamp,
    /// Release notes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Signature check failed.
    #[error("manifest signature: {0}")]
    Signature(#[from] SignatureError),
    /// The payload is not valid manifest JSON.
    #[error("manifest payload: {0}")]
    Payload(#[from] JsonError),
    /// A field is out of bounds.
    #[error("manifest field `{field}` is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The trust root is past its expiry.
    #[error("trust root expired at {expired_at} (trusted time {now}); install a re-signed trust root")]
    RootExpired {
        /// Expiry.
        expired_at: Timestamp,
        /// Trusted time.
        now: Timestamp,
    },
    /// The manifest is past its expiry.
    #[error("manifest expired at {expires_at} (trusted time {now}); ask the publisher to re-sign the release")]
    Expired {
        /// Expiry.
        expires_at: Timestamp,
        /// Trusted time.
        now: Timestamp,
    },
    /// For another product.
    #[error("manifest is for product {actual:?}, this device runs {expected:?}")]
    WrongProduct {
        /// The device's product.
        expected: String,
        /// The manifest's.
        actual: String,
    },
    /// For another channel.
    #[error("manifest is for channel {actual:?}, this device follows {expected:?}")]
    WrongChannel {
        /// The device's channel.
        expected: String,
        /// The manifest's.
        actual: String,
    },
    /// Not for this hardware.
    #[error("manifest supports hardware {supported:?}, this device is {device:?}")]
    WrongHardware {
        /// The device's model.
        device: String,
        /// Models the manifest lists.
        supported: Vec<String>,
    },
    /// Not for this platform.
    #[error("manifest supports platforms {supported:?}, this device runs {device:?}")]
    WrongPlatform {
        /// The device's platform.
        device: String,
        /// Platforms the manifest lists.
        supported: Vec<String>,
    },
    /// Not for this CPU architecture.
    #[error("manifest supports architectures {supported:?}, this device is {device:?}")]
    WrongArchitecture {
        /// The device's architecture.
        device: String,
        /// Architectures the manifest lists.
        supported: Vec<String>,
    },
    /// version_code not greater than what is installed: a replay or a rollback.
    #[error(
        "manifest version_code {offered} is not greater than the installed {installed}: refused as a replay or rollback"
    )]
    NotNewer {
        /// Installed.
        installed: u64,
        /// Offered.
        offered: u64,
    },
    /// security_version below the device's floor.
    #[error("manifest security_version {offered} is below the device's floor {floor}")]
    SecurityVersionTooLow {
        /// Device floor.
        floor: u32,
        /// Offered.
        offered: u32,
    },
    /// The agent is too old.
    #[error("release needs agent {required} or newer, this agent is {actual}; update the agent first")]
    AgentTooOld {
        /// Required.
        required: Version,
        /// Running.
        actual: Version,
    },
    /// The native shell is too old for the bundle.
    #[error(
        "release needs native version {required} or newer, this app is {actual}; install the new app build from the store"
    )]
    NativeTooOld {
        /// Required.
        required: Version,
        /// Installed.
        actual: Version,
    },
    /// The index's size is not what the manifest declares.
    #[error("chunk index is {actual} bytes, the manifest declares {expected}")]
    IndexSizeMismatch {
        /// Declared.
        expected: u64,
        /// Received.
        actual: u64,
    },
    /// The index's hash is not what the manifest names.
    #[error("chunk index hashes to {actual}, the manifest names {expected}: wrong or tampered index")]
    IndexMismatch {
        /// Named by the manifest.
        expected: IndexId,
        /// Received.
        actual: IndexId,
    },
    /// The index does not decode.
    #[error("chunk index: {0}")]
    Index(#[from] IndexError),
    /// The index decodes but disagrees with the manifest.
    #[error("chunk index disagrees with the manifest on {what}")]
    IndexDisagrees {
        /// What differs.
        what: &'static str,
    },
}

impl From<EnvelopeError> for ManifestError {
    fn from(e: EnvelopeError) -> Self {
        Self::Signature(SignatureError::Envelope(e))
    }
}

/// Names of products, channels and hardware models: 1–64 of `[A-Za-z0-9._+-]`, starting
/// with a letter or digit (they end up in URLs, paths and database keys).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid { field, reason: reason.into() }
}

impl Manifest {
    /// Checks every field's bounds.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`] naming the field.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.schema_version != MANIFEST_SCHEMA_VERSION {
            return Err(invalid(
                "schema_version",
                format!("{} is not supported (this build reads {MANIFEST_SCHEMA_VERSION})", self.schema_version),
            ));
        }
        if !is_valid_name(&self.product) {
            return Err(invalid("product", "must be 1-64 characters of [A-Za-z0-9._+-]"));
        }
        if !is_valid_name(&self.channel) {
            return Err(invalid("channel", "must be 1-64 characters of [A-Za-z0-9._+-]"));
        }
        if self.version_code == 0 {
            return Err(invalid("version_code", "must be at least 1"));
        }
        self.chunking.validate().map_err(|e| invalid("chunking", e.to_string()))?;
        if self.payload.size > MAX_IMAGE_SIZE {
            return Err(invalid("payload.size", "above the 16 TiB limit"));
        }
        if self.index.size < crate::index::HEADER_LEN as u64 || self.index.size > MAX_ENCODED_LEN {
            return Err(invalid(
                "index.size",
                format!("must be between {} and {MAX_ENCODED_LEN}", crate::index::HEADER_LEN),
            ));
        }
        if self.expires_at <= self.created_at {
            return Err(invalid("expires_at", "must be after created_at"));
        }
        if self.compatibility.hardware.len() > MAX_HARDWARE
            || !self.compatibility.hardware.iter().all(|h| is_valid_name(h))
        {
            return Err(invalid(
                "compatibility.hardware",
                format!("at most {MAX_HARDWARE} names of 1-64 characters of [A-Za-z0-9._+-]"),
            ));
        }
        for (field, list) in [
            ("compatibility.platforms", &self.compatibility.platforms),
            ("compatibility.architectures", &self.compatibility.architectures),
        ] {
            if list.len() > MAX_TARGETS || !list.iter().all(|h| is_valid_name(h)) {
                return Err(invalid(
                    field,
                    format!("at most {MAX_TARGETS} names of 1-64 characters of [A-Za-z0-9._+-]"),
                ));
            }
        }
        if self.deltas.len() > MAX_DELTAS {
            return Err(invalid("deltas", format!("at most {MAX_DELTAS}")));
        }
        if self.deltas.iter().any(|d| d.from_version_code >= self.version_code) {
            return Err(invalid("deltas", "a delta must start from an earlier version_code"));
        }
        if self.notes.as_ref().is_some_and(|n| n.len() > MAX_NOTES_LEN) {
            return Err(invalid("notes", format!("longer than {MAX_NOTES_LEN} bytes")));
        }
        Ok(())
    }

    /// The JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Validates and signs into an envelope.
    ///
    /// # Errors
    /// An invalid field, or a key that fails to sign.
    pub fn sign(&self, keys: &[&SigningKey]) -> Result<Envelope, ManifestError> {
        self.validate()?;
        Ok(Envelope::sign(MANIFEST_PAYLOAD_TYPE, self.to_json(), keys)?)
    }
}

/// What a device knows about itself when it checks a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceContext {
    /// Its product.
    pub product: String,
    /// Its channel.
    pub channel: String,
    /// Its hardware model, if it has one.
    pub hardware: Option<String>,
    /// Its platform (`linux`, `android`, …), if it reports one.
    pub platform: Option<String>,
    /// Its CPU architecture (`x86_64`, `aarch64`, …), if it reports one.
    pub architecture: Option<String>,
    /// version_code of the installed release (None on a fresh device).
    pub installed_version_code: Option<u64>,
    /// Persisted security_version floor.
    pub security_floor: u32,
    /// The running agent's version.
    pub agent_version: Option<Version>,
    /// The native shell's version (apps).
    pub native_version: Option<Version>,
    /// Trusted time ([`crate::time::trusted_now`]).
    pub now: Timestamp,
}

impl DeviceContext {
    /// A context with only product, channel and time set.
    pub fn new(product: impl Into<String>, channel: impl Into<String>, now: Timestamp) -> Self {
        Self {
            product: product.into(),
            channel: channel.into(),
            hardware: None,
            platform: None,
            architecture: None,
            installed_version_code: None,
            security_floor: 0,
            agent_version: None,
            native_version: None,
            now,
        }
    }
}

/// A manifest whose signatures met the `release` threshold and whose fields are valid and
/// unexpired. Only the functions of this module build one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedManifest {
    manifest: Manifest,
    payload_sha256: Sha256Digest,
    envelope_json: Vec<u8>,
}

/// Verifies signature, fields and expiry (what the coordinator checks on publish).
///
/// # Errors
/// [`ManifestError`]: signature problems first, then the parse, then fields and expiry.
pub fn verify_signed(
    envelope_json: &[u8],
    root: &TrustRoot,
    now: Timestamp,
) -> Result<VerifiedManifest, ManifestError> {
    let env = Envelope::from_json(envelope_json)?;
    let payload = root.verify(&env, Role::Release, MANIFEST_PAYLOAD_TYPE)?;
    let manifest: Manifest = json::from_slice(payload, MAX_MANIFEST_LEN)?;
    manifest.validate()?;
    if root.expires_at() <= now {
        return Err(ManifestError::RootExpired { expired_at: root.expires_at(), now });
    }
    if manifest.expires_at <= now {
        return Err(ManifestError::Expired { expires_at: manifest.expires_at, now });
    }
    Ok(VerifiedManifest { manifest, payload_sha256: Sha256Digest::of(payload), envelope_json: envelope_json.to_vec() })
}

/// Everything a device checks before it fetches anything.
///
/// # Errors
/// [`ManifestError`], one variant per rejection.
pub fn verify_for_device(
    envelope_json: &[u8],
    root: &TrustRoot,
    device: &DeviceContext,
) -> Result<VerifiedManifest, ManifestError> {
    let verified = verify_signed(envelope_json, root, device.now)?;
    verified.check_device(device)?;
    Ok(verified)
}

impl VerifiedManifest {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the signed payload bytes: what a rollout assignment names.
    pub fn payload_sha256(&self) -> Sha256Digest {
        self.payload_sha256
    }

    /// The envelope exactly as received.
    pub fn envelope_json(&self) -> &[u8] {
        &self.envelope_json
    }

    /// Checks the manifest against a device.
    ///
    /// # Errors
    /// The first failing check's [`ManifestError`].
    pub fn check_device(&self, device: &DeviceContext) -> Result<(), ManifestError> {
        let m = &self.manifest;
        if m.product != device.product {
            return Err(ManifestError::WrongProduct { expected: device.product.clone(), actual: m.product.clone() });
        }
        if m.channel != device.channel {
            return Err(ManifestError::WrongChannel { expected: device.channel.clone(), actual: m.channel.clone() });
        }
        let hw = &m.compatibility.hardware;
        if !hw.is_empty() {
            let device_hw = device.hardware.clone().unwrap_or_default();
            if !hw.contains(&device_hw) {
                return Err(ManifestError::WrongHardware { device: device_hw, supported: hw.clone() });
            }
        }
        let platforms = &m.compatibility.platforms;
        if !platforms.is_empty() {
            let device_platform = device.platform.clone().unwrap_or_default();
            if !platforms.contains(&device_platform) {
                return Err(ManifestError::WrongPlatform { device: device_platform, supported: platforms.clone() });
            }
        }
        let arches = &m.compatibility.architectures;
        if !arches.is_empty() {
            let device_arch = device.architecture.clone().unwrap_or_default();
            if !arches.contains(&device_arch) {
                return Err(ManifestError::WrongArchitecture { device: device_arch, supported: arches.clone() });
            }
        }
        if let Some(installed) = device.installed_version_code
            && !crate::version::is_upgrade(Some(installed), m.version_code)
        {
            return Err(ManifestError::NotNewer { installed, offered: m.version_code });
        }
        if m.security_version < device.security_floor {
            return Err(ManifestError::SecurityVersionTooLow {
                floor: device.security_floor,
                offered: m.security_version,
            });
        }
        if let (Some(required), Some(actual)) = (&m.compatibility.min_agent_version, &device.agent_version)
            && !crate::version::meets_minimum(actual, required)
        {
            return Err(ManifestError::AgentTooOld { required: required.clone(), actual: actual.clone() });
        }
        if let (Some(required), Some(actual)) = (&m.compatibility.min_native_version, &device.native_version)
            && !crate::version::meets_minimum(actual, required)
        {
            return Err(ManifestError::NativeTooOld { required: required.clone(), actual: actual.clone() });
        }
        Ok(())
    }

    /// Checks downloaded index bytes against the manifest and decodes them.
    ///
    /// # Errors
    /// Size or hash mismatch, an undecodable index, or one that disagrees with the manifest.
    pub fn check_index(&self, bytes: &[u8]) -> Result<ChunkIndex, ManifestError> {
        let m = &self.manifest;
        if bytes.len() as u64 != m.index.size {
            return Err(ManifestError::IndexSizeMismatch { expected: m.index.size, actual: bytes.len() as u64 });
        }
        let actual = IndexId::of(bytes);
        if actual != m.index.id {
            return Err(ManifestError::IndexMismatch { expected: m.index.id, actual });
        }
        let index = ChunkIndex::decode(bytes)?;
        if index.params() != m.chunking {
            return Err(ManifestError::IndexDisagrees { what: "chunking parameters" });
        }
        if index.image_size() != m.payload.size {
            return Err(ManifestError::IndexDisagrees { what: "image size" });
        }
        Ok(index)
    }
}
