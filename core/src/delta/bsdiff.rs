//! bsdiff-style regions: Colin Percival's matcher over a suffix array of the reference,
//! emitted as one zstd frame of records so that applying streams.
//!
//! Decoded record stream, repeated until the region's new length is produced:
//! `seek` (zigzag LEB128: move the old cursor), `add` (LEB128), `copy` (LEB128), then `add`
//! bytes to add (wrapping) to the reference from the cursor, then `copy` literal bytes.
//! A record producing nothing is refused, so a hostile frame cannot spin the applier.
//!
//! The sparse form ([`RegionOp::BsdiffSparse`](super::RegionOp::BsdiffSparse)) is the same
//! record stream except that the `add` bytes are run-length coded: runs of `same` (LEB128:
//! reference bytes taken unchanged) and `diff` (LEB128, then that many bytes to add), until
//! the record's `add` bytes are produced; a run producing nothing is refused. Unchanged
//! stretches then cost a few bytes whatever their length, so one region can carry many
//! small edits and the long copies between them (a zstd frame spends bytes on every
//! 128 KiB block, a region record in the table about as many as a small edit).

use std::io::{self, BufReader, Read, Write};

use suffix_array::SuffixArray;

use super::{IO_BUF_LEN, RegionFailure, window_log};

/// Longest pattern handed to the suffix-array search: bounds the cost of one comparison on
/// long runs (zero-filled blocks) without shortening real matches much (the scan resumes).
const MAX_PATTERN: usize = 64 << 10;

/// Largest zstd window for the record stream: its matches are local (diff bytes are mostly
/// zeros), and a small window keeps the applier's decoder small.
const STREAM_WINDOW_LOG: u32 = 22;

/// In the sparse form, unchanged runs shorter than this stay inside the diff bytes (as
/// zeros): two LEB128 lengths cost about what zstd spends on a short run of zeros.
const MIN_SAME_RUN: usize = 8;

/// One record: from reference position `old_pos`, `add` bytes of `new` starting at
/// `new_pos` are the reference plus a diff; the `copy` bytes after them are literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Record {
    pub(super) old_pos: usize,
    pub(super) new_pos: usize,
    pub(super) add: usize,
    pub(super) copy: usize,
}

/// Encodes `new` against `reference`.
pub(super) fn diff(reference: &[u8], new: &[u8], level: i32) -> io::Result<Vec<u8>> {
    compress(&serialize(reference, new, &records(reference, new), false), level)
}

/// Encodes `new` against `reference` in the sparse form, from records whose positions are in
/// `reference` and `new` (see [`records`]; they must cover `new` in order). Returns the frame
/// and the record stream it decodes to.
pub(super) fn diff_sparse(
    reference: &[u8],
    new: &[u8],
    records: &[Record],
    level: i32,
) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let stream = serialize(reference, new, records, true);
    let frame = compress_sparse(reference, &stream, level)?;
    Ok((frame, stream))
}

/// Compresses a sparse record stream, with `reference` as prefix unless the stream is long.
fn compress_sparse(reference: &[u8], stream: &[u8], level: i32) -> io::Result<Vec<u8>> {
    if stream.len() > MAX_PREFIXED_STREAM {
        return compress(stream, level);
    }
    let mut encoder = zstd::stream::raw::Encoder::with_ref_prefix(level, reference)?;
    use zstd::stream::raw::CParameter;
    encoder.set_parameter(CParameter::WindowLog(window_log(reference.len() as u64, stream.len() as u64)))?;
    encoder.set_parameter(CParameter::ChecksumFlag(false))?;
    encoder.set_parameter(CParameter::ContentSizeFlag(true))?;
    encoder.set_pledged_src_size(Some(stream.len() as u64))?;
    let mut writer = zstd::stream::zio::Writer::new(Vec::with_capacity(stream.len() / 8 + 64), encoder);
    writer.write_all(stream)?;
    writer.finish()?;
    Ok(writer.into_inner().0)
}

/// Longest sparse record stream compressed with the reference as prefix: past this the
/// stream carries whole changed files, whose literals bsdiff already matched where it could,
/// and indexing the reference would cost more time than it saves bytes.
const MAX_PREFIXED_STREAM: usize = 1 << 20;

/// Folds records whose `add` is shorter than `min_add` into the literal bytes of the record
/// before: many short approximate matches cost more as records than as literals that the
/// stream's compressor matches against the reference.
pub(super) fn coarsen(records: Vec<Record>, min_add: usize) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::with_capacity(records.len());
    for r in records {
        match out.last_mut() {
            Some(last) if r.add < min_add && last.new_pos + last.add + last.copy == r.new_pos => {
                last.copy += r.add + r.copy;
            }
            _ => out.push(r),
        }
    }
    out
}

