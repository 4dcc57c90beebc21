//! Installing from a binary patch: plan, check the base, fetch the patch, apply it streaming.
//!
//! After the chunks the target slot and the active slot already hold are placed
//! ([`crate::install`]), the chunks still missing are compared in bytes with each patch the
//! manifest offers from the release the active slot holds. A patch is used when it costs fewer
//! bytes to fetch (its chunks already kept from an interrupted run count as free):
//!
//! 1. **Base check, not assumed.** The journal says which release the active slot holds, but
//!    the slot is hashed (SHA-256 from the media) before a byte of the patch is fetched: a
//!    slot modified since its install falls back to chunks, and the reason goes out as an
//!    event. The hash costs one sequential read of the active slot, paid only when a patch is
//!    the cheaper plan; no verification recorded at commit is trusted, since the slot may have
//!    been written since.
//! 2. **Fetch.** The patch is chunked and content-addressed like an image: its index comes from
//!    `/v1/indexes/{id}` (bounded by the size the signed manifest declares, checked against its
//!    id), its chunks through the same source as content chunks (peers first when the mesh
//!    runs, then the CDN), each verified before it is written into `<state>/patch.bin`. The
//!    record `<state>/patch.progress` claims chunks only after the file is synced, so a kill
//!    during the download never refetches a verified patch chunk. The patch file is served to
//!    peers as it arrives.
//! 3. **Apply.** The patch is streamed through `flotilla_core::delta::apply` with the active
//!    slot as the old image; the output is cut at the new index's chunk boundaries, each chunk's
//!    BLAKE3 id checked before it is written at its offset in the target slot, and the slot's
//!    progress record claims chunks only after the slot is synced. Memory stays within the
//!    codec's window plus one chunk. A kill during application restarts the apply from the
//!    start of the patch on the next run; chunks already verified in the slot are not written
//!    again. The whole image's SHA-256 is then checked from the media as for any install.
//!
//! A patch that cannot be used (a base mismatch, a patch chunk that fails verification or
//! cannot be fetched, a patch that fails to apply or produces a chunk that does not verify)
//! is recorded as failed for this install and the remaining chunks are fetched instead; the
//! event's detail says why. Patch bytes fetched count as `delta` in the bytes by source.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_core::delta as codec;
use flotilla_core::ids::{ChunkId, IndexId, Sha256Digest};
use flotilla_core::index::ChunkIndex;
use flotilla_core::manifest::{Delta, DeltaMethod, VerifiedManifest};
use serde::{Deserialize, Serialize};

use crate::crash;

mod apply;
use crate::durable::{self, Sealed};
use crate::events::{EventKind, EventQueue};
use crate::install::{ChunkSource, WriteError};
use crate::journal::{self, ByteSources, Progress, Release};
use crate::slot::{SlotName, Slots};
use apply::apply;

/// Sync the patch file and record progress at least this often while it downloads.
const FETCH_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);

/// What an install needs to consider patches: the offers and what the active slot holds.
#[derive(Debug, Clone)]
pub struct DeltaPlan {
    /// Patches the verified manifest offers.
    pub deltas: Vec<Delta>,
    /// The release the journal says the active slot holds.
    pub installed: Option<Release>,
    /// The active slot (the patch's old image).
    pub active: SlotName,
    /// The state directory (`patch.bin`, `patch.progress`).
    pub state_dir: PathBuf,
    /// Where fallback reasons are reported.
    pub events: EventQueue,
    /// The release being installed (release id, version_code), for the events.
    pub release: (Option<i64>, Option<u64>),
}

impl DeltaPlan {
    /// The plan for installing `m` over what the active slot holds.
    pub fn new(
        m: &VerifiedManifest,
        installed: Option<Release>,
        active: SlotName,
        state_dir: &Path,
        events: EventQueue,
        release_id: Option<i64>,
    ) -> Self {
        let man = m.manifest();
        Self {
            deltas: man.deltas.clone(),
            installed,
            active,
            state_dir: state_dir.to_path_buf(),
            events,
            release: (release_id, Some(man.version_code)),
        }
    }

    fn patch_path(&self) -> PathBuf {
        self.state_dir.join("patch.bin")
    }

    fn record_path(&self) -> PathBuf {
        self.state_dir.join("patch.progress")
    }

