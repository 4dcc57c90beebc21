//! Offline sites: installs offered on the mesh, and events kept until a coordinator answers.
//!
//! A site with no coordinator (and no CDN) gets releases from a site cache that imported a
//! `flotilla export` carrying a signed rollout directive. The cache offers the release on the
//! mesh ([`flotilla_mesh::offer`]); the mesh hands this agent only offers whose manifest
//! verified against the trust root, whose directive verified against the `rollout` role of
//! the same root, and which name the same release (the two-signer rule, with the directive
//! in the assignment's place). The agent then applies the staged rollout itself: it installs
//! only when its cohort bucket falls inside the directive's share ([`RolloutDirective::includes`],
//! the coordinator's bucketing function) and the manifest passes every device check, fetching
//! the index and every chunk from peers. Its events go to the on-disk queue like any other,
//! and while events are pending the daemon keeps trying (capped backoff) to enroll and
//! deliver them, so they reach the coordinator once a path to it returns; the coordinator
//! records each event id once.
//!
//! A child module of [`crate::agent`]: it drives the agent's own install path.
//!
//! [`RolloutDirective::includes`]: flotilla_core::rollout::RolloutDirective::includes

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use flotilla_core::ids::Sha256Digest;
use flotilla_mesh::offer::VerifiedOffer;
use tokio::sync::broadcast;

use super::{Agent, AgentError, CheckReport, Incoming, IndexFrom};
use crate::journal::State;

/// First wait before retrying to deliver queued events; doubled after each failure.
const DELIVERY_RETRY_MIN: Duration = Duration::from_secs(2);
/// Longest wait between delivery attempts: a site's link may come back at any moment, and an
/// attempt against an unreachable coordinator costs one refused connection.
const DELIVERY_RETRY_MAX: Duration = Duration::from_secs(15);

/// What the daemon keeps between update checks for offline sites.
#[derive(Debug)]
pub(super) struct Offline {
    offers: Option<broadcast::Receiver<VerifiedOffer>>,
    /// Offers already decided against (manifest, directive issue time): logged once.
    decided: HashSet<(Sha256Digest, flotilla_core::time::Timestamp)>,
    retry: Duration,
    /// When queued events are tried next: a deadline, so offers heard meanwhile (every few
    /// seconds) do not keep pushing the attempt back.
    next_delivery: tokio::time::Instant,
}

impl Agent {
    /// Prepares the daemon for offers: the mesh verifies them against this device's trust
    /// root. Call before the node starts.
    pub(super) fn offline_start(&self) -> Offline {
        self.mesh.set_trust_root(CurrentRoot::current(&self.root));
        Offline {
            offers: None,
            decided: HashSet::new(),
            retry: DELIVERY_RETRY_MIN,
            next_delivery: tokio::time::Instant::now() + DELIVERY_RETRY_MIN,
        }
    }

