//! Patches: round trips through `encode` and `apply` on generated data for each method and
//! plan, and refusals of wrong bases and damaged patches.

use std::collections::HashSet;

use proptest::collection::vec;
use proptest::prelude::*;

use flotilla_core::chunking::{ChunkParams, Chunker};
use flotilla_core::delta::{
    self, DeltaError, DeltaLimits, EncodeOptions, EncodeStats, Extent, PatchHeader, Region, RegionApplier, RegionOp,
};
use flotilla_core::index::ChunkIndex;
use flotilla_core::manifest::DeltaMethod;

/// Text-like bytes (a small alphabet of words), so that compressors and matchers behave as on
/// real files rather than on incompressible noise.
fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 12] =
        [b"function ", b"return ", b"const ", b"let ", b"=> ", b"{", b"}", b"(a,b)", b";\n", b"value", b"this.", b"0x"];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize]);
        out.extend_from_slice(format!("{}", (x >> 40) % 1000).as_bytes());
    }
    out.truncate(len);
    out
}

fn index(data: &[u8], params: ChunkParams) -> ChunkIndex {
    Chunker::new(params).chunk_reader(data).unwrap().index
}

fn small_window_opts() -> EncodeOptions {
    let mut opts = EncodeOptions::default();
    opts.window = 256 << 10;
    opts.region_len = 96 << 10;
    opts.level = 9;
    opts
}

/// Encodes, checks the header against the options, applies, checks the output.
fn round_trip(old: &[u8], new: &[u8], params: ChunkParams, opts: &EncodeOptions) -> (Vec<u8>, EncodeStats) {
    let (old_index, new_index) = (index(old, params), index(new, params));
    let mut patch = Vec::new();
    let mut last = (0, 0);
    let stats = delta::encode(&old.to_vec(), &old_index, &new.to_vec(), &new_index, opts, &mut patch, &mut |d, t| {
        assert!(d >= last.0 && d <= t, "progress went {last:?} -> ({d}, {t})");
        last = (d, t);
    })
    .unwrap();
    assert_eq!(last, (new.len() as u64, new.len() as u64), "progress must end at the total");
    assert_eq!(stats.patch_size, patch.len() as u64);
    let header = PatchHeader::read(&mut patch.as_slice(), &DeltaLimits::default()).unwrap();
    assert!(header.window <= opts.window, "window {} above {}", header.window, opts.window);
    assert_eq!(header.method(), stats.method);
    let mut out = Vec::new();
    let written =
        delta::apply(&mut patch.as_slice(), &old.to_vec(), &mut out, &DeltaLimits::with_window(opts.window)).unwrap();
    assert_eq!(written, new.len() as u64);
    assert!(out == new, "patched output differs from the new image");
    (patch, stats)
}

/// Bytes of new chunks absent from the old image: what chunk reuse alone would fetch.
fn new_chunk_bytes(old: &[u8], new: &[u8], params: ChunkParams) -> u64 {
    let have: HashSet<_> = index(old, params).entries().iter().map(|e| e.id).collect();
    index(new, params).entries().iter().filter(|e| !have.contains(&e.id)).map(|e| u64::from(e.len)).sum()
}

#[test]
fn small_images_patch_as_one_region_much_smaller_than_chunks() {
    let old = text(1, 600 << 10);
    let mut new = old.clone();
    for at in (1000..new.len()).step_by(40_000) {
        new[at..at + 6].copy_from_slice(b"EDITED");
    }
    new.splice(300_000..300_000, text(2, 3000));
    let (patch, stats) = round_trip(&old, &new, ChunkParams::BUNDLE, &EncodeOptions::default());
    assert_eq!(stats.regions, 1);
    assert!(matches!(stats.method, DeltaMethod::Zstd | DeltaMethod::Bsdiff));
    let chunks = new_chunk_bytes(&old, &new, ChunkParams::BUNDLE);
    assert!((patch.len() as u64) * 10 < chunks, "patch {} bytes, new chunks {chunks}", patch.len());
}

