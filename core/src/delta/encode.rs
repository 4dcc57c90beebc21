//! Building a patch: plan regions from the two chunk indexes, pick each patched region's
//! reference, encode regions in parallel with every method that may pay, keep the smallest.
//!
//! Planning:
//! - Both images within one window: a single region against the whole old image (zstd with
//!   prefix, and bsdiff when the pair is within [`EncodeOptions::bsdiff_max`]).
//! - Otherwise new chunks found in the old image (by id) become copy regions; runs of changed
//!   chunks are cut into regions of about [`EncodeOptions::region_len`]. Each region's
//!   reference is the old chunks that share the most content with it (content-defined
//!   anchors, about one per 256 bytes, voted per old chunk), plus the old bytes at the same
//!   relative place between the neighbouring copies, up to the window.
//! - Then runs of copies and small patched regions are gathered into groups of up to a
//!   window (long copies are split to fill them). A group is encoded both as one sparse
//!   bsdiff region against the hull of its old bytes and as its parts; the smaller is kept.
//!   Small edits spread over a large image (a version string in every file of an app tree)
//!   then cost a few bytes each instead of a zstd frame and two table records each.
//!
//! Encoding a multi-region patch takes two passes: zstd at `PROBE_LEVEL` everywhere, then
//! the configured level and bsdiff only where the first pass left at least `REFINE_MIN`
//! bytes (most regions of an OS image are a few hundred bytes after the first pass, and
//! indexing a window-sized reference at level 19 takes seconds each), and for groups' sparse
//! streams unless they are headed for the shared stream (see `share`), which compresses them
//! at the configured level once, against a few KiB of old bytes.
//!
//! Memory: the old image's anchor table (about 16 bytes per 256 old bytes), and per worker
//! thread one region, one reference and the compressor's state; the finished patch is held
//! until written because its table comes first (bounded by [`EncodeOptions::max_patch_size`]).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::share::{SHARED_MAX, Shareable, literal_spots, share};
use super::{
    DeltaError, EXTENT_RECORD_LEN, Extent, HEADER_LEN, MAX_EXTENTS, OldImage, PatchHeader, REGION_RECORD_LEN, Region,
    RegionOp, bsdiff, compress_zstd,
};
use crate::ids::ChunkId;
use crate::index::ChunkIndex;
use crate::manifest::DeltaMethod;

/// How [`encode`] works.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EncodeOptions {
    /// Largest reference and largest patched region; must not exceed the appliers'
    /// [`DeltaLimits::max_window`](super::DeltaLimits::max_window).
    pub window: u64,
    /// Target new bytes per patched region when the images exceed the window.
    pub region_len: u64,
    /// zstd level for patched regions.
    pub level: i32,
    /// bsdiff is tried on a region when its reference plus new bytes are at most this; 0
    /// turns bsdiff off, sparse groups included.
    pub bsdiff_max: u64,
    /// Worker threads.
    pub threads: NonZeroUsize,
    /// Give up once the patch grows past this.
    pub max_patch_size: u64,
    /// Let sparse regions put their records in one shared stream where that is smaller.
    pub shared_stream: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            window: super::DEFAULT_MAX_WINDOW,
            region_len: 2 << 20,
            level: 19,
            bsdiff_max: 24 << 20,
            threads: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            max_patch_size: 1 << 40,
            shared_stream: true,
        }
    }
}

/// What [`encode`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EncodeStats {
    /// The method the manifest should list.
    pub method: DeltaMethod,
    /// Bytes of patch written.
    pub patch_size: u64,
    /// Wall time.
    pub encode_time: Duration,
    /// Regions in the patch.
    pub regions: u32,
    /// New bytes produced by copy regions.
    pub copied_bytes: u64,
    /// New bytes produced by patched regions.
    pub patched_bytes: u64,
    /// Patched regions that kept zstd.
    pub zstd_regions: u32,
    /// Patched regions that kept bsdiff.
    pub bsdiff_regions: u32,
    /// Regions whose records are in the shared stream.
    pub shared_regions: u32,
}

/// One planned region before encoding.
#[derive(Debug, Clone)]
enum Planned {
    Copy(Vec<Extent>),
    /// `near` is the old bytes at the same relative place (within `reference` when it fits):
    /// what a patch inside a group is diffed against.
    Patch {
        new_offset: u64,
        new_len: u64,
        reference: Vec<Extent>,
        near: Extent,
    },
    /// Consecutive copies and small patches that become either one sparse bsdiff region
    /// against the union of their extents (`reference`) or the `parts` as they are,
    /// whichever is smaller once encoded.
    Group {
        new_offset: u64,
        new_len: u64,
        reference: Vec<Extent>,
        parts: Vec<Planned>,
    },
}

impl Planned {
    fn new_len(&self) -> u64 {
        match self {
            Self::Copy(extents) => extents.iter().map(|e| e.len).sum(),
            Self::Patch { new_len, .. } | Self::Group { new_len, .. } => *new_len,
        }
    }
}

/// A payload, the op that decodes it, and for a group's sparse form what the shared stream
/// would need to carry its records instead.
#[derive(Debug, Clone)]
struct Payload {
    op: RegionOp,
    bytes: Vec<u8>,
    shareable: Option<Box<Shareable>>,
}