    /// Removes the patch file and its record (the install is done with them).
    pub fn clean(state_dir: &Path) {
        for name in ["patch.bin", "patch.progress"] {
            let p = state_dir.join(name);
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_file(durable::previous_of(&p));
        }
    }

    /// Reports why a patch was not used. The event carries no bytes: the coordinator sums
    /// bytes over events, and the install's final event reports them all.
    fn note(&self, detail: String) {
        tracing::warn!(reason = %detail, "patch not used; fetching chunks");
        if let Err(e) = self.events.push(EventKind::Downloading, self.release, ByteSources::default(), Some(detail)) {
            tracing::error!(error = %e, "cannot queue an event");
        }
    }
}

/// The download of one patch for one install, kept across interruptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PatchRecord {
    /// The index of the image being installed.
    target_index: IndexId,
    /// The patch's index.
    patch_index: IndexId,
    /// One bit per patch index entry: verified in `patch.bin` and synced.
    done: String,
    /// Patch bytes fetched so far, over every run of this install.
    fetched: u64,
    /// Why the patch was given up for this install, if it was.
    failed: Option<String>,
}

impl PatchRecord {
    fn load(path: &Path, target_index: IndexId) -> Option<Self> {
        match durable::read_sealed(path) {
            Ok(Sealed::Found(body)) => serde_json::from_slice::<Self>(&body)
                .ok()
                .filter(|r| r.target_index == target_index && hex::decode(&r.done).is_ok()),
            _ => None,
        }
    }

    fn save(&mut self, path: &Path, bits: &[u8]) -> std::io::Result<()> {
        self.done = hex::encode(bits);
        let body = serde_json::to_vec(self).unwrap_or_default();
        durable::write_atomic(path, &durable::seal(&body))
    }
}

/// The target slot's state that a patch install advances.
#[derive(Debug)]
pub(crate) struct SlotState<'a> {
    /// The target slot's file.
    pub(crate) file: &'a Arc<File>,
    /// The slot.
    pub(crate) slot: SlotName,
    /// The slot's progress record.
    pub(crate) progress: &'a mut Progress,
    /// Done bits over the new index.
    pub(crate) bits: &'a mut Vec<u8>,
    /// Where the progress record lives.
    pub(crate) progress_path: &'a Path,
}

/// How patch chunks are fetched.
#[derive(Debug, Clone)]
pub(crate) struct Fetching {
    /// Content source (peers first, then the CDN).
    pub(crate) source: ChunkSource,
    /// Download log (one line per chunk fetched).
    pub(crate) downloads_log: PathBuf,
    /// Requests in flight.
    pub(crate) parallel: usize,
    /// Attempts per chunk.
    pub(crate) attempts: u32,
    /// Bandwidth cap, bytes per second (the same as for content chunks).
    pub(crate) max_rate: Option<u64>,
}

/// Why a patch was not used; the text goes into the event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PatchError {
    /// The active slot does not hold the patch's base image.
    #[error(
        "the active slot {slot} does not hold the patch's base image (it hashes to {actual}, the patch from \
         version_code {from} applies to {expected})"
    )]
    BaseMismatch {
        /// The active slot.
        slot: SlotName,
        /// The base the patch needs.
        expected: Sha256Digest,
        /// What the slot holds.
        actual: Sha256Digest,
        /// The base's version_code.
        from: u64,
    },
    /// The active slot could not be read.
    #[error("reading the active slot {slot}: {source}")]
    ActiveSlot {
        /// The slot.
        slot: SlotName,
        /// The cause.
        source: std::io::Error,
    },
    /// The patch index was refused or could not be fetched.
    #[error("patch index {id}: {reason}")]
    Index {
        /// The index id.
        id: IndexId,
        /// What was wrong.
        reason: String,
    },
    /// A patch chunk could not be fetched or failed verification.
    #[error("fetching the patch: {0}")]
    Fetch(WriteError),
    /// The codec refused the patch.
    #[error("applying the patch: {0}")]
    Apply(codec::DeltaError),
    /// The patch produced a chunk that does not match the new index.
    #[error("the patch produced chunk {entry} hashing to {actual}, the index says {expected}")]
    ChunkMismatch {
        /// Index entry number.
        entry: usize,
        /// The index's id.
        expected: ChunkId,
        /// What the patch produced.
        actual: ChunkId,
    },
    /// The patch produced more or fewer bytes than the image.
    #[error("the patch produced {produced} bytes, the image has {size}")]
    Length {
        /// Bytes produced.
        produced: u64,
        /// Image size.
        size: u64,
    },
}

