//! Peer-first chunk fetching: ask the mesh, then the CDN.
//!
//! With `[mesh] enabled = true` the agent runs a `flotilla-mesh` node (role agent) for as
//! long as it lives. For each missing chunk the install asks connected peers first (the mesh
//! verifies what they send and bans a peer that sends a bad chunk). When no peer has the
//! chunk, the interested agents agree by rendezvous hashing on one of them to fetch it from
//! the CDN; the others keep asking peers until [`MeshSettings::deadline`] passes and only then
//! go to the CDN themselves, so a site pulls each chunk from the origin about once.
//!
//! The node serves the chunks of this device's slots straight from the slot files through
//! the indexes of verified releases: the active slot's release, and the release being
//! installed, whose chunks are served as soon as they are written. A chunk is hashed in place
//! before it is served, so a chunk not yet written (or damaged) is never sent, unless this
//! agent wrote it there verified itself. The one second copy is in memory and bounded
//! ([`MeshSettings::serve_cache`]): chunks that arrived compressed, kept as they came once
//! they were verified, and served as they are.

use std::collections::HashMap;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_core::ids::{ChunkId, IndexId};
use flotilla_core::index::ChunkIndex;
use flotilla_core::object;
use flotilla_core::trust::TrustRoot;
use flotilla_mesh::{ChunkProvider, Mesh, MeshConfig, MeshError, Multiaddr, Role};
use serde::Deserialize;
use tokio::sync::OnceCell;

use crate::client::{ClientError, Coordinator};
use crate::slot::{SlotName, Slots};

/// Between two rounds of asking peers for a chunk that another agent fetches from the CDN.
const PEER_RETRY: Duration = Duration::from_millis(200);
/// Longest wait at start for the bootstrap peers (or, with mDNS, a first peer) to connect;
/// also bounded by the deadline.
const CONNECT_WAIT: Duration = Duration::from_secs(3);
/// An install takes no chunk from the origin in its first moments, even the chunks it is
/// the rendezvous fetcher for: agents of a site start a release within a moment of each
/// other, and one that decided alone would fetch chunks that a peer starting a little later
/// also wins. Bounded by the deadline.
const ORIGIN_DELAY: Duration = Duration::from_secs(2);
/// zstd level of the chunks served to peers, compressed as they are read from a slot: the
/// fastest level, since a peer waits; it takes a third off the fleet bench's image on the
/// site's links (CPU unchanged within that bench's spread), and more off real images.
const SERVE_LEVEL: i32 = 1;
/// Chunks remembered as incompressible at most (about 40 bytes each); past it the set starts
/// again (it only spares compression attempts).
const MAX_INCOMPRESSIBLE: usize = 1 << 18;
/// Default of [`MeshSettings::serve_cache`].
const DEFAULT_SERVE_CACHE: usize = 16 << 20;
/// Largest [`MeshSettings::serve_cache`] the config takes.
pub const MAX_SERVE_CACHE: usize = 1 << 30;
/// How long the list of a site's agents is reused before the mesh is asked again.
const AGENTS_FRESH: Duration = Duration::from_secs(1);
/// With mDNS, discovery is taken as complete when no new peer appeared for this long.
const SETTLE: Duration = Duration::from_millis(500);

/// The `[mesh]` section of the agent config. Absent: the mesh is off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSettings {
    /// Fetch from and serve to peers (default false).
    #[serde(default)]
    pub enabled: bool,
    /// Listen addresses (default: every IPv4 address on any TCP port, and on any UDP port
    /// for QUIC unless `psk_file` is set).
    #[serde(default)]
    pub listen: Vec<String>,
    /// Peers to connect to at start and stay connected to (site caches), each ending in
    /// `/p2p/<peer id>`.
    #[serde(default)]
    pub bootstrap: Vec<String>,
    /// Discover peers on the local network with mDNS (default true).
    #[serde(default = "yes")]
    pub mdns: bool,
    /// How long to wait for peers to get a chunk nobody has yet before fetching it from the
    /// CDN (default 30 s). Also bounds the wait for bootstrap peers at start.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// Upload budget to peers in bytes per second (default: unlimited).
    #[serde(default)]
    pub max_upload_rate: Option<u64>,
    /// Find peers of a release beyond the local network with Kademlia (default true).
    #[serde(default = "yes")]
    pub kademlia: bool,
    /// Fleet-private network: a go-ipfs style `swarm.key` file; only peers holding the same
    /// key connect (TCP only: QUIC addresses are refused with a key).
    #[serde(default)]
    pub psk_file: Option<PathBuf>,
    /// Bytes of compressed chunks kept in memory as they arrived, to serve them to peers
    /// without compressing them again (default 16 MiB; 0 turns it off). Peers mostly ask for
    /// what arrived last, so a few MiB cover most requests.
    #[serde(default = "default_serve_cache")]
    pub serve_cache: usize,
}