fn compress(stream: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let mut encoder = zstd::stream::raw::Encoder::new(level)?;
    use zstd::stream::raw::CParameter;
    encoder.set_parameter(CParameter::WindowLog(window_log(0, stream.len() as u64).min(STREAM_WINDOW_LOG)))?;
    encoder.set_parameter(CParameter::ChecksumFlag(false))?;
    encoder.set_pledged_src_size(Some(stream.len() as u64))?;
    let mut writer = zstd::stream::zio::Writer::new(Vec::with_capacity(stream.len() / 8 + 64), encoder);
    writer.write_all(stream)?;
    writer.finish()?;
    Ok(writer.into_inner().0)
}

/// The decoded record stream for `records`.
fn serialize(old: &[u8], new: &[u8], records: &[Record], sparse: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(new.len() / 4 + 64);
    let mut cursor = 0usize;
    for r in records {
        // A record adding nothing leaves the cursor where it is.
        let old_pos = if r.add == 0 { cursor } else { r.old_pos };
        push_varint(&mut out, zigzag(old_pos as i64 - cursor as i64));
        push_varint(&mut out, r.add as u64);
        push_varint(&mut out, r.copy as u64);
        let diff = new[r.new_pos..r.new_pos + r.add]
            .iter()
            .zip(&old[old_pos..old_pos + r.add])
            .map(|(n, o)| n.wrapping_sub(*o));
        if sparse {
            push_runs(&mut out, diff);
        } else {
            out.extend(diff);
        }
        let copy_start = r.new_pos + r.add;
        out.extend_from_slice(&new[copy_start..copy_start + r.copy]);
        cursor = old_pos + r.add;
    }
    out
}

/// Run-length codes diff bytes: (`same`, `diff`, diff bytes) runs; zero runs shorter than
/// [`MIN_SAME_RUN`] stay inside the diff bytes, except at the very end.
fn push_runs(out: &mut Vec<u8>, diff: impl Iterator<Item = u8>) {
    let diff: Vec<u8> = diff.collect();
    let mut i = 0usize;
    while i < diff.len() {
        let zeros = diff[i..].iter().take_while(|b| **b == 0).count();
        let same = if zeros >= MIN_SAME_RUN || i + zeros == diff.len() { zeros } else { 0 };
        let start = i + same;
        let mut end = start;
        while end < diff.len() {
            let run = diff[end..].iter().take(MIN_SAME_RUN).take_while(|b| **b == 0).count();
            if run >= MIN_SAME_RUN {
                break;
            }
            end += run.max(1);
        }
        push_varint(out, same as u64);
        push_varint(out, (end - start) as u64);
        out.extend_from_slice(&diff[start..end]);
        i = end;
    }
}

fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// The classic bsdiff scan: find an exact match, extend it approximately forwards and
/// backwards, and emit what lies between as add (approximate) and copy (literal) bytes.
pub(super) fn records(old: &[u8], new: &[u8]) -> Vec<Record> {
    if old.is_empty() {
        return if new.is_empty() {
            Vec::new()
        } else {
            vec![Record { old_pos: 0, new_pos: 0, add: 0, copy: new.len() }]
        };
    }
    let sa = SuffixArray::new(old);
    let mut out = Vec::new();
    let search = |scan: usize| -> (usize, usize) {
        let end = new.len().min(scan + MAX_PATTERN);
        let range = sa.search_lcp(&new[scan..end]);
        (range.start, range.end - range.start)
    };
    let (old_len, new_len) = (old.len(), new.len());
    let (mut scan, mut len, mut pos) = (0usize, 0usize, 0usize);
    let (mut last_scan, mut last_pos, mut last_offset) = (0usize, 0usize, 0isize);
    let old_at = |i: isize| -> Option<u8> { usize::try_from(i).ok().and_then(|i| old.get(i).copied()) };
    while scan < new_len {
        let mut old_score = 0usize;
        scan += len;
        let mut scsc = scan;
        while scan < new_len {
            (pos, len) = search(scan);
            while scsc < scan + len {
                if old_at(scsc as isize + last_offset) == Some(new[scsc]) {
                    old_score += 1;
                }
                scsc += 1;
            }
            if (len == old_score && len != 0) || len > old_score + 8 {
                break;
            }
            if old_at(scan as isize + last_offset) == Some(new[scan]) {
                old_score = old_score.saturating_sub(1);
            }
            scan += 1;
        }
        if len != old_score || scan == new_len {
            // Forward extension of the previous match.
            let (mut s, mut best, mut len_f) = (0isize, 0isize, 0usize);
            let mut i = 0usize;
            while last_scan + i < scan && last_pos + i < old_len {
                if old[last_pos + i] == new[last_scan + i] {
                    s += 1;
                }
                i += 1;
                if s * 2 - i as isize > best * 2 - len_f as isize {
                    best = s;
                    len_f = i;
                }
            }
            // Backward extension of the new match.
            let mut len_b = 0usize;
            if scan < new_len {
                let (mut s, mut best) = (0isize, 0isize);
                let mut i = 1usize;
                while scan >= last_scan + i && pos >= i {
                    if old[pos - i] == new[scan - i] {
                        s += 1;
                    }
                    if s * 2 - i as isize > best * 2 - len_b as isize {
                        best = s;
                        len_b = i;
                    }
                    i += 1;
                }
            }
            // The two extensions overlap: split where the score is best.
            if last_scan + len_f > scan - len_b {
                let overlap = (last_scan + len_f) - (scan - len_b);
                let (mut s, mut best, mut len_s) = (0isize, 0isize, 0usize);
                for i in 0..overlap {
                    if new[last_scan + len_f - overlap + i] == old[last_pos + len_f - overlap + i] {
                        s += 1;
                    }
                    if new[scan - len_b + i] == old[pos - len_b + i] {
                        s -= 1;
                    }
                    if s > best {
                        best = s;
                        len_s = i + 1;
                    }
                }
                len_f = len_f + len_s - overlap;
                len_b -= len_s;
            }
            let copy_start = last_scan + len_f;
            let copy_end = scan - len_b;
            if len_f + (copy_end - copy_start) > 0 {
                out.push(Record { old_pos: last_pos, new_pos: last_scan, add: len_f, copy: copy_end - copy_start });
            }
            last_scan = scan - len_b;
            last_pos = pos - len_b;
            last_offset = pos as isize - scan as isize;
        }
    }
    out
}

fn read_varint(reader: &mut dyn Read) -> Result<u64, RegionFailure> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8; 1];
        read_exact(reader, &mut byte)?;
        value |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(RegionFailure::Corrupt("varint longer than 64 bits".into()))
}

fn read_exact(reader: &mut dyn Read, buf: &mut [u8]) -> Result<(), RegionFailure> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => RegionFailure::Truncated,
        _ => RegionFailure::Corrupt(e.to_string()),
    })
}

/// Applies one bsdiff region from `payload` (its exact payload bytes) to `reference`; `sparse`
/// for the run-length coded form.
pub(super) fn apply(
    payload: &mut dyn Read,
    reference: &[u8],
    new_len: u64,
    out: &mut dyn Write,
    buf: &mut [u8],
    window: u64,
    sparse: bool,
) -> Result<u64, RegionFailure> {
    let corrupt = |e: io::Error| RegionFailure::Corrupt(e.to_string());
    // The sparse form's stream may use the reference as its prefix (as a zstd region does).
    let (mut decoder, log_max) = if sparse {
        (zstd::stream::raw::Decoder::with_ref_prefix(reference).map_err(corrupt)?, window_log(window, window))
    } else {
        (zstd::stream::raw::Decoder::new().map_err(corrupt)?, window_log(0, window).max(STREAM_WINDOW_LOG))
    };
    decoder.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(log_max)).map_err(corrupt)?;
    let mut stream = zstd::stream::zio::Reader::new(BufReader::with_capacity(IO_BUF_LEN, payload), decoder);
    stream.set_single_frame();
    let produced = apply_records(&mut stream, reference, new_len, out, buf, sparse)?;
    super::frame_ended_payload(stream.reader())?;
    Ok(produced)
}