#[test]
fn scattered_arithmetic_edits_pick_bsdiff_when_allowed_and_zstd_when_not() {
    // Patch-release style: many small numeric changes spread over the image (relocated
    // addresses), where bsdiff's add-to-old bytes beat zstd's literals.
    let old = text(3, 400 << 10);
    let mut new = old.clone();
    for at in (0..new.len()).step_by(97) {
        new[at] = new[at].wrapping_add(1);
    }
    let (with_bsdiff, stats) = round_trip(&old, &new, ChunkParams::BUNDLE, &EncodeOptions::default());
    assert_eq!(stats.method, DeltaMethod::Bsdiff);
    let mut opts = EncodeOptions::default();
    opts.bsdiff_max = 0;
    let (zstd_only, stats) = round_trip(&old, &new, ChunkParams::BUNDLE, &opts);
    assert_eq!(stats.method, DeltaMethod::Zstd);
    assert_eq!(stats.bsdiff_regions, 0);
    assert!(with_bsdiff.len() < zstd_only.len(), "{} vs {}", with_bsdiff.len(), zstd_only.len());
}

#[test]
fn large_images_patch_by_regions_with_copies_moves_and_insertions() {
    let old = text(4, 3 << 20);
    let mut new = old.clone();
    // Scattered edits, an insertion, and a block moved from the front to the end.
    for at in (5000..new.len()).step_by(600_000) {
        new[at..at + 8].copy_from_slice(b"CHANGED!");
    }
    new.splice(1_500_000..1_500_000, text(5, 50_000));
    let moved: Vec<u8> = new.drain(100_000..400_000).collect();
    new.extend_from_slice(&moved);
    let opts = small_window_opts();
    let (patch, stats) = round_trip(&old, &new, ChunkParams::BUNDLE, &opts);
    assert_eq!(stats.method, DeltaMethod::Regions);
    assert!(stats.copied_bytes > 0 && stats.patched_bytes > 0, "{stats:?}");
    let header = PatchHeader::read(&mut patch.as_slice(), &DeltaLimits::default()).unwrap();
    assert!(header.regions.iter().any(|r| r.op == RegionOp::Copy));
    let chunks = new_chunk_bytes(&old, &new, ChunkParams::BUNDLE);
    assert!((patch.len() as u64) * 4 < chunks, "patch {} bytes, new chunks {chunks}", patch.len());
}

#[test]
fn many_small_edits_far_apart_become_few_sparse_regions() {
    // Version-bump style: one byte changed every 400 KiB of an 8 MiB image. As separate
    // regions each edit costs a zstd frame and two table records; grouped, a few bytes.
    let old = text(21, 8 << 20);
    let mut new = old.clone();
    for at in (50_000..new.len()).step_by(400 << 10) {
        new[at] = new[at].wrapping_add(1);
    }
    let edits = (50_000..new.len()).step_by(400 << 10).count();
    let mut opts = EncodeOptions::default();
    opts.window = 1 << 20;
    opts.region_len = 256 << 10;
    opts.level = 9;
    let (patch, stats) = round_trip(&old, &new, ChunkParams::BUNDLE, &opts);
    let header = PatchHeader::read(&mut patch.as_slice(), &DeltaLimits::default()).unwrap();
    let sparse = header.regions.iter().filter(|r| r.op == RegionOp::BsdiffSparse).count();
    assert!(sparse > 0, "{stats:?}");
    assert!(header.regions.len() * 2 <= edits, "{} regions for {edits} edits", header.regions.len());
    let mut separate = opts.clone();
    separate.bsdiff_max = 0;
    let (plain, _) = round_trip(&old, &new, ChunkParams::BUNDLE, &separate);
    assert!(patch.len() < plain.len(), "grouped {} bytes, separate {}", patch.len(), plain.len());
}

/// Three 1 MiB "bundles" that get the same new function at the same place, plus a one-byte
/// edit near each start (a version string): what a compiler release does to the bundles of an
/// app tree.
fn repeated_edit_pair() -> (Vec<u8>, Vec<u8>) {
    let files: Vec<Vec<u8>> = (0..3).map(|i| text(40 + i, 1 << 20)).collect();
    let block = text(99, 1500);
    let mut new_files = files.clone();
    for f in &mut new_files {
        f[100] = f[100].wrapping_add(1);
        f.splice(500_000..500_800, block.iter().copied());
    }
    (files.concat(), new_files.concat())
}

fn repeated_edit_opts() -> EncodeOptions {
    let mut opts = EncodeOptions::default();
    opts.window = 1 << 20;
    opts.region_len = 256 << 10;
    opts.level = 9;
    opts
}

