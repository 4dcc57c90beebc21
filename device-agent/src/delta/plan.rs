//! Which parts of the new image come from the patch and which come as chunks, cheapest in
//! bytes, once the patch's region table is known.
//!
//! **Groups.** A region's output need not start or end on a chunk boundary of the new index
//! (the encoder cuts at chunk boundaries, but the table is not trusted to). A chunk cut by a
//! region boundary can only be verified when both regions are applied, so the unit of choice
//! is a *group*: the shortest run of consecutive regions whose output starts and ends on chunk
//! boundaries (for the encoder's patches, one region). A group's payloads are contiguous in
//! the patch, because payloads follow table order. A group with a region whose records are in
//! the patch's shared stream also needs the shared stream's payload, which every such group
//! shares (so it is paid once, like any shared patch chunk).
//!
//! **Costs**, in bytes still to fetch (what the install's byte counters add up): taking a
//! group from the patch costs the patch chunks overlapping its payload that are not held yet;
//! taking it as chunks costs its chunks still missing from the target slot after local reuse.
//! Both sides are counted once per chunk id: a patch chunk shared by two chosen groups is paid
//! once, and a content chunk the image holds in several places is free as soon as one chosen
//! group produces it (the applier writes it to every place that is still missing).
//!
//! **Search.** The total is not a sum of independent choices (shared chunks), so the plan is a
//! local search: from "every group as chunks" and from "every group from the patch", flip a
//! group while that lowers the total, and keep the cheaper result. Each flip lowers the total,
//! so the search ends; it is also capped at [`MAX_PASSES`] passes. The plan is never dearer
//! than the whole patch or the chunks alone, the two starting points.

use std::collections::HashMap;
use std::ops::Range;

use flotilla_core::delta::PatchHeader;
use flotilla_core::ids::ChunkId;
use flotilla_core::index::ChunkIndex;

use crate::journal;

/// Improvement passes of the local search at most. Each pass visits every group once; real
/// tables settle in two or three, and the cap bounds the time a hostile table can take.
const MAX_PASSES: usize = 16;

/// Consecutive regions whose output starts and ends on chunk boundaries of the new index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Group {
    /// Region numbers in the patch's table.
    pub(super) regions: Range<u32>,
    /// New index entries the group produces.
    pub(super) entries: Range<usize>,
    /// Offset of its first byte in the new image.
    pub(super) new_offset: u64,
    /// Its payload bytes in the patch.
    pub(super) payload: Range<u64>,
    /// Some of its regions take their records from the shared stream.
    pub(super) shared: bool,
}

/// The plan: the groups to take from the patch, the patch chunks they need, and the figures
/// the install reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RegionPlan {
    /// Groups taken from the patch, in image order.
    pub(super) groups: Vec<Group>,
    /// Per patch index entry: needed by a chosen group (held or not).
    pub(super) patch_entries: Vec<bool>,
    /// Regions in the patch.
    pub(super) regions: usize,
    /// Regions taken from the patch.
    pub(super) from_patch: usize,
    /// Regions whose chunks the target slot already holds (taken from neither).
    pub(super) held: usize,
    /// Patch bytes this plan fetches.
    pub(super) patch_bytes: u64,
    /// Content chunk bytes this plan fetches.
    pub(super) chunk_bytes: u64,
    /// Patch bytes the whole patch would fetch.
    pub(super) whole_patch: u64,
    /// Content chunk bytes fetching chunks alone would fetch.
    pub(super) chunks_only: u64,
}

impl RegionPlan {
    /// Bytes this plan fetches.
    pub(super) fn total(&self) -> u64 {
        self.patch_bytes + self.chunk_bytes
    }
}

/// Cuts the table into groups. Regions past the index's end (a table and index that do not
/// describe the same image, which the caller refuses first) form no group.
pub(super) fn groups(header: &PatchHeader, index: &ChunkIndex) -> Vec<Group> {
    let lens: Vec<u64> = index.entries().iter().map(|e| u64::from(e.len)).collect();
    let mut out = Vec::new();
    let (mut entry, mut at) = (0usize, 0u64);
    let mut start: Option<(u32, usize, u64, u64)> = None;
    let mut shared = false;
    for (number, region) in (0u32..).zip(&header.regions) {
        let (first, first_entry, new_offset, payload_start) =
            *start.get_or_insert((number, entry, region.new_offset, region.payload_offset));
        shared |= region.shared.is_some();
        let end = region.new_offset.saturating_add(region.new_len);
        while entry < lens.len() && at + lens[entry] <= end {
            at += lens[entry];
            entry += 1;
        }
        if at == end {
            let payload_end = region.payload_offset.saturating_add(region.payload_len);
            out.push(Group {
                regions: first..number + 1,
                entries: first_entry..entry,
                new_offset,
                payload: payload_start..payload_end,
                shared,
            });
            start = None;
            shared = false;
        }
    }
    out
}