impl Default for MeshSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: true,
            deadline: default_deadline(),
            max_upload_rate: None,
            kademlia: true,
            psk_file: None,
            serve_cache: DEFAULT_SERVE_CACHE,
        }
    }
}
fn default_serve_cache() -> usize {
    DEFAULT_SERVE_CACHE
}
fn yes() -> bool {
    true
}
fn default_deadline() -> Duration {
    Duration::from_secs(30)
}

impl MeshSettings {
    /// Checks the addresses; returns (listen, bootstrap).
    ///
    /// # Errors
    /// The field and address that does not parse.
    pub fn addresses(&self) -> Result<(Vec<Multiaddr>, Vec<Multiaddr>), (&'static str, String)> {
        let parse = |field: &'static str, list: &[String]| {
            list.iter()
                .map(|a| a.parse::<Multiaddr>().map_err(|e| (field, format!("{a:?}: {e}"))))
                .collect::<Result<Vec<_>, _>>()
        };
        let mut listen = parse("mesh.listen", &self.listen)?;
        if listen.is_empty() {
            listen = flotilla_mesh::default_listen(0, self.psk_file.is_none());
        }
        let bootstrap = parse("mesh.bootstrap", &self.bootstrap)?;
        if let Some(a) = bootstrap.iter().find(|a| !a.iter().any(|p| matches!(p, flotilla_mesh::Protocol::P2p(_)))) {
            return Err(("mesh.bootstrap", format!("{a} does not end in /p2p/<peer id>")));
        }
        if self.psk_file.is_some() {
            for (field, list) in [("mesh.listen", &listen), ("mesh.bootstrap", &bootstrap)] {
                if let Some(a) = list.iter().find(|a| flotilla_mesh::is_quic(a)) {
                    return Err((field, format!("{a}: a private network (psk_file) runs over TCP only")));
                }
            }
        }
        Ok((listen, bootstrap))
    }
}

/// What the agent's node serves: chunks of its slots, through verified releases' indexes.
#[derive(Debug, Default)]
pub struct SlotChunks {
    /// Compressed objects as they arrived, verified, served again as they are. A std Mutex
    /// like the others: held to look up, insert or copy one object, never across I/O.
    recent: Mutex<RecentObjects>,
    // A std Mutex: held only to look up or replace the maps, never across I/O.
    slots: Mutex<Vec<(PathBuf, Arc<Placements>)>>,
    /// The releases served: encoded index (peers of offline sites fetch it) and have-map,
    /// kept up to date as chunks arrive rather than rebuilt for every peer's request.
    indexes: Mutex<HashMap<IndexId, ServedIndex>>,
    /// Chunks fetched and written for the install in progress (advertised in have-maps; a chunk reused
    /// from the active slot is not, which only means peers ask someone else for it).
    held: Mutex<std::collections::HashSet<ChunkId>>,
    /// Chunks written (verified) by an install to the file they are served from: not hashed
    /// again to serve them. A file served anew (a new install's target) loses its entries.
    written: Mutex<HashMap<ChunkId, PathBuf>>,
    /// Chunks that arrived raw (their sender found compression did not pay): served raw, not
    /// compressed again in vain for every peer.
    incompressible: Mutex<std::collections::HashSet<ChunkId>>,
}

/// Compressed objects as they arrived from a peer or the CDN, kept (up to a budget of bytes,
/// oldest out first) to serve peers without compressing the chunk again. Only an object that
/// was verified gets in (it decoded to its chunk: the mesh checks what peers send, the
/// install what the CDN sends), so the same bytes are a valid answer.
#[derive(Debug, Default)]
struct RecentObjects {
    budget: usize,
    bytes: usize,
    objects: HashMap<ChunkId, Vec<u8>>,
    order: std::collections::VecDeque<ChunkId>,
}

impl RecentObjects {
    fn keep(&mut self, id: &ChunkId, object: &[u8]) {
        if object.len() > self.budget {
            return;
        }
        if let Some(old) = self.objects.insert(*id, object.to_vec()) {
            self.bytes -= old.len();
        } else {
            self.order.push_back(*id);
        }
        self.bytes += object.len();
        while self.bytes > self.budget {
            let Some(oldest) = self.order.pop_front() else { break };
            if let Some(old) = self.objects.remove(&oldest) {
                self.bytes -= old.len();
            }
        }
    }

    fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.objects.get(id).cloned()
    }
}

/// Where each chunk of a slot's image is: id → (offset, length).
type Placements = HashMap<ChunkId, (u64, u32)>;

/// A release served: its encoded index, its have-map, and each chunk's bits in that map.
#[derive(Debug)]
struct ServedIndex {
    encoded: Arc<Vec<u8>>,
    have_map: Vec<u8>,
    /// Chunk → the index entries holding it (a chunk may repeat in an image).
    entries: HashMap<ChunkId, Vec<u32>>,
}

impl ServedIndex {
    fn new(index: &ChunkIndex, encoded: Vec<u8>, held: &std::collections::HashSet<ChunkId>) -> Self {
        let mut entries: HashMap<ChunkId, Vec<u32>> = HashMap::with_capacity(index.len());
        for (i, e) in index.entries().iter().enumerate() {
            entries.entry(e.id).or_default().push(u32::try_from(i).unwrap_or(u32::MAX));
        }
        let mut served =
            Self { encoded: Arc::new(encoded), have_map: vec![0u8; index.len().div_ceil(8).max(1)], entries };
        for id in held {
            served.set(id);
        }
        served
    }

    fn set(&mut self, id: &ChunkId) {
        for &i in self.entries.get(id).map(Vec::as_slice).unwrap_or_default() {
            let i = i as usize;
            if let Some(byte) = self.have_map.get_mut(i / 8) {
                *byte |= 1 << (i % 8);
            }
        }
    }

    fn set_all(&mut self) {
        let n = self.entries.values().map(Vec::len).sum::<usize>();
        self.have_map.fill(0);
        for i in 0..n {
            self.have_map[i / 8] |= 1 << (i % 8);
        }
    }
}

impl SlotChunks {
    /// Serves nothing yet; keeps up to `serve_cache` bytes of compressed objects as they
    /// arrived (see [`MeshSettings::serve_cache`]).
    pub fn new(serve_cache: usize) -> Self {
        let recent = RecentObjects { budget: serve_cache, ..RecentObjects::default() };
        Self { recent: Mutex::new(recent), ..Self::default() }
    }

    /// Serves `index`'s chunks from the image file `path` (replacing what was served from it).
    pub fn serve(&self, path: PathBuf, index: &ChunkIndex) {
        let mut map = HashMap::new();
        for (offset, e) in index.iter_with_offsets() {
            map.entry(e.id).or_insert((offset, e.len));
        }
        self.written.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, p| *p != path);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|(p, _)| *p != path);
        slots.push((path, Arc::new(map)));
        drop(slots);
        let encoded = index.encode();
        let id = IndexId::of(&encoded);
        let mut indexes = self.indexes.lock().unwrap_or_else(|e| e.into_inner());
        if indexes.contains_key(&id) {
            return;
        }
        // A handful of releases at most (two slots, an install); the oldest go first.
        if indexes.len() >= 4 {
            indexes.clear();
        }
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        indexes.insert(id, ServedIndex::new(index, encoded, &held));
    }

    /// Every chunk of release `id` is held (the installed release).
    fn mark_complete(&self, id: &IndexId) {
        if let Some(s) = self.indexes.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
            s.set_all();
        }
    }

    /// Keeps `object`, verified to decode to chunk `id`, to serve it as it is, when it is
    /// compressed.
    fn keep_verified(&self, id: &ChunkId, object: &[u8]) {
        if object.first() == Some(&object::FLAG_ZSTD) {
            self.recent.lock().unwrap_or_else(|e| e.into_inner()).keep(id, object);
        }
    }

    /// Notes how `object` (chunk `id` as it arrived, not verified yet) was encoded.
    fn note_encoding(&self, id: &ChunkId, object: &[u8]) {
        if object.first() == Some(&object::FLAG_RAW) {
            let mut set = self.incompressible.lock().unwrap_or_else(|e| e.into_inner());
            if set.len() >= MAX_INCOMPRESSIBLE {
                set.clear();
            }
            set.insert(*id);
        }
    }

    /// `id` was written to `path` and verified.
    fn mark_written(&self, id: &ChunkId, path: &Path) {
        self.written.lock().unwrap_or_else(|e| e.into_inner()).insert(*id, path.to_path_buf());
        self.mark_held(id);
    }

    fn mark_held(&self, id: &ChunkId) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(*id);
        for s in self.indexes.lock().unwrap_or_else(|e| e.into_inner()).values_mut() {
            s.set(id);
        }
    }
}

