//! uniffi bindings of the Flotilla agent for apps.
//!
//! Apps that update their own bundle (the React Native, Capacitor and Flutter live-update
//! case) embed the agent's library in `dir` slot mode through these bindings: configure,
//! check, download and stage, get the current bundle path, mark healthy (which arms
//! rollback), roll back, and receive progress callbacks. Kotlin, Swift and Python are
//! generated from the same Rust; this crate has no update logic of its own.
//!
//! # Status
//!
//! Placeholder: filled with the device agent's SDK work (issue 6).

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

/// The device agent library these bindings wrap.
pub use flotilla_agent;

/// The shared formats and verification rules this crate builds on, re-exported so the
/// dependency on `flotilla-core` is real while the crate is a placeholder.
pub use flotilla_core;
