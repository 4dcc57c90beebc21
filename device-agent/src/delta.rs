//! Installing from a binary patch: check the base, read the patch's region table, plan per
//! region, fetch the patch chunks the plan needs, apply those regions streaming.
//!
//! After the chunks the target slot and the active slot already hold are placed
//! ([`crate::install`]), each patch the manifest offers from the release the active slot holds
//! is priced whole against the chunks still missing; the cheapest is planned with when it beats
//! the chunks, or when its region table is cheap next to them (a mix may still win):
//!
//! 1. **Base check, not assumed.** The journal says which release the active slot holds, but
//!    the slot is hashed (SHA-256 from the media) before a byte of the patch is fetched: a
//!    slot modified since its install falls back to chunks, and the reason goes out as an
//!    event. The hash costs one sequential read of the active slot, paid only when a patch is
//!    worth planning with; no verification recorded at commit is trusted, since the slot may
//!    have been written since.
//! 2. **Table.** The patch is chunked and content-addressed like an image: its index comes
//!    from `/v1/indexes/{id}` (bounded by the size the signed manifest declares, checked
//!    against its id), its chunks through the same source as content chunks (peers first when
//!    the mesh runs, then the CDN), each verified before it is written into
//!    `<state>/patch.bin`. The chunks holding the header and region table come first
//!    (`fetch`); the table must describe the two images and end where the patch ends.
//! 3. **Plan** (`plan`). Per group of regions (regions whose output starts and ends on the
//!    new index's chunk boundaries; one region for the encoder's patches): the patch chunks
//!    its payload needs that are not held (and the patch's shared stream, when some of its
//!    regions take their records from it), against its chunks still missing from the target
//!    slot. Shared chunks are paid once on either side; the cheapest mix found wins, never
//!    dearer than the whole patch or the chunks alone. The plan goes out as an event (regions
//!    from the patch, from chunks, already held; bytes of each plan).
//! 4. **Fetch and apply** (`apply`). Only the chosen regions' patch chunks are fetched; the
//!    record `<state>/patch.progress` claims them only after the file is synced, so a kill
//!    during the download never refetches a verified patch chunk. The chosen regions are
//!    applied one by one with `flotilla_core::delta::RegionApplier` (the shared stream loaded
//!    first, once, when a chosen region needs it), the active slot as the old image; the output is cut at the new index's chunk boundaries, each chunk's BLAKE3 id
//!    checked before it is written at every place it is still missing in the target slot, and
//!    the slot's progress record claims chunks only after the slot is synced. Chunks already
//!    in the slot are never written again. Memory stays within the codec's window plus one
//!    chunk. A kill during application plans again on the next run (held patch chunks free,
//!    written chunks done) and applies what is still missing. Once the chosen regions are
//!    applied the record is marked finished, so a resumed install fetches the rest as chunks
//!    without fetching the table again. The rest of the image then comes as chunks, and the
//!    whole image's SHA-256 is checked from the media as for any install.
//!
//! A patch that cannot be used (a base mismatch, a patch chunk that fails verification or
//! cannot be fetched, a table that does not match the images, a region that fails to apply or
//! produces a chunk that does not verify) is recorded as failed for this install and the
//! remaining chunks are fetched instead; the event's detail says why. Patch bytes fetched
//! count as `delta` in the bytes by source.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::delta as codec;
use flotilla_core::ids::{ChunkId, IndexId, Sha256Digest};
use flotilla_core::index::ChunkIndex;
use flotilla_core::manifest::{Delta, DeltaMethod, VerifiedManifest};
use serde::{Deserialize, Serialize};

mod apply;
mod fetch;
mod plan;
use crate::durable::{self, Sealed};
use crate::events::{EventKind, EventQueue};
use crate::install::{ChunkSource, WriteError};
use crate::journal::{ByteSources, Progress, Release};
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

    /// Reports the per-region plan (log and event). Like [`DeltaPlan::note`] the event carries
    /// no bytes.
    ///
    /// `table` is what fetching the region table cost in this run: spent to plan, counted in
    /// the whole patch as in the mix.
    fn report(&self, delta: &Delta, p: &plan::RegionPlan, table: u64) {
        let as_chunks = p.regions - p.from_patch;
        tracing::info!(
            regions = p.regions,
            from_patch = p.from_patch,
            as_chunks,
            already_held = p.held,
            table_bytes = table,
            patch_bytes = p.patch_bytes,
            chunk_bytes = p.chunk_bytes,
            whole_patch = p.whole_patch,
            chunks_only = p.chunks_only,
            total = table + p.total(),
            "install plan"
        );
        let detail = format!(
            "patch from version {} (version_code {}): {} of {} regions from the patch, {as_chunks} as chunks ({} of \
             them already held); patch bytes: {table} for its table, {} for the chosen regions; chunk bytes: {} \
             (whole patch: {} bytes, chunks alone: {})",
            delta.from_version,
            delta.from_version_code,
            p.from_patch,
            p.regions,
            p.held,
            p.patch_bytes,
            p.chunk_bytes,
            table + p.whole_patch,
            p.chunks_only
        );
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
    /// The patch's part of this install is done (its chosen regions applied, or none chosen):
    /// what is still missing comes as chunks.
    #[serde(default)]
    finished: bool,
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
    /// The patch's regions did not end on the chunk boundary they were planned to.
    #[error("the patch's output reached offset {produced} where offset {size} was expected")]
    Length {
        /// Offset reached.
        produced: u64,
        /// Offset expected.
        size: u64,
    },
}