impl ChunkProvider for SlotChunks {
    fn index(&self, id: &IndexId) -> Option<Vec<u8>> {
        self.indexes.lock().unwrap_or_else(|e| e.into_inner()).get(id).map(|s| s.encoded.to_vec())
    }

    fn have_map(&self, id: &IndexId) -> Option<Vec<u8>> {
        self.indexes.lock().unwrap_or_else(|e| e.into_inner()).get(id).map(|s| s.have_map.clone())
    }

    fn object(&self, id: &ChunkId, len: u32) -> Option<Vec<u8>> {
        if let Some(object) = self.recent.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Some(object);
        }
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for (path, map) in slots {
            let Some(&(offset, l)) = map.get(id).filter(|(_, l)| *l == len) else { continue };
            let Ok(f) = std::fs::File::open(&path) else { continue };
            let mut obj = vec![0u8; l as usize + 1];
            obj[0] = object::FLAG_RAW;
            // Hashed in place, unless this agent wrote it there verified: a chunk not written
            // yet, or damaged, is not served.
            let written = self.written.lock().unwrap_or_else(|e| e.into_inner()).get(id) == Some(&path);
            if f.read_exact_at(&mut obj[1..], offset).is_ok() && (written || ChunkId::of(&obj[1..]) == *id) {
                if self.incompressible.lock().unwrap_or_else(|e| e.into_inner()).contains(id) {
                    return Some(obj);
                }
                return Some(object::shrink(obj, SERVE_LEVEL));
            }
        }
        None
    }
}

/// The running mesh of an agent, started on first use.
#[derive(Debug)]
pub struct MeshSlot {
    settings: MeshSettings,
    key_path: PathBuf,
    // A std Mutex: read once when the node starts, set before that; never held across I/O.
    trust_root: Mutex<Option<TrustRoot>>,
    node: OnceCell<Option<(Mesh, Arc<SlotChunks>)>>,
}

impl MeshSlot {
    /// A mesh to start on first use with `settings`; the node's identity is kept in
    /// `key_path`.
    pub fn new(settings: MeshSettings, key_path: PathBuf) -> Self {
        Self { settings, key_path, trust_root: Mutex::new(None), node: OnceCell::new() }
    }

    /// Verifies offers and announcements heard on the mesh against `root` (without one they
    /// are ignored, and an offline site cannot reach this device). Takes effect when the node
    /// starts.
    pub(crate) fn set_trust_root(&self, root: TrustRoot) {
        *self.trust_root.lock().unwrap_or_else(|e| e.into_inner()) = Some(root);
    }

    /// The running node (started on first use), when the mesh is enabled.
    pub(crate) async fn mesh(&self) -> Option<Mesh> {
        self.node().await.map(|(m, _)| m.clone())
    }

    /// The chunk source of an install offered on the mesh (offline sites): peers first and,
    /// past the deadline, `cdn` when one is configured; without one, peers only.
    pub(crate) async fn offline_source(&self, cdn: Option<Coordinator>) -> Option<crate::install::ChunkSource> {
        let (mesh, provider) = self.node().await?;
        let (cdn, origin) = match cdn {
            Some(c) => (c, Origin::Cdn),
            // Never contacted: with `Origin::PeersOnly` every chunk comes from peers.
            None => (Coordinator::new("http://127.0.0.1:1").ok()?, Origin::PeersOnly),
        };
        Some(crate::install::ChunkSource::Peer(PeerFirst {
            mesh: mesh.clone(),
            provider: provider.clone(),
            cdn,
            origin,
            deadline: self.settings.deadline,
            started: Instant::now(),
            sources: Arc::default(),
            agents: Arc::default(),
        }))
    }