/// Applies a decoded record stream (`stream`, which must end with the region's last record)
/// to `reference`: what a region's own frame decodes to, or its slice of the patch's shared
/// stream.
pub(super) fn apply_records(
    stream: &mut dyn Read,
    reference: &[u8],
    new_len: u64,
    out: &mut dyn Write,
    buf: &mut [u8],
    sparse: bool,
) -> Result<u64, RegionFailure> {
    let mut cursor = 0u64;
    let mut produced = 0u64;
    let ref_len = reference.len() as u64;
    while produced < new_len {
        let seek = unzigzag(read_varint(stream)?);
        let add = read_varint(stream)?;
        let copy = read_varint(stream)?;
        cursor = cursor.checked_add_signed(seek).ok_or(RegionFailure::Corrupt("seek before the reference".into()))?;
        let total = add.checked_add(copy).filter(|t| *t > 0 && produced + *t <= new_len);
        let Some(total) = total else {
            return Err(RegionFailure::Corrupt("a record produces nothing or too much".into()));
        };
        if cursor.checked_add(add).is_none_or(|end| end > ref_len) {
            return Err(RegionFailure::Corrupt("a record reads past the reference".into()));
        }
        let mut left = add;
        while left > 0 {
            let (same, diff) = if sparse {
                let same = read_varint(stream)?;
                let diff = read_varint(stream)?;
                match same.checked_add(diff) {
                    Some(run) if run > 0 && run <= left => (same, diff),
                    _ => return Err(RegionFailure::Corrupt("a run produces nothing or too much".into())),
                }
            } else {
                (0, left)
            };
            let start = usize::try_from(cursor).unwrap_or(usize::MAX);
            let same_len = usize::try_from(same).unwrap_or(usize::MAX);
            out.write_all(&reference[start..start + same_len]).map_err(RegionFailure::Write)?;
            cursor += same;
            left -= same;
            let mut diff_left = diff;
            while diff_left > 0 {
                let n = usize::try_from(diff_left.min(buf.len() as u64)).unwrap_or(buf.len());
                read_exact(stream, &mut buf[..n])?;
                let start = usize::try_from(cursor).unwrap_or(usize::MAX);
                for (b, o) in buf[..n].iter_mut().zip(&reference[start..start + n]) {
                    *b = b.wrapping_add(*o);
                }
                out.write_all(&buf[..n]).map_err(RegionFailure::Write)?;
                cursor += n as u64;
                diff_left -= n as u64;
            }
            left -= diff;
        }
        let mut left = copy;
        while left > 0 {
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            read_exact(stream, &mut buf[..n])?;
            out.write_all(&buf[..n]).map_err(RegionFailure::Write)?;
            left -= n as u64;
        }
        produced += total;
    }
    let mut probe = [0u8; 1];
    match stream.read(&mut probe) {
        Ok(0) => Ok(produced),
        Ok(_) => Err(RegionFailure::Corrupt("records go on after the region's end".into())),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(RegionFailure::Truncated),
        Err(e) => Err(RegionFailure::Corrupt(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0i64, 1, -1, 63, -64, 1 << 40, -(1 << 40), i64::MAX, i64::MIN] {
            let mut out = Vec::new();
            push_varint(&mut out, zigzag(v));
            assert_eq!(unzigzag(read_varint(&mut out.as_slice()).unwrap()), v);
        }
    }

    #[test]
    fn shifted_content_makes_a_small_patch() {
        let old: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let mut new = b"inserted at the front".to_vec();
        new.extend_from_slice(&old[..100_000]);
        new.extend_from_slice(&old[100_500..]);
        let patch = diff(&old, &new, 3).unwrap();
        assert!(patch.len() < 200, "{} bytes", patch.len());
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        apply(&mut patch.as_slice(), &old, new.len() as u64, &mut out, &mut buf, 1 << 20, false).unwrap();
        assert_eq!(out, new);
    }

    #[test]
    fn sparse_records_round_trip_and_skip_unchanged_runs() {
        let old: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let mut new = old.clone();
        new[5] ^= 1;
        new[150_000] = new[150_000].wrapping_add(3);
        new[150_004] = new[150_004].wrapping_add(3);
        new.extend_from_slice(b"some literal tail");
        let recs = records(&old, &new);
        let (sparse, _) = diff_sparse(&old, &new, &recs, 19).unwrap();
        let classic = diff(&old, &new, 19).unwrap();
        assert!(sparse.len() < 80, "sparse {} bytes (classic {})", sparse.len(), classic.len());
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        apply(&mut sparse.as_slice(), &old, new.len() as u64, &mut out, &mut buf, 1 << 20, true).unwrap();
        assert_eq!(out, new);
    }

    #[test]
    fn runs_code_any_diff() {
        for diff in [vec![], vec![0u8; 3], vec![0u8; 20], vec![1, 0, 0, 2], vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0]] {
            let mut out = Vec::new();
            push_runs(&mut out, diff.iter().copied());
            let (mut pos, mut got) = (0usize, Vec::new());
            let mut reader = out.as_slice();
            while got.len() < diff.len() {
                let same = read_varint(&mut reader).unwrap() as usize;
                let n = read_varint(&mut reader).unwrap() as usize;
                assert!(same + n > 0);
                got.extend(std::iter::repeat_n(0u8, same));
                got.extend_from_slice(&reader[..n]);
                reader = &reader[n..];
                pos += same + n;
            }
            assert_eq!((got, pos, reader.len()), (diff.clone(), diff.len(), 0));
        }
    }
}
