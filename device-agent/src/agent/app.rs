//! Apps that update their own bundle: the entry points the SDK bindings (`flotilla-sdk`) call.
//!
//! An app (the React Native, Capacitor or Flutter live-update case) runs the agent inside its
//! own process on `dir` slots. There is no reboot and no `boot-check` unit: an app start plays
//! the boot, and the app's "mark healthy" call (Capacitor's `notifyAppReady`) plays the
//! health check. The lifecycle goes through the same journal, commit and rollback as a device:
//! - [`Agent::check_offer`] asks the coordinator and verifies the offered manifest against the
//!   trust root, without installing anything;
//! - [`Agent::stage_with_progress`] downloads, verifies and unpacks the bundle into the
//!   inactive slot and swaps `current` (what [`Agent::check_once`] does), reporting progress;
//!   the app loads the new bundle at its next start;
//! - [`Agent::app_started`], at every app start: a staged bundle goes on trial; a bundle still
//!   on trial from an earlier start (the app crashed or hung before marking it healthy) uses
//!   up an attempt, and past `health.boot_attempts` it is rolled back and blacklisted. It
//!   makes no network call, so a start never waits on one: its events go with the next call
//!   that talks to the coordinator;
//! - [`Agent::app_healthy`] commits the bundle on trial;
//! - [`Agent::app_rollback`] discards a staged or on-trial bundle;
//! - [`Agent::bundle_path`] is the directory the app loads its bundle from.

use std::collections::HashMap;

use flotilla_core::index::ChunkIndex;

use super::*;
use crate::config::{ConfigError, Secret};

/// How often [`Agent::stage_with_progress`] looks at the install's progress: often enough
/// for a progress bar, rare enough to cost nothing next to the download.
const PROGRESS_POLL: Duration = Duration::from_millis(100);

/// What an app configures; everything else takes the agent's defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AppConfig {
    /// Coordinator base URL.
    pub coordinator: String,
    /// Product name.
    pub product: String,
    /// Channel followed.
    pub channel: String,
    /// The fleet's enrollment secret.
    pub enrollment_secret: Option<Secret>,
    /// This installation's id (1-128 characters of `[A-Za-z0-9._:-]`).
    pub device_id: String,
    /// The agent's journal, token and event queue.
    pub state_dir: PathBuf,
    /// The bundle root: `a/`, `b/` and the `current` pointer.
    pub bundle_dir: PathBuf,
    /// The trust root the app was shipped with.
    pub trust_root: AppTrustRoot,
    /// The native shell's version, checked against a bundle's `min_native_version`.
    pub native_version: Option<String>,
    /// Fetch from and serve to peers on the local network.
    pub mesh: bool,
    /// App starts a new bundle gets to be marked healthy before it is rolled back.
    pub trial_starts: u32,
    /// Download cap in bytes per second (metered networks); `None`: uncapped.
    pub max_download_rate: Option<u64>,
}

impl AppConfig {
    /// The required settings; the channel is `production`, no secret, no native version,
    /// mesh off, one trial start, no download cap.
    pub fn new(
        coordinator: impl Into<String>,
        product: impl Into<String>,
        device_id: impl Into<String>,
        state_dir: impl Into<PathBuf>,
        bundle_dir: impl Into<PathBuf>,
        trust_root: AppTrustRoot,
    ) -> Self {
        Self {
            coordinator: coordinator.into(),
            product: product.into(),
            channel: "production".into(),
            enrollment_secret: None,
            device_id: device_id.into(),
            state_dir: state_dir.into(),
            bundle_dir: bundle_dir.into(),
            trust_root,
            native_version: None,
            mesh: false,
            trial_starts: 1,
            max_download_rate: None,
        }
    }