/// The smallest encodings found for one planned region.
#[derive(Debug, Clone, Default)]
struct Encoded {
    /// A patch: its smallest method; a group: its sparse form.
    whole: Option<Payload>,
    /// A group: the smallest encoding of each patched part (copies have none).
    parts: Vec<Option<Payload>>,
}

/// About what a region adds to the compressed table: its record and extents at the ratio
/// zstd reaches on such tables (offsets and lengths, mostly high zero bytes).
fn record_cost(extents: usize) -> u64 {
    ((REGION_RECORD_LEN + extents * EXTENT_RECORD_LEN) * 2 / 5) as u64
}

fn payload_len(payload: Option<&Payload>) -> u64 {
    payload.map_or(0, |p| p.bytes.len() as u64)
}

/// A group's cost as parts, and whether its sparse form is smaller; `None` until all its
/// jobs are in.
fn group_choice(parts: &[Planned], reference: &[Extent], encoded: &Encoded) -> (u64, bool) {
    let separate: u64 = parts
        .iter()
        .zip(&encoded.parts)
        .map(|(part, payload)| {
            let extents = match part {
                Planned::Copy(extents) => extents.len(),
                Planned::Patch { reference, .. } | Planned::Group { reference, .. } => reference.len(),
            };
            payload_len(payload.as_ref()) + record_cost(extents)
        })
        .sum();
    match &encoded.whole {
        Some(Payload { bytes, .. }) if (bytes.len() as u64) + record_cost(reference.len()) < separate => {
            (bytes.len() as u64 + record_cost(reference.len()), true)
        }
        _ => (separate, false),
    }
}

/// Collects the finished regions, merging consecutive copies.
#[derive(Debug)]
struct Assembly {
    regions: Vec<Region>,
    bodies: Vec<Vec<u8>>,
    /// Per region: its records, when they may move into the shared stream.
    shareable: Vec<Option<Box<Shareable>>>,
    new_offset: u64,
    window: u64,
    stats: EncodeStats,
}

impl Assembly {
    fn push(&mut self, planned: Planned, payload: Option<Payload>) -> Result<(), DeltaError> {
        let new_len = planned.new_len();
        match (planned, payload) {
            (Planned::Copy(extents), _) => {
                self.stats.copied_bytes += new_len;
                if let Some(last) = self.regions.last_mut()
                    && last.op == RegionOp::Copy
                    && last.extents.len() + extents.len() <= MAX_EXTENTS
                {
                    for e in extents {
                        match last.extents.last_mut() {
                            Some(l) if l.offset + l.len == e.offset => l.len += e.len,
                            _ => last.extents.push(e),
                        }
                    }
                    last.new_len += new_len;
                } else {
                    self.regions.push(Region {
                        op: RegionOp::Copy,
                        new_offset: self.new_offset,
                        new_len,
                        extents,
                        payload_offset: 0,
                        payload_len: 0,
                        shared: None,
                    });
                    self.bodies.push(Vec::new());
                    self.shareable.push(None);
                }
            }
            (
                Planned::Patch { reference, .. } | Planned::Group { reference, .. },
                Some(Payload { op, bytes, shareable }),
            ) => {
                self.window = self.window.max(new_len).max(reference.iter().map(|e| e.len).sum());
                self.stats.patched_bytes += new_len;
                match op {
                    RegionOp::Bsdiff | RegionOp::BsdiffSparse => self.stats.bsdiff_regions += 1,
                    _ => self.stats.zstd_regions += 1,
                }
                self.regions.push(Region {
                    op,
                    new_offset: self.new_offset,
                    new_len,
                    extents: reference,
                    payload_offset: 0,
                    payload_len: bytes.len() as u64,
                    shared: None,
                });
                self.bodies.push(bytes);
                self.shareable.push(shareable);
            }
            (_, None) => return Err(DeltaError::InvalidOptions { reason: "a region was not encoded" }),
        }
        self.new_offset += new_len;
        Ok(())
    }
}

