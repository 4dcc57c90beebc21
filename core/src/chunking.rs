//! Streaming content-defined chunking (FastCDC, v2020) with every hash in the same pass.
//!
//! [`Chunker::chunk_reader`] reads any [`Read`] in fixed-size segments. The calling thread
//! finds cut points; the chunk ids (BLAKE3) are hashed on a small worker pool while the next
//! segment is cut, and the whole image's SHA-256 and BLAKE3 run on a thread of their own.
//! Memory stays bounded by a few segments whatever the image size (only the index itself,
//! 36 bytes a chunk, grows with the image), and the result does not depend on the number of
//! workers: cut points are found sequentially, and results are collected in order.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use fastcdc::v2020::{self, Normalization};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::ids::{Blake3Digest, ChunkId, Sha256Digest};
use crate::index::{ChunkIndex, IndexEntry};

/// FastCDC parameters, recorded in every manifest and index so that a device can re-chunk
/// the image in its active slot the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkParams {
    /// Smallest chunk (except the last one of an image).
    pub min: u32,
    /// Target average chunk size; a power of two.
    pub avg: u32,
    /// Largest chunk.
    pub max: u32,
}

/// Invalid chunking parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunking parameters min={min} avg={avg} max={max} are invalid: {reason}")]
pub struct ChunkParamsError {
    /// Given minimum.
    pub min: u32,
    /// Given average.
    pub avg: u32,
    /// Given maximum.
    pub max: u32,
    /// What is wrong with them.
    pub reason: &'static str,
}

impl ChunkParams {
    /// For OS images: 16 / 64 / 256 KiB. An index costs 36 bytes a chunk, about 600 KiB for
    /// a 1 GiB image.
    pub const IMAGE: Self = Self { min: 16 << 10, avg: 64 << 10, max: 256 << 10 };
    /// For app bundles: 4 / 16 / 64 KiB. On minified JS bundles a 16 KiB average fetched
    /// 1.2–1.5× fewer bytes than 64 KiB (see DESIGN.md).
    pub const BUNDLE: Self = Self { min: 4 << 10, avg: 16 << 10, max: 64 << 10 };

    /// Checked constructor.
    ///
    /// # Errors
    /// When the values are outside what FastCDC v2020 supports (see [`validate`](Self::validate)).
    pub fn new(min: u32, avg: u32, max: u32) -> Result<Self, ChunkParamsError> {
        let p = Self { min, avg, max };
        p.validate()?;
        Ok(p)
    }

    /// Checks the bounds FastCDC v2020 requires: 64 B ≤ min ≤ avg ≤ max ≤ 16 MiB,
    /// avg a power of two in [256 B, 4 MiB], max even and ≥ 1 KiB.
    ///
    /// # Errors
    /// [`ChunkParamsError`] naming the violated rule.
    pub fn validate(&self) -> Result<(), ChunkParamsError> {
        let fail = |reason| Err(ChunkParamsError { min: self.min, avg: self.avg, max: self.max, reason });
        let (min, avg, max) = (self.min as usize, self.avg as usize, self.max as usize);
        if !(v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&min) {
            return fail("min must be between 64 B and 1 MiB");
        }
        if !(v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&avg) || !avg.is_power_of_two() {
            return fail("avg must be a power of two between 256 B and 4 MiB");
        }
        if !(v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&max) || max % 2 != 0 {
            return fail("max must be even and between 1 KiB and 16 MiB");
        }
        if !(min <= avg && avg <= max) {
            return fail("need min <= avg <= max");
        }
        Ok(())
    }
}

/// Reading or consuming chunks failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkingError {
    /// The chunking parameters are invalid.
    #[error(transparent)]
    Params(#[from] ChunkParamsError),
    /// Reading the input failed.
    #[error("reading the image: {0}")]
    Read(#[source] io::Error),
    /// The chunk consumer returned an error.
    #[error("handling a chunk: {0}")]
    Sink(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The image is larger than an index can describe.
    #[error("image is larger than a chunk index can describe")]
    TooLarge,
    /// A worker thread panicked (a bug).
    #[error("a chunk hashing worker stopped unexpectedly")]
    WorkerFailed,
}

/// One chunk as it is cut, handed to the consumer in image order.
#[derive(Debug, Clone, Copy)]
pub struct ChunkRef<'a> {
    /// BLAKE3 of `data`.
    pub id: ChunkId,
    /// Byte offset in the image.
    pub offset: u64,
    /// The chunk's bytes.
    pub data: &'a [u8],
}

/// The result of chunking a whole image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkedImage {
    /// The chunk list.
    pub index: ChunkIndex,
    /// SHA-256 of the whole image.
    pub sha256: Sha256Digest,
    /// BLAKE3 of the whole image.
    pub blake3: Blake3Digest,
}

/// Streaming chunker. Cheap to build; each call to `chunk_reader*` runs its own threads.
#[derive(Debug, Clone)]
pub struct Chunker {
    params: ChunkParams,
    workers: NonZeroUsize,
    segment_len: usize,
}

