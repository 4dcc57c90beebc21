//! The shared stream's encoder side: which sparse regions' record streams move into it, and
//! which old extents its frame is compressed against (see [`crate::delta`]'s docs for the
//! format).

use super::encode::{EncodeOptions, PROBE_LEVEL, merge};
use super::{DeltaError, Extent, OldImage, PatchHeader, RegionOp, SharedSlice, SharedStream, bsdiff, compress_zstd};

/// A sparse region's decoded record stream and the old bytes where its literal bytes go (the
/// old code they replace, which the new code's literals match best).
#[derive(Debug, Clone)]
pub(super) struct Shareable {
    pub(super) stream: Vec<u8>,
    pub(super) literals: Vec<Extent>,
}

/// Where in the old image each record's literal bytes would sit: the reference position after
/// its add bytes (as the applier's cursor moves), mapped through `reference`'s extents.
pub(super) fn literal_spots(reference: &[Extent], records: &[bsdiff::Record]) -> Vec<Extent> {
    let mut spots = Vec::new();
    let mut cursor = 0u64;
    for r in records {
        if r.add > 0 {
            cursor = (r.old_pos + r.add) as u64;
        }
        if r.copy == 0 {
            continue;
        }
        let mut start = 0u64;
        for e in reference {
            if cursor < start + e.len || (cursor == start + e.len && e.len > 0) {
                spots.push(Extent { offset: e.offset + (cursor - start), len: r.copy as u64 });
                break;
            }
            start += e.len;
        }
    }
    spots
}

/// Most decoded bytes of record streams gathered into the shared stream: real releases'
/// sparse streams are a few KiB, and the applier holds the whole stream.
pub(super) const SHARED_MAX: usize = 256 << 10;

/// Old bytes each side of a literal offered as the shared stream's reference: the edited
/// code's old version sits there, and a few KiB around it held nearly all the matches on the
/// app tar (a whole 8 MiB reference saved 10 more bytes for 3 s of level 19 indexing).
const SHARED_NEAR: u64 = 2 << 10;

/// Most reference extents tried, one compression each at the probe level.
const SHARED_TRIALS: usize = 32;

/// About what an extent of the shared stream's reference adds to the table.
const SHARED_EXTENT_COST: usize = 6;

/// Moves the records of sparse regions into one shared stream when that makes the patch
/// smaller (an edit repeated in several regions is then paid once): the streams concatenated,
/// compressed against the old bytes around their literals, the extents kept one by one where
/// they pay. Returns the shared stream's frame (empty when there is none) and updates `header`
/// and `bodies`.
pub(super) fn share(
    old: &dyn OldImage,
    header: &mut PatchHeader,
    bodies: &mut [Vec<u8>],
    shareable: Vec<Option<Box<Shareable>>>,
    opts: &EncodeOptions,
) -> Result<Vec<u8>, DeltaError> {
    if !opts.shared_stream {
        return Ok(Vec::new());
    }
    let mut picks: Vec<(usize, Box<Shareable>)> = Vec::new();
    let mut total = 0usize;
    for (i, candidate) in shareable.into_iter().enumerate() {
        if let Some(c) = candidate
            && header.regions[i].op == RegionOp::BsdiffSparse
            && total + c.stream.len() <= SHARED_MAX
            && !c.stream.is_empty()
        {
            total += c.stream.len();
            picks.push((i, c));
        }
    }
    if picks.len() < 2 {
        return Ok(Vec::new());
    }
    let stream: Vec<u8> = picks.iter().flat_map(|(_, c)| c.stream.iter().copied()).collect();
    let near: Vec<Extent> = picks
        .iter()
        .flat_map(|(_, c)| c.literals.iter())
        .map(|l| {
            let start = l.offset.saturating_sub(SHARED_NEAR);
            Extent { offset: start, len: (l.offset + l.len + SHARED_NEAR).min(old.size()) - start }
        })
        .collect();
    let mut candidates = merge(near, u64::MAX);
    candidates.truncate(SHARED_TRIALS);
    let compress = |extents: &[Extent], level: i32| -> Result<Vec<u8>, DeltaError> {
        let mut ref_bytes = Vec::new();
        super::load_reference(old, extents, &mut ref_bytes)?;
        compress_zstd(level, &ref_bytes, &stream).map_err(DeltaError::Compress)
    };
    let level = opts.level.min(PROBE_LEVEL);
    let mut kept: Vec<Extent> = Vec::new();
    let mut best = compress(&kept, level)?.len();
    for c in candidates {
        let mut trial = merge(kept.iter().copied().chain([c]).collect(), u64::MAX);
        if trial.iter().map(|e| e.len).sum::<u64>() > opts.window {
            break;
        }
        let size = compress(&trial, level)?.len();
        if size + SHARED_EXTENT_COST < best {
            best = size;
            kept = std::mem::take(&mut trial);
        }
    }
    let frame = compress(&kept, opts.level)?;
    let mut shared = header.clone();
    let mut offset = 0u64;
    for (i, c) in &picks {
        let region = &mut shared.regions[*i];
        region.shared = Some(SharedSlice { offset, len: c.stream.len() as u64 });
        region.payload_len = 0;
        offset += c.stream.len() as u64;
    }
    shared.window = shared.window.max(kept.iter().map(|e| e.len).sum());
    shared.shared =
        Some(SharedStream { extents: kept, len: offset, payload_offset: 0, payload_len: frame.len() as u64 });
    let moved: usize = picks.iter().map(|(i, _)| bodies[*i].len()).sum();
    if shared.encode().len() + frame.len() >= header.encode().len() + moved {
        return Ok(Vec::new());
    }
    *header = shared;
    for (i, _) in &picks {
        bodies[*i].clear();
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_spots_follow_the_cursor_through_the_reference_extents() {
        // Reference: old 1000..1100, then old 5000..5100. Records: 40 bytes added from 0, then
        // 3 literal bytes; nothing added, 2 literals (the cursor stays at 40); 30 added from
        // 120 (old 5020), then 5 literals at 150 (old 5050).
        let reference = [Extent { offset: 1000, len: 100 }, Extent { offset: 5000, len: 100 }];
        let r = |old_pos, add, copy| bsdiff::Record { old_pos, new_pos: 0, add, copy };
        let spots = literal_spots(&reference, &[r(0, 40, 3), r(0, 0, 2), r(120, 30, 5), r(0, 10, 0)]);
        assert_eq!(
            spots,
            vec![Extent { offset: 1040, len: 3 }, Extent { offset: 1040, len: 2 }, Extent { offset: 5050, len: 5 }]
        );
    }
}