/// The patch to use, if any: known method, from the installed release (version_code and
/// image SHA-256 as the journal records them), not given up on for this install, and cheaper
/// than `chunk_bytes` (patch bytes already held count as free). The cheapest wins.
fn choose(plan: &DeltaPlan, target_index: IndexId, chunk_bytes: u64) -> Option<Delta> {
    let installed = plan.installed.as_ref()?;
    let record = PatchRecord::load(&plan.record_path(), target_index);
    let mut best: Option<(&Delta, u64)> = None;
    for d in &plan.deltas {
        if d.method == DeltaMethod::Unknown
            || d.from_version_code != installed.version_code
            || d.from_sha256 != installed.image_sha256
        {
            continue;
        }
        let earlier = record.as_ref().filter(|r| r.patch_index == d.patch_index.id);
        if let Some(why) = earlier.and_then(|r| r.failed.as_ref()) {
            tracing::info!(reason = %why, "patch given up earlier in this install");
            continue;
        }
        let cost = d.patch_size.saturating_sub(earlier.map_or(0, |r| r.fetched));
        if best.is_none_or(|(_, c)| cost < c) {
            best = Some((d, cost));
        }
    }
    let (d, cost) = best?;
    if cost >= chunk_bytes {
        tracing::info!(patch = cost, chunks = chunk_bytes, from = d.from_version_code, "chunks are cheaper");
        return None;
    }
    Some(d.clone())
}

/// Tries to complete the target slot from a patch; on any patch problem reports why and
/// leaves the rest to the chunk fetch. Patch bytes fetched go into `slot.progress.bytes.delta`.
///
/// # Errors
/// Target-slot I/O (what would fail a chunk install too), or a network outage (the install
/// resumes at the next check); patch problems fall back to chunks instead.
pub(crate) async fn install_from_patch(
    plan: &DeltaPlan,
    slots: &Slots,
    index: &ChunkIndex,
    chunk_bytes: u64,
    fetching: &Fetching,
    mut slot: SlotState<'_>,
) -> Result<(), WriteError> {
    if matches!(fetching.source, ChunkSource::Export(_)) {
        return Ok(()); // an export carries every chunk; patches save network bytes only
    }
    let Some(installed) = plan.installed.clone() else { return Ok(()) };
    let Some(delta) = choose(plan, index.id(), chunk_bytes) else { return Ok(()) };
    tracing::info!(
        from = delta.from_version_code,
        method = ?delta.method,
        patch = delta.patch_size,
        chunks = chunk_bytes,
        "installing from a patch"
    );
    let mut record = PatchRecord::load(&plan.record_path(), index.id())
        .filter(|r| r.patch_index == delta.patch_index.id)
        .unwrap_or_else(|| PatchRecord {
            target_index: index.id(),
            patch_index: delta.patch_index.id,
            done: String::new(),
            fetched: 0,
            failed: None,
        });
    let result = run(plan, slots, index, &delta, &installed, fetching, &mut record, &mut slot).await;
    slot.progress.bytes.delta = record.fetched;
    let keep = |record: &mut PatchRecord| {
        let bits = hex::decode(&record.done).unwrap_or_default();
        if let Err(e) = record.save(&plan.record_path(), &bits) {
            tracing::warn!(error = %e, "cannot record the patch's state");
        }
    };
    let why = |e: &PatchError| {
        format!(
            "patch from version {} (version_code {}) not used: {e}; fetching the missing chunks instead",
            delta.from_version, delta.from_version_code
        )
    };
    match result {
        Ok(()) => {
            DeltaPlan::clean(&plan.state_dir);
            Ok(())
        }
        Err(Outcome::Slot(e)) => {
            keep(&mut record);
            Err(e)
        }
        Err(Outcome::Skip(e)) => {
            // Not the patch's fault (the index could not be fetched): tried again next time.
            keep(&mut record);
            plan.note(why(&e));
            Ok(())
        }
        Err(Outcome::Patch(e)) => {
            record.failed = Some(e.to_string());
            keep(&mut record);
            // What the patch verified and wrote stays claimed (synced first).
            plan.note(why(&e));
            Ok(())
        }
    }
}