#[test]
fn an_edit_repeated_in_far_apart_regions_is_paid_once_in_the_shared_stream() {
    let (old, new) = repeated_edit_pair();
    let opts = repeated_edit_opts();
    let (patch, stats) = round_trip(&old, &new, ChunkParams::BUNDLE, &opts);
    let header = PatchHeader::read(&mut patch.as_slice(), &DeltaLimits::default()).unwrap();
    let shared = header.shared.as_ref().expect("a shared stream");
    let in_shared = header.regions.iter().filter(|r| r.shared.is_some()).count();
    assert!(in_shared >= 3 && stats.shared_regions as usize == in_shared, "{stats:?}");
    assert!(header.regions.iter().filter(|r| r.shared.is_some()).all(|r| r.payload_len == 0));
    assert_eq!(shared.payload_offset, header.encoded_len());
    assert_eq!(header.payload_end(), patch.len() as u64);
    let mut separate_opts = opts.clone();
    separate_opts.shared_stream = false;
    let (separate, _) = round_trip(&old, &new, ChunkParams::BUNDLE, &separate_opts);
    let separate_header = PatchHeader::read(&mut separate.as_slice(), &DeltaLimits::default()).unwrap();
    assert!(separate_header.shared.is_none());
    // The block's literals (about 700 bytes compressed) are paid once instead of three times.
    assert!(patch.len() + 800 < separate.len(), "shared {} bytes, separate {}", patch.len(), separate.len());
}

#[test]
fn regions_in_the_shared_stream_apply_alone_once_it_is_loaded() {
    let (old, new) = repeated_edit_pair();
    let (patch, _) = round_trip(&old, &new, ChunkParams::BUNDLE, &repeated_edit_opts());
    let header = PatchHeader::read(&mut patch.as_slice(), &DeltaLimits::default()).unwrap();
    let shared = header.shared.clone().expect("a shared stream");
    let frame = &patch[shared.payload_offset as usize..(shared.payload_offset + shared.payload_len) as usize];
    let chosen: Vec<u32> =
        (0..header.regions.len() as u32).filter(|n| header.regions[*n as usize].shared.is_some()).collect();
    let mut applier = RegionApplier::new(&header, &old, &DeltaLimits::default()).unwrap();
    // Before the shared stream is loaded, a region in it cannot be applied.
    let err = applier.apply(chosen[0], &mut &[][..], &mut Vec::new()).unwrap_err();
    assert!(matches!(err, DeltaError::Malformed { .. }), "{err}");
    // A cut shared stream is refused, and so is one with a byte more.
    for cut in [0, 1, frame.len() / 2, frame.len() - 1] {
        let err = applier.load_shared(&mut &frame[..cut]).unwrap_err();
        assert!(matches!(err, DeltaError::Truncated { .. } | DeltaError::CorruptShared { .. }), "cut at {cut}: {err}");
    }
    let mut longer = frame.to_vec();
    longer.push(0);
    let mut header_longer = header.clone();
    header_longer.shared.as_mut().unwrap().payload_len += 1;
    let mut other = RegionApplier::new(&header_longer, &old, &DeltaLimits::default()).unwrap();
    let err = other.load_shared(&mut longer.as_slice()).unwrap_err();
    assert!(matches!(err, DeltaError::CorruptShared { .. }), "{err}");
    // Loaded from its payload bytes alone, then each region from nothing else: last first,
    // each yields exactly its range of the new image.
    applier.load_shared(&mut &frame[..]).unwrap();
    for &n in chosen.iter().rev() {
        let r = &header.regions[n as usize];
        let mut out = Vec::new();
        assert_eq!(applier.apply(n, &mut &[][..], &mut out).unwrap(), r.new_len);
        assert!(out == new[r.new_offset as usize..(r.new_offset + r.new_len) as usize], "region {n} differs");
    }
    // Flips in the shared stream: caught when it is loaded or when a region is applied, or
    // the output differs (which the caller's chunk ids catch); never a panic.
    let mut caught = 0;
    for at in 0..frame.len() {
        let mut bad = frame.to_vec();
        bad[at] ^= 0x5a;
        let mut applier = RegionApplier::new(&header, &old, &DeltaLimits::default()).unwrap();
        let result = applier.load_shared(&mut bad.as_slice()).and_then(|()| {
            chosen.iter().try_for_each(|&n| applier.apply(n, &mut &[][..], &mut std::io::sink()).map(|_| ()))
        });
        match result {
            Err(DeltaError::CorruptShared { .. } | DeltaError::Truncated { .. } | DeltaError::CorruptRegion { .. }) => {
                caught += 1
            }
            Ok(()) => {}
            Err(e) => panic!("flip at {at}: unexpected {e}"),
        }
    }
    assert!(caught > frame.len() / 2, "{caught} of {} flips caught", frame.len());
}

