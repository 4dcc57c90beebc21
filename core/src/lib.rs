//! Flotilla's shared formats: everything two Flotilla components must agree on byte for byte.
//!
//! A publisher cuts an image into content-defined chunks ([`chunking`]), lists them in a
//! binary [`index`], stores each chunk as a small [`object`], and describes the release in a
//! [`manifest`] signed inside a [`dsse`] envelope. Devices verify that envelope against a
//! versioned [`trust`] root, check the coordinator's signed [`rollout`] assignment against it,
//! and only then fetch and verify chunks. This crate does no network or database I/O: it
//! works over byte slices, readers and writers, so every other crate can share it.
//!
//! # Layout
//! - [`ids`]: chunk, index, image and key digests as distinct types.
//! - [`chunking`]: streaming FastCDC with whole-image SHA-256/BLAKE3 in the same pass.
//! - [`index`]: the binary chunk index and its bounded decoder.
//! - [`object`]: chunk objects (raw or zstd) and their bounded, verified decoder.
//! - [`delta`]: binary patches between images, applied streaming with bounded memory.
//! - [`archive`]: deterministic tar archives of bundle directories, and safe extraction.
//! - [`json`]: the strict, bounded JSON parser used for every signed payload.
//! - [`dsse`]: the DSSE envelope and its pre-authentication encoding (PAE).
//! - [`keys`]: Ed25519 and RSA-4096-PSS keys, key ids.
//! - [`trust`]: trust roots, roles, thresholds, rotation, and the one signature check.
//! - [`manifest`]: release manifests and the checks a device applies to them.
//! - [`rollout`]: signed rollout assignments and directives, cohort bucketing.
//! - [`version`]: version_code and semver ordering helpers.
//! - [`time`]: RFC 3339 timestamps and the trusted-time rule.
//!
//! # Example
//! ```no_run
//! use flotilla_core::{chunking::{Chunker, ChunkParams}, keys::{Algorithm, SigningKey}};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let image = std::fs::File::open("rootfs.img")?;
//! let chunked = Chunker::new(ChunkParams::IMAGE).chunk_reader(image)?;
//! let index_bytes = chunked.index.encode();
//! println!("{} chunks, image sha256 {}, index {}", chunked.index.len(), chunked.sha256, chunked.index.id());
//! let key = SigningKey::generate(Algorithm::Ed25519)?;
//! # let _ = (index_bytes, key);
//! # Ok(()) }
//! ```
#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod archive;
pub mod chunking;
pub mod delta;
pub mod dsse;
pub mod ids;
pub mod index;
pub mod json;
pub mod keys;
pub mod manifest;
pub mod object;
pub mod rollout;
pub mod time;
pub mod trust;
pub mod version;
