//! Shared server state: database, object store, signing key, caches, metrics.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use flotilla_core::keys::SigningKey;
use flotilla_core::manifest::{Delta, Manifest};
use flotilla_core::rollout::RolloutSalt;
use flotilla_core::trust::TrustRoot;
use sqlx::Row as _;

use crate::config::Config;
use crate::db::Db;
use crate::storage::Storage;

/// Everything a handler needs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Database.
    pub db: Db,
    /// Object store.
    pub store: Storage,
    /// Configuration.
    pub config: Arc<Config>,
    /// The coordinator's `rollout` key (from a file, never the database).
    pub rollout_key: Arc<SigningKey>,
    /// Live releases and trust roots.
    pub cache: Arc<ReleaseCache>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Device last-seen updates waiting to be written.
    pub last_seen: Arc<Mutex<HashMap<(String, String), LastSeen>>>,
    /// Per-client budgets.
    pub limiter: Arc<RateLimiter>,
    /// This replica's name in leases.
    pub instance: String,
}

/// A pending last-seen write.
#[derive(Debug, Clone)]
pub struct LastSeen {
    /// When.
    pub at: i64,
    /// Reported version_code.
    pub version_code: Option<i64>,
}

/// A release that devices may be offered, as the check handler needs it.
#[derive(Debug, Clone)]
pub struct LiveRelease {
    /// Database id.
    pub id: i64,
    /// The manifest as signed.
    pub manifest_json: Arc<str>,
    /// Parsed manifest (verified at publish).
    pub manifest: Arc<Manifest>,
    /// SHA-256 of the manifest payload.
    pub manifest_sha256: flotilla_core::ids::Sha256Digest,
    /// Cohort salt.
    pub salt: RolloutSalt,
    /// active | paused | completed.
    pub state: String,
    /// Current share in basis points.
    pub basis_points: u16,
}

impl LiveRelease {
    /// Deltas offered.
    pub fn deltas(&self) -> &[Delta] {
        &self.manifest.deltas
    }
}

/// Live releases per (product, channel), newest first, and trust roots per product.
#[derive(Debug, Default)]
pub struct ReleaseCache {
    releases: RwLock<HashMap<(String, String), Arc<Vec<LiveRelease>>>>,
    roots: RwLock<HashMap<String, Arc<TrustRoot>>>,
    /// Bumped on every reload; part of ETags.
    pub generation: AtomicU64,
}

