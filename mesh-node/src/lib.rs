//! Peer-first chunk exchange for Flotilla over libp2p.
//!
//! Devices on the same site fetch the chunks they lack from nearby peers and go to the CDN
//! only for what no peer has, with one peer per site fetching each chunk from the origin.
//! Discovery uses mDNS on the local network and Kademlia (records per release) beyond it;
//! gossipsub carries signed release announcements and have-maps; a length-delimited chunk
//! transfer protocol with explicit limits carries runs of chunks, each verified against its
//! BLAKE3 id before use. Peers are untrusted: a bad chunk gets its sender banned. The crate
//! is a library the device agent embeds and, later, the `flotilla-mesh` site-cache binary
//! that keeps a chunk store on disk for offline sites.
//!
//! # Status
//!
//! Placeholder: filled by issue 7.

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// The shared formats and verification rules this crate builds on, re-exported so the
/// dependency on `flotilla-core` is real while the crate is a placeholder.
pub use flotilla_core;
