//! A deterministic stand-in for an OS image, shared by the chunking benchmark and the demo
//! example (both include this file with `#[path]`).
//!
//! The image is a run of 512 KiB extents, each one of: text-like data that zstd shrinks about
//! 3×, random bytes, zeros (free space), or a copy of an earlier extent (files that appear
//! twice). The extent size is larger than FastCDC's 256 KiB maximum chunk, so a copied extent
//! yields chunks that really repeat. Everything follows from the seed: the same seed and size
//! give the same bytes on every machine. It is generated on the fly as a [`Read`], so a large
//! image costs one extent of memory.

use std::io::{self, Read};

/// Bytes per extent.
const EXTENT: usize = 512 << 10;

/// Words for the text-like extents: a config-file and log-like vocabulary.
const WORDS: [&[u8]; 32] = [
    b"flotilla",
    b"update",
    b"device",
    b"release",
    b"chunk",
    b"manifest",
    b"=",
    b"true",
    b"false",
    b"0x1f",
    b"kernel",
    b"/usr/lib",
    b"systemd",
    b"[INFO]",
    b"[WARN]",
    b"config",
    b"version",
    b"2.1.0",
    b"mount",
    b"ext4",
    b"boot",
    b"slot_a",
    b"slot_b",
    b"{",
    b"}",
    b"\"name\":",
    b"libc.so.6",
    b"root",
    b"sha256",
    b"path",
    b"ok",
    b"--",
];

/// SplitMix64: good enough to seed and to pick, and fast.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn extent_seed(seed: u64, extent: u64) -> u64 {
    let mut s = seed ^ extent.wrapping_mul(0xd1b5_4a32_d192_ed03);
    splitmix(&mut s)
}

/// The kind of extent `n` and, for a copy, the extent it copies (always an earlier one).
fn extent_kind(seed: u64, n: u64) -> (u8, u64) {
    let mut s = extent_seed(seed, n) ^ 0x5555;
    let roll = splitmix(&mut s) % 10;
    match roll {
        0..=3 => (0, n), // text
        4..=6 => (1, n), // random
        7 => (2, n),     // zeros
        _ if n == 0 => (1, n),
        _ => (3, splitmix(&mut s) % n), // copy of an earlier extent
    }
}

fn fill_extent(seed: u64, mut n: u64, buf: &mut Vec<u8>) {
    // Follow copies back to the extent that holds real content.
    let kind = loop {
        match extent_kind(seed, n) {
            (3, from) => n = from,
            (kind, _) => break kind,
        }
    };
    buf.clear();
    let mut rng = extent_seed(seed, n);
    match kind {
        0 => {
            while buf.len() < EXTENT {
                let r = splitmix(&mut rng);
                for shift in (0..40).step_by(5) {
                    buf.extend_from_slice(WORDS[((r >> shift) & 31) as usize]);
                    buf.push(if (r >> (shift + 40)) & 7 == 0 { b'\n' } else { b' ' });
                }
            }
            buf.truncate(EXTENT);
        }
        1 => {
            while buf.len() < EXTENT {
                buf.extend_from_slice(&splitmix(&mut rng).to_le_bytes());
            }
        }
        _ => buf.resize(EXTENT, 0),
    }
}

/// A generated image of a given size, read front to back.
#[derive(Debug)]
pub(crate) struct SampleImage {
    seed: u64,
    len: u64,
    pos: u64,
    extent: Vec<u8>,
}

impl SampleImage {
    /// `len` bytes generated from `seed`.
    pub(crate) fn new(seed: u64, len: u64) -> Self {
        Self { seed, len, pos: 0, extent: Vec::with_capacity(EXTENT) }
    }
}

impl Read for SampleImage {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let left = self.len - self.pos;
        if left == 0 || out.is_empty() {
            return Ok(0);
        }
        let n = self.pos / EXTENT as u64;
        let within = (self.pos % EXTENT as u64) as usize;
        if within == 0 || self.extent.is_empty() {
            fill_extent(self.seed, n, &mut self.extent);
        }
        let take = out.len().min(EXTENT - within).min(usize::try_from(left).unwrap_or(usize::MAX));
        out[..take].copy_from_slice(&self.extent[within..within + take]);
        self.pos += take as u64;
        Ok(take)
    }
}