/// Default bytes read per segment. Large enough that thread hand-offs cost nothing, small
/// enough that the few segments in flight stay within a few MiB.
pub const DEFAULT_SEGMENT_LEN: usize = 1 << 20;

/// Segments waiting for the whole-image hasher: enough to keep it busy, bounded for memory.
const WHOLE_HASH_QUEUE: usize = 2;

struct Job {
    data: Arc<Vec<u8>>,
    ranges: Vec<Range<usize>>,
    reply: SyncSender<Vec<ChunkId>>,
}

struct Pending {
    data: Arc<Vec<u8>>,
    ranges: Vec<Range<usize>>,
    result: Receiver<Vec<ChunkId>>,
}

impl Chunker {
    /// A chunker with one hashing worker per available core.
    pub fn new(params: ChunkParams) -> Self {
        let workers = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN);
        Self { params, workers, segment_len: DEFAULT_SEGMENT_LEN }
    }

    /// Sets the number of chunk-hashing workers (the result is the same for any number).
    pub fn workers(mut self, workers: NonZeroUsize) -> Self {
        self.workers = workers;
        self
    }

    /// Sets how many bytes are read per segment (clamped to at least 64 KiB).
    pub fn segment_len(mut self, len: usize) -> Self {
        self.segment_len = len.max(64 << 10);
        self
    }

    /// The parameters this chunker cuts with.
    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// Chunks and hashes everything `reader` yields.
    ///
    /// # Errors
    /// Invalid parameters or a failing reader.
    pub fn chunk_reader(&self, reader: impl Read) -> Result<ChunkedImage, ChunkingError> {
        self.chunk_reader_with(reader, |_| Ok(()))
    }

    /// Chunks and hashes everything `reader` yields, calling `sink` with each chunk, in
    /// order, once its id is known (the publisher compresses and uploads from there).
    ///
    /// # Errors
    /// Invalid parameters, a failing reader or a failing sink; the first error stops the run.
    pub fn chunk_reader_with<F>(&self, mut reader: impl Read, mut sink: F) -> Result<ChunkedImage, ChunkingError>
    where
        F: FnMut(ChunkRef<'_>) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
    {
        self.params.validate()?;
        let params = self.params;
        let (mask_s, mask_l) = v2020::select_masks(params.avg as usize, Normalization::Level1);
        let (min, avg, max) = (params.min as usize, params.avg as usize, params.max as usize);

        std::thread::scope(|scope| {
            let (whole_tx, whole_rx) = mpsc::sync_channel::<(Arc<Vec<u8>>, Range<usize>)>(WHOLE_HASH_QUEUE);
            let whole = scope.spawn(move || {
                let mut sha = sha2::Sha256::new();
                let mut b3 = blake3::Hasher::new();
                for (data, range) in whole_rx {
                    sha.update(&data[range.clone()]);
                    b3.update(&data[range]);
                }
                (Sha256Digest::from_bytes(sha.finalize().into()), Blake3Digest::from_bytes(*b3.finalize().as_bytes()))
            });

            let workers = self.workers.get();
            let (job_tx, job_rx) = mpsc::sync_channel::<Job>(workers * 2);
            let job_rx = Arc::new(Mutex::new(job_rx));
            for _ in 0..workers {
                let job_rx = Arc::clone(&job_rx);
                scope.spawn(move || {
                    loop {
                        // The lock is held only while taking the next job, never while hashing.
                        let job = match job_rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let ids = job.ranges.iter().map(|r| ChunkId::of(&job.data[r.clone()])).collect();
                        if job.reply.send(ids).is_err() {
                            return;
                        }
                    }
                });
            }

            let mut entries: Vec<IndexEntry> = Vec::new();
            let mut offset = 0u64;
            let mut pending: VecDeque<Pending> = VecDeque::new();
            let mut carry: Vec<u8> = Vec::new();
            let max_pending = workers * 2;

            let mut emit = |p: Pending, entries: &mut Vec<IndexEntry>, offset: &mut u64| -> Result<(), ChunkingError> {
                let ids = p.result.recv().map_err(|_| ChunkingError::WorkerFailed)?;
                for (id, range) in ids.into_iter().zip(p.ranges) {
                    let len = range.len();
                    sink(ChunkRef { id, offset: *offset, data: &p.data[range] }).map_err(ChunkingError::Sink)?;
                    // `len <= max <= 16 MiB`, so it always fits a u32.
                    entries.push(IndexEntry { id, len: u32::try_from(len).map_err(|_| ChunkingError::TooLarge)? });
                    *offset += len as u64;
                }
                Ok(())
            };

            let result = (|| -> Result<(), ChunkingError> {
                loop {
                    let mut buf = Vec::with_capacity(carry.len() + self.segment_len);
                    buf.append(&mut carry);
                    let fresh_start = buf.len();
                    let eof = fill(&mut reader, &mut buf, self.segment_len).map_err(ChunkingError::Read)?;
                    let buf = Arc::new(buf);
                    if buf.len() > fresh_start {
                        whole_tx
                            .send((Arc::clone(&buf), fresh_start..buf.len()))
                            .map_err(|_| ChunkingError::WorkerFailed)?;
                    }

                    let mut ranges = Vec::new();
                    let mut pos = 0;
                    while pos < buf.len() {
                        let remaining = buf.len() - pos;
                        if remaining < max && !eof {
                            break; // the cut may depend on bytes not read yet
                        }
                        let (_, n) = v2020::cut(&buf[pos..], min, avg, max, mask_s, mask_l, mask_s << 1, mask_l << 1);
                        if n == 0 {
                            break;
                        }
                        ranges.push(pos..pos + n);
                        pos += n;
                    }
                    carry.extend_from_slice(&buf[pos..]);

                    for part in split_even(ranges, workers) {
                        let (reply, result) = mpsc::sync_channel(1);
                        job_tx
                            .send(Job { data: Arc::clone(&buf), ranges: part.clone(), reply })
                            .map_err(|_| ChunkingError::WorkerFailed)?;
                        pending.push_back(Pending { data: Arc::clone(&buf), ranges: part, result });
                        while pending.len() > max_pending {
                            if let Some(p) = pending.pop_front() {
                                emit(p, &mut entries, &mut offset)?;
                            }
                        }
                    }
                    if eof {
                        break;
                    }
                }
                while let Some(p) = pending.pop_front() {
                    emit(p, &mut entries, &mut offset)?;
                }
                Ok(())
            })();
            // Closing the channels ends the worker threads, whether or not we succeeded.
            drop(job_tx);
            drop(whole_tx);
            drop(pending);
            let digests = whole.join().map_err(|_| ChunkingError::WorkerFailed);
            result?;
            let (sha256, blake3) = digests?;
            if offset > crate::index::MAX_IMAGE_SIZE {
                return Err(ChunkingError::TooLarge);
            }
            let index = ChunkIndex::new(params, entries).map_err(|_| ChunkingError::TooLarge)?;
            Ok(ChunkedImage { index, sha256, blake3 })
        })
    }
}

