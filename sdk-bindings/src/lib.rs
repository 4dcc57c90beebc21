//! uniffi bindings of the Flotilla agent for apps.
//!
//! Apps that update their own bundle (the React Native, Capacitor and Flutter live-update
//! case) embed the agent's library in `dir` slot mode through these bindings: configure,
//! check, download and stage, get the current bundle path, mark healthy (which arms
//! rollback), roll back, and receive progress callbacks. Kotlin, Swift and Python are
//! generated from the same Rust (uniffi proc-macros, library mode); this crate has no update
//! logic of its own: it maps [`flotilla_agent::agent::app`] onto FFI types and errors.
//!
//! # Layout
//! - [`Updater`]: the object an app creates once per start.
//! - [`UpdaterConfig`], [`TrustRoot`]: its settings.
//! - [`UpdateInfo`], [`StageOutcome`], [`StartOutcome`], [`Status`], [`DownloadProgress`]:
//!   what it answers; [`ProgressListener`]: the callback the app implements.
//! - [`SdkError`]: every failure, as a few kinds with a message.
//!
//! # Example
//! The flow of an app, in Rust (Kotlin, Swift and Python read the same):
//! ```no_run
//! use flotilla_sdk::{DownloadProgress, ProgressListener, TrustRoot, Updater, UpdaterConfig};
//!
//! struct Bar;
//! impl ProgressListener for Bar {
//!     fn on_progress(&self, p: DownloadProgress) {
//!         println!("{} of {} bytes", p.fetched_bytes, p.total_bytes);
//!     }
//! }
//!
//! # fn demo() -> Result<(), flotilla_sdk::SdkError> {
//! let updater = Updater::new(UpdaterConfig {
//!     coordinator_url: "https://updates.example.com".into(),
//!     product: "my-app".into(),
//!     channel: "production".into(),
//!     enrollment_secret: Some("fleet-secret".into()),
//!     device_id: "install-6f1c".into(),
//!     state_dir: "/data/app/flotilla".into(),
//!     bundle_dir: "/data/app/bundles".into(),
//!     trust_root: TrustRoot::Path { path: "/data/app/trust-root.json".into() },
//!     native_version: Some("3.2.0".into()),
//!     mesh: false,
//!     trial_starts: 1,
//!     max_download_rate: None,
//! })?;
//! // Load the bundle from here (None: the one shipped in the app).
//! let _bundle = updater.current_bundle_path();
//! // ... once the app runs well on it:
//! updater.mark_healthy()?;
//! if updater.check()?.is_some() {
//!     updater.download_and_stage(Box::new(Bar))?; // the next start runs it
//! }
//! # Ok(()) }
//! ```

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use flotilla_agent::agent::app::{AppCheck, AppConfig, AppConfigError, AppStart, AppTrustRoot, InstallProgress};
use flotilla_agent::agent::{Agent, AgentError, CheckReport};
use flotilla_agent::config::Secret;
use flotilla_agent::install::WriteError;
use flotilla_agent::journal::{Journal, State};

uniffi::setup_scaffolding!();

/// Worker threads of the runtime an [`Updater`] runs the agent on: downloads are I/O bound,
/// and hashing and unpacking go to tokio's blocking pool anyway.
const WORKER_THREADS: usize = 2;

/// Every failure, as a few kinds an app branches on, each with a message that says what
/// went wrong.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
#[non_exhaustive]
pub enum SdkError {
    /// A setting is missing or out of range.
    #[error("configuration: {0}")]
    Config(String),
    /// The coordinator or the CDN could not be reached or answered with an error; try
    /// again later (a download resumes where it stopped).
    #[error("network: {0}")]
    Network(String),
    /// The release was refused: bad signature, expired, not for this device, rolled back
    /// here before, a bundle that does not verify.
    #[error("refused: {0}")]
    Refused(String),
    /// A newer release needs a newer native app (an app store update).
    #[error("a newer release needs native version {0} or later")]
    NativeUpdateRequired(String),
    /// Another call or process is working on the same state directory, or a bundle on
    /// trial must be marked healthy or rolled back first.
    #[error("busy: {0}")]
    Busy(String),
    /// Reading or writing the state or bundle directories failed.
    #[error("storage: {0}")]
    Storage(String),
}

