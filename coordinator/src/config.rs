//! Coordinator configuration: a TOML file, then environment variables, then flags (the
//! binary resolves those layers; this module only defines the values and their defaults).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A secret string whose `Debug` never prints it.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; call only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One stage of a staged rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// Share of devices, in percent (0.01 to 100).
    pub percent: f64,
    /// Reports (healthy + failed) needed before advancing.
    #[serde(default)]
    pub min_reports: u64,
    /// Failure rate above which the rollout pauses (0.02 = 2 %).
    #[serde(default = "default_max_failure_rate")]
    pub max_failure_rate: f64,
    /// Minimum time in the stage before advancing.
    #[serde(default, with = "humantime_serde")]
    pub min_duration: Duration,
}

fn default_max_failure_rate() -> f64 {
    0.05
}

impl Stage {
    /// The percentage as basis points (100 = 1 %), clamped to [0, 10 000].
    pub fn basis_points(&self) -> u16 {
        (self.percent * 100.0).round().clamp(0.0, 10_000.0) as u16
    }
}

/// The default plan from DESIGN.md: 5 % until 100 reports below 2 % failures for 12 h;
/// 25 % until 500 reports below 3 % for 24 h; then 100 %.
pub fn default_stages() -> Vec<Stage> {
    vec![
        Stage { percent: 5.0, min_reports: 100, max_failure_rate: 0.02, min_duration: Duration::from_secs(12 * 3600) },
        Stage { percent: 25.0, min_reports: 500, max_failure_rate: 0.03, min_duration: Duration::from_secs(24 * 3600) },
        Stage { percent: 100.0, min_reports: 0, max_failure_rate: 0.05, min_duration: Duration::ZERO },
    ]
}

/// Where objects (chunks, indexes) are kept.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    /// A directory (default: `<data_dir>/objects`).
    #[default]
    Fs,
    /// An S3-compatible bucket.
    S3 {
        /// Bucket name (`S3_BUCKET`).
        bucket: String,
        /// Endpoint URL for non-AWS stores (`S3_ENDPOINT`).
        endpoint: Option<String>,
        /// Region (`AWS_REGION`, default us-east-1).
        region: Option<String>,
        /// Key prefix inside the bucket.
        #[serde(default)]
        prefix: String,
    },
}

/// Per-client request budgets.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// Update checks per client address per minute.
    pub checks_per_minute: u32,
    /// Enrollments per client address per minute.
    pub enrolls_per_minute: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self { checks_per_minute: 600, enrolls_per_minute: 60 }
    }
}

/// Coordinator settings. `Default` is the zero-configuration setup: SQLite and objects under
/// `./flotilla-data`, listening on 127.0.0.1:8080.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (`PORT` sets the port).
    pub listen: SocketAddr,
    /// Data directory: SQLite database, filesystem objects, generated keys.
    pub data_dir: PathBuf,
    /// `DATABASE_URL`: `postgres://…` for PostgreSQL; unset means SQLite in `data_dir`.
    pub database_url: Option<Secret>,
    /// Object storage.
    pub storage: StorageConfig,
    /// Base URL of a CDN in front of the object store: chunk and index GETs redirect there.
    pub cdn_base_url: Option<String>,
    /// PKCS#8 PEM of the coordinator's `rollout` signing key. Unset: `<data_dir>/rollout-key.pem`,
    /// generated on first start. Never stored in the database.
    pub rollout_key_file: Option<PathBuf>,
    /// Let devices enroll without a product enrollment secret.
    pub open_enrollment: bool,
    /// Token printed and stored on first start when no admin token exists
    /// (`FLOTILLA_ADMIN_TOKEN`); unset: a random one is written to `<data_dir>/admin-token`.
    pub admin_token: Option<Secret>,
    /// How often the rollout evaluator runs.
    #[serde(with = "humantime_serde")]
    pub evaluator_interval: Duration,
    /// How long a signed check response stays valid.
    #[serde(with = "humantime_serde")]
    pub check_response_ttl: Duration,
    /// How often batched last-seen times are written.
    #[serde(with = "humantime_serde")]
    pub last_seen_flush: Duration,
    /// How often the release cache is reloaded from the database (other replicas' changes).
    #[serde(with = "humantime_serde")]
    pub cache_refresh: Duration,
    /// Default stage plan for products and channels without their own.
    pub stages: Vec<Stage>,
    /// Request budgets.
    pub rate_limits: RateLimits,
    /// Database connections.
    pub max_connections: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("flotilla-data"),
            database_url: None,
            storage: StorageConfig::Fs,
            cdn_base_url: None,
            rollout_key_file: None,
            open_enrollment: false,
            admin_token: None,
            evaluator_interval: Duration::from_secs(30 * 60),
            check_response_ttl: Duration::from_secs(24 * 3600),
            last_seen_flush: Duration::from_secs(5),
            cache_refresh: Duration::from_secs(10),
            stages: default_stages(),
            rate_limits: RateLimits::default(),
            max_connections: 16,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file and validates it.
    ///
    /// # Errors
    /// Unreadable, unparsable or invalid configuration.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let config: Self = toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.into(), source: Box::new(source) })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values a TOML file can get wrong.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_stages(&self.stages).map_err(ConfigError::Invalid)?;
        if self.evaluator_interval.is_zero() || self.last_seen_flush.is_zero() || self.cache_refresh.is_zero() {
            return Err(ConfigError::Invalid("intervals must be positive".into()));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid("max_connections must be at least 1".into()));
        }
        Ok(())
    }

    /// The database URL: `DATABASE_URL` if set, else SQLite under the data directory.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.expose().to_owned(),
            None => format!("sqlite://{}?mode=rwc", self.data_dir.join("flotilla.db").display()),
        }
    }
}

/// A stage plan must rise strictly, end at 100 % and have sane bars.
///
/// # Errors
/// A message naming the problem.
pub fn validate_stages(stages: &[Stage]) -> Result<(), String> {
    if stages.is_empty() || stages.len() > 16 {
        return Err("a stage plan needs 1 to 16 stages".into());
    }
    let mut last = 0u16;
    for (i, s) in stages.iter().enumerate() {
        if !(s.percent > 0.0 && s.percent <= 100.0 && s.percent.is_finite()) {
            return Err(format!("stage {i}: percent must be in (0, 100]"));
        }
        if !(0.0..=1.0).contains(&s.max_failure_rate) {
            return Err(format!("stage {i}: max_failure_rate must be in [0, 1]"));
        }
        if s.basis_points() <= last {
            return Err(format!("stage {i}: percentages must rise"));
        }
        last = s.basis_points();
    }
    if last != 10_000 {
        return Err("the last stage must be 100 %".into());
    }
    Ok(())
}
