//! The agent: update checks, installs, boot checks, status. Every state change goes through
//! the journal before it is acted on (see [`crate::journal`]); the order of writes follows
//! DESIGN.md's "Security and crash-safety rules".

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_core::manifest::{DeviceContext, ManifestError, VerifiedManifest, verify_for_device};
use flotilla_core::rollout::{AssignmentError, verify_assignment};
use flotilla_core::time::{Timestamp, trusted_now};
use flotilla_core::trust::TrustRoot;
use serde::{Deserialize, Serialize};

use crate::boot::{BootControl, BootError};
use crate::client::{CheckOutcome, ClientError, Coordinator, EnrollRequest};
use crate::config::{Config, SlotsConfig};
use crate::crash;
use crate::durable::write_atomic;
use crate::events::{Event, EventKind, EventQueue};
use crate::install::{self, ChunkSource, WriteError, WritePlan};
use crate::journal::{ByteSources, Journal, JournalError, MAX_TRANSITIONS, Release, State, Target};
use crate::probation::{Probation, ProbationPolicy};
use crate::rootchain::{RootChainError, RootStore};
use crate::slot::{SlotError, SlotName, Slots};

#[path = "offline.rs"]
mod offline;

mod probation;

/// This agent's version (sent to the coordinator, checked against `min_agent_version`).
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often `boot-check` looks for the mark-good flag while it waits.
const MARK_GOOD_POLL: Duration = Duration::from_millis(50);

/// Agent errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The journal.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The bootloader state.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A slot.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The coordinator.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The manifest or index was refused.
    #[error("release refused: {0}")]
    Manifest(#[from] ManifestError),
    /// The coordinator's signed assignment was refused.
    #[error("release refused: {0}")]
    Assignment(#[from] AssignmentError),
    /// Writing the slot failed.
    #[error("install failed: {0}")]
    Write(#[from] WriteError),
    /// The written slot does not hash to the manifest's SHA-256.
    #[error("slot {slot} hashes to {actual} after writing, the manifest says {expected}; not switching")]
    ImageMismatch {
        /// The slot.
        slot: SlotName,
        /// Manifest.
        expected: flotilla_core::ids::Sha256Digest,
        /// Read back.
        actual: flotilla_core::ids::Sha256Digest,
    },
    /// The release was rolled back on this device before.
    #[error("release {version} (version_code {version_code}) was rolled back on this device; not installing it again")]
    Blacklisted {
        /// Version.
        version: String,
        /// version_code.
        version_code: u64,
    },
    /// Another install or trial is in progress.
    #[error("an install is in state {0:?}; finish it (reboot, boot-check) first")]
    Busy(State),
    /// The committed release is on crash-loop probation: its fallback slot must stay intact.
    #[error(
        "release {version} is on crash-loop probation; no install may overwrite the fallback slot until it is over \
         (see `status`)"
    )]
    OnProbation {
        /// The release on probation.
        version: String,
    },
    /// Another agent process holds the state lock.
    #[error("another flotilla-agent is working on {0}; try again when it is done")]
    Locked(PathBuf),
    /// A newer trust root from the coordinator was refused.
    #[error("release refused: {0}")]
    RootChain(#[from] RootChainError),
    /// The trust root file.
    #[error("trust root {path}: {message}")]
    TrustRoot {
        /// The file.
        path: PathBuf,
        /// The problem.
        message: String,
    },
    /// No device id.
    #[error("device id: {0}")]
    DeviceId(String),
    /// No coordinator configured.
    #[error("no coordinator is configured (set `coordinator` in the config or FLOTILLA_COORDINATOR_URL)")]
    NoCoordinator,
    /// A local export is incomplete.
    #[error("export {path}: {message}")]
    Export {
        /// The directory.
        path: PathBuf,
        /// The problem.
        message: String,
    },
    /// State directory I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// Files in the state directory.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The directory.
    pub dir: PathBuf,
}

impl Paths {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    /// The journal.
    pub fn journal(&self) -> PathBuf {
        self.file("journal")
    }
    fn progress(&self) -> PathBuf {
        self.file("progress")
    }
    fn enrollment(&self) -> PathBuf {
        self.file("enrollment.json")
    }
    fn etag(&self) -> PathBuf {
        self.file("etag")
    }
    /// One line per chunk fetched over the network during the current install.
    pub fn downloads_log(&self) -> PathBuf {
        self.file("downloads.log")
    }
    fn healthy_flag(&self) -> PathBuf {
        self.file("healthy")
    }
    fn lock(&self) -> PathBuf {
        self.file("lock")
    }
    fn events(&self) -> PathBuf {
        self.file("events")
    }
    fn target_manifest(&self) -> PathBuf {
        self.file("target.manifest.json")
    }
    fn target_index(&self) -> PathBuf {
        self.file("target.index")
    }
    fn slot_index(&self, s: SlotName) -> PathBuf {
        self.file(&format!("slot-{}.index", s.lower()))
    }
    fn slot_manifest(&self, s: SlotName) -> PathBuf {
        self.file(&format!("slot-{}.manifest.json", s.lower()))
    }
    /// Where `install FILE.tar` unpacks the export while it installs from it.
    fn import_dir(&self) -> PathBuf {
        self.file("import")
    }
}

/// The stored enrollment.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Enrollment {
    token: String,
    device_id: String,
    product: String,
    channel: String,
    coordinator: String,
}