/// Interns chunk ids as small numbers with their lengths.
#[derive(Default)]
struct Keys {
    of: HashMap<ChunkId, usize>,
    len: Vec<u64>,
}

impl Keys {
    fn key(&mut self, id: ChunkId, len: u32) -> usize {
        *self.of.entry(id).or_insert_with(|| {
            self.len.push(u64::from(len));
            self.len.len() - 1
        })
    }
}

/// What each group costs: the patch chunk keys its payload needs, the content chunk keys it
/// would produce.
struct Costs {
    patch: Vec<Vec<usize>>,
    content: Vec<Vec<usize>>,
    patch_len: Vec<u64>,
    content_len: Vec<u64>,
}

/// A choice of groups and the reference counts that price it.
#[derive(Clone)]
struct State {
    chosen: Vec<bool>,
    /// Per patch key: chosen groups needing it.
    patch_refs: Vec<u32>,
    /// Per content key: chosen groups producing it.
    produced: Vec<u32>,
}

impl Costs {
    fn state(&self, chosen: Vec<bool>) -> State {
        let mut s = State {
            chosen: vec![false; chosen.len()],
            patch_refs: vec![0; self.patch_len.len()],
            produced: vec![0; self.content_len.len()],
        };
        for (g, take) in chosen.into_iter().enumerate() {
            if take {
                self.flip(&mut s, g);
            }
        }
        s
    }

    fn flip(&self, s: &mut State, g: usize) {
        let on = !s.chosen[g];
        s.chosen[g] = on;
        for &k in &self.patch[g] {
            if on { s.patch_refs[k] += 1 } else { s.patch_refs[k] -= 1 }
        }
        for &k in &self.content[g] {
            if on { s.produced[k] += 1 } else { s.produced[k] -= 1 }
        }
    }

    /// Bytes saved by flipping `g` (negative: it would cost more).
    fn gain(&self, s: &State, g: usize) -> i128 {
        let (patch, content): (u64, u64) = if s.chosen[g] {
            // Dropping it frees the patch chunks only it needs, and its chunks only it produced
            // are then fetched.
            (
                self.patch[g].iter().filter(|&&k| s.patch_refs[k] == 1).map(|&k| self.patch_len[k]).sum(),
                self.content[g].iter().filter(|&&k| s.produced[k] == 1).map(|&k| self.content_len[k]).sum(),
            )
        } else {
            // Taking it fetches the patch chunks nobody needs yet, and saves its chunks nobody
            // produces yet.
            return i128::from(
                self.content[g].iter().filter(|&&k| s.produced[k] == 0).map(|&k| self.content_len[k]).sum::<u64>(),
            ) - i128::from(
                self.patch[g].iter().filter(|&&k| s.patch_refs[k] == 0).map(|&k| self.patch_len[k]).sum::<u64>(),
            );
        };
        i128::from(patch) - i128::from(content)
    }

    fn bytes(&self, s: &State) -> (u64, u64) {
        let patch = s.patch_refs.iter().zip(&self.patch_len).filter(|(r, _)| **r > 0).map(|(_, l)| l).sum();
        let content = s.produced.iter().zip(&self.content_len).filter(|(p, _)| **p == 0).map(|(_, l)| l).sum();
        (patch, content)
    }

    fn search(&self, mut s: State) -> State {
        for _ in 0..MAX_PASSES {
            let mut improved = false;
            for g in 0..s.chosen.len() {
                if self.content[g].is_empty() && !s.chosen[g] {
                    continue; // produces nothing missing
                }
                if self.gain(&s, g) > 0 {
                    self.flip(&mut s, g);
                    improved = true;
                }
            }
            if !improved {
                break;
            }
        }
        // A chosen group producing nothing missing only costs apply time (its patch chunks
        // are shared, or dropping it would have been a gain).
        for g in 0..s.chosen.len() {
            if s.chosen[g] && self.content[g].is_empty() {
                self.flip(&mut s, g);
            }
        }
        s
    }
}