impl From<AgentError> for SdkError {
    fn from(e: AgentError) -> Self {
        let message = e.to_string();
        match e {
            AgentError::Client(c) if c.is_transient() => Self::Network(message),
            AgentError::Client(_) | AgentError::NoCoordinator => Self::Network(message),
            AgentError::Manifest(_)
            | AgentError::Assignment(_)
            | AgentError::Blacklisted { .. }
            | AgentError::ImageMismatch { .. } => Self::Refused(message),
            AgentError::Busy(_) | AgentError::Locked(_) => Self::Busy(message),
            AgentError::TrustRoot { .. } | AgentError::DeviceId(_) => Self::Config(message),
            AgentError::Write(WriteError::BadChunk { .. }) => Self::Refused(message),
            AgentError::Write(WriteError::Unavailable { .. }) => Self::Network(message),
            _ => Self::Storage(message),
        }
    }
}

impl From<AppConfigError> for SdkError {
    fn from(e: AppConfigError) -> Self {
        Self::Config(e.to_string())
    }
}

/// Where the trust root comes from.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum TrustRoot {
    /// A file on the device.
    Path {
        /// The file.
        path: String,
    },
    /// The JSON shipped inside the app; stored in the state directory at the first start.
    Json {
        /// The trust root (a DSSE envelope, JSON).
        json: String,
    },
}

/// An [`Updater`]'s settings.
#[derive(Debug, Clone, uniffi::Record)]
pub struct UpdaterConfig {
    /// Coordinator base URL, e.g. `https://updates.example.com`.
    pub coordinator_url: String,
    /// Product name.
    pub product: String,
    /// Channel followed.
    #[uniffi(default = "production")]
    pub channel: String,
    /// The fleet's enrollment secret.
    #[uniffi(default = None)]
    pub enrollment_secret: Option<String>,
    /// This installation's id, 1-128 characters of `[A-Za-z0-9._:-]` (generate one at first
    /// start and keep it).
    pub device_id: String,
    /// The agent's own files (journal, token, event queue); app-private storage.
    pub state_dir: String,
    /// Where bundles are unpacked: `a/`, `b/` and the `current` pointer.
    pub bundle_dir: String,
    /// The trust root the app was shipped with.
    pub trust_root: TrustRoot,
    /// The native app's version, checked against a bundle's minimum native version.
    #[uniffi(default = None)]
    pub native_version: Option<String>,
    /// Fetch chunks from and serve them to peers on the local network (default off).
    #[uniffi(default = false)]
    pub mesh: bool,
    /// App starts a new bundle gets to be marked healthy before it is rolled back.
    #[uniffi(default = 1)]
    pub trial_starts: u32,
    /// Download cap in bytes per second (metered networks); `None`: uncapped.
    #[uniffi(default = None)]
    pub max_download_rate: Option<u64>,
}

/// A release the coordinator offers, verified against the trust root.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct UpdateInfo {
    /// Version, e.g. `1.4.2`.
    pub version: String,
    /// version_code.
    pub version_code: u64,
    /// The publisher marked it mandatory.
    pub mandatory: bool,
    /// Size of the bundle archive in bytes (what a first install downloads at most).
    pub size: u64,
    /// Release notes.
    pub notes: Option<String>,
    /// Already downloaded and staged: the next app start runs it.
    pub staged: bool,
}

/// Download progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct DownloadProgress {
    /// Bytes fetched over the network so far (chunks; a binary patch counts at the end).
    pub fetched_bytes: u64,
    /// Bytes reused from the current bundle (known at the end, else 0).
    pub reused_bytes: u64,
    /// Size of the bundle archive.
    pub total_bytes: u64,
    /// The bundle is verified and staged (the last call).
    pub done: bool,
}

/// Receives download progress; called on the thread that called
/// [`Updater::download_and_stage`].
#[uniffi::export(callback_interface)]
pub trait ProgressListener: Send + Sync {
    /// Progress changed.
    fn on_progress(&self, progress: DownloadProgress);
}

/// What [`Updater::download_and_stage`] did.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum StageOutcome {
    /// Nothing newer to install.
    UpToDate,
    /// Downloaded, verified and staged: the next app start runs it.
    Staged {
        /// Its version.
        version: String,
        /// Bytes fetched over the network (chunks and binary patches).
        fetched_bytes: u64,
        /// Bytes reused from the current bundle.
        reused_bytes: u64,
    },
    /// A bundle is already staged and waits for the next app start.
    RestartPending,
}

/// What the start of this [`Updater`] found.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum StartOutcome {
    /// Nothing on trial.
    Normal,
    /// This start runs a new bundle on trial: call [`Updater::mark_healthy`] once the app
    /// works, or it is rolled back at a later start.
    OnTrial {
        /// Its version.
        version: String,
    },
    /// The bundle on trial was never marked healthy (the app crashed or hung): the previous
    /// bundle is current again and the release will not be installed again.
    RolledBack {
        /// The version rolled back.
        version: String,
        /// Why.
        reason: String,
    },
}