    async fn node(&self) -> Option<&(Mesh, Arc<SlotChunks>)> {
        if !self.settings.enabled {
            return None;
        }
        self.node
            .get_or_init(|| async {
                match self.start().await {
                    Ok(n) => Some(n),
                    Err(e) => {
                        tracing::warn!(error = %e, "mesh not started; fetching from the CDN only");
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    async fn start(&self) -> Result<(Mesh, Arc<SlotChunks>), String> {
        let (listen, bootstrap) = self.settings.addresses().map_err(|(f, m)| format!("{f}: {m}"))?;
        let mut config = MeshConfig::new(Role::Agent);
        config.listen = listen;
        config.bootstrap = bootstrap;
        config.mdns = self.settings.mdns;
        config.max_upload_rate = self.settings.max_upload_rate;
        config.kademlia = self.settings.kademlia;
        config.psk =
            self.settings.psk_file.as_deref().map(flotilla_mesh::load_psk).transpose().map_err(|e| e.to_string())?;
        config.trust_root = self.trust_root.lock().unwrap_or_else(|e| e.into_inner()).clone();
        config.keypair = Some(flotilla_mesh::cache::load_or_create_key(&self.key_path).map_err(|e| e.to_string())?);
        let provider = Arc::new(SlotChunks::new(self.settings.serve_cache));
        let mesh = Mesh::start(config, provider.clone()).await.map_err(|e| e.to_string())?;
        // Origin rendezvous needs the site's agents to see the same peers: give bootstrap
        // peers and mDNS a moment to connect before the first chunk is asked for.
        let identified = |p: &[flotilla_mesh::PeerInfo]| p.iter().filter(|p| p.role.is_some()).count();
        let limit = CONNECT_WAIT.min(self.settings.deadline);
        let want = self.settings.bootstrap.len().max(usize::from(self.settings.mdns));
        let mut seen = identified(&mesh.wait_for_peers(want, limit).await.map_err(|e| e.to_string())?);
        if self.settings.mdns && seen > 0 {
            // Discovery answers arrive together; wait until the count stops growing.
            loop {
                let now = identified(&mesh.wait_for_peers(seen + 1, SETTLE).await.map_err(|e| e.to_string())?);
                if now <= seen {
                    break;
                }
                seen = now;
            }
        }
        tracing::info!(peer_id = %mesh.peer_id(), peers = seen, "mesh started");
        Ok((mesh, provider))
    }

    /// Starts the node (when enabled) and serves the installed release from the active slot:
    /// a daemon serves its peers even while it has nothing to install itself.
    pub async fn serve_installed(&self, slots: &Slots, active: SlotName, index: Option<&ChunkIndex>) {
        if let (Some((mesh, provider)), Some(index)) = (self.node().await, index) {
            provider.serve(slots.image_path(active), index);
            provider.mark_complete(&index.id());
            if let Err(e) = mesh.provide(index.id()).await {
                tracing::debug!(error = %e, "mesh stopped; the installed release is not provided");
            }
        }
    }

    /// The chunk source for an install: peers first when the mesh runs, else `cdn` alone.
    pub async fn source(&self, cdn: Coordinator) -> crate::install::ChunkSource {
        match self.node().await {
            Some((mesh, provider)) => crate::install::ChunkSource::Peer(PeerFirst {
                mesh: mesh.clone(),
                provider: provider.clone(),
                cdn,
                origin: Origin::Cdn,
                deadline: self.settings.deadline,
                started: Instant::now(),
                sources: Arc::default(),
                agents: Arc::default(),
            }),
            None => crate::install::ChunkSource::Coordinator(cdn),
        }
    }
}

/// Whether a chunk no peer delivers comes from the CDN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Past the deadline (or as the site's rendezvous fetcher), from the CDN.
    Cdn,
    /// Never: a device with no coordinator configured waits for peers up to the deadline.
    PeersOnly,
}

/// Peers first, then the CDN; see the module docs.
#[derive(Debug, Clone)]
pub struct PeerFirst {
    mesh: Mesh,
    provider: Arc<SlotChunks>,
    cdn: Coordinator,
    origin: Origin,
    deadline: Duration,
    /// When the install began.
    started: Instant,
    /// Where each chunk fetched came from, until the install reads it.
    sources: Arc<Mutex<HashMap<ChunkId, &'static str>>>,
    /// The site's agents as last asked of the mesh, and when: every chunk waiting for a
    /// peer asks whether it is this agent's to fetch, several times a second.
    agents: Arc<Mutex<Option<(Instant, Arc<Vec<flotilla_mesh::PeerId>>)>>>,
}

impl PeerFirst {
    /// Serves the chunks of `slot` (an install target or the active slot) through `index`.
    pub fn serve(&self, slots: &Slots, slot: SlotName, index: &ChunkIndex) {
        self.provider.serve(slots.image_path(slot), index);
    }

    /// Serves the chunks of a patch file through its index, as they arrive.
    pub fn serve_file(&self, path: PathBuf, index: &ChunkIndex) {
        self.provider.serve(path, index);
    }

    /// The coordinator this source falls back to.
    pub(crate) fn cdn(&self) -> &Coordinator {
        &self.cdn
    }

    /// The object of `id`: from a peer (verified by the mesh), else from the CDN.
    ///
    /// # Errors
    /// The CDN's [`ClientError`].
    pub(crate) async fn fetch(&self, id: &ChunkId, len: u32) -> Result<crate::install::Got, ClientError> {
        let started = Instant::now();
        loop {
            match self.mesh.fetch(*id, len).await {
                Ok(f) => {
                    self.provider.note_encoding(id, &f.object);
                    // The mesh decoded it to the chunk before handing it over.
                    self.provider.keep_verified(id, &f.object);
                    self.record(id, "peer");
                    return Ok(crate::install::Got::Verified(f.data));
                }
                Err(MeshError::NotFound { .. }) => {}
                Err(e) if self.origin == Origin::PeersOnly => {
                    return Err(ClientError::Status {
                        url: format!("mesh:/chunks/{id}"),
                        status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
                        body: e.to_string(),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "mesh unavailable; using the CDN");
                    break;
                }
            }
            let settled = self.started.elapsed() >= ORIGIN_DELAY.min(self.deadline);
            if self.origin == Origin::PeersOnly && started.elapsed() >= self.deadline {
                // Transient: the install resumes when the offer is heard again.
                return Err(ClientError::Status {
                    url: format!("mesh:/chunks/{id}"),
                    status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
                    body: "no peer delivered the chunk within the deadline, and no CDN is configured".into(),
                });
            }
            if self.origin == Origin::Cdn
                && (started.elapsed() >= self.deadline || (settled && self.is_origin_fetcher(id).await))
            {
                break;
            }
            tokio::time::sleep(PEER_RETRY.min(self.deadline.saturating_sub(started.elapsed()))).await;
        }
        self.record(id, "cdn");
        let obj = self.cdn.get_bounded(&format!("/v1/chunks/{id}"), object::max_object_len(len)).await?;
        // Unverified yet, but only a hint: a raw object is one the publisher could not shrink.
        self.provider.note_encoding(id, &obj);
        Ok(crate::install::Got::Object(obj))
    }

    /// Whether this agent is the one of its site to fetch `id` from the origin.
    async fn is_origin_fetcher(&self, id: &ChunkId) -> bool {
        let cached = self.agents.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let agents = match cached {
            Some((at, agents)) if at.elapsed() < AGENTS_FRESH => agents,
            _ => {
                let Some(agents) = self.site_agents().await else { return true };
                let agents = Arc::new(agents);
                *self.agents.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), agents.clone()));
                agents
            }
        };
        flotilla_mesh::fetcher_for(id, agents.iter()) == Some(self.mesh.peer_id())
    }

    /// The agents the site's origin rendezvous runs over: the connected agents and this one
    /// (`None` when the mesh stopped).
    async fn site_agents(&self) -> Option<Vec<flotilla_mesh::PeerId>> {
        let peers = self.mesh.peers().await.ok()?;
        let agents = peers.iter().filter(|p| p.role == Some(Role::Agent)).map(|p| p.id);
        Some(agents.chain([self.mesh.peer_id()]).collect())
    }

    /// Puts first the chunks this agent is its site's origin fetcher for (rendezvous over the
    /// agents connected now) and returns how many there are; the site's agents then pull
    /// distinct chunks from the origin at once and fill its link from the start. Both parts
    /// keep index order within each fetcher's share but interleave the shares: each agent
    /// fetches its share in index order at about the same rate, so a chunk's rank in its
    /// fetcher's share is about when peers have it, and the rest is asked for in that order.
    /// With no other agent (or no origin to fetch from) nothing is put first.
    pub(crate) async fn origin_first(&self, order: &mut Vec<ChunkId>) -> usize {
        if self.origin == Origin::PeersOnly {
            return 0;
        }
        let me = self.mesh.peer_id();
        let Some(agents) = self.site_agents().await else { return 0 };
        if agents.len() <= 1 {
            return order.len();
        }
        // One rendezvous per chunk, then the rank of each chunk in its fetcher's share.
        let mut ranks: HashMap<flotilla_mesh::PeerId, usize> = HashMap::new();
        let mut keyed: Vec<(bool, usize, ChunkId)> = order
            .iter()
            .map(|id| {
                let fetcher = flotilla_mesh::fetcher_for(id, &agents).unwrap_or(me);
                let rank = ranks.entry(fetcher).or_default();
                *rank += 1;
                (fetcher != me, *rank, *id)
            })
            .collect();
        keyed.sort_by_key(|&(theirs, rank, _)| (theirs, rank));
        let own = keyed.iter().take_while(|(theirs, _, _)| !theirs).count();
        *order = keyed.into_iter().map(|(_, _, id)| id).collect();
        own
    }

    /// Tells the mesh which release this install fetches: peers' have-maps then steer each
    /// request (see [`Mesh::track`]).
    pub(crate) async fn track(&self, index: &ChunkIndex) {
        if let Err(e) = self.mesh.track(Some(index)).await {
            tracing::debug!(error = %e, "mesh stopped; not tracking the release");
        }
    }

    /// Logs the mesh's counters (at the end of an install).
    pub(crate) async fn log_stats(&self) {
        if let Ok(s) = self.mesh.stats().await {
            tracing::info!(
                fetched_chunks = s.fetched_chunks,
                requests = s.requests,
                pipe_requests = s.pipe_requests,
                have_requests = s.have_requests,
                served_chunks = s.served_chunks,
                served_requests = s.served_requests,
                busy = s.busy,
                bad_chunks = s.bad_chunks,
                peers = s.peers,
                "mesh counters"
            );
        }
    }

    fn record(&self, id: &ChunkId, source: &'static str) {
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).insert(*id, source);
    }

    /// `id` was written to `path`, verified: it shows in have-maps from now on (not when it
    /// arrived, or peers would ask for a chunk not yet on disk and be told "not found"), and
    /// is served from `path` without hashing it again. Returns where it came from (`peer` or
    /// `cdn`).
    pub(crate) fn written(&self, id: &ChunkId, path: &Path) -> &'static str {
        self.provider.mark_written(id, path);
        self.sources.lock().unwrap_or_else(|e| e.into_inner()).remove(id).unwrap_or("cdn")
    }

