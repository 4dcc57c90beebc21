//! Rendezvous (highest-random-weight) hashing: which peer of a site fetches a chunk from the
//! origin.
//!
//! Every peer that wants a chunk nobody has computes the same answer from the same set of
//! interested peers, without talking: the peer whose BLAKE3(peer id ‖ chunk id) is highest.
//! The others wait for it (up to a deadline) and then take the chunk from it. When a peer
//! joins or leaves, only the chunks it wins or won change hands (about 1/n of them), so the
//! site keeps pulling each chunk from the origin about once while membership changes.

use flotilla_core::ids::ChunkId;
use libp2p::PeerId;

/// The weight of `peer` for `chunk`: the first 8 bytes of BLAKE3(peer id bytes ‖ chunk id).
pub fn weight(chunk: &ChunkId, peer: &PeerId) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&peer.to_bytes());
    h.update(chunk.as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_be_bytes(first)
}

/// The peer among `peers` that fetches `chunk` from the origin; `None` for no peers.
/// Duplicates in `peers` do not change the answer; ties (practically impossible) go to the
/// smaller peer id so every peer still agrees.
pub fn fetcher_for<'a>(chunk: &ChunkId, peers: impl IntoIterator<Item = &'a PeerId>) -> Option<PeerId> {
    // Each weight once (a hash per peer, not two per comparison).
    peers
        .into_iter()
        .map(|p| (weight(chunk, p), p))
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        .map(|(_, p)| *p)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    fn chunks(n: u32) -> Vec<ChunkId> {
        (0..n).map(|i| ChunkId::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn no_peers_no_fetcher() {
        assert_eq!(fetcher_for(&ChunkId::of(b"c"), &[]), None);
    }

    #[test]
    fn every_peer_agrees_whatever_the_order() {
        let mut ps = peers(12);
        for c in chunks(200) {
            let a = fetcher_for(&c, &ps);
            ps.reverse();
            assert_eq!(fetcher_for(&c, &ps), a);
            ps.rotate_left(5);
            assert_eq!(fetcher_for(&c, &ps), a);
            let mut dup = ps.clone();
            dup.extend_from_slice(&ps[..3]);
            assert_eq!(fetcher_for(&c, &dup), a);
        }
    }

    #[test]
    fn load_spreads_evenly() {
        let ps = peers(10);
        let mut count: HashMap<PeerId, u32> = HashMap::new();
        for c in chunks(10_000) {
            *count.entry(fetcher_for(&c, &ps).unwrap()).or_default() += 1;
        }
        assert_eq!(count.len(), 10, "every peer fetches some chunks");
        for (p, n) in &count {
            assert!((700..=1300).contains(n), "peer {p} fetches {n} of 10 000 chunks; expected about 1 000");
        }
    }

    #[test]
    fn a_peer_leaving_moves_only_its_chunks() {
        let ps = peers(8);
        let gone = ps[3];
        let rest: Vec<PeerId> = ps.iter().copied().filter(|p| *p != gone).collect();
        for c in chunks(2_000) {
            let before = fetcher_for(&c, &ps).unwrap();
            let after = fetcher_for(&c, &rest).unwrap();
            if before != gone {
                assert_eq!(before, after, "a chunk of a peer that stayed moved");
            } else {
                assert_ne!(after, gone);
            }
        }
    }

    #[test]
    fn a_peer_joining_takes_only_chunks_it_wins() {
        let ps = peers(6);
        let newcomer = PeerId::random();
        let mut more = ps.clone();
        more.push(newcomer);
        let mut moved = 0;
        for c in chunks(3_000) {
            let (before, after) = (fetcher_for(&c, &ps).unwrap(), fetcher_for(&c, &more).unwrap());
            if before != after {
                assert_eq!(after, newcomer);
                moved += 1;
            }
        }
        assert!((250..=650).contains(&moved), "{moved} of 3 000 chunks moved to the 7th peer; expected about 430");
    }
}