/// What `check-once` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CheckReport {
    /// Nothing newer.
    UpToDate,
    /// A release is available but waits for approval (`auto_install = false`).
    Available {
        /// Version.
        version: String,
    },
    /// A newer release needs a newer native shell.
    NativeTooOld {
        /// Required version.
        required: String,
    },
    /// Installed into the inactive slot and switched; a reboot boots it.
    Staged {
        /// Version.
        version: String,
        /// The slot.
        slot: SlotName,
        /// Bytes by source.
        bytes: ByteSources,
    },
    /// A switch is made and waits for a reboot.
    RebootPending {
        /// The slot.
        slot: SlotName,
    },
    /// A slot is on trial; `boot-check` decides.
    OnTrial,
    /// The committed release is on crash-loop probation; nothing is installed until it is
    /// over (its fallback slot must stay intact).
    OnProbation {
        /// The release on probation.
        version: String,
    },
}

/// What `boot-check` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum BootReport {
    /// Nothing was on trial; the running slot is marked good.
    Normal {
        /// The running slot.
        slot: SlotName,
    },
    /// The slot on trial passed and is committed.
    Committed {
        /// The slot.
        slot: SlotName,
        /// Version.
        version: String,
    },
    /// The trial failed this time; reboot to try again (attempts left).
    RetryAfterReboot {
        /// Why.
        reason: String,
        /// Attempts used.
        attempts: u32,
        /// The limit.
        limit: u32,
    },
    /// The switch was not made yet; it is now, and a reboot boots the new slot.
    RebootPending {
        /// The slot.
        slot: SlotName,
    },
    /// Rolled back to the previous slot (for `file` slots a reboot boots it).
    RolledBack {
        /// The slot now selected.
        slot: SlotName,
        /// Why.
        reason: String,
    },
}

/// The agent.
#[derive(Debug)]
pub struct Agent {
    config: Config,
    paths: Paths,
    slots: Slots,
    boot: BootControl,
    queue: EventQueue,
    // A lock because a rotation replaces the root while the agent is shared (`&self`); held
    // only to clone or swap, never across an await.
    root: std::sync::RwLock<TrustRoot>,
    roots: RootStore,
    device_id: String,
    mesh: crate::peer::MeshSlot,
}

