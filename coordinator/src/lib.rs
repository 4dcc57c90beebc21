//! The Flotilla coordinator server.
//!
//! The coordinator decides who gets which release. It enrolls devices, answers update
//! checks with the publisher-signed manifest plus its own signed rollout assignment (device
//! nonce, server time, release hashes), accepts releases from publishers (verified against
//! the product's trust root, `version_code` monotonic, every chunk present), stores chunks,
//! indexes and manifests in content-addressed object storage (filesystem or S3-compatible),
//! serves them as the embedded CDN origin, and runs staged rollouts that advance or pause on
//! reported failure rates. It is built on axum and sqlx, with SQLite as the embedded default
//! and PostgreSQL for production; migrations live in the repository's `migrations/` folder.
//!
//! # Status
//!
//! Placeholder: filled by issue 4.

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// The shared formats and verification rules this crate builds on, re-exported so the
/// dependency on `flotilla-core` is real while the crate is a placeholder.
pub use flotilla_core;
