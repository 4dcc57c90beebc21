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
    S3(S3Config),
}

/// An S3-compatible bucket: AWS S3, or MinIO, Garage, R2, Ceph RGW… through `endpoint`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Bucket name (`S3_BUCKET`). It must exist already.
    pub bucket: String,
    /// Endpoint URL for non-AWS stores (`S3_ENDPOINT`); when set, requests use path-style
    /// addressing (`<endpoint>/<bucket>/<key>`). Unset: AWS's regional endpoint.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region (`AWS_REGION`); unset means us-east-1.
    #[serde(default)]
    pub region: Option<String>,
    /// Key prefix inside the bucket (`a/b` stores chunks under `a/b/chunks/…`).
    #[serde(default)]
    pub prefix: String,
    /// Access key id (`AWS_ACCESS_KEY_ID`). Required: credentials are static (no instance
    /// profile or SSO lookup).
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key (`AWS_SECRET_ACCESS_KEY`). Required.
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// Session token of temporary credentials (`AWS_SESSION_TOKEN`).
    #[serde(default)]
    pub session_token: Option<Secret>,
}

impl S3Config {
    /// The region requests are signed for: the configured one, else us-east-1.
    pub fn region(&self) -> &str {
        self.region.as_deref().filter(|r| !r.is_empty()).unwrap_or("us-east-1")
    }
}

/// The crash-rate guardrail: a release whose installs fail at this rate, over at least this
/// many reports, is halted (no longer offered), whatever its stage plan says.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Guardrail {
    /// Reports (healthy + failed + rolled back) needed before the guardrail can trip.
    pub min_reports: u64,
    /// Failure share (0-1) that trips it.
    pub failure_rate: f64,
}