#[test]
fn a_patch_with_a_shared_stream_cut_anywhere_is_refused() {
    let (old, new) = repeated_edit_pair();
    let (patch, _) = round_trip(&old, &new, ChunkParams::BUNDLE, &repeated_edit_opts());
    for cut in 0..patch.len() {
        let err = delta::apply(&mut &patch[..cut], &old, &mut std::io::sink(), &DeltaLimits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                DeltaError::Truncated { .. } | DeltaError::CorruptShared { .. } | DeltaError::CorruptRegion { .. }
            ),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn a_region_finds_content_that_moved_far_away() {
    // A changed file whose old copy sits far from its new place: the anchors must find it.
    let filler_a = text(6, 2 << 20);
    let file = text(7, 200 << 10);
    let filler_b = text(8, 2 << 20);
    let old = [file.clone(), filler_a.clone(), filler_b.clone()].concat();
    let mut edited = file.clone();
    for at in (0..edited.len()).step_by(1000) {
        edited[at] ^= 0x20;
    }
    let new = [filler_a, filler_b, edited].concat();
    let (patch, _) = round_trip(&old, &new, ChunkParams::BUNDLE, &small_window_opts());
    assert!(patch.len() < 40_000, "patch {} bytes for 200 edits in a moved 200 KiB file", patch.len());
}

#[test]
fn empty_images_round_trip() {
    let some = text(9, 10_000);
    for (old, new) in [(&[][..], &some[..]), (&some[..], &[][..]), (&[][..], &[][..])] {
        round_trip(old, new, ChunkParams::BUNDLE, &EncodeOptions::default());
    }
}

#[test]
fn a_base_of_the_wrong_size_is_refused() {
    let old = text(10, 100_000);
    let new = text(11, 100_000);
    let (patch, _) = round_trip(&old, &new, ChunkParams::BUNDLE, &EncodeOptions::default());
    let wrong = text(10, 100_001);
    let err = delta::apply(&mut patch.as_slice(), &wrong, &mut Vec::new(), &DeltaLimits::default()).unwrap_err();
    assert!(matches!(err, DeltaError::BaseMismatch { expected: 100_000, actual: 100_001 }), "{err}");
}

#[test]
fn a_base_of_the_right_size_but_other_content_does_not_reproduce_the_image() {
    // The patch carries no hash: the caller's chunk and SHA-256 checks catch this case.
    let old = text(12, 100_000);
    let mut new = old.clone();
    new[50_000..50_010].copy_from_slice(b"0123456789");
    let (patch, _) = round_trip(&old, &new, ChunkParams::BUNDLE, &EncodeOptions::default());
    let other = text(13, 100_000);
    let mut out = Vec::new();
    if delta::apply(&mut patch.as_slice(), &other, &mut out, &DeltaLimits::default()).is_ok() {
        assert!(out != new, "a different base reproduced the image");
    }
}

#[test]
fn a_patch_needing_a_larger_window_than_allowed_is_refused() {
    let old = text(14, 300_000);
    let mut new = old.clone();
    new[10] = b'!';
    let (patch, _) = round_trip(&old, &new, ChunkParams::BUNDLE, &EncodeOptions::default());
    let err =
        delta::apply(&mut patch.as_slice(), &old, &mut Vec::new(), &DeltaLimits::with_window(100_000)).unwrap_err();
    assert!(matches!(err, DeltaError::WindowTooLarge { limit: 100_000, .. }), "{err}");
}

#[test]
fn a_header_declaring_a_huge_image_is_refused_before_allocating() {
    let mut patch = delta::MAGIC.to_vec();
    patch.extend_from_slice(&delta::FORMAT_VERSION.to_le_bytes());
    patch.extend_from_slice(&0u16.to_le_bytes());
    patch.extend_from_slice(&u32::MAX.to_le_bytes()); // regions
    patch.extend_from_slice(&0u64.to_le_bytes()); // old size
    patch.extend_from_slice(&(1u64 << 50).to_le_bytes()); // new size
    patch.extend_from_slice(&(1u64 << 20).to_le_bytes()); // table length
    patch.extend_from_slice(&(1u64 << 20).to_le_bytes()); // window
    let err = delta::apply(&mut patch.as_slice(), &Vec::new(), &mut Vec::new(), &DeltaLimits::default()).unwrap_err();
    assert!(matches!(err, DeltaError::ImageTooLarge { declared, .. } if declared == 1 << 50), "{err}");
    // A sane size but more regions than the table can hold.
    patch[24..32].copy_from_slice(&1000u64.to_le_bytes());
    let err = delta::apply(&mut patch.as_slice(), &Vec::new(), &mut Vec::new(), &DeltaLimits::default()).unwrap_err();
    assert!(matches!(err, DeltaError::Malformed { .. }), "{err}");
}

#[test]
fn a_corrupted_payload_is_caught() {
    let old = text(15, 200_000);
    let mut new = old.clone();
    new.splice(1000..1000, text(16, 5000));
    let (patch, _) = round_trip(&old, &new, ChunkParams::BUNDLE, &EncodeOptions::default());
    let header = PatchHeader::read(&mut patch.as_slice(), &DeltaLimits::default()).unwrap();
    let payload_at = header.encoded_len() as usize;
    let mut caught = 0;
    for at in payload_at..patch.len() {
        let mut bad = patch.clone();
        bad[at] ^= 0x5a;
        let mut out = Vec::new();
        match delta::apply(&mut bad.as_slice(), &old, &mut out, &DeltaLimits::default()) {
            Err(DeltaError::CorruptRegion { .. } | DeltaError::Truncated { .. } | DeltaError::TrailingBytes) => {
                caught += 1
            }
            // A flip inside literal bytes decodes to other bytes, which the caller's hash
            // check catches; a flip in a field zstd ignores changes nothing.
            Ok(_) => {}
            Err(e) => panic!("flip at {at}: unexpected {e}"),
        }
    }
    assert!(caught > 0, "no flip was caught by the decoder");
}

/// A multi-region patch of a 1.5 MiB image: scattered edits, an insertion, a moved block,
/// and an unchanged stretch longer than the window (so a copy region stays a copy).
fn regions_patch() -> (Vec<u8>, Vec<u8>, Vec<u8>, PatchHeader) {
    let old = text(19, 1536 << 10);
    let mut new = old.clone();
    for at in (7000..new.len()).step_by(150_000).filter(|at| !(800_000..1_300_000).contains(at)) {
        new[at..at + 8].copy_from_slice(b"CHANGED!");
    }
    new.splice(700_000..700_000, text(20, 30_000));
    let moved: Vec<u8> = new.drain(50_000..250_000).collect();
    new.extend_from_slice(&moved);
    let (patch, _) = round_trip(&old, &new, ChunkParams::BUNDLE, &small_window_opts());
    let header = PatchHeader::read(&mut patch.as_slice(), &DeltaLimits::default()).unwrap();
    (old, new, patch, header)
}

fn payload<'a>(patch: &'a [u8], region: &Region) -> &'a [u8] {
    &patch[region.payload_offset as usize..(region.payload_offset + region.payload_len) as usize]
}