/// Where an update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum UpdateState {
    /// Nothing installed or in progress.
    Idle,
    /// A download is in progress (or was cut and resumes at the next call).
    Downloading,
    /// A bundle is staged for the next start.
    Staged,
    /// The running bundle is on trial.
    Trial,
    /// The last bundle was committed.
    Committed,
    /// The last install failed; the current bundle is untouched.
    Failed,
    /// The last bundle was rolled back.
    RolledBack,
}

/// The updater's state.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Status {
    /// Where the update stands.
    pub state: UpdateState,
    /// The committed bundle's version (`None`: the one shipped in the app).
    pub installed_version: Option<String>,
    /// The version being installed, staged, on trial, or last failed or rolled back.
    pub pending_version: Option<String>,
    /// Why the last install failed or was rolled back.
    pub last_error: Option<String>,
    /// The bundle to load, as [`Updater::current_bundle_path`].
    pub bundle_path: Option<String>,
    /// The device id in use.
    pub device_id: String,
}

/// The agent for one app, on `dir` slots. Create one at every app start, before loading the
/// bundle: creating it is the start that puts a staged bundle on trial (or rolls back one
/// that was never marked healthy). Methods block the calling thread; call them off the UI
/// thread. Creating one waits while another process of the app works on the same state
/// directory (a download, say); calls on one [`Updater`] from several threads run one at a
/// time.
#[derive(Debug, uniffi::Object)]
pub struct Updater {
    agent: Agent,
    runtime: tokio::runtime::Runtime,
    start: StartOutcome,
    /// Serializes calls from several threads of the app: one update step at a time (the
    /// agent's own lock would refuse the second one as busy).
    calls: Mutex<()>,
}

#[uniffi::export]
impl Updater {
    /// Configures the agent and records this app start (see [`StartOutcome`]).
    ///
    /// # Errors
    /// [`SdkError::Config`] for a bad setting or trust root, [`SdkError::Storage`] when the
    /// state directory cannot be used.
    #[uniffi::constructor]
    pub fn new(config: UpdaterConfig) -> Result<Arc<Self>, SdkError> {
        let trust_root = match config.trust_root {
            TrustRoot::Path { path } => AppTrustRoot::Path(PathBuf::from(path)),
            TrustRoot::Json { json } => AppTrustRoot::Json(json),
        };
        let mut app = AppConfig::new(
            config.coordinator_url,
            config.product,
            config.device_id,
            config.state_dir,
            config.bundle_dir,
            trust_root,
        );
        app.channel = config.channel;
        app.enrollment_secret = config.enrollment_secret.map(Secret::new);
        app.native_version = config.native_version;
        app.mesh = config.mesh;
        app.trial_starts = config.trial_starts;
        app.max_download_rate = config.max_download_rate;
        let agent = Agent::new(app.into_config()?)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name("flotilla-sdk")
            .enable_all()
            .build()
            .map_err(|e| SdkError::Storage(format!("starting the updater's runtime: {e}")))?;
        let start = match agent.app_started()? {
            AppStart::OnTrial { version, .. } => StartOutcome::OnTrial { version },
            AppStart::RolledBack { version, reason } => StartOutcome::RolledBack { version, reason },
            _ => StartOutcome::Normal,
        };
        Ok(Arc::new(Self { agent, runtime, start, calls: Mutex::new(()) }))
    }

    /// What this app start found: a bundle on trial, one rolled back, or nothing.
    pub fn start_outcome(&self) -> StartOutcome {
        self.start.clone()
    }

    /// Asks the coordinator for a newer release and verifies its manifest; installs nothing.
    /// `None` when there is nothing newer (or only a release rolled back here before).
    ///
    /// # Errors
    /// [`SdkError::Network`], [`SdkError::Refused`], [`SdkError::NativeUpdateRequired`].
    pub fn check(&self) -> Result<Option<UpdateInfo>, SdkError> {
        let _call = self.calls.lock().map_err(|_| SdkError::Busy("an earlier call panicked".into()))?;
        match self.runtime.block_on(self.agent.check_offer())? {
            AppCheck::Available(o) => Ok(Some(UpdateInfo {
                version: o.version,
                version_code: o.version_code,
                mandatory: o.mandatory,
                size: o.size,
                notes: o.notes,
                staged: o.staged,
            })),
            AppCheck::NativeTooOld { required } => Err(SdkError::NativeUpdateRequired(required)),
            _ => Ok(None),
        }
    }