impl Default for Guardrail {
    fn default() -> Self {
        Self { min_reports: 20, failure_rate: 0.5 }
    }
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

/// S3 refuses presigned (SigV4) URLs that are valid for longer than a week.
pub const MAX_PRESIGN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Shortest evaluator lease accepted: lease times are stored in whole seconds.
pub const MIN_EVALUATOR_LEASE: Duration = Duration::from_secs(2);

/// Shortest lease derived from the interval when none is configured: leases compare each
/// replica's own clock, and half a minute leaves room for clocks that drift apart.
pub const DEFAULT_MIN_EVALUATOR_LEASE: Duration = Duration::from_secs(30);

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
    /// With S3 storage, answer chunk and index GETs with a 302 to a presigned S3 URL instead
    /// of proxying the bytes (`cdn_base_url` wins when both are set). Default false.
    pub presign_downloads: bool,
    /// How long a presigned download URL stays valid (at most 7 days, S3's limit). A device
    /// only needs it to start the request. Default 15 min.
    #[serde(with = "humantime_serde")]
    pub presign_ttl: Duration,
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
    /// How long the evaluator's lease lasts without renewal: when the replica holding it stops
    /// or dies, another replica takes over evaluating after this long. Must be longer than
    /// `evaluator_interval` (the holder renews it on each pass) and at least 2 s (lease times
    /// are whole seconds). Unset: three evaluator intervals, and at least 30 s.
    #[serde(with = "humantime_serde")]
    pub evaluator_lease: Option<Duration>,
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
    /// Crash-rate guardrail.
    pub guardrail: Guardrail,
    /// Database connections.
    pub max_connections: u32,
    /// Behind a load balancer: rate limits count the address the balancer appends to
    /// `X-Forwarded-For` rather than the balancer's own (`FLOTILLA_TRUST_FORWARDED_FOR`).
    /// Only set it when every request comes through a proxy that appends that header.
    pub trust_forwarded_for: bool,
    /// PEM certificate chain to serve HTTPS with (`FLOTILLA_TLS_CERT`); with `tls_key`. Unset:
    /// plain HTTP (for a TLS-terminating proxy or load balancer in front).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (`FLOTILLA_TLS_KEY`).
    pub tls_key: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("flotilla-data"),
            database_url: None,
            storage: StorageConfig::Fs,
            cdn_base_url: None,
            presign_downloads: false,
            presign_ttl: Duration::from_secs(15 * 60),
            rollout_key_file: None,
            open_enrollment: false,
            admin_token: None,
            evaluator_interval: Duration::from_secs(30 * 60),
            evaluator_lease: None,
            check_response_ttl: Duration::from_secs(24 * 3600),
            last_seen_flush: Duration::from_secs(5),
            cache_refresh: Duration::from_secs(10),
            stages: default_stages(),
            rate_limits: RateLimits::default(),
            guardrail: Guardrail::default(),
            max_connections: 16,
            tls_cert: None,
            tls_key: None,
            trust_forwarded_for: false,
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
        if !(self.guardrail.failure_rate > 0.0 && self.guardrail.failure_rate <= 1.0) || self.guardrail.min_reports == 0
        {
            return Err(ConfigError::Invalid(
                "guardrail.failure_rate must be in (0, 1] and guardrail.min_reports at least 1".into(),
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::Invalid("tls_cert and tls_key go together: set both, or neither".into()));
        }
        if self.evaluator_interval.is_zero() || self.last_seen_flush.is_zero() || self.cache_refresh.is_zero() {
            return Err(ConfigError::Invalid("intervals must be positive".into()));
        }
        if let Some(lease) = self.evaluator_lease
            && (lease < MIN_EVALUATOR_LEASE || lease <= self.evaluator_interval)
        {
            return Err(ConfigError::Invalid(
                "evaluator_lease must be at least 2 s and longer than evaluator_interval".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid("max_connections must be at least 1".into()));
        }
        if let StorageConfig::S3(s3) = &self.storage {
            if s3.bucket.is_empty() {
                return Err(ConfigError::Invalid("storage.bucket must not be empty".into()));
            }
            if s3.endpoint.as_deref().is_some_and(|e| !e.starts_with("http://") && !e.starts_with("https://")) {
                return Err(ConfigError::Invalid("storage.endpoint must be an http:// or https:// URL".into()));
            }
        }
        if self.presign_downloads && !matches!(self.storage, StorageConfig::S3(_)) {
            return Err(ConfigError::Invalid("presign_downloads needs S3 storage".into()));
        }
        if self.presign_ttl.is_zero() || self.presign_ttl > MAX_PRESIGN_TTL {
            return Err(ConfigError::Invalid("presign_ttl must be between 1 s and 7 days".into()));
        }
        Ok(())
    }

    /// The evaluator's lease time: `evaluator_lease`, else three evaluator intervals and at
    /// least [`DEFAULT_MIN_EVALUATOR_LEASE`].
    pub fn evaluator_lease(&self) -> Duration {
        self.evaluator_lease.unwrap_or_else(|| (self.evaluator_interval * 3).max(DEFAULT_MIN_EVALUATOR_LEASE))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_storage_parses_from_toml() {
        let config: Config = toml::from_str(
            r#"
            presign_downloads = true
            presign_ttl = "5m"
            [storage]
            kind = "s3"
            bucket = "ota"
            endpoint = "http://127.0.0.1:9000"
            prefix = "fleet-a"
            "#,
        )
        .expect("parses");
        config.validate().expect("valid");
        let StorageConfig::S3(s3) = &config.storage else { panic!("not s3: {:?}", config.storage) };
        assert_eq!((s3.bucket.as_str(), s3.prefix.as_str(), s3.region()), ("ota", "fleet-a", "us-east-1"));
        assert_eq!(config.presign_ttl, Duration::from_secs(300));
    }

    #[test]
    fn evaluator_lease_defaults_to_three_intervals_and_must_outlast_one() {
        let default = Config::default();
        assert_eq!(default.evaluator_lease(), default.evaluator_interval * 3);
        let short = Config { evaluator_interval: Duration::from_secs(1), ..Config::default() };
        assert_eq!(short.evaluator_lease(), DEFAULT_MIN_EVALUATOR_LEASE);
        let set = Config { evaluator_lease: Some(Duration::from_secs(3)), ..short.clone() };
        set.validate().expect("valid");
        assert_eq!(set.evaluator_lease(), Duration::from_secs(3));
        let config: Config = toml::from_str("evaluator_interval = \"1s\"\nevaluator_lease = \"3s\"\n").expect("parses");
        assert_eq!(config.evaluator_lease, Some(Duration::from_secs(3)));
        for lease in [Duration::from_secs(1), Duration::from_millis(1500)] {
            let bad = Config { evaluator_lease: Some(lease), ..short.clone() };
            assert!(matches!(bad.validate(), Err(ConfigError::Invalid(m)) if m.contains("evaluator_lease")));
        }
    }

    #[test]
    fn unknown_storage_field_is_rejected() {
        let err = toml::from_str::<Config>("[storage]\nkind = \"s3\"\nbucket = \"b\"\nbuckit = \"typo\"\n");
        assert!(err.is_err());
    }

    #[test]
    fn presign_needs_s3_and_a_ttl_s3_accepts() {
        let fs = Config { presign_downloads: true, ..Config::default() };
        assert!(matches!(fs.validate(), Err(ConfigError::Invalid(m)) if m.contains("presign_downloads")));
        let s3 = StorageConfig::S3(S3Config { bucket: "b".into(), ..S3Config::default() });
        let long =
            Config { storage: s3, presign_downloads: true, presign_ttl: MAX_PRESIGN_TTL * 2, ..Config::default() };
        assert!(matches!(long.validate(), Err(ConfigError::Invalid(m)) if m.contains("presign_ttl")));
    }
}