    /// The agent config: `dir` slots on the bundle root, the app's settings, defaults for the
    /// rest. A trust root given as JSON is checked and written to
    /// `<state_dir>/trust-root.json` the first time (later starts keep the file, which a root
    /// rotation may have replaced).
    ///
    /// # Errors
    /// [`AppConfigError`] naming the field or the trust root file.
    pub fn into_config(self) -> Result<Config, AppConfigError> {
        use toml::Value;
        let path_str = |p: &Path| Value::String(p.to_string_lossy().into_owned());
        let trust_root = match &self.trust_root {
            AppTrustRoot::Path(p) => p.clone(),
            AppTrustRoot::Json(json) => {
                let p = self.state_dir.join("trust-root.json");
                if !p.exists() {
                    let fail = |message: String| AppConfigError::TrustRoot { path: p.clone(), message };
                    // Checked before it is kept: a bad first copy would otherwise stay.
                    TrustRoot::from_trusted_json(json.as_bytes()).map_err(|e| fail(e.to_string()))?;
                    std::fs::create_dir_all(&self.state_dir).map_err(|e| fail(e.to_string()))?;
                    write_atomic(&p, json.as_bytes()).map_err(|e| fail(e.to_string()))?;
                }
                p
            }
        };
        if self.trial_starts == 0 {
            return Err(ConfigError::Invalid { field: "trial_starts", reason: "at least 1".into() }.into());
        }
        let mut t = toml::Table::new();
        t.insert("coordinator".into(), Value::String(self.coordinator));
        t.insert("product".into(), Value::String(self.product));
        t.insert("channel".into(), Value::String(self.channel));
        t.insert("trust_root".into(), path_str(&trust_root));
        t.insert("state_dir".into(), path_str(&self.state_dir));
        // The app asked for it by calling download_and_stage.
        t.insert("auto_install".into(), Value::Boolean(true));
        if let Some(rate) = self.max_download_rate {
            let rate = i64::try_from(rate).map_err(|_| ConfigError::Invalid {
                field: "max_download_rate",
                reason: format!("{rate} bytes/s is out of range"),
            })?;
            t.insert("max_download_rate".into(), Value::Integer(rate));
        }
        if let Some(v) = self.native_version {
            t.insert("native_version".into(), Value::String(v));
        }
        let mut device_id = toml::Table::new();
        device_id.insert("value".into(), Value::String(self.device_id));
        t.insert("device_id".into(), Value::Table(device_id));
        let mut slots = toml::Table::new();
        slots.insert("kind".into(), Value::String("dir".into()));
        slots.insert("root".into(), path_str(&self.bundle_dir));
        t.insert("slots".into(), Value::Table(slots));
        let mut health = toml::Table::new();
        health.insert("boot_attempts".into(), Value::Integer(i64::from(self.trial_starts)));
        t.insert("health".into(), Value::Table(health));
        let mut mesh = toml::Table::new();
        mesh.insert("enabled".into(), Value::Boolean(self.mesh));
        t.insert("mesh".into(), Value::Table(mesh));
        // Through the TOML form, so every other setting takes the default a config file gets.
        let mut config = Config::from_toml(&t.to_string())?;
        config.enrollment_secret = self.enrollment_secret;
        Ok(config)
    }
}

/// Why an [`AppConfig`] was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppConfigError {
    /// A setting is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The trust root JSON is not a trust root, or could not be stored.
    #[error("trust root {path}: {message}")]
    TrustRoot {
        /// Where it is kept.
        path: PathBuf,
        /// The problem.
        message: String,
    },
}

/// Where the app's trust root comes from.
#[derive(Debug, Clone)]
pub enum AppTrustRoot {
    /// A file.
    Path(PathBuf),
    /// The JSON itself (shipped inside the app).
    Json(String),
}

/// A release the coordinator offers, as its verified manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppOffer {
    /// Version.
    pub version: String,
    /// version_code.
    pub version_code: u64,
    /// The publisher marked it mandatory.
    pub mandatory: bool,
    /// Size of the bundle archive in bytes.
    pub size: u64,
    /// Release notes.
    pub notes: Option<String>,
    /// Already downloaded and staged (or on trial): the next app start runs it.
    pub staged: bool,
}

/// What [`Agent::check_offer`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppCheck {
    /// Nothing newer.
    UpToDate,
    /// A verified release for this device.
    Available(AppOffer),
    /// A newer release needs a newer native shell (an app store update).
    NativeTooOld {
        /// The native version it needs.
        required: String,
    },
    /// The offered release was rolled back on this device before; it is not installed again.
    Blacklisted {
        /// Its version.
        version: String,
    },
}