/// Patch entries (by their `(start, end)` spans) overlapping `payload`.
fn overlapping(spans: &[(u64, u64)], payload: Range<u64>) -> impl Iterator<Item = usize> + '_ {
    let first = spans.partition_point(|(_, end)| *end <= payload.start);
    (first..spans.len()).take_while(move |&i| payload.start < payload.end && spans[i].0 < payload.end)
}

/// Patch entries a group needs: those under its payloads and, when it has regions in the
/// shared stream, under the shared stream's payload (`shared`).
fn needed<'a>(spans: &'a [(u64, u64)], group: &Group, shared: Range<u64>) -> impl Iterator<Item = usize> + 'a {
    let shared = if group.shared { shared } else { 0..0 };
    overlapping(spans, shared).chain(overlapping(spans, group.payload.clone()))
}

/// Plans the install of `index` from `header`'s regions given the target slot's done bits
/// (`done`, over `index`) and the patch chunks already held (`held`, over `patch_index`).
pub(super) fn plan(
    header: &PatchHeader,
    index: &ChunkIndex,
    done: &[u8],
    patch_index: &ChunkIndex,
    held: &[u8],
) -> RegionPlan {
    let groups = groups(header, index);
    // The shared stream's payload, needed by every group that has a region in it.
    let shared =
        header.shared.as_ref().map_or(0..0, |s| s.payload_offset..s.payload_offset.saturating_add(s.payload_len));
    let patch_spans: Vec<(u64, u64)> =
        patch_index.iter_with_offsets().map(|(o, e)| (o, o + u64::from(e.len))).collect();
    let mut patch_keys = Keys::default();
    let patch_key: Vec<Option<usize>> = patch_index
        .entries()
        .iter()
        .enumerate()
        .map(|(i, e)| (!journal::is_done(held, i)).then(|| patch_keys.key(e.id, e.len)))
        .collect();
    let mut content_keys = Keys::default();
    let entries = index.entries();
    let mut costs = Costs { patch: Vec::new(), content: Vec::new(), patch_len: Vec::new(), content_len: Vec::new() };
    for g in &groups {
        let mut patch: Vec<usize> = needed(&patch_spans, g, shared.clone()).filter_map(|i| patch_key[i]).collect();
        patch.sort_unstable();
        patch.dedup();
        let mut content: Vec<usize> = g
            .entries
            .clone()
            .filter(|&i| !journal::is_done(done, i))
            .map(|i| content_keys.key(entries[i].id, entries[i].len))
            .collect();
        content.sort_unstable();
        content.dedup();
        costs.patch.push(patch);
        costs.content.push(content);
    }
    // Missing chunks outside every group (only when table and index disagree) stay chunks.
    for (i, e) in entries.iter().enumerate() {
        if !journal::is_done(done, i) {
            content_keys.key(e.id, e.len);
        }
    }
    costs.patch_len = patch_keys.len;
    costs.content_len = content_keys.len;

    let whole_patch: u64 = costs.patch_len.iter().sum();
    let chunks_only: u64 = costs.content_len.iter().sum();
    let from_chunks = costs.search(costs.state(vec![false; groups.len()]));
    let from_patch = costs.search(costs.state(costs.content.iter().map(|c| !c.is_empty()).collect()));
    let rank = |s: &State| {
        let (p, c) = costs.bytes(s);
        (p + c, s.chosen.iter().filter(|c| **c).count())
    };
    let best = if rank(&from_patch) < rank(&from_chunks) { from_patch } else { from_chunks };
    let (patch_bytes, chunk_bytes) = costs.bytes(&best);

    let mut patch_entries = vec![false; patch_spans.len()];
    let (mut chosen, mut from_patch, mut held_regions) = (Vec::new(), 0usize, 0usize);
    for (g, group) in groups.into_iter().enumerate() {
        let regions = group.regions.len();
        if best.chosen[g] {
            for i in needed(&patch_spans, &group, shared.clone()) {
                patch_entries[i] = true;
            }
            from_patch += regions;
            chosen.push(group);
        } else if costs.content[g].is_empty() {
            held_regions += regions;
        }
    }
    RegionPlan {
        groups: chosen,
        patch_entries,
        regions: header.regions.len(),
        from_patch,
        held: held_regions,
        patch_bytes,
        chunk_bytes,
        whole_patch,
        chunks_only,
    }
}

