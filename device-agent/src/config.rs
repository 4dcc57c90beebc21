//! Agent settings: one TOML file (`/etc/flotilla/agent.toml` by default), overridable field by
//! field from the environment by the binary (see `flotilla-agent --help`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/flotilla/agent.toml";

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not valid TOML of the right shape.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A field is missing or out of range.
    #[error("config field `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Agent settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Coordinator base URL, e.g. `http://coordinator:8080`. `None`: offline (only `install`).
    #[serde(default)]
    pub coordinator: Option<String>,
    /// Product name.
    pub product: String,
    /// Channel followed; changing it re-enrolls the device on the new channel.
    #[serde(default = "default_channel")]
    pub channel: String,
    /// The fleet's enrollment secret. Prefer `FLOTILLA_ENROLLMENT_SECRET` in the environment.
    #[serde(default)]
    pub enrollment_secret: Option<Secret>,
    /// Where the device id comes from.
    #[serde(default)]
    pub device_id: DeviceIdSource,
    /// Hardware model, matched against a manifest's `compatibility.hardware`.
    #[serde(default)]
    pub hardware: Option<String>,
    /// Platform reported at enrollment and matched against `compatibility.platforms`
    /// (default: the OS this agent was built for, e.g. `linux`; apps set `android` or `ios`).
    #[serde(default = "default_platform")]
    pub platform: String,
    /// CPU architecture matched against `compatibility.architectures` (default: this build's,
    /// e.g. `x86_64`, `aarch64`).
    #[serde(default = "default_architecture")]
    pub architecture: String,
    /// Native shell version (apps), checked against `min_native_version`.
    #[serde(default)]
    pub native_version: Option<String>,
    /// Extra PEM CA certificates to trust for an `https://` coordinator (a fleet's private CA),
    /// besides the system's roots.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// The trust root the device was provisioned with (a DSSE envelope, JSON).
    pub trust_root: PathBuf,
    /// The agent's own data: journal, tokens, event queue. Not on an A/B slot.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Time between update checks (default 1 h).
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Up to this much random delay is added to each poll so a fleet does not check in step
    /// (default 5 min).
    #[serde(default = "default_jitter", with = "humantime_serde")]
    pub poll_jitter: Duration,
    /// Install releases that are not `mandatory` without being asked (default true).
    #[serde(default = "yes")]
    pub auto_install: bool,
    /// Chunk downloads in flight (default 8).
    #[serde(default = "default_parallel")]
    pub parallel_downloads: usize,
    /// Attempts per chunk before the install fails (default 5).
    #[serde(default = "default_retries")]
    pub fetch_attempts: u32,
    /// Download bandwidth cap in bytes per second; `None`: uncapped.
    #[serde(default)]
    pub max_download_rate: Option<u64>,
    /// Command run after a slot switch to reboot into it (e.g. `["systemctl", "reboot"]`);
    /// empty: the agent only reports that a reboot is needed.
    #[serde(default)]
    pub reboot_command: Vec<String>,
    /// The two slots.
    pub slots: SlotsConfig,
    /// Bootloader state (for `file` and `block` slots; `dir` slots use their pointer).
    #[serde(default)]
    pub bootloader: BootloaderConfig,
    /// Boot-health checks.
    #[serde(default)]
    pub health: HealthConfig,
    /// Peer-to-peer chunk exchange (absent: off).
    #[serde(default)]
    pub mesh: crate::peer::MeshSettings,
}

/// A secret whose `Debug` never prints it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Where the device id comes from; the first one set wins, in this order.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceIdSource {
    /// A fixed id.
    #[serde(default)]
    pub value: Option<String>,
    /// A command whose first output line is the id.
    #[serde(default)]
    pub command: Option<String>,
    /// A file whose first line is the id (default `/etc/machine-id`).
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// The A/B slots.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SlotsConfig {
    /// Two image files (tests, VMs). The bootloader section says how the device boots them.
    File {
        /// Slot A's image file.
        a: PathBuf,
        /// Slot B's image file.
        b: PathBuf,
    },
    /// Two block devices (partitions), e.g. `/dev/mmcblk0p2` and `/dev/mmcblk0p3`: raw
    /// images are written over their start, never past their end. The bootloader section
    /// says how the device boots them.
    Block {
        /// Slot A's device.
        a: PathBuf,
        /// Slot B's device.
        b: PathBuf,
    },
    /// App bundles: `<root>/a/`, `<root>/b/` (each with its archive `a.tar`, `b.tar`) and the
    /// pointer `<root>/current`, a symlink an app loads its bundle through.
    Dir {
        /// The bundle root.
        root: PathBuf,
    },
}

