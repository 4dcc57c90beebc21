//! The persisted install state machine:
//! `Idle → Downloading → Staged → Trial → Committed`, with `Failed` and `RolledBack` exits.
//!
//! The journal is one sealed JSON record replaced atomically ([`crate::durable`]) before the
//! agent acts on each transition; the previous generation is kept to fall back to. Download
//! progress lives in its own record ([`Progress`]) so the journal stays small.

use std::path::{Path, PathBuf};

use flotilla_core::ids::{ChunkId, IndexId, Sha256Digest};
use flotilla_core::manifest::{PayloadKind, VerifiedManifest};
use flotilla_core::time::Timestamp;
use serde::{Deserialize, Serialize};

use crate::durable::{self, Sealed};
use crate::events::Event;
use crate::probation::Probation;
use crate::slot::SlotName;

/// Most transitions one target may go through before the agent gives up on it (Mender's
/// bound: a release that keeps crashing the agent must not keep the device busy forever).
pub const MAX_TRANSITIONS: u32 = 28;

/// Journal errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// Reading or writing failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Both generations are damaged: the agent refuses to guess.
    #[error("journal {0} and its previous generation are both damaged; inspect the state directory")]
    Corrupt(PathBuf),
    /// The record is intact but not a journal this build reads.
    #[error("journal {path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

/// Install states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Nothing in progress.
    Idle,
    /// Writing the target slot.
    Downloading,
    /// The target slot is written and verified from the media; the switch is (being) made.
    Staged,
    /// Booted into the target slot, which is on trial.
    Trial,
    /// The target passed its health checks and is the active slot.
    Committed,
    /// The last install failed before the switch; the active slot was never touched.
    Failed,
    /// The last install was rolled back to the previous slot.
    RolledBack,
}

impl State {
    /// Whether a new install may start.
    pub fn is_settled(self) -> bool {
        matches!(self, Self::Idle | Self::Committed | Self::Failed | Self::RolledBack)
    }
}

/// A release as the device records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Human version.
    pub version: String,
    /// version_code.
    pub version_code: u64,
    /// security_version.
    pub security_version: u32,
    /// Raw image or archive.
    pub kind: PayloadKind,
    /// Image size.
    pub image_size: u64,
    /// Image SHA-256.
    pub image_sha256: Sha256Digest,
    /// Chunk index id.
    pub index_id: IndexId,
    /// SHA-256 of the manifest payload (what rollout assignments and the blacklist name).
    pub manifest_sha256: Sha256Digest,
    /// The coordinator's id for it, when it came from a coordinator.
    #[serde(default)]
    pub release_id: Option<i64>,
}

impl Release {
    /// The record of a verified manifest.
    pub fn of(m: &VerifiedManifest, release_id: Option<i64>) -> Self {
        let man = m.manifest();
        Self {
            version: man.version.to_string(),
            version_code: man.version_code,
            security_version: man.security_version,
            kind: man.payload.kind,
            image_size: man.payload.size,
            image_sha256: man.payload.sha256,
            index_id: man.index.id,
            manifest_sha256: m.payload_sha256(),
            release_id,
        }
    }
}

/// Bytes of an install by where they came from (uncompressed chunk bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteSources {
    /// Reused from the active slot.
    pub local: u64,
    /// Fetched from the coordinator or its CDN.
    pub cdn: u64,
    /// Fetched from peers (the mesh, later).
    pub peer: u64,
    /// Read from a local export (USB install).
    pub file: u64,
    /// Patch bytes fetched (from peers or the CDN); the image bytes a patch produced are
    /// not counted elsewhere.
    #[serde(default)]
    pub delta: u64,
}

/// The release being installed into the inactive slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The release.
    pub release: Release,
    /// The slot it goes to.
    pub slot: SlotName,
    /// Boot attempts counted on trial.
    #[serde(default)]
    pub attempts: u32,
    /// Transitions made for this target (bounded by [`MAX_TRANSITIONS`]).
    #[serde(default)]
    pub transitions: u32,
    /// Bytes by source once the slot is written.
    #[serde(default)]
    pub bytes: ByteSources,
    /// The switch to this slot is made (bootloader or pointer).
    #[serde(default)]
    pub activated: bool,
}

/// The whole journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// Generation counter.
    pub seq: u64,
    /// Current state.
    pub state: State,
    /// The committed slot: what boots when nothing is pending.
    pub active: SlotName,
    /// What the active slot holds (None on a device never updated).
    pub installed: Option<Release>,
    /// What the other slot holds while it is still intact (the fallback).
    pub previous: Option<Release>,
    /// The install in progress, or the last one (kept for status after Failed/RolledBack).
    pub target: Option<Target>,
    /// Anti-rollback floor, raised only at commit.
    pub security_floor: u32,
    /// Trusted-time floor: the latest coordinator-signed time seen.
    pub time_floor: Option<Timestamp>,
    /// Manifest payload hashes of releases rolled back on this device: never installed again.
    pub blacklist: Vec<Sha256Digest>,
    /// Why the last install failed or was rolled back.
    pub last_error: Option<String>,
    /// The committed slot's crash-loop probation, while it lasts ([`crate::probation`]).
    #[serde(default)]
    pub probation: Option<Probation>,
    /// Events saved with the state change they report, until they are in the event queue
    /// (a transactional outbox: a power cut between the journal save and the queue write
    /// loses neither). See `Agent::record`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<Event>,
}