/// A patch's region table is fetched to plan a mix even when the whole patch is not cheaper
/// than the chunks, as long as the table's chunks cost at most this fraction of the chunks
/// (1/8): a plan that then takes nothing from the patch wastes at most 12.5 % more bytes,
/// while a mix can save most of them.
const PROBE_SHARE: u64 = 8;

/// The patch to plan with, if any, and what the whole of it would cost: known method, from
/// the installed release (version_code and image SHA-256 as the journal records them), not
/// given up on or finished for this install; the cheapest whole patch wins (patch bytes
/// already held count as free). It is worth planning with when the whole patch costs less
/// than `chunk_bytes`, or when its first chunk (at most `probe_bound` bytes: the table starts
/// there) costs at most `chunk_bytes / PROBE_SHARE`.
fn choose(plan: &DeltaPlan, target_index: IndexId, chunk_bytes: u64, probe_bound: u64) -> Option<(Delta, u64)> {
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
        if earlier.is_some_and(|r| r.finished) {
            tracing::info!("the patch's part of this install is done; the rest comes as chunks");
            return None;
        }
        let cost = d.patch_size.saturating_sub(earlier.map_or(0, |r| r.fetched));
        if best.is_none_or(|(_, c)| cost < c) {
            best = Some((d, cost));
        }
    }
    let (d, cost) = best?;
    if cost >= chunk_bytes && probe_bound.saturating_mul(PROBE_SHARE) > chunk_bytes {
        tracing::info!(patch = cost, chunks = chunk_bytes, from = d.from_version_code, "chunks are cheaper");
        return None;
    }
    Some((d.clone(), cost))
}

/// Tries to complete the target slot from a patch, region by region where that is cheaper;
/// on any patch problem reports why and leaves the rest to the chunk fetch. Patch bytes
/// fetched go into `slot.progress.bytes.delta`.
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
    // Patch bytes fetched by earlier runs of this install count whatever happens now.
    if let Some(r) = PatchRecord::load(&plan.record_path(), index.id()) {
        slot.progress.bytes.delta = slot.progress.bytes.delta.max(r.fetched);
    }
    let Some(installed) = plan.installed.clone() else { return Ok(()) };
    let Some((delta, whole)) = choose(plan, index.id(), chunk_bytes, u64::from(index.params().max)) else {
        return Ok(());
    };
    tracing::info!(
        from = delta.from_version_code,
        method = ?delta.method,
        patch = whole,
        chunks = chunk_bytes,
        "planning the install from a patch"
    );
    let mut record = PatchRecord::load(&plan.record_path(), index.id())
        .filter(|r| r.patch_index == delta.patch_index.id)
        .unwrap_or_else(|| PatchRecord {
            target_index: index.id(),
            patch_index: delta.patch_index.id,
            done: String::new(),
            fetched: 0,
            failed: None,
            finished: false,
        });
    // The whole patch beats the chunks: the table is fetched whatever it costs (the whole
    // patch would fetch it too). Otherwise it must be cheap next to the chunks.
    let probe_limit = (whole >= chunk_bytes).then_some(chunk_bytes / PROBE_SHARE);
    let result = run(plan, slots, index, &delta, &installed, fetching, &mut record, &mut slot, probe_limit).await;
    slot.progress.bytes.delta = slot.progress.bytes.delta.max(record.fetched);
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
            // Done with the patch for this install: what is still missing comes as chunks, in
            // this run or, after an interruption, in the next (which does not plan again, so
            // the table is not fetched twice). The file goes; the record keeps the bytes.
            record.finished = true;
            record.done.clear();
            let p = plan.patch_path();
            let _ = std::fs::remove_file(&p);
            keep(&mut record);
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