/// Which bootloader environment holds `BOOT_ORDER`, `BOOT_A_LEFT`, `BOOT_B_LEFT`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootloaderConfig {
    /// The backend.
    #[serde(default)]
    pub kind: BootloaderKind,
    /// The environment file (`env-file`) or GRUB environment block (`grub`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The hook (`command`): called as `<cmd> get` (prints `KEY=VALUE` lines) and
    /// `<cmd> set` (reads `KEY=VALUE` lines on stdin, applies them in one transaction).
    #[serde(default)]
    pub command: Option<String>,
    /// How the agent learns which slot is running.
    #[serde(default)]
    pub booted: BootedSource,
    /// The kernel command line read for `booted = "cmdline"` (default `/proc/cmdline`).
    #[serde(default = "default_cmdline")]
    pub cmdline: PathBuf,
}

impl Default for BootloaderConfig {
    fn default() -> Self {
        Self {
            kind: BootloaderKind::default(),
            path: None,
            command: None,
            booted: BootedSource::default(),
            cmdline: default_cmdline(),
        }
    }
}

/// Bootloader environment backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootloaderKind {
    /// A `KEY=VALUE` file replaced atomically (tests, VMs, custom loaders reading a file).
    #[default]
    EnvFile,
    /// U-Boot through `fw_printenv` / `fw_setenv -s -` (use the redundant environment).
    Uboot,
    /// GRUB through `grub-editenv` (its 1 KiB block is not power-cut safe; prefer U-Boot).
    Grub,
    /// A custom command hook.
    Command,
}

/// How the running slot is found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootedSource {
    /// `rauc.slot=A` or `flotilla.slot=A` on the kernel command line.
    #[default]
    Cmdline,
    /// `boot-check` plays the bootloader: it picks the first slot of `BOOT_ORDER` with tries
    /// left, decrements its counter and saves it before "booting" it. For tests and VMs
    /// without a bootloader integration.
    Simulate,
}

/// Boot-health checks run by `boot-check` on a slot on trial.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Boot attempts a new slot gets before it is rolled back (default 3).
    #[serde(default = "default_attempts")]
    pub boot_attempts: u32,
    /// When set, the new slot must also be marked healthy (`flotilla-agent mark-good`, the
    /// app's SDK call) within this time after `boot-check` starts, or it is rolled back.
    #[serde(default, with = "humantime_serde")]
    pub mark_good_timeout: Option<Duration>,
    /// Time limit of each check (default 60 s).
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub check_timeout: Duration,
    /// The checks; all must pass.
    #[serde(default)]
    pub checks: Vec<HealthCheck>,
    /// Crash-loop probation after a commit: healthy boots of the new slot before the commit
    /// is final (default 0; see [`crate::probation`]). Probation is on when this or
    /// `probation_time` is set; while it lasts no install may overwrite the previous slot.
    #[serde(default)]
    pub probation_boots: u32,
    /// Crash-loop probation: time after the commit before it is final (default: none).
    #[serde(default, with = "humantime_serde")]
    pub probation_time: Option<Duration>,
    /// Crashes in a row during probation (boots that do not reach healthy, crashes reported
    /// with `flotilla-agent report-crash`) that roll the device back (default 3).
    #[serde(default = "default_attempts")]
    pub crash_limit: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            boot_attempts: default_attempts(),
            mark_good_timeout: None,
            check_timeout: default_check_timeout(),
            checks: Vec::new(),
            probation_boots: 0,
            probation_time: None,
            crash_limit: default_attempts(),
        }
    }
}

/// One health check.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HealthCheck {
    /// A shell command that must exit 0.
    Command(String),
    /// A systemd unit that must be active (`systemctl is-active --quiet UNIT`).
    SystemdUnit(String),
    /// An `http://` URL that must answer 2xx.
    Http(String),
}