    /// Downloads the newest release (only the chunks the current bundle lacks), verifies
    /// every chunk and the whole archive, unpacks it into the other bundle directory and
    /// makes it current for the next app start. `progress` hears as bytes arrive and once
    /// more when the bundle is staged. An interrupted download resumes at the next call.
    ///
    /// # Errors
    /// [`SdkError::Network`] (retry later), [`SdkError::Refused`],
    /// [`SdkError::NativeUpdateRequired`], [`SdkError::Busy`] while a bundle is on trial.
    pub fn download_and_stage(&self, progress: Box<dyn ProgressListener>) -> Result<StageOutcome, SdkError> {
        let _call = self.calls.lock().map_err(|_| SdkError::Busy("an earlier call panicked".into()))?;
        let report = self.runtime.block_on(self.agent.stage_with_progress(&|p: InstallProgress| {
            progress.on_progress(DownloadProgress {
                fetched_bytes: p.fetched_bytes,
                reused_bytes: p.reused_bytes,
                total_bytes: p.total_bytes,
                done: p.done,
            });
        }))?;
        match report {
            CheckReport::UpToDate => Ok(StageOutcome::UpToDate),
            CheckReport::Staged { version, bytes, .. } => Ok(StageOutcome::Staged {
                version,
                fetched_bytes: bytes.cdn + bytes.peer + bytes.file + bytes.delta,
                reused_bytes: bytes.local,
            }),
            CheckReport::RebootPending { .. } => Ok(StageOutcome::RestartPending),
            CheckReport::NativeTooOld { required } => Err(SdkError::NativeUpdateRequired(required)),
            CheckReport::OnTrial => {
                Err(SdkError::Busy("the running bundle is on trial: mark it healthy or roll it back first".into()))
            }
            other => Err(SdkError::Busy(format!("nothing installed: {other:?}"))),
        }
    }

    /// The directory to load the bundle from; `None` until a bundle is installed (load the
    /// one shipped in the app). Ask at start, right after creating the [`Updater`]: once
    /// [`Updater::download_and_stage`] has run it names the staged bundle, which the next start
    /// loads, while the running app keeps the directory it loaded.
    pub fn current_bundle_path(&self) -> Option<String> {
        self.agent.bundle_path().map(|p| p.to_string_lossy().into_owned())
    }

    /// The app runs well on the bundle on trial: commit it (Capacitor's `notifyAppReady`) and
    /// tell the coordinator. Returns the committed version; `None` when nothing is on trial.
    ///
    /// # Errors
    /// [`SdkError::Storage`], [`SdkError::Busy`].
    pub fn mark_healthy(&self) -> Result<Option<String>, SdkError> {
        let _call = self.calls.lock().map_err(|_| SdkError::Busy("an earlier call panicked".into()))?;
        Ok(self.runtime.block_on(self.agent.app_healthy())?)
    }

    /// Discards the bundle that is staged or on trial: the previous bundle is current again
    /// (load it at the next start) and the release is not installed again. Returns the
    /// discarded version; `None` when there is none (a committed bundle stays).
    ///
    /// # Errors
    /// [`SdkError::Storage`], [`SdkError::Busy`].
    pub fn rollback(&self) -> Result<Option<String>, SdkError> {
        let _call = self.calls.lock().map_err(|_| SdkError::Busy("an earlier call panicked".into()))?;
        Ok(self.runtime.block_on(self.agent.app_rollback("rolled back by the app"))?)
    }

    /// Where the update stands.
    ///
    /// # Errors
    /// [`SdkError::Storage`] when the journal cannot be read.
    pub fn status(&self) -> Result<Status, SdkError> {
        let j = Journal::load(&self.agent.paths().journal()).map_err(|e| SdkError::Storage(e.to_string()))?;
        let state = match j.state {
            State::Idle => UpdateState::Idle,
            State::Downloading => UpdateState::Downloading,
            State::Staged => UpdateState::Staged,
            State::Trial => UpdateState::Trial,
            State::Committed => UpdateState::Committed,
            State::Failed => UpdateState::Failed,
            State::RolledBack => UpdateState::RolledBack,
        };
        let pending_version =
            j.target.as_ref().filter(|_| state != UpdateState::Committed).map(|t| t.release.version.clone());
        Ok(Status {
            state,
            installed_version: j.installed.map(|r| r.version),
            pending_version,
            last_error: j.last_error,
            bundle_path: self.current_bundle_path(),
            device_id: self.agent.device_id().to_owned(),
        })
    }
}

/// Sends the agent's logs to standard error at `level` (`error`, `warn`, `info`, `debug`,
/// `trace`, or a tracing filter such as `flotilla_agent=debug`). Only the first call takes
/// effect.
///
/// # Errors
/// [`SdkError::Config`] for a filter that does not parse.
#[uniffi::export]
pub fn set_log_level(level: String) -> Result<(), SdkError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .map_err(|e| SdkError::Config(format!("log level {level:?}: {e}")))?;
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    Ok(())
}
