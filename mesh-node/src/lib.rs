//! Peer-first chunk exchange for Flotilla over libp2p.
//!
//! Devices on the same site fetch the chunks they lack from nearby peers and go to the CDN
//! only for what no peer has, with one peer per site fetching each chunk from the origin
//! ([`rendezvous`]). Peers talk over TCP (Noise, Yamux; optionally inside a fleet-private
//! network with a pre-shared key) or QUIC, and find each other through static bootstrap
//! addresses, mDNS on the local network and, beyond it, Kademlia provider records (one per
//! release); gossipsub carries signed release announcements, verified against the
//! fleet's trust root before anyone acts on them; `/flotilla/chunk/1` ([`protocol`]) carries
//! chunk objects with explicit size limits, each verified against its BLAKE3 id before use.
//! Peers are untrusted: a peer that sends a bad chunk is disconnected and banned for a while.
//! The crate is the library the device agent embeds and the `flotilla-mesh` site cache,
//! which serves a bounded on-disk chunk store ([`store::DiskStore`]) filled from
//! `flotilla export` bundles.
//!
//! # Layout
//! - [`node`]: the [`Mesh`] handle and the actor owning the libp2p swarm.
//! - [`offer`]: signed offers (release + rollout directive) for sites without a coordinator.
//! - [`protocol`]: the chunk and release request/response protocols and their bounded codecs.
//! - [`store`]: what a node serves ([`ChunkProvider`]) and the site cache's LRU store.
//! - [`rendezvous`]: which peer of a site fetches a chunk from the origin.
//! - [`cache`]: the `flotilla-mesh` site-cache commands.
//! - [`prefetch`]: a site cache keeping a product's live releases from the coordinator.
//!
//! # Example
//! ```no_run
//! # async fn demo(id: flotilla_core::ids::ChunkId, len: u32) -> Result<(), flotilla_mesh::MeshError> {
//! use std::sync::Arc;
//! use flotilla_mesh::{Mesh, MeshConfig, Role, store::NoChunks};
//!
//! let mut config = MeshConfig::new(Role::Agent);
//! config.bootstrap.push("/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWRrxVnnhY4QnXuqXbqm2bnVRs6ijTbKvZVfn3bRiBYHhr".parse().expect("address"));
//! let mesh = Mesh::start(config, Arc::new(NoChunks)).await?;
//! let chunk = mesh.fetch(id, len).await?; // verified against `id`
//! println!("{} bytes from {}", chunk.data.len(), chunk.peer);
//! # Ok(()) }
//! ```

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cache;
pub mod node;
pub mod offer;
pub mod prefetch;
pub mod protocol;
pub mod rendezvous;
pub mod store;

pub use libp2p::multiaddr::Protocol;
pub use libp2p::pnet::PreSharedKey;
pub use libp2p::{Multiaddr, PeerId};
pub use node::{
    Fetched, MAX_IN_FLIGHT_PER_PEER, Mesh, MeshConfig, MeshError, MeshStats, PeerInfo, Role, default_listen, is_quic,
    load_psk,
};
pub use rendezvous::fetcher_for;
pub use store::ChunkProvider;