/// How a patch attempt ended, when it did not complete the slot.
enum Outcome {
    /// The target slot failed, or the network is away: the install stops here as it would
    /// for chunks (and resumes at the next check when the cause is transient).
    Slot(WriteError),
    /// The patch could not be tried this time; the next run may try it again.
    Skip(PatchError),
    /// The patch cannot be used: given up for this install.
    Patch(PatchError),
}

#[allow(clippy::too_many_arguments)]
async fn run(
    plan: &DeltaPlan,
    slots: &Slots,
    index: &ChunkIndex,
    delta: &Delta,
    installed: &Release,
    fetching: &Fetching,
    record: &mut PatchRecord,
    slot: &mut SlotState<'_>,
) -> Result<(), Outcome> {
    // 1. The base: the active slot must hold the patch's from-image, checked from the media.
    let (s, active, size) = (slots.clone(), plan.active, installed.image_size);
    let actual = tokio::task::spawn_blocking(move || s.hash_image(active, size))
        .await
        .map_err(|e| Outcome::Slot(WriteError::Task(e.to_string())))?
        .map_err(|e| {
            let source = match e {
                crate::slot::SlotError::Io { source, .. } => source,
                other => std::io::Error::other(other.to_string()),
            };
            Outcome::Patch(PatchError::ActiveSlot { slot: active, source })
        })?;
    if actual != delta.from_sha256 {
        return Err(Outcome::Patch(PatchError::BaseMismatch {
            slot: active,
            expected: delta.from_sha256,
            actual,
            from: delta.from_version_code,
        }));
    }

    // 2. The patch's index and chunks.
    let patch_index = fetch_index(fetching, delta).await?;
    // The patch file lives in the state directory: no room there for it means chunks instead.
    let patch_io = |source| Outcome::Patch(PatchError::Fetch(WriteError::Io { slot: slot.slot, source }));
    let patch_file = Arc::new(open_patch_file(&plan.patch_path(), delta.patch_size).map_err(patch_io)?);
    if let ChunkSource::Peer(p) = &fetching.source {
        p.serve_file(plan.patch_path(), &patch_index);
    }
    fetch_patch(plan, fetching, &patch_index, &patch_file, record, slot.slot).await?;

    // 3. Apply, streaming, into the target slot.
    slot.progress.bytes.delta = record.fetched;
    apply(slots, plan.active, installed.image_size, index, patch_file, slot).await
}

async fn fetch_index(fetching: &Fetching, delta: &Delta) -> Result<ChunkIndex, Outcome> {
    let id = delta.patch_index.id;
    let refuse = |reason: String| Outcome::Patch(PatchError::Index { id, reason });
    let Some(c) = fetching.source.coordinator() else { return Err(refuse("no coordinator to fetch it from".into())) };
    let bytes = match c.get_bounded(&format!("/v1/indexes/{id}"), delta.patch_index.size).await {
        Ok(b) => b,
        Err(e) if e.is_transient() => return Err(Outcome::Skip(PatchError::Index { id, reason: e.to_string() })),
        Err(e) => return Err(refuse(e.to_string())),
    };
    if bytes.len() as u64 != delta.patch_index.size {
        return Err(refuse(format!("{} bytes, the manifest says {}", bytes.len(), delta.patch_index.size)));
    }
    let actual = IndexId::of(&bytes);
    if actual != id {
        return Err(refuse(format!("hashes to {actual}")));
    }
    let index = ChunkIndex::decode(&bytes).map_err(|e| refuse(e.to_string()))?;
    if index.image_size() != delta.patch_size {
        return Err(refuse(format!(
            "describes {} bytes, the manifest says the patch has {}",
            index.image_size(),
            delta.patch_size
        )));
    }
    Ok(index)
}

fn open_patch_file(path: &Path, size: u64) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    if f.metadata()?.len() != size {
        f.set_len(size)?;
    }
    Ok(f)
}