/// Holds the state directory lock while alive.
#[derive(Debug)]
pub struct StateLock(#[allow(dead_code)] File);

impl Agent {
    /// Builds an agent from its config: loads the trust root, resolves the device id, creates
    /// the state directory (0700).
    ///
    /// # Errors
    /// [`AgentError`] naming the problem.
    pub fn new(config: Config) -> Result<Self, AgentError> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.state_dir)
            .map_err(io_err(format!("creating the state directory {}", config.state_dir.display())))?;
        // The provisioned root, then every successor kept after a rotation, each step verified.
        let roots = RootStore::new(&config.trust_root, &config.state_dir.join("trust-roots"));
        let root = roots
            .load()
            .map_err(|e| AgentError::TrustRoot { path: config.trust_root.clone(), message: e.to_string() })?;
        let root = std::sync::RwLock::new(root);
        let device_id = resolve_device_id(&config)?;
        let slots = Slots::from_config(&config.slots);
        let boot = match &config.slots {
            SlotsConfig::File { .. } | SlotsConfig::Block { .. } => {
                BootControl::env(&config.bootloader, config.health.boot_attempts)
            }
            SlotsConfig::Dir { root } => BootControl::pointer(root),
        };
        let paths = Paths { dir: config.state_dir.clone() };
        let queue = EventQueue::new(&paths.events());
        let mesh = crate::peer::MeshSlot::new(config.mesh.clone(), paths.dir.join("mesh.key"));
        Ok(Self { config, paths, slots, boot, queue, root, roots, device_id, mesh })
    }

    /// The state directory's files.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// The device id in use.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The trust root in use (the provisioned one or its newest verified successor).
    pub fn trust_root(&self) -> TrustRoot {
        match self.root.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Fetches the roots after the current one from the coordinator and walks the chain
    /// ([`crate::rootchain`]); returns whether the root moved. A step that does not verify
    /// is refused (the roots verified before it are kept).
    async fn refresh_trust_root(&self, c: &Coordinator) -> Result<bool, AgentError> {
        let Some(enrollment) = self.load_enrollment() else { return Ok(false) };
        let current = self.trust_root();
        let chain = c.trust_roots(&enrollment.token, &self.config.product, current.version()).await?;
        let mut accepted = None;
        let walked = self.roots.advance(&current, &chain, &mut accepted);
        let moved = accepted.is_some();
        if let Some(next) = accepted {
            match self.root.write() {
                Ok(mut r) => *r = next,
                Err(poisoned) => *poisoned.into_inner() = next,
            }
        }
        walked?;
        Ok(moved)
    }

    /// Takes the state lock: one agent process acts at a time.
    ///
    /// # Errors
    /// [`AgentError::Locked`] when another process holds it.
    pub fn lock(&self, wait: bool) -> Result<StateLock, AgentError> {
        let path = self.paths.lock();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        if wait {
            f.lock().map_err(io_err("locking the state directory"))?;
        } else {
            match f.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => return Err(AgentError::Locked(self.paths.dir.clone())),
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err("locking the state directory")(e)),
            }
        }
        Ok(StateLock(f))
    }

    fn journal(&self) -> Result<Journal, AgentError> {
        Ok(Journal::load(&self.paths.journal())?)
    }

    fn coordinator(&self) -> Result<Coordinator, AgentError> {
        let url = self.config.coordinator.as_deref().ok_or(AgentError::NoCoordinator)?;
        Ok(Coordinator::with_ca(url, self.config.ca_cert.as_deref())?)
    }

    fn event(&self, kind: EventKind, release: Option<&Release>, bytes: ByteSources, detail: Option<String>) {
        if let Err(e) = self.queue.put(&Self::new_event(kind, release, bytes, detail)) {
            tracing::error!(error = %e, "cannot queue an event");
        }
    }

    /// An event about `release`, not queued yet (see [`Agent::record`]).
    fn new_event(kind: EventKind, release: Option<&Release>, bytes: ByteSources, detail: Option<String>) -> Event {
        let ids = (release.and_then(|r| r.release_id), release.map(|r| r.version_code));
        Event::new(kind, ids, bytes, detail)
    }

    /// Saves the journal (moved to `state`, when given) together with the event that reports
    /// the change, then queues the journal's outbox, that event last. The event rides in the
    /// outbox across the save, so a power cut before it reaches the queue loses nothing: the
    /// next command that holds the state lock queues it under the same id
    /// ([`Agent::journal_locked`]), and so does the next `record`, before its own event.
    ///
    /// # Errors
    /// The journal's; the event is then not queued either.
    fn record(&self, j: &mut Journal, state: Option<State>, event: Event) -> Result<(), JournalError> {
        j.outbox.push(event);
        let saved = match state {
            Some(s) => j.transition(s, &self.paths.journal()),
            None => j.save(&self.paths.journal()),
        };
        if let Err(e) = saved {
            j.outbox.pop();
            return Err(e);
        }
        crash::point("recorded");
        self.drain_outbox(j);
        Ok(())
    }

    /// Queues the journal's outbox in order and empties it in memory: the next save forgets
    /// the events, and until then a restart queues them again, which the coordinator records
    /// once. What cannot be queued stays, with what follows it, so the order holds. Returns
    /// whether the outbox is empty.
    fn drain_outbox(&self, j: &mut Journal) -> bool {
        let queued = j.outbox.iter().take_while(|e| match self.queue.put(e) {
            Ok(()) => true,
            Err(err) => {
                tracing::error!(error = %err, "cannot queue an event; it stays in the journal's outbox");
                false
            }
        });
        let n = queued.count();
        j.outbox.drain(..n);
        j.outbox.is_empty()
    }

    /// The journal, for a command that holds the state lock: events that a power cut left
    /// in its outbox are queued first (see [`Agent::record`]).
    fn journal_locked(&self) -> Result<Journal, AgentError> {
        let mut j = self.journal()?;
        if j.outbox.is_empty() {
            return Ok(j);
        }
        let n = j.outbox.len();
        if self.drain_outbox(&mut j) {
            tracing::info!(events = n, "queued the events an interrupted run left in the journal");
            j.save(&self.paths.journal())?;
        }
        Ok(j)
    }

    fn push_event(&self, kind: EventKind, ids: (Option<i64>, Option<u64>), bytes: ByteSources, detail: Option<String>) {
        if let Err(e) = self.queue.push(kind, ids, bytes, detail) {
            tracing::error!(error = %e, "cannot queue an event");
        }
    }

    fn load_enrollment(&self) -> Option<Enrollment> {
        let e: Enrollment = serde_json::from_slice(&std::fs::read(self.paths.enrollment()).ok()?).ok()?;
        let same = e.device_id == self.device_id
            && e.product == self.config.product
            && e.channel == self.config.channel
            && Some(e.coordinator.as_str()) == self.config.coordinator.as_deref();
        same.then_some(e)
    }

    async fn enroll(&self, c: &Coordinator, j: &Journal) -> Result<String, AgentError> {
        let installed = j.installed.as_ref();
        let token = c
            .enroll(&EnrollRequest {
                device_id: &self.device_id,
                product: &self.config.product,
                channel: &self.config.channel,
                hardware: self.config.hardware.as_deref(),
                platform: &self.config.platform,
                architecture: &self.config.architecture,
                version: installed.map(|r| r.version.as_str()),
                version_code: installed.map(|r| r.version_code),
                agent_version: AGENT_VERSION,
                native_version: self.config.native_version.as_deref(),
                enrollment_secret: self.config.enrollment_secret.as_ref().map(|s| s.expose()),
            })
            .await?;
        let e = Enrollment {
            token: token.clone(),
            device_id: self.device_id.clone(),
            product: self.config.product.clone(),
            channel: self.config.channel.clone(),
            coordinator: self.config.coordinator.clone().unwrap_or_default(),
        };
        // write_atomic creates files 0600: the token is a credential.
        write_atomic(&self.paths.enrollment(), &serde_json::to_vec(&e).unwrap_or_default())
            .map_err(io_err("storing the device token"))?;
        let _ = std::fs::remove_file(crate::durable::previous_of(&self.paths.enrollment()));
        let _ = std::fs::remove_file(self.paths.etag());
        tracing::info!(device = %self.device_id, channel = %self.config.channel, "enrolled");
        Ok(token)
    }

    async fn token(&self, c: &Coordinator, j: &Journal) -> Result<String, AgentError> {
        match self.load_enrollment() {
            Some(e) => Ok(e.token),
            None => self.enroll(c, j).await,
        }
    }

    /// Sends queued events; keeps them when the coordinator is unreachable.
    ///
    /// # Errors
    /// The coordinator refused or is unreachable (events stay queued).
    pub async fn flush_events(&self) -> Result<usize, AgentError> {
        let pending = self.queue.pending();
        if pending.is_empty() || self.config.coordinator.is_none() {
            return Ok(0);
        }
        let c = self.coordinator()?;
        let Some(enrollment) = self.load_enrollment() else { return Ok(0) };
        let mut sent = 0;
        for batch in pending.chunks(crate::events::BATCH) {
            let events: Vec<_> = batch.iter().map(|(_, e)| e.clone()).collect();
            c.send_events(&enrollment.token, &events).await?;
            crash::point("events-sent");
            let paths: Vec<PathBuf> = batch.iter().map(|(p, _)| p.clone()).collect();
            self.queue.remove(&paths).map_err(io_err("removing sent events"))?;
            sent += events.len();
        }
        Ok(sent)
    }

    /// Finishes what an interrupted run left: a staged slot whose switch is not recorded yet.
    fn resume_activation(&self, j: &mut Journal) -> Result<Option<CheckReport>, AgentError> {
        if j.state != State::Staged {
            return Ok(None);
        }
        let slot = j.target.as_ref().map(|t| t.slot).unwrap_or(j.active.other());
        self.activate(j)?;
        Ok(Some(CheckReport::RebootPending { slot }))
    }

    /// One update check and, when a release is offered and allowed, its install.
    ///
    /// # Errors
    /// [`AgentError`]; a refused release is also reported as a `failed` event.
    pub async fn check_once(&self) -> Result<CheckReport, AgentError> {
        let _lock = self.lock(false)?;
        let mut j = self.journal_locked()?;
        let _ = self.flush_events().await;
        if let Some(r) = self.resume_activation(&mut j)? {
            return Ok(r);
        }
        if j.state == State::Trial {
            return Ok(CheckReport::OnTrial);
        }
        if let Some(version) = self.probation_gate(&mut j)? {
            return Ok(CheckReport::OnProbation { version });
        }
        let c = self.coordinator()?;
        let result = self.check_and_install(&c, &mut j).await;
        let _ = self.flush_events().await;
        result
    }

    async fn check_and_install(&self, c: &Coordinator, j: &mut Journal) -> Result<CheckReport, AgentError> {
        let mut token = self.token(c, j).await?;
        let mut query: Vec<(&str, String)> = vec![("agent_version", AGENT_VERSION.to_owned())];
        if let Some(r) = &j.installed {
            query.push(("version_code", r.version_code.to_string()));
        }
        if let Some(v) = &self.config.native_version {
            query.push(("native_version", v.clone()));
        }
        // A cheap conditional poll first when nothing is in progress: the coordinator answers
        // 304 while the offer is unchanged. A fresh offer is then fetched again with a nonce,
        // so its signed assignment is bound to this check.
        let stored_etag = std::fs::read_to_string(self.paths.etag()).ok().filter(|_| j.state.is_settled());
        if let Some(tag) = &stored_etag {
            let first = match c.check(&token, &query, Some(tag)).await {
                Err(ClientError::Status { status: reqwest::StatusCode::UNAUTHORIZED, .. }) => {
                    token = self.enroll(c, j).await?;
                    c.check(&token, &query, Some(tag)).await?
                }
                other => other?,
            };
            match first {
                CheckOutcome::NotModified | CheckOutcome::NoUpdate => return Ok(CheckReport::UpToDate),
                CheckOutcome::NativeTooOld { required } => return Ok(CheckReport::NativeTooOld { required }),
                CheckOutcome::Offer(..) => {}
            }
        }
        let nonce = {
            let mut n = [0u8; 16];
            getrandom::fill(&mut n).map_err(|e| io_err("random nonce")(std::io::Error::other(e.to_string())))?;
            hex::encode(n)
        };
        query.push(("nonce", nonce.clone()));
        let outcome = match c.check(&token, &query, None).await {
            Err(ClientError::Status { status: reqwest::StatusCode::UNAUTHORIZED, .. }) => {
                token = self.enroll(c, j).await?;
                c.check(&token, &query, None).await?
            }
            other => other?,
        };
        let (offer, etag) = match outcome {
            CheckOutcome::NoUpdate | CheckOutcome::NotModified => {
                let _ = std::fs::remove_file(self.paths.etag());
                return Ok(CheckReport::UpToDate);
            }
            CheckOutcome::NativeTooOld { required } => return Ok(CheckReport::NativeTooOld { required }),
            CheckOutcome::Offer(offer, etag) => (offer, etag),
        };
        let remember_etag = || {
            if let Some(tag) = &etag {
                let _ = write_atomic(&self.paths.etag(), tag.as_bytes());
            }
        };
        if !self.config.auto_install && !offer.mandatory {
            remember_etag();
            return Ok(CheckReport::Available { version: format!("version_code {}", offer.version_code) });
        }
        let source = Incoming {
            envelope: offer.manifest.as_bytes(),
            assignment: Some((offer.assignment.as_bytes(), nonce.as_str())),
            release_id: Some(offer.release_id),
            index: IndexFrom::Coordinator(c.clone(), offer.index.url.clone()),
            chunks: self.mesh.source(c.clone()).await,
        };
        let result = self.install(j, source).await;
        match &result {
            Ok(_) => remember_etag(),
            // A refused release stays refused until the coordinator offers something else.
            Err(AgentError::Manifest(_) | AgentError::Assignment(_) | AgentError::Blacklisted { .. }) => {
                remember_etag()
            }
            Err(_) => {}
        }
        result
    }

    /// Installs a release from a `flotilla export` directory or the `.tar` of one
    /// (`flotilla export ID FILE.tar`; USB updates). A tar is unpacked by core's safe,
    /// bounded unpacker into `<state_dir>/import/` first and installed from there; the
    /// unpacked copy is removed afterwards, whatever the outcome.
    ///
    /// # Errors
    /// [`AgentError`]; [`AgentError::Export`] when the tar does not unpack.
    pub async fn install_export(&self, path: &Path) -> Result<CheckReport, AgentError> {
        let _lock = self.lock(false)?;
        let mut j = self.journal_locked()?;
        if let Some(r) = self.resume_activation(&mut j)? {
            return Ok(r);
        }
        if let Some(version) = self.probation_gate(&mut j)? {
            return Err(AgentError::OnProbation { version });
        }
        if path.is_dir() {
            return self.install_export_dir(&mut j, path, path).await;
        }
        let staging = self.paths.import_dir();
        let unpacked = self.unpack_export(path, &staging).await;
        let result = match unpacked {
            Ok(()) => self.install_export_dir(&mut j, &staging, path).await,
            Err(e) => Err(self.refuse(&mut j, None, e)),
        };
        if let Err(e) = std::fs::remove_dir_all(&staging)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %staging.display(), error = %e, "cannot remove the unpacked export");
        }
        result
    }

    /// Unpacks an export tar into `staging` (emptied first: a cut unpack leaves leftovers).
    async fn unpack_export(&self, tar: &Path, staging: &Path) -> Result<(), AgentError> {
        let export_err = |message: String| AgentError::Export { path: tar.to_path_buf(), message };
        match std::fs::remove_dir_all(staging) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("clearing {}", staging.display()))(e)),
        }
        let file = File::open(tar).map_err(|e| export_err(e.to_string()))?;
        let (tar_owned, staging_owned) = (tar.to_path_buf(), staging.to_path_buf());
        tokio::task::spawn_blocking(move || {
            flotilla_core::archive::unpack(
                std::io::BufReader::with_capacity(crate::slot::READ_BUF, file),
                &staging_owned,
                flotilla_core::archive::UnpackLimits::default(),
            )
        })
        .await
        .map_err(|e| export_err(format!("unpacking: {e}")))?
        .map_err(|e| AgentError::Export { path: tar_owned, message: format!("not a Flotilla export tar: {e}") })?;
        tracing::info!(file = %tar.display(), "export tar unpacked");
        Ok(())
    }

    /// Installs from an export directory; errors name `origin` (the directory or the tar).
    async fn install_export_dir(&self, j: &mut Journal, dir: &Path, origin: &Path) -> Result<CheckReport, AgentError> {
        let manifest_path = dir.join("manifest.json");
        let envelope = std::fs::read(&manifest_path)
            .map_err(|e| AgentError::Export { path: origin.to_path_buf(), message: format!("manifest.json: {e}") })?;
        let source = Incoming {
            envelope: &envelope,
            assignment: None,
            release_id: None,
            index: IndexFrom::File(dir.join("index.bin")),
            chunks: ChunkSource::Export(dir.to_path_buf()),
        };
        let result = self.install(j, source).await;
        let _ = self.flush_events().await;
        result
    }

    fn refuse(&self, j: &mut Journal, release_id: Option<i64>, e: AgentError) -> AgentError {
        tracing::error!(error = %e, "release refused");
        // The release id comes from the offer (unverified): it only files the report.
        self.push_event(EventKind::Failed, (release_id, None), ByteSources::default(), Some(e.to_string()));
        j.last_error = Some(e.to_string());
        if let Err(save) = j.save(&self.paths.journal()) {
            tracing::error!(error = %save, "cannot record the refusal");
        }
        e
    }

    fn verify(&self, j: &mut Journal, src: &Incoming<'_>) -> Result<VerifiedManifest, AgentError> {
        let mut signed_time = None;
        if let Some((assignment, nonce)) = src.assignment {
            let now = trusted_now(Timestamp::now(), j.time_floor, None);
            let a = verify_assignment(assignment, &self.trust_root(), &self.device_id, nonce, now)?;
            signed_time = Some(a.server_time());
            j.time_floor = Some(j.time_floor.map_or(a.server_time(), |t| t.max(a.server_time())));
            let m = self.verify_manifest(j, src.envelope, signed_time)?;
            a.check_agreement(&m)?;
            return Ok(m);
        }
        self.verify_manifest(j, src.envelope, signed_time)
    }

    fn verify_manifest(
        &self,
        j: &Journal,
        envelope: &[u8],
        signed_time: Option<Timestamp>,
    ) -> Result<VerifiedManifest, AgentError> {
        let mut ctx = DeviceContext::new(
            &self.config.product,
            &self.config.channel,
            trusted_now(Timestamp::now(), j.time_floor, signed_time),
        );
        ctx.hardware = self.config.hardware.clone();
        ctx.platform = Some(self.config.platform.clone());
        ctx.architecture = Some(self.config.architecture.clone());
        ctx.installed_version_code = j.installed.as_ref().map(|r| r.version_code);
        ctx.security_floor = j.security_floor;
        ctx.agent_version = flotilla_core::version::parse_version(AGENT_VERSION).ok();
        ctx.native_version =
            self.config.native_version.as_deref().and_then(|v| flotilla_core::version::parse_version(v).ok());
        let m = verify_for_device(envelope, &self.trust_root(), &ctx)?;
        if j.blacklist.contains(&m.payload_sha256()) {
            let man = m.manifest();
            return Err(AgentError::Blacklisted { version: man.version.to_string(), version_code: man.version_code });
        }
        Ok(m)
    }

    async fn install(&self, j: &mut Journal, src: Incoming<'_>) -> Result<CheckReport, AgentError> {
        if !j.state.is_settled() && j.state != State::Downloading {
            return Err(AgentError::Busy(j.state));
        }
        // Verify everything before fetching anything.
        let mut verified = self.verify(j, &src);
        // Signed by keys the device does not know yet, or under an expired root: a rotation
        // may have happened since the device was provisioned. Walk the coordinator's chain
        // and try once more.
        if let (Err(e), IndexFrom::Coordinator(c, _)) = (&verified, &src.index)
            && may_need_newer_root(e)
        {
            verified = match self.refresh_trust_root(c).await {
                Ok(true) => self.verify(j, &src),
                Ok(false) => verified,
                Err(e) => Err(e),
            };
        }
        let m = match verified {
            Ok(m) => m,
            Err(e) => return Err(self.refuse(j, src.release_id, e)),
        };
        let release = Release::of(&m, src.release_id);
        if let Err(e) = self.slots.check_kind(release.kind) {
            return Err(self.refuse(j, src.release_id, e.into()));
        }
        let index_bytes = match src.index.fetch(m.manifest().index.size).await {
            Ok(b) => b,
            Err(e) if matches!(&e, AgentError::Client(c) if c.is_transient()) => return Err(e),
            Err(e) => return Err(self.refuse(j, src.release_id, e)),
        };
        let index = match m.check_index(&index_bytes) {
            Ok(i) => i,
            Err(e) => return Err(self.refuse(j, src.release_id, e.into())),
        };

        let slot = j.active.other();
        let resume = j.state == State::Downloading
            && j.target
                .as_ref()
                .is_some_and(|t| t.release.manifest_sha256 == release.manifest_sha256 && t.slot == slot);
        if resume && j.target.as_ref().is_some_and(|t| t.transitions > MAX_TRANSITIONS) {
            let e =
                AgentError::Export { path: self.paths.dir.clone(), message: "install interrupted too often".into() };
            return Err(self.fail(j, &release, e));
        }
        write_atomic(&self.paths.target_manifest(), m.envelope_json()).map_err(io_err("storing the manifest"))?;
        write_atomic(&self.paths.target_index(), &index_bytes).map_err(io_err("storing the index"))?;
        // Write order: the target slot leaves the boot order before a byte of it is written,
        // then the journal claims it.
        self.boot.mark_unbootable(slot)?;
        crash::point("marked-unbootable");
        if !resume {
            let _ = std::fs::remove_file(self.paths.slot_index(slot));
            let _ = std::fs::remove_file(self.paths.slot_manifest(slot));
            j.previous = None; // the other slot is being overwritten: no fallback there now
            j.target = Some(Target {
                release: release.clone(),
                slot,
                attempts: 0,
                transitions: 0,
                bytes: ByteSources::default(),
                activated: false,
            });
            j.last_error = None;
            let e = Self::new_event(EventKind::Downloading, Some(&release), ByteSources::default(), None);
            self.record(j, Some(State::Downloading), e)?;
        } else {
            j.save(&self.paths.journal())?;
            tracing::info!(version = %release.version, slot = %slot, "resuming the install");
        }

        let kept = j.installed.as_ref().and_then(|_| install::read_kept_index(&self.paths.slot_index(j.active)));
        if let ChunkSource::Peer(p) = &src.chunks {
            // Peers get this device's verified chunks: the active release and, as they are
            // written, the new one's.
            if let Some(k) = &kept {
                p.serve(&self.slots, j.active, k);
            }
            p.serve(&self.slots, slot, &index);
            p.track(&index).await;
        }
        let plan = WritePlan {
            slots: &self.slots,
            target: slot,
            index: &index,
            active: Some((j.active, kept)),
            source: src.chunks.clone(),
            progress_path: self.paths.progress(),
            downloads_log: self.paths.downloads_log(),
            parallel: self.config.parallel_downloads,
            attempts: self.config.fetch_attempts,
            max_rate: self.config.max_download_rate,
            delta: Some(crate::delta::DeltaPlan::new(
                &m,
                j.installed.clone(),
                j.active,
                &self.paths.dir,
                self.queue.clone(),
                src.release_id,
            )),
        };
        let written = match install::write_slot(plan).await {
            Ok(w) => w,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "install interrupted; it resumes at the next check");
                return Err(e.into());
            }
            Err(e) => return Err(self.fail(j, &release, e.into())),
        };

        // The whole image as read back from the slot once synced (write_slot reads it while
        // the download goes on), against the manifest.
        let (bytes, actual) = (written.bytes, written.sha256);
        crash::point("slot-hashed");
        if actual != release.image_sha256 {
            let _ = std::fs::remove_file(self.paths.progress());
            let e = AgentError::ImageMismatch { slot, expected: release.image_sha256, actual };
            return Err(self.fail(j, &release, e));
        }
        let slots = self.slots.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || slots.finalize(slot))
            .await
            .map_err(|e| io_err("unpacking")(std::io::Error::other(e.to_string())))?
        {
            return Err(self.fail(j, &release, e.into()));
        }
        write_atomic(&self.paths.slot_index(slot), &index_bytes).map_err(io_err("keeping the slot's index"))?;
        write_atomic(&self.paths.slot_manifest(slot), m.envelope_json()).map_err(io_err("keeping the manifest"))?;
        let _ = std::fs::remove_file(self.paths.healthy_flag());
        if let Some(t) = &mut j.target {
            t.bytes = bytes;
        }
        let e = Self::new_event(EventKind::Staged, Some(&release), ByteSources::default(), None);
        self.record(j, Some(State::Staged), e)?;
        let _ = std::fs::remove_file(self.paths.progress());
        crate::delta::DeltaPlan::clean(&self.paths.dir);
        crash::point("staged");
        self.activate(j)?;
        Ok(CheckReport::Staged { version: release.version.clone(), slot, bytes })
    }

    /// The switch: one bootloader transaction (or pointer swap), then the journal records it.
    fn activate(&self, j: &mut Journal) -> Result<(), AgentError> {
        let Some(t) = j.target.clone() else { return Ok(()) };
        self.boot.activate(t.slot)?;
        crash::point("activated");
        if !t.activated {
            if let Some(tm) = &mut j.target {
                tm.activated = true;
            }
            self.record(j, None, Self::new_event(EventKind::Applied, Some(&t.release), ByteSources::default(), None))?;
            tracing::info!(slot = %t.slot, version = %t.release.version, "switched; reboot to run the new slot");
            if let Some((cmd, args)) = self.config.reboot_command.split_first() {
                let _ = std::process::Command::new(cmd).args(args).status();
            }
        }
        Ok(())
    }

    fn fail(&self, j: &mut Journal, release: &Release, e: AgentError) -> AgentError {
        tracing::error!(error = %e, version = %release.version, "install failed; the active slot is untouched");
        j.last_error = Some(e.to_string());
        let bytes = j.target.as_ref().map(|t| t.bytes).unwrap_or_default();
        let event = Self::new_event(EventKind::Failed, Some(release), bytes, Some(e.to_string()));
        if let Err(save) = self.record(j, Some(State::Failed), event.clone()) {
            // This run's install failed whether or not the journal can say so (the state
            // directory is likely failing too): the coordinator still hears of it, if the
            // queue can take it, as it did before events went through the journal.
            tracing::error!(error = %save, "cannot record the failure");
            if let Err(e) = self.queue.put(&event) {
                tracing::error!(error = %e, "cannot queue an event");
            }
        }
        e
    }

    /// Early at boot: counts the attempt of a slot on trial, runs the health checks, commits
    /// or rolls back. On a normal boot it marks the running slot good.
    ///
    /// # Errors
    /// [`AgentError`].
    pub async fn boot_check(&self) -> Result<BootReport, AgentError> {
        let _lock = self.lock(true)?;
        let mut j = self.journal_locked()?;
        let booted = self.boot.boot(j.active)?;
        let report = match (j.state, j.target.clone()) {
            (State::Staged, Some(t)) => {
                if booted == t.slot {
                    if let Some(tm) = &mut j.target {
                        tm.attempts = 0;
                    }
                    let e = Self::new_event(EventKind::Booted, Some(&t.release), ByteSources::default(), None);
                    self.record(&mut j, Some(State::Trial), e)?;
                    crash::point("trial");
                    self.trial(&mut j).await?
                } else if !t.activated {
                    self.activate(&mut j)?;
                    BootReport::RebootPending { slot: t.slot }
                } else {
                    let why = format!("the bootloader did not boot slot {} (booted {booted})", t.slot);
                    self.rollback(&mut j, why)?
                }
            }
            (State::Trial, Some(t)) => {
                if booted == t.slot {
                    self.trial(&mut j).await?
                } else {
                    let why =
                        format!("slot {} used up its boot tries; the bootloader fell back to slot {booted}", t.slot);
                    self.rollback(&mut j, why)?
                }
            }
            (State::Committed, _) if j.probation.is_some() => self.probation_boot(&mut j, booted).await?,
            _ => {
                if booted == j.active {
                    self.boot.mark_good(booted)?;
                } else {
                    tracing::warn!(booted = %booted, active = %j.active, "running a slot that is not the committed one");
                }
                BootReport::Normal { slot: booted }
            }
        };
        drop(_lock);
        let _ = self.flush_events().await;
        Ok(report)
    }

    async fn trial(&self, j: &mut Journal) -> Result<BootReport, AgentError> {
        let limit = self.config.health.boot_attempts;
        let Some(t) = j.target.as_mut() else { return Ok(BootReport::Normal { slot: j.active }) };
        t.attempts += 1;
        let (attempts, release) = (t.attempts, t.release.clone());
        // The attempt is counted before the checks run: a check that hangs or crashes the
        // device still uses up an attempt.
        j.save(&self.paths.journal())?;
        if attempts > limit {
            return self.rollback(j, format!("used up its {limit} boot attempts"));
        }
        let mut result = crate::health::run_checks(&self.config.health).await.map_err(|e| e.to_string());
        if result.is_ok()
            && let Some(timeout) = self.config.health.mark_good_timeout
        {
            result = self.wait_mark_good(&release, timeout).await;
        }
        match result {
            Ok(()) => self.commit(j),
            Err(why) if attempts >= limit => self.rollback(j, format!("{why} (boot attempt {attempts} of {limit})")),
            Err(why) => {
                self.event(
                    EventKind::Failed,
                    Some(&release),
                    ByteSources::default(),
                    Some(format!("{why} (boot attempt {attempts} of {limit})")),
                );
                Ok(BootReport::RetryAfterReboot { reason: why, attempts, limit })
            }
        }
    }

    async fn wait_mark_good(&self, release: &Release, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let want = release.manifest_sha256.to_hex();
        loop {
            if std::fs::read_to_string(self.paths.healthy_flag()).is_ok_and(|s| s.trim() == want) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("not marked healthy within {}", humantime::format_duration(timeout)));
            }
            tokio::time::sleep(MARK_GOOD_POLL).await;
        }
    }

    fn commit(&self, j: &mut Journal) -> Result<BootReport, AgentError> {
        let Some(t) = j.target.clone() else { return Ok(BootReport::Normal { slot: j.active }) };
        self.boot.mark_good(t.slot)?;
        crash::point("committed-env");
        j.previous = j.installed.take();
        j.installed = Some(t.release.clone());
        j.active = t.slot;
        if ProbationPolicy::from_config(&self.config.health).is_some() {
            // The previous slot stays the fallback, and the floor stays down, until the
            // crash-loop probation is over.
            j.probation = Some(Probation::start(Timestamp::now()));
        } else {
            // The anti-rollback floor rises only now that the new slot is committed.
            j.security_floor = j.security_floor.max(t.release.security_version);
        }
        j.last_error = None;
        self.record(j, Some(State::Committed), Self::new_event(EventKind::Healthy, Some(&t.release), t.bytes, None))?;
        let _ = std::fs::remove_file(self.paths.healthy_flag());
        Ok(BootReport::Committed { slot: t.slot, version: t.release.version })
    }

    fn rollback(&self, j: &mut Journal, why: String) -> Result<BootReport, AgentError> {
        let Some(t) = j.target.clone() else { return Ok(BootReport::Normal { slot: j.active }) };
        let good = t.slot.other();
        tracing::error!(slot = %t.slot, version = %t.release.version, reason = %why, "rolling back");
        self.boot.rollback(good, t.slot)?;
        if !j.blacklist.contains(&t.release.manifest_sha256) {
            j.blacklist.push(t.release.manifest_sha256);
        }
        j.active = good;
        j.last_error = Some(why.clone());
        let e = Self::new_event(EventKind::RolledBack, Some(&t.release), ByteSources::default(), Some(why.clone()));
        self.record(j, Some(State::RolledBack), e)?;
        let _ = std::fs::remove_file(self.paths.healthy_flag());
        Ok(BootReport::RolledBack { slot: good, reason: why })
    }

    /// Marks the slot on trial healthy (what an app's SDK calls once it runs well).
    ///
    /// # Errors
    /// I/O.
    pub fn mark_good(&self) -> Result<Option<String>, AgentError> {
        let j = self.journal()?;
        match (j.state, &j.target) {
            (State::Staged | State::Trial, Some(t)) => {
                write_atomic(&self.paths.healthy_flag(), t.release.manifest_sha256.to_hex().as_bytes())
                    .map_err(io_err("writing the healthy mark"))?;
                Ok(Some(t.release.version.clone()))
            }
            (State::Committed, _) if j.probation.is_some() => {
                let Some(r) = &j.installed else { return Ok(None) };
                write_atomic(&self.paths.healthy_flag(), r.manifest_sha256.to_hex().as_bytes())
                    .map_err(io_err("writing the healthy mark"))?;
                Ok(Some(r.version.clone()))
            }
            _ => Ok(None),
        }
    }

    /// The device's state, for humans and `--json`.
    ///
    /// # Errors
    /// The journal.
    pub fn status(&self) -> Result<serde_json::Value, AgentError> {
        let j = self.journal()?;
        let selected = self.boot.selected(j.active).ok();
        Ok(serde_json::json!({
            "device_id": self.device_id,
            "product": self.config.product,
            "channel": self.config.channel,
            "agent_version": AGENT_VERSION,
            "state": j.state,
            "active_slot": j.active,
            "selected_slot": selected,
            "installed": j.installed,
            "previous": j.previous,
            "target": j.target,
            "security_floor": j.security_floor,
            "trust_root_version": self.trust_root().version(),
            "time_floor": j.time_floor,
            "blacklist": j.blacklist,
            "last_error": j.last_error,
            "probation": j.probation,
            "slots": self.slots.kind(),
            "bootloader": self.boot.describe(),
            "bundle_path": self.slots.current_link(),
            "pending_events": self.queue.pending().len(),
            "enrolled": self.load_enrollment().is_some(),
        }))
    }

    /// The daemon: checks every poll interval (plus jitter) until `shutdown` resolves.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut offline = self.offline_start();
        if let Ok(j) = self.journal() {
            let kept = j.installed.as_ref().and_then(|_| install::read_kept_index(&self.paths.slot_index(j.active)));
            self.mesh.serve_installed(&self.slots, j.active, kept.as_ref()).await;
        }
        loop {
            match self.check_once().await {
                Ok(report) => tracing::info!(?report, "update check done"),
                Err(e) => tracing::warn!(error = %e, "update check failed"),
            }
            let wait = self.config.poll_interval + jitter(self.config.poll_jitter);
            // Offers heard on the mesh and queued events are handled while waiting.
            if self.idle(wait, &mut offline, shutdown.as_mut()).await {
                break;
            }
        }
        tracing::info!("agent stopped");
    }
}

