//! The Flotilla device agent: library and the `flotilla-agent` daemon.
//!
//! The agent checks the coordinator for updates, verifies the release manifest and the
//! coordinator's rollout assignment against the trust root, fetches and verifies the chunk
//! index, reuses every chunk its active slot already has, fetches the rest from the CDN,
//! verifies each chunk before it touches the inactive A/B slot, checks the whole image's
//! SHA-256 from the media, switches slots, and after the reboot runs the boot-health checks
//! that commit the new slot or roll back to the old one. Every state change
//! (`Idle → Downloading → Staged → Trial → Committed`, or `Failed` / `RolledBack`) is written
//! atomically before it is acted on, so a power cut at any instant resumes or rolls back
//! cleanly.
//!
//! # Layout
//! - [`config`]: the TOML config.
//! - [`agent`]: check, install, boot-check, mark-good, status, the daemon loop.
//! - [`install`]: the slot writer: plan, reuse, parallel verified fetch, resume.
//! - [`delta`]: installing from a binary patch: plan, base check, fetch, streaming apply.
//! - [`journal`]: the persisted state machine and download progress.
//! - [`durable`]: atomic, checksummed file writes.
//! - [`slot`]: `file` and `dir` slots.
//! - [`boot`]: RAUC-style bootloader variables (env file, U-Boot, GRUB, hook) and the
//!   `dir` pointer.
//! - [`health`]: boot-health checks.
//! - [`events`]: the on-disk event queue.
//! - [`client`]: the coordinator's device API.
//! - [`peer`]: peer-first chunk fetching over the mesh, and what the device serves.
//! - [`rootchain`]: trust-root rotation: the chain from the provisioned root, kept durably.
//! - [`probation`]: the crash-loop probation window after a commit.
//! - [`crash`]: named crash points for power-cut tests.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = flotilla_agent::config::Config::load("/etc/flotilla/agent.toml".as_ref())?;
//! let agent = flotilla_agent::agent::Agent::new(config)?;
//! println!("{:?}", agent.check_once().await?);
//! # Ok(()) }
//! ```
//!
//! The peer fetch step (issue 7) plugs into [`install::ChunkSource`].

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod boot;
pub mod client;
pub mod config;
pub mod crash;
pub mod delta;
pub mod durable;
pub mod events;
pub mod health;
pub mod install;
pub mod journal;
pub mod peer;
pub mod probation;
pub mod rootchain;
pub mod slot;