/// How a patch attempt ended, when it did not complete its part.
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
    probe_limit: Option<u64>,
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

    // 2. The patch's index, then its header and region table.
    let patch_index = fetch::fetch_index(fetching, delta).await?;
    // The patch file lives in the state directory: no room there for it means chunks instead.
    let patch_io = |source| Outcome::Patch(PatchError::Fetch(WriteError::Io { slot: slot.slot, source }));
    let patch_file = Arc::new(fetch::open_patch_file(&plan.patch_path(), delta.patch_size).map_err(patch_io)?);
    if let ChunkSource::Peer(p) = &fetching.source {
        p.serve_file(plan.patch_path(), &patch_index);
    }
    let sizes = (installed.image_size, index.image_size());
    let before = record.fetched;
    let header =
        fetch::fetch_header(plan, fetching, &patch_index, &patch_file, record, slot.slot, sizes, probe_limit).await?;
    let Some(header) = header else { return Ok(()) };

    // 3. The plan: each group of regions from the patch or as chunks, whichever costs less.
    let held = hex::decode(&record.done).unwrap_or_default();
    let chosen = plan::plan(&header, index, slot.bits, &patch_index, &held);
    plan.report(delta, &chosen, record.fetched.saturating_sub(before));
    if chosen.groups.is_empty() {
        return Ok(());
    }

    // 4. The patch chunks the chosen regions need, then those regions, streaming, into the
    //    target slot.
    fetch::fetch_patch(plan, fetching, &patch_index, &patch_file, record, slot.slot, &chosen.patch_entries).await?;
    slot.progress.bytes.delta = slot.progress.bytes.delta.max(record.fetched);
    apply(slots, plan.active, installed.image_size, index, (Arc::new(header), chosen.groups), patch_file, slot).await
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt as _;

    use flotilla_core::chunking::{ChunkParams, Chunker};

    use crate::journal;

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
        fixture_with(old, old_in_slot, &codec::EncodeOptions::default())
    }

    fn fixture_with(old: &[u8], old_in_slot: &[u8], opts: &codec::EncodeOptions) -> Fixture {
        let mut new = old.to_vec();
        for k in 0..20 {
            let at = (k * 7919 * 131 + 999) % (new.len() - 8);
            new[at..at + 4].copy_from_slice(b"EDIT");
        }
        fixture_pair(old, new, old_in_slot, opts)
    }

    /// Slot A holds `old_in_slot`; the patch goes from `old` to `new`.
    fn fixture_pair(old: &[u8], new: Vec<u8>, old_in_slot: &[u8], opts: &codec::EncodeOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::File { a: dir.path().join("a.img"), b: dir.path().join("b.img") };
        std::fs::write(dir.path().join("a.img"), old_in_slot).unwrap();
        let index = index_of(&new);
        let mut patch = Vec::new();
        codec::encode(&old.to_vec(), &index_of(old), &new, &index, opts, &mut patch, &mut |_, _| {}).unwrap();
        let patch_path = dir.path().join("patch.bin");
        std::fs::write(&patch_path, &patch).unwrap();
        let patch = Arc::new(File::open(&patch_path).unwrap());
        let progress_path = dir.path().join("progress");
        Fixture { _dir: dir, slots, new, index, patch, progress_path }
    }

    fn header_of(f: &Fixture) -> codec::PatchHeader {
        let mut head = vec![0u8; 1 << 20];
        let n = f.patch.read_at(&mut head, 0).unwrap();
        codec::PatchHeader::read(&mut &head[..n], &codec::DeltaLimits::default()).unwrap()
    }

    async fn run_apply(f: &Fixture, bits: &mut Vec<u8>) -> (Result<(), Outcome>, Progress) {
        let header = header_of(f);
        let groups = plan::groups(&header, &f.index);
        run_groups(f, bits, header, groups).await
    }

    async fn run_groups(
        f: &Fixture,
        bits: &mut Vec<u8>,
        header: codec::PatchHeader,
        groups: Vec<plan::Group>,
    ) -> (Result<(), Outcome>, Progress) {
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
        let r =
            apply(&f.slots, SlotName::A, len, &f.index, (Arc::new(header), groups), f.patch.clone(), &mut state).await;
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

    #[tokio::test]
    async fn applies_only_the_chosen_regions_and_leaves_the_rest_unwritten() {
        let old = noise(4, 1_500_000);
        let mut opts = codec::EncodeOptions::default();
        opts.window = 256 << 10;
        opts.region_len = 128 << 10;
        let f = fixture_with(&old, &old, &opts);
        let header = header_of(&f);
        let groups = plan::groups(&header, &f.index);
        let patched: Vec<plan::Group> = groups
            .iter()
            .filter(|g| header.regions[g.regions.start as usize].op != codec::RegionOp::Copy)
            .cloned()
            .collect();
        assert!(patched.len() >= 3, "{} patched groups", patched.len());
        let chosen: Vec<plan::Group> = patched.iter().step_by(2).cloned().collect();
        let mut bits = vec![0u8; f.index.len().div_ceil(8)];
        let (r, _) = run_groups(&f, &mut bits, header, chosen.clone()).await;
        assert!(r.is_ok());
        let slot = std::fs::read(f.slots.image_path(SlotName::B)).unwrap();
        for (i, (offset, e)) in f.index.iter_with_offsets().enumerate() {
            let at = offset as usize..offset as usize + e.len as usize;
            if chosen.iter().any(|g| g.entries.contains(&i)) {
                assert!(journal::is_done(&bits, i), "chunk {i} of a chosen region is claimed");
                assert_eq!(slot[at.clone()], f.new[at], "chunk {i}");
            } else {
                assert!(!journal::is_done(&bits, i), "chunk {i} of another region is left to the chunks");
                assert!(slot[at].iter().all(|b| *b == 0), "chunk {i} is not written");
            }
        }
    }

    #[tokio::test]
    async fn chosen_groups_in_the_shared_stream_apply_after_it_is_loaded() {
        // The same 1500-byte block written at three places 500 KB apart (a change repeated
        // in three files): one shared stream carries it once for three regions.
        let old = noise(5, 1_500_000);
        let block = noise(6, 1500);
        let mut new = old.clone();
        for at in [100_000, 600_000, 1_100_000] {
            new.splice(at..at + 800, block.iter().copied());
        }
        let mut opts = codec::EncodeOptions::default();
        opts.window = 256 << 10;
        opts.region_len = 128 << 10;
        opts.level = 9;
        let f = fixture_pair(&old, new, &old, &opts);
        let header = header_of(&f);
        assert!(header.shared.is_some(), "the repeated edits share a stream");
        let groups = plan::groups(&header, &f.index);
        let shared: Vec<plan::Group> = groups.iter().filter(|g| g.shared).cloned().collect();
        // The encoder cuts window-sized sparse regions inside copies, so its regions seldom end
        // on chunk boundaries and may all fall in one group of the planner (the subsets are
        // priced in `plan`'s tests and applied in the codec's).
        assert!(!shared.is_empty());
        // The groups in the shared stream alone: each chunk they produce verified and written,
        // every other chunk left to the chunks.
        let mut bits = vec![0u8; f.index.len().div_ceil(8)];
        let (r, _) = run_groups(&f, &mut bits, header, shared.clone()).await;
        assert!(r.is_ok(), "the shared groups apply");
        let slot = std::fs::read(f.slots.image_path(SlotName::B)).unwrap();
        for (i, (offset, e)) in f.index.iter_with_offsets().enumerate() {
            let at = offset as usize..offset as usize + e.len as usize;
            if shared.iter().any(|g| g.entries.contains(&i)) {
                assert!(journal::is_done(&bits, i), "chunk {i} is claimed");
                assert_eq!(slot[at.clone()], f.new[at], "chunk {i}");
            } else {
                assert!(!journal::is_done(&bits, i), "chunk {i} is left to the chunks");
            }
        }
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
        // A probe bound so large that a table is never fetched unless the whole patch wins.
        let choose = |plan: &DeltaPlan, chunks, probe| choose(plan, target, chunks, probe).map(|(d, _)| d.patch_size);
        let never = 1 << 40;
        assert_eq!(choose(&plan, 1000, never), Some(300));
        assert_eq!(choose(&plan, 300, never), None, "not cheaper than chunks");
        // Not cheaper whole, but its table is cheap next to the chunks: worth planning a mix.
        assert_eq!(choose(&plan, 300, 30), Some(300));
        assert_eq!(choose(&plan, 300, 40), None, "a table dearer than an eighth of the chunks");
        // A patch given up earlier in this install is not tried again.
        let mut rec = PatchRecord {
            target_index: target,
            patch_index: IndexId::of(b"b"),
            done: String::new(),
            fetched: 0,
            failed: Some("bad".into()),
            finished: false,
        };
        rec.save(&plan.record_path(), &[]).unwrap();
        assert_eq!(choose(&plan, 1000, never), Some(500));
        // Bytes already held make a patch cheaper.
        rec.patch_index = IndexId::of(b"a");
        rec.failed = None;
        rec.fetched = 450;
        rec.save(&plan.record_path(), &[]).unwrap();
        assert_eq!(choose(&plan, 100, never), Some(500));
        // A patch whose part of the install is done is not planned again.
        rec.finished = true;
        rec.save(&plan.record_path(), &[]).unwrap();
        assert_eq!(choose(&plan, 1000, never), None);
        let none = DeltaPlan { installed: None, ..plan };
        assert!(choose(&none, 1000, never).is_none());
    }
}