/// Whether a refusal could be the device's trust root being behind the publisher's.
fn may_need_newer_root(e: &AgentError) -> bool {
    matches!(
        e,
        AgentError::Manifest(ManifestError::Signature(_) | ManifestError::RootExpired { .. })
            | AgentError::Assignment(AssignmentError::Signature(_))
    )
}

fn jitter(max: Duration) -> Duration {
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    max.mul_f64(f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX))
}

/// Where the index of an incoming release comes from.
#[derive(Debug)]
enum IndexFrom {
    Coordinator(Coordinator, String),
    File(PathBuf),
}

impl IndexFrom {
    async fn fetch(&self, declared: u64) -> Result<Vec<u8>, AgentError> {
        match self {
            Self::Coordinator(c, url) => Ok(c.get_bounded(url, declared).await?),
            Self::File(path) => {
                let meta = std::fs::metadata(path)
                    .map_err(|e| AgentError::Export { path: path.clone(), message: e.to_string() })?;
                if meta.len() > declared {
                    return Err(ManifestError::IndexSizeMismatch { expected: declared, actual: meta.len() }.into());
                }
                std::fs::read(path).map_err(|e| AgentError::Export { path: path.clone(), message: e.to_string() })
            }
        }
    }
}

/// A release arriving from a coordinator or an export.
#[derive(Debug)]
struct Incoming<'a> {
    envelope: &'a [u8],
    assignment: Option<(&'a [u8], &'a str)>,
    release_id: Option<i64>,
    index: IndexFrom,
    chunks: ChunkSource,
}

