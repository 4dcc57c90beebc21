//! The chunk object decoder on arbitrary objects and expected lengths.
//!
//! Input: 3 bytes of expected length (little-endian, masked to at most 1 MiB), then the
//! object. The decoder must never panic, never hand back bytes of another length or id, and
//! an object that only failed on its id must decode under its real id and round-trip through
//! the encoder.
#![no_main]

use flotilla_core::ids::ChunkId;
use flotilla_core::object::{self, ObjectError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((len, obj)) = data.split_first_chunk::<3>() else { return };
    let len = u32::from_le_bytes([len[0], len[1], len[2], 0]) & 0xf_ffff;
    let asked = ChunkId::from_bytes([0; 32]);
    match object::decode(obj, &asked, len) {
        Ok(bytes) => {
            assert_eq!(bytes.len(), len as usize);
            assert_eq!(ChunkId::of(&bytes), asked);
        }
        Err(ObjectError::IdMismatch { actual, .. }) => {
            let bytes = match object::decode(obj, &actual, len) {
                Ok(bytes) => bytes,
                Err(e) => panic!("object decodes to id {actual} but is refused under it: {e}"),
            };
            assert_eq!(bytes.len(), len as usize);
            assert_eq!(ChunkId::of(&bytes), actual);
            let again = object::encode(&bytes, object::DEFAULT_LEVEL);
            assert!(again.len() as u64 <= object::max_object_len(len), "encoder exceeded its own bound");
            match object::decode(&again, &actual, len) {
                Ok(round) => assert_eq!(round, bytes),
                Err(e) => panic!("re-encoded object is refused: {e}"),
            }
        }
        Err(_) => {}
    }
});