#[test]
fn a_subset_of_regions_applied_from_their_payloads_alone_yields_exactly_their_ranges() {
    let (old, new, patch, header) = regions_patch();
    let patched: Vec<u32> =
        (0..header.regions.len() as u32).filter(|n| header.regions[*n as usize].op != RegionOp::Copy).collect();
    let copies = header.regions.iter().filter(|r| r.op == RegionOp::Copy).count();
    assert!(patched.len() >= 4 && copies >= 1, "{} patched regions, {copies} copies", patched.len());
    assert_eq!(header.payload_end(), patch.len() as u64);
    assert_eq!(
        PatchHeader::stored_len(patch[..delta::HEADER_LEN].try_into().unwrap(), &DeltaLimits::default()).unwrap(),
        header.encoded_len()
    );

    // Every other patched region and the first copy, last first: each from its payload bytes
    // only (no other byte of the patch), each yielding its own slice of the new image.
    let first_copy = header.regions.iter().position(|r| r.op == RegionOp::Copy).unwrap() as u32;
    let mut chosen: Vec<u32> = patched.iter().copied().step_by(2).collect();
    chosen.push(first_copy);
    chosen.sort_unstable();
    let mut applier = RegionApplier::new(&header, &old, &DeltaLimits::default()).unwrap();
    if let Some(shared) = &header.shared {
        let at = shared.payload_offset as usize;
        applier.load_shared(&mut &patch[at..at + shared.payload_len as usize]).unwrap();
    }
    for &n in chosen.iter().rev() {
        let r = &header.regions[n as usize];
        let mut out = Vec::new();
        let written = applier.apply(n, &mut payload(&patch, r), &mut out).unwrap();
        assert_eq!(written, r.new_len);
        let range = r.new_offset as usize..(r.new_offset + r.new_len) as usize;
        assert!(out == new[range], "region {n} ({:?}) differs from its range of the new image", r.op);
    }

    // All regions one by one, in order, rebuild the image exactly.
    let mut out = Vec::new();
    for n in 0..header.regions.len() as u32 {
        applier.apply(n, &mut payload(&patch, &header.regions[n as usize]), &mut out).unwrap();
    }
    assert!(out == new);
}