/// The device id: configured value, else a command's output, else a file's first line
/// (default `/etc/machine-id`).
///
/// # Errors
/// [`AgentError::DeviceId`].
pub fn resolve_device_id(config: &Config) -> Result<String, AgentError> {
    let src = &config.device_id;
    let raw = if let Some(v) = &src.value {
        v.clone()
    } else if let Some(cmd) = &src.command {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .map_err(|e| AgentError::DeviceId(format!("running `{cmd}`: {e}")))?;
        if !out.status.success() {
            return Err(AgentError::DeviceId(format!("`{cmd}` exited with {}", out.status)));
        }
        String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_owned()
    } else {
        let path = src.file.clone().unwrap_or_else(|| PathBuf::from("/etc/machine-id"));
        std::fs::read_to_string(&path)
            .map_err(|e| AgentError::DeviceId(format!("{}: {e}", path.display())))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let id = raw.trim().to_owned();
    let valid = !id.is_empty()
        && id.len() <= flotilla_core::rollout::MAX_DEVICE_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if !valid {
        return Err(AgentError::DeviceId(format!("{id:?} is not 1-128 characters of [A-Za-z0-9._:-]")));
    }
    Ok(id)
}

/// Apps on `dir` slots: the entry points of the SDK bindings.
pub mod app;