/// What [`Agent::app_started`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppStart {
    /// Nothing on trial.
    Normal,
    /// This start runs a new bundle on trial: mark it healthy once the app works.
    OnTrial {
        /// Its version.
        version: String,
        /// App starts counted on trial, this one included.
        starts: u32,
    },
    /// The bundle on trial was not marked healthy in time: the previous one is back (or,
    /// for a first bundle, the one shipped in the app).
    RolledBack {
        /// The version rolled back.
        version: String,
        /// Why.
        reason: String,
    },
}

/// Download progress of [`Agent::stage_with_progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstallProgress {
    /// Bytes fetched over the network so far in this run.
    pub fetched_bytes: u64,
    /// Bytes reused from the active bundle (known once the install is done, else 0).
    pub reused_bytes: u64,
    /// Size of the bundle archive.
    pub total_bytes: u64,
    /// The bundle is verified and staged.
    pub done: bool,
}

/// The index of the install in progress, to turn the download log into bytes.
struct Watched {
    index_id: flotilla_core::ids::IndexId,
    lens: HashMap<String, u32>,
    total: u64,
}

impl Agent {
    /// Asks the coordinator what it offers this device and verifies the manifest against the
    /// trust root (signatures, product, channel, expiry, versions, payload kind), without
    /// installing it. Sends queued events first.
    ///
    /// # Errors
    /// [`AgentError`]: the coordinator is unreachable or refused, or the manifest is refused.
    pub async fn check_offer(&self) -> Result<AppCheck, AgentError> {
        let _lock = self.lock(false)?;
        let j = self.journal()?;
        let _ = self.flush_events().await;
        let c = self.coordinator()?;
        let mut token = self.token(&c, &j).await?;
        let mut query: Vec<(&str, String)> = vec![("agent_version", AGENT_VERSION.to_owned())];
        if let Some(r) = &j.installed {
            query.push(("version_code", r.version_code.to_string()));
        }
        if let Some(v) = &self.config.native_version {
            query.push(("native_version", v.clone()));
        }
        let outcome = match c.check(&token, &query, None).await {
            Err(ClientError::Status { status: reqwest::StatusCode::UNAUTHORIZED, .. }) => {
                token = self.enroll(&c, &j).await?;
                c.check(&token, &query, None).await?
            }
            other => other?,
        };
        let offer = match outcome {
            CheckOutcome::NoUpdate | CheckOutcome::NotModified => return Ok(AppCheck::UpToDate),
            CheckOutcome::NativeTooOld { required } => return Ok(AppCheck::NativeTooOld { required }),
            CheckOutcome::Offer(offer, _) => offer,
        };
        let m = match self.verify_manifest(&j, offer.manifest.as_bytes(), None) {
            Ok(m) => m,
            Err(AgentError::Blacklisted { version, .. }) => return Ok(AppCheck::Blacklisted { version }),
            Err(e) => return Err(e),
        };
        let man = m.manifest();
        self.slots.check_kind(man.payload.kind)?;
        let staged = matches!(j.state, State::Staged | State::Trial)
            && j.target.as_ref().is_some_and(|t| t.release.manifest_sha256 == m.payload_sha256());
        Ok(AppCheck::Available(AppOffer {
            version: man.version.to_string(),
            version_code: man.version_code,
            mandatory: man.mandatory,
            size: man.payload.size,
            notes: man.notes.clone(),
            staged,
        }))
    }

    /// [`Agent::check_once`] (check, verify, download, unpack into the inactive slot, swap
    /// `current`), calling `progress` as chunks arrive and once more when the bundle is
    /// staged.
    ///
    /// # Errors
    /// As [`Agent::check_once`].
    pub async fn stage_with_progress(
        &self,
        progress: &(dyn Fn(InstallProgress) + Send + Sync),
    ) -> Result<CheckReport, AgentError> {
        let started = std::time::SystemTime::now();
        let install = self.check_once();
        tokio::pin!(install);
        let mut tick = tokio::time::interval(PROGRESS_POLL);
        let mut watched: Option<Watched> = None;
        let mut last = None;
        let report = loop {
            tokio::select! {
                biased;
                report = &mut install => break report,
                _ = tick.tick() => {
                    if let Some(p) = self.progress_now(started, &mut watched)
                        && last != Some(p)
                    {
                        progress(p);
                        last = Some(p);
                    }
                }
            }
        };
        if let Ok(CheckReport::Staged { bytes, .. }) = &report {
            let fetched = bytes.cdn + bytes.peer + bytes.file + bytes.delta;
            let total = self.journal()?.target.map_or(fetched + bytes.local, |t| t.release.image_size);
            progress(InstallProgress {
                fetched_bytes: fetched,
                reused_bytes: bytes.local,
                total_bytes: total,
                done: true,
            });
        }
        report
    }