#[test]
fn a_corrupted_or_short_region_payload_is_caught() {
    let (old, _, patch, header) = regions_patch();
    let n = header.regions.iter().position(|r| r.op != RegionOp::Copy && r.payload_len > 16).unwrap() as u32;
    let region = &header.regions[n as usize];
    let good = payload(&patch, region).to_vec();
    let mut applier = RegionApplier::new(&header, &old, &DeltaLimits::default()).unwrap();

    // The zstd frame's magic: no decoder takes it.
    let mut bad = good.clone();
    bad[0] ^= 0xff;
    let err = applier.apply(n, &mut bad.as_slice(), &mut Vec::new()).unwrap_err();
    assert!(matches!(err, DeltaError::CorruptRegion { region, .. } if region == n), "{err}");

    // A payload cut short (a patch chunk that is missing) never passes for the region.
    let err = applier.apply(n, &mut &good[..good.len() - 1], &mut Vec::new()).unwrap_err();
    assert!(matches!(err, DeltaError::Truncated { .. } | DeltaError::CorruptRegion { .. }), "{err}");

    // Flips anywhere in the payload: caught by the decoder, or the output differs (which the
    // caller's chunk ids catch); never the region's bytes reported as good and unchanged.
    let mut expected = Vec::new();
    applier.apply(n, &mut good.as_slice(), &mut expected).unwrap();
    let mut caught = 0;
    for at in 0..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 0x5a;
        let mut out = Vec::new();
        match applier.apply(n, &mut bad.as_slice(), &mut out) {
            Err(DeltaError::CorruptRegion { region, .. }) => {
                assert_eq!(region, n);
                caught += 1;
            }
            Err(DeltaError::Truncated { .. }) => caught += 1,
            Ok(_) => {}
            Err(e) => panic!("flip at {at}: unexpected {e}"),
        }
    }
    assert!(caught > 0, "no flip was caught by the decoder");

    // The applier still works after failures (its buffers are reset per region).
    let mut out = Vec::new();
    applier.apply(n, &mut good.as_slice(), &mut out).unwrap();
    assert!(out == expected);
}