/// Fetches the patch chunks `record` does not hold yet into the patch file, verified, with
/// the record claiming them only after a sync.
async fn fetch_patch(
    plan: &DeltaPlan,
    fetching: &Fetching,
    patch_index: &ChunkIndex,
    patch_file: &Arc<File>,
    record: &mut PatchRecord,
    target: SlotName,
) -> Result<(), Outcome> {
    let mut bits = hex::decode(&record.done).unwrap_or_default();
    if bits.len() != patch_index.len().div_ceil(8) {
        bits = vec![0u8; patch_index.len().div_ceil(8)];
        record.fetched = 0;
    }
    // Chunks an interrupted run wrote after its last checkpoint are found in place (hashed),
    // so no verified patch chunk is fetched twice.
    let (f, entries, claimed) = (patch_file.clone(), patch_index.entries().to_vec(), bits.clone());
    let found = tokio::task::spawn_blocking(move || {
        let (mut found, mut buf, mut offset) = (Vec::new(), Vec::new(), 0u64);
        for (i, e) in entries.iter().enumerate() {
            if !journal::is_done(&claimed, i) {
                buf.resize(e.len as usize, 0);
                if f.read_exact_at(&mut buf, offset).is_ok() && ChunkId::of(&buf) == e.id {
                    found.push((i, e.len));
                }
            }
            offset += u64::from(e.len);
        }
        found
    })
    .await
    .map_err(|e| Outcome::Slot(WriteError::Task(e.to_string())))?;
    for (i, len) in found {
        journal::set_done(&mut bits, i);
        record.fetched += u64::from(len);
    }
    // Distinct patch chunks still needed, with every place each goes.
    let mut order: Vec<(ChunkId, u32, Vec<(usize, u64)>)> = Vec::new();
    let mut at: std::collections::HashMap<ChunkId, usize> = std::collections::HashMap::new();
    for (i, (offset, e)) in patch_index.iter_with_offsets().enumerate() {
        if journal::is_done(&bits, i) {
            continue;
        }
        let k = *at.entry(e.id).or_insert_with(|| {
            order.push((e.id, e.len, Vec::new()));
            order.len() - 1
        });
        order[k].2.push((i, offset));
    }
    let record_path = plan.record_path();
    let slot_io = |source| Outcome::Slot(WriteError::Io { slot: target, source });
    record.save(&record_path, &bits).map_err(slot_io)?;
    let phases = Arc::new(crate::install::Phases::default());
    let cap = fetching.max_rate.map(|rate| Arc::new(crate::install::RateCap::new(rate)));
    let sem = Arc::new(tokio::sync::Semaphore::new(fetching.parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut pending = order.into_iter();
    let mut failure: Option<WriteError> = None;
    let mut last = Instant::now();
    let size = patch_index.image_size();
    loop {
        while failure.is_none() && tasks.len() < fetching.parallel.max(1) * 2 {
            let Some((id, len, places)) = pending.next() else { break };
            let (f, source, sem, phases, log) = (
                patch_file.clone(),
                fetching.source.clone(),
                sem.clone(),
                phases.clone(),
                fetching.downloads_log.clone(),
            );
            let (attempts, cap) = (fetching.attempts, cap.clone());
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await.map_err(|e| WriteError::Task(e.to_string()))?;
                if let Some(cap) = &cap {
                    cap.take(u64::from(len)).await;
                }
                let places =
                    crate::install::fetch_and_write(&source, &id, len, attempts, (&f, target, size, places), &phases)
                        .await?;
                let _ = source.label_for(&id);
                journal::log_download(&log, &id, "delta");
                crash::point("patch-chunk-fetched");
                Ok::<_, WriteError>((len, places))
            });
        }
        let Some(joined) = tasks.join_next().await else { break };
        match joined.map_err(|e| WriteError::Task(e.to_string())).and_then(|r| r) {
            Ok((len, places)) => {
                for (i, _) in &places {
                    journal::set_done(&mut bits, *i);
                }
                record.fetched += u64::from(len);
                if last.elapsed() >= FETCH_CHECKPOINT_INTERVAL {
                    checkpoint_patch(patch_file, record, &record_path, &bits).await.map_err(slot_io)?;
                    last = Instant::now();
                }
            }
            Err(e) => {
                if failure.is_none() {
                    failure = Some(e);
                }
            }
        }
    }
    checkpoint_patch(patch_file, record, &record_path, &bits).await.map_err(slot_io)?;
    match failure {
        None => Ok(()),
        Some(e) if e.is_transient() => Err(Outcome::Slot(e)),
        Some(e @ WriteError::Task(_)) => Err(Outcome::Slot(e)),
        Some(e) => Err(Outcome::Patch(PatchError::Fetch(e))),
    }
}

