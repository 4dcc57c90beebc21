//! bsdiff-style regions: Colin Percival's matcher over a suffix array of the reference,
//! emitted as one zstd frame of records so that applying streams.
//!
//! Decoded record stream, repeated until the region's new length is produced:
//! `seek` (zigzag LEB128: move the old cursor), `add` (LEB128), `copy` (LEB128), then `add`
//! bytes to add (wrapping) to the reference from the cursor, then `copy` literal bytes.
//! A record producing nothing is refused, so a hostile frame cannot spin the applier.

use std::io::{self, BufReader, Read, Write};

use suffix_array::SuffixArray;

use super::{IO_BUF_LEN, RegionFailure, window_log};

/// Longest pattern handed to the suffix-array search: bounds the cost of one comparison on
/// long runs (zero-filled blocks) without shortening real matches much (the scan resumes).
const MAX_PATTERN: usize = 64 << 10;

/// Largest zstd window for the record stream: its matches are local (diff bytes are mostly
/// zeros), and a small window keeps the applier's decoder small.
const STREAM_WINDOW_LOG: u32 = 22;

/// Encodes `new` against `reference`.
pub(super) fn diff(reference: &[u8], new: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let records = records(reference, new);
    let mut encoder = zstd::stream::raw::Encoder::new(level)?;
    use zstd::stream::raw::CParameter;
    encoder.set_parameter(CParameter::WindowLog(window_log(0, records.len() as u64).min(STREAM_WINDOW_LOG)))?;
    encoder.set_parameter(CParameter::ChecksumFlag(false))?;
    encoder.set_pledged_src_size(Some(records.len() as u64))?;
    let mut writer = zstd::stream::zio::Writer::new(Vec::with_capacity(records.len() / 8 + 64), encoder);
    writer.write_all(&records)?;
    writer.finish()?;
    Ok(writer.into_inner().0)
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
fn records(old: &[u8], new: &[u8]) -> Vec<u8> {
    if old.is_empty() {
        let mut out = Vec::with_capacity(new.len() + 16);
        if !new.is_empty() {
            push_varint(&mut out, 0);
            push_varint(&mut out, 0);
            push_varint(&mut out, new.len() as u64);
            out.extend_from_slice(new);
        }
        return out;
    }
    let sa = SuffixArray::new(old);
    let mut out = Vec::with_capacity(new.len() / 4 + 64);
    let search = |scan: usize| -> (usize, usize) {
        let end = new.len().min(scan + MAX_PATTERN);
        let range = sa.search_lcp(&new[scan..end]);
        (range.start, range.end - range.start)
    };
    let (old_len, new_len) = (old.len(), new.len());
    let (mut scan, mut len, mut pos) = (0usize, 0usize, 0usize);
    let (mut last_scan, mut last_pos, mut last_offset) = (0usize, 0usize, 0isize);
    let mut cursor = 0usize;
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
                push_varint(&mut out, zigzag(last_pos as i64 - cursor as i64));
                push_varint(&mut out, len_f as u64);
                push_varint(&mut out, (copy_end - copy_start) as u64);
                out.extend(
                    new[last_scan..copy_start]
                        .iter()
                        .zip(&old[last_pos..last_pos + len_f])
                        .map(|(n, o)| n.wrapping_sub(*o)),
                );
                out.extend_from_slice(&new[copy_start..copy_end]);
                cursor = last_pos + len_f;
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

/// Applies one bsdiff region from `payload` (its exact payload bytes) to `reference`.
pub(super) fn apply(
    payload: &mut dyn Read,
    reference: &[u8],
    new_len: u64,
    out: &mut dyn Write,
    buf: &mut [u8],
    window: u64,
) -> Result<u64, RegionFailure> {
    let corrupt = |e: io::Error| RegionFailure::Corrupt(e.to_string());
    let mut decoder = zstd::stream::raw::Decoder::new().map_err(corrupt)?;
    decoder
        .set_parameter(zstd::stream::raw::DParameter::WindowLogMax(window_log(0, window).max(STREAM_WINDOW_LOG)))
        .map_err(corrupt)?;
    let mut stream = zstd::stream::zio::Reader::new(BufReader::with_capacity(IO_BUF_LEN, payload), decoder);
    stream.set_single_frame();
    let mut cursor = 0u64;
    let mut produced = 0u64;
    let ref_len = reference.len() as u64;
    while produced < new_len {
        let seek = unzigzag(read_varint(&mut stream)?);
        let add = read_varint(&mut stream)?;
        let copy = read_varint(&mut stream)?;
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
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            read_exact(&mut stream, &mut buf[..n])?;
            let start = usize::try_from(cursor).unwrap_or(usize::MAX);
            for (b, o) in buf[..n].iter_mut().zip(&reference[start..start + n]) {
                *b = b.wrapping_add(*o);
            }
            out.write_all(&buf[..n]).map_err(RegionFailure::Write)?;
            cursor += n as u64;
            left -= n as u64;
        }
        let mut left = copy;
        while left > 0 {
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            read_exact(&mut stream, &mut buf[..n])?;
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
        apply(&mut patch.as_slice(), &old, new.len() as u64, &mut out, &mut buf, 1 << 20).unwrap();
        assert_eq!(out, new);
    }
}