/// Builds a patch that turns `old` into `new`, writing it to `out`.
///
/// `progress(done, total)` reports new-image bytes covered so far.
///
/// # Errors
/// [`DeltaError::IndexMismatch`] when an index does not describe its image,
/// [`DeltaError::InvalidOptions`], [`DeltaError::PatchTooLarge`], read and write errors.
pub fn encode(
    old: &dyn OldImage,
    old_index: &ChunkIndex,
    new: &dyn OldImage,
    new_index: &ChunkIndex,
    opts: &EncodeOptions,
    out: &mut dyn std::io::Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<EncodeStats, DeltaError> {
    let started = Instant::now();
    for (which, index, image) in [("old", old_index, old), ("new", new_index, new)] {
        if index.image_size() != image.size() {
            return Err(DeltaError::IndexMismatch { which, index_size: index.image_size(), image_size: image.size() });
        }
    }
    if opts.window < 64 << 10 || opts.window > 1 << 30 {
        return Err(DeltaError::InvalidOptions { reason: "window must be between 64 KiB and 1 GiB" });
    }
    if opts.region_len == 0 || opts.region_len > opts.window {
        return Err(DeltaError::InvalidOptions { reason: "region_len must be between 1 and the window" });
    }
    let plan = if old.size() <= opts.window && new.size() <= opts.window {
        let reference = if old.size() == 0 { Vec::new() } else { vec![Extent { offset: 0, len: old.size() }] };
        let near = Extent { offset: 0, len: old.size() };
        vec![Planned::Patch { new_offset: 0, new_len: new.size(), reference, near }]
    } else {
        let plan = plan_regions(old, old_index, new, new_index, opts)?;
        if opts.bsdiff_max > 0 { group_small_patches(plan, opts.window) } else { plan }
    };
    let encoded = encode_regions(old, new, &plan, opts, progress)?;

    let mut assembly = Assembly {
        regions: Vec::with_capacity(plan.len()),
        bodies: Vec::with_capacity(plan.len()),
        shareable: Vec::with_capacity(plan.len()),
        new_offset: 0,
        window: 0,
        stats: EncodeStats {
            method: DeltaMethod::Zstd,
            patch_size: 0,
            encode_time: Duration::ZERO,
            regions: 0,
            copied_bytes: 0,
            patched_bytes: 0,
            zstd_regions: 0,
            bsdiff_regions: 0,
            shared_regions: 0,
        },
    };
    for (planned, encoded) in plan.into_iter().zip(encoded) {
        match planned {
            Planned::Group { new_offset, new_len, reference, parts } => {
                if group_choice(&parts, &reference, &encoded).1 {
                    let group = Planned::Group { new_offset, new_len, reference, parts: Vec::new() };
                    assembly.push(group, encoded.whole)?;
                } else {
                    for (part, payload) in parts.into_iter().zip(encoded.parts) {
                        assembly.push(part, payload)?;
                    }
                }
            }
            other => assembly.push(other, encoded.whole)?,
        }
    }
    let Assembly { regions, mut bodies, shareable, window, mut stats, .. } = assembly;
    let mut header = PatchHeader { old_size: old.size(), new_size: new.size(), window, shared: None, regions };
    let shared_body = share(old, &mut header, &mut bodies, shareable, opts)?;
    let mut payload_offset = header.encoded_len();
    if let Some(shared) = &mut header.shared {
        shared.payload_offset = payload_offset;
        payload_offset += shared.payload_len;
        stats.shared_regions =
            u32::try_from(header.regions.iter().filter(|r| r.shared.is_some()).count()).unwrap_or(u32::MAX);
    }
    for region in &mut header.regions {
        region.payload_offset = payload_offset;
        payload_offset += region.payload_len;
    }
    if payload_offset > opts.max_patch_size {
        return Err(DeltaError::PatchTooLarge { limit: opts.max_patch_size });
    }
    let head = header.encode();
    debug_assert!(head.len() >= HEADER_LEN);
    out.write_all(&head).map_err(DeltaError::Write)?;
    out.write_all(&shared_body).map_err(DeltaError::Write)?;
    for bytes in &bodies {
        out.write_all(bytes).map_err(DeltaError::Write)?;
    }
    stats.method = header.method();
    stats.patch_size = payload_offset;
    stats.regions = u32::try_from(header.regions.len()).unwrap_or(u32::MAX);
    stats.encode_time = started.elapsed();
    Ok(stats)
}

/// Patches up to this long may join a group (see [`group_small_patches`]): small edits,
/// whose zstd frame and table record cost more than their content.
const GROUP_PATCH_MAX: u64 = 1 << 20;

/// Gathers runs of copies and small patches into groups of at most `window` new bytes whose
/// extents' union is at most `window` (long copies are split to fill a group), so that many
/// small edits and the copies between them can become one sparse region.
fn group_small_patches(plan: Vec<Planned>, window: u64) -> Vec<Planned> {
    #[derive(Default)]
    struct Open {
        parts: Vec<Planned>,
        new_offset: u64,
        new_len: u64,
        extents: Vec<Extent>,
    }
    impl Open {
        fn union(&self, more: &[Extent]) -> Vec<Extent> {
            merge(self.extents.iter().chain(more).copied().collect(), u64::MAX)
        }
        fn close(&mut self, out: &mut Vec<Planned>, window: u64) {
            let parts = std::mem::take(&mut self.parts);
            let patches = parts.iter().filter(|p| matches!(p, Planned::Patch { .. })).count();
            if patches > 0 && parts.len() > 1 {
                // One extent (the hull) when it fits: a record costs less than the bytes it
                // adds to the reference.
                let union = self.union(&[]);
                let hull = match (union.first(), union.last()) {
                    (Some(first), Some(last)) if last.offset + last.len - first.offset <= window => {
                        vec![Extent { offset: first.offset, len: last.offset + last.len - first.offset }]
                    }
                    _ => union,
                };
                out.push(Planned::Group { new_offset: self.new_offset, new_len: self.new_len, reference: hull, parts });
            } else {
                out.extend(parts);
            }
            self.new_offset += self.new_len;
            self.new_len = 0;
            self.extents.clear();
        }
    }
    let mut out = Vec::with_capacity(plan.len());
    let mut open = Open::default();
    for planned in plan {
        match planned {
            Planned::Patch { new_len, near, .. } if new_len <= GROUP_PATCH_MAX => {
                let union = open.union(&[near]);
                let ref_len: u64 = union.iter().map(|e| e.len).sum();
                if open.new_len + new_len > window || ref_len > window || union.len() > MAX_EXTENTS {
                    open.close(&mut out, window);
                }
                open.new_len += new_len;
                open.extents.push(near);
                open.parts.push(planned);
            }
            Planned::Copy(extents) => {
                let mut rest = extents.into_iter();
                let mut pending: Option<Extent> = None;
                while let Some(mut e) = pending.take().or_else(|| rest.next()) {
                    let union_len: u64 = open.union(&[]).iter().map(|u| u.len).sum();
                    let room = (window - open.new_len.min(window)).min(window - union_len.min(window));
                    if room == 0 || open.extents.len() + 1 >= MAX_EXTENTS {
                        open.close(&mut out, window);
                        pending = Some(e);
                        continue;
                    }
                    if e.len > room {
                        pending = Some(Extent { offset: e.offset + room, len: e.len - room });
                        e.len = room;
                    }
                    open.new_len += e.len;
                    open.extents.push(e);
                    match open.parts.last_mut() {
                        Some(Planned::Copy(extents)) => extents.push(e),
                        _ => open.parts.push(Planned::Copy(vec![e])),
                    }
                }
            }
            other => {
                open.close(&mut out, window);
                open.new_offset += other.new_len();
                out.push(other);
            }
        }
    }
    open.close(&mut out, window);
    out
}

/// One unit of work: one method at one zstd level on one planned region, or on one part of a
/// group.
#[derive(Debug, Clone, Copy)]
struct Job {
    region: usize,
    part: Option<usize>,
    op: RegionOp,
    level: i32,
}

/// zstd level of the first pass over a multi-region patch: indexing an 8 MiB reference at
/// level 19 takes seconds, at this level a small fraction of it.
pub(super) const PROBE_LEVEL: i32 = 9;

/// A region or part whose first-pass payload is at least this long is encoded again at the
/// configured level (and with bsdiff): below it the second pass could save at most a few
/// hundred bytes for seconds of work.
const REFINE_MIN: u64 = 2 << 10;

fn encode_regions(
    old: &dyn OldImage,
    new: &dyn OldImage,
    plan: &[Planned],
    opts: &EncodeOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<Encoded>, DeltaError> {
    let total = new.size();
    let mut done = 0u64;
    let mut encoded: Vec<Encoded> = vec![Encoded::default(); plan.len()];
    // A single region is encoded once, at the configured level; regions of a larger image
    // get a fast first pass and a second where it may pay.
    let probe = if plan.len() > 1 && opts.level > PROBE_LEVEL { Some(PROBE_LEVEL) } else { None };
    let bsdiff_allowed = |new_len: u64, reference: &[Extent]| {
        let reference_len: u64 = reference.iter().map(|e| e.len).sum();
        reference_len > 0 && reference_len + new_len <= opts.bsdiff_max
    };
    let mut jobs = Vec::new();
    for (i, planned) in plan.iter().enumerate() {
        match planned {
            Planned::Copy(extents) => done += extents.iter().map(|e| e.len).sum::<u64>(),
            Planned::Patch { new_len, reference, .. } => match probe {
                Some(level) => jobs.push(Job { region: i, part: None, op: RegionOp::Zstd, level }),
                None => {
                    // bsdiff first: it is the slow one, so it starts early.
                    if bsdiff_allowed(*new_len, reference) {
                        jobs.push(Job { region: i, part: None, op: RegionOp::Bsdiff, level: opts.level });
                    }
                    jobs.push(Job { region: i, part: None, op: RegionOp::Zstd, level: opts.level });
                }
            },
            Planned::Group { parts, .. } => {
                // The sparse form runs bsdiff on each patched part; as parts they get zstd
                // only (bsdiff as separate regions would only add frames and records).
                let level = probe.unwrap_or(opts.level);
                jobs.push(Job { region: i, part: None, op: RegionOp::BsdiffSparse, level });
                encoded[i].parts = vec![None; parts.len()];
                for (k, part) in parts.iter().enumerate() {
                    if matches!(part, Planned::Patch { .. }) {
                        jobs.push(Job { region: i, part: Some(k), op: RegionOp::Zstd, level });
                    }
                }
            }
        }
    }
    progress(done, total);
    run_jobs(old, new, plan, &jobs, opts, &mut encoded)?;
    if probe.is_none() {
        progress(total, total);
        return Ok(encoded);
    }
    let big = |payload: &Option<Payload>| payload_len(payload.as_ref()) >= REFINE_MIN;
    // Two or more sparse streams that may share: the shared stream is likely.
    let sharing = opts.shared_stream
        && encoded.iter().filter(|e| e.whole.as_ref().is_some_and(|p| p.shareable.is_some())).count() >= 2;
    let mut refine = Vec::new();
    for (i, planned) in plan.iter().enumerate() {
        let before = refine.len();
        match planned {
            Planned::Copy(_) => continue,
            Planned::Patch { new_len, reference, .. } if big(&encoded[i].whole) => {
                if bsdiff_allowed(*new_len, reference) {
                    refine.push(Job { region: i, part: None, op: RegionOp::Bsdiff, level: opts.level });
                }
                refine.push(Job { region: i, part: None, op: RegionOp::Zstd, level: opts.level });
            }
            Planned::Patch { .. } => {}
            Planned::Group { parts, .. } => {
                // A group's stream is small, and the configured level's parser takes a tenth
                // off it (a region record or a small edit) for about a second. Not when the
                // stream will likely move into the shared stream (compressed there, at the
                // configured level, once): on the app tar that saved 4 such seconds of
                // 8 MiB-prefix indexing for frames the shared stream then replaced.
                if !(sharing && encoded[i].whole.as_ref().is_some_and(|p| p.shareable.is_some())) {
                    refine.push(Job { region: i, part: None, op: RegionOp::BsdiffSparse, level: opts.level });
                }
                for (k, part) in parts.iter().enumerate() {
                    if matches!(part, Planned::Patch { .. }) && big(&encoded[i].parts[k]) {
                        refine.push(Job { region: i, part: Some(k), op: RegionOp::Zstd, level: opts.level });
                    }
                }
            }
        }
        if refine.len() == before {
            done += planned.new_len();
        }
    }
    progress(done, total);
    run_jobs(old, new, plan, &refine, opts, &mut encoded)?;
    progress(total, total);
    Ok(encoded)
}

/// Runs `jobs` on the worker threads, keeping the smallest payload per region and part.
fn run_jobs(
    old: &dyn OldImage,
    new: &dyn OldImage,
    plan: &[Planned],
    jobs: &[Job],
    opts: &EncodeOptions,
    encoded: &mut [Encoded],
) -> Result<(), DeltaError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<DeltaError>> = Mutex::new(None);
    let workers = opts.threads.get().min(jobs.len()).max(1);
    let (tx, rx) = mpsc::sync_channel::<(Job, Payload)>(workers);
    let mut too_large = false;
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, stop, first_error) = (&next, &stop, &first_error);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)).copied() else { break };
                    let planned = match (job.part, &plan[job.region]) {
                        (Some(k), Planned::Group { parts, .. }) => &parts[k],
                        (_, planned) => planned,
                    };
                    match encode_job(old, new, planned, job.op, job.level) {
                        Ok(payload) => {
                            if tx.send((job, payload)).is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(e);
                            }
                            break;
                        }
                    }
                }
            });
        }
        drop(tx);
        let mut size: u64 = plan.iter().zip(encoded.iter()).map(|(p, e)| estimate(p, e)).sum();
        for (job, payload) in rx {
            let (planned, entry) = (&plan[job.region], &mut encoded[job.region]);
            let before = estimate(planned, entry);
            let slot = match job.part {
                Some(k) => &mut entry.parts[k],
                None => &mut entry.whole,
            };
            if slot.as_ref().is_none_or(|kept| payload.bytes.len() < kept.bytes.len()) {
                *slot = Some(payload);
            }
            size = size - before + estimate(planned, entry);
            if size > opts.max_patch_size {
                too_large = true;
                stop.store(true, Ordering::Relaxed);
            }
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    if too_large {
        return Err(DeltaError::PatchTooLarge { limit: opts.max_patch_size });
    }
    Ok(())
}

