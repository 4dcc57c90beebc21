//! Prefetch: a site cache keeps the live releases of one product (optionally one channel)
//! from the coordinator, so the site's devices find every chunk on the cache before they
//! start, and the thin uplink carries each chunk once, ahead of time.
//!
//! Each round lists the product's releases (`GET /v1/releases` with a read-only `cache`
//! token), skips halted ones and the ones stored already, and for each new one: reads its
//! signed manifest and verifies it against the fleet's trust root (the coordinator is not
//! trusted for content), downloads its index (bounded by the size the manifest declares,
//! checked against its id), then every chunk the store lacks (bounded, verified against its id
//! as the store takes it), and the chunks of the patches the manifest offers. The release is
//! recorded only once all its chunks are in, like an import; a round that fails part way keeps
//! the chunks it verified and the next round goes on from there.

use std::sync::Arc;
use std::time::Duration;

use flotilla_core::ids::{ChunkId, IndexId};
use flotilla_core::index::ChunkIndex;
use flotilla_core::object;
use flotilla_core::time::Timestamp;
use flotilla_core::trust::TrustRoot;
use futures::StreamExt as _;

use crate::store::{DiskStore, StoreError};

/// Largest release list or release answer read (a list of 1 000 releases is well under this).
const MAX_JSON: u64 = 8 << 20;
/// Chunks downloaded at once.
const PARALLEL: usize = 8;
/// Connect and whole-request limits of one HTTP request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// What to prefetch, from where.
#[derive(Clone)]
pub struct PrefetchOptions {
    /// The coordinator's base URL.
    pub url: String,
    /// A `cache` (or publish) token of the product.
    pub token: String,
    /// The product.
    pub product: String,
    /// Only this channel; `None`: every channel.
    pub channel: Option<String>,
    /// How often to look for new releases.
    pub every: Duration,
}

impl std::fmt::Debug for PrefetchOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefetchOptions")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("product", &self.product)
            .field("channel", &self.channel)
            .field("every", &self.every)
            .finish()
    }
}

/// Why a prefetch round stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrefetchError {
    /// The coordinator could not be reached or the answer was cut off.
    #[error("{url}: {source}")]
    Network {
        /// What was asked.
        url: String,
        /// Why.
        source: reqwest::Error,
    },
    /// The coordinator answered with an error.
    #[error("{url}: {status}: {message}")]
    Status {
        /// What was asked.
        url: String,
        /// Its status.
        status: reqwest::StatusCode,
        /// Its message.
        message: String,
    },
    /// An answer was larger than it may be.
    #[error("{url}: the answer is over {limit} bytes")]
    TooLarge {
        /// What was asked.
        url: String,
        /// The bound.
        limit: u64,
    },
    /// An answer did not have the expected shape.
    #[error("{url}: {message}")]
    Body {
        /// What was asked.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// A release's manifest or index did not verify.
    #[error("release {release}: {source}")]
    Manifest {
        /// The coordinator's release id.
        release: i64,
        /// Why.
        source: flotilla_core::manifest::ManifestError,
    },
    /// The store refused a chunk (it does not match its id) or could not write.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(reqwest::Error),
}

/// What one round did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefetchReport {
    /// Releases newly stored whole: (version, chunks in the release, chunks downloaded).
    pub stored: Vec<(String, usize, usize)>,
    /// Object bytes downloaded (release and patch chunks, indexes).
    pub bytes: u64,
}

/// Fetches from one coordinator for one product.
#[derive(Debug, Clone)]
pub struct Prefetcher {
    http: reqwest::Client,
    opts: PrefetchOptions,
}