async fn checkpoint_patch(file: &Arc<File>, record: &mut PatchRecord, path: &Path, bits: &[u8]) -> std::io::Result<()> {
    let (f, mut r, p, b) = (file.clone(), record.clone(), path.to_path_buf(), bits.to_vec());
    let saved = tokio::task::spawn_blocking(move || -> std::io::Result<PatchRecord> {
        f.sync_data()?;
        r.save(&p, &b)?;
        Ok(r)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))??;
    *record = saved;
    Ok(())
}

#[cfg(test)]
mod tests {
    use flotilla_core::chunking::{ChunkParams, Chunker};

    use super::*;

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 29) as u8
            })
            .collect()
    }

    fn index_of(data: &[u8]) -> ChunkIndex {
        Chunker::new(ChunkParams::BUNDLE).chunk_reader(data).unwrap().index
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        slots: Slots,
        new: Vec<u8>,
        index: ChunkIndex,
        patch: Arc<File>,
        progress_path: PathBuf,
    }

    /// Slot A holds `old_in_slot`; the patch goes from `old` to an edited copy.
    fn fixture(old: &[u8], old_in_slot: &[u8]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::File { a: dir.path().join("a.img"), b: dir.path().join("b.img") };
        std::fs::write(dir.path().join("a.img"), old_in_slot).unwrap();
        let mut new = old.to_vec();
        for k in 0..20 {
            let at = (k * 7919 * 131 + 999) % (new.len() - 8);
            new[at..at + 4].copy_from_slice(b"EDIT");
        }
        let index = index_of(&new);
        let mut patch = Vec::new();
        codec::encode(
            &old.to_vec(),
            &index_of(old),
            &new,
            &index,
            &codec::EncodeOptions::default(),
            &mut patch,
            &mut |_, _| {},
        )
        .unwrap();
        let patch_path = dir.path().join("patch.bin");
        std::fs::write(&patch_path, &patch).unwrap();
        let patch = Arc::new(File::open(&patch_path).unwrap());
        let progress_path = dir.path().join("progress");
        Fixture { _dir: dir, slots, new, index, patch, progress_path }
    }

    async fn run_apply(f: &Fixture, bits: &mut Vec<u8>) -> (Result<(), Outcome>, Progress) {
        let file = Arc::new(f.slots.open_for_write(SlotName::B, f.index.image_size()).unwrap());
        let mut progress = Progress::new(f.index.id(), SlotName::B, f.index.len());
        let mut state = SlotState {
            file: &file,
            slot: SlotName::B,
            progress: &mut progress,
            bits,
            progress_path: &f.progress_path,
        };
        let len = f.slots.open_for_read(SlotName::A).unwrap().metadata().unwrap().len();
        let r = apply(&f.slots, SlotName::A, len, &f.index, f.patch.clone(), &mut state).await;
        (r, progress)
    }

    #[tokio::test]
    async fn applies_into_the_slot_and_claims_every_chunk() {
        let old = noise(1, 600_000);
        let f = fixture(&old, &old);
        let mut bits = vec![0u8; f.index.len().div_ceil(8)];
        let (r, progress) = run_apply(&f, &mut bits).await;
        assert!(r.is_ok());
        assert_eq!(std::fs::read(f.slots.image_path(SlotName::B)).unwrap(), f.new);
        assert!((0..f.index.len()).all(|i| journal::is_done(&bits, i)));
        assert_eq!(Progress::load(&f.progress_path, f.index.id(), SlotName::B).unwrap().done, progress.done);
    }

    #[tokio::test]
    async fn a_wrong_base_of_the_same_size_stops_at_the_first_bad_chunk() {
        let old = noise(2, 600_000);
        let mut damaged = old.clone();
        for b in &mut damaged[300_000..310_000] {
            *b ^= 0x5a;
        }
        let f = fixture(&old, &damaged);
        let mut bits = vec![0u8; f.index.len().div_ceil(8)];
        let (r, _) = run_apply(&f, &mut bits).await;
        let Err(Outcome::Patch(PatchError::ChunkMismatch { entry, .. })) = r else {
            panic!("expected a chunk mismatch")
        };
        // Chunks before the bad one were verified, written, synced and claimed; none after.
        let claimed: Vec<usize> = (0..f.index.len()).filter(|i| journal::is_done(&bits, *i)).collect();
        assert_eq!(claimed, (0..entry).collect::<Vec<_>>());
        let slot = std::fs::read(f.slots.image_path(SlotName::B)).unwrap();
        for (i, (offset, e)) in f.index.iter_with_offsets().enumerate().take(entry) {
            assert_eq!(ChunkId::of(&slot[offset as usize..][..e.len as usize]), e.id, "chunk {i}");
        }
    }

    #[tokio::test]
    async fn a_truncated_patch_is_refused_and_done_chunks_are_not_rewritten() {
        let old = noise(3, 600_000);
        let f = fixture(&old, &old);
        // Chunk 0 is already claimed: the apply must not write it (the slot keeps zeros).
        let mut bits = vec![0u8; f.index.len().div_ceil(8)];
        journal::set_done(&mut bits, 0);
        let (r, _) = run_apply(&f, &mut bits).await;
        assert!(r.is_ok());
        let slot = std::fs::read(f.slots.image_path(SlotName::B)).unwrap();
        let first = f.index.entries()[0].len as usize;
        assert!(slot[..first].iter().all(|b| *b == 0), "a claimed chunk is not written again");
        assert_eq!(slot[first..], f.new[first..]);

        let g = fixture(&old, &old);
        let full = std::fs::read(g._dir.path().join("patch.bin")).unwrap();
        let short = g._dir.path().join("short.bin");
        std::fs::write(&short, &full[..full.len() / 2]).unwrap();
        let g = Fixture { patch: Arc::new(File::open(&short).unwrap()), ..g };
        let mut bits = vec![0u8; g.index.len().div_ceil(8)];
        let (r, _) = run_apply(&g, &mut bits).await;
        assert!(matches!(r, Err(Outcome::Patch(PatchError::Apply(_)))), "a truncated patch is refused");
    }

    #[test]
    fn the_cheapest_matching_patch_is_chosen_only_when_it_beats_chunks() {
        use flotilla_core::manifest::IndexRef;
        let dir = tempfile::tempdir().unwrap();
        let sha = Sha256Digest::of(b"v1");
        let installed = Release {
            version: "1.0.0".into(),
            version_code: 1,
            security_version: 0,
            kind: flotilla_core::manifest::PayloadKind::Raw,
            image_size: 2,
            image_sha256: sha,
            index_id: IndexId::of(b"i1"),
            manifest_sha256: Sha256Digest::of(b"m1"),
            release_id: None,
        };
        let delta = |code: u64, base: Sha256Digest, size: u64, method: DeltaMethod, tag: &[u8]| Delta {
            from_version: "1.0.0".parse().unwrap(),
            from_version_code: code,
            from_sha256: base,
            method,
            patch_index: IndexRef { id: IndexId::of(tag), size: 10 },
            patch_size: size,
        };
        let plan = DeltaPlan {
            deltas: vec![
                delta(1, sha, 500, DeltaMethod::Zstd, b"a"),
                delta(1, sha, 300, DeltaMethod::Bsdiff, b"b"),
                delta(1, sha, 10, DeltaMethod::Unknown, b"c"),
                delta(1, Sha256Digest::of(b"other"), 10, DeltaMethod::Zstd, b"d"),
                delta(0, sha, 10, DeltaMethod::Zstd, b"e"),
            ],
            installed: Some(installed),
            active: SlotName::A,
            state_dir: dir.path().to_path_buf(),
            events: EventQueue::new(&dir.path().join("events")),
            release: (None, Some(2)),
        };
        let target = IndexId::of(b"target");
        assert_eq!(choose(&plan, target, 1000).map(|d| d.patch_size), Some(300));
        assert_eq!(choose(&plan, target, 300).map(|d| d.patch_size), None, "not cheaper than chunks");
        // A patch given up earlier in this install is not tried again.
        let mut rec = PatchRecord {
            target_index: target,
            patch_index: IndexId::of(b"b"),
            done: String::new(),
            fetched: 0,
            failed: Some("bad".into()),
        };
        rec.save(&plan.record_path(), &[]).unwrap();
        assert_eq!(choose(&plan, target, 1000).map(|d| d.patch_size), Some(500));
        // Bytes already held make a patch cheaper.
        rec.patch_index = IndexId::of(b"a");
        rec.failed = None;
        rec.fetched = 450;
        rec.save(&plan.record_path(), &[]).unwrap();
        assert_eq!(choose(&plan, target, 100).map(|d| d.patch_size), Some(500));
        let none = DeltaPlan { installed: None, ..plan };
        assert!(choose(&none, target, 1000).is_none());
    }
}