/// What a planned region would add to the patch with what is known so far (a group counts
/// its cheaper form once both are known, else the one that is).
fn estimate(planned: &Planned, encoded: &Encoded) -> u64 {
    match planned {
        Planned::Group { parts, reference, .. }
            if encoded.whole.is_some()
                && encoded.parts.iter().zip(parts).all(|(p, part)| p.is_some() || matches!(part, Planned::Copy(_))) =>
        {
            group_choice(parts, reference, encoded).0
        }
        Planned::Group { .. } => payload_len(encoded.whole.as_ref()),
        _ => payload_len(encoded.whole.as_ref()),
    }
}

fn read_new(new: &dyn OldImage, offset: u64, len: u64) -> Result<Vec<u8>, DeltaError> {
    let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| DeltaError::InvalidOptions { reason: "region" })?];
    new.read_at(&mut bytes, offset).map_err(DeltaError::ReadOld)?;
    Ok(bytes)
}

fn encode_job(
    old: &dyn OldImage,
    new: &dyn OldImage,
    planned: &Planned,
    op: RegionOp,
    level: i32,
) -> Result<Payload, DeltaError> {
    let bytes = match planned {
        Planned::Copy(_) => Vec::new(),
        Planned::Patch { new_offset, new_len, reference, .. } => {
            let mut ref_bytes = Vec::new();
            super::load_reference(old, reference, &mut ref_bytes)?;
            let new_bytes = read_new(new, *new_offset, *new_len)?;
            match op {
                RegionOp::Bsdiff => bsdiff::diff(&ref_bytes, &new_bytes, level).map_err(DeltaError::Compress)?,
                _ => compress_zstd(level, &ref_bytes, &new_bytes).map_err(DeltaError::Compress)?,
            }
        }
        Planned::Group { new_offset, new_len, reference, parts } => {
            let mut ref_bytes = Vec::new();
            super::load_reference(old, reference, &mut ref_bytes)?;
            let new_bytes = read_new(new, *new_offset, *new_len)?;
            let records = group_records(old, reference, parts, &new_bytes)?;
            let (bytes, stream) =
                bsdiff::diff_sparse(&ref_bytes, &new_bytes, &records, level).map_err(DeltaError::Compress)?;
            let shareable = (stream.len() <= SHARED_MAX)
                .then(|| Box::new(Shareable { stream, literals: literal_spots(reference, &records) }));
            return Ok(Payload { op, bytes, shareable });
        }
    };
    Ok(Payload { op, bytes, shareable: None })
}