impl Prefetcher {
    /// A prefetcher for `opts`.
    ///
    /// # Errors
    /// [`PrefetchError::Client`].
    pub fn new(opts: PrefetchOptions) -> Result<Self, PrefetchError> {
        // reqwest's rustls is built without a provider; ring is the process's (the default
        // provider pulls aws-lc for every TLS connection).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("flotilla-mesh/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(PrefetchError::Client)?;
        Ok(Self { http, opts })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.opts.url.trim_end_matches('/'))
    }

    async fn get(&self, url: &str, auth: bool, limit: u64) -> Result<Vec<u8>, PrefetchError> {
        let mut req = self.http.get(url);
        if auth {
            req = req.bearer_auth(&self.opts.token);
        }
        let net = |source| PrefetchError::Network { url: url.to_owned(), source };
        let mut resp = req.send().await.map_err(net)?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| body.chars().take(300).collect());
            return Err(PrefetchError::Status { url: url.to_owned(), status, message });
        }
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(PrefetchError::TooLarge { url: url.to_owned(), limit });
        }
        let mut out = Vec::new();
        while let Some(part) = resp.chunk().await.map_err(net)? {
            if out.len() as u64 + part.len() as u64 > limit {
                return Err(PrefetchError::TooLarge { url: url.to_owned(), limit });
            }
            out.extend_from_slice(&part);
        }
        Ok(out)
    }

    async fn get_json(&self, path: &str) -> Result<serde_json::Value, PrefetchError> {
        let url = self.url(path);
        let bytes = self.get(&url, true, MAX_JSON).await?;
        serde_json::from_slice(&bytes).map_err(|e| PrefetchError::Body { url, message: e.to_string() })
    }

    /// One round: stores every live release of the product not stored yet.
    ///
    /// # Errors
    /// [`PrefetchError`]; what was verified and stored before the error stays.
    pub async fn run_once(&self, store: &Arc<DiskStore>, root: &TrustRoot) -> Result<PrefetchReport, PrefetchError> {
        let mut path = format!("/v1/releases?product={}", self.opts.product);
        if let Some(c) = &self.opts.channel {
            path.push_str(&format!("&channel={c}"));
        }
        let list = self.get_json(&path).await?;
        let Some(releases) = list["releases"].as_array() else {
            return Err(PrefetchError::Body { url: self.url(&path), message: "no releases list".into() });
        };
        let mut report = PrefetchReport::default();
        for r in releases {
            let (Some(id), Some(index_id)) = (r["id"].as_i64(), r["index_id"].as_str()) else {
                return Err(PrefetchError::Body { url: self.url(&path), message: "a release without id".into() });
            };
            // Halted releases are offered to nobody; stored ones are done.
            let stored = index_id.parse::<IndexId>().is_ok_and(|i| store.has_release(&i));
            if r["rollout"]["state"] == "halted" || stored {
                continue;
            }
            self.store_release(id, store, root, &mut report).await?;
        }
        Ok(report)
    }

    async fn store_release(
        &self,
        id: i64,
        store: &Arc<DiskStore>,
        root: &TrustRoot,
        report: &mut PrefetchReport,
    ) -> Result<(), PrefetchError> {
        let detail = self.get_json(&format!("/v1/releases/{id}")).await?;
        let Some(envelope) = detail["manifest"].as_str() else {
            return Err(PrefetchError::Body {
                url: self.url(&format!("/v1/releases/{id}")),
                message: "no manifest".into(),
            });
        };
        let bad = |source| PrefetchError::Manifest { release: id, source };
        // The coordinator is not trusted for content: the manifest must verify on its own.
        let m = flotilla_core::manifest::verify_signed(envelope.as_bytes(), root, Timestamp::now()).map_err(bad)?;
        let man = m.manifest();
        let url = self.url(&format!("/v1/indexes/{}", man.index.id));
        let index_bytes = self.get(&url, false, man.index.size).await?;
        report.bytes += index_bytes.len() as u64;
        let index = m.check_index(&index_bytes).map_err(bad)?;
        let fetched = self.fetch_missing(&index, store, report).await?;
        // Patches travel peer to peer like content: keep their chunks too.
        for d in &man.deltas {
            let url = self.url(&format!("/v1/indexes/{}", d.patch_index.id));
            let bytes = self.get(&url, false, d.patch_index.size).await?;
            report.bytes += bytes.len() as u64;
            if IndexId::of(&bytes) != d.patch_index.id {
                return Err(PrefetchError::Body { url, message: "the patch index does not match its id".into() });
            }
            let patch = ChunkIndex::decode(&bytes)
                .map_err(|e| PrefetchError::Body { url: url.clone(), message: e.to_string() })?;
            self.fetch_missing(&patch, store, report).await?;
        }
        let (s, env, idx) = (store.clone(), envelope.as_bytes().to_vec(), index_bytes);
        let index_id = man.index.id;
        tokio::task::spawn_blocking(move || s.add_release(&index_id, &env, &idx))
            .await
            .map_err(|e| StoreError::Io { path: "release".into(), source: std::io::Error::other(e.to_string()) })??;
        tracing::info!(product = %man.product, version = %man.version, chunks = index.len(), fetched, "prefetched");
        report.stored.push((man.version.to_string(), index.len(), fetched));
        Ok(())
    }

    /// Downloads and stores every distinct chunk of `index` the store lacks; returns how many.
    async fn fetch_missing(
        &self,
        index: &ChunkIndex,
        store: &Arc<DiskStore>,
        report: &mut PrefetchReport,
    ) -> Result<usize, PrefetchError> {
        let mut seen = std::collections::HashSet::new();
        let missing: Vec<(ChunkId, u32)> = index
            .entries()
            .iter()
            .filter(|e| seen.insert(e.id) && !store.contains(&e.id))
            .map(|e| (e.id, e.len))
            .collect();
        let count = missing.len();
        let mut results = futures::stream::iter(missing)
            .map(|(id, len)| async move {
                let url = self.url(&format!("/v1/chunks/{id}"));
                let obj = self.get(&url, false, object::max_object_len(len)).await?;
                let n = obj.len() as u64;
                let s = store.clone();
                // The store checks the object against its id before keeping it.
                tokio::task::spawn_blocking(move || s.insert(&id, len, &obj))
                    .await
                    .map_err(|e| StoreError::Io { path: url.into(), source: std::io::Error::other(e.to_string()) })??;
                Ok::<u64, PrefetchError>(n)
            })
            .buffer_unordered(PARALLEL);
        while let Some(r) = results.next().await {
            report.bytes += r?;
        }
        Ok(count)
    }
}