impl ReleaseCache {
    /// Live releases of a channel, newest first.
    pub fn live(&self, product: &str, channel: &str) -> Arc<Vec<LiveRelease>> {
        self.releases
            .read()
            .map(|m| m.get(&(product.to_owned(), channel.to_owned())).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// A product's trust root.
    pub fn root(&self, product: &str) -> Option<Arc<TrustRoot>> {
        self.roots.read().ok().and_then(|m| m.get(product).cloned())
    }

    /// Reloads everything from the database.
    ///
    /// # Errors
    /// Database errors.
    pub async fn reload(&self, db: &Db) -> Result<(), sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, product, channel, manifest, manifest_sha256, salt, state, basis_points FROM releases \
             WHERE archived = 0 AND state IN ('active', 'paused', 'completed') ORDER BY version_code DESC",
        )
        .fetch_all(&db.pool)
        .await?;
        let mut releases: HashMap<(String, String), Vec<LiveRelease>> = HashMap::new();
        for row in rows {
            let manifest_json: String = row.try_get("manifest")?;
            let Some(manifest) = parse_stored_manifest(&manifest_json) else {
                tracing::error!(release = row.try_get::<i64, _>("id")?, "stored manifest does not parse; skipping");
                continue;
            };
            let decode = |e: &dyn std::fmt::Display| sqlx::Error::Decode(e.to_string().into());
            let live = LiveRelease {
                id: row.try_get("id")?,
                manifest_json: manifest_json.into(),
                manifest: Arc::new(manifest),
                manifest_sha256: row.try_get::<String, _>("manifest_sha256")?.parse().map_err(|e| decode(&e))?,
                salt: row.try_get::<String, _>("salt")?.parse().map_err(|e| decode(&e))?,
                state: row.try_get("state")?,
                basis_points: u16::try_from(row.try_get::<i64, _>("basis_points")?).unwrap_or(0),
            };
            releases.entry((row.try_get("product")?, row.try_get("channel")?)).or_default().push(live);
        }
        let mut roots = HashMap::new();
        for row in sqlx::query("SELECT name, trust_root FROM products").fetch_all(&db.pool).await? {
            let name: String = row.try_get("name")?;
            let json: String = row.try_get("trust_root")?;
            match TrustRoot::from_trusted_json(json.as_bytes()) {
                Ok(root) => {
                    roots.insert(name, Arc::new(root));
                }
                Err(e) => tracing::error!(product = %name, error = %e, "stored trust root is invalid"),
            }
        }
        if let Ok(mut m) = self.releases.write() {
            *m = releases.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        }
        if let Ok(mut m) = self.roots.write() {
            *m = roots;
        }
        self.generation.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Parses a manifest envelope stored after verification (no signature check again).
pub fn parse_stored_manifest(envelope_json: &str) -> Option<Manifest> {
    let env = flotilla_core::dsse::Envelope::from_json(envelope_json.as_bytes()).ok()?;
    flotilla_core::json::from_slice(&env.payload, flotilla_core::manifest::MAX_MANIFEST_LEN).ok()
}

/// Upper bounds (ms) of the check-latency histogram.
pub const LATENCY_BUCKETS_MS: [f64; 10] = [0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 500.0];

/// Prometheus counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Checks answered with a release.
    pub checks_offered: AtomicU64,
    /// Checks answered 204/304.
    pub checks_empty: AtomicU64,
    /// Enrollments.
    pub enrollments: AtomicU64,
    /// Releases published.
    pub releases_published: AtomicU64,
    /// Device events received.
    pub events: AtomicU64,
    /// Chunks uploaded.
    pub chunks_uploaded: AtomicU64,
    /// Bytes served from the object store.
    pub bytes_served: AtomicU64,
    /// Requests refused by rate limits.
    pub rate_limited: AtomicU64,
    /// Rollout evaluator passes started on this replica.
    pub evaluator_runs: AtomicU64,
    /// Evaluator passes in which this replica held the lease and evaluated.
    pub evaluator_leader_runs: AtomicU64,
    /// Check latency histogram counts (one per bucket, cumulative on render).
    pub check_latency: [AtomicU64; LATENCY_BUCKETS_MS.len()],
    /// Sum of check latencies in microseconds.
    pub check_latency_sum_us: AtomicU64,
    /// Number of checks timed.
    pub check_latency_count: AtomicU64,
}

impl Metrics {
    /// Records one check's latency.
    pub fn observe_check(&self, started: Instant) {
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if let Some(i) = LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b) {
            self.check_latency[i].fetch_add(1, Ordering::Relaxed);
        }
        self.check_latency_sum_us.fetch_add((ms * 1000.0) as u64, Ordering::Relaxed);
        self.check_latency_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, help, v) in [
            ("flotilla_checks_offered_total", "Update checks answered with a release.", g(&self.checks_offered)),
            ("flotilla_checks_empty_total", "Update checks answered with nothing new.", g(&self.checks_empty)),
            ("flotilla_enrollments_total", "Devices enrolled.", g(&self.enrollments)),
            ("flotilla_releases_published_total", "Releases published.", g(&self.releases_published)),
            ("flotilla_device_events_total", "Device events received.", g(&self.events)),
            ("flotilla_chunks_uploaded_total", "Chunk objects stored.", g(&self.chunks_uploaded)),
            ("flotilla_object_bytes_served_total", "Bytes served from the object store.", g(&self.bytes_served)),
            ("flotilla_rate_limited_total", "Requests refused by rate limits.", g(&self.rate_limited)),
            ("flotilla_evaluator_runs_total", "Rollout evaluator passes started here.", g(&self.evaluator_runs)),
            (
                "flotilla_evaluator_leader_runs_total",
                "Rollout evaluator passes that held the lease and evaluated.",
                g(&self.evaluator_leader_runs),
            ),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"));
        }
        out.push_str("# HELP flotilla_check_duration_seconds Update check handling time.\n");
        out.push_str("# TYPE flotilla_check_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, b) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += g(&self.check_latency[i]);
            out.push_str(&format!("flotilla_check_duration_seconds_bucket{{le=\"{}\"}} {cumulative}\n", b / 1000.0));
        }
        let count = g(&self.check_latency_count);
        out.push_str(&format!("flotilla_check_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n"));
        out.push_str(&format!(
            "flotilla_check_duration_seconds_sum {}\nflotilla_check_duration_seconds_count {count}\n",
            g(&self.check_latency_sum_us) as f64 / 1e6
        ));
        out
    }
}

/// Token buckets per client address and purpose.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<(IpAddr, &'static str), (f64, Instant)>>,
}

impl RateLimiter {
    /// Takes one token from `client`'s `purpose` bucket refilled at `per_minute`.
    pub fn allow(&self, client: IpAddr, purpose: &'static str, per_minute: u32) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else { return true };
        let now = Instant::now();
        let cap = f64::from(per_minute.max(1));
        if buckets.len() > 100_000 {
            // Forget idle clients rather than grow without bound.
            buckets.retain(|_, (_, t)| now.duration_since(*t).as_secs() < 120);
        }
        let (tokens, last) = buckets.entry((client, purpose)).or_insert((cap, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * cap / 60.0).min(cap);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
