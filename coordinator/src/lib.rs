//! The Flotilla coordinator server.
//!
//! The coordinator decides who gets which release. It enrolls devices, answers update
//! checks with the publisher-signed manifest plus its own signed rollout assignment (device
//! nonce, server time, release hashes), accepts releases from publishers (verified against
//! the product's trust root, `version_code` monotonic, every chunk present), stores chunks
//! and indexes in content-addressed object storage, serves them as the embedded CDN origin,
//! and runs staged rollouts that advance or pause on reported failure rates. It is built on
//! axum and sqlx, with SQLite as the embedded default and PostgreSQL for production.
//!
//! # Layout
//! - [`config`]: settings and their defaults (zero configuration: SQLite + files in
//!   `./flotilla-data`).
//! - [`db`]: one code path for SQLite and PostgreSQL, embedded migrations.
//! - [`storage`]: object storage (filesystem, or an S3-compatible bucket).
//! - [`auth`]: hashed bearer tokens with device, publish and admin scopes.
//! - [`api`]: the `/v1` HTTP API.
//! - [`rollout`]: stage plans, operator actions, audit log, the evaluator.
//! - [`state`]: shared state, the live-release cache, metrics, rate limits.
//! - [`server`]: start-up and serving.
//!
//! # Example
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let state = flotilla_coordinator::server::build_state(Default::default()).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! flotilla_coordinator::server::serve(state, listener, Default::default()).await?;
//! # Ok(()) }
//! ```

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod auth;
pub mod config;
pub mod db;
pub mod error;
pub mod rollout;
pub mod server;
pub mod state;
pub mod storage;
pub mod tls;