#[cfg(test)]
mod tests {
    use flotilla_core::delta::{Extent, Region, RegionOp};
    use flotilla_core::index::IndexEntry;

    use super::*;

    fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    /// An index of chunks with these ids (numbers) and lengths.
    fn index_of(chunks: &[(u32, u32)]) -> ChunkIndex {
        let entries = chunks.iter().map(|&(n, len)| IndexEntry { id: id(n), len }).collect();
        ChunkIndex::new(flotilla_core::chunking::ChunkParams { min: 64, avg: 1024, max: 1 << 20 }, entries).unwrap()
    }

    /// A table of zstd regions with these new and payload lengths; payloads start at 100.
    fn header_of(regions: &[(u64, u64)]) -> PatchHeader {
        let (mut new_offset, mut payload_offset) = (0, 100);
        let regions = regions
            .iter()
            .map(|&(new_len, payload_len)| {
                let r = Region {
                    op: RegionOp::Zstd,
                    new_offset,
                    new_len,
                    extents: vec![Extent { offset: 0, len: 1 }],
                    payload_offset,
                    payload_len,
                    shared: None,
                };
                new_offset += new_len;
                payload_offset += payload_len;
                r
            })
            .collect();
        PatchHeader { old_size: 1, new_size: new_offset, window: 1 << 20, shared: None, regions }
    }

    fn bits(n: usize, set: &[usize]) -> Vec<u8> {
        let mut b = vec![0u8; n.div_ceil(8)];
        for &i in set {
            journal::set_done(&mut b, i);
        }
        b
    }

    #[test]
    fn regions_cut_inside_a_chunk_are_grouped_until_a_chunk_boundary() {
        // Chunks of 100 bytes; regions of 100, 50, 150, 100: the middle two share a chunk.
        let index = index_of(&[(1, 100), (2, 100), (3, 100), (4, 100)]);
        let header = header_of(&[(100, 10), (50, 5), (150, 20), (100, 0)]);
        let g = groups(&header, &index);
        assert_eq!(g.len(), 3);
        assert_eq!((g[1].regions.clone(), g[1].entries.clone(), g[1].new_offset), (1..3, 1..3, 100));
        assert_eq!(g[1].payload, 110..135);
        assert_eq!((g[2].regions.clone(), g[2].entries.clone()), (3..4, 3..4));
    }

    #[test]
    fn each_part_goes_the_cheaper_way_and_shared_patch_chunks_are_paid_once() {
        // Image: 4 groups of one 1000-byte chunk each. Group 0 is held already; group 1's
        // payload is small, group 2's is bigger than its chunk, group 3's small and in the
        // same patch chunk as group 1's.
        let index = index_of(&[(1, 1000), (2, 1000), (3, 1000), (4, 1000)]);
        let header = header_of(&[(1000, 900), (1000, 70), (1000, 1500), (1000, 70)]);
        // Patch chunks: header 0..100, then group 0's payload 100..1000, group 1's 1000..1070,
        // group 2's 1070..2570, group 3's 2570..2640; groups 1 and 3 carry the same bytes, so
        // the patch index lists one chunk id twice (content-addressed), paid once.
        let patch = index_of(&[(10, 100), (11, 900), (12, 70), (13, 1500), (12, 70)]);
        let done = bits(4, &[0]);
        let held = bits(5, &[0]); // the header's chunk
        let p = plan(&header, &index, &done, &patch, &held);
        let chosen: Vec<u32> = p.groups.iter().map(|g| g.regions.start).collect();
        assert_eq!(chosen, vec![1, 3]);
        assert_eq!((p.patch_bytes, p.chunk_bytes), (70, 1000), "{p:?}");
        assert_eq!((p.whole_patch, p.chunks_only), (900 + 70 + 1500, 3000));
        assert_eq!((p.from_patch, p.held, p.regions), (2, 1, 4));
        assert_eq!(p.patch_entries, vec![false, false, true, false, true]);
        assert!(p.total() < p.whole_patch && p.total() < p.chunks_only);
    }

