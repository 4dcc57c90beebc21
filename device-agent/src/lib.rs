//! The Flotilla device agent: library and, later, the `flotilla-agent` daemon.
//!
//! The agent checks the coordinator for updates, verifies the release manifest and the
//! coordinator's rollout assignment against the trust root, fetches and verifies the chunk
//! index, reuses every chunk its active slot already has, fetches the rest (from peers first
//! through the mesh, then from the CDN), verifies each chunk before it touches the inactive
//! A/B slot, checks the whole image's SHA-256, switches slots, and after the reboot runs the
//! boot-health checks that commit the new slot or roll back to the old one. Every state
//! change (`Idle → Downloading → Staged → Trial → Committed`, or `Failed` / `RolledBack`) is
//! written atomically before it is acted on, so a power cut at any instant resumes or rolls
//! back cleanly.
//!
//! # Status
//!
//! Placeholder: filled by issue 6 (CDN path); the peer fetch step plugs in with issue 7.

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// The shared formats and verification rules this crate builds on, re-exported so the
/// dependency on `flotilla-core` is real while the crate is a placeholder.
pub use flotilla_core;
