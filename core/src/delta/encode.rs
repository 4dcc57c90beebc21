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

use super::{
    DeltaError, Extent, HEADER_LEN, MAX_EXTENTS, OldImage, PatchHeader, Region, RegionOp, bsdiff, compress_zstd,
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
    /// bsdiff is tried on a region when its reference plus new bytes are at most this.
    pub bsdiff_max: u64,
    /// Worker threads.
    pub threads: NonZeroUsize,
    /// Give up once the patch grows past this.
    pub max_patch_size: u64,
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
}

/// One planned region before encoding.
#[derive(Debug, Clone)]
enum Planned {
    Copy(Vec<Extent>),
    Patch { new_offset: u64, new_len: u64, reference: Vec<Extent> },
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
        vec![Planned::Patch { new_offset: 0, new_len: new.size(), reference }]
    } else {
        plan_regions(old, old_index, new, new_index, opts)?
    };
    let payloads = encode_regions(old, new, &plan, opts, progress)?;

    let mut regions = Vec::with_capacity(plan.len());
    let mut new_offset = 0u64;
    let mut window = 0u64;
    let mut stats = EncodeStats {
        method: DeltaMethod::Zstd,
        patch_size: 0,
        encode_time: Duration::ZERO,
        regions: 0,
        copied_bytes: 0,
        patched_bytes: 0,
        zstd_regions: 0,
        bsdiff_regions: 0,
    };
    for (planned, payload) in plan.into_iter().zip(&payloads) {
        let region = match (planned, payload) {
            (Planned::Copy(extents), _) => {
                let new_len = extents.iter().map(|e| e.len).sum();
                stats.copied_bytes += new_len;
                Region { op: RegionOp::Copy, new_offset, new_len, extents, payload_offset: 0, payload_len: 0 }
            }
            (Planned::Patch { new_len, reference, .. }, Some((op, bytes))) => {
                window = window.max(new_len).max(reference.iter().map(|e| e.len).sum());
                stats.patched_bytes += new_len;
                match op {
                    RegionOp::Bsdiff => stats.bsdiff_regions += 1,
                    _ => stats.zstd_regions += 1,
                }
                Region {
                    op: *op,
                    new_offset,
                    new_len,
                    extents: reference,
                    payload_offset: 0,
                    payload_len: bytes.len() as u64,
                }
            }
            (Planned::Patch { .. }, None) => {
                return Err(DeltaError::InvalidOptions { reason: "a region was not encoded" });
            }
        };
        new_offset += region.new_len;
        regions.push(region);
    }
    let mut header = PatchHeader { old_size: old.size(), new_size: new.size(), window, regions };
    let mut payload_offset = header.encoded_len();
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
    for (_, bytes) in payloads.iter().flatten() {
        out.write_all(bytes).map_err(DeltaError::Write)?;
    }
    stats.method = header.method();
    stats.patch_size = payload_offset;
    stats.regions = u32::try_from(header.regions.len()).unwrap_or(u32::MAX);
    stats.encode_time = started.elapsed();
    Ok(stats)
}

/// One unit of work: one method on one planned region.
#[derive(Debug, Clone, Copy)]
struct Job {
    region: usize,
    op: RegionOp,
}

type Payloads = Vec<Option<(RegionOp, Vec<u8>)>>;

fn encode_regions(
    old: &dyn OldImage,
    new: &dyn OldImage,
    plan: &[Planned],
    opts: &EncodeOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Payloads, DeltaError> {
    let total = new.size();
    let mut done = 0u64;
    let mut jobs = Vec::new();
    let mut methods_left = vec![0usize; plan.len()];
    for (i, planned) in plan.iter().enumerate() {
        match planned {
            Planned::Copy(extents) => done += extents.iter().map(|e| e.len).sum::<u64>(),
            Planned::Patch { new_len, reference, .. } => {
                let reference_len: u64 = reference.iter().map(|e| e.len).sum();
                // bsdiff first: it is the slow one, so it starts early.
                if reference_len > 0 && reference_len + new_len <= opts.bsdiff_max {
                    jobs.push(Job { region: i, op: RegionOp::Bsdiff });
                    methods_left[i] += 1;
                }
                jobs.push(Job { region: i, op: RegionOp::Zstd });
                methods_left[i] += 1;
            }
        }
    }
    progress(done, total);
    let mut payloads: Payloads = vec![None; plan.len()];
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<DeltaError>> = Mutex::new(None);
    let workers = opts.threads.get().min(jobs.len()).max(1);
    let (tx, rx) = mpsc::sync_channel::<(Job, Vec<u8>)>(workers);
    let mut patch_size = 0u64;
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (jobs, next, stop, first_error) = (&jobs, &next, &stop, &first_error);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)).copied() else { break };
                    match encode_job(old, new, &plan[job.region], job.op, opts.level) {
                        Ok(bytes) => {
                            if tx.send((job, bytes)).is_err() {
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
        for (job, bytes) in rx {
            let slot = &mut payloads[job.region];
            let better = slot.as_ref().is_none_or(|(_, kept)| bytes.len() < kept.len());
            if better {
                patch_size = patch_size - slot.as_ref().map_or(0, |(_, kept)| kept.len() as u64) + bytes.len() as u64;
                *slot = Some((job.op, bytes));
            }
            methods_left[job.region] -= 1;
            if methods_left[job.region] == 0
                && let Planned::Patch { new_len, .. } = &plan[job.region]
            {
                done += new_len;
                progress(done, total);
            }
            if patch_size > opts.max_patch_size {
                stop.store(true, Ordering::Relaxed);
            }
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    if patch_size > opts.max_patch_size {
        return Err(DeltaError::PatchTooLarge { limit: opts.max_patch_size });
    }
    Ok(payloads)
}

fn encode_job(
    old: &dyn OldImage,
    new: &dyn OldImage,
    planned: &Planned,
    op: RegionOp,
    level: i32,
) -> Result<Vec<u8>, DeltaError> {
    let Planned::Patch { new_offset, new_len, reference } = planned else {
        return Ok(Vec::new());
    };
    let mut ref_bytes = Vec::new();
    super::load_reference(old, reference, &mut ref_bytes)?;
    let mut new_bytes =
        vec![0u8; usize::try_from(*new_len).map_err(|_| DeltaError::InvalidOptions { reason: "region" })?];
    new.read_at(&mut new_bytes, *new_offset).map_err(DeltaError::ReadOld)?;
    match op {
        RegionOp::Bsdiff => bsdiff::diff(&ref_bytes, &new_bytes, level).map_err(DeltaError::Compress),
        _ => compress_zstd(level, &ref_bytes, &new_bytes).map_err(DeltaError::Compress),
    }
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
                let reference = choose_reference(&buf, &anchors_old, &old_chunks, guess, opts.window);
                plan.push(Planned::Patch { new_offset: at, new_len: len, reference });
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
fn merge(mut extents: Vec<Extent>, window: u64) -> Vec<Extent> {
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