    #[test]
    fn a_chunk_in_several_places_is_free_once_one_chosen_group_produces_it() {
        // Chunk 7 appears in groups 0 and 1. Group 0 from the patch produces it for both.
        let index = index_of(&[(7, 1000), (8, 1000), (7, 1000)]);
        let header = header_of(&[(1000, 100), (2000, 5000)]);
        let patch = index_of(&[(10, 100), (11, 100), (12, 5000)]);
        let p = plan(&header, &index, &bits(3, &[]), &patch, &bits(3, &[0]));
        assert_eq!(p.groups.len(), 1);
        assert_eq!(p.groups[0].regions, 0..1);
        assert_eq!((p.patch_bytes, p.chunk_bytes), (100, 1000), "chunk 8 alone is fetched: {p:?}");
    }

    #[test]
    fn the_shared_stream_is_paid_once_by_the_groups_that_need_it() {
        // Four groups of one 1000-byte chunk. Groups 1 and 3 take their records from the shared
        // stream (patch bytes 100..400, its own patch chunk) and have no payload of their own;
        // groups 0 and 2 have payloads of 500 each.
        let index = index_of(&[(1, 1000), (2, 1000), (3, 1000), (4, 1000)]);
        let mut header = header_of(&[(1000, 500), (1000, 0), (1000, 500), (1000, 0)]);
        header.shared = Some(flotilla_core::delta::SharedStream {
            extents: Vec::new(),
            len: 2000,
            payload_offset: 100,
            payload_len: 300,
        });
        for (r, offset) in header.regions.iter_mut().zip([400u64, 900, 900, 1400]) {
            r.payload_offset = offset;
        }
        for n in [1, 3] {
            header.regions[n].op = RegionOp::BsdiffSparse;
            header.regions[n].shared = Some(flotilla_core::delta::SharedSlice { offset: 0, len: 1000 });
        }
        let g = groups(&header, &index);
        assert_eq!(g.iter().map(|g| g.shared).collect::<Vec<_>>(), vec![false, true, false, true]);
        // Patch chunks: header, shared stream, group 0's payload, group 2's payload.
        let patch = index_of(&[(10, 100), (11, 300), (12, 500), (13, 500)]);
        // Only chunks 2 and 4 missing: the shared stream (300) beats two chunks (2000).
        let p = plan(&header, &index, &bits(4, &[0, 2]), &patch, &bits(4, &[0]));
        assert_eq!(p.groups.iter().map(|g| g.regions.start).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!((p.patch_bytes, p.chunk_bytes), (300, 0), "{p:?}");
        assert_eq!(p.patch_entries, vec![false, true, false, false]);
        // Only chunk 2 missing: 300 bytes of shared stream still beat its 1000-byte chunk.
        let p = plan(&header, &index, &bits(4, &[0, 2, 3]), &patch, &bits(4, &[0]));
        assert_eq!((p.patch_bytes, p.chunk_bytes), (300, 0), "{p:?}");
        // A shared stream dearer than the chunk: the chunk.
        header.shared.as_mut().unwrap().payload_len = 300;
        let dear = index_of(&[(10, 100), (11, 1300), (12, 500), (13, 500)]);
        let p = plan(&header, &index, &bits(4, &[0, 2, 3]), &dear, &bits(4, &[0]));
        assert_eq!((p.patch_bytes, p.chunk_bytes), (0, 1000), "{p:?}");
    }

    #[test]
    fn nothing_missing_means_nothing_from_the_patch() {
        let index = index_of(&[(1, 1000), (2, 1000)]);
        let header = header_of(&[(1000, 10), (1000, 10)]);
        let patch = index_of(&[(10, 120)]);
        let p = plan(&header, &index, &bits(2, &[0, 1]), &patch, &bits(1, &[]));
        assert!(p.groups.is_empty());
        assert_eq!((p.total(), p.held), (0, 2));
    }

    #[test]
    fn when_every_part_wins_from_the_patch_the_plan_is_the_whole_patch() {
        let index = index_of(&[(1, 1000), (2, 1000), (3, 1000)]);
        let header = header_of(&[(1000, 10), (1000, 10), (1000, 10)]);
        let patch = index_of(&[(10, 130)]);
        let p = plan(&header, &index, &bits(3, &[]), &patch, &bits(1, &[]));
        assert_eq!((p.from_patch, p.patch_bytes, p.chunk_bytes), (3, 130, 0));
        assert_eq!(p.total(), p.whole_patch);
    }
}