/// Inside a group, approximate matches shorter than this become literal bytes (see
/// [`bsdiff::coarsen`]): on edited source text (identifiers renamed, a few lines rewritten)
/// the stream came out about a sixth smaller at 64 than with bsdiff's own records.
const COARSE_MIN_ADD: usize = 64;

/// Where old offsets sit in a reference made of `union` (sorted, disjoint extents).
fn union_position(union: &[Extent], offset: u64, len: u64) -> Option<usize> {
    let mut start = 0u64;
    for e in union {
        if offset >= e.offset && offset + len <= e.offset + e.len {
            return usize::try_from(start + offset - e.offset).ok();
        }
        start += e.len;
    }
    None
}

/// The records of a group's sparse form: copies as unchanged runs, each patched part's
/// bsdiff records against its own reference, all moved into the union's coordinates
/// (`new_bytes` are the group's new bytes).
fn group_records(
    old: &dyn OldImage,
    union: &[Extent],
    parts: &[Planned],
    new_bytes: &[u8],
) -> Result<Vec<bsdiff::Record>, DeltaError> {
    let lost = || DeltaError::InvalidOptions { reason: "a group part's extent is outside the group's reference" };
    let mut records = Vec::new();
    let mut new_pos = 0usize;
    let mut ref_bytes = Vec::new();
    for part in parts {
        let part_len = usize::try_from(part.new_len()).map_err(|_| DeltaError::InvalidOptions { reason: "region" })?;
        match part {
            Planned::Copy(extents) => {
                for e in extents {
                    let old_pos = union_position(union, e.offset, e.len).ok_or_else(lost)?;
                    let add = usize::try_from(e.len).map_err(|_| DeltaError::InvalidOptions { reason: "region" })?;
                    records.push(bsdiff::Record { old_pos, new_pos, add, copy: 0 });
                    new_pos += add;
                }
            }
            Planned::Group { .. } => return Err(DeltaError::InvalidOptions { reason: "a group inside a group" }),
            Planned::Patch { near, .. } => {
                let reference: &[Extent] = if near.len > 0 { std::slice::from_ref(near) } else { &[] };
                super::load_reference(old, reference, &mut ref_bytes)?;
                let part_new = &new_bytes[new_pos..new_pos + part_len];
                // Each extent of the part's reference: (start in the part's reference,
                // length, start in the union).
                let mut map = Vec::with_capacity(reference.len());
                let mut at = 0usize;
                for e in reference.iter().filter(|e| e.len > 0) {
                    let len = usize::try_from(e.len).map_err(|_| DeltaError::InvalidOptions { reason: "region" })?;
                    map.push((at, len, union_position(union, e.offset, e.len).ok_or_else(lost)?));
                    at += len;
                }
                for r in bsdiff::coarsen(bsdiff::records(&ref_bytes, part_new), COARSE_MIN_ADD) {
                    // An add that crosses extents of the part's reference is split where
                    // they are not next to each other in the union.
                    let (mut pos, mut left, mut at_new) = (r.old_pos, r.add, new_pos + r.new_pos);
                    while left > 0 {
                        let &(start, len, union_start) =
                            map.iter().find(|(start, len, _)| pos >= *start && pos < start + len).ok_or_else(lost)?;
                        let n = left.min(start + len - pos);
                        records.push(bsdiff::Record {
                            old_pos: union_start + pos - start,
                            new_pos: at_new,
                            add: n,
                            copy: 0,
                        });
                        pos += n;
                        left -= n;
                        at_new += n;
                    }
                    if r.copy > 0 {
                        match records.last_mut() {
                            Some(last) if last.new_pos + last.add + last.copy == at_new && r.add > 0 => {
                                last.copy = r.copy
                            }
                            _ => records.push(bsdiff::Record { old_pos: 0, new_pos: at_new, add: 0, copy: r.copy }),
                        }
                    }
                }
                new_pos += part_len;
            }
        }
    }
    Ok(records)
}