    /// Waits `wait` for the next update check, meanwhile installing what the mesh offers and
    /// retrying the delivery of queued events. Returns true when `shutdown` resolved.
    pub(super) async fn idle<F: Future<Output = ()>>(
        &self,
        wait: Duration,
        state: &mut Offline,
        mut shutdown: Pin<&mut F>,
    ) -> bool {
        let until = tokio::time::Instant::now() + wait;
        if state.offers.is_none() {
            state.offers = self.mesh.mesh().await.map(|m| m.offers());
        }
        loop {
            let pending = !self.queue.pending().is_empty() && self.config.coordinator.is_some();
            let offer = async {
                match state.offers.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => return true,
                _ = tokio::time::sleep_until(until) => return false,
                offer = offer => match offer {
                    Ok(offer) => {
                        if let Err(e) = self.take_offer(&offer, &mut state.decided).await {
                            tracing::warn!(error = %e, "offered release not installed");
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => state.offers = None,
                },
                _ = tokio::time::sleep_until(state.next_delivery), if pending => {
                    match self.deliver_events().await {
                        Ok(sent) => {
                            tracing::info!(sent, "queued events delivered");
                            state.retry = DELIVERY_RETRY_MIN;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "queued events not delivered yet");
                            state.retry = (state.retry * 2).min(DELIVERY_RETRY_MAX);
                        }
                    }
                    state.next_delivery = tokio::time::Instant::now() + state.retry;
                }
            }
        }
    }

    /// Enrolls when needed and sends the queued events.
    async fn deliver_events(&self) -> Result<usize, AgentError> {
        if self.load_enrollment().is_none() {
            let c = self.coordinator()?;
            // Enrolling writes the state directory: not while an install holds it.
            let _lock = self.lock(false)?;
            let j = self.journal()?;
            self.enroll(&c, &j).await?;
        }
        self.flush_events().await
    }

    /// Installs an offered release when it is for this device, newer, and this device is in
    /// the directive's share; `Ok(None)` when it is not for this device.
    async fn take_offer(
        &self,
        offer: &VerifiedOffer,
        decided: &mut HashSet<(Sha256Digest, flotilla_core::time::Timestamp)>,
    ) -> Result<Option<CheckReport>, AgentError> {
        let (m, d) = (offer.manifest(), offer.directive());
        let man = m.manifest();
        if man.product != self.config.product || man.channel != self.config.channel {
            return Ok(None);
        }
        let sha = m.payload_sha256();
        let j = self.journal()?;
        let installed = j.installed.as_ref().is_some_and(|r| r.version_code >= man.version_code);
        let staged =
            j.target.as_ref().is_some_and(|t| t.release.manifest_sha256 == sha) && j.state != State::Downloading;
        if installed || staged || j.blacklist.contains(&sha) || !(j.state.is_settled() || j.state == State::Downloading)
        {
            return Ok(None);
        }
        let first = decided.insert((sha, d.issued_at));
        if !d.includes(&self.device_id) {
            if first {
                tracing::info!(
                    version = %man.version,
                    percent = f64::from(d.basis_points) / 100.0,
                    "offered release: this device is not in the rollout"
                );
            }
            return Ok(None);
        }
        if !self.config.auto_install && !man.mandatory {
            if first {
                tracing::info!(version = %man.version, "offered release waits for approval (auto_install = false)");
            }
            return Ok(Some(CheckReport::Available { version: man.version.to_string() }));
        }
        let Some(mesh) = self.mesh.mesh().await else { return Ok(None) };
        tracing::info!(version = %man.version, percent = f64::from(d.basis_points) / 100.0, "offered release: installing from peers");
        // The index comes from peers, checked against its id by the mesh and against the
        // manifest by the install; it is kept beside the journal for the install to read.
        let index = mesh
            .fetch_index(man.index.id, man.index.size)
            .await
            .map_err(|e| AgentError::Export { path: self.paths.dir.clone(), message: e.to_string() })?;
        let index_path = self.paths.file("offer.index");
        crate::durable::write_atomic(&index_path, &index)
            .map_err(super::io_err(format!("storing {}", index_path.display())))?;
        let cdn = self.config.coordinator.as_ref().and_then(|_| self.coordinator().ok());
        let Some(chunks) = self.mesh.offline_source(cdn).await else { return Ok(None) };
        let _lock = self.lock(false)?;
        let mut j = self.journal_locked()?;
        let src = Incoming {
            envelope: m.envelope_json(),
            assignment: None,
            release_id: None,
            index: IndexFrom::File(index_path.clone()),
            chunks,
        };
        let result = self.install(&mut j, src).await;
        let _ = std::fs::remove_file(&index_path);
        if let Ok(report) = &result {
            tracing::info!(?report, "offered release installed");
        }
        result.map(Some)
    }
}

/// The trust root in use, whether the agent holds it plain or behind the lock that a
/// rotation swaps it under.
trait CurrentRoot {
    fn current(&self) -> flotilla_core::trust::TrustRoot;
}

impl CurrentRoot for flotilla_core::trust::TrustRoot {
    fn current(&self) -> flotilla_core::trust::TrustRoot {
        self.clone()
    }
}

impl CurrentRoot for std::sync::RwLock<flotilla_core::trust::TrustRoot> {
    fn current(&self) -> flotilla_core::trust::TrustRoot {
        match self.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}
