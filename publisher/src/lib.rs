//! The `flotilla` command for publishers and operators.
//!
//! A publisher turns a build (an OS image, or an app bundle packed as a deterministic tar)
//! into content-defined chunks, writes the chunk index, builds deltas against recent
//! releases, signs the release manifest with its `release` keys, uploads only the chunks the
//! coordinator lacks, and registers the release. Operators use the same command to manage
//! keys and trust-root rotation, and to pause, resume, advance, halt or roll back staged
//! rollouts. All formats and signing come from [`flotilla_core`]; this crate talks to the
//! coordinator over its HTTP API and never imports the coordinator crate.
//!
//! # Status
//!
//! Placeholder: the library and the `flotilla` binary are filled by issue 5.

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// The shared formats and verification rules this crate builds on, re-exported so the
/// dependency on `flotilla-core` is real while the crate is a placeholder.
pub use flotilla_core;