    /// `object`, from the CDN, decoded to chunk `id`: peers may be served it as it is.
    pub(crate) fn verified_object(&self, id: &ChunkId, object: &[u8]) {
        self.provider.keep_verified(id, object);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_check_addresses() {
        let s: MeshSettings = toml::from_str(
            "enabled = true\nbootstrap = [\"/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWRrxVnnhY4QnXuqXbqm2bnVRs6ijTbKvZVfn3bRiBYHhr\"]\ndeadline = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(s.deadline, Duration::from_secs(5));
        assert!(s.mdns);
        assert!(s.kademlia);
        let (listen, boot) = s.addresses().unwrap();
        // By default: TCP and QUIC on any port.
        assert_eq!(
            listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]
        );
        assert_eq!(boot.len(), 1);
        let bad = MeshSettings { bootstrap: vec!["/ip4/10.0.0.2/tcp/4001".into()], ..MeshSettings::default() };
        assert_eq!(bad.addresses().unwrap_err().0, "mesh.bootstrap");

        // A private network: TCP only by default, and a QUIC address is refused by name.
        let private = MeshSettings { psk_file: Some("/etc/flotilla/swarm.key".into()), ..MeshSettings::default() };
        let (listen, _) = private.addresses().unwrap();
        assert_eq!(listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["/ip4/0.0.0.0/tcp/0"]);
        let quic = MeshSettings { listen: vec!["/ip4/0.0.0.0/udp/4001/quic-v1".into()], ..private.clone() };
        let (field, why) = quic.addresses().unwrap_err();
        assert_eq!(field, "mesh.listen");
        assert!(why.contains("TCP only"), "{why}");
    }

    #[test]
    fn slot_chunks_serve_only_what_hashes_right() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        // Text first (served compressed), then noise (served raw).
        let data: Vec<u8> = (0..300_000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i < 60_000 { b"flotilla "[i % 9] } else { (x >> 29) as u8 }
            })
            .collect();
        let index = flotilla_core::chunking::Chunker::new(flotilla_core::chunking::ChunkParams::BUNDLE)
            .chunk_reader(&data[..])
            .unwrap()
            .index;
        let path = dir.path().join("slot.img");
        // Half written: the first half holds data, the rest zeros.
        let mut partial = data.clone();
        partial[150_000..].fill(0);
        std::fs::write(&path, &partial).unwrap();
        let p = SlotChunks::default();
        p.serve(path.clone(), &index);
        let (mut served, mut refused, mut compressed) = (0, 0, 0);
        for (offset, e) in index.iter_with_offsets() {
            match p.object(&e.id, e.len) {
                Some(obj) => {
                    assert_eq!(object::decode(&obj, &e.id, e.len).unwrap(), data[offset as usize..][..e.len as usize]);
                    served += 1;
                    if obj[0] == object::FLAG_ZSTD {
                        assert!(obj.len() < e.len as usize / 4, "{} bytes for {}", obj.len(), e.len);
                        compressed += 1;
                    }
                }
                None => refused += 1,
            }
        }
        assert!(served > 0 && refused > 0, "served {served}, refused {refused}");
        assert!(compressed > 0 && compressed < served, "{compressed} of {served} served compressed");
        // A chunk that arrived raw is served raw: its sender found compression did not pay.
        let (offset, text) = index.iter_with_offsets().next().unwrap();
        assert_eq!(p.object(&text.id, text.len).unwrap()[0], object::FLAG_ZSTD);
        let raw = [&[object::FLAG_RAW][..], &data[offset as usize..][..text.len as usize]].concat();
        p.note_encoding(&text.id, &raw);
        assert_eq!(p.object(&text.id, text.len), Some(raw));
        assert_eq!(p.object(&ChunkId::of(b"unknown"), 7), None);