/// Anchors: positions where a gear hash over the last 64 bytes has its masked bits clear,
/// about one per `1 / ANCHOR_MASK` bytes; the hash itself is the anchor's key.
const ANCHOR_MASK: u64 = 0xff00_0000_0000_0000;

const GEAR: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut i = 0;
    while i < 256 {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
};

/// Calls `f(position, key)` for each anchor of `data` (positions relative to `data`).
fn anchors(data: &[u8], mut f: impl FnMut(usize, u64)) {
    let mut hash = 0u64;
    for (i, &b) in data.iter().enumerate() {
        hash = (hash << 1).wrapping_add(GEAR[usize::from(b)]);
        if i >= 64 && hash & ANCHOR_MASK == 0 {
            f(i, hash);
        }
    }
}

/// Copies at most this long between two changed spans are folded into one patched region.
const FOLD_COPY: u64 = 256 << 10;

/// Bytes read at a time while scanning the old image for anchors.
const SCAN_BLOCK: usize = 4 << 20;

/// Maps anchor keys to the old chunk (its number) they were first seen in.
fn old_anchor_table(old: &dyn OldImage, index: &ChunkIndex) -> Result<HashMap<u64, u32>, DeltaError> {
    let mut table = HashMap::new();
    let mut chunk_ends = index.iter_with_offsets().map(|(offset, e)| offset + u64::from(e.len)).enumerate().peekable();
    let mut buf = vec![0u8; SCAN_BLOCK + 64];
    let size = old.size();
    let mut offset = 0u64;
    // Each block re-reads the 64 bytes before it so anchors do not depend on block edges.
    while offset < size {
        let start = offset.saturating_sub(64);
        let len = usize::try_from((size - start).min(buf.len() as u64)).unwrap_or(buf.len());
        old.read_at(&mut buf[..len], start).map_err(DeltaError::ReadOld)?;
        let skip = usize::try_from(offset - start).unwrap_or(0);
        anchors(&buf[..len], |i, key| {
            if i < skip {
                return;
            }
            let at = start + i as u64;
            while chunk_ends.peek().is_some_and(|(_, end)| *end <= at) {
                chunk_ends.next();
            }
            if let Some((chunk, _)) = chunk_ends.peek() {
                table.entry(key).or_insert(u32::try_from(*chunk).unwrap_or(u32::MAX));
            }
        });
        offset = start + len as u64;
    }
    Ok(table)
}