fn default_channel() -> String {
    "production".into()
}
fn default_platform() -> String {
    std::env::consts::OS.into()
}
fn default_architecture() -> String {
    std::env::consts::ARCH.into()
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/flotilla")
}
fn default_poll() -> Duration {
    Duration::from_secs(3600)
}
fn default_jitter() -> Duration {
    Duration::from_secs(300)
}
fn yes() -> bool {
    true
}
fn default_parallel() -> usize {
    8
}
fn default_retries() -> u32 {
    5
}
fn default_attempts() -> u32 {
    3
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_cmdline() -> PathBuf {
    PathBuf::from("/proc/cmdline")
}

impl Config {
    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or field.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.to_path_buf(), message },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// [`ConfigError`].
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges and combinations.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| Err(ConfigError::Invalid { field, reason: reason.into() });
        if !flotilla_core::manifest::is_valid_name(&self.product) {
            return invalid("product", "1-64 characters of [A-Za-z0-9._+-]");
        }
        if !flotilla_core::manifest::is_valid_name(&self.channel) {
            return invalid("channel", "1-64 characters of [A-Za-z0-9._+-]");
        }
        if let Some(h) = &self.hardware
            && !flotilla_core::manifest::is_valid_name(h)
        {
            return invalid("hardware", "1-64 characters of [A-Za-z0-9._+-]");
        }
        if !flotilla_core::manifest::is_valid_name(&self.platform) {
            return invalid("platform", "1-64 characters of [A-Za-z0-9._+-]");
        }
        if !flotilla_core::manifest::is_valid_name(&self.architecture) {
            return invalid("architecture", "1-64 characters of [A-Za-z0-9._+-]");
        }
        if let Some(v) = &self.native_version
            && flotilla_core::version::parse_version(v).is_err()
        {
            return invalid("native_version", "not a semantic version");
        }
        if let Some(url) = &self.coordinator
            && !url.starts_with("http://")
            && !url.starts_with("https://")
        {
            return invalid("coordinator", "must be an http:// or https:// URL");
        }
        if self.parallel_downloads == 0 || self.parallel_downloads > 64 {
            return invalid("parallel_downloads", "between 1 and 64");
        }
        if self.fetch_attempts == 0 || self.fetch_attempts > 100 {
            return invalid("fetch_attempts", "between 1 and 100");
        }
        if self.max_download_rate == Some(0) {
            return invalid("max_download_rate", "leave it out for no cap");
        }
        if self.health.boot_attempts == 0 || self.health.boot_attempts > 100 {
            return invalid("health.boot_attempts", "between 1 and 100");
        }
        if self.health.crash_limit == 0 || self.health.crash_limit > 100 {
            return invalid("health.crash_limit", "between 1 and 100");
        }
        if self.health.probation_boots > 1000 {
            return invalid("health.probation_boots", "at most 1000");
        }
        if self.mesh.enabled
            && let Err((field, reason)) = self.mesh.addresses()
        {
            return invalid(field, &reason);
        }
        if self.mesh.enabled
            && let Some(path) = &self.mesh.psk_file
            && let Err(e) = flotilla_mesh::load_psk(path)
        {
            return invalid("mesh.psk_file", &e.to_string());
        }
        if self.mesh.serve_cache > crate::peer::MAX_SERVE_CACHE {
            return invalid("mesh.serve_cache", "at most 1 GiB (1073741824 bytes)");
        }
        if let SlotsConfig::File { a, b } | SlotsConfig::Block { a, b } = &self.slots
            && a == b
        {
            return invalid("slots", "slot a and slot b must be different files");
        }
        if matches!(self.slots, SlotsConfig::File { .. } | SlotsConfig::Block { .. }) {
            match self.bootloader.kind {
                BootloaderKind::EnvFile | BootloaderKind::Grub if self.bootloader.path.is_none() => {
                    return invalid("bootloader.path", "required for env-file and grub");
                }
                BootloaderKind::Command if self.bootloader.command.is_none() => {
                    return invalid("bootloader.command", "required for kind = \"command\"");
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses() {
        let c = Config::from_toml(
            r#"
            coordinator = "http://127.0.0.1:8080"
            product = "board"
            trust_root = "/etc/flotilla/root.json"
            [device_id]
            value = "dev-1"
            [slots]
            kind = "file"
            a = "/tmp/a"
            b = "/tmp/b"
            [bootloader]
            kind = "env-file"
            path = "/tmp/env"
            booted = "simulate"
            [health]
            boot_attempts = 2
            mark_good_timeout = "30s"
            checks = [{ command = "true" }, { systemd_unit = "app.service" }, { http = "http://127.0.0.1/h" }]
            "#,
        )
        .unwrap();
        assert_eq!(c.health.checks.len(), 3);
        assert_eq!(c.health.mark_good_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.bootloader.booted, BootedSource::Simulate);
    }

    #[test]
    fn deploy_example_parses() {
        let c = Config::from_toml(include_str!("../../deploy/agent.toml")).unwrap();
        assert_eq!(c.bootloader.kind, BootloaderKind::Uboot);
        assert_eq!(c.health.checks.len(), 2);
    }

    #[test]
    fn env_file_needs_a_path() {
        let e = Config::from_toml(
            "product = \"p\"\ntrust_root = \"/r\"\n[slots]\nkind = \"file\"\na = \"/a\"\nb = \"/b\"\n",
        )
        .unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { field: "bootloader.path", .. }), "{e}");
    }
}
