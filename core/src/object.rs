//! Chunk objects: how a chunk is stored and sent.
//!
//! One flag byte, then the body: `0` = raw bytes, `1` = one zstd frame. The encoder keeps
//! zstd only when it makes the chunk smaller, so a valid object is never longer than the
//! chunk plus one byte; the decoder refuses anything longer, stops decompressing one byte
//! past the length the index gives (a zip bomb costs nothing), and checks the BLAKE3 id
//! before handing the bytes back.

use crate::ids::ChunkId;

/// Flag byte of a raw object.
pub const FLAG_RAW: u8 = 0;
/// Flag byte of a zstd object.
pub const FLAG_ZSTD: u8 = 1;
/// Default zstd level: fast to encode, decodes at memory speed.
pub const DEFAULT_LEVEL: i32 = 3;

/// Why a chunk object was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectError {
    /// Zero bytes.
    #[error("chunk object is empty")]
    Empty,
    /// Unknown flag byte.
    #[error("chunk object has unknown encoding flag {0:#04x}")]
    UnknownEncoding(u8),
    /// Longer than a valid object for this chunk can be.
    #[error("chunk object is {actual} bytes, more than the {limit} a chunk of this length can take")]
    TooLarge {
        /// Object length.
        actual: u64,
        /// Largest valid object.
        limit: u64,
    },
    /// The body yields more bytes than the index says the chunk has.
    #[error("chunk object decompresses past the {limit} bytes the index allows")]
    DecompressesPastLength {
        /// The chunk length from the index.
        limit: u32,
    },
    /// The body yields fewer bytes than the index says.
    #[error("chunk object yields {actual} bytes, the index says {expected}")]
    LengthMismatch {
        /// Length from the index.
        expected: u32,
        /// Bytes produced.
        actual: u64,
    },
    /// The zstd frame is corrupt.
    #[error("chunk object is not a valid zstd frame: {0}")]
    Corrupt(#[source] std::io::Error),
    /// The bytes do not hash to the expected id.
    #[error("chunk bytes hash to {actual}, expected {expected}")]
    IdMismatch {
        /// The id asked for.
        expected: ChunkId,
        /// The id of what arrived.
        actual: ChunkId,
    },
}

/// Encodes a chunk, compressing with zstd at `level` when that makes it smaller.
pub fn encode(data: &[u8], level: i32) -> Vec<u8> {
    if let Ok(compressed) = zstd::bulk::compress(data, level)
        && compressed.len() < data.len()
    {
        let mut out = Vec::with_capacity(compressed.len() + 1);
        out.push(FLAG_ZSTD);
        out.extend_from_slice(&compressed);
        return out;
    }
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(FLAG_RAW);
    out.extend_from_slice(data);
    out
}