/// Reads until `want` more bytes are in `buf` or the reader ends. Returns whether it ended.
fn fill(reader: &mut impl Read, buf: &mut Vec<u8>, want: usize) -> io::Result<bool> {
    let target = buf.len() + want;
    while buf.len() < target {
        let start = buf.len();
        buf.resize(target, 0);
        match reader.read(&mut buf[start..]) {
            Ok(0) => {
                buf.truncate(start);
                return Ok(true);
            }
            Ok(n) => buf.truncate(start + n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => buf.truncate(start),
            Err(e) => {
                buf.truncate(start);
                return Err(e);
            }
        }
    }
    Ok(false)
}

/// Splits `ranges` into at most `parts` consecutive runs of similar byte size.
fn split_even(ranges: Vec<Range<usize>>, parts: usize) -> Vec<Vec<Range<usize>>> {
    if ranges.is_empty() {
        return Vec::new();
    }
    let total: usize = ranges.iter().map(Range::len).sum();
    let per = total.div_ceil(parts.max(1)).max(1);
    let mut out = vec![Vec::new()];
    let mut acc = 0;
    for r in ranges {
        if acc >= per {
            out.push(Vec::new());
            acc = 0;
        }
        acc += r.len();
        if let Some(last) = out.last_mut() {
            last.push(r);
        }
    }
    out
}

/// Cut points of an in-memory buffer, as `(offset, len)`, with the same rule as
/// [`Chunker`] (used to re-chunk small inputs and to cross-check the streaming path).
pub fn cut_points(data: &[u8], params: ChunkParams) -> Result<Vec<(usize, usize)>, ChunkParamsError> {
    params.validate()?;
    Ok(v2020::FastCDC::new(data, params.min as usize, params.avg as usize, params.max as usize)
        .map(|c| (c.offset, c.length))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn streaming_matches_in_memory_and_worker_count() {
        let input = data(3 << 20);
        let params = ChunkParams::BUNDLE;
        let expected = cut_points(&input, params).unwrap();
        for workers in [1, 3] {
            let chunker = Chunker::new(params).workers(NonZeroUsize::new(workers).unwrap()).segment_len(100_000);
            let out = chunker.chunk_reader(&input[..]).unwrap();
            let got: Vec<(usize, usize)> =
                out.index.iter_with_offsets().map(|(o, e)| (o as usize, e.len as usize)).collect();
            assert_eq!(got, expected);
            assert_eq!(out.sha256, Sha256Digest::of(&input));
            assert_eq!(out.blake3, Blake3Digest::of(&input));
            for (o, e) in out.index.iter_with_offsets() {
                assert_eq!(e.id, ChunkId::of(&input[o as usize..o as usize + e.len as usize]));
            }
        }
    }

    #[test]
    fn empty_input() {
        let out = Chunker::new(ChunkParams::IMAGE).chunk_reader(&[][..]).unwrap();
        assert!(out.index.is_empty());
        assert_eq!(out.sha256, Sha256Digest::of(b""));
    }

    #[test]
    fn invalid_params_are_refused() {
        assert!(ChunkParams::new(4096, 3000, 65536).is_err());
        assert!(ChunkParams::new(8192, 4096, 65536).is_err());
        assert!(ChunkParams::IMAGE.validate().is_ok());
    }
}
