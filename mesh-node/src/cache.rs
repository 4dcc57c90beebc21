//! The `flotilla-mesh` site cache: a mesh node of role [`Role::Cache`] serving a
//! [`DiskStore`], filled by `import` of `flotilla export` bundles (USB sticks at offline
//! sites).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::ids::ChunkId;
use flotilla_core::time::Timestamp;
use flotilla_core::trust::TrustRoot;
use libp2p::{Multiaddr, identity};

use crate::node::{Mesh, MeshConfig, MeshError, Role};
use crate::store::{ChunkProvider, DiskStore, ImportReport, StoreError};

/// Why a cache command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The trust root did not verify.
    #[error("trust root {path}: {message}")]
    TrustRoot {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The node key file is not a key.
    #[error("node key {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The mesh.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// Prefetching could not be set up.
    #[error("prefetch: {0}")]
    Prefetch(#[from] crate::prefetch::PrefetchError),
}

/// Reads a trust root the operator provisioned (self-signed, threshold met).
///
/// # Errors
/// [`CacheError::Io`], [`CacheError::TrustRoot`].
pub fn load_trust_root(path: &Path) -> Result<TrustRoot, CacheError> {
    let bytes = std::fs::read(path).map_err(|source| CacheError::Io { path: path.to_path_buf(), source })?;
    TrustRoot::from_trusted_json(&bytes)
        .map_err(|e| CacheError::TrustRoot { path: path.to_path_buf(), message: e.to_string() })
}

/// Loads the node's Ed25519 identity from `path`, creating it (mode 0600) on first start, so a
/// cache keeps the peer id devices are configured with.
///
/// # Errors
/// [`CacheError::Io`], [`CacheError::Key`].
pub fn load_or_create_key(path: &Path) -> Result<identity::Keypair, CacheError> {
    let io = |source| CacheError::Io { path: path.to_path_buf(), source };
    match std::fs::read(path) {
        Ok(bytes) => identity::Keypair::from_protobuf_encoding(&bytes)
            .map_err(|e| CacheError::Key { path: path.to_path_buf(), message: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = identity::Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| CacheError::Key { path: path.to_path_buf(), message: e.to_string() })?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            let tmp = path.with_extension("tmp");
            {
                use std::io::Write as _;
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io)?;
                f.write_all(&bytes).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            std::fs::rename(&tmp, path).map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Imports an export into the store at `store_dir`.
///
/// # Errors
/// [`CacheError`].
pub fn import(store: &DiskStore, export: &Path, root: &TrustRoot) -> Result<ImportReport, CacheError> {
    Ok(store.import_export(export, root, Timestamp::now())?)
}

/// What `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The store directory (also holds `node.key`).
    pub store: PathBuf,
    /// The store's bound in bytes.
    pub max_bytes: u64,
    /// The fleet's trust root.
    pub trust_root: PathBuf,
    /// Listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Peers to keep connected to.
    pub bootstrap: Vec<Multiaddr>,
    /// mDNS discovery.
    pub mdns: bool,
    /// Exports imported before serving.
    pub import: Vec<PathBuf>,
    /// How often the counters are printed.
    pub stats_every: Duration,
    /// Upload budget in bytes per second over all peers; `None`: unlimited.
    pub max_upload_rate: Option<u64>,
    /// How often the releases imported with a rollout directive are offered to the site
    /// (devices that join later hear the next round).
    pub announce_every: Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None`: nowhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Fleet-private network key (TCP only).
    pub psk: Option<crate::PreSharedKey>,
    /// Kademlia discovery (provider records of the stored releases).
    pub kademlia: bool,
    /// Keep the live releases of a product from the coordinator; `None`: imports only.
    pub prefetch: Option<crate::prefetch::PrefetchOptions>,
    /// Test only: serve bad chunks (a malicious peer).
    pub corrupt: Option<Corruption>,
}

/// How a malicious test peer lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Corruption {
    /// Flips one bit of every object it serves.
    Flip,
    /// Serves a well-formed object of the right length with other content (a wrong chunk).
    Wrong,
}

/// The test double of a malicious peer.
struct Corrupting(Arc<DiskStore>, Corruption);

impl ChunkProvider for Corrupting {
    fn index(&self, id: &flotilla_core::ids::IndexId) -> Option<Vec<u8>> {
        self.0.index(id)
    }

    fn have_map(&self, id: &flotilla_core::ids::IndexId) -> Option<Vec<u8>> {
        self.0.have_map(id)
    }

    fn object(&self, id: &ChunkId, len: u32) -> Option<Vec<u8>> {
        let mut obj = self.0.object(id, len)?;
        match self.1 {
            Corruption::Flip => {
                if let Some(last) = obj.last_mut() {
                    *last ^= 0x01;
                }
            }
            Corruption::Wrong => {
                obj = vec![0u8; len as usize + 1];
                obj[0] = flotilla_core::object::FLAG_RAW;
            }
        }
        Some(obj)
    }
}

/// Runs the site cache until `shutdown` resolves. Prints `listening on ADDR` for each
/// address and a `stats …` line every [`ServeOptions::stats_every`] on stdout.
///
/// # Errors
/// [`CacheError`].
pub async fn serve(opts: ServeOptions, shutdown: impl std::future::Future<Output = ()>) -> Result<(), CacheError> {
    let root = load_trust_root(&opts.trust_root)?;
    let store = Arc::new(DiskStore::open(&opts.store, opts.max_bytes)?);
    for export in &opts.import {
        let (store, export, root) = (store.clone(), export.clone(), root.clone());
        let report = tokio::task::spawn_blocking(move || import(&store, &export, &root))
            .await
            .map_err(|e| MeshError::Start(e.to_string()))??;
        tracing::info!(product = %report.product, version = %report.version, chunks = report.chunks, added = report.added, "imported");
    }
    let key = load_or_create_key(&opts.store.join("node.key"))?;
    let mut config = MeshConfig::new(Role::Cache);
    config.listen = opts.listen.clone();
    config.bootstrap = opts.bootstrap.clone();
    config.mdns = opts.mdns;
    config.trust_root = Some(root.clone());
    config.keypair = Some(key);
    config.max_upload_rate = opts.max_upload_rate;
    config.psk = opts.psk;
    config.kademlia = opts.kademlia;
    let provider: Arc<dyn ChunkProvider> = match opts.corrupt {
        Some(how) => Arc::new(Corrupting(store.clone(), how)),
        None => store.clone(),
    };
    let mesh = Mesh::start(config, provider).await?;
    for addr in mesh.listen_addrs().await? {
        println!("listening on {addr}");
    }
    if let Some(addr) = opts.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| MeshError::Start(format!("metrics listener {addr}: {e}")))?;
        println!("metrics on http://{}/metrics", listener.local_addr().map_or(addr, |a| a));
        tokio::spawn(serve_metrics(listener, mesh.clone(), store.clone()));
    }
    if let Some(p) = opts.prefetch.clone() {
        let prefetcher = crate::prefetch::Prefetcher::new(p.clone())?;
        let (store, root) = (store.clone(), root.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(p.every);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                match prefetcher.run_once(&store, &root).await {
                    Ok(r) => {
                        for (version, chunks, fetched) in &r.stored {
                            println!("prefetched {} {version}: {chunks} chunks, {fetched} downloaded", p.product);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "prefetch failed; retrying next round"),
                }
            }
        });
    }
    let mut every = tokio::time::interval(opts.stats_every);
    let mut announce = tokio::time::interval(opts.announce_every);
    announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut offered = 0u64;
    let mut provided = std::collections::HashSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = announce.tick() => {
                // Re-read each round: `flotilla-mesh import` may add releases while serving.
                let s = store.clone();
                let ids = tokio::task::spawn_blocking(move || s.release_ids()).await.unwrap_or_default();
                for id in ids {
                    if provided.insert(id) {
                        mesh.provide(id).await?;
                    }
                }
                let (s, r) = (store.clone(), root.clone());
                let offers = tokio::task::spawn_blocking(move || s.offers(&r, Timestamp::now())).await.unwrap_or_default();
                for offer in offers {
                    // No subscribed peer yet is normal: the next round tries again.
                    if mesh.announce_offer(offer).await.is_ok() {
                        offered += 1;
                    }
                }
            }
            _ = every.tick() => {
                let s = mesh.stats().await?;
                let st = store.stats();
                println!(
                    "stats peers={} served_chunks={} served_requests={} served_bytes={} busy={} bans={} bad_chunks={} store_chunks={} store_bytes={} offers_sent={offered}",
                    s.peers, s.served_chunks, s.served_requests, s.served_bytes, s.busy, s.bans, s.bad_chunks, st.chunks, st.bytes
                );
            }
        }
    }
    Ok(())
}

/// Longest metrics request read (a `GET` line and a few headers).
const MAX_METRICS_REQUEST: usize = 4096;

/// Answers every connection with the counters in Prometheus text format, whatever it asked.
async fn serve_metrics(listener: tokio::net::TcpListener, mesh: Mesh, store: Arc<DiskStore>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let (mesh, store) = (mesh.clone(), store.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_METRICS_REQUEST];
            // One read is enough for a scrape's request; the answer does not depend on it.
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
            let Ok(s) = mesh.stats().await else { return };
            let st = store.stats();
            let body = format!(
                "# TYPE flotilla_mesh_peers gauge\nflotilla_mesh_peers {}\n\
                 # TYPE flotilla_mesh_served_chunks_total counter\nflotilla_mesh_served_chunks_total {}\n\
                 # TYPE flotilla_mesh_served_requests_total counter\nflotilla_mesh_served_requests_total {}\n\
                 # TYPE flotilla_mesh_served_bytes_total counter\nflotilla_mesh_served_bytes_total {}\n\
                 # TYPE flotilla_mesh_busy_total counter\nflotilla_mesh_busy_total {}\n\
                 # TYPE flotilla_mesh_bad_chunks_total counter\nflotilla_mesh_bad_chunks_total {}\n\
                 # TYPE flotilla_mesh_bans_total counter\nflotilla_mesh_bans_total {}\n\
                 # TYPE flotilla_mesh_store_chunks gauge\nflotilla_mesh_store_chunks {}\n\
                 # TYPE flotilla_mesh_store_bytes gauge\nflotilla_mesh_store_bytes {}\n\
                 # TYPE flotilla_mesh_store_max_bytes gauge\nflotilla_mesh_store_max_bytes {}\n",
                s.peers,
                s.served_chunks,
                s.served_requests,
                s.served_bytes,
                s.busy,
                s.bad_chunks,
                s.bans,
                st.chunks,
                st.bytes,
                st.max_bytes
            );
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