fn plan_regions(
    old: &dyn OldImage,
    old_index: &ChunkIndex,
    new: &dyn OldImage,
    new_index: &ChunkIndex,
    opts: &EncodeOptions,
) -> Result<Vec<Planned>, DeltaError> {
    let old_chunks: Vec<(u64, u64)> = old_index.iter_with_offsets().map(|(o, e)| (o, u64::from(e.len))).collect();
    let mut by_id: HashMap<ChunkId, usize> = HashMap::with_capacity(old_chunks.len());
    for (i, entry) in old_index.entries().iter().enumerate() {
        by_id.entry(entry.id).or_insert(i);
    }
    // Walk the new chunks: runs of known chunks become copies, the rest changed spans.
    enum Span {
        Copy { offset: u64, extents: Vec<Extent>, chunks: Vec<u64> },
        Changed { offset: u64, chunks: Vec<u64> },
    }
    let mut spans: Vec<Span> = Vec::new();
    for (offset, entry) in new_index.iter_with_offsets() {
        let len = u64::from(entry.len);
        match by_id.get(&entry.id) {
            Some(&i) => {
                // A chunk stored more than once in the old image: prefer the copy that
                // continues the previous extent, which keeps the table short.
                let follow = match spans.last() {
                    Some(Span::Copy { extents, .. }) => extents.last().map(|e| e.offset + e.len),
                    _ => None,
                };
                let i = follow
                    .and_then(|end| old_chunks.binary_search_by_key(&end, |c| c.0).ok())
                    .filter(|&j| old_index.entries()[j].id == entry.id)
                    .unwrap_or(i);
                let old_offset = old_chunks[i].0;
                if let Some(Span::Copy { extents, chunks, .. }) = spans.last_mut()
                    && extents.len() < MAX_EXTENTS
                {
                    chunks.push(len);
                    if let Some(last) = extents.last_mut()
                        && last.offset + last.len == old_offset
                    {
                        last.len += len;
                    } else {
                        extents.push(Extent { offset: old_offset, len });
                    }
                    continue;
                }
                spans.push(Span::Copy { offset, extents: vec![Extent { offset: old_offset, len }], chunks: vec![len] });
            }
            None => match spans.last_mut() {
                Some(Span::Changed { chunks, .. }) => chunks.push(len),
                _ => spans.push(Span::Changed { offset, chunks: vec![len] }),
            },
        }
    }
    // A short copy between two changed spans costs more as its own region (a record, and two
    // frames instead of one) than as a long match inside one patched region: fold it in.
    let mut folded: Vec<Span> = Vec::with_capacity(spans.len());
    let mut iter = spans.into_iter().peekable();
    while let Some(span) = iter.next() {
        let span = match span {
            Span::Copy { offset, chunks, .. }
                if chunks.iter().sum::<u64>() <= FOLD_COPY
                    && matches!(folded.last(), Some(Span::Changed { .. }))
                    && matches!(iter.peek(), Some(Span::Changed { .. })) =>
            {
                Span::Changed { offset, chunks }
            }
            other => other,
        };
        match (folded.last_mut(), span) {
            (Some(Span::Changed { chunks: into, .. }), Span::Changed { chunks, .. }) => into.extend(chunks),
            (_, span) => folded.push(span),
        }
    }
    let spans = folded;
    let anchors_old = if spans.iter().any(|s| matches!(s, Span::Changed { .. })) {
        old_anchor_table(old, old_index)?
    } else {
        HashMap::new()
    };
    let mut plan = Vec::new();
    let mut buf = Vec::new();
    for (si, span) in spans.iter().enumerate() {
        let (span_offset, chunks) = match span {
            Span::Copy { extents, .. } => {
                plan.push(Planned::Copy(extents.clone()));
                continue;
            }
            Span::Changed { offset, chunks } => (*offset, chunks),
        };
        // Where the neighbouring copies sit in the old image bounds the "same place" guess.
        let before = match si.checked_sub(1).map(|i| &spans[i]) {
            Some(Span::Copy { extents, .. }) => extents.last().map(|e| e.offset + e.len),
            _ => None,
        };
        let after = match spans.get(si + 1) {
            Some(Span::Copy { extents, .. }) => extents.first().map(|e| e.offset),
            _ => None,
        };
        let span_len: u64 = chunks.iter().sum();
        let pieces = span_len.div_ceil(opts.region_len).max(1);
        let target = span_len.div_ceil(pieces);
        let mut piece_start = span_offset;
        let mut piece_len = 0u64;
        let mut cuts = Vec::new();
        for (i, len) in chunks.iter().enumerate() {
            if piece_len > 0 && (piece_len + len > opts.window || piece_len >= target) {
                cuts.push((piece_start, piece_len));
                piece_start += piece_len;
                piece_len = 0;
            }
            piece_len += len;
            if i + 1 == chunks.len() {
                cuts.push((piece_start, piece_len));
            }
        }
        for (piece_offset, piece_len) in cuts {
            // A single chunk longer than the window (only with tiny windows) is cut further.
            let mut at = piece_offset;
            while at < piece_offset + piece_len {
                let len = (piece_offset + piece_len - at).min(opts.window);
                buf.resize(usize::try_from(len).unwrap_or(0), 0);
                new.read_at(&mut buf, at).map_err(DeltaError::ReadOld)?;
                let guess = same_place(old.size(), span_offset, span_len, before, after, at, len);
                let near = Extent { offset: guess.offset, len: guess.len.min(opts.window) };
                let reference = choose_reference(&buf, &anchors_old, &old_chunks, guess, opts.window);
                plan.push(Planned::Patch { new_offset: at, new_len: len, reference, near });
                at += len;
            }
        }
    }
    Ok(plan)
}