        // The have-map follows what arrives: nothing, one chunk (every entry of it), all.
        let id = index.id();
        let n = index.len();
        let bits = |m: &[u8]| (0..n).filter(|i| m[i / 8] & (1 << (i % 8)) != 0).collect::<Vec<_>>();
        assert_eq!(bits(&p.have_map(&id).unwrap()), Vec::<usize>::new());
        let second = index.entries()[1].id;
        p.mark_held(&second);
        let want: Vec<usize> = (0..n).filter(|&i| index.entries()[i].id == second).collect();
        assert_eq!(bits(&p.have_map(&id).unwrap()), want);
        p.mark_complete(&id);
        assert_eq!(bits(&p.have_map(&id).unwrap()), (0..n).collect::<Vec<_>>());
        assert_eq!(p.have_map(&IndexId::of(b"other")), None);
        assert_eq!(p.index(&id), Some(index.encode()));

        // A chunk this agent wrote there is served without hashing it again (here a chunk
        // marked written whose bytes are still zeros, to show it), until the file is served
        // anew, for another install.
        let (offset, last) = index.iter_with_offsets().last().unwrap();
        assert!(offset >= 150_000);
        assert_eq!(p.object(&last.id, last.len), None);
        p.mark_written(&last.id, &path);
        let trusted = p.object(&last.id, last.len).expect("served unhashed");
        assert!(object::decode(&trusted, &last.id, last.len).is_err());
        p.mark_written(&last.id, &dir.path().join("elsewhere.img"));
        assert_eq!(p.object(&last.id, last.len), None, "written to another file: hashed");
        p.mark_written(&last.id, &path);
        p.serve(path.clone(), &index);
        assert_eq!(p.object(&last.id, last.len), None, "served anew: hashed again");
    }

    #[test]
    fn compressed_objects_are_served_as_they_arrived_once_verified() {
        let dir = tempfile::tempdir().unwrap();
        let text: Vec<u8> =
            (0..3000u32).flat_map(|i| format!("line {} of the bundle\n", i % 97).into_bytes()).collect();
        let chunks: Vec<&[u8]> = text.chunks(text.len() / 3).take(3).collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
        // Compressed harder than a peer serving it would (level 19 against 1): the bytes served
        // are the ones that arrived, not a new compression.
        let objects: Vec<Vec<u8>> = chunks.iter().map(|c| object::encode(c, 19)).collect();
        assert!(objects.iter().all(|o| o[0] == object::FLAG_ZSTD));
        // Room for two of the three objects.
        let p = SlotChunks::new(objects[0].len() + objects[1].len() + objects[2].len() / 2);
        let len = u32::try_from(chunks[0].len()).unwrap();
        let file = dir.path().join("slot.img");
        // An object that only arrived (from the CDN, not decoded yet) is never kept, even once
        // its chunk is written from another answer: it may be junk.
        let junk = object::encode(b"not the chunk at all, but compressible compressible compressible", 19);
        assert_eq!(junk[0], object::FLAG_ZSTD);
        p.note_encoding(&ids[0], &junk);
        p.mark_written(&ids[0], &file);
        assert_eq!(p.object(&ids[0], len), None, "an unverified arrival is not served");
        p.keep_verified(&ids[0], &objects[0]);
        assert_eq!(p.object(&ids[0], len), Some(objects[0].clone()), "served from memory, no slot needed");
        // A raw object is not kept; a third compressed one pushes the oldest out.
        let raw = [&[object::FLAG_RAW][..], chunks[1]].concat();
        p.keep_verified(&ids[1], &raw);
        assert_eq!(p.object(&ids[1], len), None);
        p.keep_verified(&ids[1], &objects[1]);
        p.keep_verified(&ids[2], &objects[2]);
        assert_eq!(p.object(&ids[0], len), None, "the oldest went first");
        assert_eq!(p.object(&ids[1], len), Some(objects[1].clone()));
        assert_eq!(p.object(&ids[2], len), Some(objects[2].clone()));
        // Off with a budget of 0.
        let off = SlotChunks::new(0);
        off.keep_verified(&ids[0], &objects[0]);
        assert_eq!(off.object(&ids[0], len), None);
    }
}