/// Compresses a raw object (`FLAG_RAW` and the chunk, as read from an image to serve a peer)
/// with zstd at `level` when that makes it smaller, else returns it as it is. The zstd context
/// is kept per thread: a server encodes chunk after chunk on the same few threads, and a new
/// context per chunk costs about as much as compressing it.
pub fn shrink(raw: Vec<u8>, level: i32) -> Vec<u8> {
    thread_local! {
        static CONTEXT: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    let Some((&FLAG_RAW, data)) = raw.split_first() else { return raw };
    let compressed = CONTEXT.with_borrow_mut(|context| {
        if context.as_ref().is_none_or(|(l, _)| *l != level) {
            *context = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        context.as_mut().and_then(|(_, c)| c.compress(data).ok())
    });
    match compressed {
        Some(c) if c.len() + 1 < raw.len() => {
            let mut out = Vec::with_capacity(c.len() + 1);
            out.push(FLAG_ZSTD);
            out.extend_from_slice(&c);
            out
        }
        _ => raw,
    }
}

/// Largest valid object for a chunk of `len` bytes.
pub fn max_object_len(len: u32) -> u64 {
    u64::from(len) + 1
}

/// Decodes an object of the chunk `expected_id`, `expected_len` bytes long, and verifies it.
///
/// # Errors
/// Every [`ObjectError`]; on error nothing of the object should be used.
pub fn decode(object: &[u8], expected_id: &ChunkId, expected_len: u32) -> Result<Vec<u8>, ObjectError> {
    let mut out = Vec::new();
    decode_into(object, expected_id, expected_len, &mut out)?;
    Ok(out)
}

/// The largest zstd window (log2 bytes) accepted for a chunk of `len` bytes.
fn max_window_log(len: u32) -> u32 {
    let ceil_log2 = u32::BITS - len.saturating_sub(1).leading_zeros();
    ceil_log2.clamp(10, 30) + 1
}

/// Runs `f` with this thread's zstd decompression context, its window bounded for a chunk of
/// `len` bytes. A frame may declare any window and omit its content size; a streaming decoder
/// would allocate that window (up to 128 MiB) for a 21-byte object. One-shot decoding writes
/// straight into the caller's buffer, sized for the chunk, and allocates no window; the bound
/// is set as well (a chunk never needs a window larger than itself: our encoder pledges the
/// size, so zstd picks ceil(log2(len)), at least 10; one more is allowed for other encoders).
/// The context is kept per thread (a new one per chunk cost about 1 % of a fleet agent's CPU)
/// and dropped after an error.
fn with_decompressor<T>(
    len: u32,
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    thread_local! {
        static CONTEXT: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    CONTEXT.with_borrow_mut(|context| {
        let d = match context {
            Some(d) => d,
            None => context.insert(zstd::bulk::Decompressor::new()?),
        };
        let r = d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(max_window_log(len))).and_then(|()| f(d));
        if r.is_err() {
            *context = None;
        }
        r
    })
}

/// Like [`decode`], writing into `out` (cleared first) so a caller can reuse the buffer.
///
/// # Errors
/// Every [`ObjectError`]; `out` holds no verified data on error.
pub fn decode_into(
    object: &[u8],
    expected_id: &ChunkId,
    expected_len: u32,
    out: &mut Vec<u8>,
) -> Result<(), ObjectError> {
    out.clear();
    let limit = max_object_len(expected_len);
    if object.len() as u64 > limit {
        return Err(ObjectError::TooLarge { actual: object.len() as u64, limit });
    }
    let (&flag, body) = object.split_first().ok_or(ObjectError::Empty)?;
    match flag {
        FLAG_RAW => {
            if body.len() as u64 != u64::from(expected_len) {
                return Err(ObjectError::LengthMismatch { expected: expected_len, actual: body.len() as u64 });
            }
            out.extend_from_slice(body);
        }
        FLAG_ZSTD => {
            // One byte over the length: a frame that inflates past it fails or shows it.
            out.reserve(expected_len as usize + 1);
            match with_decompressor(expected_len, |d| d.decompress_to_buffer(body, out)) {
                Ok(_) => {}
                Err(e) if e.to_string().contains("Destination buffer is too small") => {
                    out.clear();
                    return Err(ObjectError::DecompressesPastLength { limit: expected_len });
                }
                Err(e) => {
                    out.clear();
                    return Err(ObjectError::Corrupt(e));
                }
            }
            if out.len() as u64 > u64::from(expected_len) {
                out.clear();
                return Err(ObjectError::DecompressesPastLength { limit: expected_len });
            }
            if out.len() as u64 != u64::from(expected_len) {
                let actual = out.len() as u64;
                out.clear();
                return Err(ObjectError::LengthMismatch { expected: expected_len, actual });
            }
        }
        other => return Err(ObjectError::UnknownEncoding(other)),
    }
    let actual = ChunkId::of(out);
    if actual != *expected_id {
        out.clear();
        return Err(ObjectError::IdMismatch { expected: *expected_id, actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrink_compresses_what_pays_and_keeps_the_rest_raw() {
        let raw = |data: &[u8]| [&[FLAG_RAW][..], data].concat();
        let text: Vec<u8> = b"flotilla ".iter().copied().cycle().take(64 << 10).collect();
        let mut noise = vec![0u8; 64 << 10];
        blake3::Hasher::new().update(b"noise").finalize_xof().fill(&mut noise);
        // Twice each, so the context kept from the first call is used by the second.
        for _ in 0..2 {
            let small = shrink(raw(&text), 1);
            assert_eq!(small[0], FLAG_ZSTD);
            assert!(small.len() < 1024, "{} bytes", small.len());
            assert_eq!(decode(&small, &ChunkId::of(&text), text.len() as u32).unwrap(), text);
            assert_eq!(shrink(raw(&noise), 1), raw(&noise));
        }
        // A level change takes a new context; anything but a raw object is left alone.
        assert_eq!(decode(&shrink(raw(&text), 3), &ChunkId::of(&text), text.len() as u32).unwrap(), text);
        let zstd = encode(&text, 3);
        assert_eq!(shrink(zstd.clone(), 1), zstd);
        assert!(shrink(Vec::new(), 1).is_empty());
    }

    /// A frame within the window bound that inflates past the declared length is cut off one
    /// byte past it, not decompressed in full.
    #[test]
    fn small_window_bomb_stops_at_the_length() {
        let len = 64 << 10;
        let bomb = encode(&vec![0u8; len as usize + (32 << 10)], DEFAULT_LEVEL);
        let err = decode(&bomb, &ChunkId::from_bytes([0; 32]), len).expect_err("refused");
        assert!(matches!(err, ObjectError::DecompressesPastLength { limit } if limit == len), "{err:?}");
    }

    /// Found by the `chunk_object` fuzz target: a 21-byte frame declaring a 128 MiB window and
    /// no content size must be refused, not decoded with a 128 MiB buffer.
    #[test]
    fn frame_with_huge_window_is_refused() {
        let frame =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/regressions/chunk_object/oom-zstd-window-128mib"))
                .expect("regression input");
        let (len, object) = frame.split_at(3);
        let len = u32::from_le_bytes([len[0], len[1], len[2], 0]) & 0xf_ffff;
        let err = decode(object, &ChunkId::from_bytes([0; 32]), len).expect_err("refused");
        // Decoded in one shot into a buffer of the chunk's length: refused without allocating
        // the 128 MiB window it declares (the fuzz target ran out of memory on it).
        assert!(matches!(err, ObjectError::Corrupt(_)), "{err:?}");
        for len in [1, 1000, 16 << 10, 64 << 10, 256 << 10, 4 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ (i / 4093) as u8).collect();
            let id = ChunkId::of(&data);
            let object = encode(&data, DEFAULT_LEVEL);
            assert_eq!(decode(&object, &id, len).expect("our own objects still decode"), data);
        }
    }

    #[test]
    fn compressible_and_incompressible_roundtrip() {
        let text = b"flotilla ".repeat(1000);
        let obj = encode(&text, DEFAULT_LEVEL);
        assert_eq!(obj[0], FLAG_ZSTD);
        assert_eq!(decode(&obj, &ChunkId::of(&text), text.len() as u32).unwrap(), text);

        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let obj = encode(&noise, DEFAULT_LEVEL);
        assert_eq!(decode(&obj, &ChunkId::of(&noise), noise.len() as u32).unwrap(), noise);
    }

    #[test]
    fn unknown_flag() {
        assert!(matches!(decode(&[7, 1, 2], &ChunkId::of(b"x"), 2), Err(ObjectError::UnknownEncoding(7))));
    }
}