/// The old bytes at the same relative place as new bytes `at..at + len` of a changed span,
/// interpolated between the copies around the span, widened by half a region each side.
fn same_place(
    old_size: u64,
    span_offset: u64,
    span_len: u64,
    before: Option<u64>,
    after: Option<u64>,
    at: u64,
    len: u64,
) -> Extent {
    let (lo, hi) = match (before, after) {
        (Some(b), Some(a)) if a >= b => (b, a),
        (Some(b), _) => (b, old_size.min(b + span_len)),
        (None, Some(a)) => (a.saturating_sub(span_len), a),
        (None, None) => (span_offset.min(old_size), old_size.min(span_offset + span_len)),
    };
    let rel = (at - span_offset) as f64 / span_len.max(1) as f64;
    let center = lo as f64 + rel * (hi - lo) as f64 + len as f64 / 2.0;
    let start = (center - len as f64).max(0.0) as u64;
    let start = start.min(old_size);
    let end = (start + 2 * len).min(old_size);
    Extent { offset: start, len: end - start }
}

/// Picks the old chunks sharing the most anchors with `new`, then the same-place guess, up to
/// `window` bytes; returns them sorted and merged.
fn choose_reference(
    new: &[u8],
    anchors_old: &HashMap<u64, u32>,
    old_chunks: &[(u64, u64)],
    guess: Extent,
    window: u64,
) -> Vec<Extent> {
    let mut votes: HashMap<u32, u32> = HashMap::new();
    anchors(new, |_, key| {
        if let Some(&chunk) = anchors_old.get(&key) {
            *votes.entry(chunk).or_default() += 1;
        }
    });
    let mut ranked: Vec<(u32, u32)> = votes.into_iter().collect();
    ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut picked: Vec<Extent> = Vec::new();
    let mut budget = window;
    for (chunk, _) in ranked {
        let Some(&(offset, len)) = old_chunks.get(chunk as usize) else { continue };
        if len > budget || picked.len() + 2 >= MAX_EXTENTS {
            break;
        }
        budget -= len;
        picked.push(Extent { offset, len });
    }
    // Fill what is left with the same-place guess, minus what is already picked.
    let mut guess = guess;
    guess.len = guess.len.min(budget);
    if guess.len > 0 {
        picked.push(guess);
    }
    merge(picked, window)
}

/// Sorts extents by offset and merges overlapping or touching ones, keeping the total within
/// `window` (overlaps only shrink it).
pub(super) fn merge(mut extents: Vec<Extent>, window: u64) -> Vec<Extent> {
    extents.sort_unstable_by_key(|e| e.offset);
    let mut merged: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        if let Some(last) = merged.last_mut()
            && e.offset <= last.offset + last.len
        {
            let end = (e.offset + e.len).max(last.offset + last.len);
            last.len = end - last.offset;
            continue;
        }
        merged.push(e);
    }
    let mut total = 0u64;
    merged.retain_mut(|e| {
        let keep = total < window;
        e.len = e.len.min(window - total.min(window));
        total += e.len;
        keep && e.len > 0
    });
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_joins_touching_extents_and_respects_the_window() {
        let merged = merge(
            vec![Extent { offset: 100, len: 50 }, Extent { offset: 0, len: 100 }, Extent { offset: 120, len: 100 }],
            1000,
        );
        assert_eq!(merged, vec![Extent { offset: 0, len: 220 }]);
        let capped = merge(vec![Extent { offset: 0, len: 100 }, Extent { offset: 500, len: 100 }], 150);
        assert_eq!(capped, vec![Extent { offset: 0, len: 100 }, Extent { offset: 500, len: 50 }]);
    }

    #[test]
    fn anchors_do_not_depend_on_what_precedes_by_more_than_64_bytes() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
        let mut a = Vec::new();
        anchors(&data[1000..], |i, k| a.push((i + 1000, k)));
        let mut b = Vec::new();
        anchors(&data, |i, k| b.push((i, k)));
        let b: Vec<_> = b.into_iter().filter(|(i, _)| *i >= 1064).collect();
        assert_eq!(a, b);
        assert!(a.len() > 100, "{} anchors", a.len());
    }
}