#[test]
fn a_region_applier_holds_hand_built_headers_to_the_bounds() {
    let old = text(21, 10_000);
    let region = |op, new_len, extents: Vec<Extent>| Region {
        op,
        new_offset: 0,
        new_len,
        extents,
        payload_offset: 0,
        payload_len: 0,
        shared: None,
    };
    let header = |window, regions: Vec<Region>| PatchHeader {
        old_size: old.len() as u64,
        new_size: regions.iter().map(|r| r.new_len).sum(),
        window,
        shared: None,
        regions,
    };
    let apply = |h: &PatchHeader, n| {
        RegionApplier::new(h, &old, &DeltaLimits::default()).and_then(|mut a| a.apply(n, &mut &[][..], &mut Vec::new()))
    };
    // An extent past the old image, a reference above the window, a region not in the table.
    let past = header(1 << 20, vec![region(RegionOp::Copy, 100, vec![Extent { offset: 9_950, len: 100 }])]);
    assert!(matches!(apply(&past, 0), Err(DeltaError::Malformed { .. })));
    let wide = header(1000, vec![region(RegionOp::Zstd, 10, vec![Extent { offset: 0, len: 5000 }])]);
    assert!(matches!(apply(&wide, 0), Err(DeltaError::Malformed { .. })));
    let one = header(1 << 20, vec![region(RegionOp::Copy, 100, vec![Extent { offset: 0, len: 100 }])]);
    assert!(matches!(apply(&one, 1), Err(DeltaError::Malformed { .. })));
    assert_eq!(apply(&one, 0).unwrap(), 100);
    // A window above the applier's limit, and the wrong base size.
    let huge = header(1 << 40, vec![]);
    assert!(matches!(apply(&huge, 0), Err(DeltaError::WindowTooLarge { .. })));
    let other = text(21, 9_999);
    let err = RegionApplier::new(&one, &other, &DeltaLimits::default()).unwrap_err();
    assert!(matches!(err, DeltaError::BaseMismatch { expected: 10_000, actual: 9_999 }), "{err}");
}

/// One edit of a generated image.
#[derive(Debug, Clone)]
enum Edit {
    Overwrite { at: usize, bytes: Vec<u8> },
    Insert { at: usize, bytes: Vec<u8> },
    Delete { at: usize, len: usize },
    Move { from: usize, len: usize, to: usize },
}

fn arb_edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), vec(any::<u8>(), 1..64)).prop_map(|(at, bytes)| Edit::Overwrite { at, bytes }),
        (any::<usize>(), vec(any::<u8>(), 1..4096)).prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        (any::<usize>(), 1..8192usize).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), 1..32768usize, any::<usize>()).prop_map(|(from, len, to)| Edit::Move { from, len, to }),
    ]
}

fn apply_edits(mut data: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let n = data.len().max(1);
        match edit {
            Edit::Overwrite { at, bytes } => {
                let at = at % n;
                let end = (at + bytes.len()).min(data.len());
                data[at.min(end)..end].copy_from_slice(&bytes[..end - at.min(end)]);
            }
            Edit::Insert { at, bytes } => {
                let at = at % (data.len() + 1);
                data.splice(at..at, bytes.iter().copied());
            }
            Edit::Delete { at, len } => {
                let at = at % n;
                let end = (at + len).min(data.len());
                data.drain(at.min(end)..end);
            }
            Edit::Move { from, len, to } => {
                let from = from % n;
                let end = (from + len).min(data.len());
                let moved: Vec<u8> = data.drain(from.min(end)..end).collect();
                let to = to % (data.len() + 1);
                data.splice(to..to, moved);
            }
        }
    }
    data
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn edited_images_round_trip(seed in any::<u64>(), len in 0usize..600_000, edits in vec(arb_edit(), 0..12), small in any::<bool>()) {
        let old = text(seed, len);
        let new = apply_edits(old.clone(), &edits);
        let opts = if small { let mut o = small_window_opts(); o.window = 64 << 10; o.region_len = 32 << 10; o } else { EncodeOptions::default() };
        round_trip(&old, &new, ChunkParams::BUNDLE, &opts);
    }

    #[test]
    fn damaged_patches_never_panic(flips in vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>()) {
        let old = text(17, 150_000);
        let new = apply_edits(old.clone(), &[Edit::Insert { at: 70_000, bytes: text(18, 2000) }, Edit::Move { from: 1000, len: 20_000, to: 120_000 }]);
        let (old_index, new_index) = (index(&old, ChunkParams::BUNDLE), index(&new, ChunkParams::BUNDLE));
        let mut patch = Vec::new();
        let mut opts = small_window_opts();
        opts.window = 64 << 10;
        opts.region_len = 32 << 10;
        delta::encode(&old, &old_index, &new, &new_index, &opts, &mut patch, &mut |_, _| {}).unwrap();
        for (at, x) in flips {
            let at = at % patch.len();
            patch[at] ^= x | 1;
        }
        patch.truncate(cut % (patch.len() + 1));
        let _ = delta::apply(&mut patch.as_slice(), &old, &mut std::io::sink(), &DeltaLimits::with_window(64 << 10));
    }
}