    /// Bytes fetched by the install in progress: the chunks in its download log, sized by the
    /// index it stored. A fresh install starts a new log, so a log last written before
    /// `started` is the previous install's and counts nothing.
    fn progress_now(&self, started: std::time::SystemTime, watched: &mut Option<Watched>) -> Option<InstallProgress> {
        let j = self.journal().ok()?;
        let t = j.target.filter(|_| j.state == State::Downloading)?;
        if watched.as_ref().is_none_or(|w| w.index_id != t.release.index_id) {
            let index = ChunkIndex::decode(&std::fs::read(self.paths.target_index()).ok()?).ok()?;
            if index.id() != t.release.index_id {
                return None;
            }
            let lens = index.entries().iter().map(|e| (e.id.to_string(), e.len)).collect();
            *watched = Some(Watched { index_id: index.id(), lens, total: index.image_size() });
        }
        let w = watched.as_ref()?;
        let log = self.paths.downloads_log();
        let fresh = std::fs::metadata(&log).and_then(|m| m.modified()).is_ok_and(|m| m >= started);
        let text = if fresh { std::fs::read_to_string(&log).ok()? } else { String::new() };
        let fetched = text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|id| w.lens.get(id))
            .map(|&n| u64::from(n))
            .sum();
        Some(InstallProgress { fetched_bytes: fetched, reused_bytes: 0, total_bytes: w.total, done: false })
    }

    /// Call at every app start, before loading the bundle from [`Agent::bundle_path`]. A
    /// staged bundle goes on trial (its switch is made if a cut run left it undone); a bundle
    /// still on trial counts one more start, and past `health.boot_attempts` starts without
    /// [`Agent::app_healthy`] it is rolled back and blacklisted.
    ///
    /// # Errors
    /// [`AgentError`] from the journal or the pointer.
    pub fn app_started(&self) -> Result<AppStart, AgentError> {
        let _lock = self.lock(true)?;
        let mut j = self.journal_locked()?;
        let Some(t) = j.target.clone() else { return Ok(AppStart::Normal) };
        let limit = self.config.health.boot_attempts;
        match j.state {
            State::Staged => {
                if !t.activated {
                    self.activate(&mut j)?;
                }
                let running = self.boot.selected(j.active)?;
                if running != t.slot {
                    let why = format!("the bundle pointer names slot {running}, not the staged slot {}", t.slot);
                    return self.app_rolled_back(&mut j, why);
                }
                if let Some(tm) = &mut j.target {
                    tm.attempts = 1;
                }
                let e = Self::new_event(EventKind::Booted, Some(&t.release), ByteSources::default(), None);
                self.record(&mut j, Some(State::Trial), e)?;
                Ok(AppStart::OnTrial { version: t.release.version, starts: 1 })
            }
            State::Trial => {
                let starts = t.attempts + 1;
                if let Some(tm) = &mut j.target {
                    tm.attempts = starts;
                }
                j.save(&self.paths.journal())?;
                if starts > limit {
                    let why = format!("not marked healthy in {limit} app start(s)");
                    return self.app_rolled_back(&mut j, why);
                }
                Ok(AppStart::OnTrial { version: t.release.version, starts })
            }
            _ => Ok(AppStart::Normal),
        }
    }

    fn app_rolled_back(&self, j: &mut Journal, why: String) -> Result<AppStart, AgentError> {
        let version = j.target.as_ref().map(|t| t.release.version.clone()).unwrap_or_default();
        match self.rollback(j, why)? {
            BootReport::RolledBack { reason, .. } => Ok(AppStart::RolledBack { version, reason }),
            _ => Ok(AppStart::Normal),
        }
    }

    /// The app runs well on the bundle on trial: commit it (Capacitor's `notifyAppReady`).
    /// Returns the committed version; `None` when nothing is on trial (a normal start, or a
    /// bundle staged but not started yet).
    ///
    /// Sends the queued events afterwards (kept queued when the coordinator is unreachable).
    ///
    /// # Errors
    /// [`AgentError`] from the journal or the pointer.
    pub async fn app_healthy(&self) -> Result<Option<String>, AgentError> {
        let lock = self.lock(true)?;
        let mut j = self.journal_locked()?;
        if j.state != State::Trial || j.target.is_none() {
            return Ok(None);
        }
        let version = match self.commit(&mut j)? {
            BootReport::Committed { version, .. } => Some(version),
            _ => None,
        };
        drop(lock);
        let _ = self.flush_events().await;
        Ok(version)
    }

    /// Discards a staged or on-trial bundle: the previous one is current again and the
    /// discarded release is blacklisted. Returns the discarded version; `None` when there is
    /// none (a committed bundle stays). Sends the queued events afterwards.
    ///
    /// # Errors
    /// [`AgentError`] from the journal or the pointer.
    pub async fn app_rollback(&self, why: &str) -> Result<Option<String>, AgentError> {
        let lock = self.lock(true)?;
        let mut j = self.journal_locked()?;
        if !matches!(j.state, State::Staged | State::Trial) || j.target.is_none() {
            return Ok(None);
        }
        let version = match self.app_rolled_back(&mut j, why.to_owned())? {
            AppStart::RolledBack { version, .. } => Some(version),
            _ => None,
        };
        drop(lock);
        let _ = self.flush_events().await;
        Ok(version)
    }

    /// The unpacked bundle `current` points at, if there is one (`dir` slots). `None` on a
    /// device with no bundle installed yet: the app loads the one it ships with.
    pub fn bundle_path(&self) -> Option<PathBuf> {
        let active = self.journal().map(|j| j.active).unwrap_or(SlotName::A);
        let slot = self.boot.selected(active).ok()?;
        self.slots.bundle_dir(slot).filter(|d| d.is_dir())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(dir: &Path, trust_root: AppTrustRoot) -> AppConfig {
        AppConfig::new("http://127.0.0.1:1", "my-app", "install-1", dir.join("state"), dir.join("bundles"), trust_root)
    }

    #[test]
    fn app_settings_become_a_dir_slot_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = app(dir.path(), AppTrustRoot::Path(dir.path().join("root.json")));
        a.trial_starts = 2;
        a.max_download_rate = Some(1 << 20);
        a.enrollment_secret = Some(Secret::new("s3cret"));
        let c = a.into_config().unwrap();
        assert!(matches!(&c.slots, SlotsConfig::Dir { root } if *root == dir.path().join("bundles")));
        assert_eq!((c.health.boot_attempts, c.max_download_rate), (2, Some(1 << 20)));
        assert!(c.auto_install && !c.mesh.enabled);
        assert_eq!(c.device_id.value.as_deref(), Some("install-1"));
        assert_eq!(c.enrollment_secret.map(|s| s.expose().to_owned()).as_deref(), Some("s3cret"));
    }

    #[test]
    fn bad_app_settings_are_refused_by_name_and_a_bad_trust_root_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = app(dir.path(), AppTrustRoot::Path(dir.path().join("root.json")));
        a.trial_starts = 0;
        let e = a.into_config().unwrap_err();
        assert!(matches!(e, AppConfigError::Config(ConfigError::Invalid { field: "trial_starts", .. })), "{e}");
        let mut a = app(dir.path(), AppTrustRoot::Path(dir.path().join("root.json")));
        a.product = "no spaces allowed".into();
        let e = a.into_config().unwrap_err();
        assert!(matches!(e, AppConfigError::Config(ConfigError::Invalid { field: "product", .. })), "{e}");
        let e = app(dir.path(), AppTrustRoot::Json("{\"not\": \"a root\"}".into())).into_config().unwrap_err();
        assert!(matches!(e, AppConfigError::TrustRoot { .. }), "{e}");
        assert!(!dir.path().join("state/trust-root.json").exists());
    }
}