impl Default for Journal {
    fn default() -> Self {
        Self {
            seq: 0,
            state: State::Idle,
            active: SlotName::A,
            installed: None,
            previous: None,
            target: None,
            security_floor: 0,
            time_floor: None,
            blacklist: Vec::new(),
            last_error: None,
            probation: None,
            outbox: Vec::new(),
        }
    }
}

impl Journal {
    /// Loads the journal; a device that never wrote one starts [`Journal::default`].
    ///
    /// # Errors
    /// I/O, or both generations damaged.
    pub fn load(path: &Path) -> Result<Self, JournalError> {
        let io = |source| JournalError::Io { path: path.to_path_buf(), source };
        match durable::read_sealed(path).map_err(io)? {
            Sealed::Missing => Ok(Self::default()),
            Sealed::Corrupt => Err(JournalError::Corrupt(path.to_path_buf())),
            Sealed::Found(body) => serde_json::from_slice(&body)
                .map_err(|e| JournalError::Format { path: path.to_path_buf(), message: e.to_string() }),
        }
    }

    /// Writes the journal durably (bumping `seq`): call before acting on the new state.
    ///
    /// # Errors
    /// I/O; the transition must then not be acted on.
    pub fn save(&mut self, path: &Path) -> Result<(), JournalError> {
        self.seq += 1;
        if let Some(t) = &mut self.target {
            t.transitions = t.transitions.saturating_add(1);
        }
        let body = serde_json::to_vec_pretty(self).unwrap_or_default();
        durable::write_atomic(path, &durable::seal(&body))
            .map_err(|source| JournalError::Io { path: path.to_path_buf(), source })
    }

    /// Moves to `state` and saves.
    ///
    /// # Errors
    /// See [`Journal::save`].
    pub fn transition(&mut self, state: State, path: &Path) -> Result<(), JournalError> {
        tracing::info!(from = ?self.state, to = ?state, "state transition");
        self.state = state;
        self.save(path)
    }
}

/// Which chunks of the target slot are durably written and verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The index the bitmap is over.
    pub index_id: IndexId,
    /// The slot being written.
    pub slot: SlotName,
    /// One bit per index entry, hex.
    pub done: String,
    /// Bytes by source so far.
    pub bytes: ByteSources,
}

impl Progress {
    /// An empty bitmap over `entries` chunks.
    pub fn new(index_id: IndexId, slot: SlotName, entries: usize) -> Self {
        Self { index_id, slot, done: hex::encode(vec![0u8; entries.div_ceil(8)]), bytes: ByteSources::default() }
    }

    /// Loads it; `None` when missing, damaged, or for another index or slot.
    pub fn load(path: &Path, index_id: IndexId, slot: SlotName) -> Option<Self> {
        match durable::read_sealed(path) {
            Ok(Sealed::Found(body)) => serde_json::from_slice::<Self>(&body)
                .ok()
                .filter(|p| p.index_id == index_id && p.slot == slot && hex::decode(&p.done).is_ok()),
            _ => None,
        }
    }

    /// The bitmap.
    pub fn bits(&self) -> Vec<u8> {
        hex::decode(&self.done).unwrap_or_default()
    }

    /// Saves it durably. Call only after the slot data it claims has been synced.
    ///
    /// # Errors
    /// I/O.
    pub fn save(&mut self, path: &Path, bits: &[u8]) -> std::io::Result<()> {
        self.done = hex::encode(bits);
        let body = serde_json::to_vec(self).unwrap_or_default();
        durable::write_atomic(path, &durable::seal(&body))?;
        crate::crash::point("progress-saved");
        Ok(())
    }
}

/// A chunk's bit.
pub fn is_done(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Sets a chunk's bit.
pub fn set_done(bits: &mut [u8], i: usize) {
    if let Some(b) = bits.get_mut(i / 8) {
        *b |= 1 << (i % 8);
    }
}

/// A log line per chunk fetched over the network, so tests (and operators) can see that no
/// verified chunk was fetched twice across interruptions.
pub fn log_download(path: &Path, id: &ChunkId, source: &str) {
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{id} {source}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        assert_eq!(Journal::load(&p).unwrap(), Journal::default());
        let mut j = Journal::default();
        j.transition(State::Failed, &p).unwrap();
        j.last_error = Some("x".into());
        j.save(&p).unwrap();
        let back = Journal::load(&p).unwrap();
        assert_eq!(back, j);
        assert_eq!(back.seq, 2);
    }

    #[test]
    fn bitmap() {
        let mut bits = vec![0u8; 2];
        set_done(&mut bits, 9);
        assert!(is_done(&bits, 9) && !is_done(&bits, 8) && !is_done(&bits, 100));
    }
}
